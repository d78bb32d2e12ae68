"""A run read by other tools: TensorBoard event files (read back with TensorBoard's own reader), an offline
wandb run, and trainer_state.json in the shape Hugging Face's Trainer writes (compared with a real Trainer run)."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
import torch

from qwenbook_bridge.engine.data.datasets import DatasetSpec
from qwenbook_bridge.engine.errors import InvalidOptionError, MissingPackageError
from qwenbook_bridge.engine.model_parts import has_injected_adapters
from qwenbook_bridge.engine.train import checkpoints as ckpt
from qwenbook_bridge.engine.train.config import TrainConfig
from qwenbook_bridge.engine.train.loop import train
from qwenbook_bridge.engine.train.reporting import GIB
from qwenbook_bridge.engine.train.tfevents import crc32c, masked_crc32c
from test_training import run as run_training

ROWS = [{"instruction": f"问题{i}", "output": f"回答{i}号"} for i in range(10)]
TAGS = {"train/loss": "loss", "train/learning_rate": "lr", "train/grad_norm": "grad_norm", "train/epoch": "epoch",
        "train/tokens_per_second": "tokens_per_s", "train/cpu_memory_gib": "cpu_memory"}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def run(model, tok, out: Path, cancel_at: int | None = None, **options):
    """Train 4 steps with eval and checkpoints every 2; `cancel_at` cancels after that step."""
    settings = dict(max_length=32, max_steps=4, eval_split=0.2, eval_every=2, save_every=2)
    settings.update(options)
    return run_training(model, tok, out, rows=ROWS, cancel_at=cancel_at, **settings)


@pytest.fixture(scope="module")
def reported(model, tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports") / "run"
    return out, *run(model, tok, out, report=["tensorboard"])


def test_crc32c_is_the_castagnoli_crc_tfrecord_masks():
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C
    assert masked_crc32c(b"") == 0xA282EAD8


def test_tensorboard_reads_every_series_at_the_run_s_own_steps(reported):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, result, events = reported
    logdir = Path(result.reports["tensorboard"])
    assert logdir.parent == out / "runs" and list(logdir.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    progress = [c for k, c in events if k == "train_progress"]
    evals = [c for k, c in events if k == "eval"]
    assert len(progress) == 4 and len(evals) == 2
    assert set(acc.Tags()["scalars"]) == {*TAGS, "eval/loss"}
    for tag, key in TAGS.items():
        scale = GIB if key == "cpu_memory" else 1.0
        read = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in read] == [c["step"] for c in progress], tag
        assert [v for _, v in read] == pytest.approx([c[key] / scale for c in progress], rel=1e-6), tag
    assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == pytest.approx(
        [(c["step"], c["eval_loss"]) for c in evals], rel=1e-6)
    # The same series the reply's history holds, which the dashboard draws.
    assert [h["loss"] for h in result.history if h["kind"] == "train_progress"] == [c["loss"] for c in progress]


def hf_trainer_state(tiny_model_dir: Path, out: Path) -> dict:
    """A 3-step transformers Trainer run with evaluation; its last checkpoint's trainer_state.json."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.arange(1, 9) + i
            return {"input_ids": ids, "labels": ids}

    args = TrainingArguments(output_dir=str(out), max_steps=3, per_device_train_batch_size=2, logging_steps=1,
                             eval_strategy="steps", eval_steps=2, save_steps=2, report_to=[], use_cpu=True,
                             metric_for_best_model="eval_loss", disable_tqdm=True)
    Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args, train_dataset=Rows(),
            eval_dataset=Rows()).train()
    return json.loads((out / "checkpoint-3" / "trainer_state.json").read_text(encoding="utf-8"))


