"""FastDecoder against transformers' own generate: same greedy tokens, same logits, on the tiny model (CPU, fp32),
plus the CUDA-graph and compiled paths against the eager one where a GPU is present."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from qwenbook_bridge.engine.generate.fast_decode import FastDecoder
from qwenbook_bridge.engine.generate.fast_ops import grouped_decode_attention, sdpa_decode_attention
from qwenbook_bridge.engine.generate.sampling import SamplingParams, sample_tokens

CHECK_TOKENS = 64


def _perturbed(model: Any, seed: int) -> Any:
    """A copy whose biases and norm weights are far from transformers' init (zeros / ones), so a decoder that
    dropped a bias or a norm weight would change the tokens."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def perturbed_lm(tiny_lm: Any) -> Any:
    return _perturbed(tiny_lm, seed=7)


@pytest.fixture(scope="module")
def tiny_qwen3() -> Any:
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, initializer_range=0.5,
                         max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(3)
    return _perturbed(AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval(), seed=8)


def _prompts(vocab: int, lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, min(vocab, 151643), (n,), generator=gen).tolist() for n in lengths]


def _hf_greedy(model: Any, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("which", ["tiny_lm", "perturbed_lm", "tiny_qwen3"])
def test_greedy_tokens_match_transformers_generate(which: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(which)
    decoder = FastDecoder(model, max_seq_len=128)
    for prompt in _prompts(model.config.vocab_size, (1, 9, 40)):
        assert decoder.generate([prompt], CHECK_TOKENS)[0] == _hf_greedy(model, prompt, CHECK_TOKENS)


def test_stacked_qkv_projection_gives_the_same_tokens(perturbed_lm: Any) -> None:
    prompts = _prompts(perturbed_lm.config.vocab_size, (4, 19))
    separate = FastDecoder(perturbed_lm, max_seq_len=96, batch_size=2, fuse_qkv=False).generate(prompts, 32)
    assert FastDecoder(perturbed_lm, max_seq_len=96, batch_size=2, fuse_qkv=True).generate(prompts, 32) == separate


@pytest.mark.parametrize("attend", [grouped_decode_attention, sdpa_decode_attention], ids=["split_k", "sdpa"])
def test_decode_attention_matches_plain_multi_head_attention(attend: Any) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 32, generator=gen)
    keys, values = torch.randn(2, 3, 2, 192, 32, generator=gen)
    # Row 0 sees one slot (two of its three 64-slot chunks are fully masked), row 2 sees all of them.
    visible = torch.arange(192)[None] <= torch.tensor([0, 100, 191])[:, None]
    # Plain multi-head attention with each KV head repeated for its 4 query heads, as transformers does.
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], keys.repeat_interleave(4, 1), values.repeat_interleave(4, 1), attn_mask=visible[:, None, None])
    torch.testing.assert_close(attend(q, keys, values, visible), ref.reshape(3, -1), rtol=1e-5, atol=1e-5)


def test_prefill_logits_match_transformers_forward(perturbed_lm: Any) -> None:
    decoder = FastDecoder(perturbed_lm, max_seq_len=64)
    prompt = _prompts(perturbed_lm.config.vocab_size, (23,))[0]
    ours = decoder.greedy_logits(prompt)
    with torch.no_grad():
        ref = perturbed_lm(torch.tensor([prompt])).logits[0, -1].float()
    assert torch.linalg.vector_norm(ours - ref) / torch.linalg.vector_norm(ref) < 1e-5


def test_chunked_prefill_matches_one_pass(perturbed_lm: Any) -> None:
    prompt = _prompts(perturbed_lm.config.vocab_size, (30,), seed=4)[0]
    whole = FastDecoder(perturbed_lm, max_seq_len=64)
    chunked = FastDecoder(perturbed_lm, max_seq_len=64, prefill_chunk=7)
    a, b = chunked.greedy_logits(prompt), whole.greedy_logits(prompt)
    assert torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b) < 1e-5
    assert chunked.generate([prompt], 16) == whole.generate([prompt], 16)


def test_batch_rows_are_independent(perturbed_lm: Any) -> None:
    prompts = _prompts(perturbed_lm.config.vocab_size, (3, 17, 11))
    batched = FastDecoder(perturbed_lm, max_seq_len=96, batch_size=4).generate(prompts, 32)
    single = FastDecoder(perturbed_lm, max_seq_len=96)
    assert batched == [single.generate([p], 32)[0] for p in prompts]
    assert batched[1] == _hf_greedy(perturbed_lm, prompts[1], 32)


