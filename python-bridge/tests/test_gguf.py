"""GGUF export: file contents, and the file running in llama.cpp (node-llama-cpp 3.21.1) like the PyTorch model."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qwenbook_bridge.engine.export.gguf import (GgufConfig, UnsupportedArchitectureError, export_gguf,
    gguf_tensor_name, gguf_tensor_names)
from qwenbook_bridge.engine.export.gguf_read import GgufFile
from qwenbook_bridge.engine.export.merge import model_tensor_sources
from qwenbook_bridge.engine.quant.quality import DEFAULT_HELDOUT_TEXTS, swapped_weights
from qwenbook_bridge.engine.files.save import TargetExistsError

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNNER = REPO_ROOT / "tests" / "gguf" / "run-gguf.mjs"
# Raw text, no chat template: the comparison is about the weights and the tokenizer, not template rendering.
PROMPTS = ["Hello world, this is a test.", "你好，你是谁？", "def f(x):\n    return x*2\n",
           "The quick brown fox jumps over the lazy dog.", "Once upon a time, in a small village,"]
QUANT_PROMPTS = PROMPTS + ["1, 2, 3, 4, 5,"]
N_TOKENS = 16
# The quality report's held-out text: one paragraph (~80 tokens) instead of the built-in ~340. Its numbers are
# compared between types here, not with a target, and each report costs two passes over the 151936-word vocabulary.
HELDOUT = [DEFAULT_HELDOUT_TEXTS[0]]


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def exported(base, tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """Each type exported once (with its quality report), shared by the tests below."""
    model, tok = base
    out = tmp_path_factory.mktemp("gguf")
    return {t: (out / f"tiny-{t}.gguf", export_gguf(model, tok, out / f"tiny-{t}.gguf", GgufConfig(type=t),
                                                     heldout_texts=HELDOUT))
            for t in ("f32", "f16", "bf16", "q8_0", "q4_0")}


@pytest.fixture(scope="module")
def forced_paths(base) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, prompt + PyTorch's greedy continuation) for the rounded-type comparisons."""
    model, tok = base
    prompts = [token_ids(tok, p) for p in QUANT_PROMPTS]
    return prompts, [ids + greedy(model, ids)[0] for ids in prompts]


def run_llama(spec: dict, tmp_path: Path) -> Any:
    """run-gguf.mjs's output for `spec`; for {"runs": [spec, ...]} the list of outputs, all from one start of node
    and llama.cpp (~2.5 s of CPU each)."""
    node = shutil.which("node")
    assert node, "node is needed to run llama.cpp through node-llama-cpp"
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run([node, str(RUNNER), str(tmp_path / "spec.json")], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def forced_in_llama(paths: dict[str, Path], forced: list[list[int]], tmp_path: Path) -> dict[str, dict]:
    """Each file's teacher-forced argmax along `forced`, every file in one llama.cpp process."""
    kinds = list(paths)
    outs = run_llama({"runs": [{"model": str(paths[k]), "forced": forced} for k in kinds]}, tmp_path)
    return dict(zip(kinds, outs))


def token_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def greedy(model, ids: list[int]) -> tuple[list[int], float]:
    """Greedy continuation and the smallest gap between the top two logits along it."""
    x = torch.tensor([ids])
    smallest = float("inf")
    with torch.no_grad():
        for _ in range(N_TOKENS):
            top = model(input_ids=x, logits_to_keep=1).logits[0, -1].topk(2)  # the head over one row, not all
            smallest = min(smallest, (top.values[0] - top.values[1]).item())
            x = torch.cat([x, top.indices[:1][None]], dim=1)
    return x[0, len(ids):].tolist(), smallest


def test_gguf_metadata_tokenizer_and_tensors(base, exported) -> None:
    model, tok = base
    path, report = exported["f16"]
    with GgufFile(path) as f:
        md = f.metadata
        cfg = model.config
        assert md["general.architecture"] == "qwen2" and md["general.file_type"] == 1
        assert (md["qwen2.block_count"], md["qwen2.embedding_length"], md["qwen2.feed_forward_length"]) == (
            cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size)
        assert (md["qwen2.attention.head_count"], md["qwen2.attention.head_count_kv"]) == (4, 2)
        assert md["qwen2.context_length"] == 4096 and md["qwen2.rope.freq_base"] == 1e6
        assert abs(md["qwen2.attention.layer_norm_rms_epsilon"] - 1e-6) < 1e-12
        assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "qwen2"
        tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
        assert len(tokens) == len(types) == cfg.vocab_size
        assert tokens[9707] == "Hello" and tokens[151645] == "<|im_end|>" and tokens[151936 - 1] == "[PAD151935]"
        assert (types[9707], types[151645], types[151657], types[151935]) == (1, 3, 4, 5)  # normal/control/user/unused
        assert len(md["tokenizer.ggml.merges"]) == 151387 and md["tokenizer.ggml.merges"][0] == "Ġ Ġ"
        assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]) == (151643, 151645)
        assert md["tokenizer.ggml.add_bos_token"] is False
        assert md["tokenizer.chat_template"] == tok.chat_template
        # Tied embeddings: no output.weight. Norms and biases f32, matrices f16, values as in the model.
        names = {gguf_tensor_name(s.name) for s in model_tensor_sources(model)}
        assert set(f.tensors) == names and "output.weight" not in names
        assert f.tensors["blk.0.attn_norm.weight"].qtype == 0 and f.tensors["blk.0.attn_q.bias"].qtype == 0
        assert f.tensors["blk.1.ffn_down.weight"].qtype == 1
        w = model.model.layers[1].mlp.down_proj.weight
        assert torch.equal(f.dequantize("blk.1.ffn_down.weight"), w.half().float())
    assert report.sizes.files[0].path == "tiny-f16.gguf" and report.details["kept_f16"] == []


