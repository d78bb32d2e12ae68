"""Saving a resident model as an int8/int4 folder, whichever way it is held in the worker.

- unquantized in memory: quantized while writing (engine/quant_io.save_quantized), compared with itself;
- quantized while loading, saved the same way: its codes are written as they are;
- quantized while loading, saved another way (other method or group size, or GPTQ calibration): the unquantized
  weights are read again from the folder it was loaded from and quantized afresh, because rounding rounded
  weights would add a second error;
- loaded from a folder saved quantized: only the same form can be saved (there are no unquantized weights).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwenbook_bridge.engine.errors import InvalidOptionError
from qwenbook_bridge.engine.models.loading import LoadedModel, free_memory
from qwenbook_bridge.engine.quant.quality import ExportReport
from qwenbook_bridge.engine.quant.config import QuantConfig
from qwenbook_bridge.engine.files.save import ProgressEvent, SaveConfig
from qwenbook_bridge.engine.models.adapters import merged_view

# A reloaded saved folder whose perplexity matches the resident model's to this relative tolerance computes the
# same function (same codes, same kernels), so the comparison made at load time describes it too.
_SAME_MODEL_RTOL = 1e-4


def same_form(info: dict[str, Any], quant: QuantConfig | None) -> bool:
    if quant is None:
        return True
    if quant.method != info["method"] or quant.calibration is not None:
        return False
    return quant.method != "int4" or quant.group_size == info.get("group_size")


def save_resident_quantized(loaded: LoadedModel, target: Path, config: SaveConfig, quant: QuantConfig | None,
                            adapters: list[Path], progress: Callable[[ProgressEvent], None]) -> ExportReport:
    from qwenbook_bridge.engine.export.quantized import save_quantized

    info = loaded.info.get("quant")
    tokenizer = loaded.tokenizer
    if info is None:
        with merged_view(loaded.model, adapters) as model:
            return save_quantized(model, tokenizer, target, config, quant=quant, progress=progress)
    if not same_form(info, quant):
        assert quant is not None
        if info["from_folder"]:
            raise InvalidOptionError(
                f"{loaded.model_id} was loaded from a folder saved as {info['method']}, so there are no unquantized "
                f"weights to make {quant.method}{' with calibration' if quant.calibration else ''} from: load the "
                f"unquantized model and save that, or save this one without quant")
        unquantized = _load_unquantized(loaded)
        try:
            with merged_view(unquantized, adapters) as model:
                report = save_quantized(model, tokenizer, target, config, quant=quant, progress=progress)
        finally:
            del unquantized
            free_memory()
        report.details["requantized_from"] = str(loaded.path)
        return report
    with merged_view(loaded.model, adapters) as model:
        report = save_quantized(model, tokenizer, target, config, quant=None, progress=progress)
    if not adapters:
        _borrow_load_comparison(report, info)
    return report


def _load_unquantized(loaded: LoadedModel) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": loaded.dtype}
    if loaded.device.type == "cuda":
        kwargs["device_map"] = {"": loaded.device.index}
    model = AutoModelForCausalLM.from_pretrained(loaded.path, **kwargs)
    return model.to(loaded.device).eval()


def _borrow_load_comparison(report: ExportReport, info: dict[str, Any]) -> None:
    """The saved codes are the resident ones, whose distance from the unquantized model was measured when they
    were made; attach that measurement once the reloaded folder is shown to compute the same perplexity."""
    measured, q = info.get("quality"), report.quality
    if not measured or q is None or q.reference_perplexity is not None or q.tokens != measured["tokens"]:
        return
    if abs(q.perplexity - measured["perplexity"]) > _SAME_MODEL_RTOL * measured["perplexity"]:
        return
    q.reference_perplexity = measured.get("reference_perplexity")
    q.mean_kl = measured.get("mean_kl")
    q.top1_agreement = measured.get("top1_agreement")
    q.text += " (compared with the unquantized model when these codes were made at load)"
