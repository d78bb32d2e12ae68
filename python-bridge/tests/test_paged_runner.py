"""PagedRunner against transformers (and peft) on tiny models, CPU fp32: the same greedy tokens however a step
splits the tokens among sequences, prefill chunks and decode rows, wherever in the cache the blocks lie, on
int8 layers, and with per-row LoRA adapters."""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from qwenbook_bridge.engine.generate.paged.runner import PagedRunner, SeqChunk
from qwenbook_bridge.engine.models.adapters import AdapterError
from qwenbook_bridge.engine.quant.config import QuantConfig
from qwenbook_bridge.engine.quant.quantize import quantize_model
from test_fast_decode import _hf_greedy, _prompts, perturbed_lm, tiny_lm, tiny_qwen3  # noqa: F401

NEW_TOKENS = 20


@dataclass
class Seq:
    """One sequence a test drives: its prompt, how many tokens to generate, its blocks, and the step it joins."""

    prompt: list[int]
    new_tokens: int
    blocks: list[int]
    adapter: int = -1
    join_step: int = 0
    out: list[int] = field(default_factory=list)
    done: int = 0  # tokens of prompt + out already in the cache

    @property
    def finished(self) -> bool:
        return len(self.out) == self.new_tokens


def drive(runner: PagedRunner, seqs: list[Seq], chunk: int | None = None) -> list[list[tuple[str, int]]]:
    """Run the sequences to completion, all that are active sharing each step: a prefilling sequence feeds up to
    `chunk` prompt tokens a step (None: the whole rest of its prompt), a decoding one its last token. Returns each
    step's makeup [(kind, tokens)] so a test can check which mixes it covered."""
    steps = []
    step = 0
    while not all(s.finished for s in seqs):
        active = [s for s in seqs if s.join_step <= step and not s.finished]
        chunks = []
        for s in active:
            if s.done < len(s.prompt):
                n = len(s.prompt) - s.done if chunk is None else min(chunk, len(s.prompt) - s.done)
                ids = s.prompt[s.done:s.done + n]
                chunks.append(SeqChunk(ids, s.done, s.blocks, s.adapter, logits=s.done + n == len(s.prompt)))
            else:
                chunks.append(SeqChunk([s.out[-1]], s.done, s.blocks, s.adapter))
        if chunks:
            logits = runner.step(chunks)
            assert logits.dtype == torch.float32
            assert logits.shape[0] == sum(c.logits for c in chunks)
            row = 0
            for s, c in zip(active, chunks):
                s.done += len(c.token_ids)
                if c.logits:
                    s.out.append(int(logits[row].argmax()))
                    row += 1
            steps.append([("prefill" if c.start < len(s.prompt) else "decode", len(c.token_ids))
                          for s, c in zip(active, chunks)])
        step += 1
    return steps