def test_decoder_is_reusable_and_fills_the_cache_exactly(perturbed_lm: Any) -> None:
    prompt = _prompts(perturbed_lm.config.vocab_size, (10,), seed=5)[0]
    decoder = FastDecoder(perturbed_lm, max_seq_len=10 + 24 - 1)
    first = decoder.generate([prompt], 24)
    decoder.generate(_prompts(perturbed_lm.config.vocab_size, (5,), seed=6), 8)
    assert decoder.generate([prompt], 24) == first
    assert first[0] == _hf_greedy(perturbed_lm, prompt, 24)
    with pytest.raises(ValueError, match="max_seq_len=33"):
        decoder.generate([prompt], 25)


def test_stop_tokens_end_each_row_separately(perturbed_lm: Any) -> None:
    prompts = _prompts(perturbed_lm.config.vocab_size, (6, 12), seed=2)
    decoder = FastDecoder(perturbed_lm, max_seq_len=64, batch_size=2)
    free = decoder.generate(prompts, 20)
    stop = free[0][4]
    assert stop not in free[0][:4]
    steps = list(decoder.stream(prompts, 20, eos_token_ids=[stop], pad_token_id=0))
    row0 = [s[0] for s in steps]
    assert row0[:5] == free[0][:5] and all(t is None for t in row0[5:])
    stopped = decoder.generate(prompts, 20, eos_token_ids=[stop])
    assert stopped[0] == free[0][:5]
    cut = free[1].index(stop) + 1 if stop in free[1] else len(free[1])
    assert stopped[1] == free[1][:cut]


def test_sampling_is_seeded_and_degenerates_to_greedy(perturbed_lm: Any) -> None:
    decoder = FastDecoder(perturbed_lm, max_seq_len=64)
    prompt = _prompts(perturbed_lm.config.vocab_size, (8,), seed=9)
    greedy = decoder.generate(prompt, 24)
    warm = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, seed=11)
    assert decoder.generate(prompt, 24, warm) == decoder.generate(prompt, 24, warm)
    assert decoder.generate(prompt, 24, warm) != greedy
    assert decoder.generate(prompt, 24, SamplingParams(temperature=1.5, top_k=1, top_p=1.0, seed=1)) == greedy
    assert decoder.generate(prompt, 24, SamplingParams(temperature=1.5, top_k=0, top_p=1e-6, seed=1)) == greedy


def test_sample_tokens_follows_the_distribution_and_the_cuts() -> None:
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    logits = probs.log().expand(n, 4).contiguous()

    def draw(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
        return sample_tokens(logits, torch.full((n,), temperature), torch.full((n,), top_k, dtype=torch.long),
                             torch.full((n,), top_p))

    freq = torch.bincount(draw(), minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.015), freq
    assert set(draw(top_k=2).tolist()) == {0, 1}
    # 0.5 alone does not reach 0.7, 0.5 + 0.3 does: exactly the two most likely tokens survive.
    top_p = torch.bincount(draw(top_p=0.7), minlength=4).float() / n
    assert top_p[2:].sum() == 0 and abs(top_p[0] - 0.5 / 0.8) < 0.015
    assert set(draw(temperature=0.0).tolist()) == {0}


def test_bad_requests_say_what_to_change(perturbed_lm: Any) -> None:
    decoder = FastDecoder(perturbed_lm, max_seq_len=16, batch_size=2)
    with pytest.raises(ValueError, match="1 to 2 prompts"):
        decoder.generate([[1], [2], [3]], 4)
    with pytest.raises(ValueError, match="at least one token"):
        decoder.generate([[]], 4)
    with pytest.raises(ValueError, match="larger max_seq_len"):
        decoder.generate([[1] * 12], 8)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 151936\)"):
        decoder.generate([[151936]], 2)
    with pytest.raises(ValueError, match="topP"):
        SamplingParams(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="CUDA"):
        FastDecoder(perturbed_lm, max_seq_len=16, cuda_graphs=True)


