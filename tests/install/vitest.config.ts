import { defineConfig } from "vitest/config";

// The README's install section in a fresh folder: wheels, a new virtualenv, the packed npm package, a notebook.
export default defineConfig({
  test: {
    root: new URL(".", import.meta.url).pathname,
    include: ["**/*.test.ts"],
    testTimeout: 120_000,
    hookTimeout: 1_500_000,
  },
});
