// Fuzzing the kernel-text parsers (agent/procfs.ts) and the collector (agent/sample.ts) with hostile input:
// arbitrary text, mutated real captures, huge/negative/NaN-ish tokens, duplicated keys, truncated lines.
// Property: a ProcParseError with a message, or a result whose every number is finite (a safe integer
// except the PSI averages) and agrees with an independent reading of the text.
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { afterAll, describe, expect, it } from "vitest";
import { ProcParseError } from "../../agent/errors.js";
import { PAGE_SIZE, lineValue, parseMeminfo, parsePsi, parseSysctlInt, parseVirtioFeatureBit, parseVmstat, parseZoneinfo } from "../../agent/procfs.js";
import { Collector, sampleProblem } from "../../agent/sample.js";

const RUNS = 10_000;
const FIXTURES = "test/fixtures/proc";
const captures = readdirSync(FIXTURES, { withFileTypes: true })
  .filter((d) => d.isDirectory() && existsSync(join(FIXTURES, d.name, "meminfo")))
  .map((d) => d.name)
  .sort();
const read = (dir: string, file: string) => readFileSync(join(FIXTURES, dir, file), "utf8");
const texts = (file: string) => captures.map((c) => read(c, file));

const tmpDirs: string[] = [];
afterAll(() => {
  for (const d of tmpDirs) rmSync(d, { recursive: true, force: true });
});

/** Every number in `v`, recursively, with its path. */
function numbers(v: unknown, path = "", out: Array<[string, number]> = []): Array<[string, number]> {
  if (typeof v === "number") out.push([path, v]);
  else if (typeof v === "object" && v !== null) for (const [k, x] of Object.entries(v)) numbers(x, path ? `${path}.${k}` : k, out);
  return out;
}

/** Fails unless every number is finite and, unless `isFloat(path)`, a non-negative safe integer. */
function expectSaneNumbers(v: unknown, isFloat: (path: string) => boolean = () => false): void {
  for (const [path, n] of numbers(v)) {
    if (isFloat(path)) {
      if (!Number.isFinite(n) || n < 0) throw new Error(`${path} = ${n} is not a finite non-negative number`);
    } else if (!Number.isSafeInteger(n) || n < 0) {
      throw new Error(`${path} = ${n} is not a non-negative safe integer`);
    }
  }
}

/** Runs `parse`; a thrown error must be a ProcParseError with a message. Returns the result or undefined. */
function attempt<T>(parse: () => T): T | undefined {
  try {
    return parse();
  } catch (err) {
    if (!(err instanceof ProcParseError)) throw new Error(`not a ProcParseError: ${String(err)}`, { cause: err });
    expect(err.message.length).toBeGreaterThan(0);
    return undefined;
  }
}

// ---- generators ----------------------------------------------------------------

/** Tokens a hostile or broken kernel view could put where a number belongs. */
const hostileToken = fc.oneof(
  fc.constantFrom(
    "",
    " ",
    "-1",
    "-0",
    "+5",
    "NaN",
    "nan",
    "Infinity",
    "-Infinity",
    "1e400",
    "1e3",
    "0x10",
    "0b1",
    "1.5",
    ".5",
    "5.",
    "1_000",
    "٣", // an Arabic-Indic digit: \d in JS regexes is ASCII-only, but check
    "9007199254740991",
    "9007199254740992",
    "9007199254740993",
    "8796093022208", // 2^43: times 1024 just reaches 2^53
    "8796093022207",
    "18446744073709551615",
    "99999999999999999999999999999999",
    "1".repeat(400),
    "1".repeat(400) + ".5",
    "0".repeat(50) + "7",
    "100.01",
    "100.00",
    "\u0000",
  ),
  fc.nat().map(String),
  fc.bigInt({ min: 0n, max: 1n << 70n }).map(String),
  fc.integer().map(String),
  fc.double().map(String),
  fc.string({ maxLength: 6 }),
);

type Mutation =
  | { kind: "value"; line: number; token: string }
  | { kind: "duplicate"; line: number; token: string }
  | { kind: "truncate-line"; line: number; at: number }
  | { kind: "delete"; line: number }
  | { kind: "insert"; line: number; text: string }
  | { kind: "cut-file"; at: number }
  | { kind: "unit"; line: number; unit: string };

const mutation: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ kind: fc.constant("value" as const), line: fc.nat(), token: hostileToken }),
  fc.record({ kind: fc.constant("duplicate" as const), line: fc.nat(), token: hostileToken }),
  fc.record({ kind: fc.constant("truncate-line" as const), line: fc.nat(), at: fc.nat() }),
  fc.record({ kind: fc.constant("delete" as const), line: fc.nat() }),
  fc.record({ kind: fc.constant("insert" as const), line: fc.nat(), text: fc.string({ maxLength: 40, unit: "binary" }) }),
  fc.record({ kind: fc.constant("cut-file" as const), at: fc.nat() }),
  fc.record({ kind: fc.constant("unit" as const), line: fc.nat(), unit: fc.constantFrom("", "kB", "KB", "kb", "MB", "pages", "kB kB", " kB", "kB\r") }),
);

