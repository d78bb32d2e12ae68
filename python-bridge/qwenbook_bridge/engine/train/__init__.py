"""Fine-tuning: config.py is a run's options, loop.py the run (epochs, evaluation, checkpoints.py, progress
events), batches.py packs examples, step.py one optimizer step with loss.py (graphed_step.py the same step
replayed from a CUDA graph), trainable.py which parameters learn
(fast_lora.py the fused LoRA layers), data_parallel.py and fsdp.py the same step over several ranks;
hf_state.py the Trainer-shaped trainer_state.json of a checkpoint, reporting.py the series for TensorBoard
(tfevents.py) and wandb (wandb_report.py); preference.py the preference objective (DPO, ORPO, SimPO of
preference_loss.py) and DPO's reference log-probabilities."""

# The modules other packages may import; the rest are this package's own (tests/test_architecture.py).
__all__ = ["batches", "checkpoints", "config", "data_parallel", "fsdp", "graphed_step", "loop", "preference",
           "preference_loss", "reporting", "step", "trainable"]
