// tslab runs a cell inside an async function only when TypeScript reports a top-level `await`
// expression. A top-level `for await (...)` produces no such report, so a cell like
//   for await (const piece of m.chat("hi").stream()) process.stdout.write(piece);
// is run in a plain function and fails with "SyntaxError: Unexpected reserved word". The kernel
// wraps tslab's converter to mark such cells as needing the async wrapper.

/** The parts of TypeScript this module needs (tslab's own TypeScript is passed in). */
export interface TsForAwait {
  createSourceFile(fileName: string, text: string, target: number, setParentNodes?: boolean): TsNode;
  forEachChild(node: TsNode, visit: (child: TsNode) => void): void;
  isForOfStatement(node: TsNode): boolean;
  isFunctionLike(node: TsNode): boolean;
  isClassLike(node: TsNode): boolean;
  ScriptTarget: { Latest: number };
}

export interface TsNode {
  awaitModifier?: unknown;
}

/** True when `src` has a `for await` loop outside any function or class. */
export function hasTopLevelForAwait(ts: TsForAwait, src: string): boolean {
  if (!src.includes("await")) return false;
  const file = ts.createSourceFile("cell.ts", src, ts.ScriptTarget.Latest, true);
  let found = false;
  const visit = (node: TsNode): void => {
    if (found || ts.isFunctionLike(node) || ts.isClassLike(node)) return;
    if (ts.isForOfStatement(node) && node.awaitModifier) {
      found = true;
      return;
    }
    ts.forEachChild(node, visit);
  };
  ts.forEachChild(file, visit);
  return found;
}

interface ConvertResult {
  hasToplevelAwait?: boolean;
  diagnostics: readonly unknown[];
}

interface Converter {
  convert(prevDecl: string, src: string): ConvertResult;
}

interface ConverterModule {
  createConverter(options?: unknown): Converter;
}

/** Replaces converterModule.createConverter with one whose convert() also sees top-level for-await. */
export function patchConverter(converterModule: ConverterModule, ts: TsForAwait): void {
  const create = converterModule.createConverter;
  converterModule.createConverter = (options?: unknown) => {
    const converter = create(options);
    const convert = converter.convert.bind(converter);
    converter.convert = (prevDecl, src) => {
      const result = convert(prevDecl, src);
      if (!result.hasToplevelAwait && result.diagnostics.length === 0 && hasTopLevelForAwait(ts, src)) {
        result.hasToplevelAwait = true;
      }
      return result;
    };
    return converter;
  };
}
