/**
 * Keeps migration records, tells watchers about changes, and (when a state
 * directory is configured) writes them to disk so a coordinator restart
 * loses no history.
 */
import { EventEmitter } from "node:events";
import { mkdirSync, readFileSync, renameSync, writeFileSync, existsSync } from "node:fs";
import { join } from "node:path";
import { Phase } from "../gen/ballast/v1/common_pb.js";
import { NotFoundError, errorMessage } from "../shared/errors.js";
import type { Logger } from "../shared/logger.js";
import { isFinal, type MigrationRecord } from "./migration-record.js";

/** Options for {@link MigrationStore}. */
export interface MigrationStoreOptions {
  /** Directory for migrations.json; "" keeps records in memory only. */
  stateDir: string;
  logger: Logger;
  /** Records kept at most; the oldest finished ones go first. Default 1000. */
  maxRecords?: number;
}

/** Emits `update` with the record after every change. */
export class MigrationStore extends EventEmitter {
  private readonly records = new Map<string, MigrationRecord>();
  private readonly file: string;
  private readonly log: Logger;
  private readonly maxRecords: number;
  private flushTimer: NodeJS.Timeout | undefined;
  private readonly interruptedIds: string[] = [];

  constructor(options: MigrationStoreOptions) {
    super();
    this.setMaxListeners(0);
    this.log = options.logger.child({ component: "migration-store" });
    this.file = options.stateDir ? join(options.stateDir, "migrations.json") : "";
    this.maxRecords = options.maxRecords ?? 1000;
    if (this.file) {
      mkdirSync(options.stateDir, { recursive: true });
      this.load();
    }
  }

  /** Adds a new record. */
  add(r: MigrationRecord): void {
    this.records.set(r.id, r);
    this.trim();
    this.changed(r);
  }

  /** The record, or NotFoundError. */
  get(id: string): MigrationRecord {
    const r = this.records.get(id);
    if (!r) throw new NotFoundError(`no migration ${JSON.stringify(id)}`);
    return r;
  }

  /** All records, newest first, optionally of one VM. */
  list(vm?: string): MigrationRecord[] {
    return [...this.records.values()].filter((r) => !vm || r.vm === vm).sort((a, b) => b.createdMs - a.createdMs);
  }

  /** Call after mutating a record: stamps it, notifies watchers, schedules a write. */
  changed(r: MigrationRecord): void {
    r.updatedMs = Date.now();
    this.emit("update", r);
    this.scheduleFlush(isFinal(r) ? 0 : 1000);
  }

  /** Writes pending changes now. */
  flush(): void {
    if (this.flushTimer) clearTimeout(this.flushTimer);
    this.flushTimer = undefined;
    if (!this.file) return;
    try {
      const tmp = `${this.file}.tmp`;
      writeFileSync(tmp, JSON.stringify({ version: 1, migrations: [...this.records.values()] }));
      renameSync(tmp, this.file);
    } catch (err) {
      this.log.error({ err: errorMessage(err), file: this.file }, "could not persist migration records");
    }
  }

  private scheduleFlush(ms: number): void {
    if (!this.file) return;
    if (ms === 0) {
      this.flush();
      return;
    }
    this.flushTimer ??= setTimeout(() => this.flush(), ms);
  }

  private trim(): void {
    if (this.records.size <= this.maxRecords) return;
    const finished = this.list().filter(isFinal).reverse();
    for (const r of finished) {
      if (this.records.size <= this.maxRecords) break;
      this.records.delete(r.id);
    }
  }

  private load(): void {
    if (!existsSync(this.file)) return;
    try {
      const doc = JSON.parse(readFileSync(this.file, "utf8")) as { version?: number; migrations?: MigrationRecord[] };
      if (doc.version !== 1 || !Array.isArray(doc.migrations)) throw new Error("unknown file format");
      for (const r of doc.migrations) {
        // A migration that was running when the coordinator died cannot be
        // resumed from here; say so rather than pretend it is still going.
        if (!isFinal(r)) {
          r.phase = Phase.FAILED;
          r.error = r.error || "interrupted: the coordinator restarted during the migration";
          r.phases.push({ phase: Phase.FAILED, pass: r.pass, atMs: Date.now() });
          this.interruptedIds.push(r.id);
        }
        this.records.set(r.id, r);
      }
      this.log.info({ count: this.records.size }, "migration records loaded");
    } catch (err) {
      // Keep the unreadable file for inspection instead of overwriting it.
      const aside = `${this.file}.corrupt-${Date.now()}`;
      renameSync(this.file, aside);
      this.log.error({ err: errorMessage(err), movedTo: aside }, "migration records unreadable; starting empty");
    }
  }

  /** Records that were interrupted by a restart (for balloon restore on start-up). */
  interrupted(): MigrationRecord[] {
    return this.interruptedIds.map((id) => this.records.get(id)).filter((r): r is MigrationRecord => r !== undefined);
  }
}
