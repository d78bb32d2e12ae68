import { lexer, type Token, type Tokens } from "marked";
import { h } from "./dom";

// Model replies are untrusted text. Markdown is parsed into tokens and every token is built with
// DOM calls and text nodes; no string from a reply is ever parsed as HTML. Raw HTML in a reply is
// shown as the literal text it is.

const SAFE_URL = /^(https?:|mailto:)/i;
const ENTITY = /&(#x[0-9a-f]+|#\d+|amp|lt|gt|quot|apos|nbsp);/gi;
const NAMED: Record<string, string> = { amp: "&", lt: "<", gt: ">", quot: '"', apos: "'", nbsp: "\u00a0" };

/** Renders Markdown into a fragment of safe DOM nodes. */
export function renderMarkdown(source: string): DocumentFragment {
  const fragment = document.createDocumentFragment();
  for (const token of lexer(source, { gfm: true })) {
    const node = block(token);
    if (node) fragment.append(node);
  }
  return fragment;
}

function block(token: Token): Node | null {
  const t = token as Tokens.Generic;
  switch (t.type) {
    case "space":
    case "def":
      return null;
    case "paragraph":
      return h("p", {}, ...inline((t as Tokens.Paragraph).tokens));
    case "heading": {
      const { depth, tokens } = t as Tokens.Heading;
      // h1/h2 would shout inside a chat bubble; every heading level maps to a small bold line.
      return h("div", { class: `qwenbook-md-heading qwenbook-md-h${Math.min(depth, 4)}` }, ...inline(tokens));
    }
    case "code":
      return codeBlock((t as Tokens.Code).text, (t as Tokens.Code).lang);
    case "blockquote":
      return h("blockquote", {}, ...children((t as Tokens.Blockquote).tokens, block));
    case "list":
      return list(t as Tokens.List);
    case "table":
      return table(t as Tokens.Table);
    case "hr":
      return h("hr");
    case "html":
      return h("p", { class: "qwenbook-md-raw" }, (t as Tokens.HTML).text);
    case "text":
      return h("p", {}, ...inline(t.tokens ?? [textToken(t.text as string)]));
    default:
      return h("p", {}, decode(t.raw));
  }
}

function inline(tokens: Token[]): Node[] {
  return children(tokens, inlineNode);
}

function inlineNode(token: Token): Node | null {
  const t = token as Tokens.Generic;
  switch (t.type) {
    case "text":
      return t.tokens ? fragmentOf(inline(t.tokens)) : document.createTextNode(decode(t.text as string));
    case "escape":
      return document.createTextNode(decode(t.text as string));
    case "strong":
      return h("strong", {}, ...inline((t as Tokens.Strong).tokens));
    case "em":
      return h("em", {}, ...inline((t as Tokens.Em).tokens));
    case "del":
      return h("del", {}, ...inline((t as Tokens.Del).tokens));
    case "codespan":
      return h("code", {}, (t as Tokens.Codespan).text);
    case "br":
      return h("br");
    case "link": {
      const { href, title, tokens } = t as Tokens.Link;
      if (!SAFE_URL.test(href)) return fragmentOf(inline(tokens));
      return h("a", { href, title: title ?? undefined, target: "_blank", rel: "noopener noreferrer" }, ...inline(tokens));
    }
    case "image": {
      // Remote images are not fetched from a notebook output; the link keeps them one click away.
      const { href, text } = t as Tokens.Image;
      const label = `[image: ${text || href}]`;
      return SAFE_URL.test(href) ? h("a", { href, target: "_blank", rel: "noopener noreferrer" }, label) : document.createTextNode(label);
    }
    case "html":
      return document.createTextNode((t as Tokens.Tag).text);
    default:
      return document.createTextNode(decode(t.raw));
  }
}

function codeBlock(code: string, lang: string | undefined): HTMLElement {
  const language = (lang ?? "").trim().split(/\s+/)[0] ?? "";
  const copy = h("button", { class: "qwenbook-code-copy", type: "button", title: "Copy code" }, "Copy");
  copy.addEventListener("click", () => {
    void navigator.clipboard?.writeText(code).then(() => {
      copy.textContent = "Copied";
      setTimeout(() => (copy.textContent = "Copy"), 1500);
    });
  });
  return h(
    "div",
    { class: "qwenbook-code" },
    h("div", { class: "qwenbook-code-header" }, h("span", { class: "qwenbook-code-lang" }, language || "text"), copy),
    h("pre", {}, h("code", { "data-lang": language || undefined }, code)),
  );
}

function list(t: Tokens.List): HTMLElement {
  const items = t.items.map((item) => {
    const content = item.tokens.map((tok) =>
      // Tight lists hold bare text tokens; wrapping them in <p> would add loose-list spacing.
      tok.type === "text" && !item.loose ? fragmentOf(inline((tok as Tokens.Text).tokens ?? [tok])) : block(tok),
    );
    const box = item.task ? h("input", { type: "checkbox", disabled: true, checked: item.checked === true }) : null;
    return h("li", {}, box, ...content);
  });
  if (!t.ordered) return h("ul", {}, ...items);
  return h("ol", { start: typeof t.start === "number" && t.start !== 1 ? t.start : undefined }, ...items);
}

function table(t: Tokens.Table): HTMLElement {
  const cell = (tag: "th" | "td", c: Tokens.TableCell) =>
    h(tag, { style: c.align ? `text-align: ${c.align}` : undefined }, ...inline(c.tokens));
  return h(
    "div",
    { class: "qwenbook-md-table" },
    h(
      "table",
      {},
      h("thead", {}, h("tr", {}, ...t.header.map((c) => cell("th", c)))),
      h("tbody", {}, ...t.rows.map((row) => h("tr", {}, ...row.map((c) => cell("td", c))))),
    ),
  );
}

function children(tokens: Token[], build: (t: Token) => Node | null): Node[] {
  return tokens.map(build).filter((n): n is Node => n !== null);
}

function fragmentOf(nodes: Node[]): DocumentFragment {
  const f = document.createDocumentFragment();
  f.append(...nodes);
  return f;
}

function textToken(text: string): Tokens.Text {
  return { type: "text", raw: text, text };
}

/** Markdown allows HTML entities in text; decode the common ones instead of showing "&amp;". */
function decode(text: string): string {
  return text.replace(ENTITY, (whole, name: string) => {
    const lower = name.toLowerCase();
    if (lower.startsWith("#x")) return safeCodePoint(parseInt(lower.slice(2), 16), whole);
    if (lower.startsWith("#")) return safeCodePoint(parseInt(lower.slice(1), 10), whole);
    return NAMED[lower] ?? whole;
  });
}

function safeCodePoint(cp: number, fallback: string): string {
  return Number.isInteger(cp) && cp > 0 && cp <= 0x10ffff ? String.fromCodePoint(cp) : fallback;
}
