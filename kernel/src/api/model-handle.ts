// What the layers under the Model class (merges, training runs and results, adapter views) hold of the
// model they belong to. They name these interfaces, not the class: model.ts builds them all, so if they
// imported it back the files would form an import cycle, each loading half-initialised in the other.
import type { WorkerClient } from "../bridge/client";
import type { DisplaySink } from "../display/sink";
import type { ExportOptions, SaveOptions } from "./export";
import type { GpuGauge } from "./gpu";
import type { ExportReport } from "./report";

/** A loaded model as a merge or a training result uses it: its handle in the worker, and how it writes itself out. */
export interface ModelHandle {
  /** The handle the worker knows the model by. */
  readonly id: string;
  save(path: string, options?: SaveOptions): Promise<ExportReport>;
  export(path: string, options?: ExportOptions): Promise<ExportReport>;
}

/** What runs and adapter views need from the model they belong to. */
export interface ModelTarget {
  readonly model: ModelHandle;
  sink(): DisplaySink;
  /** A connection whose worker has the model loaded (loading it again after a worker restart), and its handle there. */
  connect(): Promise<{ client: WorkerClient; modelId: string }>;
  /** A live memory gauge drawn into `sink`. */
  gauge(sink: DisplaySink): GpuGauge;
}
