export const schemaDir: string;
export const schemaPath: string;
export const outputPath: string;
export const bundlesSchemaPath: string;
export const bundlesOutputPath: string;
export function generate(schema: unknown): string;
export function generateFromFile(path?: string): string;
export function mimeConstName(def: string): string;
export function generateBundles(schema: unknown, protocolDefs: Record<string, unknown>): string;
export function generateBundlesFromFile(path?: string, protocolPath?: string): string;
export function resolvedBundlesSchema(path?: string, protocolPath?: string): {
  $id: string;
  "x-mime-types": Record<string, string>;
  $defs: Record<string, unknown>;
  [key: string]: unknown;
};
export function regenerate(): string[];
export function constPrefix(name: string): string;
