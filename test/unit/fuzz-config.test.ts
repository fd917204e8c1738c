// Fuzzing the config parsers: coordinator/config.ts parseCoordinatorConfig and agent/config.ts
// applyConfigObject (what loadConfigFile runs on the parsed JSON), with arbitrary JSON values and with
// mutations of valid configs (examples/*.json). Property: a ConfigError with a message, or a config
// whose every number is a safe integer (finite for the agent's fractions) within its documented range.
import { readFileSync } from "node:fs";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { applyConfigObject, defaultConfig } from "../../agent/config.js";
import { coordinatorConfigSchema, parseCoordinatorConfig } from "../../coordinator/config.js";
import { parseConfig } from "../../shared/config-schema.js";
import { ConfigError } from "../../shared/errors.js";
import { MAX_SIZE_BYTES } from "../../shared/units.js";

const RUNS = 10_000;
const COORDINATOR_EXAMPLE = JSON.parse(readFileSync("examples/coordinator.json", "utf8")) as Record<string, unknown>;
const AGENT_EXAMPLE = JSON.parse(readFileSync("examples/agent.json", "utf8")) as Record<string, unknown>;
/** Every key the agent file knows, with a valid value, so mutations start from a config that exercises them all. */
const AGENT_FULL = {
  ...AGENT_EXAMPLE,
  channel: "tcp",
  procRoot: "/proc",
  sysRoot: "/sys",
  sampleIntervalMs: 1000,
  fastSampleIntervalMs: 200,
  reportIntervalMs: 5000,
  dropCaches: true,
  logLevel: "info",
  hardFloor: "256MiB",
  tuning: { maxShrinkStepBytes: "64MiB", shrinkHoldSamples: 3, prepareActiveFileKeep: 0.5, psiSomeThresholdPct: 10, alignBytes: 4096 },
};

/** Values with hostile numbers and size strings mixed in. */
const hostileNumber = fc.oneof(
  fc.constantFrom(0, -0, -1, 0.5, 1e-300, 2 ** 31, 2 ** 32, 2 ** 53 - 1, 2 ** 53, 2 ** 53 + 2, 2 ** 64, 1e300, -1e300, 1e12, 1e12 + 1, MAX_SIZE_BYTES, MAX_SIZE_BYTES + 1, 65535, 65536, Infinity, -Infinity, NaN),
  fc.integer(),
  fc.double(),
);
const hostileString = fc.oneof(
  fc.constantFrom("", " ", "0", "-1", "1e3", "512MiB", "1.5GiB", "0.1GiB", "1PiB", "1.0000000001PiB", "2PiB", "9".repeat(70), "1".repeat(64) + "B", "NaN", "Infinity", "0x10", "127.0.0.1:0", "[::1]:50050", "host:99999", "a b:1", "qemu:///system", "..", "/", "\u0000", "__proto__"),
  fc.string({ maxLength: 16 }),
  fc.nat().map((n) => `${n}MiB`),
);
const jsonValue: fc.Arbitrary<unknown> = fc.letrec((tie) => ({
  value: fc.oneof(
    { depthSize: "small" },
    fc.constant(null),
    fc.boolean(),
    hostileNumber,
    hostileString,
    fc.array(tie("value"), { maxLength: 3 }),
    fc.dictionary(fc.oneof(fc.string({ maxLength: 8 }), fc.constantFrom("__proto__", "constructor", "toString", "vms", "name", "tuning")), tie("value"), { maxKeys: 4 }),
  ),
})).value;

/** A path of keys/indexes into `v` (picked by the numbers in `choice`) and a new value, or a deletion. */
type Edit = { choice: number[]; value: unknown; del: boolean };
const edit: fc.Arbitrary<Edit> = fc.record({ choice: fc.array(fc.nat(), { minLength: 1, maxLength: 4 }), value: jsonValue, del: fc.boolean() });

function applyEdit(root: unknown, e: Edit): unknown {
  if (typeof root !== "object" || root === null) return e.value;
  let node = root as Record<string, unknown>;
  for (let i = 0; i < e.choice.length; i++) {
    const keys = Object.keys(node);
    if (keys.length === 0) break;
    const key = keys[e.choice[i]! % keys.length]!;
    const child = node[key];
    const last = i === e.choice.length - 1 || typeof child !== "object" || child === null;
    if (last) {
      if (e.del && !Array.isArray(node)) delete node[key];
      else node[key] = e.value;
      break;
    }
    node = child as Record<string, unknown>;
  }
  return root;
}

const mutated = (base: unknown) =>
  fc.array(edit, { minLength: 1, maxLength: 3 }).map((edits) => edits.reduce<unknown>((v, e) => applyEdit(v, e), structuredClone(base)));

function numbers(v: unknown, path = "", out: Array<[string, number]> = []): Array<[string, number]> {
  if (typeof v === "number") out.push([path, v]);
  else if (typeof v === "object" && v !== null) for (const [k, x] of Object.entries(v)) numbers(x, path ? `${path}.${k}` : k, out);
  return out;
}

function expectConfigError(err: unknown): void {
  if (!(err instanceof ConfigError)) throw new Error(`not a ConfigError: ${String(err)}`, { cause: err });
  expect(err.message.length).toBeGreaterThan(0);
}

