export const schemaPath: string;
export const outputPath: string;
export function generate(schema: unknown): string;
export function generateFromFile(path?: string): string;
