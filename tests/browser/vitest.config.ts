import { defineConfig } from "vitest/config";

// Drives a real JupyterLab in headless Chromium. One JupyterLab serves every file; files run one at
// a time because they share it and because the machine running them may have two cores.
export default defineConfig({
  test: {
    root: new URL("../..", import.meta.url).pathname,
    include: ["tests/browser/**/*.test.ts"],
    globalSetup: ["tests/browser/global-setup.ts"],
    fileParallelism: false,
    // Limits only against a hang (tests wait for DOM states); a busy CI host stretches a live kernel's work.
    testTimeout: 600_000,
    hookTimeout: 600_000,
  },
});