describe("fuzz: coordinator/config.ts parseCoordinatorConfig", () => {
  // parseCoordinatorConfig is parseConfig over coordinatorConfigSchema(baseDir), and building that zod
  // schema costs ~10 ms: the bulk of the cases reuse one (same code path), a few go through the function itself.
  const schema = coordinatorConfigSchema("/etc/ballast");
  const parsers: ReadonlyArray<readonly [string, number, (v: unknown) => unknown]> = [
    ["parseConfig(coordinatorConfigSchema(...))", RUNS, (v) => parseConfig(schema, v, "fuzz.json")],
    ["parseCoordinatorConfig", 200, (v) => parseCoordinatorConfig(v, "fuzz.json", "/etc/ballast")],
  ];
  it.each(parsers)(`%s: ConfigError, or a config of safe integers within range (%i cases)`, (_name, runs, parse) => {
    const input = fc.oneof({ weight: 3, arbitrary: mutated(COORDINATOR_EXAMPLE) }, { weight: 1, arbitrary: mutated({ vms: [{ name: "a", qmpSocket: "a.qmp" }, { name: "b", libvirt: { uri: "qemu:///system", domain: "b" } }] }) }, { weight: 1, arbitrary: jsonValue });
    fc.assert(
      fc.property(input, (value) => {
        let c;
        try {
          c = parse(value) as ReturnType<typeof parseCoordinatorConfig>;
        } catch (err) {
          expectConfigError(err);
          return;
        }
        for (const [path, n] of numbers(c)) expect(Number.isSafeInteger(n) && n >= 0, `${path} = ${n}`).toBe(true);
        expect(c.defaults.maxBandwidthBytesPerSec).toBeGreaterThanOrEqual(1000);
        for (const vm of c.vms) {
          expect(vm.floorBytes).toBeGreaterThanOrEqual(16 * 1024 * 1024);
          expect(vm.floorBytes).toBeLessThanOrEqual(MAX_SIZE_BYTES);
          expect(vm.maxBytes === 0 || vm.maxBytes >= vm.floorBytes).toBe(true);
          expect(vm.agentPort).toBeLessThanOrEqual(65535);
          expect(vm.qmpSocket !== "" || vm.libvirt !== undefined).toBe(true);
        }
        expect(new Set(c.vms.map((v) => v.name)).size).toBe(c.vms.length);
      }),
      { numRuns: runs },
    );
  });
});

describe("fuzz: agent/config.ts applyConfigObject", () => {
  const FRACTIONS = new Set(["policy.prepareActiveFileKeep", "policy.bootReservedFraction", "policy.psiSomeThresholdPct"]);
  it(`ConfigError, or a config of safe integers (finite fractions) within range (${RUNS} cases)`, () => {
    const base = defaultConfig();
    const baseNumbers = new Map(numbers(base));
    const input = fc.oneof({ weight: 3, arbitrary: mutated(AGENT_FULL) }, { weight: 1, arbitrary: mutated(AGENT_EXAMPLE) }, { weight: 1, arbitrary: jsonValue });
    fc.assert(
      fc.property(input, (value) => {
        let c;
        try {
          c = applyConfigObject(base, value, "fuzz.json");
        } catch (err) {
          expectConfigError(err);
          return;
        }
        for (const [path, n] of numbers(c)) {
          if (FRACTIONS.has(path)) expect(Number.isFinite(n) && n >= 0 && n <= 100, `${path} = ${n}`).toBe(true);
          else if (baseNumbers.has(path) && !Number.isInteger(baseNumbers.get(path))) expect(Number.isFinite(n), `${path} = ${n}`).toBe(true);
          else expect(Number.isSafeInteger(n) && n >= 0, `${path} = ${n}`).toBe(true);
        }
        for (const size of [c.policy.reserveBytes, c.policy.hardFloorBytes, c.policy.maxShrinkStepBytes, c.policy.alignBytes]) expect(size).toBeLessThanOrEqual(MAX_SIZE_BYTES);
        expect(c.sampleIntervalMs).toBeGreaterThanOrEqual(50);
        expect(["auto", "virtio-serial", "tcp"]).toContain(c.channel);
      }),
      { numRuns: RUNS },
    );
  });
});

// Found while fuzzing and NOT fixed here (shared/strict-config.ts is not this change's file): the agent's
// config messages describe a bad value with JSON.stringify, which overflows the stack on a value nested
// some thousands deep, so the agent dies with a RangeError instead of naming the key. The coordinator's
// zod parser describes objects without stringifying them. Flip to a plain it() once describe() is guarded.
describe("known bug: a deeply nested agent config value", () => {
  const deep = JSON.parse(`${'{"a":'.repeat(6000)}1${"}".repeat(6000)}`) as unknown;
  it("reserve = a 6000-deep object: a ConfigError naming the key", () => {
    expect(() => applyConfigObject(defaultConfig(), { reserve: deep }, "agent.json")).toThrow(ConfigError);
  });
  it("the coordinator's parser already says what is wrong", () => {
    expect(() => parseCoordinatorConfig({ hostId: deep, vms: [] }, "c.json", "/etc")).toThrow(/hostId: expected a non-empty string, got an object/);
  });
});