/** Replaces the first run of digits-ish after the key with `token` (or the last token of the line). */
function replaceValue(line: string, token: string): string {
  const m = /^(\s*[^\s:=]+[:\s=]\s*)(\S*)(.*)$/.exec(line);
  return m ? `${m[1]}${token}${m[3]}` : `${line} ${token}`;
}

function applyMutations(text: string, ms: readonly Mutation[]): string {
  let lines = text.split("\n");
  for (const m of ms) {
    const i = lines.length === 0 ? 0 : ("line" in m ? m.line : 0) % lines.length;
    const line = lines[i] ?? "";
    switch (m.kind) {
      case "value":
        lines[i] = replaceValue(line, m.token);
        break;
      case "duplicate": // the same key again, earlier or later, with another value
        lines.splice(m.line % 2 === 0 ? 0 : lines.length, 0, replaceValue(line, m.token));
        break;
      case "truncate-line":
        lines[i] = line.slice(0, m.at % (line.length + 1));
        break;
      case "delete":
        lines.splice(i, 1);
        break;
      case "insert":
        lines.splice(i, 0, m.text);
        break;
      case "cut-file": {
        const joined = lines.join("\n");
        lines = joined.slice(0, m.at % (joined.length + 1)).split("\n");
        break;
      }
      case "unit":
        lines[i] = line.replace(/\s+kB\s*$/, m.unit === "" ? "" : ` ${m.unit}`);
        break;
    }
  }
  return lines.join("\n");
}

/** A real capture of `file`, mutated; or arbitrary text; or a tiny hand-built file with hostile values. */
function hostileText(file: string, keys: readonly string[], sep: string, unit = ""): fc.Arbitrary<string> {
  const real = texts(file);
  const mutated = fc.tuple(fc.constantFrom(...real), fc.array(mutation, { minLength: 1, maxLength: 4 })).map(([t, ms]) => applyMutations(t, ms));
  const built = fc
    .array(fc.tuple(fc.constantFrom(...keys), hostileToken, fc.boolean()), { maxLength: keys.length + 3 })
    .map((rows) => rows.map(([k, v, withUnit]) => `${k}${sep}${v}${withUnit ? unit : ""}`).join("\n"));
  const complete = fc
    .tuple(fc.shuffledSubarray([...keys], { minLength: keys.length, maxLength: keys.length }), fc.array(hostileToken, { minLength: keys.length, maxLength: keys.length }))
    .map(([ks, vs]) => ks.map((k, j) => `${k}${sep}${vs[j]}${unit}`).join("\n"));
  return fc.oneof(
    { weight: 4, arbitrary: mutated },
    { weight: 2, arbitrary: complete },
    { weight: 1, arbitrary: built },
    { weight: 1, arbitrary: fc.string({ maxLength: 200, unit: "binary" }) },
  );
}

const MEMINFO_KEYS = ["MemTotal", "MemFree", "MemAvailable", "Buffers", "Cached", "Active(file)", "Inactive(file)", "AnonPages", "Mapped", "Shmem", "Dirty", "Writeback", "SwapTotal", "SwapFree", "Balloon"];
const VMSTAT_KEYS = ["pgmajfault", "workingset_refault_file", "workingset_refault_anon", "pswpin", "pswpout", "oom_kill", "balloon_inflate", "balloon_deflate", "nr_balloon_pages"];

/** An independent reading of `key` in `text`: the first line `key` + `sep`, as the parsers document. */
function firstLine(text: string, key: string, sep: string): string | undefined {
  for (const line of text.split("\n")) if (line.startsWith(key + sep)) return line.slice(key.length + sep.length);
  return undefined;
}

// ---- targets -------------------------------------------------------------------

