import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { checkConfigPaths, loadCoordinatorConfig, parseCoordinatorConfig, type CoordinatorConfig } from "../../coordinator/config.js";
import { formatZodError, hostPortSchema, hostSchema, parseConfig, portSchema, renderPath, sizeSchema, strictObject } from "../../shared/config-schema.js";
import { ConfigError } from "../../shared/errors.js";
import { MiB, GiB } from "../../shared/units.js";

const vm = { name: "vm1", qmpSocket: "/run/vm1.qmp" };
const vm2 = { name: "vm2", qmpSocket: "/run/vm2.qmp" };

/** The message parseCoordinatorConfig throws for `input` (fails the test if it does not throw a ConfigError). */
function errorOf(input: unknown, where = "c.json", baseDir = "/etc"): string {
  try {
    parseCoordinatorConfig(input, where, baseDir);
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return (err as Error).message;
  }
  throw new Error(`accepted ${JSON.stringify(input)}`);
}

const DEFAULTS = { maxBandwidthBytesPerSec: 125_000_000, downtimeLimitMs: 300, prepareDeadlineMs: 15_000, steadyState: true, sampleIntervalMs: 1000, agentLeaseMs: 10_000 };

describe("parseCoordinatorConfig", () => {
  it("fills documented defaults", () => {
    const c = parseCoordinatorConfig({ vms: [vm] }, "c.json", "/etc");
    expect(c).toMatchObject({ hostId: "ballast-host", listen: "127.0.0.1:50050", agentListen: "", incomingHost: "127.0.0.1", stateDir: "" });
    expect(c.defaults).toEqual(DEFAULTS);
    expect(c.vms[0]).toEqual({ name: "vm1", qmpSocket: "/run/vm1.qmp", agentId: "vm1", floorBytes: 256 * MiB, maxBytes: 0, agentPort: 0 });
  });

  it("parses sizes and resolves relative paths against the config folder", () => {
    const c = parseCoordinatorConfig({ stateDir: "state", vms: [{ ...vm, qmpSocket: "vm1.qmp", floor: "300MiB", max: "1GiB", agentPort: 5000 }] }, "c.json", "/etc/ballast");
    expect(c.stateDir).toBe("/etc/ballast/state");
    expect(c.vms[0]).toMatchObject({ qmpSocket: "/etc/ballast/vm1.qmp", floorBytes: 300 * MiB, maxBytes: GiB, agentPort: 5000 });
  });

  // Values the hand-written parser produced for the same inputs (checked against it before the zod rewrite).
  it("parses a full config to the same values as before", () => {
    const c = parseCoordinatorConfig(
      {
        hostId: "h",
        listen: "0.0.0.0:1",
        agentListen: "127.0.0.1:0",
        incomingHost: "10.0.0.2",
        stateDir: "st",
        defaults: { maxBandwidthBytesPerSec: 1000, downtimeLimitMs: 60000, prepareDeadlineMs: 0, steadyState: false, sampleIntervalMs: 100, agentLeaseMs: 600_000 },
        vms: [
          { name: "a.b-c_d", qmpSocket: "rel/q.qmp", agentId: "x", floor: 16777216, max: "2G", agentPort: 65535 },
          { name: "b", qmpSocket: "/abs.qmp", floor: "1.5GiB", max: 0, agentPort: 0 },
        ],
      },
      "c.json",
      "/etc/b",
    );
    expect(c).toEqual<CoordinatorConfig>({
      hostId: "h",
      listen: "0.0.0.0:1",
      agentListen: "127.0.0.1:0",
      incomingHost: "10.0.0.2",
      stateDir: "/etc/b/st",
      defaults: { maxBandwidthBytesPerSec: 1000, downtimeLimitMs: 60000, prepareDeadlineMs: 0, steadyState: false, sampleIntervalMs: 100, agentLeaseMs: 600_000 },
      vms: [
        { name: "a.b-c_d", qmpSocket: "/etc/b/rel/q.qmp", agentId: "x", floorBytes: 16 * MiB, maxBytes: 2 * GiB, agentPort: 65535 },
        { name: "b", qmpSocket: "/abs.qmp", agentId: "b", floorBytes: 1.5 * GiB, maxBytes: 0, agentPort: 0 },
      ],
    });
  });

  it("parses examples/coordinator.json and the README example", () => {
    const example = parseCoordinatorConfig(JSON.parse(readFileSync("examples/coordinator.json", "utf8")), "coordinator.json", "/etc/ballast");
    expect(example).toEqual<CoordinatorConfig>({
      hostId: "host-a",
      listen: "127.0.0.1:50050",
      agentListen: "",
      incomingHost: "127.0.0.1",
      stateDir: "/var/lib/ballast",
      defaults: DEFAULTS,
      vms: [{ name: "vm1", qmpSocket: "/run/ballast/vm1.qmp", agentId: "vm1", floorBytes: 256 * MiB, maxBytes: 0, agentPort: 50051 }],
    });
    const readme = readFileSync("README.md", "utf8");
    const block = /## Coordinator config[\s\S]*?```json\n([\s\S]*?)```/.exec(readme)?.[1];
    expect(block).toBeDefined();
    // The README shows an explicit empty agentListen, which means "none".
    expect(parseCoordinatorConfig(JSON.parse(block ?? ""), "README", "/")).toEqual(example);
  });

  it("accepts what the lab, the bench and the tests write", () => {
    const c = parseCoordinatorConfig({ listen: "127.0.0.1:0", agentListen: "127.0.0.1:0", vms: [{ ...vm, floor: "256MiB", agentPort: 40000 }] }, "c.json");
    expect(c).toMatchObject({ listen: "127.0.0.1:0", agentListen: "127.0.0.1:0" });
    expect(parseCoordinatorConfig({ listen: "[::1]:50050", agentListen: "localhost:6000", incomingHost: "host-b.example", vms: [] }, "c.json").listen).toBe("[::1]:50050");
  });

  it("allows sizes up to exactly 1 PiB and SI units", () => {
    const c = parseCoordinatorConfig({ vms: [{ ...vm, floor: "500MB", max: 2 ** 50 }] }, "c.json");
    expect(c.vms[0]).toMatchObject({ floorBytes: 500_000_000, maxBytes: 2 ** 50 });
  });

  // Today's behaviour; messages now read `FILE: PATH: problem` (was `FILE.PATH: problem`).
  it.each([
    ["unknown top-level key", { vms: [vm], listn: "x" }, "c.json: listn: unknown key (allowed here: hostId, listen,"],
    ["unknown vm key", { vms: [{ ...vm, flor: "1G" }] }, "c.json: vms[0].flor: unknown key (allowed here: name, qmpSocket,"],
    ["unknown defaults key", { vms: [vm], defaults: { bandwidth: 1 } }, "c.json: defaults.bandwidth: unknown key"],
    ["vms missing", {}, "c.json: vms: expected an array of VM entries, got nothing"],
    ["vms not an array", { vms: { vm1: vm } }, "c.json: vms: expected an array of VM entries, got an object"],
    ["not an object", [], "c.json: expected an object, got an array"],
    ["null", null, "c.json: expected an object, got null"],
    ["missing qmpSocket", { vms: [{ name: "vm1" }] }, "c.json: vms[0].qmpSocket: expected a non-empty string, got nothing"],
    ["empty qmpSocket", { vms: [{ ...vm, qmpSocket: "" }] }, "c.json: vms[0].qmpSocket: expected a non-empty string"],
    ["missing name", { vms: [{ qmpSocket: "/q" }] }, "c.json: vms[0].name: expected a non-empty string, got nothing"],
    ["bad name", { vms: [{ ...vm, name: "a b" }] }, 'c.json: vms[0].name: "a b" must be 1-63'],
    ["duplicate name", { vms: [vm, { ...vm2, name: "vm1", agentId: "other" }] }, 'c.json: vms[1].name: duplicate VM name "vm1" (also vms[0].name)'],
    ["duplicate agent id", { vms: [vm, { ...vm2, agentId: "vm1" }] }, 'c.json: vms[1].agentId: duplicate agent id "vm1"'],
    ["duplicate agent port", { vms: [{ ...vm, agentPort: 7 }, { ...vm2, agentPort: 7 }] }, "c.json: vms[1].agentPort: port 7 is used by another VM (also vms[0].agentPort)"],
    ["max below floor", { vms: [{ ...vm, floor: "512MiB", max: "256MiB" }] }, "c.json: vms[0].max: 268435456 bytes is below floor (536870912 bytes)"],
    ["floor too small", { vms: [{ ...vm, floor: 0 }] }, "c.json: vms[0].floor: 0 bytes is below the 16 MiB minimum"],
    ["bad size", { vms: [{ ...vm, floor: "lots" }] }, 'c.json: vms[0].floor: not a size: "lots"'],
    ["size of the wrong type", { vms: [{ ...vm, max: true }] }, 'c.json: vms[0].max: expected bytes or a size string like "512MiB", got boolean true'],
    ["bad listen", { vms: [vm], listen: "nowhere" }, 'c.json: listen: expected host:port like 127.0.0.1:50050, got string "nowhere"'],
    ["bad bool", { vms: [vm], defaults: { steadyState: "yes" } }, 'c.json: defaults.steadyState: expected true or false, got string "yes"'],
    ["int out of range", { vms: [vm], defaults: { downtimeLimitMs: 0 } }, "c.json: defaults.downtimeLimitMs: expected an integer in [1, 60000], got number 0"],
    ["int not an integer", { vms: [vm], defaults: { prepareDeadlineMs: 1.5 } }, "c.json: defaults.prepareDeadlineMs: expected an integer in [0, 600000], got number 1.5"],
    ["empty hostId", { vms: [vm], hostId: "" }, "c.json: hostId: expected a non-empty string"],
  ])("rejects %s", (_name, input, message) => {
    expect(() => parseCoordinatorConfig(input, "c.json", "/etc")).toThrow(ConfigError);
    expect(errorOf(input)).toContain(message);
  });

  // The hostile review's findings: each is refused at parse time, naming the file and the key path.
  it.each<[string, unknown, string, string]>([
    // two VMs on one QMP socket, also when one path is relative
    ["same QMP socket", { vms: [vm, { ...vm2, qmpSocket: "/run/vm1.qmp" }] }, "vms[1].qmpSocket", "QMP socket /run/vm1.qmp is used by another VM (also vms[0].qmpSocket)"],
    ["same QMP socket after resolving", { vms: [{ ...vm, qmpSocket: "vm1.qmp" }, { ...vm2, qmpSocket: "/etc/vm1.qmp" }] }, "vms[1].qmpSocket", "QMP socket /etc/vm1.qmp is used"],
    ["same QMP socket, both relative", { vms: [{ ...vm, qmpSocket: "./q/../vm.qmp" }, { ...vm2, qmpSocket: "vm.qmp" }] }, "vms[1].qmpSocket", "QMP socket /etc/vm.qmp is used"],
    // sizes beyond 1 PiB, non-integer and unsafe byte counts
    ["floor 1e300", { vms: [{ ...vm, floor: 1e300 }] }, "vms[0].floor", "1e+300 bytes is above the 1 PiB limit"],
    ["floor 99999999TiB", { vms: [{ ...vm, floor: "99999999TiB" }] }, "vms[0].floor", '"99999999TiB" is 1.10e+20 bytes, above the 1 PiB limit'],
    ["max 2PiB", { vms: [{ ...vm, max: "2PiB" }] }, "vms[0].max", "above the 1 PiB limit"],
    ["max just above 1 PiB", { vms: [{ ...vm, max: 2 ** 50 + 1 }] }, "vms[0].max", "above the 1 PiB limit"],
    ["unsafe integer", { vms: [{ ...vm, max: 2 ** 53 + 2 }] }, "vms[0].max", "above the 1 PiB limit"],
    ["fractional bytes", { vms: [{ ...vm, floor: 268435456.5 }] }, "vms[0].floor", "268435456.5 is not a whole number of bytes"],
    ["fractional bytes in a string", { vms: [{ ...vm, max: "0.1GiB" }] }, "vms[0].max", '"0.1GiB" is not a whole number of bytes'],
    ["negative bytes", { vms: [{ ...vm, max: -1 }] }, "vms[0].max", "a size cannot be negative, got -1"],
    // ports
    ["listen port 65536", { vms: [vm], listen: "127.0.0.1:65536" }, "listen", 'expected a port in 0 (pick a free port) or 1-65535, got "65536"'],
    ["listen port negative", { vms: [vm], listen: "127.0.0.1:-1" }, "listen", 'got "-1"'],
    ["listen port not a number", { vms: [vm], listen: "127.0.0.1:http" }, "listen", 'got "http"'],
    ["listen port missing", { vms: [vm], listen: "127.0.0.1:" }, "listen", 'got ""'],
    ["agentListen port 99999", { vms: [vm], agentListen: "0.0.0.0:99999" }, "agentListen", 'got "99999"'],
    ["agentListen not a string", { vms: [vm], agentListen: 6000 }, "agentListen", 'expected host:port like 127.0.0.1:50050 or "" (none), got number 6000'],
    ["agentPort 65536", { vms: [{ ...vm, agentPort: 65536 }] }, "vms[0].agentPort", "expected an integer in [0, 65535], got number 65536"],
    ["agentPort negative", { vms: [{ ...vm, agentPort: -1 }] }, "vms[0].agentPort", "expected an integer in [0, 65535], got number -1"],
    ["agentPort as a string", { vms: [{ ...vm, agentPort: "50051" }] }, "vms[0].agentPort", 'got string "50051"'],
    // hosts that are neither a host name nor an IP literal
    ["incomingHost with a shell command", { vms: [vm], incomingHost: "not a host; rm -rf" }, "incomingHost", 'expected a host name or an IP address, got string "not a host; rm -rf"'],
    ["incomingHost empty", { vms: [vm], incomingHost: "" }, "incomingHost", "expected a host name or an IP address"],
    ["incomingHost with a port", { vms: [vm], incomingHost: "10.0.0.1:4444" }, "incomingHost", "expected a host name or an IP address"],
    ["incomingHost not a dotted quad", { vms: [vm], incomingHost: "10.0.0.256" }, "incomingHost", "expected a host name or an IP address"],
    ["incomingHost IPv6", { vms: [vm], incomingHost: "::1" }, "incomingHost", 'IPv6 literal "::1" is not supported here'],
    ["listen host with a shell command", { vms: [vm], listen: "x;reboot:50050" }, "listen", 'expected a host name or an IP address, got string "x;reboot" (in "x;reboot:50050")'],
    ["listen host with a space", { vms: [vm], listen: "my host:50050" }, "listen", "expected a host name or an IP address"],
    ["listen host empty", { vms: [vm], listen: ":50050" }, "listen", 'got string ""'],
    ["listen host label starting with a hyphen", { vms: [vm], listen: "-bad-.example:1" }, "listen", "expected a host name or an IP address"],
    ["listen IPv6 without brackets", { vms: [vm], listen: "::1:50050" }, "listen", "write IPv6 addresses in brackets"],
    ["listen brackets around IPv4", { vms: [vm], listen: "[127.0.0.1]:50050" }, "listen", "expected an IPv6 address in brackets"],
    ["agentListen host", { vms: [vm], agentListen: "$(id):6000" }, "agentListen", "expected a host name or an IP address"],
    // agentLeaseMs
    ["agentLeaseMs below 1000", { vms: [vm], defaults: { agentLeaseMs: 999 } }, "defaults.agentLeaseMs", "expected an integer in [1000, 600000], got number 999"],
    ["agentLeaseMs above 600000", { vms: [vm], defaults: { agentLeaseMs: 600_001 } }, "defaults.agentLeaseMs", "expected an integer in [1000, 600000]"],
    ["agentLeaseMs not an integer", { vms: [vm], defaults: { agentLeaseMs: 1500.5 } }, "defaults.agentLeaseMs", "got number 1500.5"],
    ["agentLeaseMs as a string", { vms: [vm], defaults: { agentLeaseMs: "10s" } }, "defaults.agentLeaseMs", 'got string "10s"'],
  ])("rejects %s, naming the file and the key path", (_name, input, path, message) => {
    const prefix = `coordinator.json: ${path}: `;
    const line = errorOf(input, "coordinator.json")
      .split("\n")
      .find((l) => l.startsWith(prefix));
    expect(line, `no line starts with ${prefix}`).toBeDefined();
    expect(line).toContain(message);
  });

  it("reports every problem, one line each, every line naming the file", () => {
    const message = errorOf(
      { listn: 1, incomingHost: "a b", defaults: { agentLeaseMs: 1 }, vms: [{ ...vm, flor: 1, floor: 1e300 }, { ...vm2, agentPort: 70000 }] },
      "/etc/ballast/coordinator.json",
    );
    const lines = message.split("\n");
    expect(lines.map((l) => /^\/etc\/ballast\/coordinator\.json: ([^:]+): /.exec(l)?.[1]).sort()).toEqual(
      ["defaults.agentLeaseMs", "incomingHost", "listn", "vms[0].flor", "vms[0].floor", "vms[1].agentPort"].sort(),
    );
  });

  it("names the config in messages by default", () => {
    expect(() => parseCoordinatorConfig({})).toThrow(/^config: vms: expected an array of VM entries, got nothing$/);
  });
});

