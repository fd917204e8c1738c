/**
 * Durable migration history: an append-only event log in SQLite
 * (`<stateDir>/migrations.sqlite`), from which the records are folded
 * (migration-events.ts).
 *
 * - `append` writes the event in its own transaction before it returns
 *   (WAL, `synchronous=FULL`: the WAL is fsynced at every commit), so an
 *   event is on disk once acknowledged; a `kill -9` right after loses
 *   nothing. Nothing is deferred in the process.
 * - On open every record is rebuilt from its events. Migrations without a
 *   final event are reported by `unfinished()`; the caller decides what to
 *   do with them (resume, cancel the QEMU migration, restore the balloon).
 * - The file is only ever created by this class (0600, in a 0700 directory
 *   when it creates that too) and is never moved or overwritten: anything
 *   unexpected in its place (not SQLite, corrupt, empty, another program's
 *   database, a directory) is a {@link StateFileError} naming the file.
 * - The connection holds SQLite's exclusive lock for its lifetime, so a
 *   second coordinator on the same state directory fails at start instead
 *   of interleaving its own view of the history (and `sqlite3` cannot read
 *   the file while the coordinator runs).
 */
import Database from "better-sqlite3";
import { EventEmitter } from "node:events";
import { chmodSync, closeSync, fsyncSync, linkSync, mkdirSync, openSync, readSync, statSync, unlinkSync, type Stats } from "node:fs";
import { join } from "node:path";
import { Phase } from "../gen/ballast/v1/common_pb.js";
import { FailedPreconditionError, InvalidArgumentError, NotFoundError, StateFileError, errorMessage } from "../shared/errors.js";
import type { Logger } from "../shared/logger.js";
import { EVENT_TYPES, applyEvent, applyEventInPlace, recordFromCreated, type CreatedEvent, type MigrationEvent } from "./migration-events.js";
import { FINAL_PHASES, isFinal, type MigrationRecord } from "./migration-record.js";

/** Options for {@link MigrationStore}. */
export interface MigrationStoreOptions {
  /** Directory for migrations.sqlite; "" keeps the log in memory only (SQLite ":memory:"). */
  stateDir: string;
  logger: Logger;
  /** Finished migrations kept at most; the oldest go first, unfinished ones never. Default 1000. */
  maxRecords?: number;
}

/** Name of the log file inside the state directory. */
export const STORE_FILE = "migrations.sqlite";
/** `PRAGMA application_id` of a Ballast migration log ("Blst"). */
export const APPLICATION_ID = 0x426c7374;
/** `PRAGMA user_version`: the schema this build writes and reads. */
export const SCHEMA_VERSION = 1;

const SQLITE_HEADER = Buffer.from("SQLite format 3\0", "latin1");
/** How long to wait for a lock held by another process before giving up. */
const LOCK_WAIT_MS = 1000;

const SCHEMA = `
  CREATE TABLE events (
    seq INTEGER PRIMARY KEY,
    migration_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL CHECK (json_valid(body))
  ) STRICT;
  CREATE INDEX events_by_migration ON events (migration_id, seq);
`;

interface EventRow {
  seq: number;
  migration_id: string;
  at_ms: number;
  type: string;
  body: string;
}

/**
 * Keeps migration records as an event log. Emits `update` with the new
 * record after every append. Records it returns are frozen snapshots.
 */
export class MigrationStore extends EventEmitter {
  /** The database path, or ":memory:". */
  readonly file: string;
  private readonly db: Database.Database;
  private readonly log: Logger;
  private readonly maxRecords: number;
  /** Records in creation order (Map order = order of their `created` events). */
  private readonly records = new Map<string, MigrationRecord>();
  private readonly insert: Database.Statement<[string, number, string, string]>;
  private readonly selectOne: Database.Statement<[string], EventRow>;
  private readonly deleteOne: Database.Statement<[string]>;
  private closed = false;