def contiguous_tables(lengths: list[int], block_size: int) -> list[list[int]]:
    tables, nxt = [], 0
    for n in lengths:
        k = -(-n // block_size)
        tables.append(list(range(nxt, nxt + k)))
        nxt += k
    return tables


def greedy(runner: PagedRunner, prompt: list[int], new_tokens: int = NEW_TOKENS, chunk: int | None = None,
           adapter: int = -1) -> list[int]:
    seq = Seq(prompt, new_tokens, contiguous_tables([len(prompt) + new_tokens], runner.block_size)[0], adapter)
    drive(runner, [seq], chunk)
    return seq.out


@pytest.mark.parametrize("which", ["tiny_lm", "perturbed_lm", "tiny_qwen3"])
def test_whole_prompt_then_token_by_token_equals_generate(which: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(which)
    runner = PagedRunner(model, num_blocks=16, block_size=8)
    for prompt in _prompts(model.config.vocab_size, (1, 13, 40)):
        assert greedy(runner, prompt) == _hf_greedy(model, prompt, NEW_TOKENS)


@pytest.mark.parametrize("which", ["perturbed_lm", "tiny_qwen3"])
def test_prompt_in_chunks_of_three_over_blocks_of_four(which: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(which)
    runner = PagedRunner(model, num_blocks=16, block_size=4)
    prompt = _prompts(model.config.vocab_size, (22,), seed=1)[0]
    assert greedy(runner, prompt, chunk=3) == _hf_greedy(model, prompt, NEW_TOKENS)


def test_mixed_step_rows_equal_each_alone(perturbed_lm: Any) -> None:
    prompts = _prompts(perturbed_lm.config.vocab_size, (5, 17, 26), seed=2)
    alone_runner = PagedRunner(perturbed_lm, num_blocks=12, block_size=4)
    alone = [greedy(alone_runner, p) for p in prompts]
    assert alone[1] == _hf_greedy(perturbed_lm, prompts[1], NEW_TOKENS)
    runner = PagedRunner(perturbed_lm, num_blocks=40, block_size=4)
    tables = contiguous_tables([len(p) + NEW_TOKENS for p in prompts], 4)
    # The longest prompt joins late, so its chunked prefill runs while the other two decode.
    seqs = [Seq(prompts[0], NEW_TOKENS, tables[0]), Seq(prompts[1], NEW_TOKENS, tables[1]),
            Seq(prompts[2], NEW_TOKENS, tables[2], join_step=3)]
    steps = drive(runner, seqs, chunk=5)
    assert [s.out for s in seqs] == alone
    assert any(sorted(k for k, _ in st) == ["decode", "decode", "prefill"] and max(n for _, n in st) > 1
               for st in steps), steps


def test_shuffled_block_tables_give_the_same_tokens(perturbed_lm: Any) -> None:
    prompts = _prompts(perturbed_lm.config.vocab_size, (9, 14, 3), seed=3)
    lengths = [len(p) + NEW_TOKENS for p in prompts]
    ordered = [Seq(p, NEW_TOKENS, t) for p, t in zip(prompts, contiguous_tables(lengths, 4))]
    drive(PagedRunner(perturbed_lm, num_blocks=24, block_size=4), ordered, chunk=4)
    # Same sequences, each block table a random non-contiguous, out-of-order draw from a larger pool.
    pool = list(range(40))
    random.Random(5).shuffle(pool)
    tables = []
    for n in lengths:
        k = -(-n // 4)
        tables.append(pool[:k])
        pool = pool[k:]
    assert any(t != sorted(t) for t in tables)
    shuffled = [Seq(p, NEW_TOKENS, t) for p, t in zip(prompts, tables)]
    drive(PagedRunner(perturbed_lm, num_blocks=40, block_size=4), shuffled, chunk=4)
    assert [s.out for s in shuffled] == [s.out for s in ordered]
    assert ordered[0].out == _hf_greedy(perturbed_lm, prompts[0], NEW_TOKENS)


def test_int8_model_decodes_as_its_own_forward(perturbed_lm: Any) -> None:
    model = copy.deepcopy(perturbed_lm)
    quantize_model(model, QuantConfig(method="int8", group_size=32))
    runner = PagedRunner(model, num_blocks=16, block_size=8)
    for prompt in _prompts(model.config.vocab_size, (7, 30), seed=4):
        assert greedy(runner, prompt, chunk=8) == _hf_greedy(model, prompt, NEW_TOKENS)


def test_copied_blocks_continue_the_same_sequence(perturbed_lm: Any) -> None:
    runner = PagedRunner(perturbed_lm, num_blocks=20, block_size=4)
    prompt = _prompts(perturbed_lm.config.vocab_size, (10,), seed=6)[0]
    expected = greedy(runner, prompt, new_tokens=8)
    first = runner.step([SeqChunk(prompt, 0, [0, 1, 2])])
    runner.copy_blocks([0, 1, 2], [7, 5, 11])
    # Decoding from the copies (with the original blocks overwritten by another prompt) follows the same path.
    runner.step([SeqChunk(_prompts(perturbed_lm.config.vocab_size, (12,), seed=7)[0], 0, [0, 1, 2])])
    seq = Seq(prompt, 8, [7, 5, 11, 13, 14], done=len(prompt), out=[int(first[0].argmax())])
    drive(runner, [seq])
    assert seq.out == expected


def test_decode_only_steps_run_the_bucketed_step_with_padding_rows(perturbed_lm: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Three rows decode in the 4-row bucket (one padding row writing to the scratch block); the tokens must not
    # change, and no decode-only step may fall back to the mixed-step path.
    from qwenbook_bridge.engine.generate.paged.decode_step import DecodeStep

    buckets: list[int] = []
    forward = DecodeStep._forward

    def counting(self: DecodeStep, b: int, lora: bool, width: int | None = None) -> torch.Tensor:
        buckets.append(b)
        return forward(self, b, lora, width)

    monkeypatch.setattr(DecodeStep, "_forward", counting)
    prompts = _prompts(perturbed_lm.config.vocab_size, (5, 9, 7), seed=21)
    runner = PagedRunner(perturbed_lm, num_blocks=40, block_size=4, max_batch=6)
    assert runner.decode.buckets == [1, 2, 4, 6]
    # A cache full of NaN: the CPU leaves it unwritten, so nothing may read a slot before writing it.
    for kv in runner.kv:
        kv.fill_(float("nan"))
    tables = contiguous_tables([len(p) + NEW_TOKENS for p in prompts], 4)
    seqs = [Seq(p, NEW_TOKENS, t) for p, t in zip(prompts, tables)]
    steps = drive(runner, seqs)
    decode_only = sum(all(kind == "decode" for kind, _ in step) for step in steps)
    assert len(buckets) == decode_only and set(buckets) == {4}
    assert [s.out for s in seqs] == [_hf_greedy(perturbed_lm, p, NEW_TOKENS) for p in prompts]
    # Nothing was written outside the sequences' blocks but the scratch block after the pool's last one.
    used = {b for t in tables for b in t}
    for kv in runner.kv:
        unused = [b for b in range(runner.num_blocks) if b not in used]
        assert all(kv[:, b * 4:(b + 1) * 4].isnan().all() for b in unused)
        assert not kv[:, runner.capacity].isnan().any()  # the padding row wrote the scratch slot


def test_bad_chunks_say_what_is_wrong(perturbed_lm: Any) -> None:
    runner = PagedRunner(perturbed_lm, num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match=r"positions \[0, 6\) = 2 blocks of 4, but its block_table has 1"):
        runner.step([SeqChunk([1, 2, 3, 4, 5, 6], 0, [0])])
    with pytest.raises(ValueError, match="outside the cache's blocks 0..3"):
        runner.step([SeqChunk([1, 2], 0, [9])])
    with pytest.raises(ValueError, match="adapter slot 0, which holds no adapter"):
        runner.step([SeqChunk([1, 2], 0, [0], adapter=0)])


# ---- adapters ------------------------------------------------------------------------------------------------

def _save_adapter(base: Any, folder: Path, seed: int, **lora: Any) -> Path:
    """A train-free LoRA adapter saved by peft, with random non-zero A and B (peft starts B at zero)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="CAUSAL_LM", **lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(str(folder))
    return folder


def _peft_greedy(base: Any, folder: Path, prompt: list[int]) -> list[int]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    return _hf_greedy(model, prompt, NEW_TOKENS)


@pytest.fixture(scope="module")
def adapters(perturbed_lm: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    first = _save_adapter(perturbed_lm, root / "attn", seed=11, r=4, lora_alpha=8,
                          target_modules=["q_proj", "v_proj", "o_proj"])
    second = _save_adapter(perturbed_lm, root / "mlp", seed=12, r=8, lora_alpha=4, use_rslora=True,
                           target_modules=["k_proj", "gate_proj", "up_proj", "down_proj"])
    return first, second


# fuse_qkv: the GPU's layout (q/k/v in one matrix, their LoRA B matrices block-diagonal), checked here eagerly.
@pytest.mark.parametrize("fuse_qkv", [False, True])
def test_rows_with_different_adapters_equal_peft_in_one_step(perturbed_lm: Any, adapters: tuple[Path, Path],
                                                             fuse_qkv: bool) -> None:
    first, second = adapters
    prompts = _prompts(perturbed_lm.config.vocab_size, (6, 11, 8), seed=8)
    runner = PagedRunner(perturbed_lm, num_blocks=32, block_size=4, max_adapters=2, max_rank=8, fuse_qkv=fuse_qkv)
    runner.load_adapter(0, first)
    runner.load_adapter(1, second)
    tables = contiguous_tables([len(p) + NEW_TOKENS for p in prompts], 4)
    seqs = [Seq(prompts[0], NEW_TOKENS, tables[0], adapter=0), Seq(prompts[1], NEW_TOKENS, tables[1], adapter=1),
            Seq(prompts[2], NEW_TOKENS, tables[2])]
    drive(runner, seqs, chunk=4)
    expected = [_peft_greedy(perturbed_lm, first, prompts[0]), _peft_greedy(perturbed_lm, second, prompts[1]),
                _hf_greedy(perturbed_lm, prompts[2], NEW_TOKENS)]
    assert [s.out for s in seqs] == expected
    # The adapters change the tokens (else this test could not tell an ignored adapter from an applied one).
    assert expected[0] != _hf_greedy(perturbed_lm, prompts[0], NEW_TOKENS)
    assert expected[1] != _hf_greedy(perturbed_lm, prompts[1], NEW_TOKENS)
    # Unloading returns the slot's rows to the base model's output.
    runner.unload_adapter(0)
    with pytest.raises(ValueError, match="holds no adapter"):
        runner.step([SeqChunk(prompts[0], 0, tables[0], adapter=0)])
    runner.load_adapter(0, second)
    assert greedy(runner, prompts[0], chunk=4, adapter=0) == _peft_greedy(perturbed_lm, second, prompts[0])


def test_adapters_runner_refuses_variants_it_does_not_compute(perturbed_lm: Any, tmp_path: Path) -> None:
    runner = PagedRunner(perturbed_lm, num_blocks=4, block_size=4, max_adapters=1, max_rank=8)
    dora = _save_adapter(perturbed_lm, tmp_path / "dora", seed=1, r=4, use_dora=True, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match=r"uses DoRA \(use_dora=true\)"):
        runner.load_adapter(0, dora)
    embed = _save_adapter(perturbed_lm, tmp_path / "embed", seed=2, r=4, target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(AdapterError, match=r"targets \['embed_tokens'\]"):
        runner.load_adapter(0, embed)
    # The same adapter described by a pattern instead of a list is caught by its tensors' names.
    cfg = json.loads((embed / "adapter_config.json").read_text())
    cfg["target_modules"] = ".*(embed_tokens|q_proj)"
    (embed / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"cannot apply \(.*embed_tokens"):
        runner.load_adapter(0, embed)
    big = _save_adapter(perturbed_lm, tmp_path / "big", seed=3, r=16, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match="rank 16, above this engine's max_rank=8"):
        runner.load_adapter(0, big)
    assert runner.loaded_adapters() == {}


def test_adapter_over_int8_layers_adds_its_delta_to_the_quantized_projection(
        perturbed_lm: Any, adapters: tuple[Path, Path]) -> None:
    """peft does not wrap the engine's int8 layers, so the reference is transformers' forward on the int8 model
    with each targeted layer's output plus scale * B(A(x)) added by a hook."""
    from safetensors.torch import load_file

    from qwenbook_bridge.engine.quant.layers import QuantizedLinear

    _, folder = adapters
    model = copy.deepcopy(perturbed_lm)
    quantize_model(model, QuantConfig(method="int8", group_size=32))
    prompts = _prompts(model.config.vocab_size, (9, 5), seed=9)
    runner = PagedRunner(model, num_blocks=16, block_size=4, max_adapters=1, max_rank=8)
    runner.load_adapter(0, folder)
    tables = contiguous_tables([len(p) + NEW_TOKENS for p in prompts], 4)
    seqs = [Seq(prompts[0], NEW_TOKENS, tables[0], adapter=0), Seq(prompts[1], NEW_TOKENS, tables[1])]
    drive(runner, seqs, chunk=4)

    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    hooks = []
    for name, module in model.named_modules():
        a = tensors.get(f"base_model.model.{name}.lora_A.weight")
        if a is None:
            continue
        assert isinstance(module, QuantizedLinear)
        b, scale = tensors[f"base_model.model.{name}.lora_B.weight"], cfg["lora_alpha"] / a.shape[0] ** 0.5

        def add_lora(_: Any, inputs: tuple[torch.Tensor, ...], out: torch.Tensor, a: torch.Tensor = a,
                     b: torch.Tensor = b, scale: float = scale) -> torch.Tensor:
            return out + torch.nn.functional.linear(torch.nn.functional.linear(inputs[0], a), b) * scale

        hooks.append(module.register_forward_hook(add_lora))
    assert len(hooks) == 4 * model.config.num_hidden_layers
    with_adapter = _hf_greedy(model, prompts[0], NEW_TOKENS)
    for h in hooks:
        h.remove()
    assert [s.out for s in seqs] == [with_adapter, _hf_greedy(model, prompts[1], NEW_TOKENS)]
    assert with_adapter != _hf_greedy(model, prompts[0], NEW_TOKENS)