def test_adapter_wrapped_model_is_refused(tiny_lm: Any) -> None:
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(copy.deepcopy(tiny_lm), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(TypeError, match="merge_and_unload"):
        FastDecoder(wrapped.base_model.model, max_seq_len=16)


def test_small_benchmark_runs_and_reports_no_divergence(tmp_path: Path, tiny_model_dir: Path) -> None:
    from qwenbook_bridge.bench import decode as bench

    out = tmp_path / "bench.json"
    code = bench.main(["--small", "--device", "cpu", "--variants", "eager", "--skip", "batched",
                       "--engine", "--tokenizer", str(tiny_model_dir), "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 0 and report["errors"] == []
    assert {(r["scenario"], r["path"]) for r in report["results"]} >= {
        ("decode_b1", "hf"), ("decode_b1", "eager"), ("ttft", "hf"), ("ttft", "eager"), ("decode_b1", "engine")}
    # Through the paged engine: every request ran to its full length (else the row is an error).
    assert next(r for r in report["results"] if r["path"] == "engine")["tokens_per_s"] > 0
    assert report["correctness"] and all(c["first_divergence"] is None for c in report["correctness"])
    assert report["meta"]["ceiling_tokens_per_s"] > 0


def test_the_benchmark_reports_what_quantizing_the_output_layer_costs(capsys: pytest.CaptureFixture[str]) -> None:
    """--quant int8+head / int4+head quantize the output layer too; beside the speed, the benchmark reports the
    output layer's own cost on the model's hidden states: none for the 16-bit head, some for int4."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwenbook_bridge.bench import decode as bench
    from qwenbook_bridge.engine.quant.config import QuantConfig
    from qwenbook_bridge.engine.quant.layers import QuantizedLinear
    from qwenbook_bridge.engine.quant.quantize import quantize_model

    assert bench.quant_spec("int4+head") == ("int4", True) and bench.quant_spec("int8") == ("int8", False)
    with pytest.raises(SystemExit):
        bench.main(["--small", "--device", "cpu", "--quant", "int8,int4+tail"])
    assert "--quant 'int4+tail': use int8 or int4, optionally with +head" in capsys.readouterr().err

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=False)).eval()
    head = model.lm_head.weight.detach().clone()
    prompt = list(range(3, 60))
    with torch.no_grad():
        same = bench.head_quality(model, head, prompt)
        assert same["head_mean_kl"] < 1e-6 and same["head_top1_agreement"] == 1.0
        quantize_model(model, QuantConfig("int4", 32, include_lm_head=True))
        assert isinstance(model.lm_head, QuantizedLinear)
        cost = bench.head_quality(model, head, prompt)
    assert cost["positions"] == len(prompt) and cost["head_mean_kl"] > 1e-6
    assert 0 < cost["head_max_abs_error_share"] < 0.2 and cost["head_top1_agreement"] > 0.5


def test_the_decode_ceiling_counts_the_bytes_a_step_reads() -> None:
    """The benchmark's batch-1 ceiling is bandwidth / bytes read per step: an untied input table contributes one
    row (the head is read whole), a tied one is read once as the head, and int8 layers count their codes and
    scales instead of 16-bit weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwenbook_bridge.bench.decode import step_read_bytes
    from qwenbook_bridge.engine.quant.config import QuantConfig
    from qwenbook_bridge.engine.quant.layers import QuantizedLinear
    from qwenbook_bridge.engine.quant.quantize import quantize_model

    def build(tied: bool) -> Any:
        torch.manual_seed(0)
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=tied))

    def nbytes(ts: Any) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    untied, tied = build(False), build(True)
    table = untied.get_input_embeddings().weight
    assert step_read_bytes(untied) == (nbytes(untied.parameters()) + nbytes(untied.buffers())
                                       - (table.shape[0] - 1) * table.shape[1] * table.element_size())
    assert step_read_bytes(tied) == nbytes(tied.parameters()) + nbytes(tied.buffers())
    before = step_read_bytes(untied)
    quantize_model(untied, QuantConfig(method="int8"))
    layers = [m for m in untied.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14
    float_bytes = sum(m.in_features * m.out_features * 4 for m in layers)  # the fp32 weights they replaced
    assert step_read_bytes(untied) == before - float_bytes + nbytes(b for m in layers for b in m.buffers())
    assert step_read_bytes(untied) < before - float_bytes // 2