  constructor(options: MigrationStoreOptions) {
    super();
    this.setMaxListeners(0);
    this.log = options.logger.child({ component: "migration-store" });
    this.maxRecords = options.maxRecords ?? 1000;
    if (!(this.maxRecords >= 0)) throw new InvalidArgumentError(`maxRecords must be >= 0, got ${this.maxRecords}`);
    if (options.stateDir) {
      this.file = join(options.stateDir, STORE_FILE);
      this.db = openFile(options.stateDir, this.file, this.log);
    } else {
      this.file = ":memory:";
      this.db = new Database(":memory:");
      this.db.exec(SCHEMA);
    }
    try {
      this.insert = this.db.prepare("INSERT INTO events (migration_id, at_ms, type, body) VALUES (?, ?, ?, ?)");
      this.selectOne = this.db.prepare("SELECT seq, migration_id, at_ms, type, body FROM events WHERE migration_id = ? ORDER BY seq");
      this.deleteOne = this.db.prepare("DELETE FROM events WHERE migration_id = ?");
      this.load();
      this.trim();
    } catch (err) {
      this.db.close();
      throw err instanceof StateFileError ? err : new StateFileError(this.file, describeSqliteError(err), { cause: err });
    }
  }

  /** Starts a migration's log with its `created` event; FailedPreconditionError if the id exists. */
  create(event: CreatedEvent): MigrationRecord {
    if (typeof event.id !== "string" || event.id === "") throw new InvalidArgumentError("a migration id must be a non-empty string");
    if (this.records.has(event.id)) throw new FailedPreconditionError(`migration ${JSON.stringify(event.id)} already exists`);
    const stored = this.write(event.id, event);
    const r = freeze(recordFromCreated(stored as CreatedEvent));
    this.records.set(r.id, r);
    this.notify(r);
    return r;
  }

  /**
   * Appends an event to a migration's log. Durable when it returns (this is
   * the acknowledged point); then folds it into the record, emits `update`
   * and returns the record. NotFoundError for an unknown id; a `created`
   * event goes to {@link create}.
   */
  append(id: string, event: MigrationEvent): MigrationRecord {
    if (event.type === "created") {
      if (event.id !== id) throw new InvalidArgumentError(`created event for ${JSON.stringify(event.id)} appended to ${JSON.stringify(id)}`);
      return this.create(event);
    }
    const current = this.get(id);
    if (event.type === "phase" && FINAL_PHASES.has(event.phase)) {
      throw new InvalidArgumentError(`phase ${Phase[event.phase]} ends a migration: append a "final" event instead`);
    }
    const stored = this.write(id, event);
    const next = applyEvent(current, stored);
    const r = next === current ? current : freeze(next);
    this.records.set(id, r);
    if (r !== current && stored.type === "final") this.trim();
    this.notify(r);
    return r;
  }

  /** The record, or NotFoundError. */
  get(id: string): MigrationRecord {
    const r = this.records.get(id);
    if (!r) throw new NotFoundError(`no migration ${JSON.stringify(id)}`);
    return r;
  }

  /** All records, newest first, optionally of one VM. */
  list(vm?: string): MigrationRecord[] {
    const all = [...this.records.values()].reverse().filter((r) => !vm || r.vm === vm);
    // Stable sort: records created in the same ms keep newest-first.
    return all.sort((a, b) => b.createdMs - a.createdMs);
  }

  /** Records with no final event, oldest first: what a restarted coordinator has to look after. */
  unfinished(): MigrationRecord[] {
    return [...this.records.values()].filter((r) => !isFinal(r));
  }

  /** A migration's events as stored, oldest first; NotFoundError for an unknown id. */
  events(id: string): MigrationEvent[] {
    this.get(id);
    return this.selectOne.all(id).map((row) => this.decode(row));
  }

  /** The connection's durability settings as SQLite reports them (for logs and tests). */
  durability(): { journalMode: string; synchronous: "off" | "normal" | "full" | "extra"; lockingMode: string } {
    const sync = this.db.pragma("synchronous", { simple: true }) as number;
    return {
      journalMode: String(this.db.pragma("journal_mode", { simple: true })),
      synchronous: (["off", "normal", "full", "extra"] as const)[sync] ?? "off",
      lockingMode: String(this.db.pragma("locking_mode", { simple: true })),
    };
  }