describe("loadCoordinatorConfig and checkConfigPaths", () => {
  const dirs: string[] = [];
  afterAll(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })));
  function configDir(): string {
    const d = mkdtempSync(join(tmpdir(), "ballast-coordinator-config-"));
    dirs.push(d);
    return d;
  }
  function write(dir: string, config: unknown): string {
    const path = join(dir, "coordinator.json");
    writeFileSync(path, typeof config === "string" ? config : JSON.stringify(config));
    return path;
  }
  function loadError(path: string): string {
    try {
      loadCoordinatorConfig(path);
    } catch (err) {
      expect(err).toBeInstanceOf(ConfigError);
      return (err as Error).message;
    }
    throw new Error(`loaded ${path}`);
  }

  it("resolves relative paths against the file's folder and accepts an existing or creatable stateDir", () => {
    const d = configDir();
    mkdirSync(join(d, "existing"));
    const a = loadCoordinatorConfig(write(d, { stateDir: "existing", vms: [{ ...vm, qmpSocket: "vm1.qmp" }] }));
    expect(a.stateDir).toBe(join(d, "existing"));
    expect(a.vms[0]?.qmpSocket).toBe(join(d, "vm1.qmp"));
    expect(loadCoordinatorConfig(write(d, { stateDir: "not-yet", vms: [vm] })).stateDir).toBe(join(d, "not-yet"));
    expect(loadCoordinatorConfig(write(d, { vms: [vm] })).stateDir).toBe("");
  });

  it.each<[string, (d: string) => void, string, string]>([
    ["a file", (d) => writeFileSync(join(d, "state"), "x"), "state", "exists but is not a directory"],
    ["missing, with a missing parent", () => {}, "nowhere/state", "does not exist, and neither does its parent"],
    ["missing, under a file", (d) => writeFileSync(join(d, "file"), "x"), "file/state", "cannot be created: its parent"],
  ])("rejects a stateDir that is %s, naming the file and stateDir", (_name, setup, stateDir, message) => {
    const d = configDir();
    setup(d);
    const path = write(d, { stateDir, vms: [vm] });
    expect(loadError(path)).toContain(`${path}: stateDir: ${join(d, stateDir)} `);
    expect(loadError(path)).toContain(message);
  });

  it("checkConfigPaths is exported for configs that do not come from a file", () => {
    const d = configDir();
    writeFileSync(join(d, "state"), "x");
    const config = parseCoordinatorConfig({ stateDir: "state", vms: [] }, "bench", d);
    expect(() => checkConfigPaths(config, "bench")).toThrow(`bench: stateDir: ${join(d, "state")} exists but is not a directory`);
    expect(() => checkConfigPaths({ ...config, stateDir: "" }, "bench")).not.toThrow();
  });

  it("names the file for unreadable and malformed files and for schema errors", () => {
    const d = configDir();
    expect(loadError(join(d, "absent.json"))).toContain(`cannot read config ${join(d, "absent.json")}`);
    const bad = write(d, "{ not json");
    expect(loadError(bad)).toContain(`${bad}: not valid JSON`);
    const typo = write(d, { vms: [{ ...vm, flor: "1G" }] });
    expect(loadError(typo)).toBe(`${typo}: vms[0].flor: unknown key (allowed here: name, qmpSocket, agentId, floor, max, agentPort, agentSocket, libvirt)`);
  });
});

