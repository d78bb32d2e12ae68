"""Merging and GGUF export of Qwen3 and Qwen3-MoE (the tiny random models): the merged folders load in
transformers and compute what base + adapter computed; the GGUF files carry llama.cpp's qwen3 / qwen3moe
architecture (q/k norms as blk.N.attn_q_norm / attn_k_norm, experts stacked in ffn_*_exps) and run in llama.cpp
(node-llama-cpp) with transformers' greedy tokens."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from qwenbook_bridge.engine.export.gguf import GgufConfig, UnsupportedArchitectureError, export_gguf, gguf_tensor_names
from qwenbook_bridge.engine.export.gguf_read import GgufFile
from qwenbook_bridge.engine.export.merge import model_tensor_sources, save_merged
from qwenbook_bridge.engine.quant.quality import swapped_weights
from test_gguf import (HELDOUT, N_TOKENS, PROMPTS, QUANT_PROMPTS, check_llama_agrees_with_file_weights, greedy,
    run_llama, token_ids)


def load(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(folder))


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3_dir: Path):
    return load(tiny_qwen3_dir)


@pytest.fixture(scope="module")
def qwen3_moe(tiny_qwen3_moe_dir: Path):
    return load(tiny_qwen3_moe_dir)


def with_adapter(model: Any, **targets: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **targets))


def expected_greedy(model: Any, prompts: list[list[int]]) -> list[list[int]]:
    out = []
    for ids in prompts:
        tokens, gap = greedy(model, ids)
        # f16 weights and activations in llama.cpp move logits by ~1e-3; a near-tie could flip legitimately.
        assert gap > 0.01, f"prompt {ids} has a near-tie on its greedy path; choose another"
        out.append(tokens)
    return out


def test_qwen3_gguf_has_the_qwen3_architecture_and_its_q_k_norms(qwen3, tmp_path: Path):
    model, tok = qwen3
    path = tmp_path / "qwen3.gguf"
    report = export_gguf(model, tok, path, GgufConfig(type="f16"), heldout_texts=HELDOUT)
    with GgufFile(path) as f:
        md = f.metadata
        assert md["general.architecture"] == "qwen3"
        assert (md["qwen3.attention.head_count"], md["qwen3.attention.head_count_kv"]) == (4, 2)
        # Set apart from embedding_length / head_count (64 / 4), as llama.cpp reads it for Qwen3.
        assert (md["qwen3.attention.key_length"], md["qwen3.attention.value_length"]) == (32, 32)
        assert md["tokenizer.ggml.pre"] == "qwen2" and md["tokenizer.ggml.eos_token_id"] == 151645
        assert md["tokenizer.chat_template"] == tok.chat_template
        for i, layer in enumerate(model.model.layers):
            for which in ("q", "k"):
                t = f.tensors[f"blk.{i}.attn_{which}_norm.weight"]
                assert t.qtype == 0 and t.shape == (32,)  # f32, as llama.cpp expects norms
                assert torch.equal(f.dequantize(f"blk.{i}.attn_{which}_norm.weight"),
                                   getattr(layer.self_attn, f"{which}_norm").weight)
        assert f.tensors["blk.0.attn_q.weight"].shape == (128, 64)
    assert 0 < report.quality.mean_kl < 1e-3


def test_qwen3_f16_gguf_greedy_tokens_match_pytorch_in_llama_cpp(qwen3, tmp_path: Path):
    model, tok = qwen3
    path = tmp_path / "qwen3.gguf"
    export_gguf(model, tok, path, GgufConfig(type="f16"), evaluate=False)
    prompts = [token_ids(tok, p) for p in PROMPTS]
    out = run_llama({"model": str(path), "texts": PROMPTS, "prompts": prompts, "maxTokens": N_TOKENS}, tmp_path)
    assert out["tokenized"] == prompts, "llama.cpp must split text exactly as the transformers tokenizer does"
    assert out["greedy"] == expected_greedy(model, prompts)


def test_a_merged_qwen3_adapter_runs_in_transformers_and_in_llama_cpp(qwen3, tmp_path: Path):
    model, tok = qwen3
    tuned = with_adapter(model, target_modules="all-linear")
    save_merged(tuned, tok, tmp_path / "merged")
    merged, _ = load(tmp_path / "merged")
    ids = torch.tensor([token_ids(tok, PROMPTS[0])])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, tuned(ids).logits, atol=1e-4, rtol=0)
    export_gguf(tuned, tok, tmp_path / "lora.gguf", GgufConfig(type="f16"), evaluate=False)
    # The prompts whose greedy paths under this adapter (seed 0) have no near-tie.
    prompts = [token_ids(tok, PROMPTS[i]) for i in (1, 3, 4)]
    out = run_llama({"model": str(tmp_path / "lora.gguf"), "prompts": prompts, "maxTokens": N_TOKENS}, tmp_path)
    assert out["greedy"] == expected_greedy(merged, prompts)


def test_qwen3_moe_gguf_stacks_the_experts_as_llama_cpp_does(qwen3_moe, tmp_path: Path):
    model, tok = qwen3_moe
    path = tmp_path / "moe.gguf"
    export_gguf(model, tok, path, GgufConfig(type="f32"), evaluate=False)
    assert gguf_tensor_names("model.layers.1.mlp.experts.gate_up_proj") == (
        "blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight")
    with GgufFile(path) as f:
        md = f.metadata
        assert md["general.architecture"] == "qwen3moe"
        assert (md["qwen3moe.expert_count"], md["qwen3moe.expert_used_count"]) == (4, 2)
        assert md["qwen3moe.expert_feed_forward_length"] == 32 and md["qwen3moe.attention.key_length"] == 32
        experts = model.model.layers[1].mlp.experts
        gate, up = experts.gate_up_proj.detach().chunk(2, dim=1)  # transformers computes gate first
        assert torch.equal(f.dequantize("blk.1.ffn_gate_exps.weight"), gate)
        assert torch.equal(f.dequantize("blk.1.ffn_up_exps.weight"), up)
        assert torch.equal(f.dequantize("blk.1.ffn_down_exps.weight"), experts.down_proj.detach())
        assert torch.equal(f.dequantize("blk.1.ffn_gate_inp.weight"), model.model.layers[1].mlp.gate.weight)
        assert "blk.1.attn_q_norm.weight" in f.tensors


def test_qwen3_moe_f16_gguf_greedy_tokens_match_pytorch_in_llama_cpp(qwen3_moe, tmp_path: Path):
    model, tok = qwen3_moe
    path = tmp_path / "moe.gguf"
    report = export_gguf(model, tok, path, GgufConfig(type="f16"), heldout_texts=HELDOUT)
    assert 0 < report.quality.mean_kl < 1e-3
    texts = PROMPTS[1:]  # the first has a near-tie (0.0013) on this model's greedy path
    prompts = [token_ids(tok, p) for p in texts]
    out = run_llama({"model": str(path), "texts": texts, "prompts": prompts, "maxTokens": N_TOKENS}, tmp_path)
    assert out["tokenized"] == prompts
    assert out["greedy"] == expected_greedy(model, prompts)


def test_qwen3_moe_q4_k_m_quantizes_the_stacked_experts_and_runs_in_llama_cpp(qwen3_moe, tmp_path: Path):
    """A Qwen3-MoE at K-quant width (hidden and expert rows 256): the stacked experts are Q4_K / Q6_K tensors
    (ffn_down_exps Q6_K on llama.cpp's use_more_bits layers 2 and 3 of 4), the router stays f32, and llama.cpp
    computes what PyTorch computes from the file's weights."""
    from transformers import Qwen3MoeForCausalLM

    import gguf

    base, tok = qwen3_moe
    config = copy.deepcopy(base.config)
    config.hidden_size, config.moe_intermediate_size, config.intermediate_size = 256, 256, 256
    config.num_hidden_layers, config.layer_types = 4, ["full_attention"] * 4
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 64
    torch.manual_seed(5)
    model = Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():  # a trained model's spread, so that rounding moves logits as it does there
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1 if "embed" in name else 0.5 / p.shape[-1] ** 0.5)
    path = tmp_path / "moe-q4_k_m.gguf"
    export_gguf(model, tok, path, GgufConfig(type="q4_k_m"), evaluate=False)
    with GgufFile(path) as f:
        kind = {n: gguf.GGMLQuantizationType(t.qtype).name for n, t in f.tensors.items()}
    assert (kind["blk.0.ffn_gate_exps.weight"], kind["blk.0.ffn_up_exps.weight"]) == ("Q4_K", "Q4_K")
    assert [kind[f"blk.{i}.ffn_down_exps.weight"] for i in range(4)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert kind["blk.0.ffn_gate_inp.weight"] == "F32" and kind["token_embd.weight"] == "Q6_K"
    prompts = [token_ids(tok, p) for p in QUANT_PROMPTS]
    forced = [ids + greedy(model, ids)[0] for ids in prompts]
    check_llama_agrees_with_file_weights(model, path, (prompts, forced), "qwen3moe q4_k_m", tmp_path)


def test_the_quality_check_runs_the_files_expert_weights(qwen3_moe):
    model, tok = qwen3_moe
    ids = torch.tensor([token_ids(tok, PROMPTS[0])])
    asked: list[str] = []

    def zero_experts(name: str) -> torch.Tensor | None:
        asked.append(name)
        return torch.zeros_like(model.get_parameter(name)) if ".experts." in name else None

    with torch.no_grad():
        before = model(ids).logits
        with swapped_weights(model, zero_experts):
            swapped = model(ids).logits
        assert torch.equal(model(ids).logits, before)  # put back after the forward
    assert "model.layers.0.mlp.experts.gate_up_proj" in asked and not torch.allclose(swapped, before)


def test_a_merged_qwen3_moe_expert_adapter_saves_and_exports(qwen3_moe, tmp_path: Path):
    model, tok = qwen3_moe
    tuned = with_adapter(model, target_modules=["q_proj", "v_proj"],
                         target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    sources = {s.name: s.load() for s in model_tensor_sources(tuned)}
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert not torch.equal(sources[name], model.get_parameter(name))  # the expert adapter is folded in
    save_merged(tuned, tok, tmp_path / "merged")
    merged, _ = load(tmp_path / "merged")
    ids = torch.tensor([token_ids(tok, PROMPTS[1])])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, tuned(ids).logits, atol=1e-3, rtol=0)
    report = export_gguf(tuned, tok, tmp_path / "moe-lora.gguf", GgufConfig(type="f32"), heldout_texts=HELDOUT)
    assert report.quality.mean_kl < 1e-6  # the file equals base + adapter, experts included
    with GgufFile(tmp_path / "moe-lora.gguf") as f:
        gate = f.dequantize("blk.0.ffn_gate_exps.weight")
        assert torch.equal(gate, sources[name][:, :32])


def test_moe_layouts_llama_cpp_does_not_implement_are_refused(qwen3_moe, tmp_path: Path):
    from transformers import Qwen3MoeForCausalLM

    model, tok = qwen3_moe
    for change, why in (({"norm_topk_prob": False}, "does not renormalise its top-k expert weights"),
                        ({"mlp_only_layers": [1]}, "dense MLP layers between its expert layers")):
        config = copy.deepcopy(model.config)
        for k, v in change.items():
            setattr(config, k, v)
        with pytest.raises(UnsupportedArchitectureError, match=why):
            export_gguf(Qwen3MoeForCausalLM(config), tok, tmp_path / "refused.gguf")
    assert not (tmp_path / "refused.gguf").exists()
