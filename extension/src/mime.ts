// The MIME type strings, the bundle version and each type's schema entry are generated from the shared
// bundles.json (bundles.gen.ts); only the words the widgets use for each kind of output live here.
import { BUNDLE_DEF, BUNDLE_VERSION, CHAT_MIME, GPU_MIME, TRAIN_MIME, type BundleMime } from "./bundles.gen";

export { BUNDLE_DEF, BUNDLE_VERSION, CHAT_MIME, GPU_MIME, TRAIN_MIME, type BundleMime };

/** Names the widgets use in messages, e.g. "chat output". */
export const BUNDLE_LABEL: Record<BundleMime, string> = {
  [CHAT_MIME]: "chat",
  [TRAIN_MIME]: "training dashboard",
  [GPU_MIME]: "GPU memory gauge",
};
