// One route from a training run's streamed events to its dashboard, shared by a new run, a resumed run
// and a watched one, so the three draw the same way (checkpoint paths shown relative to the notebook).
import type { EventOf } from "../bridge/client";
import type { TrainDisplay } from "../display/train-display";
import { shortPath } from "./train-config";
import type { TrainResult } from "./train-result";

/** The events a `train` or `run_watch` request streams. */
export type TrainEvent = EventOf<"train"> | EventOf<"run_watch">;

/** An onEvent handler that draws each event on `display` (none when quiet); `also` sees every event after. */
export function drawTrainEvents(display: TrainDisplay | undefined, cwd: string, also?: (event: TrainEvent) => void): (event: TrainEvent) => void {
  return (event) => {
    switch (event.type) {
      case "train_begin":
        display?.begin(event.content);
        break;
      case "train_progress":
        display?.progress(event.content);
        break;
      case "eval":
        display?.evaluate(event.content);
        break;
      case "checkpoint":
        display?.checkpoint({ ...event.content, path: shortPath(event.content.path, cwd) });
        break;
    }
    also?.(event);
  };
}

/** The dashboard's last update for a run that ended with `result`. */
export function finishTrainDisplay(display: TrainDisplay | undefined, result: TrainResult, cwd: string): void {
  const saved = result.adapter ?? result.modelPath;
  display?.finish({
    status: result.status,
    step: result.step,
    totalSteps: result.totalSteps,
    output: saved === undefined ? undefined : shortPath(saved, cwd),
    elapsedS: result.elapsedSeconds,
  });
}