  /** Closes the database (checkpoints the WAL). Idempotent; the store is unusable afterwards. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.db.close();
  }

  /** Writes one event in its own (fsynced) transaction; returns the event as it will read back. */
  private write(id: string, event: MigrationEvent): MigrationEvent {
    if (this.closed) throw new FailedPreconditionError(`migration store ${this.file} is closed`);
    if (!Number.isSafeInteger(event.atMs)) throw new InvalidArgumentError(`event atMs must be an integer (Unix ms), got ${String(event.atMs)}`);
    const { type, atMs, ...rest } = event;
    let body: string;
    try {
      body = JSON.stringify(rest);
    } catch (err) {
      throw new InvalidArgumentError(`${type} event for migration ${JSON.stringify(id)} is not JSON: ${errorMessage(err)}`);
    }
    try {
      this.insert.run(id, atMs, type, body);
    } catch (err) {
      // Not stored: the caller must not treat the event as acknowledged.
      throw new StateFileError(this.file, `cannot append a ${type} event for migration ${JSON.stringify(id)}: ${errorMessage(err)}`, { cause: err });
    }
    // Fold what a restart would read, so memory never differs from disk.
    return { ...(JSON.parse(body) as object), type, atMs } as MigrationEvent;
  }

  private decode(row: EventRow): MigrationEvent {
    if (!EVENT_TYPES.has(row.type)) {
      throw new StateFileError(this.file, `event ${row.seq} of migration ${JSON.stringify(row.migration_id)} has unknown type ${JSON.stringify(row.type)}`);
    }
    let body: unknown;
    try {
      body = JSON.parse(row.body);
    } catch (err) {
      throw new StateFileError(this.file, `event ${row.seq} of migration ${JSON.stringify(row.migration_id)}: ${errorMessage(err)}`);
    }
    if (typeof body !== "object" || body === null || Array.isArray(body)) {
      throw new StateFileError(this.file, `event ${row.seq} of migration ${JSON.stringify(row.migration_id)}: body is not a JSON object`);
    }
    // The parsed object is ours: tag it in place (a spread copy per event doubles the load time).
    const e = body as { type: string; atMs: number };
    e.type = row.type;
    e.atMs = row.at_ms;
    return e as MigrationEvent;
  }

  /** Rebuilds every record from the log. */
  private load(): void {
    const building = new Map<string, MigrationRecord>();
    let count = 0;
    for (const row of this.db.prepare<[], EventRow>("SELECT seq, migration_id, at_ms, type, body FROM events ORDER BY seq").iterate()) {
      const e = this.decode(row);
      count++;
      const r = building.get(row.migration_id);
      if (!r) {
        if (e.type !== "created" || e.id !== row.migration_id) {
          throw new StateFileError(this.file, `migration ${JSON.stringify(row.migration_id)} starts with event ${row.seq} of type "${e.type}", not its "created" event`);
        }
        building.set(row.migration_id, recordFromCreated(e));
      } else {
        applyEventInPlace(r, e);
      }
    }
    for (const [id, r] of building) this.records.set(id, freeze(r));
    if (this.file !== ":memory:") {
      this.log.info({ file: this.file, migrations: this.records.size, events: count, unfinished: this.unfinished().length, ...this.durability() }, "migration log loaded");
    }
  }

  /** Deletes the oldest finished migrations beyond maxRecords, events and all, in one transaction. */
  private trim(): void {
    const finished = [...this.records.values()].filter(isFinal);
    const excess = finished.length - this.maxRecords;
    if (excess <= 0) return;
    const victims = finished.sort((a, b) => a.createdMs - b.createdMs).slice(0, excess);
    this.db.transaction(() => {
      for (const r of victims) this.deleteOne.run(r.id);
    })();
    for (const r of victims) this.records.delete(r.id);
    this.log.debug({ dropped: victims.length }, "old migrations trimmed");
  }

