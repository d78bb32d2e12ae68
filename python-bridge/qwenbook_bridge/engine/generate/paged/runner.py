"""The model math over a paged key/value cache: one forward for a whole engine step, no scheduling.

A step is a list of `SeqChunk`s, each a run of one sequence's tokens: a prefill chunk (several tokens, maybe
not the whole prompt) or the single token a decoding row feeds. All their tokens go through the layers as one
[T, hidden] batch, so each projection and the MLP is one matmul per step however the tokens are split among
sequences; only attention looks at which sequence a token belongs to. The cache is a pool of fixed-size blocks
(per layer one tensor of `num_blocks * block_size` slots); a sequence's `block_table` says which blocks hold
its positions in order, so slot(pos) = block_table[pos // block_size] * block_size + pos % block_size and
sequences need no contiguous memory (blocks.py decides which blocks each gets).

The per-token math is fast_ops.py's (RMSNorm, RoPE, SwiGLU as transformers' Qwen2/Qwen3 compute them), so
greedy tokens match `model.generate`. LoRA adapters are served per row: each of up to `max_adapters` slots holds
an adapter's A and B for every targeted projection, and the tokens of rows using a slot get
scale * (x A^T) B^T added to the base projection (int8/int4 base layers included), one matmul pair per adapter
present in the step — so rows of different adapters and of the base model decode in the same batch.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from qwenbook_bridge.engine.generate.fast_ops import (DecoderWeights, Weight, attn_in, attn_out, extract_weights,
    final_logits, lin, rope_tables, weight_device)
from qwenbook_bridge.engine.generate.paged.attention import paged_decode_attention
from qwenbook_bridge.engine.generate.paged.blocks import CacheShape
from qwenbook_bridge.engine.generate.paged.chunks import SeqChunk
from qwenbook_bridge.engine.generate.paged.decode_step import DecodeStep, block_tables
from qwenbook_bridge.engine.models.adapters import AdapterError, read_adapter_config

# Attention of prefill chunks. Not cuDNN's: it builds an execution plan for each new pair of query and key
# lengths, which took 0.1-1.7 s on an H200 for every prompt length not seen before (a server sees them all).
_PREFILL_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]

# The projections an adapter may target, as peft names them, and where each sits in a decoder layer.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# A LoRA tensor in peft's saved state dict (saved without the adapter name).
_LORA_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)\.weight$")
# adapter_config.json options that make an adapter compute something other than W x + s * B A x on the seven
# projections (DoRA's magnitude vectors, LoRA biases, replaced or extra trainable modules, ...).
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora=true)",
    "lora_bias": "LoRA biases (lora_bias=true)",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "layer_replication": "layer replication (layer_replication)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora=true)",
}


class _LoraTable:
    """Every adapter slot's LoRA weights for one projection of one layer: A [slots, max_rank, in],
    B [slots, out, max_rank] (zeros beyond an adapter's rank), scale [slots], and each slot's rank there
    (0: that adapter does not target this projection)."""

    def __init__(self, slots: int, max_rank: int, in_features: int, out_features: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.a = torch.zeros(slots, max_rank, in_features, dtype=dtype, device=device)
        self.b = torch.zeros(slots, out_features, max_rank, dtype=dtype, device=device)
        self.scale = torch.zeros(slots, dtype=torch.float32, device=device)
        self.rank = [0] * slots

    def clear(self, slot: int) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.scale[slot] = 0.0
        self.rank[slot] = 0


class _LoraProjection(torch.nn.Module):
    """A base projection plus the LoRA deltas of the step's adapter groups. fast_ops' `lin` calls a module
    weight as `w(x)`, so passing this in place of the weight runs the shared attention/MLP math unchanged."""

    def __init__(self, weight: Weight, bias: Tensor | None, table: _LoraTable) -> None:
        super().__init__()
        self.weight, self.bias_, self.table = weight, bias, table
        self.groups: list[tuple[int, Tensor]] = []  # (slot, token indices) for the current step

    def forward(self, x: Tensor) -> Tensor:
        y = lin(x, self.weight, self.bias_)
        t = self.table
        for slot, rows in self.groups:
            r = t.rank[slot]
            if r == 0:
                continue
            xs = x.index_select(0, rows)
            # The order of peft's LoRA layer: B(A(x)) first, then the scale, then added to the base output.
            delta = F.linear(F.linear(xs, t.a[slot, :r]), t.b[slot, :, :r]) * t.scale[slot].to(x.dtype)
            y.index_add_(0, rows, delta)
        return y


class PagedRunner:
    """Runs engine steps of a loaded Qwen2/Qwen3 causal LM over a block-paged K/V cache it owns."""

    def __init__(self, model: Any, num_blocks: int, block_size: int, max_adapters: int = 0,
                 max_rank: int = 64, *, max_batch: int = 32, max_seq_len: int | None = None,
                 cuda_graphs: bool | None = None, fuse_qkv: bool | None = None, compile: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be at least 1, got {num_blocks} and {block_size}")
        if max_adapters < 0 or max_rank < 1:
            raise ValueError(f"max_adapters must be >= 0 and max_rank >= 1, got {max_adapters} and {max_rank}")
        self.model = model
        self.weights: DecoderWeights = extract_weights(model)
        s = self.weights.shape
        self.device = weight_device(self.weights.embed)
        self.dtype = self.weights.embed.dtype
        self.num_blocks, self.block_size = num_blocks, block_size
        self.capacity = num_blocks * block_size
        self.shape = CacheShape(num_layers=s.num_layers, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                                dtype=self.dtype, block_size=block_size)
        # K and V of a layer in one tensor [2, slots, kv_heads, head_dim], so one index_copy stores both;
        # k_cache[i] / v_cache[i] are the per-layer [(num_blocks + 1) * block_size, kv_heads, head_dim] views.
        # One block more than the pool hands out: the padding rows of a decode graph write there.
        # Nothing reads a slot before it is written (attention masks what lies past a row's length, and the
        # reference zeroes those values), so on the CPU the cache is left unwritten: zero-filling it touched
        # every page, a gigabyte and a second per server even for a tiny model whose requests use a few MB.
        # On a GPU zeroing is a fast memset and keeps stray reads finite.
        alloc = torch.zeros if self.device.type == "cuda" else torch.empty
        self.kv = [alloc(2, self.capacity + block_size, s.num_kv_heads, s.head_dim, dtype=self.dtype,
                         device=self.device) for _ in range(s.num_layers)]
        self.k_cache = [kv[0] for kv in self.kv]
        self.v_cache = [kv[1] for kv in self.kv]
        self.max_adapters, self.max_rank = max_adapters, max_rank
        self._adapter_names: list[str | None] = [None] * max_adapters
        self._lora: list[dict[str, _LoraProjection]] = []
        if max_adapters:
            for lw in self.weights.layers:
                base = {"q_proj": (lw.q_weight, lw.q_bias), "k_proj": (lw.k_weight, lw.k_bias),
                        "v_proj": (lw.v_weight, lw.v_bias), "o_proj": (lw.o_weight, None),
                        "gate_proj": (lw.gate_weight, None), "up_proj": (lw.up_weight, None),
                        "down_proj": (lw.down_weight, None)}
                dims = self._projection_dims()
                self._lora.append({
                    name: _LoraProjection(w, b, _LoraTable(max_adapters, max_rank, *dims[name], self.dtype,
                                                           self.device))
                    for name, (w, b) in base.items()})
        on_cuda = self.device.type == "cuda"
        if cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device; it is on {self.device}")
        # Positions a sequence may reach; RoPE tables cover exactly these (a large cache may hold millions of slots).
        model_limit = int(getattr(model.config, "max_position_embeddings", 0) or self.capacity)
        self.max_seq_len = min(max_seq_len or model_limit, self.capacity)
        # Built once for every position: a captured graph indexes the tables in place.
        self._cos, self._sin = rope_tables(model, self.max_seq_len, self.device)
        self.decode = DecodeStep(self, max_batch, -(-self.max_seq_len // block_size), self.capacity,
                                 cuda_graphs=on_cuda if cuda_graphs is None else cuda_graphs,
                                 fuse_qkv=on_cuda if fuse_qkv is None else fuse_qkv, compile=compile)

    # ---- the step -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, chunks: list[SeqChunk]) -> Tensor:
        """Run all chunks as one forward, write their K/V into their slots, and return float32 logits
        [chunks with logits=True, vocab] for each such chunk's last token, in chunk order."""
        if not chunks:
            raise ValueError("step() needs at least one chunk")
        for i, c in enumerate(chunks):
            self._check(i, c)
        if self.decode.fits(chunks):
            return self.decode.run(chunks)
        s, w, dev = self.weights.shape, self.weights, self.device
        ids: list[int] = []
        positions: list[int] = []
        for c in chunks:
            ids += c.token_ids
            positions += range(c.start, c.start + len(c.token_ids))
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        slots = torch.cat([self._slots(c, c.start, c.start + len(c.token_ids)) for c in chunks])
        cos, sin = self.rope(pos)
        x = F.embedding(torch.tensor(ids, dtype=torch.long, device=dev), w.embed)

        # Where each chunk's tokens sit in the step's [T] rows, and which cache slots it attends over.
        offsets = [0]
        for c in chunks:
            offsets.append(offsets[-1] + len(c.token_ids))
        decode = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1]
        prefill = [i for i, c in enumerate(chunks) if len(c.token_ids) > 1]
        # Decode rows attend together, reading their blocks in place through their block tables.
        if decode:
            tables = block_tables([chunks[i] for i in decode], self.block_size).to(dev)
            lengths = torch.tensor([chunks[i].start + 1 for i in decode], dtype=torch.int32, device=dev)
            decode_rows = torch.tensor([offsets[i] for i in decode], dtype=torch.long, device=dev)
        # A prefill chunk attends causally over its sequence's positions [0, start + len).
        prefill_plan = []
        for i in prefill:
            c = chunks[i]
            end = c.start + len(c.token_ids)
            seq_slots = self._slots(c, 0, end)
            causal = torch.arange(end, device=dev)[None] <= pos[offsets[i]:offsets[i + 1], None]
            prefill_plan.append((offsets[i], offsets[i + 1], seq_slots, causal))

        groups = self._adapter_groups(chunks, offsets)
        # Without adapter rows the layers take the decode step's functions (compiled on a GPU, one matrix for
        # q/k/v there): a prefill step is launch-bound up to thousands of tokens, and fused kernels launch fewer.
        layer_in, layer_out = (attn_in, attn_out) if groups else (self.decode.attn_in, self.decode.attn_out)
        args = (s.rms_eps, s.num_heads, s.num_kv_heads, s.head_dim)
        group = s.num_heads // s.num_kv_heads
        for layer, kv in enumerate(self.kv):
            in_args, out_args = self._layer_args(layer, groups)
            q, new_kv = layer_in(x, cos, sin, *args, *in_args)
            kv.index_copy_(1, slots, new_kv)
            attn = torch.empty(x.shape[0], s.num_heads * s.head_dim, dtype=q.dtype, device=dev)
            if decode:
                out = paged_decode_attention(q[decode_rows], kv[0], kv[1], tables, lengths, self.block_size,
                                             s.head_dim ** -0.5)
                attn[decode_rows] = out.reshape(len(decode), -1)
            for lo, hi, seq_slots, causal in prefill_plan:
                # Key/value heads repeated for their query groups: the memory-efficient kernel takes any mask but
                # not grouped heads.
                keys = kv[0][seq_slots].transpose(0, 1).repeat_interleave(group, 0)[None]  # [1, heads, len, dim]
                values = kv[1][seq_slots].transpose(0, 1).repeat_interleave(group, 0)[None]
                with sdpa_kernel(_PREFILL_BACKENDS):
                    out = F.scaled_dot_product_attention(q[lo:hi].transpose(0, 1)[None], keys, values,
                                                         attn_mask=causal)
                attn[lo:hi] = out[0].transpose(0, 1).reshape(hi - lo, -1)
            x = layer_out(x, attn, s.rms_eps, *out_args)
        wanted = [offsets[i + 1] - 1 for i, c in enumerate(chunks) if c.logits]
        if not wanted:
            return torch.empty(0, s.vocab_size, dtype=torch.float32, device=dev)
        last = x.index_select(0, torch.tensor(wanted, dtype=torch.long, device=dev))
        return final_logits(last, w.final_norm, w.lm_head, s.rms_eps)

    def _check(self, i: int, c: SeqChunk) -> None:
        if not c.token_ids:
            raise ValueError(f"chunk {i} has no tokens; every chunk runs at least one token")
        if c.start < 0:
            raise ValueError(f"chunk {i} has start={c.start}; it must be the number of tokens already cached (>= 0)")
        end = c.start + len(c.token_ids)
        if end > self.max_seq_len:
            raise ValueError(f"chunk {i} reaches position {end - 1}, beyond the {self.max_seq_len} positions this "
                             f"runner holds per sequence (max_seq_len; the cache has {self.capacity} slots)")
        needed = -(-end // self.block_size)
        if len(c.block_table) < needed:
            raise ValueError(f"chunk {i} covers positions [0, {end}) = {needed} blocks of {self.block_size}, but its "
                             f"block_table has {len(c.block_table)}")
        table = c.block_table[:needed]
        if min(table) < 0 or max(table) >= self.num_blocks:  # builtins: this runs for every row of every step
            bad = [b for b in table if not 0 <= b < self.num_blocks]
            raise ValueError(f"chunk {i}'s block_table holds {bad}, outside the cache's blocks "
                             f"0..{self.num_blocks - 1}")
        if c.adapter >= 0 and (c.adapter >= self.max_adapters or self._adapter_names[c.adapter] is None):
            raise ValueError(f"chunk {i} asks for adapter slot {c.adapter}, which holds no adapter "
                             f"(loaded: {self.loaded_adapters()}); call load_adapter first")
        if c.adapter < -1:
            raise ValueError(f"chunk {i} has adapter={c.adapter}; use -1 for the base model or a slot number")

    def _slots(self, c: SeqChunk, lo: int, hi: int) -> Tensor:
        """Cache slots of the chunk's sequence positions [lo, hi)."""
        p = torch.arange(lo, hi, device=self.device)
        table = torch.tensor(c.block_table[:-(-hi // self.block_size)], dtype=torch.long, device=self.device)
        return table[p // self.block_size] * self.block_size + p % self.block_size

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self._cos[positions], self._sin[positions]

    def refresh_weights(self) -> None:
        """Re-read what the runner copied from the model's weights (after something may have changed them)."""
        self.decode.refresh_weights()

    def _adapter_groups(self, chunks: list[SeqChunk], offsets: list[int]) -> list[tuple[int, Tensor]]:
        by_slot: dict[int, list[int]] = {}
        for i, c in enumerate(chunks):
            if c.adapter >= 0:
                by_slot.setdefault(c.adapter, []).extend(range(offsets[i], offsets[i + 1]))
        return [(slot, torch.tensor(rows, dtype=torch.long, device=self.device)) for slot, rows in by_slot.items()]

    def _layer_args(self, layer: int, groups: list[tuple[int, Tensor]]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        if not groups:
            return self.decode.layer_args(layer)
        lw = self.weights.layers[layer]
        p = self._lora[layer]
        for proj in p.values():
            proj.groups = groups
        # The wrappers apply the q/k/v biases themselves, so none are passed beside them.
        in_args = (lw.input_norm, p["q_proj"], None, p["k_proj"], None, p["v_proj"], None, lw.q_norm, lw.k_norm)
        out_args = (p["o_proj"], lw.post_norm, p["gate_proj"], p["up_proj"], p["down_proj"])
        return in_args, out_args

    # ---- blocks -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy each block src[i]'s K/V (every layer) into block dst[i] (copy-on-write of a shared block)."""
        if len(src) != len(dst):
            raise ValueError(f"copy_blocks needs as many destinations as sources, got {len(src)} and {len(dst)}")
        bad = [b for b in (*src, *dst) if not 0 <= b < self.num_blocks]
        if bad:
            raise ValueError(f"blocks {bad} are outside the cache's blocks 0..{self.num_blocks - 1}")
        if not src:
            return
        offs = torch.arange(self.block_size, device=self.device)
        s = (torch.tensor(src, device=self.device)[:, None] * self.block_size + offs).reshape(-1)
        d = (torch.tensor(dst, device=self.device)[:, None] * self.block_size + offs).reshape(-1)
        for kv in self.kv:
            kv.index_copy_(1, d, kv.index_select(1, s))

    # ---- adapters -----------------------------------------------------------------------------------------

    def loaded_adapters(self) -> dict[int, str]:
        return {slot: name for slot, name in enumerate(self._adapter_names) if name is not None}

    def _projection_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection, from the model config."""
        c = self.model.config
        s = self.weights.shape
        q_out, kv_out = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        return {"q_proj": (s.hidden_size, q_out), "k_proj": (s.hidden_size, kv_out),
                "v_proj": (s.hidden_size, kv_out), "o_proj": (q_out, s.hidden_size),
                "gate_proj": (s.hidden_size, c.intermediate_size), "up_proj": (s.hidden_size, c.intermediate_size),
                "down_proj": (c.intermediate_size, s.hidden_size)}

    @torch.inference_mode()
    def load_adapter(self, slot: int, peft_folder: Path | str) -> None:
        """Put a peft LoRA adapter (adapter_config.json + adapter_model.safetensors, any rank <= max_rank,
        targets among the seven projections) into adapter slot `slot`, replacing what it held."""
        if not 0 <= slot < self.max_adapters:
            raise AdapterError(f"adapter slot {slot} does not exist: this runner has {self.max_adapters} slots "
                               "(raise max_adapters when creating it)" if self.max_adapters else
                               "this runner has no adapter slots: create it with max_adapters >= 1 to serve adapters")
        folder = Path(peft_folder)
        config = read_adapter_config(folder)
        tensors = self._read_lora(folder, config)
        self.unload_adapter(slot)
        for (layer, proj), (a, b, alpha) in tensors.items():
            table = self._lora[layer][proj].table
            r = a.shape[0]
            table.a[slot, :r] = a.to(self.dtype)
            table.b[slot, :, :r] = b.to(self.dtype)
            table.scale[slot] = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            table.rank[slot] = r
        self._adapter_names[slot] = str(folder)
        self.decode.adapters_changed()

    def unload_adapter(self, slot: int) -> None:
        if not 0 <= slot < self.max_adapters:
            raise AdapterError(f"adapter slot {slot} does not exist (this runner has {self.max_adapters})")
        for layer in self._lora:
            for proj in layer.values():
                proj.table.clear(slot)
        self._adapter_names[slot] = None
        self.decode.adapters_changed()

    def _read_lora(self, folder: Path, config: dict[str, Any]) -> dict[tuple[int, str], tuple[Tensor, Tensor, float]]:
        """The adapter's (A, B, alpha) per (layer, projection), after checking it is a plain LoRA this runner
        computes exactly as peft does."""
        kind = str(config.get("peft_type", "LORA")).upper()
        if kind != "LORA":
            raise AdapterError(f"{folder} is a {kind} adapter; the paged engine serves plain LoRA adapters only")
        found = [label for key, label in _UNSUPPORTED_OPTIONS.items() if config.get(key)]
        if found:
            raise AdapterError(f"{folder} uses {', '.join(found)}, which the paged engine does not compute; it serves "
                               "plain LoRA on q/k/v/o/gate/up/down_proj (merge this adapter into the model instead)")
        targets = config.get("target_modules")
        names = [targets] if isinstance(targets, str) else list(targets or [])
        if isinstance(targets, (list, tuple, set)):
            outside = sorted({n.rsplit(".", 1)[-1] for n in names} - set(PROJECTIONS))
            if outside:
                raise AdapterError(f"{folder} targets {outside}; the paged engine serves LoRA on {list(PROJECTIONS)} "
                                   "only (retrain without those targets, or merge the adapter into the model)")
        weights_file = folder / "adapter_model.safetensors"
        if not weights_file.is_file():
            raise AdapterError(f"{folder} has no adapter_model.safetensors (the paged engine reads safetensors only; "
                               "re-save the adapter with safe_serialization=True)")
        from safetensors import safe_open

        pairs: dict[tuple[int, str], dict[str, Tensor]] = {}
        others: list[str] = []
        with safe_open(str(weights_file), framework="pt", device="cpu") as f:
            for key in f.keys():
                m = _LORA_KEY.match(key)
                if m is None or m.group(3) not in PROJECTIONS or _PARENT[m.group(3)] != m.group(2):
                    others.append(key)
                    continue
                pairs.setdefault((int(m.group(1)), m.group(3)), {})[m.group(4)] = f.get_tensor(key)
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise AdapterError(f"{folder} holds tensors the paged engine cannot apply ({shown}); it serves LoRA A/B "
                               f"weights on {list(PROJECTIONS)} only (merge this adapter into the model instead)")
        if not pairs:
            raise AdapterError(f"{folder}/adapter_model.safetensors holds no LoRA weights")
        dims = self._projection_dims()
        alpha_pattern: dict[str, float] = config.get("alpha_pattern") or {}
        default_alpha = float(config.get("lora_alpha", 8))
        out: dict[tuple[int, str], tuple[Tensor, Tensor, float]] = {}
        for (layer, proj), ab in sorted(pairs.items()):
            where = f"model.layers.{layer}.{_PARENT[proj]}.{proj}"
            if set(ab) != {"A", "B"}:
                raise AdapterError(f"{folder}: {where} has lora_{''.join(ab)} but not both lora_A and lora_B")
            if layer >= self.weights.shape.num_layers:
                raise AdapterError(f"{folder}: {where} does not exist; the model has {self.weights.shape.num_layers} "
                                   "layers (was the adapter trained on another model?)")
            a, b = ab["A"], ab["B"]
            r = a.shape[0]
            d_in, d_out = dims[proj]
            if a.shape != (r, d_in) or b.shape != (d_out, r):
                raise AdapterError(f"{folder}: {where} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; this "
                                   f"model needs ({r}, {d_in}) and ({d_out}, {r}) (was it trained on another model?)")
            if r > self.max_rank:
                raise AdapterError(f"{folder}: {where} has rank {r}, above this engine's max_rank={self.max_rank}; "
                                   "raise max_rank or use a lower-rank adapter")
            # peft's own lookup: the first alpha_pattern key that matches the end of the module name.
            alpha = next((float(v) for k, v in alpha_pattern.items() if re.match(rf"(.*\.)?({k})$", where)),
                         default_alpha)
            out[(layer, proj)] = (a, b, alpha)
        return out
