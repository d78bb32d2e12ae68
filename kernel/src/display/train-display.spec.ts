// The epoch readout of a run whose length maxSteps set: the true passes over the data, with a note
// that .epochs(n) did not decide, in the dashboard bundle, its text/plain form and the terminal log.
import { describe, expect, it } from "vitest";
import type { TrainBeginEvent, TrainProgressEvent } from "../bridge/protocol.gen";
import { TRAIN_MIME, type TrainBundle } from "./bundles";
import { recordingSink } from "./testutil";
import { createTrainDashboard, createTrainLog, epochsOverridden } from "./train-display";

/** Tutorial 02's quick run on the tiny model: 7 training rows, 16 rows per step, .epochs(3).maxSteps(8). */
function begin(config: Record<string, unknown>, totalSteps: number, stepsPerEpoch: number): TrainBeginEvent {
  return {
    total_steps: totalSteps,
    steps_per_epoch: stepsPerEpoch,
    start_step: 0,
    examples: 7,
    eval_examples: 1,
    rows_per_step: 16,
    trainable_params: 16_384,
    total_params: 9_810_000,
    device: "cpu",
    dataset: { sources: [], examples: 8, too_long: 0, truncated: 0, dropped_too_long: 0, dropped_no_answer: 0, tokens: 400, trained_tokens: 120, max_length: 384, notes: [] },
    notes: [],
    config: { method: "lora", epochs: 3, max_steps: null, batch_size: 4, grad_accum: 4, ...config },
  };
}

function progress(step: number, stepsPerEpoch: number, totalSteps: number): TrainProgressEvent {
  return { step, total_steps: totalSteps, epoch: step / stepsPerEpoch, loss: 2, lr: 1e-4, grad_norm: 1, tokens_per_s: 100, eta_s: 0 };
}

function runDashboard(config: Record<string, unknown>, totalSteps: number, stepsPerEpoch: number) {
  const sink = recordingSink({ rich: true });
  const d = createTrainDashboard(sink, { title: "LoRA", config: () => ({}), throttle: { intervalMs: 0 } });
  d.begin(begin(config, totalSteps, stepsPerEpoch));
  for (let s = 1; s <= totalSteps; s++) d.progress(progress(s, stepsPerEpoch, totalSteps));
  d.finish({ status: "completed", step: totalSteps, totalSteps, elapsedS: 1 });
  const last = sink.displays[sink.displays.length - 1].data;
  return { bundle: last[TRAIN_MIME] as TrainBundle, text: last["text/plain"] as string };
}

describe("the epoch readout when maxSteps sets the run's length", () => {
  it("counts the real epochs (8 steps of one epoch each) and says maxSteps overrode epochs(3)", () => {
    const { bundle, text } = runDashboard({ max_steps: 8 }, 8, 1);
    expect(bundle.progress).toMatchObject({ step: 8, totalSteps: 8, epoch: 8, totalEpochs: 8, epochsOption: 3 });
    expect(text).toContain("step 8/8 · epoch 8.00/8 (maxSteps overrides epochs 3)");
  });

  it("shows the part of an epoch a step cap stops at, and the epochs it cut short", () => {
    // The full 72-row set: 5 steps an epoch, so maxSteps(8) ends the run at 1.6 of the 3 epochs asked.
    const { bundle } = runDashboard({ max_steps: 8 }, 8, 5);
    expect(bundle.progress).toMatchObject({ epoch: 1.6, totalEpochs: 1.6, epochsOption: 3 });
  });

  it("adds nothing when epochs decide, or when maxSteps happens to match them", () => {
    expect(runDashboard({}, 15, 5).bundle.progress).not.toHaveProperty("epochsOption");
    expect(runDashboard({ max_steps: 15 }, 15, 5).bundle.progress).not.toHaveProperty("epochsOption");
    expect(runDashboard({}, 15, 5).text).not.toContain("maxSteps");
    expect(epochsOverridden({ config: { epochs: 3, max_steps: 8 } }, 1.6)).toBe(3);
    expect(epochsOverridden({ config: { epochs: 3 } }, 3)).toBeUndefined();
  });

  it("says the same in the terminal's first line", () => {
    const sink = recordingSink({ rich: false });
    createTrainLog(sink, "LoRA").begin(begin({ max_steps: 8 }, 8, 1));
    expect(sink.texts[0]).toContain("8 steps (8 epochs, maxSteps overrides epochs 3, 16 rows per step)");
  });
});
