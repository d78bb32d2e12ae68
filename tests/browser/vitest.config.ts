import { defineConfig } from "vitest/config";

// Drives a real JupyterLab in headless Chromium. One JupyterLab serves every file; files run one at
// a time because they share it and because the machine running them may have two cores.
export default defineConfig({
  test: {
    root: new URL("../..", import.meta.url).pathname,
    include: ["tests/browser/**/*.test.ts"],
    globalSetup: ["tests/browser/global-setup.ts"],
    fileParallelism: false,
    testTimeout: 240_000,
    hookTimeout: 180_000,
  },
});