describe("fuzz: agent/procfs.ts", () => {
  it(`parseMeminfo: ProcParseError or exact bytes from the first line of each key (${RUNS} cases)`, () => {
    const camel: Record<string, string> = { "Active(file)": "activeFile", "Inactive(file)": "inactiveFile", AnonPages: "anonPages" };
    const nameOf = (k: string) => camel[k] ?? k[0]!.toLowerCase() + k.slice(1);
    fc.assert(
      fc.property(hostileText("meminfo", MEMINFO_KEYS, ":      ", " kB"), (text) => {
        const m = attempt(() => parseMeminfo(text));
        if (!m) return;
        expectSaneNumbers(m);
        for (const key of MEMINFO_KEYS) {
          const raw = firstLine(text, key, ":");
          const got = (m as unknown as Record<string, number | undefined>)[nameOf(key)];
          if (raw === undefined) {
            expect(key === "Balloon" && got === undefined).toBe(true);
            continue;
          }
          const mm = /^\s*(\d+)\s+kB\s*$/.exec(raw);
          expect(mm, `${key}: ${JSON.stringify(raw)} accepted`).not.toBeNull();
          expect(got).toBe(Number(mm![1]) * 1024);
        }
      }),
      { numRuns: RUNS },
    );
  });

  it(`parseVmstat: ProcParseError or the exact counters (${RUNS} cases)`, () => {
    const nameOf = (k: string) => k.replace(/_(.)/g, (_, c: string) => c.toUpperCase());
    fc.assert(
      fc.property(hostileText("vmstat", VMSTAT_KEYS, " "), (text) => {
        const v = attempt(() => parseVmstat(text));
        if (!v) return;
        expectSaneNumbers(v);
        for (const key of VMSTAT_KEYS) {
          const raw = firstLine(text, key, " ");
          const got = (v as unknown as Record<string, number | undefined>)[nameOf(key)];
          if (raw === undefined) continue;
          expect(/^\s*\d+\s*$/.test(raw), `${key}: ${JSON.stringify(raw)} accepted`).toBe(true);
          expect(got).toBe(Number(raw.trim()));
        }
      }),
      { numRuns: RUNS },
    );
  });

  it(`parsePsi: ProcParseError or averages in [0, 100] and safe totals (${RUNS} cases)`, () => {
    const line = (kind: string) =>
      fc
        .tuple(hostileToken, hostileToken, hostileToken, hostileToken, fc.boolean())
        .map(([a, b, c, t, extra]) => `${kind} avg10=${a} avg60=${b} avg300=${c} total=${t}${extra ? " avg10=1.00" : ""}`);
    const psiText = fc.oneof(
      fc.tuple(line("some"), line("full")).map(([s, f]) => `${s}\n${f}\n`),
      fc.tuple(fc.constantFrom(...texts("pressure/memory")), fc.array(mutation, { minLength: 1, maxLength: 3 })).map(([t, ms]) => applyMutations(t, ms)),
      fc.string({ maxLength: 120, unit: "binary" }),
    );
    fc.assert(
      fc.property(psiText, (text) => {
        const p = attempt(() => parsePsi(text));
        if (!p) return;
        expectSaneNumbers(p, (path) => /avg/.test(path));
        for (const l of [p.some, p.full]) for (const a of [l.avg10, l.avg60, l.avg300]) expect(a).toBeLessThanOrEqual(100);
      }),
      { numRuns: RUNS },
    );
  });

  it(`parseZoneinfo: ProcParseError or page-exact watermark sums (${RUNS} cases)`, () => {
    const zone = fc
      .tuple(hostileToken, hostileToken, hostileToken, fc.boolean())
      .map(([min, low, high, pcp]) => `Node 0, zone   Normal\n  pages free     1\n        min      ${min}\n        low      ${low}\n        high     ${high}\n${pcp ? "              high:  42\n" : ""}`);
    const zoneText = fc.oneof(
      fc.array(zone, { minLength: 1, maxLength: 4 }).map((zs) => zs.join("")),
      fc.tuple(fc.constantFrom(...texts("zoneinfo")), fc.array(mutation, { minLength: 1, maxLength: 4 })).map(([t, ms]) => applyMutations(t, ms)),
      fc.string({ maxLength: 120, unit: "binary" }),
    );
    fc.assert(
      fc.property(zoneText, (text) => {
        const z = attempt(() => parseZoneinfo(text));
        if (!z) return;
        expectSaneNumbers(z);
        for (const v of [z.minBytes, z.lowBytes, z.highBytes]) expect(v % PAGE_SIZE).toBe(0);
      }),
      { numRuns: RUNS },
    );
  });

  it(`parseSysctlInt, parseVirtioFeatureBit, lineValue: errors are ProcParseErrors, values exact (${RUNS} cases)`, () => {
    fc.assert(
      fc.property(fc.oneof(hostileToken, fc.string({ maxLength: 40, unit: "binary" })), fc.nat({ max: 70 }), fc.constantFrom(...MEMINFO_KEYS), (text, bit, key) => {
        const n = attempt(() => parseSysctlInt(text, "/proc/sys/vm/min_free_kbytes", "min_free_kbytes"));
        if (n !== undefined) {
          expectSaneNumbers({ n });
          expect(BigInt(n)).toBe(BigInt(text.trim()));
        }
        const b = attempt(() => parseVirtioFeatureBit(text, bit, "features"));
        if (b !== undefined) expect(b).toBe(text.trim()[bit] === "1");
        const v = lineValue(`${text}\n${key}:${text}`, key, ":");
        expect(typeof v).toBe("string");
      }),
      { numRuns: RUNS },
    );
  });
});