describe("shared/config-schema", () => {
  it.each<[PropertyKey[], string]>([
    [[], ""],
    [["a"], "a"],
    [["a", "b", 0, "c"], "a.b[0].c"],
    [["vms", 3], "vms[3]"],
    [["x y"], '["x y"]'],
    [["tuning", "1st"], 'tuning["1st"]'],
  ])("renders path %j as %s", (path, text) => {
    expect(renderPath(path)).toBe(text);
  });

  it("formats a ZodError as one line per issue, and one line per unknown key", () => {
    const schema = strictObject({ a: z.number(), b: strictObject({ c: z.string() }) });
    const result = schema.safeParse({ a: "x", b: { c: 1, d: 1, e: 2 } });
    expect(result.success).toBe(false);
    if (result.success) return;
    const lines = formatZodError(result.error, "f.json").split("\n");
    expect(lines).toHaveLength(4);
    expect(lines.every((l) => l.startsWith("f.json: "))).toBe(true);
    expect(lines.filter((l) => l.includes("unknown key")).map((l) => l.split(":")[1]?.trim())).toEqual(["b.d", "b.e"]);
  });

  it("parseConfig throws a ConfigError with the file and the old wording", () => {
    const schema = strictObject({ on: z.boolean(), n: z.number(), s: z.string(), o: strictObject({}), l: z.array(z.number()) });
    const message = (() => {
      try {
        parseConfig(schema, { on: 1, n: "1", s: null, o: [], l: {} }, "f.json");
      } catch (err) {
        expect(err).toBeInstanceOf(ConfigError);
        return (err as Error).message;
      }
      return "";
    })();
    expect(message.split("\n")).toEqual([
      "f.json: on: expected true or false, got number 1",
      'f.json: n: expected a number, got string "1"',
      "f.json: s: expected a string, got null",
      "f.json: o: expected an object, got an array",
      "f.json: l: expected an array, got an object",
    ]);
  });

  it.each<[unknown, number | string]>([
    [0, 0],
    [1048576, 1048576],
    ["512MiB", 512 * MiB],
    ["125MB", 125_000_000],
    [2 ** 50, 2 ** 50],
    [2 ** 50 + 1, "above the 1 PiB limit"],
    [1e300, "above the 1 PiB limit"],
    [Number.MAX_SAFE_INTEGER + 2, "above the 1 PiB limit"],
    [1.5, "not a whole number of bytes"],
    [-1, "cannot be negative"],
    [Number.NaN, "expected bytes or a size string"], // z.number() refuses NaN itself
    [null, "expected bytes or a size string"],
    ["lots", "not a size"],
  ])("sizeSchema: %j -> %j", (input, expected) => {
    const r = sizeSchema.safeParse(input);
    if (typeof expected === "number") expect(r.success && r.data).toBe(expected);
    else expect(r.success ? "accepted" : r.error.issues.map((i) => i.message).join("; ")).toContain(expected);
  });

  it.each<[string, boolean]>([
    ["localhost", true],
    ["host-b.example.com", true],
    ["10.0.0.1", true],
    ["0.0.0.0", true],
    ["::1", true],
    ["fe80::1", true],
    ["", false],
    ["not a host; rm -rf", false],
    ["a_b", false],
    ["-a", false],
    ["a-", false],
    ["1.2.3", false],
    ["256.1.1.1", false],
    ["01.2.3.4", false],
    ["a".repeat(64), false],
    ["host.", false],
    ["[::1]", false],
  ])("hostSchema: %j -> %s", (host, ok) => {
    expect(hostSchema().safeParse(host).success).toBe(ok);
  });

  it.each<[string, boolean, boolean]>([
    // text, accepted with port 0 allowed, accepted without
    ["127.0.0.1:50050", true, true],
    ["127.0.0.1:0", true, false],
    ["localhost:1", true, true],
    ["[::1]:65535", true, true],
    ["127.0.0.1:65536", false, false],
    ["127.0.0.1:-1", false, false],
    ["127.0.0.1:1e3", false, false],
    ["127.0.0.1", false, false],
    ["::1:50050", false, false],
    ["a b:1", false, false],
    ["", false, false],
  ])("hostPortSchema: %j", (text, withZero, withoutZero) => {
    expect(hostPortSchema({ allowPortZero: true }).safeParse(text).success).toBe(withZero);
    expect(hostPortSchema().safeParse(text).success).toBe(withoutZero);
  });

  it("hostPortSchema allowEmpty accepts only the empty string besides host:port", () => {
    expect(hostPortSchema({ allowEmpty: true }).safeParse("").success).toBe(true);
    expect(hostPortSchema({ allowEmpty: true }).safeParse(" ").success).toBe(false);
  });

  it.each<[unknown, boolean]>([
    [1, true],
    [65535, true],
    [0, false],
    [65536, false],
    [-1, false],
    [80.5, false],
    ["80", false],
  ])("portSchema: %j -> %s", (port, ok) => {
    expect(portSchema.safeParse(port).success).toBe(ok);
  });
});

