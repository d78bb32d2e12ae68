import { describe, expect, it } from "vitest";
import { renderMarkdown } from "./markdown";

function md(source: string): HTMLElement {
  const div = document.createElement("div");
  div.append(renderMarkdown(source));
  return div;
}

describe("renderMarkdown", () => {
  it("renders paragraphs, emphasis, inline code and lists", () => {
    const el = md("Hello **bold** and *em* with `x<y>`.\n\n- one\n- two **2**\n\n1. first\n2. second");
    expect(el.querySelector("p strong")?.textContent).toBe("bold");
    expect(el.querySelector("p em")?.textContent).toBe("em");
    expect(el.querySelector("p code")?.textContent).toBe("x<y>");
    expect([...el.querySelectorAll("ul > li")].map((li) => li.textContent)).toEqual(["one", "two 2"]);
    expect([...el.querySelectorAll("ol > li")].map((li) => li.textContent)).toEqual(["first", "second"]);
  });

  it("renders a fenced code block with its language and exact text", () => {
    const el = md("Here:\n\n```python\ndef f(x):\n    return x < 1 and '<b>'\n```\n");
    expect(el.querySelector(".qwenbook-code-lang")?.textContent).toBe("python");
    expect(el.querySelector("pre code")?.textContent).toBe("def f(x):\n    return x < 1 and '<b>'");
  });

  it("treats a code fence still being streamed as code", () => {
    const el = md("```js\nconst a = 1;\nconst b");
    expect(el.querySelector("pre code")?.textContent).toBe("const a = 1;\nconst b");
  });

  it("shows raw HTML as text and never creates elements from it", () => {
    const el = md('<script>alert(1)</script>\n\nhi <img src=x onerror="alert(2)"> <b>b</b>');
    expect(el.querySelector("script, img, b")).toBeNull();
    expect(el.textContent).toContain("<script>alert(1)</script>");
    expect(el.textContent).toContain('<img src=x onerror="alert(2)">');
  });

  it("links only http, https and mailto targets", () => {
    const el = md("[ok](https://qwen.ai) [bad](javascript:alert(1)) [data](data:text/html,x) <mailto:a@b.c>");
    const links = [...el.querySelectorAll("a")];
    expect(links.map((a) => a.getAttribute("href"))).toEqual(["https://qwen.ai", "mailto:a@b.c"]);
    expect(links[0].getAttribute("rel")).toBe("noopener noreferrer");
    expect(el.textContent).toContain("bad");
  });

  it("does not load images, but keeps a link to them", () => {
    const el = md("![a cat](https://example.com/cat.png)");
    expect(el.querySelector("img")).toBeNull();
    expect(el.querySelector("a")?.textContent).toBe("[image: a cat]");
  });

  it("decodes entities instead of showing them", () => {
    expect(md("a &amp; b &lt;c&gt; &#x4F60;&#22909;").textContent).toBe("a & b <c> 你好");
  });

  it("renders tables", () => {
    const el = md("| 模型 | 参数 |\n|:--|--:|\n| Qwen2.5 | 7B |");
    expect([...el.querySelectorAll("th")].map((c) => c.textContent)).toEqual(["模型", "参数"]);
    expect(el.querySelector("td:last-child")?.getAttribute("style")).toBe("text-align: right");
  });

  it("keeps Chinese text intact", () => {
    const text = "你好！我是通义千问，由阿里云开发的大规模语言模型。😊";
    expect(md(text).textContent).toBe(text);
  });
});
