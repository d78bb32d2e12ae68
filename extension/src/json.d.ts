// The schema is read as data (for validation), not as typed TypeScript: its types come from
// schema/bundles.d.ts, which is generated from the same file.
declare module "*/bundles.json" {
  const schema: Record<string, unknown>;
  export default schema;
}
