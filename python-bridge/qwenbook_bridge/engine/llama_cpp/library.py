"""ctypes bindings to the llama.cpp shared library that node-llama-cpp ships (libllama, libggml), for the few calls
the CPU engine makes: load a GGUF, make a context, decode a batch of tokens for several sequences, read logits, drop
a sequence's cached tokens.

The struct layouts below are those of llama.h at the release node-llama-cpp's prebuilt binaries were made from
(`LLAMA_CPP_RELEASE`); the library folder's `_nlcBuildMetadata.json` names its release, and a library from
another release is refused rather than called with a layout it may not share.

Where the library is: `$QWENBOOK_LLAMA_CPP_LIB` (a folder holding libllama*.so), which the kernel sets to the
binaries of the node-llama-cpp it depends on, else the same package found in a `node_modules` above this file or
the working directory.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import sys
import threading
from pathlib import Path

LLAMA_CPP_RELEASE = "v0.4.0"

llama_token = ctypes.c_int32
llama_pos = ctypes.c_int32
llama_seq_id = ctypes.c_int32
_abort_callback = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p)
_log_callback = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


class LlamaCppUnavailable(RuntimeError):
    """The llama.cpp library cannot be found or loaded here; the message says where it looked."""


class ModelParams(ctypes.Structure):
    _fields_ = [
        ("devices", ctypes.c_void_p),
        ("tensor_buft_overrides", ctypes.c_void_p),
        ("n_gpu_layers", ctypes.c_int32),
        ("split_mode", ctypes.c_int),
        ("load_mode", ctypes.c_int),
        ("lazy_mode", ctypes.c_int),
        ("main_gpu", ctypes.c_int32),
        ("tensor_split", ctypes.c_void_p),
        ("progress_callback", ctypes.c_void_p),
        ("progress_callback_user_data", ctypes.c_void_p),
        ("kv_overrides", ctypes.c_void_p),
        ("vocab_only", ctypes.c_bool),
        ("check_tensors", ctypes.c_bool),
        ("use_extra_bufts", ctypes.c_bool),
        ("no_host", ctypes.c_bool),
        ("no_alloc", ctypes.c_bool),
        ("load_mtp", ctypes.c_bool),
    ]


class ContextParams(ctypes.Structure):
    _fields_ = [
        ("n_ctx", ctypes.c_uint32),
        ("n_batch", ctypes.c_uint32),
        ("n_ubatch", ctypes.c_uint32),
        ("n_seq_max", ctypes.c_uint32),
        ("n_rs_seq", ctypes.c_uint32),
        ("n_outputs_max", ctypes.c_uint32),
        ("n_outputs_max_per_seq", ctypes.c_uint32),
        ("n_threads", ctypes.c_int32),
        ("n_threads_batch", ctypes.c_int32),
        ("ctx_type", ctypes.c_int),
        ("rope_scaling_type", ctypes.c_int),
        ("pooling_type", ctypes.c_int),
        ("attention_type", ctypes.c_int),
        ("flash_attn_type", ctypes.c_int),
        ("rope_freq_base", ctypes.c_float),
        ("rope_freq_scale", ctypes.c_float),
        ("yarn_ext_factor", ctypes.c_float),
        ("yarn_attn_factor", ctypes.c_float),
        ("yarn_beta_fast", ctypes.c_float),
        ("yarn_beta_slow", ctypes.c_float),
        ("yarn_orig_ctx", ctypes.c_uint32),
        ("defrag_thold", ctypes.c_float),
        ("cb_eval", ctypes.c_void_p),
        ("cb_eval_user_data", ctypes.c_void_p),
        ("type_k", ctypes.c_int),
        ("type_v", ctypes.c_int),
        ("abort_callback", ctypes.c_void_p),
        ("abort_callback_data", ctypes.c_void_p),
        ("embeddings", ctypes.c_bool),
        ("offload_kqv", ctypes.c_bool),
        ("no_perf", ctypes.c_bool),
        ("op_offload", ctypes.c_bool),
        ("swa_full", ctypes.c_bool),
        ("kv_unified", ctypes.c_bool),
        ("samplers", ctypes.c_void_p),
        ("n_samplers", ctypes.c_size_t),
        ("ctx_other", ctypes.c_void_p),
    ]


class Batch(ctypes.Structure):
    _fields_ = [
        ("n_tokens", ctypes.c_int32),
        ("token", ctypes.POINTER(llama_token)),
        ("embd", ctypes.POINTER(ctypes.c_float)),
        ("pos", ctypes.POINTER(llama_pos)),
        ("n_seq_id", ctypes.POINTER(ctypes.c_int32)),
        ("seq_id", ctypes.POINTER(ctypes.POINTER(llama_seq_id))),
        ("logits", ctypes.POINTER(ctypes.c_int8)),
    ]


_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "llama_backend_init": (None, []),
    "llama_log_set": (None, [_log_callback, ctypes.c_void_p]),
    "llama_model_default_params": (ModelParams, []),
    "llama_context_default_params": (ContextParams, []),
    "llama_model_load_from_file": (ctypes.c_void_p, [ctypes.c_char_p, ModelParams]),
    "llama_model_free": (None, [ctypes.c_void_p]),
    "llama_init_from_model": (ctypes.c_void_p, [ctypes.c_void_p, ContextParams]),
    "llama_free": (None, [ctypes.c_void_p]),
    "llama_model_get_vocab": (ctypes.c_void_p, [ctypes.c_void_p]),
    "llama_vocab_n_tokens": (ctypes.c_int32, [ctypes.c_void_p]),
    "llama_n_ctx": (ctypes.c_uint32, [ctypes.c_void_p]),
    "llama_model_n_params": (ctypes.c_uint64, [ctypes.c_void_p]),
    "llama_get_memory": (ctypes.c_void_p, [ctypes.c_void_p]),
    "llama_memory_clear": (None, [ctypes.c_void_p, ctypes.c_bool]),
    "llama_memory_seq_rm": (ctypes.c_bool, [ctypes.c_void_p, llama_seq_id, llama_pos, llama_pos]),
    "llama_batch_init": (Batch, [ctypes.c_int32, ctypes.c_int32, ctypes.c_int32]),
    "llama_batch_free": (None, [Batch]),
    "llama_decode": (ctypes.c_int32, [ctypes.c_void_p, Batch]),
    "llama_get_logits_ith": (ctypes.POINTER(ctypes.c_float), [ctypes.c_void_p, ctypes.c_int32]),
    "llama_set_n_threads": (None, [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32]),
    "llama_set_abort_callback": (None, [ctypes.c_void_p, _abort_callback, ctypes.c_void_p]),
}


def _platform_folders() -> list[str]:
    """node-llama-cpp's binary packages for this platform (as kernel/src/bridge/paths.ts names them)."""
    machine = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower())
    system = {"linux": "linux", "darwin": "mac"}.get(sys.platform)
    if machine is None or system is None:
        raise LlamaCppUnavailable(f"no llama.cpp binaries are shipped for {sys.platform}/{platform.machine()}")
    return ["mac-arm64-metal"] if (system, machine) == ("mac", "arm64") else [f"{system}-{machine}"]


