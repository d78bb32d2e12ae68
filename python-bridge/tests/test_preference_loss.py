"""DPO, ORPO and SimPO against TRL's own loss code on the same batch of the tiny model, in fp32.

TRL's DPOTrainer computes its loss inside `_compute_loss` (log-probs, reference, loss and metrics in one method),
so that method runs here on a stand-in trainer object holding just the settings it reads; ORPO's
`odds_ratio_loss`, CPO's `cpo_loss` (SimPO is CPO with loss_type="simpo") and their `get_batch_logps` are called
directly. Our side runs the engine's own path: collate_pairs, row_logps, the objective.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from qwenbook_bridge.engine.data.chat_encoding import IGNORE_INDEX
from qwenbook_bridge.engine.data.datasets import DatasetSpec
from qwenbook_bridge.engine.data.preference_data import build_preference_dataset
from qwenbook_bridge.engine.train.batches import collate_pairs
from qwenbook_bridge.engine.train.preference import PreferenceObjective, pair_logps

trl = pytest.importorskip("trl")

# Absolute, or relative for values above 1 in size: summed log-probs of long answers reach a few hundred, where
# fp32 sums in a different order differ in the 7th digit.
TOL = 1e-5


def close(a: float, b: float) -> float:
    """The difference of a and b in units of TOL's scale (absolute below 1, relative above)."""
    return abs(a - b) / max(1.0, abs(b))
ROWS = [
    {"prompt": "你是谁？", "chosen": "臣妾是甄嬛。", "rejected": "我是一个人工智能助手，很高兴为你服务。"},
    {"messages": [{"role": "user", "content": "早安"}, {"role": "assistant", "content": "皇上万福。"},
                  {"role": "user", "content": "今日天气如何？"}],
     "chosen": {"role": "assistant", "content": "回皇上，今日晴好。"}, "rejected": "Sunny, 25 degrees."},
    {"prompt": "Tell me a joke", "system": "You are 甄嬛.", "chosen": "臣妾不敢。",
     "rejected": "Why did the chicken cross"},
]


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    data = build_preference_dataset([DatasetSpec(ROWS)], tok, 96)
    batch = collate_pairs(data.examples, range(len(data.examples)), tok.pad_token_id or 0)
    gen = torch.Generator().manual_seed(0)
    batch.ref_logps = -torch.rand(2 * batch.pairs, generator=gen) * 40 - 5
    return model, batch


class _Accelerator:
    device = torch.device("cpu")

    def gather(self, t):
        return t

    gather_for_metrics = gather

    def unwrap_model(self, m):
        return m


def _trl_dpo(model, batch, beta):
    from trl import DPOTrainer

    stand_in = SimpleNamespace(
        model=model, accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        label_smoothing=0.0)
    p = batch.pairs
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "completion_mask": (batch.labels != IGNORE_INDEX).long(),
              "ref_chosen_logps": batch.ref_logps[:p], "ref_rejected_logps": batch.ref_logps[p:]}
    with torch.no_grad():
        loss = DPOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in stand_in._metrics["eval"].items()}


def _check_metrics(ours, theirs, names):
    diffs = {name: close(float(ours[name].mean()), float(theirs[name])) for name in names}
    assert max(diffs.values()) < TOL, diffs
    return max(diffs.values())


def test_dpo_loss_and_metrics_equal_trl_dpo_trainer(setup):
    model, batch = setup
    ours = PreferenceObjective("dpo", 0.1).pair_loss(model, batch)
    loss, metrics = _trl_dpo(model, batch, 0.1)
    assert close(float(ours.losses.detach().mean()), loss) < TOL
    _check_metrics(ours.metrics, metrics, ["rewards/chosen", "rewards/rejected", "rewards/margins",
                                           "rewards/accuracies", "logps/chosen", "logps/rejected"])


