import { defineConfig } from "vitest/config";

// Renderer unit tests: each builds a widget from a bundle in a simulated DOM and inspects it.
export default defineConfig({
  test: {
    root: new URL(".", import.meta.url).pathname,
    include: ["src/**/*.spec.ts"],
    environment: "happy-dom",
  },
});
