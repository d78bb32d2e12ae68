import { createHmac, randomUUID, timingSafeEqual } from "node:crypto";
import type { Header } from "./protocol.gen";

/** Separates routing identities from the signed message, as in Jupyter's wire protocol. */
export const DELIMITER = "<IDS|MSG>";
const DELIMITER_BYTES = Buffer.from(DELIMITER, "ascii");

/** Version of the envelope itself (the header's `version`), not of the message catalogue. */
export const ENVELOPE_VERSION = "1.0";

/** One decoded message: the four signed parts, parsed. */
export interface Message<C = unknown> {
  header: Header;
  /** The request's header for events and replies; empty for requests and broadcasts. */
  parentHeader: Header | Record<string, never>;
  metadata: Record<string, unknown>;
  content: C;
}

/** Signs and checks frames with one worker's key. */
export interface Signer {
  /** Lowercase hex HMAC-SHA256 over the parts, in order. */
  sign(parts: readonly Buffer[]): string;
  /** True when `signature` is the right one for `parts`; compares in constant time. */
  verify(signature: Buffer | string, parts: readonly Buffer[]): boolean;
}

/**
 * The key is used as the ASCII bytes of its hex string, not the decoded bytes: that is what
 * jupyter_client does with a connection file's key, and the worker follows it.
 */
export function createSigner(key: string): Signer {
  if (key.length === 0) throw new Error("The worker's HMAC key is empty; its runtime file is damaged");
  const keyBytes = Buffer.from(key, "ascii");
  const sign = (parts: readonly Buffer[]): string => {
    const h = createHmac("sha256", keyBytes);
    for (const p of parts) h.update(p);
    return h.digest("hex");
  };
  return {
    sign,
    verify(signature, parts) {
      const given = Buffer.isBuffer(signature) ? signature : Buffer.from(signature, "ascii");
      const expected = Buffer.from(sign(parts), "ascii");
      return given.length === expected.length && timingSafeEqual(given, expected);
    },
  };
}

export function makeHeader(msgType: string, session: string): Header {
  return { msg_id: randomUUID(), msg_type: msgType, session, date: new Date().toISOString(), version: ENVELOPE_VERSION };
}

const json = (v: unknown): Buffer => Buffer.from(JSON.stringify(v), "utf8");

/** Frames a DEALER sends: [<IDS|MSG>, signature, header, parent_header, metadata, content]. */
export function encodeMessage(signer: Signer, msg: Message): Buffer[] {
  const parts = [json(msg.header), json(msg.parentHeader), json(msg.metadata), json(msg.content)];
  return [DELIMITER_BYTES, Buffer.from(signer.sign(parts), "ascii"), ...parts];
}

/** Why a frame list was not accepted; the client logs these instead of throwing on the receive loop. */
export class WireError extends Error {
  override name = "WireError";
}

/**
 * Decodes frames as a DEALER or SUB socket receives them. Anything before the delimiter (a PUB
 * topic, routing identities) is ignored; a bad signature or malformed JSON raises WireError.
 */
export function decodeMessage(signer: Signer, frames: readonly Buffer[]): Message {
  const at = frames.findIndex((f) => f.equals(DELIMITER_BYTES));
  if (at < 0) throw new WireError(`no ${DELIMITER} delimiter among ${frames.length} frames`);
  const rest = frames.slice(at + 1);
  if (rest.length < 5) throw new WireError(`expected 5 frames after the delimiter, got ${rest.length}`);
  const [signature, ...parts] = rest.slice(0, 5);
  if (!signer.verify(signature, parts)) throw new WireError("bad signature (the message was not made with this worker's key)");
  let decoded: unknown[];
  try {
    decoded = parts.map((p) => JSON.parse(p.toString("utf8")) as unknown);
  } catch (e) {
    throw new WireError(`a signed frame is not JSON: ${(e as Error).message}`);
  }
  const [header, parentHeader, metadata, content] = decoded;
  if (!isHeader(header)) throw new WireError("the header lacks msg_id or msg_type");
  return {
    header,
    parentHeader: isHeader(parentHeader) ? parentHeader : {},
    metadata: isObject(metadata) ? metadata : {},
    content,
  };
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function isHeader(v: unknown): v is Header {
  return isObject(v) && typeof v.msg_id === "string" && typeof v.msg_type === "string";
}