def test_f16_gguf_greedy_tokens_match_pytorch_in_llama_cpp(base, exported, tmp_path: Path) -> None:
    model, tok = base
    prompts = [token_ids(tok, p) for p in PROMPTS]
    expected = []
    for ids in prompts:
        tokens, gap = greedy(model, ids)
        # f16 weights and activations in llama.cpp move logits by ~1e-3 here; a near-tie could flip legitimately.
        assert gap > 0.01, f"prompt {tok.decode(ids)!r} has a near-tie on its greedy path; choose another"
        expected.append(tokens)
    out = run_llama({"model": str(exported["f16"][0]), "texts": PROMPTS, "prompts": prompts,
                     "maxTokens": N_TOKENS}, tmp_path)
    assert out["tokenized"] == prompts, "llama.cpp must split text exactly as the transformers tokenizer does"
    assert out["greedy"] == expected


@pytest.mark.parametrize("kind", ["bf16", "q8_0", "q4_0"])
def test_rounded_gguf_runs_in_llama_cpp_like_its_own_weights_in_pytorch(base, exported, forced_paths,
                                                                      rounded_in_llama, kind, tmp_path: Path) -> None:
    """Tolerance for rounded types. The weight rounding itself is measured in PyTorch (quality report, next test);
    here llama.cpp is compared with PyTorch running the very weights stored in the file (dequantized), so the
    only difference left is llama.cpp's own arithmetic: it rounds activations to q8_0 (bf16 for bf16) in these
    matmuls, which moves this model's logits by up to ~0.2. So, teacher-forced along PyTorch's greedy paths,
    llama.cpp's top-1 must equal PyTorch's at >= 85% of positions, and wherever they differ PyTorch's own top-2
    logit gap must be < 0.5, i.e. only near-ties may flip (measured: 90-99% agreement, flips at gaps <= 0.21)."""
    check_llama_agrees_with_file_weights(base[0], exported[kind][0], forced_paths, kind, tmp_path,
                                         rounded_in_llama[kind])


@pytest.fixture(scope="module")
def rounded_in_llama(exported, forced_paths, tmp_path_factory) -> dict[str, dict]:
    """llama.cpp's teacher-forced tokens for the rounded types, one process for the three files."""
    kinds = ("bf16", "q8_0", "q4_0")
    return forced_in_llama({k: exported[k][0] for k in kinds}, forced_paths[1], tmp_path_factory.mktemp("llama"))


