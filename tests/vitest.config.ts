import { defineConfig } from "vitest/config";

// Kernel unit specs (next to the code) and the integration suite, which starts real workers.
export default defineConfig({
  test: {
    root: new URL("..", import.meta.url).pathname,
    include: ["kernel/src/**/*.spec.ts", "tests/integration/**/*.test.ts"],
    globalSetup: ["tests/integration/global-setup.ts"],
    // Integration files each start a worker (torch import, model load); on a small machine running
    // them side by side only makes each slower.
    fileParallelism: false,
    // Limits only against a hang: tests wait for readiness, and a CI host with every core busy can make a
    // worker start plus a short training run take minutes (seen: 146 s for one that takes 20 s idle).
    testTimeout: 600_000,
    hookTimeout: 600_000,
  },
});
