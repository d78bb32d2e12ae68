// The text/plain and text/html forms of each bundle, for every front end without the Qwenbook
// extension. HTML here is escaped and styled inline (no classes: there is no stylesheet there), and
// kept short because it is saved in the notebook next to the JSON.
import type { ChatBundle, GpuBundle, TrainBundle } from "./bundles.gen";

const SPARK_POINTS = 120;
const ROLE_COLOR = { system: "#888", user: "#1976d2", assistant: "#388e3c", tool: "#8e24aa" } as const;

type ChatMessageView = ChatBundle["messages"][number];

/** A message's lines: its thinking (as one line saying how long it took), its answer, then each call. */
function messageLines(m: ChatMessageView): string[] {
  const lines: string[] = [];
  if (m.reasoning) lines.push(`${m.role} (thinking${thoughtFor(m)}): ${m.reasoning}`);
  if (m.content || !m.toolCalls?.length) lines.push(`${m.role}${m.name ? ` (${m.name})` : ""}: ${m.content}`);
  for (const c of m.toolCalls ?? []) lines.push(`${m.role} calls ${c.name}(${JSON.stringify(c.arguments)})`);
  return lines;
}

function thoughtFor(m: ChatMessageView): string {
  const parts = [];
  if (m.reasoningTokens) parts.push(`${m.reasoningTokens} tokens`);
  if (m.reasoningMs) parts.push(`${(m.reasoningMs / 1000).toFixed(1)} s`);
  return parts.length ? `, ${parts.join(", ")}` : "";
}

export function chatText(b: ChatBundle): string {
  const lines = b.messages.flatMap(messageLines);
  // A conversation's earlier turns were shown by the cells that ran them; only their count repeats.
  const earlier = earlierTurns(b);
  if (earlier) lines.unshift(`(${earlier})`);
  const status = chatStatus(b);
  if (status) lines.push(`(${status})`);
  if (b.state === "error" && b.error) lines.push(`${b.error.name}: ${b.error.message}`);
  return lines.join("\n");
}

export function chatHtml(b: ChatBundle): string {
  const rows = b.messages.map((m) => {
    const thinking = m.reasoning
      ? `<details style="opacity:.75"><summary>Thinking${escapeHtml(thoughtFor(m))}</summary>` +
        `<span style="white-space:pre-wrap">${escapeHtml(m.reasoning)}</span></details>`
      : "";
    const calls = (m.toolCalls ?? [])
      .map((c) => `<div style="border:1px solid #ccc;border-radius:4px;padding:2px 6px;margin:2px 0">` +
        `<b>${escapeHtml(c.name)}</b> <code>${escapeHtml(JSON.stringify(c.arguments))}</code></div>`)
      .join("");
    return (
      `<div style="margin:2px 0"><b style="color:${ROLE_COLOR[m.role]}">${m.role}${m.name ? ` (${escapeHtml(m.name)})` : ""}</b> ` +
      `${thinking}<span style="white-space:pre-wrap">${escapeHtml(m.content)}</span>${calls}</div>`
    );
  });
  const earlier = earlierTurns(b);
  if (earlier) rows.unshift(`<div style="opacity:.7;font-size:smaller">${escapeHtml(earlier)}</div>`);
  const status = chatStatus(b);
  if (status) rows.push(`<div style="opacity:.7;font-size:smaller">${escapeHtml(status)}</div>`);
  if (b.state === "error" && b.error) {
    rows.push(`<div style="color:#d32f2f">${escapeHtml(`${b.error.name}: ${b.error.message}`)}</div>`);
  }
  return `<div>${rows.join("")}</div>`;
}

/** "2 earlier turns" for a conversation's later turn, else "". */
function earlierTurns(b: ChatBundle): string {
  const n = (b.earlier ?? []).filter((m) => m.role === "user").length;
  return n === 0 ? "" : `${n} earlier ${n === 1 ? "turn" : "turns"}`;
}

