import { defineConfig } from "vitest/config";

// Kernel unit specs (next to the code) and the integration suite, which starts real workers.
export default defineConfig({
  test: {
    root: new URL("..", import.meta.url).pathname,
    // Integration files each start a worker (torch import, model load); on a small machine running
    // them side by side only makes each slower.
    fileParallelism: false,
    // Limits only against a hang: tests wait for readiness, and a CI host with every core busy can make a
    // worker start plus a short training run take minutes (seen: 146 s for one that takes 20 s idle).
    testTimeout: 600_000,
    hookTimeout: 600_000,
    projects: [
      {
        extends: true,
        test: {
          name: "unit",
          include: ["kernel/src/**/*.spec.ts"],
          // The specs run one after another in one process (singleFork) without a fresh module graph each
          // (isolate: false): a process per file re-imports vitest and the kernel's modules, which cost the
          // 38 spec files 36 s (27 s of CPU) against 9.5 s (8 s) shared. The integration files keep a process
          // each: they set process-wide state (environment, working folder, the default client's worker).
          poolOptions: { forks: { singleFork: true, isolate: false } },
        },
      },
      {
        extends: true,
        test: {
          name: "integration",
          include: ["tests/integration/**/*.test.ts"],
          globalSetup: ["tests/integration/global-setup.ts"],
        },
      },
    ],
  },
});
