/** A rich output: MIME type -> data, as in Jupyter's display_data. */
export interface DisplayBundle {
  data: Readonly<Record<string, unknown>>;
  metadata?: Readonly<Record<string, unknown>>;
}

export interface DisplayOptions {
  /** Names the output so later calls with `update: true` replace it in place. */
  id?: string;
  /** Replace the output named `id` instead of adding a new one. */
  update?: boolean;
}

/** Where the API writes what a user should see while a call runs. */
export interface DisplaySink {
  /**
   * True where rich outputs are drawn and can be updated in place (a notebook). Elsewhere (a
   * terminal) only the first text/plain of each output shows, so callers stream text instead.
   */
  readonly rich?: boolean;
  /** Appends plain text to the current cell's output (or the terminal). */
  text(chunk: string): void;
  /** Shows a rich output, or updates one in place. */
  display(bundle: DisplayBundle, options?: DisplayOptions): void;
  /**
   * A sink bound to the output area current now (the running cell), for output that may arrive
   * after the cell has ended, e.g. the rest of a reply after an interrupt. Sinks without the
   * notion of a current cell leave it out.
   */
  pin?(): DisplaySink;
  /**
   * Resolves once the cell that is current now (or that pin() captured) has finished running,
   * also when it was interrupted. Sinks without cells leave it out.
   */
  whenCellDone?(): Promise<void>;
}

/** The kernel launcher registers its sink under this key; anything else falls back to stdout. */
export const DISPLAY_SINK_KEY: unique symbol = Symbol.for("qwenbook.display");

type GlobalWithSink = typeof globalThis & { [DISPLAY_SINK_KEY]?: DisplaySink };

/** Outside a kernel: text to stdout, rich outputs as their text/plain part. */
export const stdoutSink: DisplaySink = {
  rich: false,
  text(chunk) {
    process.stdout.write(chunk);
  },
  display(bundle, options) {
    if (options?.update) return; // a terminal cannot rewrite an earlier output; the final text follows anyway
    const plain = bundle.data["text/plain"];
    if (typeof plain === "string") process.stdout.write(plain.endsWith("\n") ? plain : `${plain}\n`);
  },
};

/** The sink in effect now: the kernel's if one is registered, else stdout. */
export function currentSink(): DisplaySink {
  return (globalThis as GlobalWithSink)[DISPLAY_SINK_KEY] ?? stdoutSink;
}

/** Installs `sink` as the one `currentSink()` returns; used by the kernel launcher. */
export function registerSink(sink: DisplaySink): void {
  (globalThis as GlobalWithSink)[DISPLAY_SINK_KEY] = sink;
}