  /** Emits `update`; a throwing listener is logged, not passed to the appender (whose event is already stored). */
  private notify(r: MigrationRecord): void {
    try {
      this.emit("update", r);
    } catch (err) {
      this.log.error({ id: r.id, err: errorMessage(err) }, "migration update listener threw");
    }
  }
}

function freeze(r: MigrationRecord): MigrationRecord {
  Object.freeze(r.phases);
  Object.freeze(r.balloonTimeline);
  Object.freeze(r.cleanups);
  return Object.freeze(r);
}

/** Opens (or creates) the log file, checks that it is ours, and configures the connection. */
function openFile(stateDir: string, file: string, log: Logger): Database.Database {
  try {
    mkdirSync(stateDir, { recursive: true, mode: 0o700 });
  } catch (err) {
    throw new StateFileError(stateDir, `cannot create the state directory: ${errorMessage(err)}`, { cause: err });
  }
  let st: Stats | undefined;
  try {
    st = statSync(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw new StateFileError(file, `cannot stat: ${errorMessage(err)}`, { cause: err });
  }
  if (!st) createFile(file, log);
  else checkExisting(file, st);
  let db: Database.Database;
  try {
    db = new Database(file, { fileMustExist: true, timeout: LOCK_WAIT_MS });
  } catch (err) {
    throw new StateFileError(file, `cannot open as SQLite: ${errorMessage(err)}`, { cause: err });
  }
  try {
    // Exclusive before the first read: the lock is then held for the connection's life and the WAL
    // index lives in memory (no -shm file). Then look before changing anything (switching a foreign
    // database to WAL would already modify it).
    db.pragma("locking_mode = EXCLUSIVE");
    verify(db, file);
    if (st) tightenMode(file, log);
    configure(db);
    // Damage in a page the load does not read (e.g. the index) would otherwise surface at some later query.
    const problems = (db.pragma("quick_check(3)") as { quick_check: string }[]).map((r) => r.quick_check);
    if (problems.join() !== "ok") throw new StateFileError(file, `is corrupt (SQLite quick_check: ${problems.join("; ")}); it is left as it is`);
  } catch (err) {
    db.close();
    if (err instanceof StateFileError) throw err;
    throw new StateFileError(file, describeSqliteError(err), { cause: err });
  }
  return db;
}

/** WAL, an fsync at every commit, and the write lock taken now (the connection is in exclusive locking mode). */
function configure(db: Database.Database): void {
  const mode = db.pragma("journal_mode = WAL", { simple: true });
  if (mode !== "wal") throw new Error(`SQLite refused WAL mode (journal_mode is ${String(mode)})`);
  db.pragma("synchronous = FULL");
  // Take the write lock now: a second coordinator on this directory fails here, not at its first append.
  db.exec("BEGIN EXCLUSIVE; COMMIT");
}

/** Checks that an opened database is a Ballast migration log of a schema this build reads. */
function verify(db: Database.Database, file: string): void {
  const appId = db.pragma("application_id", { simple: true }) as number;
  const version = db.pragma("user_version", { simple: true }) as number;
  const tables = db.prepare<[], { name: string }>("SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name").all().map((t) => t.name);
  if (appId !== APPLICATION_ID) {
    throw new StateFileError(
      file,
      `is a SQLite database but not a Ballast migration log (application_id ${appId}, expected ${APPLICATION_ID}; tables: ${tables.join(", ") || "none"}); ` +
        `move it away or point stateDir elsewhere`,
    );
  }
  if (version > SCHEMA_VERSION) {
    throw new StateFileError(file, `migration log schema ${version} is newer than this build reads (${SCHEMA_VERSION}); run a newer Ballast`);
  }
  if (version < 1 || !tables.includes("events")) {
    throw new StateFileError(file, `migration log is incomplete (schema ${version}, tables: ${tables.join(", ") || "none"})`);
  }
}

/** Checks an existing path before SQLite touches it. */
function checkExisting(file: string, st: Stats): void {
  if (st.isDirectory()) throw new StateFileError(file, "is a directory, not the migration log file; remove it or point stateDir elsewhere");
  if (!st.isFile()) throw new StateFileError(file, "is not a regular file");
  if (st.size === 0) {
    throw new StateFileError(
      file,
      "is empty (0 bytes), but a migration log is never empty once created: it was truncated or made by something else; it is left as it is — remove it to start a new log",
    );
  }
  const head = Buffer.alloc(SQLITE_HEADER.length);
  let fd: number;
  try {
    fd = openSync(file, "r");
  } catch (err) {
    throw new StateFileError(file, `cannot read: ${errorMessage(err)}`, { cause: err });
  }
  try {
    readSync(fd, head, 0, head.length, 0);
  } finally {
    closeSync(fd);
  }
  if (!head.equals(SQLITE_HEADER)) {
    throw new StateFileError(file, `is not a SQLite database (no SQLite header in its first bytes; ${st.size} bytes); it is left as it is`);
  }
}

/** Makes the log and its WAL private if they are not (after {@link verify}: never touch a foreign file). */
function tightenMode(file: string, log: Logger): void {
  for (const f of [file, `${file}-wal`, `${file}-shm`]) {
    let mode: number;
    try {
      mode = statSync(f).mode & 0o777;
    } catch {
      continue;
    }
    if ((mode & 0o077) === 0) continue;
    try {
      chmodSync(f, 0o600);
    } catch (err) {
      throw new StateFileError(f, `has mode ${mode.toString(8)} and cannot be made 0600: ${errorMessage(err)}`, { cause: err });
    }
    log.warn({ file: f, was: mode.toString(8), now: "600" }, "migration log was readable by others; mode set to 0600");
  }
}

/**
 * Creates a new, initialised log atomically: the schema is written to a
 * private temp file, which is then hard-linked into place (fails rather than
 * replaces if the file appeared meanwhile), so `file` never exists
 * half-made.
 */
function createFile(file: string, log: Logger): void {
  const tmp = `${file}.init`;
  for (const f of [tmp, `${tmp}-wal`, `${tmp}-shm`, `${tmp}-journal`]) {
    try {
      unlinkSync(f);
      log.warn({ file: f }, "removed a leftover from an interrupted log creation");
    } catch {
      // not there
    }
  }
  try {
    closeSync(openSync(tmp, "wx", 0o600));
    const db = new Database(tmp, { fileMustExist: true });
    try {
      db.pragma("locking_mode = EXCLUSIVE");
      db.pragma("journal_mode = WAL");
      db.pragma("synchronous = FULL");
      db.exec(`BEGIN; PRAGMA application_id = ${APPLICATION_ID}; PRAGMA user_version = ${SCHEMA_VERSION}; ${SCHEMA} COMMIT;`);
    } finally {
      // Closing checkpoints the WAL into the file and removes it: the linked file is complete on its own.
      db.close();
    }
    fsyncPath(tmp);
    linkSync(tmp, file);
    unlinkSync(tmp);
    fsyncPath(join(file, ".."));
  } catch (err) {
    try {
      unlinkSync(tmp);
    } catch {
      // already gone
    }
    throw new StateFileError(file, `cannot create the migration log: ${errorMessage(err)}`, { cause: err });
  }
  log.info({ file }, "migration log created");
}

function fsyncPath(path: string): void {
  const fd = openSync(path, "r");
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

function describeSqliteError(err: unknown): string {
  const code = (err as { code?: unknown }).code;
  const msg = errorMessage(err);
  if (code === "SQLITE_BUSY" || code === "SQLITE_LOCKED") return `is locked by another process (another coordinator on the same state directory?): ${msg}`;
  if (code === "SQLITE_NOTADB") return `is not a SQLite database, or a corrupt one: ${msg}`;
  if (typeof code === "string" && code.startsWith("SQLITE_CORRUPT")) return `is corrupt: ${msg}`;
  return `cannot be used as the migration log: ${msg}`;
}
