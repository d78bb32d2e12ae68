// Reading the README's shell commands, and the shell a user types them in (PATH, a free port), shared by the suites that
// run them: tests/integration/readme-commands.test.ts runs every section's but one, tests/install/install.test.ts runs that
// one (installing outside the checkout).

import { createServer } from "node:net";
import { sep } from "node:path";

export const INSTALL_HEADING = "Install into your own environment";

/** The commands in the ```sh blocks of `markdown`, in order, without trailing `# comments`. */
export function shellCommands(markdown: string): string[] {
  const commands: string[] = [];
  for (const block of markdown.matchAll(/^```(?:sh|bash|shell)[ \t]*\n([\s\S]*?)^```/gm)) {
    for (const raw of block[1].split("\n")) {
      const line = raw.replace(/\s+#\s.*$/, "").trim();
      if (line !== "" && !line.startsWith("#")) commands.push(line);
    }
  }
  return commands;
}

function sectionBounds(markdown: string): [number, number] {
  const start = markdown.indexOf(`\n## ${INSTALL_HEADING}\n`);
  if (start < 0) throw new Error(`README.md has no "## ${INSTALL_HEADING}" section`);
  const next = markdown.indexOf("\n## ", start + 1);
  return [start, next < 0 ? markdown.length : next];
}

/** The install section, heading to the next heading of its level. */
export function installSection(markdown: string): string {
  const [start, end] = sectionBounds(markdown);
  return markdown.slice(start, end);
}

/** The README without the install section, whose commands run in a folder of their own. */
export function withoutInstallSection(markdown: string): string {
  const [start, end] = sectionBounds(markdown);
  return markdown.slice(0, start) + markdown.slice(end);
}

/** PATH as a user's shell has it: none of the checkout's .venv/bin or node_modules/.bin that npm and vitest add. */
export function userShellPath(): string {
  return (process.env.PATH ?? "")
    .split(":")
    .filter((p) => p !== "" && !p.endsWith(`${sep}.venv${sep}bin`) && !p.includes(`${sep}node_modules${sep}`) && !p.endsWith(`${sep}node_modules`))
    .join(":");
}

/** A TCP port free on 127.0.0.1 now, for a server a README command starts. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const address = s.address();
      const port = typeof address === "object" && address ? address.port : 0;
      s.close(() => resolve(port));
    });
  });
}
