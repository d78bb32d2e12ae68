import { describe, expect, it } from "vitest";
import { checkDevices } from "./devices";

describe("checkDevices", () => {
  it("passes the three accepted forms through", () => {
    expect(checkDevices("auto")).toBe("auto");
    expect(checkDevices(["cuda:0", "cuda:1"])).toEqual(["cuda:0", "cuda:1"]);
    expect(checkDevices({ maxMemory: { "cuda:0": "20GiB", cpu: 1024 } })).toEqual({ maxMemory: { "cuda:0": "20GiB", cpu: 1024 } });
  });

  it.each([
    ["everywhere", /not understood/],
    [[], /empty list/],
    [["gpu0"], /devices\[0\] must be "cuda:N" or "cpu"/],
    [["cuda:0", "cuda:0"], /names a device twice/],
    [{ maxMem: {} }, /has keys \["maxMem"\]/],
    [{ maxMemory: { "cuda:0": "lots" } }, /must be a byte count or a size/],
    [{ maxMemory: { tpu: "1GiB" } }, /key "tpu" must be/],
    [3, /must be a string, a list or an object/],
  ])("refuses %j with the fix", (bad, message) => {
    expect(() => checkDevices(bad)).toThrow(message);
  });
});
