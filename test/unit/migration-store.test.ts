import Database from "better-sqlite3";
import { spawn } from "node:child_process";
import { randomFillSync } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterEach, describe, expect, it } from "vitest";
import { AgentState, BalloonStrategy, MigrationMode, Phase } from "../../gen/ballast/v1/common_pb.js";
import { foldRecord, type CreatedEvent } from "../../coordinator/migration-events.js";
import { recordToProto, type MigrationRecord } from "../../coordinator/migration-record.js";
import { APPLICATION_ID, MigrationStore, STORE_FILE } from "../../coordinator/migration-store.js";
import { FailedPreconditionError, InvalidArgumentError, NotFoundError, StateFileError } from "../../shared/errors.js";
import { silentLogger } from "../../shared/logger.js";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const CHILD = join(REPO, "test/helpers/store-kill-child.ts");

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
const created = (id: string, atMs: number, vm = "vm1"): CreatedEvent => ({ type: "created", atMs, id, direction: "outgoing", params: { ...params, vm } });

const dirs: string[] = [];
const stores: MigrationStore[] = [];
const tmp = () => {
  const d = mkdtempSync(join(tmpdir(), "ballast-store-"));
  dirs.push(d);
  return d;
};
const open = (stateDir: string, maxRecords?: number) => {
  const s = new MigrationStore({ stateDir, logger: silentLogger(), maxRecords });
  stores.push(s);
  return s;
};
/** The error a constructor throws, for several assertions on it. */
const openError = (stateDir: string): StateFileError => {
  try {
    open(stateDir);
  } catch (err) {
    expect(err).toBeInstanceOf(StateFileError);
    return err as StateFileError;
  }
  throw new Error("the store opened");
};
afterEach(() => {
  for (const s of stores.splice(0)) s.close();
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

describe("MigrationStore", () => {
  it("rebuilds records from the events after a reopen and leaves unfinished ones as they were", () => {
    const dir = tmp();
    const a = open(dir);
    a.create(created("done", 1));
    a.append("done", { type: "phase", atMs: 2, phase: Phase.PRECOPY_PASS, pass: 1 });
    a.append("done", { type: "final", atMs: 3, phase: Phase.COMPLETED, error: "" });
    a.create(created("running", 4));
    a.append("running", { type: "vm", atMs: 5, ramBytes: 2048, balloonTargetBeforeBytes: 900 });
    a.append("running", { type: "migrate-issued", atMs: 6 });
    const before = a.append("running", { type: "phase", atMs: 7, phase: Phase.PRECOPY_PASS, pass: 2 });
    a.close();

    const b = open(dir);
    expect(b.get("done").phase).toBe(Phase.COMPLETED);
    const r = b.get("running");
    expect(r).toEqual(before);
    expect(r).toMatchObject({ phase: Phase.PRECOPY_PASS, pass: 2, migrateIssued: true, error: "", updatedMs: 7 });
    expect(b.unfinished().map((x) => x.id)).toEqual(["running"]);
    expect(b.list().map((x) => x.id)).toEqual(["running", "done"]);
    expect(recordToProto(r).balloonTargetBeforeBytes).toBe(900n);
    expect(foldRecord(b.events("running"))).toEqual(r);
    expect(b.events("done").map((e) => e.type)).toEqual(["created", "phase", "final"]);
  });

  it("records a migration through every event type and reads the same back", () => {
    const dir = tmp();
    const a = open(dir);
    const stats = { status: "completed", totalTimeMs: 5, downtimeMs: 1, setupTimeMs: 1, transferredBytes: 1, remainingBytes: 0, totalBytes: 1, duplicatePages: 0, normalPages: 0, normalBytes: 0, dirtySyncCount: 1, postcopyRequests: 0, precopyBytes: 1, postcopyBytes: 0, postcopyBlocktimeMs: 0, mbps: 1.5, errorDesc: "", raw: { nested: [1, "x"] } };
    a.create(created("m", 10));
    a.append("m", { type: "vm", atMs: 11, ramBytes: 8, balloonTargetBeforeBytes: 4 });
    a.append("m", { type: "agent", atMs: 12, agentState: AgentState.READY });
    a.append("m", { type: "phase", atMs: 13, phase: Phase.PREPARE, pass: 0 });
    a.append("m", { type: "balloon", atMs: 14, targetBytes: 2, actualBytes: 3 });
    a.append("m", { type: "timing", atMs: 15, prepareMs: 100 });
    a.append("m", { type: "migrate-issued", atMs: 16 });
    a.append("m", { type: "progress", atMs: 17, transferredBytes: 1, remainingBytes: 2, totalBytes: 3 });
    a.append("m", { type: "timing", atMs: 18, migrateMs: 200 });
    a.append("m", { type: "stats", atMs: 19, side: "source", stats });
    a.append("m", { type: "final", atMs: 20, phase: Phase.FAILED, error: "boom" });
    a.append("m", { type: "final", atMs: 21, phase: Phase.COMPLETED, error: "" });
    const last = a.append("m", { type: "cleanup", atMs: 22, action: "balloon-restore", ok: true, detail: "" });
    expect(last).toMatchObject({ phase: Phase.FAILED, error: "boom", prepareMs: 100, migrateMs: 200, sourceStats: stats, agentState: AgentState.READY, cleanups: [{ action: "balloon-restore", ok: true, detail: "", atMs: 22 }] });
    a.close();
    const b = open(dir);
    expect(b.get("m")).toEqual(last);
    // Every event is kept, including the ignored second final.
    expect(b.events("m").map((e) => e.type)).toEqual(["created", "vm", "agent", "phase", "balloon", "timing", "migrate-issued", "progress", "timing", "stats", "final", "final", "cleanup"]);
    expect(b.events("m")[9]).toEqual({ type: "stats", atMs: 19, side: "source", stats });
  });

  it("keeps an event acknowledged by append across a real kill -9 of the writer", async () => {
    const dir = tmp();
    const child = spawn(process.execPath, ["--import", "tsx", CHILD, dir, "killed"], { cwd: REPO, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    child.stderr.on("data", (d: Buffer) => (err += d.toString()));
    const exited = new Promise<NodeJS.Signals | number | null>((resolve) => child.on("exit", (code, signal) => resolve(signal ?? code)));
    await new Promise<void>((resolve, reject) => {
      child.stdout.on("data", (d: Buffer) => {
        out += d.toString();
        if (out.includes("acked")) {
          // SIGKILL the moment the child says the append returned.
          child.kill("SIGKILL");
          resolve();
        }
      });
      child.on("exit", () => reject(new Error(`child exited before "acked": ${err}`)));
    });
    expect(await exited).toBe("SIGKILL");
    // The child died with the log open: its events sit in the WAL, not yet checkpointed by a close.
    expect(statSync(join(dir, `${STORE_FILE}-wal`)).size).toBeGreaterThan(0);

    const s = open(dir);
    expect(s.events("killed")).toEqual([
      created("killed", 1000),
      { type: "phase", atMs: 1001, phase: Phase.PRECOPY_PASS, pass: 3 },
    ]);
    expect(s.get("killed")).toMatchObject({ id: "killed", phase: Phase.PRECOPY_PASS, pass: 3, createdMs: 1000, updatedMs: 1001 });
    expect(s.unfinished().map((r) => r.id)).toEqual(["killed"]);
  }, 60_000);

  it("runs in WAL mode with synchronous=FULL and the exclusive lock", () => {
    const dir = tmp();
    open(dir).close();
    // Reopened too: the settings are per connection, not remembered by the file.
    expect(open(dir).durability()).toEqual({ journalMode: "wal", synchronous: "full", lockingMode: "exclusive" });
  });

  it("creates the file 0600 in a new 0700 directory and the WAL 0600", () => {
    const dir = join(tmp(), "state", "nested");
    const s = open(dir);
    s.create(created("m", 1));
    expect(statSync(join(dir, STORE_FILE)).mode & 0o777).toBe(0o600);
    expect(statSync(join(dir, `${STORE_FILE}-wal`)).mode & 0o777).toBe(0o600);
    expect(statSync(dir).mode & 0o777).toBe(0o700);
    expect(existsSync(join(dir, `${STORE_FILE}.init`))).toBe(false);
  });

  it("tightens a log that others can read to 0600", () => {
    const dir = tmp();
    open(dir).close();
    chmodSync(join(dir, STORE_FILE), 0o644);
    const s = open(dir);
    expect(statSync(join(dir, STORE_FILE)).mode & 0o777).toBe(0o600);
    s.create(created("m", 1));
  });

  describe("refuses, naming the file, and leaves it untouched:", () => {
    const cases: [string, (file: string) => void, RegExp][] = [
      ["random bytes", (f) => writeFileSync(f, randomFillSync(Buffer.alloc(8192))), /is not a SQLite database/],
      ["an empty file", (f) => writeFileSync(f, ""), /is empty/],
      [
        "a SQLite header over garbage",
        (f) => {
          const b = randomFillSync(Buffer.alloc(8192));
          Buffer.from("SQLite format 3\0", "latin1").copy(b);
          writeFileSync(f, b);
        },
        /SQLite|corrupt|database/,
      ],
      [
        "another program's SQLite database",
        (f) => {
          const db = new Database(f);
          db.exec("CREATE TABLE accounts (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO accounts (name) VALUES ('x')");
          db.close();
        },
        /not a Ballast migration log \(application_id 0, expected \d+; tables: accounts\)/,
      ],
      [
        "a SQLite database with another application_id",
        (f) => {
          const db = new Database(f);
          db.exec("PRAGMA application_id = 7; CREATE TABLE events (x)");
          db.close();
        },
        /application_id 7/,
      ],
      [
        "a log from a newer schema",
        (f) => {
          const db = new Database(f);
          db.exec(`PRAGMA application_id = ${APPLICATION_ID}; PRAGMA user_version = 99; CREATE TABLE events (x)`);
          db.close();
        },
        /schema 99 is newer/,
      ],
    ];
    it.each(cases)("%s", (_name, make, problem) => {
      const dir = tmp();
      const file = join(dir, STORE_FILE);
      make(file);
      chmodSync(file, 0o644);
      const before = readFileSync(file);
      const err = openError(dir);
      expect(err.message).toContain(file);
      expect(err.file).toBe(file);
      expect(err.message).toMatch(problem);
      // Not rewritten, not chmodded, not moved, no WAL left next to it.
      expect(readFileSync(file).equals(before)).toBe(true);
      expect(statSync(file).mode & 0o777).toBe(0o644);
      expect(readdirSync(dir)).toEqual([STORE_FILE]);
    });

    it("a directory in place of the file", () => {
      const dir = tmp();
      mkdirSync(join(dir, STORE_FILE));
      const err = openError(dir);
      expect(err.message).toBe(`${join(dir, STORE_FILE)}: is a directory, not the migration log file; remove it or point stateDir elsewhere`);
    });

    it("a state directory that is a file", () => {
      const dir = join(tmp(), "file");
      writeFileSync(dir, "x");
      expect(openError(dir).message).toContain(dir);
    });
  });

  it("refuses a second store on a directory that is open", () => {
    const dir = tmp();
    const a = open(dir);
    a.create(created("m", 1));
    expect(openError(dir).message).toMatch(/locked by another process/);
    a.append("m", { type: "phase", atMs: 2, phase: Phase.PREPARE, pass: 0 });
  });

  it("get, list, events and append on an unknown id", () => {
    const s = open("");
    s.create(created("a", 1, "vm1"));
    s.create(created("b", 2, "vm2"));
    s.create(created("c", 2, "vm1"));
    expect(() => s.get("x")).toThrow(new NotFoundError('no migration "x"'));
    expect(() => s.events("x")).toThrow(NotFoundError);
    expect(() => s.append("x", { type: "migrate-issued", atMs: 3 })).toThrow(NotFoundError);
    expect(() => s.create(created("a", 5))).toThrow(FailedPreconditionError);
    expect(s.list().map((r) => r.id)).toEqual(["c", "b", "a"]);
    expect(s.list("vm1").map((r) => r.id)).toEqual(["c", "a"]);
  });

  it("rejects events it could not read back", () => {
    const s = open("");
    s.create(created("a", 1));
    expect(() => s.append("a", { type: "final", atMs: 1.5, phase: Phase.FAILED, error: "" })).toThrow(InvalidArgumentError);
    expect(() => s.append("a", { type: "phase", atMs: 2, phase: Phase.COMPLETED, pass: 0 })).toThrow(/append a "final" event/);
    expect(s.events("a")).toHaveLength(1);
  });

  it("emits update with each new record; records are frozen snapshots", () => {
    const s = open("");
    const seen: MigrationRecord[] = [];
    s.on("update", (r: MigrationRecord) => seen.push(r));
    const r0 = s.create(created("a", 1));
    const r1 = s.append("a", { type: "progress", atMs: 2, transferredBytes: 1, remainingBytes: 2, totalBytes: 3 });
    expect(seen).toEqual([r0, r1]);
    expect(r0.transferredBytes).toBe(0);
    expect(Object.isFrozen(r1)).toBe(true);
    expect(() => {
      (r1 as { phase: Phase }).phase = Phase.FAILED;
    }).toThrow(TypeError);
  });

  it("an update listener that throws does not make append look failed", () => {
    const s = open("");
    s.on("update", () => {
      throw new Error("listener bug");
    });
    expect(s.create(created("a", 1)).id).toBe("a");
    expect(s.events("a")).toHaveLength(1);
  });

  it("keeps at most maxRecords finished migrations, never dropping unfinished ones", () => {
    const dir = tmp();
    const s = open(dir, 2);
    s.create(created("old-live", 1));
    for (const [i, id] of ["f1", "f2", "f3"].entries()) {
      s.create(created(id, 10 + i));
      s.append(id, { type: "final", atMs: 20 + i, phase: Phase.COMPLETED, error: "" });
    }
    s.create(created("new-live", 30));
    expect(() => s.get("f1")).toThrow(NotFoundError);
    expect(s.list().map((r) => r.id)).toEqual(["new-live", "f3", "f2", "old-live"]);
    s.close();

    // Events are gone from disk too; a smaller limit trims on open.
    const raw = new Database(join(dir, STORE_FILE), { readonly: true });
    expect(raw.prepare("SELECT DISTINCT migration_id AS id FROM events ORDER BY id").all()).toEqual([{ id: "f2" }, { id: "f3" }, { id: "new-live" }, { id: "old-live" }]);
    raw.close();
    const t = open(dir, 0);
    expect(t.list().map((r) => r.id)).toEqual(["new-live", "old-live"]);
    expect(t.unfinished().map((r) => r.id)).toEqual(["old-live", "new-live"]);
  });

  it("refuses a log of its own with a damaged page, naming the file", () => {
    const dir = tmp();
    const s = open(dir);
    s.create(created("m", 1));
    s.close();
    const file = join(dir, STORE_FILE);
    // Bulk rows in one transaction (2000 fsynced appends would only slow the test down).
    const raw = new Database(file);
    const ins = raw.prepare("INSERT INTO events (migration_id, at_ms, type, body) VALUES ('m', ?, 'progress', ?)");
    raw.transaction(() => {
      for (let i = 0; i < 2000; i++) ins.run(2 + i, JSON.stringify({ transferredBytes: i, remainingBytes: 0, totalBytes: 0 }));
    })();
    raw.close();
    const bytes = readFileSync(file);
    expect(bytes.length).toBeGreaterThan(20 * 4096);
    // Scribble over pages in the middle (header and schema page stay intact).
    randomFillSync(bytes, 8 * 4096, 8 * 4096);
    writeFileSync(file, bytes);
    const err = openError(dir);
    expect(err.message).toContain(file);
    expect(err.message).toMatch(/corrupt|malformed/);
  });

  it("refuses a log whose migration does not start with created", () => {
    const dir = tmp();
    open(dir).close();
    const file = join(dir, STORE_FILE);
    const raw = new Database(file);
    raw.prepare("INSERT INTO events (migration_id, at_ms, type, body) VALUES ('m', 1, 'phase', '{\"phase\":1,\"pass\":0}')").run();
    raw.close();
    const err = openError(dir);
    expect(err.message).toContain(file);
    expect(err.message).toMatch(/migration "m" starts with event 1 of type "phase"/);
  });

  // 10,000 fsynced commits take seconds: run with BALLAST_STORE_BENCH=1.
  it.runIf(process.env.BALLAST_STORE_BENCH)("measures appends of bursty progress events (printed, not asserted)", () => {
    const dir = tmp();
    const s = open(dir);
    s.create(created("burst", 1));
    const n = 10_000;
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < n; i++) s.append("burst", { type: "progress", atMs: 2 + i, transferredBytes: i * 4096, remainingBytes: (n - i) * 4096, totalBytes: n * 4096 });
    const ms = Number(process.hrtime.bigint() - t0) / 1e6;
    const size = statSync(join(dir, STORE_FILE)).size + (existsSync(join(dir, `${STORE_FILE}-wal`)) ? statSync(join(dir, `${STORE_FILE}-wal`)).size : 0);
    s.close();
    const t1 = process.hrtime.bigint();
    const reopened = open(dir);
    const loadMs = Number(process.hrtime.bigint() - t1) / 1e6;
    expect(reopened.get("burst").transferredBytes).toBe((n - 1) * 4096);
    console.log(`[migration-store] ${n} progress appends: ${ms.toFixed(0)} ms, ${((ms * 1000) / n).toFixed(1)} us/append; db+wal ${(size / 1024).toFixed(0)} KiB; reopen+fold ${loadMs.toFixed(1)} ms`);
  }, 120_000);
});