def check_llama_agrees_with_file_weights(model, path: Path, forced_paths, kind: str, tmp_path: Path,
                                         llama_out: dict | None = None) -> None:
    """`llama_out`: run-gguf.mjs's output for `path` along forced_paths' sequences, if already run; else run here."""
    prompts, forced = forced_paths
    # One right-padded batch: causal attention keeps the padding from touching the real positions.
    width = max(map(len, forced))
    batch = torch.tensor([seq + [seq[-1]] * (width - len(seq)) for seq in forced])
    with GgufFile(path) as f:
        def provider(name: str):
            name = "model.embed_tokens.weight" if name == "lm_head.weight" else name
            parts = [f.dequantize(n) for n in gguf_tensor_names(name)]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # an MoE's fused gate_up

        with swapped_weights(model, provider), torch.no_grad():
            file_logits = model(input_ids=batch).logits
    out = llama_out if llama_out is not None else run_llama({"model": str(path), "forced": forced}, tmp_path)
    agree = total = 0
    for ids, seq, logits, llama in zip(prompts, forced, file_logits, out["forced"]):
        for pos in range(len(ids) - 1, len(seq)):
            top = logits[pos].topk(2)
            ours, theirs = top.indices[0].item(), llama[pos]["token"]
            total += 1
            if ours == theirs:
                agree += 1
            else:
                gap = (top.values[0] - logits[pos, theirs]).item()
                assert gap < 0.5, f"{kind}: llama.cpp picked {theirs} over {ours} at a logit gap of {gap:.3f}"
    assert agree / total >= 0.85, f"{kind}: top-1 agreement {agree}/{total}"


@pytest.fixture(scope="module")
def wide(base):
    """A random Qwen2 whose rows are multiples of 256 (hidden 256), so the K-quant mixes store real Q4_K / Q5_K /
    Q6_K tensors (the tiny model's rows of 64 all fall back); its ffn_down rows (384) still fall back."""
    from transformers import Qwen2ForCausalLM

    model, tok = base
    config = copy.deepcopy(model.config)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 256, 384, 4
    config.num_attention_heads, config.num_key_value_heads = 4, 2
    config.layer_types = ["full_attention"] * 4
    torch.manual_seed(3)
    wide = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # a spread like a trained model's, so that rounding moves logits as it does there
        for name, p in wide.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5 / p.shape[1] ** 0.5 if "embed" not in name else 0.1)
    prompts = [token_ids(tok, p) for p in QUANT_PROMPTS]
    return wide, tok, (prompts, [ids + greedy(wide, ids)[0] for ids in prompts])


@pytest.fixture(scope="module")
def k_exported(wide, tmp_path_factory) -> dict[str, tuple[Path, object]]:
    model, tok, _ = wide
    out = tmp_path_factory.mktemp("gguf-k")
    return {t: (out / f"wide-{t}.gguf", export_gguf(model, tok, out / f"wide-{t}.gguf", GgufConfig(type=t),
                                                     heldout_texts=HELDOUT))
            for t in ("q4_k_m", "q5_k_m", "q6_k")}


def test_k_quant_mixes_choose_tensor_types_as_llama_cpp(k_exported) -> None:
    """llama_tensor_get_type for 4 layers: attn_v and ffn_down get Q6_K on layers 2 and 3 (use_more_bits), the
    tied embedding (the output layer) Q6_K, rows of 384 fall back (Q4_K -> q5_0, Q5_K -> q5_1, Q6_K -> q8_0)."""
    expected = {
        "q4_k_m": {"token_embd.weight": "Q6_K", "blk.0.attn_q.weight": "Q4_K", "blk.0.attn_v.weight": "Q4_K",
                   "blk.2.attn_v.weight": "Q6_K", "blk.3.attn_v.weight": "Q6_K", "blk.1.ffn_up.weight": "Q4_K",
                   "blk.1.ffn_down.weight": "Q5_0", "blk.2.ffn_down.weight": "Q8_0",
                   "blk.0.attn_norm.weight": "F32", "blk.0.attn_q.bias": "F32"},
        "q5_k_m": {"token_embd.weight": "Q6_K", "blk.0.attn_output.weight": "Q5_K", "blk.1.attn_v.weight": "Q5_K",
                   "blk.2.attn_v.weight": "Q6_K", "blk.0.ffn_down.weight": "Q5_1", "blk.3.ffn_down.weight": "Q8_0"},
        "q6_k": {"token_embd.weight": "Q6_K", "blk.0.attn_k.weight": "Q6_K", "blk.2.attn_v.weight": "Q6_K",
                 "blk.0.ffn_gate.weight": "Q6_K", "blk.1.ffn_down.weight": "Q8_0"},
    }
    file_types = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
    import gguf

    for kind, want in expected.items():
        path, report = k_exported[kind]
        with GgufFile(path) as f:
            got = {n: gguf.GGMLQuantizationType(f.tensors[n].qtype).name for n in want}
            assert got == want, kind
            assert f.metadata["general.file_type"] == file_types[kind]
            assert f.metadata["general.quantization_version"] == gguf.GGML_QUANT_VERSION
        assert report.details["other_types"]["blk.1.ffn_down.weight"].endswith("rows of 384, not a multiple of 256")
        assert report.details["kept_f16"] == []


