// The "Qwen (TypeScript)" kernel process: tslab, with `qwenbook` importable from any notebook
// folder, its display sink wired to tslab's display_data, interrupts cancelling worker requests
// (whose cancelled replies still reach the cell), errors printed as one line, values a widget
// has drawn not printed again, and busy/idle reported around each execute request as it runs.
import { dirname, join } from "node:path";
import { cancelInFlight, requestsInFlight } from "../api/interrupt";
import { packageDir } from "../bridge/paths";
import { debugErrors } from "../display/error-info";
import { beginCell } from "../display/shown";
import { registerSink, type DisplayBundle, type DisplayOptions, type DisplaySink } from "../display/sink";
import { cellConsole, cellErrorOutput, type CellText, type ExecutorConsole } from "./cell-output";
import { patchExecuteRequests, type TslabJupyterClasses } from "./execute-requests";
import { addInterruptGrace, type InterruptibleExecutor } from "./interrupt-grace";
import { forwardTypeScriptSys, hookRequire, type ResolutionSys } from "./resolution";
import { patchConverter, type TsForAwait } from "./top-level-for-await";

interface TslabBundle {
  data: Record<string, unknown>;
  metadata: Record<string, unknown>;
  transient: { display_id?: string };
}

interface TslabJupyter extends TslabJupyterClasses {
  /** Set by tslab for the cell being executed; null before the first one. */
  lastWriteDisplayData: ((bundle: TslabBundle, update: boolean) => void) | null;
}

interface TslabExecutorModule {
  createExecutor(rootDir: string, convs: unknown, console: ExecutorConsole): InterruptibleExecutor;
}

interface TslabMain {
  startKernel(options: { configPath: string; enableFindLocal: boolean }): void;
}

type WriteText = (chunk: string) => unknown;
type WriteDisplay = TslabJupyter["lastWriteDisplayData"];

/** One execution of a cell; `done` resolves when tslab has finished it, interrupted or not. */
interface CellRun {
  done: Promise<void>;
  /** A widget (a rich output through the sink) was drawn in this cell. */
  widget: boolean;
}

/**
 * Follows which cell is running, so that output started in a cell (a live gauge) can end with
 * it. tslab runs one execute request at a time through handleExecuteImpl.
 */
function trackCells(jupyter: TslabJupyter): () => CellRun {
  let current: CellRun = { done: Promise.resolve(), widget: false };
  const proto = jupyter.JupyterHandlerImpl.prototype;
  const execute = proto.handleExecuteImpl;
  proto.handleExecuteImpl = async function (this: unknown, ...args: Parameters<typeof execute>) {
    let end = (): void => undefined;
    current = { done: new Promise<void>((resolve) => (end = resolve)), widget: false };
    beginCell();
    try {
      return await execute.apply(this, args);
    } finally {
      end();
    }
  };
  return () => current;
}

/**
 * tslab points process.stdout.write and lastWriteDisplayData at the cell being executed. The sink
 * looks them up on each call; pin() captures them, so late output still lands in its own cell.
 */
function cellSink(text: () => WriteText, display: () => WriteDisplay, cell: () => CellRun): DisplaySink {
  return {
    get rich() {
      return display() !== null;
    },
    text(chunk) {
      text()(chunk);
    },
    display(bundle: DisplayBundle, options: DisplayOptions = {}) {
      cell().widget = true;
      const write = display();
      if (!write) {
        const plain = bundle.data["text/plain"];
        if (typeof plain === "string") text()(`${plain}\n`);
        return;
      }
      write(
        {
          data: { ...bundle.data },
          metadata: { ...(bundle.metadata ?? {}) },
          transient: options.id === undefined ? {} : { display_id: options.id },
        },
        options.update ?? false,
      );
    },
    pin() {
      const t = text();
      const d = display();
      const c = cell();
      return cellSink(() => t, () => d, () => c);
    },
    whenCellDone() {
      return cell().done;
    },
  };
}

/**
 * main.js calls executor.createExecutor at kernel start: the executor it gets prints errors and
 * last values through cellConsole and lets cancelled worker requests end on an interrupt.
 */
function patchExecutor(executorModule: TslabExecutorModule, widgetShown: () => boolean): void {
  const create = executorModule.createExecutor;
  const write = (out: CellText): void => {
    // tslab points process.stdout/stderr.write at the running cell's output.
    (out.stream === "stdout" ? process.stdout : process.stderr).write(out.text);
  };
  executorModule.createExecutor = (rootDir, convs, console) => {
    const executor = create(rootDir, convs, cellConsole(console, widgetShown, write));
    addInterruptGrace(executor, { requestsInFlight, cancelInFlight });
    return executor;
  };
}

function parseConfigPath(argv: readonly string[]): string {
  const i = argv.indexOf("--config-path");
  const value = i >= 0 ? argv[i + 1] : argv.find((a) => a.startsWith("--config-path="))?.slice("--config-path=".length);
  if (!value) {
    process.stderr.write("usage: node launch.js --config-path <connection file>\n");
    process.exit(2);
  }
  return value;
}

function main(): void {
  const configPath = parseConfigPath(process.argv.slice(2));
  process.env.QWENBOOK_KERNEL = "1";
  const pkg = packageDir();
  // Resolve tslab's own copies so the patched `ts.sys` and display hook are the ones it uses.
  const tslabDir = dirname(require.resolve("tslab/package.json"));
  const ts = require(require.resolve("@tslab/typescript-for-tslab", { paths: [tslabDir] })) as TsForAwait & { sys: ResolutionSys };
  forwardTypeScriptSys(ts.sys, process.cwd(), pkg);
  hookRequire(pkg);
  patchConverter(require(join(tslabDir, "dist", "converter.js")) as Parameters<typeof patchConverter>[0], ts);

  const jupyter = require(join(tslabDir, "dist", "jupyter.js")) as TslabJupyter;
  const cell = trackCells(jupyter);
  const widget = (): boolean => cell().widget;
  patchExecuteRequests(jupyter);
  patchExecutor(require(join(tslabDir, "dist", "executor.js")) as TslabExecutorModule, widget);
  registerSink(cellSink(() => process.stdout.write.bind(process.stdout), () => jupyter.lastWriteDisplayData, cell));

  const { startKernel } = require(join(tslabDir, "dist", "main.js")) as TslabMain;
  replaceProcessErrorPrinters(() => startKernel({ configPath, enableFindLocal: false }), widget);
}

/**
 * tslab prints an unhandled rejection or uncaught exception with console.error(label, error): the
 * whole inspected object, as cells did. These print the same one line a failed cell does.
 */
function replaceProcessErrorPrinters(start: () => void, widgetShown: () => boolean): void {
  const emitter: NodeJS.EventEmitter = process;
  const events = ["unhandledRejection", "uncaughtException"];
  const before = new Map(events.map((e) => [e, new Set(emitter.listeners(e))]));
  start();
  for (const event of events) {
    for (const listener of emitter.listeners(event)) {
      if (!before.get(event)!.has(listener)) emitter.off(event, listener as (...args: unknown[]) => void);
    }
  }
  const print = (label: string) => (error: unknown) => {
    const out = cellErrorOutput(error, { debug: debugErrors(), widgetShown: widgetShown() });
    if (out) (out.stream === "stdout" ? process.stdout : process.stderr).write(`${label}: ${out.text}`);
  };
  process.on("unhandledRejection", print("Unhandled rejection"));
  process.on("uncaughtException", print("Uncaught exception"));
}

main();
