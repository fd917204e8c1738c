// Parsers and the collector, on real procfs captures and on malformed variants of them.
import { cpSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { ProcParseError } from "../../agent/errors.js";
import {
  PAGE_SIZE,
  VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
  parseMeminfo,
  parsePsi,
  parseSysctlInt,
  parseVirtioFeatureBit,
  parseVmstat,
  parseZoneinfo,
} from "../../agent/procfs.js";
import { Collector } from "../../agent/sample.js";

const FIXTURES = "test/fixtures/proc";
const HOST = join(FIXTURES, "host-debian12");
const HOST_SYS = join(FIXTURES, "host-debian12-sys");
const KiB = 1024;
const MiB = 1024 * KiB;

// Every capture folder with a meminfo: the host capture now, real guest captures as they land.
const captures = readdirSync(FIXTURES, { withFileTypes: true })
  .filter((d) => d.isDirectory() && existsSync(join(FIXTURES, d.name, "meminfo")))
  .map((d) => d.name)
  .sort();

const read = (dir: string, file: string) => readFileSync(join(FIXTURES, dir, file), "utf8");

const tmpDirs: string[] = [];
function tmp(): string {
  const d = mkdtempSync(join(tmpdir(), "ballast-agent-procfs-"));
  tmpDirs.push(d);
  return d;
}
afterAll(() => {
  for (const d of tmpDirs) rmSync(d, { recursive: true, force: true });
});

describe("real captures", () => {
  it("includes the host capture and the Debian 6.1 guest captures", () => {
    expect(captures).toContain("host-debian12");
    expect(captures.filter((c) => c.startsWith("debian-6.1-guest")).length).toBeGreaterThanOrEqual(1);
  });

  describe.each(captures)("%s", (dir) => {
    it("parses meminfo with sane relations", () => {
      const m = parseMeminfo(read(dir, "meminfo"));
      expect(m.memTotal).toBeGreaterThan(256 * MiB);
      expect(m.memFree).toBeLessThanOrEqual(m.memTotal);
      expect(m.memAvailable).toBeLessThanOrEqual(m.memTotal);
      expect(m.activeFile + m.inactiveFile).toBeLessThanOrEqual(m.memTotal);
      for (const v of Object.values(m)) expect(v! % KiB).toBe(0);
    });

    it("parses vmstat: mandatory counters present, balloon counters in 4 KiB pages", () => {
      const v = parseVmstat(read(dir, "vmstat"));
      expect(v.pgmajfault).toBeGreaterThan(0);
      expect(v.oomKill).toBeGreaterThanOrEqual(0);
      // Debian's kernels (host and guest) build CONFIG_MEMORY_BALLOON.
      expect(v.balloonInflate).toBeTypeOf("number");
      expect(v.balloonDeflate! <= v.balloonInflate!).toBe(true);
    });

    it("parses pressure/memory", () => {
      const p = parsePsi(read(dir, "pressure/memory"));
      expect(p.some.avg10).toBeGreaterThanOrEqual(0);
      expect(p.full.totalUs).toBeLessThanOrEqual(p.some.totalUs);
    });
  });

  it("debian-6.1 guest: no Balloon line in meminfo (6.1 predates it); the ballooned capture holds 512 MiB", () => {
    const idle = parseMeminfo(read("debian-6.1-guest", "meminfo"));
    expect(idle.balloon).toBeUndefined();
    expect(idle.memTotal).toBe(981700 * KiB);
    const v = parseVmstat(read("debian-6.1-guest-ballooned", "vmstat"));
    expect(v.nrBalloonPages).toBeUndefined();
    expect(((v.balloonInflate ?? 0) - (v.balloonDeflate ?? 0)) * PAGE_SIZE).toBe(512 * MiB);
    // deflate-on-oom: MemTotal did not shrink when inflated.
    expect(parseMeminfo(read("debian-6.1-guest-ballooned", "meminfo")).memTotal).toBe(idle.memTotal);
  });

  it("host zoneinfo: sums zone watermarks, skipping per-cpu 'high:' lines; zone min sums to min_free_kbytes", () => {
    const z = parseZoneinfo(read("host-debian12", "zoneinfo"));
    const minFree = parseSysctlInt(read("host-debian12", "sys/vm/min_free_kbytes"), "min_free_kbytes", "min_free_kbytes") * KiB;
    // Empty zones (Movable) still carry a token watermark of a few dozen pages.
    expect(Math.abs(z.minBytes - minFree)).toBeLessThanOrEqual(64 * PAGE_SIZE);
    expect(z.lowBytes).toBeGreaterThan(z.minBytes);
    expect(z.highBytes).toBeGreaterThan(z.lowBytes);
    // Pageset "high:" values are thousands of pages per CPU; summing them would blow this up.
    expect(z.highBytes).toBeLessThan(2 * minFree);
  });

  it("host virtio features: bit 2 (deflate-on-oom) as the kernel prints it", () => {
    const path = join(HOST_SYS, "bus/virtio/drivers/virtio_balloon/virtio0/features");
    expect(parseVirtioFeatureBit(readFileSync(path, "utf8"), VIRTIO_BALLOON_F_DEFLATE_ON_OOM, path)).toBe(true);
    expect(parseVirtioFeatureBit("0100\n", VIRTIO_BALLOON_F_DEFLATE_ON_OOM, path)).toBe(false);
  });
});

type Mutation = { name: string; file: "meminfo" | "vmstat" | "pressure/memory" | "zoneinfo"; edit: (text: string) => string; field: string };

const replaceLine = (prefix: string, line: string) => (text: string) => text.split("\n").map((l) => (l.startsWith(prefix) ? line : l)).join("\n");
const dropLine = (prefix: string) => (text: string) => text.split("\n").filter((l) => !l.startsWith(prefix)).join("\n");

const parsers: Record<Mutation["file"], (text: string, file: string) => unknown> = {
  meminfo: parseMeminfo,
  vmstat: parseVmstat,
  "pressure/memory": parsePsi,
  zoneinfo: parseZoneinfo,
};

const mutations: Mutation[] = [
  { name: "missing field", file: "meminfo", edit: dropLine("MemAvailable:"), field: "MemAvailable" },
  { name: "non-numeric value", file: "meminfo", edit: replaceLine("MemFree:", "MemFree:        12x45 kB"), field: "MemFree" },
  { name: "truncated line (no value)", file: "meminfo", edit: replaceLine("Cached:", "Cached:"), field: "Cached" },
  { name: "truncated file mid-key", file: "meminfo", edit: (t) => t.slice(0, t.indexOf("Active(file)") + 7), field: "Active(file)" },
  { name: "wrong unit", file: "meminfo", edit: replaceLine("MemTotal:", "MemTotal:       24000 MB"), field: "MemTotal" },
  { name: "missing unit", file: "meminfo", edit: replaceLine("Mapped:", "Mapped:         31596"), field: "Mapped" },
  { name: "negative value", file: "meminfo", edit: replaceLine("Dirty:", "Dirty:          -4 kB"), field: "Dirty" },
  { name: "missing counter", file: "vmstat", edit: dropLine("pgmajfault "), field: "pgmajfault" },
  { name: "non-numeric counter", file: "vmstat", edit: replaceLine("oom_kill ", "oom_kill many"), field: "oom_kill" },
  { name: "truncated counter line", file: "vmstat", edit: replaceLine("workingset_refault_file ", "workingset_refault_file"), field: "workingset_refault_file" },
  { name: "malformed optional counter", file: "vmstat", edit: replaceLine("balloon_inflate ", "balloon_inflate 1.5"), field: "balloon_inflate" },
  { name: "missing full line", file: "pressure/memory", edit: dropLine("full "), field: "full" },
  { name: "non-numeric avg10", file: "pressure/memory", edit: replaceLine("some ", "some avg10=abc avg60=0.00 avg300=0.00 total=0"), field: "some avg10" },
  { name: "missing total", file: "pressure/memory", edit: replaceLine("full ", "full avg10=0.00 avg60=0.00 avg300=0.00"), field: "full total" },
  { name: "zone without high watermark", file: "zoneinfo", edit: (t) => t.replace(/\n\s+high\s+\d+\n/, "\n"), field: "high" },
  { name: "non-numeric watermark", file: "zoneinfo", edit: (t) => t.replace(/\n(\s+)low(\s+)\d+\n/, "\n$1low$2lots\n"), field: "low" },
];

describe("malformed input names the file and the field", () => {
  it.each(mutations)("$file: $name", ({ file, edit, field }) => {
    const original = read("host-debian12", file);
    const mutated = edit(original);
    expect(mutated).not.toBe(original);
    const path = `/fixture/${file}`;
    let caught: unknown;
    try {
      parsers[file](mutated, path);
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(ProcParseError);
    const e = caught as ProcParseError;
    expect(e.file).toBe(path);
    expect(e.field).toBe(field);
    expect(e.message).toContain(path);
    expect(e.message).toContain(field);
  });

  it.each([
    ["min_free_kbytes", () => parseSysctlInt("lots\n", "/p/sys/vm/min_free_kbytes", "min_free_kbytes")],
    ["features", () => parseVirtioFeatureBit("01x1\n", 2, "/s/features")],
  ])("%s", (field, fn) => {
    expect(fn).toThrow(ProcParseError);
    expect(fn).toThrow(field);
  });
});

describe("Collector", () => {
  it("reads a complete sample from the host fixture (zoneinfo watermarks, sysfs deflate-on-oom)", () => {
    let t = 1000;
    const c = new Collector({ procRoot: HOST, sysRoot: HOST_SYS, now: () => 1_700_000_000_000, monotonic: () => t++ });
    const s = c.collect();
    expect(s.timestampMs).toBe(1_700_000_000_000);
    expect(s.meminfo.memTotal).toBe(parseMeminfo(read("host-debian12", "meminfo")).memTotal);
    expect(s.psi).toBeDefined();
    expect(s.watermarks.source).toBe("zoneinfo");
    expect(s.balloon).toMatchObject({ deflateOnOom: true, source: "meminfo", bytes: 0 });
    expect(c.hasPsi()).toBe(true);
    expect(c.bootId()).toMatch(/^[0-9a-f-]{36}$/);
  });

  it("on a Debian 6.1 guest capture: balloon from vmstat counters, watermarks from zoneinfo, deflate-on-oom from sysfs", () => {
    const proc = join(FIXTURES, "debian-6.1-guest-ballooned");
    const s = new Collector({ procRoot: proc, sysRoot: `${proc}-sys` }).collect();
    expect(s.balloon).toEqual({ bytes: 512 * MiB, source: "vmstat-counters", deflateOnOom: true });
    expect(s.watermarks.source).toBe("zoneinfo");
    const minFree = parseSysctlInt(read("debian-6.1-guest-ballooned", "sys/vm/min_free_kbytes"), "min_free_kbytes", "min_free_kbytes") * KiB;
    expect(Math.abs(s.watermarks.minFreeBytes - minFree)).toBeLessThanOrEqual(64 * PAGE_SIZE);
    expect(s.watermarks.highBytes).toBeGreaterThan(s.watermarks.minFreeBytes);
  });

  it("on a Debian 6.1 guest capture without zoneinfo: watermarks estimated from the captured min_free_kbytes", () => {
    const root = tmp();
    cpSync(join(FIXTURES, "debian-6.1-guest-ballooned"), root, { recursive: true });
    rmSync(join(root, "zoneinfo"));
    const s = new Collector({ procRoot: root, sysRoot: join(FIXTURES, "debian-6.1-guest-ballooned-sys") }).collect();
    const minFree = parseSysctlInt(read("debian-6.1-guest-ballooned", "sys/vm/min_free_kbytes"), "min_free_kbytes", "min_free_kbytes") * KiB;
    expect(s.watermarks.source).toBe("estimate");
    expect(s.watermarks.minFreeBytes).toBe(minFree);
    // high = min + 2 * max(min/4, managed * wsf / 10000); on a 1 GiB guest min/4 wins: 1.5 * min.
    expect(s.watermarks.highBytes).toBe(minFree * 1.5);
    // The estimate lands near what the kernel computed per zone.
    const zones = parseZoneinfo(read("debian-6.1-guest-ballooned", "zoneinfo"));
    expect(Math.abs(s.watermarks.highBytes - zones.highBytes)).toBeLessThanOrEqual(MiB);
  });

  it("PSI is optional: without the file the sample is still complete", () => {
    const root = tmp();
    cpSync(HOST, root, { recursive: true });
    rmSync(join(root, "pressure"), { recursive: true });
    const c = new Collector({ procRoot: root, sysRoot: "/nonexistent" });
    const s = c.collect();
    expect(s.psi).toBeUndefined();
    expect(s.balloon.deflateOnOom).toBeUndefined();
    expect(c.hasPsi()).toBe(false);
  });

  it.each([
    ["meminfo", "(file)"],
    ["vmstat", "(file)"],
  ])("a missing %s refuses the sample", (file, field) => {
    const root = tmp();
    cpSync(HOST, root, { recursive: true });
    rmSync(join(root, file));
    const c = new Collector({ procRoot: root });
    expect(() => c.collect()).toThrow(ProcParseError);
    try {
      c.collect();
    } catch (err) {
      expect((err as ProcParseError).file).toBe(join(root, file));
      expect((err as ProcParseError).field).toBe(field);
    }
  });

  it("no zoneinfo and no min_free_kbytes refuses the sample (the reserve would be unknown)", () => {
    const root = tmp();
    cpSync(join(FIXTURES, "debian-6.1-guest"), root, { recursive: true });
    rmSync(join(root, "zoneinfo"));
    rmSync(join(root, "sys/vm/min_free_kbytes"));
    expect(() => new Collector({ procRoot: root }).collect()).toThrow(/min_free_kbytes/);
  });

  it("stays well under 1 ms per sample", () => {
    const c = new Collector({ procRoot: HOST, sysRoot: HOST_SYS });
    c.collect();
    const n = 200;
    const start = process.cpuUsage();
    for (let i = 0; i < n; i++) c.collect();
    const used = process.cpuUsage(start);
    const perSampleMs = (used.user + used.system) / 1000 / n;
    expect(perSampleMs).toBeLessThan(1);
  });
});
