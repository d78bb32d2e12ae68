#!/usr/bin/env node
"use strict";
// The `qwenbook` command. This committed file, not the compiled CLI, is the package's bin: `npm ci`
// links bins while it installs, before anything is built, and leaves out a bin whose file is missing,
// so pointing `bin` at dist/ left a fresh clone without `npx qwenbook`.
const { existsSync } = require("node:fs");
const { join } = require("node:path");

const cli = join(__dirname, "..", "dist", "cli", "main.js");
if (!existsSync(cli)) {
  console.error(
    `qwenbook: the command is not built yet (${cli} is missing); run \`npm start\` in the Qwenbook checkout ` +
      "(it sets up and builds what is missing), or `npm run build -w kernel`.",
  );
  process.exit(1);
}
require(cli);
