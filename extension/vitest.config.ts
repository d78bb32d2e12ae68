import { defineConfig } from "vitest/config";

// Renderer unit tests: each builds a widget from a bundle in a simulated DOM and inspects it.
export default defineConfig({
  test: {
    root: new URL(".", import.meta.url).pathname,
    include: ["src/**/*.spec.ts"],
    environment: "happy-dom",
    // One process for every spec file, without a fresh module graph and DOM each: a process per file spent most
    // of its time importing vitest and happy-dom again (9 files: 16-22 s wall, 18-20 s CPU; shared: 7-10 s, 6-8 s).
    poolOptions: { forks: { singleFork: true, isolate: false } },
  },
});
