/**
 * parseQueryMigrate against answers captured from QEMU 7.2 (test/fixtures/qmp,
 * each file says how it was captured) and against malformed answers.
 */
import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { parseQueryMigrate, type MigrateStats } from "../../coordinator/qemu.js";
import { InvalidArgumentError } from "../../shared/errors.js";

function fixture(name: string): unknown {
  const url = new URL(`../fixtures/qmp/query-migrate-${name}.json`, import.meta.url);
  return (JSON.parse(readFileSync(url, "utf8")) as { answer: unknown }).answer;
}

describe("parseQueryMigrate on real QEMU 7.2 answers", () => {
  const cases: Array<{ name: string; expect: Partial<MigrateStats> }> = [
    { name: "none", expect: { status: "none", totalTimeMs: 0, transferredBytes: 0, errorDesc: "" } },
    { name: "setup", expect: { status: "setup", totalTimeMs: 0, transferredBytes: 0, mbps: 0 } },
    {
      name: "active-precopy",
      expect: { status: "active", totalTimeMs: 1553, setupTimeMs: 1, downtimeMs: 0, transferredBytes: 501016, remainingBytes: 4096, totalBytes: 134750208, duplicatePages: 32847, normalPages: 50, normalBytes: 204800, dirtySyncCount: 1, mbps: 2.628 },
    },
    {
      name: "completed-precopy-paused-source",
      // A paused source sends everything as "downtime" bytes: precopy-bytes stays 0 in 7.2.
      expect: { status: "completed", totalTimeMs: 1608, downtimeMs: 2, setupTimeMs: 1, transferredBytes: 505139, remainingBytes: 0, dirtySyncCount: 3, precopyBytes: 0, postcopyBytes: 0, postcopyRequests: 0, normalPages: 51 },
    },
    {
      name: "completed-precopy-running-source",
      expect: { status: "completed", totalTimeMs: 312, downtimeMs: 10, transferredBytes: 799918, precopyBytes: 602583, postcopyBytes: 0, postcopyRequests: 0 },
    },
    {
      name: "postcopy-active-source",
      expect: { status: "postcopy-active", postcopyRequests: 294, precopyBytes: 7510636, postcopyBytes: 52334919, transferredBytes: 59845555, remainingBytes: 63365120, dirtySyncCount: 2 },
    },
    {
      name: "completed-postcopy-source",
      expect: { status: "completed", totalTimeMs: 1621, downtimeMs: 1, postcopyRequests: 918, precopyBytes: 7510636, postcopyBytes: 115827911, transferredBytes: 123338547, postcopyBlocktimeMs: 0 },
    },
    {
      name: "completed-postcopy-destination",
      expect: { status: "completed", postcopyBlocktimeMs: 24, transferredBytes: 0, totalTimeMs: 0, postcopyRequests: 0 },
    },
    { name: "destination-after-incoming", expect: { status: "none", transferredBytes: 0 } },
    { name: "destination-active", expect: { status: "active", transferredBytes: 0 } },
    { name: "destination-completed-precopy", expect: { status: "completed", postcopyBlocktimeMs: 0 } },
    {
      name: "failed",
      expect: { status: "failed", errorDesc: expect.stringContaining("Connection refused") as unknown as string, transferredBytes: 0 },
    },
    { name: "cancelled", expect: { status: "cancelled", errorDesc: "" } },
  ];

  it.each(cases)("$name", ({ name, expect: want }) => {
    const raw = fixture(name);
    const stats = parseQueryMigrate(raw);
    expect(stats).toMatchObject(want);
    expect(stats.raw).toBe(raw);
    // Every numeric field is a finite number whatever the section layout.
    for (const [k, v] of Object.entries(stats)) {
      if (k === "status" || k === "errorDesc" || k === "raw") continue;
      expect(Number.isFinite(v), k).toBe(true);
    }
  });

  it("keeps a completed total-time of 0 as 0 (QEMU 7.2 sometimes reports it) rather than inventing a value", () => {
    const real = fixture("completed-postcopy-source") as Record<string, unknown>;
    const stats = parseQueryMigrate({ ...real, "total-time": 0 });
    expect(stats.status).toBe("completed");
    expect(stats.totalTimeMs).toBe(0);
    expect(stats.transferredBytes).toBe(123338547);
  });

  it("keeps fractional mbps", () => {
    expect(parseQueryMigrate(fixture("completed-postcopy-source")).mbps).toBeCloseTo(609.4684, 3);
  });
});

describe("parseQueryMigrate on malformed answers", () => {
  const good = fixture("completed-postcopy-source") as Record<string, unknown>;
  const goodRam = good.ram as Record<string, unknown>;
  const cases: Array<{ label: string; raw: unknown; field: RegExp }> = [
    { label: "null", raw: null, field: /expected an object, got null/ },
    { label: "array", raw: [], field: /expected an object, got an array/ },
    { label: "string", raw: "completed", field: /expected an object/ },
    { label: "status is a number", raw: { ...good, status: 3 }, field: /status must be a string/ },
    { label: "ram is a string", raw: { ...good, ram: "x" }, field: /ram: expected an object/ },
    { label: "ram.transferred is a string", raw: { ...good, ram: { ...goodRam, transferred: "123" } }, field: /ram\.transferred must be an integer, got string "123"/ },
    { label: "ram.postcopy-requests is null", raw: { ...good, ram: { ...goodRam, "postcopy-requests": null } }, field: /ram\.postcopy-requests must be an integer, got null/ },
    { label: "ram.total is fractional", raw: { ...good, ram: { ...goodRam, total: 1.5 } }, field: /ram\.total must be an integer/ },
    { label: "ram.mbps is a string", raw: { ...good, ram: { ...goodRam, mbps: "fast" } }, field: /ram\.mbps must be a number/ },
    { label: "ram.mbps is NaN", raw: { ...good, ram: { ...goodRam, mbps: Number.NaN } }, field: /ram\.mbps must be a number/ },
    { label: "total-time is a string", raw: { ...good, "total-time": "1621" }, field: /total-time must be an integer/ },
    { label: "postcopy-blocktime is a boolean", raw: { status: "completed", "postcopy-blocktime": true }, field: /postcopy-blocktime must be an integer/ },
    { label: "error-desc is an object", raw: { status: "failed", "error-desc": { msg: "x" } }, field: /error-desc must be a string/ },
  ];

  it.each(cases)("$label → InvalidArgumentError naming the field", ({ raw, field }) => {
    let caught: unknown;
    try {
      parseQueryMigrate(raw);
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(InvalidArgumentError);
    expect((caught as InvalidArgumentError).code).toBe("invalid-argument");
    expect((caught as Error).message).toMatch(/^query-migrate/);
    expect((caught as Error).message).toMatch(field);
  });

  it("ignores fields it does not map (e.g. 7.2's socket-address, xbzrle-cache)", () => {
    const stats = parseQueryMigrate({ status: "active", "socket-address": "anything", "xbzrle-cache": 5, ram: { transferred: 10 } });
    expect(stats).toMatchObject({ status: "active", transferredBytes: 10, remainingBytes: 0 });
  });
});
