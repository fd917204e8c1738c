import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { BalloonStrategy, MigrationMode, Phase } from "../../gen/ballast/v1/common_pb.js";
import { newRecord, recordToProto } from "../../coordinator/migration-record.js";
import { MigrationStore } from "../../coordinator/migration-store.js";
import { NotFoundError } from "../../shared/errors.js";
import { silentLogger } from "../../shared/logger.js";

const params = {
  vm: "vm1",
  destination: "127.0.0.1:7000",
  mode: MigrationMode.PRECOPY,
  strategy: BalloonStrategy.INFLATE_THEN_MIGRATE,
  maxBandwidthBytesPerSec: 1e8,
  downtimeLimitMs: 300,
  prepareDeadlineMs: 1000,
  postcopyAfterPasses: 1,
};
const dirs: string[] = [];
const tmp = () => {
  const d = mkdtempSync(join(tmpdir(), "ballast-store-"));
  dirs.push(d);
  return d;
};
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

describe("MigrationStore", () => {
  it("keeps records across a restart and marks interrupted ones FAILED", () => {
    const dir = tmp();
    const a = new MigrationStore({ stateDir: dir, logger: silentLogger() });
    const done = newRecord("done", params, 1);
    done.phase = Phase.COMPLETED;
    const running = newRecord("running", params, 2);
    running.phase = Phase.PRECOPY_PASS;
    running.balloonTargetBeforeBytes = 900;
    a.add(done);
    a.add(running);
    a.flush();

    const b = new MigrationStore({ stateDir: dir, logger: silentLogger() });
    expect(b.get("done").phase).toBe(Phase.COMPLETED);
    const r = b.get("running");
    expect(r.phase).toBe(Phase.FAILED);
    expect(r.error).toContain("coordinator restarted");
    expect(b.interrupted().map((x) => x.id)).toEqual(["running"]);
    expect(b.list().map((x) => x.id)).toEqual(["running", "done"]);
    expect(recordToProto(r).balloonTargetBeforeBytes).toBe(900n);
  });

  it("moves an unreadable file aside instead of overwriting it", () => {
    const dir = tmp();
    writeFileSync(join(dir, "migrations.json"), "{not json");
    const s = new MigrationStore({ stateDir: dir, logger: silentLogger() });
    expect(s.list()).toEqual([]);
    const aside = readdirSync(dir).find((f) => f.startsWith("migrations.json.corrupt-"));
    expect(aside).toBeDefined();
    expect(readFileSync(join(dir, aside as string), "utf8")).toBe("{not json");
  });

  it("drops the oldest finished records beyond the limit, never running ones", () => {
    const s = new MigrationStore({ stateDir: "", logger: silentLogger(), maxRecords: 2 });
    const old = newRecord("old", params, 1);
    old.phase = Phase.COMPLETED;
    const live = newRecord("live", params, 2);
    live.phase = Phase.PREPARE;
    s.add(old);
    s.add(live);
    s.add(newRecord("new", params, 3));
    expect(() => s.get("old")).toThrow(NotFoundError);
    expect(s.get("live").phase).toBe(Phase.PREPARE);
  });
});