function chatStatus(b: ChatBundle): string {
  const s = b.stats;
  const parts: string[] = [];
  if (b.state === "generating") parts.push("generating…");
  if (b.state === "cancelled") parts.push("cancelled");
  if (s) parts.push(`${int(s.completionTokens)} token${s.completionTokens === 1 ? "" : "s"}`);
  if (b.state !== "generating" && s?.tokensPerSecond !== undefined) parts.push(`${rate(s.tokensPerSecond)} tokens/s`);
  if (b.state !== "generating" && s?.ttftMs !== undefined) parts.push(`first token ${Math.round(s.ttftMs)} ms`);
  return parts.join(" · ");
}

export function trainText(b: TrainBundle): string {
  const lines = [`${b.title ?? "Training"} (${b.state}): ${trainFacts(b).join(" · ")}`];
  if (b.checkpoint) lines.push(`${b.state === "cancelled" ? "Last checkpoint" : "Checkpoint"}: ${b.checkpoint}`);
  if (b.error) lines.push(`${b.error.name}: ${b.error.message}${b.error.hint ? `\n${b.error.hint}` : ""}`);
  return lines.join("\n");
}

export function trainHtml(b: TrainBundle): string {
  const facts = trainFacts(b).map(escapeHtml).join(" · ");
  const extra = [
    b.checkpoint ? `<div>checkpoint: <code>${escapeHtml(b.checkpoint)}</code></div>` : "",
    b.error ? `<div style="color:#d32f2f">${escapeHtml(`${b.error.name}: ${b.error.message}`)}</div>` : "",
  ].join("");
  return (
    `<div><div><b>${escapeHtml(b.title ?? "Training")}</b> (${escapeHtml(b.state)})</div>` +
    `<div style="font-size:smaller">${facts}</div>${lossSparkline(b)}${extra}</div>`
  );
}

function trainFacts(b: TrainBundle): string[] {
  const p = b.progress;
  const facts = [`step ${int(p.step)}/${int(p.totalSteps)}`];
  if (p.epoch !== undefined) {
    const overridden = p.epochsOption !== undefined ? ` (maxSteps overrides epochs ${p.epochsOption})` : "";
    facts.push(`epoch ${p.epoch.toFixed(2)}${p.totalEpochs !== undefined ? `/${p.totalEpochs}` : ""}${overridden}`);
  }
  const loss = lastNumber(b.train.loss);
  if (loss !== undefined) facts.push(`loss ${loss.toPrecision(4)}`);
  const evalLoss = lastNumber(b.eval?.loss ?? []);
  if (evalLoss !== undefined) facts.push(`eval loss ${evalLoss.toPrecision(4)}`);
  // A preference run's margin and accuracy (TRL's rewards/margins, rewards/accuracies).
  const margin = lastNumber(b.train.metrics?.["rewards/margins"] ?? []);
  if (margin !== undefined) facts.push(`reward margin ${margin.toPrecision(4)}`);
  const accuracy = lastNumber(b.train.metrics?.["rewards/accuracies"] ?? []);
  if (accuracy !== undefined) facts.push(`preference accuracy ${Math.round(accuracy * 100)}%`);
  const lr = b.train.lr?.[b.train.lr.length - 1];
  if (lr !== undefined) facts.push(`lr ${lr === 0 ? "0" : lr.toExponential(1)}`);
  if (p.tokensPerSecond !== undefined) facts.push(`${rate(p.tokensPerSecond)} tokens/s`);
  if (b.state === "running" && p.etaS !== undefined) facts.push(`ETA ${duration(p.etaS)}`);
  if (b.state !== "running" && p.elapsedS !== undefined) facts.push(`took ${duration(p.elapsedS)}`);
  return facts;
}

