import { afterEach, describe, expect, it } from "vitest";
import { ChatWidget, chatRendererFactory } from "./chat";
import { CHAT_MIME } from "./mime";
import { chat, render, text } from "./testutil";

let widgets: ChatWidget[] = [];
async function show(bundle: unknown): Promise<ChatWidget> {
  const w = new ChatWidget();
  widgets.push(w);
  return render(w, CHAT_MIME, bundle);
}
afterEach(() => {
  widgets.forEach((w) => w.dispose());
  widgets = [];
});

describe("chat renderer", () => {
  it("is registered as safe for the chat MIME type", () => {
    expect(chatRendererFactory.mimeTypes).toEqual([CHAT_MIME]);
    expect(chatRendererFactory.safe).toBe(true);
    expect(chatRendererFactory.createRenderer({} as never)).toBeInstanceOf(ChatWidget);
  });

  it("draws one bubble per message with its role and text", async () => {
    const w = await show(chat());
    const bubbles = [...w.node.querySelectorAll(".qwenbook-msg")];
    expect(bubbles.map((b) => b.className)).toEqual([
      "qwenbook-msg qwenbook-msg-system",
      "qwenbook-msg qwenbook-msg-user",
      "qwenbook-msg qwenbook-msg-assistant",
    ]);
    expect(bubbles.map((b) => text(b.querySelector(".qwenbook-msg-role")))).toEqual(["System", "User", "Assistant"]);
    expect(text(bubbles[1].querySelector(".qwenbook-msg-body"))).toBe("你好");
    expect(text(bubbles[2].querySelector(".qwenbook-msg-body"))).toBe("你好！有什么我可以帮你的吗？");
    expect(text(w.node.querySelector(".qwenbook-chat-model"))).toBe("Qwen/Qwen2.5-7B-Instruct");
  });

  it("shows token count, tokens/s, time to first token and duration when done", async () => {
    const w = await show(chat());
    const footer = w.node.querySelector(".qwenbook-chat-footer")!;
    expect([...footer.children].map((c) => c.textContent)).toEqual([
      "16 tokens",
      "38.8 tokens/s",
      "first token 84 ms",
      "412 ms total",
    ]);
    expect(w.node.querySelector(".qwenbook-caret")).toBeNull();
    expect(w.node.querySelector(".qwenbook-badge")).toBeNull();
  });

  it("while generating shows a caret after the last text, a live badge and the count so far", async () => {
    const w = await show(
      chat({
        state: "generating",
        messages: [
          { role: "user", content: "列出三点" },
          { role: "assistant", content: "好的：\n\n1. 第一\n2. 第" },
        ],
        stats: { completionTokens: 7 },
      }),
    );
    const caret = w.node.querySelector(".qwenbook-caret");
    expect(caret?.parentElement?.tagName).toBe("LI");
    expect(caret?.parentElement?.textContent).toBe("第");
    expect(text(w.node.querySelector(".qwenbook-badge-live"))).toBe("generating…");
    expect(text(w.node.querySelector(".qwenbook-chat-footer"))).toBe("7 tokens");
    expect(w.node.querySelector(".qwenbook-chat")?.getAttribute("data-state")).toBe("generating");
  });

  it("puts the caret in an empty bubble before the first token", async () => {
    const w = await show(chat({ state: "generating", messages: [{ role: "user", content: "hi" }, { role: "assistant", content: "" }] }));
    expect(w.node.querySelector(".qwenbook-msg-assistant .qwenbook-msg-body > .qwenbook-caret")).not.toBeNull();
  });

  it("updates in place: unchanged bubbles are kept, the streaming one is redrawn", async () => {
    const base = chat({ state: "generating", stats: { completionTokens: 1 } });
    const w = await show({ ...base, messages: [...base.messages.slice(0, 2), { role: "assistant", content: "你" }] });
    const userBubble = w.node.querySelectorAll(".qwenbook-msg")[1];
    await w.renderModel({
      trusted: false,
      metadata: {},
      setData: () => undefined,
      data: { [CHAT_MIME]: { ...base, messages: [...base.messages.slice(0, 2), { role: "assistant", content: "你好！" }], stats: { completionTokens: 2 } } as never },
    });
    const bubbles = w.node.querySelectorAll(".qwenbook-msg");
    expect(bubbles).toHaveLength(3);
    expect(bubbles[1]).toBe(userBubble);
    expect(text(bubbles[2].querySelector(".qwenbook-msg-body"))).toBe("你好！");
    expect(w.node.querySelectorAll(".qwenbook-caret")).toHaveLength(1);
  });

  it("renders Markdown and code blocks in replies but shows user text literally", async () => {
    const w = await show(
      chat({
        messages: [
          { role: "user", content: "**not bold** <b>x</b>" },
          { role: "assistant", content: "Use **this**:\n\n```ts\nconst x = 1;\n```" },
        ],
      }),
    );
    const [user, assistant] = w.node.querySelectorAll(".qwenbook-msg-body");
    expect(user.textContent).toBe("**not bold** <b>x</b>");
    expect(user.querySelector("b, strong")).toBeNull();
    expect(assistant.querySelector("strong")?.textContent).toBe("this");
    expect(assistant.querySelector(".qwenbook-code pre code")?.textContent).toBe("const x = 1;");
  });

  it("never turns reply text into live HTML", async () => {
    const evil = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script><iframe src="https://x"></iframe>';
    const w = await show(chat({ messages: [{ role: "assistant", content: evil }] }));
    expect(w.node.querySelector("img, script, iframe")).toBeNull();
    expect(w.node.querySelector(".qwenbook-msg-body")?.textContent).toContain("<script>");
  });

  it("folds a <think> block away from the answer", async () => {
    const w = await show(chat({ messages: [{ role: "assistant", content: "<think>\n用户在打招呼。\n</think>\n\n你好！" }] }));
    const details = w.node.querySelector("details.qwenbook-think") as HTMLDetailsElement;
    expect(details.open).toBe(false);
    expect(text(details.querySelector("summary"))).toBe("Thought");
    expect(text(details.querySelector(".qwenbook-think-body"))).toBe("用户在打招呼。");
    expect(text(w.node.querySelector(".qwenbook-msg-body > p"))).toBe("你好！");
  });

  it("keeps an unfinished <think> block open while it streams", async () => {
    const w = await show(chat({ state: "generating", messages: [{ role: "assistant", content: "<think>\n让我想想" }] }));
    const details = w.node.querySelector("details.qwenbook-think") as HTMLDetailsElement;
    expect(details.open).toBe(true);
    expect(details.querySelector(".qwenbook-caret")).not.toBeNull();
  });

  it("marks a cancelled reply and counts the tokens kept", async () => {
    const w = await show(chat({ state: "cancelled", stats: { completionTokens: 5, durationMs: 100, finishReason: "cancelled" } }));
    expect(text(w.node.querySelector(".qwenbook-badge-warn"))).toBe("cancelled");
    expect(text(w.node.querySelector(".qwenbook-chat-tokens"))).toBe("5 tokens kept");
  });

  it("shows a generation error in an error box under the partial reply", async () => {
    const w = await show(
      chat({ state: "error", error: { name: "WorkerExitedError", message: "the worker exited (signal 9)", hint: "Check its log." } }),
    );
    expect(text(w.node.querySelector(".qwenbook-badge-error"))).toBe("error");
    const box = w.node.querySelector(".qwenbook-chat-problem .qwenbook-error");
    expect(text(box?.querySelector(".qwenbook-error-title"))).toBe("WorkerExitedError: generation failed");
    expect(text(box?.querySelector(".qwenbook-error-detail"))).toBe("the worker exited (signal 9)");
    expect(text(box?.querySelector(".qwenbook-error-hint"))).toBe("Check its log.");
    expect(w.node.querySelectorAll(".qwenbook-msg")).toHaveLength(3);
  });

  it("notes a reply cut off at maxTokens", async () => {
    const w = await show(chat({ stats: { completionTokens: 16, finishReason: "length" } }));
    expect(text(w.node.querySelector(".qwenbook-chat-note"))).toBe("stopped at the maxTokens limit");
  });
});