describe("libvirt VM entries", () => {
  const lv = { name: "vm1", libvirt: { uri: "qemu:///system", domain: "guest-1" } };

  it("takes a libvirt domain instead of a QMP socket", () => {
    const c = parseCoordinatorConfig({ vms: [lv, vm2] }, "c.json", "/etc");
    expect(c.vms[0]).toEqual({ name: "vm1", qmpSocket: "", libvirt: { uri: "qemu:///system", domain: "guest-1", peerUri: "qemu:///system" }, agentId: "vm1", floorBytes: 256 * MiB, maxBytes: 0, agentPort: 0 });
    expect(c.vms[1]?.libvirt).toBeUndefined();
  });

  it("accepts a socket URI and a peer URI", () => {
    const uri = "qemu+unix:///system?socket=/tmp/blv-1/b/run/libvirt-sock";
    const c = parseCoordinatorConfig({ vms: [{ name: "vm1", libvirt: { uri, domain: "vm1", peerUri: "qemu+tcp://host-b.example/system" } }] }, "c.json", "/etc");
    expect(c.vms[0]?.libvirt).toEqual({ uri, domain: "vm1", peerUri: "qemu+tcp://host-b.example/system" });
  });

  it.each([
    { what: "neither", input: { vms: [{ name: "vm1" }] }, err: /^c\.json: vms\[0\]\.qmpSocket: expected a non-empty string, got nothing; or give "libvirt": \{ "uri": \.\.\., "domain": \.\.\. \} instead$/ },
    { what: "both", input: { vms: [{ ...lv, qmpSocket: "/run/vm1.qmp" }] }, err: /^c\.json: vms\[0\]\.libvirt: give either qmpSocket or libvirt, not both$/ },
    { what: "an unknown key", input: { vms: [{ ...lv, libvirt: { ...lv.libvirt, socket: "/x" } }] }, err: /^c\.json: vms\[0\]\.libvirt\.socket: unknown key \(allowed here: uri, domain, peerUri\)$/ },
    { what: "no domain", input: { vms: [{ name: "vm1", libvirt: { uri: "qemu:///system" } }] }, err: /^c\.json: vms\[0\]\.libvirt\.domain: expected a non-empty string/ },
    { what: "a bad domain", input: { vms: [{ name: "vm1", libvirt: { uri: "qemu:///system", domain: "a b;c" } }] }, err: /^c\.json: vms\[0\]\.libvirt\.domain: "a b;c" must be a domain name/ },
    { what: "a bad URI", input: { vms: [{ name: "vm1", libvirt: { uri: "qemu:///system; rm -rf /", domain: "vm1" } }] }, err: /^c\.json: vms\[0\]\.libvirt\.uri: "qemu:\/\/\/system; rm -rf \/" is not a libvirt URI/ },
    { what: "a path as URI", input: { vms: [{ name: "vm1", libvirt: { uri: "/run/libvirt/libvirt-sock", domain: "vm1" } }] }, err: /vms\[0\]\.libvirt\.uri: .* is not a libvirt URI/ },
    { what: "a bad peer URI", input: { vms: [{ name: "vm1", libvirt: { uri: "qemu:///system", domain: "vm1", peerUri: "host-b" } }] }, err: /vms\[0\]\.libvirt\.peerUri: "host-b" is not a libvirt URI/ },
    { what: "libvirt not an object", input: { vms: [{ name: "vm1", libvirt: "qemu:///system" }] }, err: /^c\.json: vms\[0\]\.libvirt: / },
    {
      what: "the same domain twice",
      input: { vms: [lv, { ...lv, name: "vm2" }] },
      err: /^c\.json: vms\[1\]\.libvirt: libvirt domain guest-1 on qemu:\/\/\/system is used by another VM \(also vms\[0\]\.libvirt\)$/,
    },
  ])("refuses $what, naming the file and key", ({ input, err }) => {
    expect(errorOf(input)).toMatch(err);
  });

  it("the same domain name on two daemons is two VMs", () => {
    const c = parseCoordinatorConfig({ vms: [lv, { name: "vm2", libvirt: { uri: "qemu+unix:///system?socket=/tmp/b/libvirt-sock", domain: "guest-1" } }] }, "c.json", "/etc");
    expect(c.vms).toHaveLength(2);
  });
});
