"""Turning the caller's loaded model into something trainable, and giving it back unchanged afterwards.

LoRA: peft injects adapter layers into the model in place; `restore()` removes them again (without merging),
so the same model object keeps serving chat with its original weights. Full fine-tuning trains the weights
in place; a CPU copy taken first is written back by `restore()`. Either way the trained result lives on disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwenbook_bridge.engine.train import checkpoint_policy, fast_lora
from qwenbook_bridge.engine.errors import InvalidOptionError
from qwenbook_bridge.engine.train.config import LoraSettings, TrainConfig

ALL_LINEAR = "all-linear"
# The LoRA target that stands for a mixture-of-experts model's expert weights (Qwen3-MoE's experts are 3-D
# parameters, one slice per expert, not linear layers), which peft adapts through `target_parameters`.
EXPERTS = "experts"


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct last-name parts of the model's linear layers (q_proj, v_proj, ..., lm_head)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def expert_parameter_names(model: nn.Module) -> list[str]:
    """The fused expert weights of a mixture-of-experts model as peft's `target_parameters` names them
    ("experts.gate_up_proj", "experts.down_proj"); empty for a dense model."""
    names = set()
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Experts"):
            for pname, p in module.named_parameters(recurse=False):
                if p.dim() == 3:  # [experts, out, in]
                    names.add(f"{name.rsplit('.', 1)[-1]}.{pname}")
    return sorted(names)


def peft_adapts_parameters() -> bool:
    """Whether the installed peft can put LoRA on plain parameters (`target_parameters`, peft 0.17 and later)."""
    from peft import LoraConfig

    return "target_parameters" in getattr(LoraConfig, "__dataclass_fields__", {})


def resolve_targets(model: Any, targets: list[str] | str) -> list[str]:
    """The LoRA target module names: "all-linear" becomes every linear layer but the output head; a list is
    checked. "experts" in a list is a parameter target (resolve_parameter_targets), not a module."""
    available = linear_module_names(model)
    head = model.get_output_embeddings()
    head_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head}
    if targets == ALL_LINEAR:
        return [n for n in available if n not in head_names]
    if isinstance(targets, str):
        raise InvalidOptionError(f"lora targets must be \"{ALL_LINEAR}\" or a list of module names, got {targets!r}")
    experts = bool(expert_parameter_names(model))
    unknown = [t for t in targets if t not in available and not (t == EXPERTS and experts)]
    if unknown:
        also = f", {EXPERTS} (the expert weights)" if experts else ""
        raise InvalidOptionError(f"unknown LoRA target module(s) {unknown}; this model's linear modules are: "
                                 f"{', '.join(available)}{also} (or use \"{ALL_LINEAR}\")")
    return [t for t in dict.fromkeys(targets) if t != EXPERTS]


def resolve_parameter_targets(model: Any, targets: list[str] | str, dropout: float = 0.0) -> list[str]:
    """The expert weights LoRA adapts: all of them for "all-linear" on a mixture-of-experts model when peft can
    (its experts are parameters, not linear layers; without this only attention would be adapted), all of them
    for a list naming "experts", none otherwise."""
    names = expert_parameter_names(model)
    wanted = targets == ALL_LINEAR or (isinstance(targets, list) and EXPERTS in targets)
    if not names or not wanted:
        return []
    if not peft_adapts_parameters():
        if targets == ALL_LINEAR:
            return []  # attention only: what this peft can adapt on this model
        import peft

        raise InvalidOptionError(f"LoRA on the experts needs peft 0.17 or later (target_parameters); peft "
                                 f"{peft.__version__} is installed. Upgrade peft or leave {EXPERTS!r} out of the "
                                 "targets")
    if dropout:
        attention = [n for n in linear_module_names(model) if n.endswith("_proj")]
        raise InvalidOptionError(f"LoRA on a mixture-of-experts model's experts cannot use dropout (peft applies it to "
                                 f"the input of a linear layer, and the experts are not one); set the LoRA dropout "
                                 f"to 0, or list only the attention projections as targets ({', '.join(attention)})")
    return names


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers (what gradient checkpointing, compile and FSDP each treat as one unit)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


class Trainable:
    """The model prepared for one training run. `module` is what the optimizer trains; `causal_lm` is the
    transformers model the loss runs through (with any adapter layers inside it)."""

    def __init__(self, model: Any, config: TrainConfig, tokenizer: Any, keep_original: bool = True) -> None:
        self.model, self.config, self.tokenizer = model, config, tokenizer
        # A rank of a several-process run ends with its process: no need to give the weights back.
        self.keep_original = keep_original
        self._was_training = model.training
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self._had_checkpointing = bool(getattr(model, "is_gradient_checkpointing", False))
        self._snapshot: dict[str, torch.Tensor] | None = None
        self.peft_model: Any = None
        self.targets: list[str] = []
        self.compiled: list[nn.Module] = []
        self.checkpoint_plan: checkpoint_policy.Plan | None = None
        self.notes: list[str] = []  # what the run should be told about how it was set up

    def prepare(self) -> None:
        cfg = self.config
        if cfg.method == "lora" and cfg.init_adapter:
            from peft import PeftModel

            # An existing adapter (an SFT run's) trained further: loaded trainable, in place, as a fresh one is.
            from peft import LoraConfig

            saved = LoraConfig.from_pretrained(cfg.init_adapter)
            saved.lora_dropout = cfg.lora.dropout  # the run's (a preference run turns it off)
            self.peft_model = PeftModel.from_pretrained(self.model, cfg.init_adapter, config=saved, is_trainable=True)
            self.targets = sorted(self.peft_model.peft_config["default"].target_modules or [])
            fast_lora.install(self.model)
        elif cfg.method == "lora":
            from peft import LoraConfig, get_peft_model

            self.targets = resolve_targets(self.model, cfg.lora.targets)
            parameters = resolve_parameter_targets(self.model, cfg.lora.targets, cfg.lora.dropout)
            extra: dict[str, Any] = {"target_parameters": parameters} if parameters else {}
            lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.scale_alpha, lora_dropout=cfg.lora.dropout,
                              target_modules=self.targets, bias="none", task_type="CAUSAL_LM", **extra)
            self.peft_model = get_peft_model(self.model, lora)
            fast_lora.install(self.model)
        else:
            if self.keep_original:
                self._snapshot = {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters()}
            for p in self.model.parameters():
                p.requires_grad_(True)
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self._select_checkpoints()
        if cfg.compile:
            self._compile_layers()
        self.model.train()

    def _select_checkpoints(self) -> None:
        """Spend the activation memory budget on selective checkpointing (checkpoint_policy.py): LoRA runs in one
        process with compiled layers, where it pays (a sharded run's layers are wrapped after this)."""
        cfg = self.config
        if cfg.method != "lora" or not cfg.compile or not self.keep_original:
            if cfg.activation_memory_gb:
                self.notes.append("activation_memory_gb is used by compiled LoRA runs on one device only; this run "
                                  "recomputes whole layers")
            return
        device = self._device()
        if cfg.activation_memory_gb is not None:
            budget = cfg.activation_memory_gb * 2**30
        else:
            from qwenbook_bridge.engine.quant.layers import QuantizedLinear

            free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
            budget = checkpoint_policy.auto_budget(free, any(isinstance(m, QuantizedLinear)
                                                             for m in self.model.modules()))
        layers = decoder_layers(self.model)
        text = self.model.config.get_text_config()
        weights = next(p for p in self.model.parameters() if p.is_floating_point())
        chosen = checkpoint_policy.plan(text, len(layers), cfg.micro_batch_tokens, weights.element_size(), budget)
        if chosen.selective:
            checkpoint_policy.apply(layers, chosen, text.hidden_size, cfg.lora.r)
            self.checkpoint_plan = chosen
            self.notes.append(f"selective checkpointing: {chosen.selective} of {len(layers)} layers keep their "
                              f"attention activations and {chosen.wide} their MLP's too, about "
                              f"{chosen.extra_bytes / 2**30:.1f} GiB more than recomputing whole layers (budget "
                              f"{budget / 2**30:.1f} GiB; set activation_memory_gb to change it, 0 to turn it off)")

    def _compile_layers(self) -> None:
        """torch.compile each decoder layer (the layers share one compiled graph): norms, rotary embedding,
        activation and the adapters' additions become a few fused kernels instead of dozens of small ones.
        Inside gradient checkpointing the checkpoint wraps the compiled layer, so recomputation runs it too."""
        for module in decoder_layers(self.model):
            module.compile()
            self.compiled.append(module)

    @property
    def causal_lm(self) -> Any:
        return self.model

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def count(self) -> tuple[int, int]:
        total = sum(p.numel() for p in self.model.parameters())
        return sum(p.numel() for p in self.parameters()), total

    def weight_files(self, folder: Path) -> list[str]:
        """Files in a saved checkpoint that make up the trained result (what gets published as output)."""
        skip = {"training_state.pt", "trainer_state.json", "run_state.json", "train_config.json"}
        return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in skip)

    def save(self, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write the trained weights; `state` is the model's whole state dict when the live one is sharded."""
        if self.peft_model is not None:
            # peft picks the adapter's weights out of the PeftModel's state dict, which wraps this model's.
            whole = None if state is None else {f"base_model.model.{k}": v for k, v in state.items()}
            self.peft_model.save_pretrained(folder, state_dict=whole)
        else:
            if state is not None:  # gathered copies no longer share storage, so say which are one weight
                state = {k: v for k, v in state.items() if not self._is_tied(k)}
            self.model.save_pretrained(folder, safe_serialization=True, state_dict=state)
            self.tokenizer.save_pretrained(folder)

    def check_resumable(self, checkpoint: Path) -> None:
        """Refuse a checkpoint whose weights do not fit this run's model setup, before anything is loaded."""
        if self.config.method == "lora":
            path = checkpoint / "adapter_config.json"
            if not path.is_file():
                raise InvalidOptionError(f"{checkpoint} holds no LoRA adapter (no adapter_config.json); was it "
                                         "written by a full fine-tuning run? Use method='full' to resume it")
            saved = json.loads(path.read_text(encoding="utf-8"))
            want = {"r": self.config.lora.r, "lora_alpha": self.config.lora.scale_alpha,
                    "target_modules": sorted(resolve_targets(self.model, self.config.lora.targets)),
                    "target_parameters": sorted(resolve_parameter_targets(self.model, self.config.lora.targets))}
            have = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"),
                    "target_modules": sorted(saved.get("target_modules") or []),
                    "target_parameters": sorted(saved.get("target_parameters") or [])}
            diff = [f"{k}: checkpoint {have[k]!r}, now {want[k]!r}" for k in want if have[k] != want[k]]
            if diff:
                raise InvalidOptionError(f"cannot resume from {checkpoint}: the LoRA setup differs ("
                                         + "; ".join(diff) + "); use the options the checkpoint was trained with")
        elif not any(checkpoint.glob("*.safetensors")):
            raise InvalidOptionError(f"{checkpoint} holds no model weights (*.safetensors); was it written by a "
                                     "LoRA run? Use method='lora' to resume it")

    def load(self, checkpoint: Path) -> None:
        from safetensors.torch import load_file

        if self.peft_model is not None:
            from peft import set_peft_model_state_dict

            weights = load_file(checkpoint / "adapter_model.safetensors", device=str(self._device()))
            result = set_peft_model_state_dict(self.peft_model, weights)
            if getattr(result, "unexpected_keys", None):
                raise InvalidOptionError(f"{checkpoint}: adapter weights do not match this model "
                                         f"(unexpected {result.unexpected_keys[:3]}...)")
            return
        state: dict[str, torch.Tensor] = {}
        for f in sorted(checkpoint.glob("*.safetensors")):
            state.update(load_file(f, device=str(self._device())))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = {n for n in missing if self._is_tied(n)}
        if unexpected or set(missing) - tied:
            raise InvalidOptionError(f"{checkpoint}: weights do not match this model (missing "
                                     f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")

    def restore(self) -> None:
        """Give the caller its model back as it was: adapter layers removed or original weights written back."""
        for module in self.compiled:
            # What nn.Module.compile() set; the layer runs its plain forward again.
            module._compiled_call_impl = None
        self.compiled = []
        if self.checkpoint_plan is not None:
            checkpoint_policy.remove(decoder_layers(self.model))
            self.checkpoint_plan = None
        if self.peft_model is not None:
            fast_lora.uninstall(self.model)
            self.peft_model.unload()
            self.peft_model = None
        if self._snapshot is not None:
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    p.copy_(self._snapshot[n])
            self._snapshot = None
        for n, p in self.model.named_parameters():
            p.grad = None
            p.requires_grad_(self._requires_grad.get(n, p.requires_grad))
        if self.config.gradient_checkpointing and not self._had_checkpointing:
            self.model.gradient_checkpointing_disable()
        self.model.train(self._was_training)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _is_tied(self, name: str) -> bool:
        head = self.model.get_output_embeddings()
        emb = self.model.get_input_embeddings()
        return head is not None and emb is not None and head.weight is emb.weight and name.endswith("lm_head.weight")


def init_adapter_settings(folder: str) -> LoraSettings:
    """The LoRA settings of the adapter a run continues (its adapter_config.json), refused when it cannot be."""
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        raise InvalidOptionError(f"init_adapter {folder} holds no adapter_config.json; give the folder a LoRA run "
                                 "wrote (its run folder or a checkpoint-<step> folder)")
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("peft_type", "LORA") != "LORA" or not saved.get("target_modules"):
        raise InvalidOptionError(f"init_adapter {folder} is not a LoRA adapter on linear modules")
    targets = saved["target_modules"]
    return LoraSettings(r=int(saved["r"]), alpha=float(saved.get("lora_alpha", 2 * saved["r"])),
                        dropout=float(saved.get("lora_dropout") or 0.0),
                        targets=sorted(targets) if isinstance(targets, list) else [targets])


def precision_plan(config: TrainConfig, model: Any, device: torch.device) -> tuple[torch.dtype | None, bool, list[str]]:
    """(autocast dtype or None, use a gradient scaler, notes) for the requested compute dtype."""
    want = config.dtype
    on_gpu = device.type == "cuda"
    if want == "auto":
        want = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_gpu else "fp32"
    if want == "fp16" and not on_gpu:
        raise InvalidOptionError("dtype 'fp16' needs a CUDA GPU; use 'bf16' or 'fp32' on CPU")
    if want == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
        raise InvalidOptionError("this GPU has no bf16 support; use dtype 'fp16' or 'fp32'")
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[want]
    weights = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if config.method == "full" and weights == torch.float16:
        raise InvalidOptionError("full fine-tuning cannot update fp16 weights stably; load the model in bf16 or "
                                 "fp32, or use LoRA")
    notes: list[str] = []
    if config.method == "full" and weights == torch.bfloat16:
        notes.append("full fine-tuning updates the bf16 weights directly (no fp32 master copy); load the model "
                     "in fp32 for exact small updates when memory allows")
    autocast = compute if weights == torch.float32 and compute != torch.float32 else None
    if weights != torch.float32 and compute != weights:
        notes.append(f"the model is loaded in {str(weights).removeprefix('torch.')}, so it computes in that dtype; "
                     f"load it in fp32 to train in {want}")
    scaler = compute == torch.float16 or weights == torch.float16
    return autocast, scaler, notes
