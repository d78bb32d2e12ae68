import { afterEach, describe, expect, it } from "vitest";
import { ChatWidget, chatRendererFactory, thoughtLabel } from "./chat";
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

  describe("a conversation's later turn", () => {
    const earlier = [
      { role: "user" as const, content: "My name is Lin." },
      { role: "assistant" as const, content: "Hello Lin!" },
      { role: "user" as const, content: "What is two plus two?" },
      { role: "assistant" as const, content: "Four." },
    ];
    const turn3 = (overrides: Parameters<typeof chat>[0] = {}) =>
      chat({
        messages: [
          { role: "user", content: "What is my name?" },
          { role: "assistant", content: "Lin." },
        ],
        earlier,
        ...overrides,
      });
    const visibleUsers = (w: ChatWidget) =>
      [...w.node.querySelectorAll(".qwenbook-msg-user")].filter((el) => !el.closest("details:not([open])")).map((el) => text(el.querySelector(".qwenbook-msg-body")));

    it("shows the new turn with the earlier turns folded behind a marker", async () => {
      const w = await show(turn3());
      const fold = w.node.querySelector("details.qwenbook-chat-earlier") as HTMLDetailsElement;
      expect(fold.hidden).toBe(false);
      expect(fold.open).toBe(false);
      expect(text(fold.querySelector(":scope > summary"))).toBe("2 earlier turns");
      expect(visibleUsers(w)).toEqual(["What is my name?"]);
      // The marker comes before the new turn, so the transcript still reads oldest first when opened.
      const list = w.node.querySelector(".qwenbook-chat > .qwenbook-chat-messages")!;
      expect(fold.compareDocumentPosition(list) & Node.DOCUMENT_POSITION_FOLLOWING).toBeTruthy();
    });

    it("opens in place to show each earlier message once, oldest first", async () => {
      const w = await show(turn3());
      const fold = w.node.querySelector("details.qwenbook-chat-earlier") as HTMLDetailsElement;
      (fold.querySelector("summary") as HTMLElement).click();
      expect(fold.open).toBe(true);
      expect(visibleUsers(w)).toEqual(["My name is Lin.", "What is two plus two?", "What is my name?"]);
      expect([...fold.querySelectorAll(".qwenbook-msg-body")].map(text)).toEqual(earlier.map((m) => m.content));
    });

    it("stays open, with the same nodes, while the reply streams", async () => {
      const w = await show(turn3({ state: "generating", messages: [{ role: "user", content: "What is my name?" }, { role: "assistant", content: "L" }] }));
      const fold = w.node.querySelector("details.qwenbook-chat-earlier") as HTMLDetailsElement;
      (fold.querySelector("summary") as HTMLElement).click();
      const firstBubble = fold.querySelector(".qwenbook-msg");
      await w.renderModel({ trusted: false, metadata: {}, setData: () => undefined, data: { [CHAT_MIME]: turn3() as never } });
      expect(fold.open).toBe(true);
      expect(fold.querySelector(".qwenbook-msg")).toBe(firstBubble);
      expect(text(w.node.querySelector(".qwenbook-chat > .qwenbook-chat-messages .qwenbook-msg-assistant .qwenbook-msg-body"))).toBe("Lin.");
    });

    it("says 1 earlier turn for one, and shows no marker without earlier turns", async () => {
      const one = await show(turn3({ earlier: earlier.slice(0, 2) }));
      expect(text(one.node.querySelector(".qwenbook-chat-earlier > summary"))).toBe("1 earlier turn");
      const none = await show(chat());
      expect((none.node.querySelector(".qwenbook-chat-earlier") as HTMLElement).hidden).toBe(true);
      expect(none.node.querySelectorAll(".qwenbook-msg")).toHaveLength(3);
    });

    it("counts turns by question, a folded system prompt included in the list but not the count", async () => {
      const w = await show(turn3({ earlier: [{ role: "system", content: "Be kind." }, ...earlier] }));
      expect(text(w.node.querySelector(".qwenbook-chat-earlier > summary"))).toBe("2 earlier turns");
      expect(w.node.querySelectorAll(".qwenbook-chat-earlier .qwenbook-msg")).toHaveLength(5);
    });
  });

  describe("thinking and tool calls", () => {
    const question = { role: "user" as const, content: "Weather in Paris?" };
    const thinking = (content: string, extra: Record<string, unknown> = {}) =>
      chat({
        state: "generating",
        messages: [question, { role: "assistant", content, reasoning: "They want the weather.", ...extra }],
        stats: { completionTokens: 5 },
      });
    const update = (w: ChatWidget, bundle: unknown) =>
      w.renderModel({ trusted: false, metadata: {}, setData: () => undefined, data: { [CHAT_MIME]: bundle as never } });
    const fold = (w: ChatWidget) => w.node.querySelector(".qwenbook-msg-assistant details.qwenbook-think") as HTMLDetailsElement;

    it("draws the reasoning in its own Thinking block, open with the caret while it streams", async () => {
      const w = await show(thinking(""));
      expect(fold(w).open).toBe(true);
      expect(text(fold(w).querySelector("summary"))).toBe("Thinking…");
      expect(text(fold(w).querySelector(".qwenbook-think-body"))).toBe("They want the weather.");
      expect(fold(w).querySelector(".qwenbook-caret")).not.toBeNull();
    });

    it("folds the block once the answer starts and says how long and how many tokens it took", async () => {
      const w = await show(thinking(""));
      await update(w, thinking("Let me check."));
      expect(fold(w).open).toBe(false);
      expect(text(w.node.querySelector(".qwenbook-msg-assistant .qwenbook-msg-body > p"))).toBe("Let me check.");
      await update(w, chat({ messages: [question, { role: "assistant", content: "Let me check.", reasoning: "They want the weather.", reasoningTokens: 85, reasoningMs: 1234 }] }));
      expect(fold(w).open).toBe(false);
      expect(text(fold(w).querySelector("summary"))).toBe("Thought for 1.2 s · 85 tokens");
      // The reasoning is not repeated in the answer.
      expect(text(w.node.querySelector(".qwenbook-msg-assistant .qwenbook-msg-body > p"))).toBe("Let me check.");
    });

    it("labels the thought with what is known", () => {
      expect(thoughtLabel({}, true)).toBe("Thinking…");
      expect(thoughtLabel({}, false)).toBe("Thought");
      expect(thoughtLabel({ reasoningMs: 420, reasoningTokens: 1 }, false)).toBe("Thought for 420 ms · 1 token");
      expect(thoughtLabel({ reasoningTokens: 1234 }, false)).toBe("Thought · 1,234 tokens");
      expect(thoughtLabel({ reasoningMs: 75_000, reasoningTokens: 900 }, false)).toBe("Thought for 1m 15s · 900 tokens");
    });

    it("keeps the reader's choice: closed while it thinks stays closed, opened while it answers stays open", async () => {
      const w = await show(thinking(""));
      (fold(w).querySelector("summary") as HTMLElement).click();
      expect(fold(w).open).toBe(false);
      await update(w, thinking("", { reasoning: "They want the weather. Paris it is." }));
      expect(fold(w).open).toBe(false);
      expect(text(fold(w).querySelector(".qwenbook-think-body"))).toBe("They want the weather. Paris it is.");
      (fold(w).querySelector("summary") as HTMLElement).click();
      await update(w, thinking("It is"));
      expect(fold(w).open).toBe(true);
      await update(w, chat({ messages: [question, { role: "assistant", content: "It is sunny.", reasoning: "x", reasoningTokens: 3 }] }));
      expect(fold(w).open).toBe(true);
    });

    it("draws each call as a card with the tool's name and its arguments as indented JSON, not tags", async () => {
      const w = await show(
        chat({
          messages: [
            question,
            {
              role: "assistant",
              content: "",
              reasoning: "Call the tool.",
              toolCalls: [
                { name: "weather", arguments: { city: "Paris", days: 2 } },
                { name: "calculator", arguments: { expression: "2 + 2" } },
              ],
            },
          ],
          stats: { completionTokens: 30, finishReason: "tool_calls" },
        }),
      );
      const cards = [...w.node.querySelectorAll(".qwenbook-msg-assistant .qwenbook-tool-call")];
      expect(cards.map((c) => text(c.querySelector(".qwenbook-tool-call-name")))).toEqual(["weather", "calculator"]);
      expect(cards[0].querySelector(".qwenbook-tool-call-args")?.textContent).toBe('{\n  "city": "Paris",\n  "days": 2\n}');
      expect(w.node.textContent).not.toContain("<tool_call>");
      expect(fold(w).open).toBe(false);
    });

    it("ends the live thinking when a call arrives before any answer text", async () => {
      const w = await show(thinking(""));
      await update(w, thinking("", { toolCalls: [{ name: "weather", arguments: { city: "Paris" } }] }));
      expect(fold(w).open).toBe(false);
      expect(text(fold(w).querySelector("summary"))).toBe("Thought");
      expect(w.node.querySelectorAll(".qwenbook-tool-call")).toHaveLength(1);
    });

    it("draws a tool message as a result under the tool's name, JSON indented", async () => {
      const w = await show(
        chat({
          messages: [
            { role: "tool", content: '{"sky":"sunny","c":21}', name: "weather" },
            { role: "tool", content: "plain words" },
            { role: "assistant", content: "Sunny." },
          ],
        }),
      );
      const [named, bare] = [...w.node.querySelectorAll(".qwenbook-msg-tool")];
      expect(text(named.querySelector(".qwenbook-msg-role"))).toBe("Tool result · weather");
      expect(named.querySelector(".qwenbook-tool-result")?.textContent).toBe('{\n  "sky": "sunny",\n  "c": 21\n}');
      expect(text(bare.querySelector(".qwenbook-msg-role"))).toBe("Tool result");
      expect(bare.querySelector(".qwenbook-tool-result")?.textContent).toBe("plain words");
      expect(w.node.querySelector(".qwenbook-caret")).toBeNull();
    });
  });

  it("notes a reply cut off at maxTokens", async () => {
    const w = await show(chat({ stats: { completionTokens: 16, finishReason: "length" } }));
    expect(text(w.node.querySelector(".qwenbook-chat-note"))).toBe("stopped at the maxTokens limit");
  });
});