def candidate_folders() -> list[Path]:
    """Where the library may be, in the order they are tried."""
    env = os.environ.get("QWENBOOK_LLAMA_CPP_LIB")
    if env:
        return [Path(env)]
    found: list[Path] = []
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for parent in (start, *start.parents):
            for name in _platform_folders():
                folder = parent / "node_modules" / "@node-llama-cpp" / name / "bins" / name
                if folder not in found:
                    found.append(folder)
    return found


def _release_of(folder: Path) -> str | None:
    try:
        meta = json.loads((folder / "_nlcBuildMetadata.json").read_text(encoding="utf-8"))
        return str(meta["buildOptions"]["llamaCpp"]["release"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_library_folder() -> Path:
    tried = []
    for folder in candidate_folders():
        libs = sorted(folder.glob("libllama*.so")) + sorted(folder.glob("libllama*.dylib"))
        if not libs:
            tried.append(f"{folder} (no libllama there)")
            continue
        release = _release_of(folder)
        if release != LLAMA_CPP_RELEASE:
            tried.append(f"{folder} (llama.cpp {release or 'of an unknown release'}, these bindings are for "
                         f"{LLAMA_CPP_RELEASE})")
            continue
        return folder
    raise LlamaCppUnavailable("the llama.cpp library was not found: " + "; ".join(tried) +
                              ". Install the kernel's npm dependencies (npm install) or set QWENBOOK_LLAMA_CPP_LIB "
                              "to the folder of node-llama-cpp's prebuilt binaries")


class Library:
    """The loaded libraries and their typed functions, as attributes named like the C functions."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        mode = ctypes.RTLD_GLOBAL
        try:
            ggml_base = ctypes.CDLL(str(_one(folder, "libggml-base")), mode=mode)
            ggml = ctypes.CDLL(str(_one(folder, "libggml.")), mode=mode)
            self._llama = ctypes.CDLL(str(_one(folder, "libllama.")), mode=mode)
        except OSError as e:
            raise LlamaCppUnavailable(f"the llama.cpp library in {folder} did not load: {e}") from e
        del ggml_base
        # ggml picks the CPU backend built for this processor (AVX2, AVX-512, ...) from the folder's variants.
        ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_load_all_from_path.restype = None
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(self._llama, name)
            fn.restype, fn.argtypes = restype, argtypes
            setattr(self, name, fn)
        # llama.cpp logs every load at length to stderr; only its warnings and errors are worth a user's eye.
        self._log = _log_callback(_quiet_log)
        self.llama_log_set(self._log, None)
        ggml.ggml_backend_load_all_from_path(str(folder).encode())
        self.llama_backend_init()


def _one(folder: Path, prefix: str) -> Path:
    for suffix in (".so", ".dylib"):
        hits = sorted(p for p in folder.iterdir() if p.name.startswith(prefix) and p.name.endswith(suffix))
        if hits:
            return hits[0]
    raise LlamaCppUnavailable(f"{folder} has no {prefix}*.so")


_LEVEL_WARN = 3  # ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5


# Said on every load of a Qwen GGUF about an added token ('</s>') that is not special in Qwen's tokenizer.
_KNOWN_NOISE = (b"control-looking token",)


def _quiet_log(level: int, text: bytes | None, _: object) -> None:
    if text and level in (_LEVEL_WARN, 4) and not any(n in text for n in _KNOWN_NOISE):
        sys.stderr.write("llama.cpp: " + text.decode("utf-8", "replace"))


_lock = threading.Lock()
_loaded: Library | None = None


def library() -> Library:
    """The process's one loaded library (loading it the first time)."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = Library(find_library_folder())
        return _loaded
