import type { IRenderMime } from "@jupyterlab/rendermime-interfaces";
import { chatRendererFactory } from "./chat";
import { gpuRendererFactory } from "./gpu";
import { trainRendererFactory } from "./train";

/** The Qwenbook renderers, one per custom MIME type. */
const extensions: IRenderMime.IExtension[] = [
  { id: "qwenbook-extension:chat", description: "Qwenbook chat transcripts", rendererFactory: chatRendererFactory, rank: 10, dataType: "json" },
  { id: "qwenbook-extension:train", description: "Qwenbook training dashboards", rendererFactory: trainRendererFactory, rank: 10, dataType: "json" },
  { id: "qwenbook-extension:gpu", description: "Qwenbook GPU memory gauges", rendererFactory: gpuRendererFactory, rank: 10, dataType: "json" },
];

export default extensions;
export { CHAT_MIME, GPU_MIME, TRAIN_MIME } from "./mime";