describe("fuzz: agent/sample.ts Collector", () => {
  it(`collect(): ProcParseError, or a sample that passes sampleProblem with RAM parts within MemTotal (${RUNS} cases)`, () => {
    // tmpfs when there is one: 50,000 small writes on a disk-backed /tmp take over a minute here.
    const root = mkdtempSync(join(existsSync("/dev/shm") ? "/dev/shm" : tmpdir(), "ballast-fuzz-sample-"));
    tmpDirs.push(root);
    mkdirSync(join(root, "pressure"), { recursive: true });
    mkdirSync(join(root, "sys/vm"), { recursive: true });
    const files = fc.record({
      meminfo: hostileText("meminfo", MEMINFO_KEYS, ":      ", " kB"),
      vmstat: fc.oneof({ weight: 3, arbitrary: fc.constantFrom(...texts("vmstat")) }, { weight: 1, arbitrary: hostileText("vmstat", VMSTAT_KEYS, " ") }),
      psi: fc.option(fc.constantFrom(...texts("pressure/memory"), "some avg10=1e400 avg60=0 avg300=0 total=1\nfull avg10=0 avg60=0 avg300=0 total=0\n")),
      zoneinfo: fc.option(fc.oneof(fc.constantFrom(...texts("zoneinfo")), hostileText("zoneinfo", ["  min", "  low", "  high"], " "))),
      minFree: hostileToken,
      wsf: fc.option(hostileToken),
    });
    fc.assert(
      fc.property(files, (f) => {
        writeFileSync(join(root, "meminfo"), f.meminfo);
        writeFileSync(join(root, "vmstat"), f.vmstat);
        if (f.psi === null) rmSync(join(root, "pressure/memory"), { force: true });
        else writeFileSync(join(root, "pressure/memory"), f.psi);
        if (f.zoneinfo === null) rmSync(join(root, "zoneinfo"), { force: true });
        else writeFileSync(join(root, "zoneinfo"), f.zoneinfo);
        writeFileSync(join(root, "sys/vm/min_free_kbytes"), f.minFree);
        if (f.wsf === null) rmSync(join(root, "sys/vm/watermark_scale_factor"), { force: true });
        else writeFileSync(join(root, "sys/vm/watermark_scale_factor"), f.wsf);
        const s = attempt(() => new Collector({ procRoot: root, sysRoot: join(root, "nosys"), now: () => 1, monotonic: () => 1 }).collect());
        if (!s) return;
        expectSaneNumbers(s, (path) => /^psi\..*avg/.test(path));
        expect(sampleProblem(s)).toBeUndefined();
        const m = s.meminfo;
        expect(m.memTotal).toBeGreaterThan(0);
        for (const v of [m.memFree, m.memAvailable, m.cached, m.activeFile, m.mapped]) expect(v).toBeLessThanOrEqual(m.memTotal);
      }),
      { numRuns: RUNS },
    );
  });
});

// Counterexamples the fuzzing above found, kept as plain regression tests.
describe("fuzz regressions: agent/procfs.ts", () => {
  it("a meminfo value whose kB count is safe but whose byte count is not is refused (was 2^53 + 1024 bytes, an unsafe integer)", () => {
    const text = read("debian-6.1-guest", "meminfo").replace(/^MemTotal:.*$/m, "MemTotal:       9007199254740991 kB");
    expect(() => parseMeminfo(text)).toThrow(ProcParseError);
    expect(() => parseMeminfo(text)).toThrow(/MemTotal: value out of range/);
  });

  it("a PSI average of 400 digits is refused (was Infinity)", () => {
    const text = `some avg10=${"1".repeat(400)} avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n`;
    expect(() => parsePsi(text)).toThrow(/some avg10: value out of range/);
    expect(() => parsePsi(text.replace("1".repeat(400), "100.01"))).toThrow(ProcParseError);
    expect(parsePsi(text.replace("1".repeat(400), "100.00")).some.avg10).toBe(100);
  });

  it("zone watermarks whose page sum times 4096 leaves the safe range are refused (was an unsafe integer)", () => {
    const text = `Node 0, zone   Normal\n        min      9007199254740991\n        low      1\n        high     1\n`;
    expect(() => parseZoneinfo(text)).toThrow(/min: value out of range/);
    const two = `Node 0, zone DMA\n  min 9007199254740991\n  low 1\n  high 1\nNode 0, zone Normal\n  min 9007199254740991\n  low 1\n  high 1\n`;
    expect(() => parseZoneinfo(two)).toThrow(ProcParseError);
  });
});
