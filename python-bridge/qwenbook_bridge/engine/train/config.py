"""What a fine-tuning run does, apart from how the loop does it (see training.py).

Every option is checked by `TrainConfig.validate()` before any data is read or the model is touched, so an
option that cannot work fails at once with a message naming it.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from qwenbook_bridge.engine.errors import InvalidOptionError
from qwenbook_bridge.engine.train.reporting import check_targets

Method = Literal["lora", "full"]
Schedule = Literal["cosine", "linear", "constant"]
DType = Literal["auto", "bf16", "fp16", "fp32"]
Truncation = Literal["truncate", "drop"]
PreferenceMethod = Literal["dpo", "orpo", "simpo"]
# beta when none is given: TRL's defaults for DPO and ORPO, the SimPO paper's for SimPO (its losses are on mean
# token log-probs, which differ far less between answers than DPO's sums).
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0}


@dataclass
class LoraSettings:
    # Rank 8 is what the Qwen/ms-swift tutorials use; raise it (16-64) for data far from the base model.
    r: int = 8
    # None means 2 * r, LLaMA-Factory's default: the update's scale (alpha / r) then stays 2 whatever r is.
    alpha: float | None = None
    # Dropout on the LoRA input regularizes small datasets but costs ~20% throughput; off by default.
    dropout: float = 0.0
    # "all-linear": every linear layer of the decoder (attention and MLP projections), not the output head.
    targets: list[str] | str = "all-linear"

    @property
    def scale_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.r


@dataclass
class PreferenceSettings:
    """Preference tuning on chosen/rejected pairs instead of supervised answers (preference_loss.py)."""

    method: PreferenceMethod = "dpo"
    # DPO: the strength of the pull toward the reference; ORPO: lambda, the odds-ratio term's weight; SimPO: the
    # reward scale. None: DEFAULT_BETA of the method.
    beta: float | None = None
    # DPO only: the assumed fraction of pairs whose labels are flipped (conservative DPO); 0 is plain DPO.
    label_smoothing: float = 0.0
    # SimPO only: the target reward margin (TRL's simpo_gamma).
    gamma: float = 0.5

    @property
    def resolved_beta(self) -> float:
        return float(self.beta) if self.beta is not None else DEFAULT_BETA.get(self.method, 0.1)


@dataclass
class TrainConfig:
    # Where checkpoints (checkpoint-<step>/) and the final adapter or weights are written.
    output_dir: str
    method: Method = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    # Longer rows are truncated (or dropped, see `truncation`) and counted in the dataset report.
    max_length: int = 1024
    truncation: Truncation = "truncate"
    # Rows per forward pass; the effective batch is batch_size * grad_accum.
    batch_size: int = 4
    grad_accum: int = 4
    # May be fractional (1.5 = one and a half passes over the data); ignored when max_steps is set.
    epochs: float = 3.0
    max_steps: int | None = None
    # 1e-4 suits LoRA; full fine-tuning usually wants ~1e-5.
    lr: float = 1e-4
    schedule: Schedule = "cosine"
    # Below 1: a fraction of all steps; 1 or more: a number of steps.
    warmup: float = 0.0
    optimizer: Literal["adamw"] = "adamw"
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    # Global gradient-norm clip; 0 turns clipping off (the norm is still measured and reported).
    max_grad_norm: float = 1.0
    # Compute precision. "auto": bf16 on a GPU that has it, else fp16 on GPU; fp32 on CPU.
    dtype: DType = "auto"
    # Recompute activations in the backward pass: less memory for ~30% more time.
    gradient_checkpointing: bool = False
    # With gradient checkpointing in a compiled LoRA run: GiB of extra activations the layers may keep so backward
    # recomputes less (selective checkpointing, checkpoint_policy.py). None: a quarter of the GPU's free memory
    # once the model is loaded (0 on a CPU); 0: recompute whole layers.
    activation_memory_gb: float | None = None
    # Pack several short rows into each max_length row (no padding); rows still cannot attend to each other.
    packing: bool = False
    # torch.compile each decoder layer: faster GPU steps after a compile of a minute or so at the start. Each
    # new batch shape compiles again, so pair it with packing (rows of max_length); on a CPU it rarely pays.
    compile: bool = False
    # Fraction of rows held out for evaluation; 0 disables eval.
    eval_split: float = 0.0
    # Evaluate every N optimizer steps (and always at the end when there is an eval split); 0 = only at the end.
    eval_every: int = 0
    # Checkpoint every N optimizer steps; one is always written at the end and on cancel.
    save_every: int = 0
    log_every: int = 1
    seed: int = 42
    # A checkpoint-<step> folder, or a run folder (its newest complete checkpoint is used).
    resume_from: str | None = None
    # Allow starting a fresh run in an output_dir that already holds checkpoints (they are deleted).
    overwrite: bool = False
    # Where else the run's series go: "tensorboard" (event files in <output_dir>/runs/<date>_<host>) and/or
    # "wandb" (an offline run in <output_dir>/wandb, needs the wandb package); empty: the dashboard only.
    report: list[str] = field(default_factory=list)
    # Preference tuning (DPO, ORPO, SimPO) on {prompt, chosen, rejected} rows; None: supervised fine-tuning.
    preference: PreferenceSettings | None = None
    # LoRA: start from this peft adapter folder (an SFT run's) instead of a fresh adapter; its r, alpha and
    # targets are the run's. For DPO it is also the reference model.
    init_adapter: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from plain JSON values (as sent over the wire); unknown keys are refused with a suggestion."""
        names = {f.name for f in fields(cls)}
        _refuse_unknown(d, names, "training option")
        values = dict(d)
        if isinstance(values.get("lora"), Mapping):
            _refuse_unknown(values["lora"], {f.name for f in fields(LoraSettings)}, "lora option")
            values["lora"] = LoraSettings(**values["lora"])
        if isinstance(values.get("preference"), Mapping):
            _refuse_unknown(values["preference"], {f.name for f in fields(PreferenceSettings)}, "preference option")
            values["preference"] = PreferenceSettings(**values["preference"])
        if isinstance(values.get("adam_betas"), list):
            values["adam_betas"] = tuple(values["adam_betas"])
        if "output_dir" not in values:
            raise InvalidOptionError("output_dir is required: the folder for checkpoints and the trained result")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def micro_batch_tokens(self) -> int:
        """The most tokens one forward pass holds: batch_size rows of max_length, both answers for preference pairs."""
        return self.batch_size * self.max_length * (2 if self.preference is not None else 1)

    def warmup_steps(self, total_steps: int) -> int:
        if self.warmup < 1:
            return int(round(self.warmup * total_steps))
        return int(self.warmup)

    def validate(self) -> None:
        """Raise InvalidOptionError listing every option that cannot work."""
        problems: list[str] = []

        def check(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        check(isinstance(self.output_dir, str) and bool(self.output_dir.strip()),
              "output_dir must be a non-empty folder path")
        check(self.method in ("lora", "full"), f"method must be 'lora' or 'full', got {self.method!r}")
        if self.method == "lora":
            lo = self.lora
            check(is_int(lo.r) and lo.r >= 1, f"lora r must be a positive integer, got {lo.r!r}")
            check(lo.alpha is None or (is_num(lo.alpha) and lo.alpha > 0),
                  f"lora alpha must be a positive number, got {lo.alpha!r}")
            check(is_num(lo.dropout) and 0 <= lo.dropout < 1, f"lora dropout must be in [0, 1), got {lo.dropout!r}")
            check(lo.targets == "all-linear" or (isinstance(lo.targets, list) and lo.targets
                                                 and all(isinstance(t, str) and t for t in lo.targets)),
                  f"lora targets must be \"all-linear\" or a non-empty list of module names, got {lo.targets!r}")
        check(is_int(self.max_length) and self.max_length >= 2,
              f"max_length must be an integer >= 2, got {self.max_length!r}")
        check(isinstance(self.compile, bool), f"compile must be true or false, got {self.compile!r}")
        budget = self.activation_memory_gb
        check(budget is None or (is_num(budget) and budget >= 0),
              f"activation_memory_gb must be a number of GiB >= 0 (or None for a quarter of the free GPU memory), "
              f"got {self.activation_memory_gb!r}")
        check(self.truncation in ("truncate", "drop"),
              f"truncation must be 'truncate' or 'drop', got {self.truncation!r}")
        check(is_int(self.batch_size) and self.batch_size >= 1,
              f"batch_size must be a positive integer, got {self.batch_size!r}")
        check(is_int(self.grad_accum) and self.grad_accum >= 1,
              f"grad_accum must be a positive integer, got {self.grad_accum!r}")
        if self.max_steps is None:
            check(is_num(self.epochs) and self.epochs > 0, f"epochs must be a positive number, got {self.epochs!r}")
        else:
            check(is_int(self.max_steps) and self.max_steps >= 1,
                  f"max_steps must be a positive integer (or None to use epochs), got {self.max_steps!r}")
        check(is_num(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr!r}")
        check(self.schedule in ("cosine", "linear", "constant"),
              f"schedule must be 'cosine', 'linear' or 'constant', got {self.schedule!r}")
        check(is_num(self.warmup) and self.warmup >= 0 and (self.warmup < 1 or float(self.warmup).is_integer()),
              f"warmup must be a fraction in [0, 1) or a whole number of steps, got {self.warmup!r}")
        check(self.optimizer == "adamw", f"optimizer must be 'adamw', got {self.optimizer!r}")
        check(is_num(self.weight_decay) and self.weight_decay >= 0,
              f"weight_decay must be >= 0, got {self.weight_decay!r}")
        check(isinstance(self.adam_betas, tuple) and len(self.adam_betas) == 2
              and all(is_num(b) and 0 <= b < 1 for b in self.adam_betas),
              f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        check(is_num(self.adam_eps) and self.adam_eps > 0, f"adam_eps must be > 0, got {self.adam_eps!r}")
        check(is_num(self.max_grad_norm) and self.max_grad_norm >= 0,
              f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm!r}")
        check(self.dtype in ("auto", "bf16", "fp16", "fp32"),
              f"dtype must be 'auto', 'bf16', 'fp16' or 'fp32', got {self.dtype!r}")
        check(is_num(self.eval_split) and 0 <= self.eval_split < 1,
              f"eval_split must be a fraction in [0, 1), got {self.eval_split!r}")
        for name in ("eval_every", "save_every"):
            v = getattr(self, name)
            check(is_int(v) and v >= 0, f"{name} must be an integer >= 0 (0 = only at the end), got {v!r}")
        check(is_int(self.log_every) and self.log_every >= 1,
              f"log_every must be a positive integer, got {self.log_every!r}")
        check(is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        check(self.resume_from is None or (isinstance(self.resume_from, str) and bool(self.resume_from)),
              f"resume_from must be a checkpoint folder path, got {self.resume_from!r}")
        problems += check_targets(self.report)
        if self.preference is not None:
            problems += self._preference_problems()
        check(self.init_adapter is None or (isinstance(self.init_adapter, str) and bool(self.init_adapter)),
              f"init_adapter must be an adapter folder path, got {self.init_adapter!r}")
        if self.init_adapter is not None and self.method != "lora":
            problems.append("init_adapter continues a LoRA adapter, so method must be 'lora' (or merge the adapter "
                            "into the model first to fine-tune all weights)")
        if self.eval_every and not self.eval_split:
            problems.append("eval_every is set but eval_split is 0: set eval_split (e.g. 0.1) to hold out rows")
        if problems:
            raise InvalidOptionError("invalid training options:\n  - " + "\n  - ".join(problems))


    def _preference_problems(self) -> list[str]:
        p = self.preference
        if not isinstance(p, PreferenceSettings):
            return [f"preference must be an object {{method, beta, ...}}, got {p!r}"]
        problems = []
        if p.method not in DEFAULT_BETA:
            problems.append(f"preference method must be 'dpo', 'orpo' or 'simpo', got {p.method!r}")
        if p.beta is not None and (isinstance(p.beta, bool) or not isinstance(p.beta, (int, float))
                                   or not math.isfinite(p.beta) or p.beta <= 0):
            problems.append(f"preference beta must be a positive number, got {p.beta!r}")
        if isinstance(p.label_smoothing, bool) or not isinstance(p.label_smoothing, (int, float)) \
                or not 0 <= p.label_smoothing < 0.5:
            problems.append(f"preference label_smoothing must be in [0, 0.5), got {p.label_smoothing!r}")
        elif p.label_smoothing and p.method != "dpo":
            problems.append(f"label_smoothing applies to DPO only, not {p.method}; leave it at 0")
        if isinstance(p.gamma, bool) or not isinstance(p.gamma, (int, float)) or not math.isfinite(p.gamma):
            problems.append(f"preference gamma must be a number, got {p.gamma!r}")
        if self.packing:
            problems.append("packing does not apply to preference tuning: each pair's chosen and rejected rows are "
                            "scored whole; leave packing off")
        return problems


def _refuse_unknown(d: Mapping[str, Any], names: set[str], what: str) -> None:
    for key in d:
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(sorted(names))}"
            raise InvalidOptionError(f"unknown {what} {key!r}{hint}")
