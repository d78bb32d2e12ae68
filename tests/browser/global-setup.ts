import type { TestProject } from "vitest/node";
import { startLab, type Lab } from "./lab";

declare module "vitest" {
  export interface ProvidedContext {
    lab: { url: string; token: string; root: string; runtimeDir: string };
  }
}

let lab: Lab | undefined;

export async function setup(project: TestProject): Promise<void> {
  lab = await startLab();
  project.provide("lab", { url: lab.url, token: lab.token, root: lab.root, runtimeDir: lab.runtimeDir });
}

export async function teardown(): Promise<void> {
  await lab?.stop();
}