def shape(value):
    """A JSON value's structure: the type of a leaf, the keys (and their shapes) of an object."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    return type(value).__name__


def test_trainer_state_has_the_keys_and_types_of_a_transformers_trainer_run(reported, tiny_model_dir, tmp_path):
    from transformers import TrainerState

    out, result, _ = reported
    theirs = hf_trainer_state(tiny_model_dir, tmp_path / "hf")
    ours = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text(encoding="utf-8"))
    assert {k: shape(v) for k, v in ours.items() if k != "log_history"} == {
        k: shape(v) for k, v in theirs.items() if k != "log_history"}
    kinds = lambda state: {tuple(sorted(shape(e).items())) for e in state["log_history"]}  # noqa: E731
    assert kinds(ours) == kinds(theirs)  # a train entry and an eval entry, the same keys and types
    assert ours["global_step"] == ours["max_steps"] == 4 and ours["logging_steps"] == 1
    assert ours["eval_steps"] == ours["save_steps"] == 2 and ours["train_batch_size"] == 2
    train_entries = [e for e in ours["log_history"] if "loss" in e]
    assert [(e["step"], e["loss"], e["learning_rate"], e["grad_norm"]) for e in train_entries] == [
        (h["step"], h["loss"], h["lr"], h["grad_norm"]) for h in result.history if h["kind"] == "train_progress"]
    best = min((h["eval_loss"], h["step"]) for h in result.history if h["kind"] == "eval")
    assert (ours["best_metric"], ours["best_global_step"]) == best
    assert ours["best_model_checkpoint"] == str(out / f"checkpoint-{best[1]}")
    # The checkpoint at step 2 holds the history up to step 2 only.
    early = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text(encoding="utf-8"))
    assert early["global_step"] == 2 and max(e["step"] for e in early["log_history"]) == 2
    state = TrainerState.load_from_json(str(out / "checkpoint-4" / "trainer_state.json"))
    assert state.global_step == 4 and state.log_history == ours["log_history"]
    # The run folder gets the final one, where Trainer.save_state() writes it.
    assert json.loads((out / "trainer_state.json").read_text(encoding="utf-8")) == ours


def test_llamafactory_plot_loss_reads_the_loss_curve(reported):
    # LLaMA-Factory's extras/ploting.py plot_loss(output_dir, keys=["loss", "eval_loss"]) reads
    # <output_dir>/trainer_state.json and, for each key, the log_history entries holding it:
    # (entry["step"], entry[key]).
    out, result, _ = reported
    data = json.loads((out / "trainer_state.json").read_text(encoding="utf-8"))
    curves = {key: [(e["step"], e[key]) for e in data["log_history"] if key in e] for key in ("loss", "eval_loss")}
    assert curves["loss"] == [(h["step"], h["loss"]) for h in result.history if h["kind"] == "train_progress"]
    assert curves["eval_loss"] == [(h["step"], h["eval_loss"]) for h in result.history if h["kind"] == "eval"]


def test_resume_reads_its_state_from_run_state_json_and_from_older_checkpoints(model, tok, tmp_path, reported):
    out, full, _ = reported
    part, _ = run(model, tok, tmp_path / "part", cancel_at=2)
    assert part.status == "cancelled"
    state = ckpt.read_trainer_state(Path(part.checkpoints[-1]))
    assert state["step"] == 2 and "data_position" in state
    # Checkpoints written before run_state.json kept these fields in trainer_state.json.
    older = Path(part.checkpoints[-1])
    (older / ckpt.TRAINER_STATE).write_text((older / ckpt.RUN_STATE).read_text(encoding="utf-8"), encoding="utf-8")
    (older / ckpt.RUN_STATE).unlink()
    rest, _ = run(model, tok, tmp_path / "part", resume_from=str(older))
    assert rest.status == "completed" and rest.resumed_from == str(older) and rest.step == 4
    assert [h["loss"] for h in rest.history if h["kind"] == "train_progress"] == pytest.approx(
        [h["loss"] for h in full.history if h["kind"] == "train_progress"], abs=1e-6)
    resumed = json.loads((tmp_path / "part" / "checkpoint-4" / "trainer_state.json").read_text(encoding="utf-8"))
    assert [e["step"] for e in resumed["log_history"] if "loss" in e] == [1, 2, 3, 4]


def test_a_report_option_that_cannot_work_is_refused_before_the_model_is_touched(model, tok, tmp_path):
    with pytest.raises(InvalidOptionError, match="report target 'mlflow'"):
        run(model, tok, tmp_path / "bad", report=["mlflow"])
    assert not (tmp_path / "bad").exists() and not has_injected_adapters(model)


def test_wandb_without_the_package_fails_before_any_step_saying_how_to_install_it(model, tok, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` finds when it is not installed
    events: list[str] = []
    with pytest.raises(MissingPackageError, match="pip install wandb"):
        train(model, tok, [DatasetSpec(ROWS)], TrainConfig(output_dir=str(tmp_path / "w"), max_steps=2,
                                                          report=["tensorboard", "wandb"]),
              on_event=lambda kind, _content: events.append(kind))
    assert events == [] and not (tmp_path / "w").exists() and not has_injected_adapters(model)


def test_a_wandb_that_cannot_be_imported_stops_the_run_before_any_step(model, tok, tmp_path, monkeypatch):
    # Installed but broken, as when one of its own dependencies is missing: found, yet `import wandb` fails.
    broken = tmp_path / "site" / "wandb"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError(\"No module named 'opentelemetry.semconv'\")\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    with pytest.raises(MissingPackageError, match=r"installed but cannot be imported .*opentelemetry\.semconv"):
        run(model, tok, tmp_path / "w", report=["wandb"])
    assert not has_injected_adapters(model)
    assert not list((tmp_path / "w").glob("checkpoint-*"))


def test_a_several_rank_wandb_run_without_the_package_is_refused_before_its_ranks_start(tiny_model_dir, tmp_path,
                                                                                       monkeypatch):
    from qwenbook_bridge.handlers.context import JobContext
    from qwenbook_bridge.handlers.dispatch import Handlers
    from qwenbook_bridge.protocol import exception_content, make_message

    handlers = Handlers("cpu")
    load = make_message("load", {"model": str(tiny_model_dir), "dtype": "fp32"}, "s")
    model_id = handlers.load(JobContext(load, threading.Event(), lambda *_: None))["model"]["model_id"]
    monkeypatch.setitem(sys.modules, "wandb", None)
    request = make_message("train", {"model_id": model_id, "datasets": [{"rows": ROWS}],
                                     "config": {"output_dir": str(tmp_path / "ranks"), "max_steps": 2,
                                                "report": ["wandb"]},
                                     "distributed": {"devices": 2, "strategy": "ddp"}}, "s")
    with pytest.raises(MissingPackageError) as err:
        handlers.jobs()["train"](JobContext(request, threading.Event(), lambda *_: None))
    assert "pip install wandb" in exception_content(err.value)["evalue"]
    assert handlers.train.runs.list() == []  # no run was begun
    assert not (tmp_path / "ranks").exists()