/** The loss curve as a small inline SVG, thinned to a fixed number of points. */
function lossSparkline(b: TrainBundle): string {
  const pts: Array<[number, number]> = [];
  b.train.step.forEach((s, i) => {
    const l = b.train.loss[i];
    if (l !== null && l !== undefined) pts.push([s, l]);
  });
  if (pts.length < 2) return "";
  const every = Math.ceil(pts.length / SPARK_POINTS);
  const thin = pts.filter((_, i) => i % every === 0 || i === pts.length - 1);
  const [x0, x1] = [thin[0][0], thin[thin.length - 1][0]];
  const ys = thin.map((p) => p[1]);
  const [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const w = 240;
  const h = 48;
  const coords = thin
    .map(([x, y]) => `${(((x - x0) / (x1 - x0 || 1)) * w).toFixed(1)},${(h - 2 - ((y - y0) / (y1 - y0 || 1)) * (h - 4)).toFixed(1)}`)
    .join(" ");
  return (
    `<svg width="${w}" height="${h}" viewBox="0 0 ${w} ${h}" role="img" aria-label="loss curve">` +
    `<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="${coords}"/></svg>`
  );
}

export function gpuText(b: GpuBundle): string {
  const rows = gpuRows(b);
  if (rows.length === 0) return "GPU memory: no devices reported";
  return rows.map((r) => (r.engine ? `  ${r.text}` : r.text)).join("\n");
}

export function gpuHtml(b: GpuBundle): string {
  const rows = gpuRows(b).map((r) =>
    r.engine ? `<div style="padding-left:1.5em;opacity:.8">${escapeHtml(r.text)}</div>` : `<div>${escapeHtml(r.text)}</div>`,
  );
  return `<div>${rows.join("") || "GPU memory: no devices reported"}</div>`;
}

/** Each device's line, then a line for each engine's cache on it; caches on a device not listed come last. */
function gpuRows(b: GpuBundle): Array<{ text: string; engine: boolean }> {
  const engines = b.engines ?? [];
  const listed = new Set(b.devices.map((d) => d.device));
  const rows = b.devices.flatMap((d) => [
    { text: deviceLine(d), engine: false },
    ...engines.filter((e) => e.device === d.device).map((e) => ({ text: engineLine(e), engine: true })),
  ]);
  for (const e of engines) if (!listed.has(e.device)) rows.push({ text: engineLine(e, ` on ${e.device}`), engine: true });
  return rows;
}

/** "KV cache (chat, qwen2.5-7b): 12 / 4,096 blocks · 48 MiB · prefix hits 35%". */
function engineLine(e: NonNullable<GpuBundle["engines"]>[number], where = ""): string {
  const hits = `prefix hits ${Math.round(e.prefix_hit_rate * 100)}%`;
  const queue = e.waiting > 0 ? ` · ${e.waiting} waiting` : "";
  return `KV cache (${e.role}, ${e.model_id})${where}: ${int(e.blocks_used)} / ${int(e.blocks_total)} blocks · ${bytes(e.cache_bytes)} · ${hits}${queue}`;
}

function deviceLine(d: GpuBundle["devices"][number]): string {
  const pct = d.total > 0 ? ` (${Math.round((d.used / d.total) * 100)}%)` : "";
  if (d.kind === "cpu") return `cpu process RAM ${bytes(d.used)} of ${bytes(d.total)} machine RAM${pct} (no GPU in use)`;
  const parts = [`${bytes(d.used)} used`];
  if (d.reserved !== undefined) parts.push(`${bytes(d.reserved)} reserved`);
  if (d.peak !== undefined) parts.push(`peak ${bytes(d.peak)}`);
  parts.push(`${bytes(d.total)} total${pct}`);
  return `${d.device}${d.name ? ` ${d.name}` : ""}: ${parts.join(" / ")}`;
}

export function escapeHtml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function lastNumber(values: ReadonlyArray<number | null>): number | undefined {
  for (let i = values.length - 1; i >= 0; i--) {
    const v = values[i];
    if (v !== null) return v;
  }
  return undefined;
}

function int(n: number): string {
  return Math.round(n)
    .toString()
    .replace(/\B(?=(\d{3})+(?!\d))/g, ",");
}

function rate(n: number): string {
  return n < 100 ? n.toFixed(1) : int(n);
}

function bytes(n: number): string {
  const GiB = 1024 ** 3;
  return n >= GiB ? `${(n / GiB).toFixed(1)} GiB` : `${Math.round(n / 1024 ** 2)} MiB`;
}

function duration(seconds: number): string {
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}