def test_dpo_label_smoothing_equals_trl_conservative_sigmoid(setup):
    """cDPO: TRL's CPO sigmoid loss is the same formula on the log-ratio difference."""
    from trl.experimental.cpo import CPOTrainer

    model, batch = setup
    ours = PreferenceObjective("dpo", 0.2, label_smoothing=0.15).pair_loss(model, batch)
    p = batch.pairs
    policy = pair_logps(model, batch)
    stand_in = SimpleNamespace(alpha=0.0, beta=0.2, label_smoothing=0.15, loss_type="sigmoid",
                               accelerator=_Accelerator())
    losses, _, _ = CPOTrainer.cpo_loss(stand_in, (policy.chosen - batch.ref_logps[:p]).detach(),
                                       (policy.rejected - batch.ref_logps[p:]).detach())
    assert (ours.losses.detach() - losses).abs().max() < TOL


def _trl_mean_logps(model, batch):
    """TRL's length-averaged answer log-probs (get_batch_logps, average_log_prob=True) of each row."""
    from trl.experimental.orpo import ORPOTrainer

    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return ORPOTrainer.get_batch_logps(logits, batch.labels, average_log_prob=True)


def test_orpo_loss_and_metrics_equal_trl_odds_ratio_loss(setup):
    from trl.experimental.orpo import ORPOTrainer

    model, batch = setup
    ours = PreferenceObjective("orpo", 0.25).pair_loss(model, batch)
    mean = _trl_mean_logps(model, batch)
    p = batch.pairs
    stand_in = SimpleNamespace(beta=0.25, accelerator=_Accelerator())
    losses, chosen_r, rejected_r, ratio, log_odds = ORPOTrainer.odds_ratio_loss(stand_in, mean[:p], mean[p:])
    nll = -mean[:p]  # the chosen answer's mean token loss (TRL takes it over prompt and answer; see preference_loss)
    assert close(float(ours.losses.detach().mean()), float((nll - losses).mean())) < TOL
    theirs = {"rewards/chosen": chosen_r.mean(), "rewards/rejected": rejected_r.mean(),
              "rewards/margins": (chosen_r - rejected_r).mean(),
              "rewards/accuracies": (chosen_r > rejected_r).float().mean(), "logps/chosen": mean[:p].mean(),
              "logps/rejected": mean[p:].mean(), "nll_loss": nll.mean(), "log_odds_ratio": ratio,
              "log_odds_chosen": log_odds}
    _check_metrics(ours.metrics, theirs, list(theirs))


def test_simpo_loss_equals_trl_cpo_simpo(setup):
    from trl.experimental.cpo import CPOTrainer

    model, batch = setup
    ours = PreferenceObjective("simpo", 2.0, gamma=0.5).pair_loss(model, batch)
    mean = _trl_mean_logps(model, batch)
    p = batch.pairs
    stand_in = SimpleNamespace(alpha=0.0, beta=2.0, label_smoothing=0.0, loss_type="simpo", simpo_gamma=0.5,
                               accelerator=_Accelerator())
    losses, chosen_r, rejected_r = CPOTrainer.cpo_loss(stand_in, mean[:p], mean[p:])
    assert (ours.losses.detach() - losses).abs().max() < TOL
    _check_metrics(ours.metrics, {"rewards/chosen": chosen_r.mean(), "rewards/rejected": rejected_r.mean(),
                                  "rewards/accuracies": (chosen_r > rejected_r).float().mean()},
                   ["rewards/chosen", "rewards/rejected", "rewards/accuracies"])


def test_only_the_last_answer_is_scored_and_chosen_and_rejected_share_the_prompt(setup, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ex = build_preference_dataset([DatasetSpec(ROWS[1:2])], tok, 96).examples[0]
    scored = tok.decode([t for t, lab in zip(ex.chosen.input_ids, ex.chosen.labels) if lab != IGNORE_INDEX])
    assert scored.startswith("回皇上，今日晴好。") and "皇上万福" not in scored
    prompt_c = ex.chosen.input_ids[:ex.chosen.labels.index(next(x for x in ex.chosen.labels if x != IGNORE_INDEX))]
    assert ex.rejected.input_ids[:len(prompt_c)] == prompt_c
