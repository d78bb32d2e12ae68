import type { BundleMimeTypes } from "../schema/bundles";

export type BundleMime = keyof BundleMimeTypes;

export const CHAT_MIME = "application/vnd.qwenbook.chat+json" satisfies BundleMime;
export const TRAIN_MIME = "application/vnd.qwenbook.train+json" satisfies BundleMime;
export const GPU_MIME = "application/vnd.qwenbook.gpu+json" satisfies BundleMime;

/** The bundle version this build reads; the schema pins it with `const`. */
export const BUNDLE_VERSION = 1 satisfies BundleMimeTypes[BundleMime]["version"];

/** Names the widgets use in messages, e.g. "chat output". */
export const BUNDLE_LABEL: Record<BundleMime, string> = {
  [CHAT_MIME]: "chat",
  [TRAIN_MIME]: "training dashboard",
  [GPU_MIME]: "GPU memory gauge",
};

/** Schema `$defs` entry for each MIME type, as listed in the schema's `x-mime-types`. */
export const BUNDLE_DEF: Record<BundleMime, string> = {
  [CHAT_MIME]: "ChatBundle",
  [TRAIN_MIME]: "TrainBundle",
  [GPU_MIME]: "GpuBundle",
};
