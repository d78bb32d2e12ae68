import type { DevicesOption } from "../bridge/protocol.gen";

/** Where a model's layers go: every visible GPU, a list of devices, or a memory budget per device. */
export type Devices = "auto" | readonly string[] | { maxMemory: Readonly<Record<string, number | string>> };

const DEVICE = /^(cpu|cuda|cuda:\d+)$/;
const SIZE = /^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$/i;
const HOW = 'use "auto", a list like ["cuda:0", "cuda:1"], or { maxMemory: { "cuda:0": "20GiB", cpu: "64GiB" } }';

/** Checks the `devices` load option and turns it into its wire form; the worker checks the GPU count. */
export function checkDevices(value: unknown): DevicesOption {
  if (value === "auto") return "auto";
  if (typeof value === "string") throw new RangeError(`load option devices ${JSON.stringify(value)} is not understood: ${HOW}`);
  if (Array.isArray(value)) {
    if (value.length === 0) throw new RangeError(`load option devices is an empty list: ${HOW}`);
    const names = value.map((d, i) => {
      if (typeof d !== "string" || !DEVICE.test(d)) {
        throw new RangeError(`load option devices[${i}] must be "cuda:N" or "cpu", got ${JSON.stringify(d)}`);
      }
      return d;
    });
    if (new Set(names).size !== names.length) throw new RangeError(`load option devices ${JSON.stringify(names)} names a device twice`);
    return names;
  }
  if (value !== null && typeof value === "object") {
    const keys = Object.keys(value);
    if (keys.length !== 1 || keys[0] !== "maxMemory") {
      throw new RangeError(`load option devices has keys ${JSON.stringify(keys)}: ${HOW}`);
    }
    const budget = (value as { maxMemory: unknown }).maxMemory;
    if (budget === null || typeof budget !== "object" || Array.isArray(budget) || Object.keys(budget).length === 0) {
      throw new RangeError(`load option devices.maxMemory must map devices to sizes, got ${JSON.stringify(budget)}: ${HOW}`);
    }
    const out: Record<string, number | string> = {};
    for (const [device, size] of Object.entries(budget as Record<string, unknown>)) {
      if (!DEVICE.test(device)) throw new RangeError(`load option devices.maxMemory key ${JSON.stringify(device)} must be "cuda:N" or "cpu"`);
      const ok = (typeof size === "number" && Number.isInteger(size) && size > 0) || (typeof size === "string" && SIZE.test(size));
      if (!ok) throw new RangeError(`load option devices.maxMemory[${JSON.stringify(device)}] must be a byte count or a size like "20GiB", got ${JSON.stringify(size)}`);
      out[device] = size as number | string;
    }
    return { maxMemory: out };
  }
  throw new RangeError(`load option devices must be a string, a list or an object, got ${JSON.stringify(value)}: ${HOW}`);
}