@pytest.mark.parametrize("kind", ["q4_k_m", "q5_k_m", "q6_k"])
def test_k_quant_gguf_runs_in_llama_cpp_like_its_own_weights_in_pytorch(wide, k_exported, k_in_llama, kind,
                                                                      tmp_path: Path) -> None:
    """The K-quant files load in llama.cpp and compute what PyTorch computes from the weights they hold (same
    tolerance as the other rounded types: llama.cpp rounds activations to q8_0 in these matmuls)."""
    model, _, forced_paths = wide
    check_llama_agrees_with_file_weights(model, k_exported[kind][0], forced_paths, kind, tmp_path, k_in_llama[kind])


@pytest.fixture(scope="module")
def k_in_llama(wide, k_exported, tmp_path_factory) -> dict[str, dict]:
    """llama.cpp's teacher-forced tokens for the K-quant files, one process for the three."""
    return forced_in_llama({k: path for k, (path, _) in k_exported.items()}, wide[2][1],
                           tmp_path_factory.mktemp("llama-k"))


def test_k_quant_quality_and_size_order(k_exported) -> None:
    """More bits, less damage and a bigger file: q4_k_m < q5_k_m < q6_k in size, the reverse in KL."""
    kinds = ("q4_k_m", "q5_k_m", "q6_k")
    kl = [k_exported[k][1].quality.mean_kl for k in kinds]
    size = [k_exported[k][1].sizes.total_bytes for k in kinds]
    assert kl[0] > kl[1] > kl[2] > 0, kl
    assert size[0] < size[1] < size[2], size


def test_quality_report_and_sizes_follow_the_type(exported) -> None:
    reports = {t: r for t, (_, r) in exported.items()}
    kl = {t: r.quality.mean_kl for t, r in reports.items()}
    size = {t: r.sizes.total_bytes for t, r in reports.items()}
    assert kl["f32"] == 0 and reports["f32"].quality.top1_agreement == 1.0
    assert 0 < kl["f16"] < 1e-3 and kl["f16"] < kl["bf16"] < kl["q8_0"] < kl["q4_0"]
    assert size["f32"] > size["f16"] == size["bf16"] > size["q8_0"] > size["q4_0"]
    assert reports["q4_0"].details["types"] == ["f32", "q4_0", "q8_0"]  # embedding kept at q8_0


def test_untied_output_layer_gets_its_own_tensor(base, tmp_path: Path) -> None:
    """Qwen2.5 from 3B up has a separate output layer: it must land in output.weight and run in llama.cpp."""
    from transformers import Qwen2ForCausalLM

    model, tok = base
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    untied = Qwen2ForCausalLM(config).eval()
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    path = tmp_path / "untied.gguf"
    export_gguf(untied, tok, path, GgufConfig(type="f16"), evaluate=False)
    with GgufFile(path) as f:
        assert torch.equal(f.dequantize("output.weight"), untied.lm_head.weight.half().float())
    prompts = [token_ids(tok, p) for p in PROMPTS[:2]]
    expected = []
    for ids in prompts:
        tokens, gap = greedy(untied, ids)
        assert gap > 0.01, f"prompt {tok.decode(ids)!r} has a near-tie on its greedy path; choose another"
        expected.append(tokens)
    assert run_llama({"model": str(path), "prompts": prompts, "maxTokens": N_TOKENS}, tmp_path)["greedy"] == expected


