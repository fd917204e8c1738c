/**
 * The controller (MOM's "Controllers"): carries out the state machine's
 * effects. Balloon requests and acks go to the coordinator; page-cache
 * reclaim happens in the guest, before a PREPARE inflation, because the rig
 * showed the balloon reclaiming cache itself runs at only 70–100 MiB/s while
 * a drop takes under a second.
 */
import { execFile } from "node:child_process";
import { accessSync, constants } from "node:fs";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import type { Logger } from "../shared/logger.js";
import { errorMessage } from "../shared/errors.js";
import { silentLogger } from "../shared/logger.js";
import { formatMiB } from "../shared/units.js";
import { DeadlineError, withDeadline } from "./deadline.js";
import { ActionError } from "./errors.js";
import type { Effect } from "./runtime.js";
import { effectToRequest, type SessionRequestInit } from "./wire.js";

/** How page cache is reclaimed. */
export type ReclaimMethod = "memory.reclaim" | "drop_caches" | "none";

/** Options for {@link PageCacheReclaimer}. */
export interface ReclaimerOptions {
  /** Root of procfs (for sys/vm/drop_caches). Default "/proc". */
  procRoot?: string;
  /** Root of sysfs (for fs/cgroup/memory.reclaim). Default "/sys". */
  sysRoot?: string;
  /** Flushes dirty pages so drop_caches can drop them; bounded by `timeoutMs`. Default: runs `sync`. */
  sync?: (timeoutMs: number) => Promise<void>;
  /** Wall clock in ms, for the reported duration. Default Date.now. */
  now?: () => number;
}

/** The outcome of one reclaim. */
export interface ReclaimResult {
  method: ReclaimMethod;
  requestedBytes: number;
  elapsedMs: number;
  /** False when the kernel reclaimed less than asked, the budget ran out, or it failed. */
  complete: boolean;
  error?: string;
}

const execFileAsync = promisify(execFile);

async function runSync(timeoutMs: number): Promise<void> {
  await execFileAsync("sync", [], { timeout: timeoutMs });
}

function writable(path: string): boolean {
  try {
    accessSync(path, constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

/**
 * Reclaims clean page cache, preferring cgroup v2 `memory.reclaim` at the
 * root cgroup (bounded to the bytes asked, LRU order, so hot pages are the
 * last to go) over `sync; echo 1 > drop_caches` (all clean unmapped cache).
 */
export class PageCacheReclaimer {
  private readonly reclaimPath: string;
  private readonly dropPath: string;
  private readonly sync: (timeoutMs: number) => Promise<void>;
  private readonly now: () => number;

  constructor(options: ReclaimerOptions = {}) {
    this.reclaimPath = join(options.sysRoot ?? "/sys", "fs/cgroup/memory.reclaim");
    this.dropPath = join(options.procRoot ?? "/proc", "sys/vm/drop_caches");
    this.sync = options.sync ?? runSync;
    this.now = options.now ?? Date.now;
  }

  /** The method that {@link reclaim} would use on this guest. */
  method(): ReclaimMethod {
    if (writable(this.reclaimPath)) return "memory.reclaim";
    if (writable(this.dropPath)) return "drop_caches";
    return "none";
  }

  /**
   * Reclaims about `bytes` of page cache within `budgetMs`. Never throws:
   * a failed reclaim only means the balloon will reclaim by itself, slower.
   */
  async reclaim(bytes: number, budgetMs: number): Promise<ReclaimResult> {
    const method = this.method();
    const start = this.now();
    const result = (complete: boolean, error?: string): ReclaimResult => {
      const r: ReclaimResult = { method, requestedBytes: bytes, elapsedMs: this.now() - start, complete };
      if (error !== undefined) r.error = error;
      return r;
    };
    if (method === "none") return result(false, `neither ${this.reclaimPath} nor ${this.dropPath} is writable`);
    try {
      // The kernel write cannot be cancelled; past the budget it finishes in the background while we move on.
      await withDeadline(this.run(method, bytes, budgetMs), budgetMs, "reclaim");
      return result(true);
    } catch (err) {
      return result(false, err instanceof DeadlineError ? `reclaim exceeded its ${budgetMs} ms budget` : errorMessage(err));
    }
  }

  private async run(method: ReclaimMethod, bytes: number, budgetMs: number): Promise<void> {
    if (method === "memory.reclaim") {
      try {
        await writeFile(this.reclaimPath, `${Math.max(0, Math.floor(bytes))}`);
      } catch (err) {
        // EAGAIN: the kernel reclaimed less than asked. Whatever it got is still a gain.
        if ((err as NodeJS.ErrnoException).code === "EAGAIN") throw new ActionError(`memory.reclaim: reclaimed less than ${formatMiB(bytes)}`);
        throw new ActionError(`memory.reclaim: ${errorMessage(err)}`, { cause: err });
      }
      return;
    }
    // drop_caches drops only clean pages: flush first, but never past half the budget.
    try {
      await this.sync(Math.max(1, Math.floor(budgetMs / 2)));
    } catch {
      // Dirty pages simply stay; the drop still frees the clean ones.
    }
    await writeFile(this.dropPath, "1");
  }
}

/** Options for {@link Actuator}. */
export interface ActuatorOptions {
  /** Sends one message on the session stream. */
  send: (request: SessionRequestInit) => Promise<void>;
  /** Default: a reclaimer on "/proc" and "/sys". Null disables reclaim. */
  reclaimer?: PageCacheReclaimer | null;
  logger?: Logger;
}

/** Performs effects in order; a send failure propagates (the stream is gone), a reclaim failure does not. */
export class Actuator {
  private readonly send: (request: SessionRequestInit) => Promise<void>;
  private readonly reclaimer: PageCacheReclaimer | null;
  private readonly log: Logger;

  constructor(options: ActuatorOptions) {
    this.send = options.send;
    this.reclaimer = options.reclaimer === undefined ? new PageCacheReclaimer() : options.reclaimer;
    this.log = options.logger ?? silentLogger();
  }

  /** Runs the effects one after another. */
  async run(effects: readonly Effect[]): Promise<void> {
    for (const effect of effects) {
      switch (effect.kind) {
        case "log":
          this.log[effect.level](effect.data ?? {}, effect.msg);
          break;
        case "reclaim": {
          if (!this.reclaimer) break;
          const r = await this.reclaimer.reclaim(effect.bytes, effect.budgetMs);
          this.log[r.complete ? "info" : "warn"]({ ...r, requested: formatMiB(r.requestedBytes) }, "page cache reclaim before PREPARE");
          break;
        }
        case "report":
        case "balloon":
        case "ack": {
          const request = effectToRequest(effect);
          if (!request) break;
          if (effect.kind === "report") {
            // Every few seconds at most in steady state: debug only.
            this.log.debug({ why: effect.why }, "sample reported");
          } else if (effect.kind === "balloon") {
            this.log.info({ target: formatMiB(effect.targetBytes), reason: effect.reason, detail: effect.detail, migrationId: effect.migrationId }, "balloon request");
          } else {
            this.log.info({ phase: effect.phase, target: formatMiB(effect.targetBytes), migrationId: effect.migrationId }, "phase ack");
          }
          await this.send(request);
          break;
        }
      }
    }
  }
}
