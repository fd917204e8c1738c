import { describe, expect, it } from "vitest";
import { parseCoordinatorConfig } from "../../coordinator/config.js";
import { ConfigError } from "../../shared/errors.js";
import { MiB, GiB } from "../../shared/units.js";

const vm = { name: "vm1", qmpSocket: "/run/vm1.qmp" };

describe("parseCoordinatorConfig", () => {
  it("fills documented defaults", () => {
    const c = parseCoordinatorConfig({ vms: [vm] }, "c.json", "/etc");
    expect(c).toMatchObject({ hostId: "ballast-host", listen: "127.0.0.1:50050", agentListen: "", incomingHost: "127.0.0.1", stateDir: "" });
    expect(c.defaults).toEqual({ maxBandwidthBytesPerSec: 125_000_000, downtimeLimitMs: 300, prepareDeadlineMs: 15_000, steadyState: true, sampleIntervalMs: 1000 });
    expect(c.vms[0]).toEqual({ name: "vm1", qmpSocket: "/run/vm1.qmp", agentId: "vm1", floorBytes: 256 * MiB, maxBytes: 0, agentPort: 0 });
  });

  it("parses sizes and resolves relative paths against the config folder", () => {
    const c = parseCoordinatorConfig({ stateDir: "state", vms: [{ ...vm, qmpSocket: "vm1.qmp", floor: "300MiB", max: "1GiB", agentPort: 5000 }] }, "c.json", "/etc/ballast");
    expect(c.stateDir).toBe("/etc/ballast/state");
    expect(c.vms[0]).toMatchObject({ qmpSocket: "/etc/ballast/vm1.qmp", floorBytes: 300 * MiB, maxBytes: GiB, agentPort: 5000 });
  });

  it.each([
    ["unknown top-level key", { vms: [vm], listn: "x" }, 'unknown key "listn"'],
    ["unknown vm key", { vms: [{ ...vm, flor: "1G" }] }, 'c.json.vms[0]: unknown key "flor"'],
    ["unknown defaults key", { vms: [vm], defaults: { bandwidth: 1 } }, 'c.json.defaults: unknown key "bandwidth"'],
    ["vms missing", {}, "c.json.vms: expected an array"],
    ["not an object", [], "expected an object"],
    ["missing qmpSocket", { vms: [{ name: "vm1" }] }, "c.json.vms[0].qmpSocket"],
    ["bad name", { vms: [{ ...vm, name: "a b" }] }, "must be 1-63"],
    ["duplicate name", { vms: [vm, vm] }, "duplicate VM name"],
    ["duplicate agent id", { vms: [vm, { ...vm, name: "vm2", agentId: "vm1" }] }, "duplicate agent id"],
    ["duplicate agent port", { vms: [{ ...vm, agentPort: 7 }, { name: "vm2", qmpSocket: "/x", agentPort: 7 }] }, "port 7 is used"],
    ["max below floor", { vms: [{ ...vm, floor: "512MiB", max: "256MiB" }] }, "below floor"],
    ["floor too small", { vms: [{ ...vm, floor: 0 }] }, "below the 16 MiB minimum"],
    ["bad size", { vms: [{ ...vm, floor: "lots" }] }, "not a size"],
    ["bad listen", { vms: [vm], listen: "nowhere" }, "expected host:port"],
    ["bad bool", { vms: [vm], defaults: { steadyState: "yes" } }, "expected true or false"],
    ["int out of range", { vms: [vm], defaults: { downtimeLimitMs: 0 } }, "expected an integer in [1, 60000]"],
  ])("rejects %s", (_name, input, message) => {
    expect(() => parseCoordinatorConfig(input, "c.json", "/etc")).toThrow(ConfigError);
    expect(() => parseCoordinatorConfig(input, "c.json", "/etc")).toThrow(message);
  });
});
