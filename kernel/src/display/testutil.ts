// A display sink for unit tests that records every call, as a notebook (rich) or a terminal would
// receive them.
import type { DisplayBundle, DisplayOptions, DisplaySink } from "./sink";

export interface RecordedDisplay {
  id: string | undefined;
  update: boolean;
  data: Readonly<Record<string, unknown>>;
  /** Date.now() when it was sent (fake time under vi.useFakeTimers()). */
  at: number;
}

export interface RecordingSink extends DisplaySink {
  texts: string[];
  displays: RecordedDisplay[];
  /** How many times pin() was called. */
  pins: number;
}

export interface RecordingSinkOptions {
  rich?: boolean;
  /** What whenCellDone() returns; left out, the sink has no notion of cells. */
  cellDone?: Promise<void>;
}

export function recordingSink(options: RecordingSinkOptions = {}): RecordingSink {
  const sink: RecordingSink = {
    rich: options.rich ?? true,
    texts: [],
    displays: [],
    pins: 0,
    text(chunk: string) {
      sink.texts.push(chunk);
    },
    display(bundle: DisplayBundle, o: DisplayOptions = {}) {
      sink.displays.push({ id: o.id, update: o.update ?? false, data: bundle.data, at: Date.now() });
    },
    pin() {
      sink.pins += 1;
      return sink;
    },
  };
  const done = options.cellDone;
  if (done) sink.whenCellDone = () => done;
  return sink;
}