def test_adapter_is_merged_into_the_gguf(base, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model, tok = base
    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                        init_lora_weights=False, lora_dropout=0.0))
    report = export_gguf(pm, tok, tmp_path / "lora.gguf", GgufConfig(type="f32"), heldout_texts=HELDOUT)
    merged = {s.name: s.load() for s in model_tensor_sources(pm)}
    with GgufFile(tmp_path / "lora.gguf") as f:
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
            assert torch.equal(f.dequantize(gguf_tensor_name(name)), merged[name])
            assert not torch.equal(merged[name], model.get_parameter(name))
    assert report.quality.mean_kl < 1e-6  # the file equals base + adapter


def test_unsupported_architecture_is_refused(base, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = base
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(UnsupportedArchitectureError, match="supports Qwen2ForCausalLM.*LlamaForCausalLM"):
        export_gguf(llama, tok, tmp_path / "llama.gguf")
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_refused_unless_overwrite(base, tmp_path: Path) -> None:
    model, tok = base
    target = tmp_path / "model.gguf"
    target.write_text("precious")
    with pytest.raises(TargetExistsError, match="overwrite=True"):
        export_gguf(model, tok, target, GgufConfig(type="q4_0"), evaluate=False)
    assert target.read_text() == "precious"
    export_gguf(model, tok, target, GgufConfig(type="q4_0", overwrite=True), evaluate=False)
    assert target.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_bad_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown GGUF type 'q5_k'"):
        GgufConfig(type="q5_k").validate()
    with pytest.raises(ValueError, match="unknown GGUF type 'Q4_K_M'"):  # the notebook API lower-cases it
        GgufConfig(type="Q4_K_M").validate()


def test_metadata_arrays_pack_to_the_bytes_gguf_py_writes(tmp_path: Path) -> None:
    """The export's writer packs long arrays in one pass; the file must not change by a byte, and an array that
    is not one type is still refused."""
    import gguf

    from qwenbook_bridge.engine.export.gguf import new_gguf_writer

    def write(writer: Any, path: Path, extra: list[Any] | None = None) -> bytes:
        writer.add_token_list(["a", "é", "<|im_end|>", "", "Ġthe"])
        writer.add_token_types([gguf.TokenType.NORMAL, gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED,
                                gguf.TokenType.UNUSED, gguf.TokenType.NORMAL])
        writer.add_token_merges(["Ġ t", "h e"])
        writer.add_array("test.floats", [0.5, -1.25, 3.0])
        writer.add_array("test.ints", [1, -2, 2**31 - 1])
        if extra is not None:
            writer.add_array("test.extra", extra)
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        return path.read_bytes()

    assert write(new_gguf_writer("qwen2"), tmp_path / "fast.gguf") == write(gguf.GGUFWriter(None, "qwen2"),
                                                                             tmp_path / "plain.gguf")
    with pytest.raises(ValueError, match="same type"):
        write(new_gguf_writer("qwen2"), tmp_path / "mixed.gguf", extra=[1, 2.5])


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "BF16", "Q4_K"])
def test_block_codecs_match_gguf_py_byte_for_byte_across_slices(kind: str, monkeypatch) -> None:
    """Whole tensors go through gguf-py's block math in slices of rows; slices of 3 rows here so that a
    tensor spans several, with zero blocks and ties for the largest magnitude among the rows."""
    import gguf

    from qwenbook_bridge.engine.export import gguf_blocks

    monkeypatch.setattr(gguf_blocks, "_SLICE_VALUES", 3 * 256)
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    arr = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(0)).numpy()
    arr[0, 1] = 0.0
    arr[1, 2, :4] = [2.5, -2.5, 2.5, -2.5]
    if kind != "Q4_K":  # gguf-py cannot write K-quants (kquants.py does); reading them back goes through here
        raw = gguf_blocks.quantize(arr, qtype)
        np.testing.assert_array_equal(raw, gguf.quants.quantize(arr, qtype))
    else:
        from qwenbook_bridge.engine.export.kquants import quantize_k
        raw = quantize_k(arr, "q4_k")
    np.testing.assert_array_equal(gguf_blocks.dequantize(raw, qtype), gguf.quants.dequantize(raw, qtype))
