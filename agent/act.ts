/**
 * The controller (MOM's "Controllers"): carries out the state machine's
 * effects. Balloon requests and acks go to the coordinator; page-cache
 * reclaim happens in the guest, before a PREPARE inflation, because the rig
 * showed the balloon reclaiming cache itself runs at only 70–100 MiB/s while
 * a drop takes under a second. After the inflation, free memory is
 * overwritten with zeros ({@link FreeMemoryZeroer}) so that it migrates as
 * zero pages.
 */
import { execFile, spawn } from "node:child_process";
import { accessSync, constants } from "node:fs";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { Logger } from "../shared/logger.js";
import { errorMessage } from "../shared/errors.js";
import { silentLogger } from "../shared/logger.js";
import { formatMiB } from "../shared/units.js";
import { ActionError } from "./errors.js";
import { DEFAULT_POLICY_OPTIONS, nextZeroChunk, type PolicyOptions, type ZeroStep, type ZeroStop } from "./policy.js";
import type { Effect } from "./runtime.js";
import type { Sample } from "./sample.js";
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

function runSync(timeoutMs: number): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile("sync", [], { timeout: timeoutMs }, (err) => (err ? reject(err) : resolve()));
  });
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
      await withBudget(this.run(method, bytes, budgetMs), budgetMs);
      return result(true);
    } catch (err) {
      return result(false, errorMessage(err));
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

function withBudget<T>(work: Promise<T>, budgetMs: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new ActionError(`reclaim exceeded its ${budgetMs} ms budget`)), budgetMs);
  });
  // The kernel write cannot be cancelled; it finishes in the background while we move on.
  work.catch(() => undefined);
  return Promise.race([work, timeout]).finally(() => clearTimeout(timer));
}

/**
 * Memory that a helper holds, zero-filled, until it is released. The pages
 * must really be written (a write fault hands out a zeroed page; the write
 * makes sure every page is allocated), and release must give them back to
 * the kernel at once, still zero-filled.
 */
export interface ZeroArena {
  /** Allocates `bytes` more and writes zeros over every page. */
  grow(bytes: number): Promise<void>;
  /** Frees everything; resolves when the memory is back with the kernel. Never throws. */
  release(): Promise<void>;
}

/** Starts an arena; rejects if the helper cannot start, or when `signal` aborts first (the helper is then stopped). */
export type ZeroArenaFactory = (signal: AbortSignal) => Promise<ZeroArena>;

/**
 * The helper process: reads byte counts, one per line, allocates each as a
 * separate buffer, fills it with zeros (every page written) and answers
 * "ok"; exits on end of input. Exit is what frees the memory: unlike a
 * Buffer in the agent, whose pages wait for a garbage collection, an exited
 * process's pages are back on the free list at once. It makes itself the
 * OOM killer's first choice (the agent's -900 is inherited).
 */
const ZERO_HELPER_SCRIPT = [
  "try{require('fs').writeFileSync('/proc/self/oom_score_adj','1000')}catch{}",
  "const held=[];let buf='';",
  "process.stdin.setEncoding('utf8');",
  "process.stdin.on('data',d=>{buf+=d;let i;while((i=buf.indexOf('\\n'))>=0){const n=Number(buf.slice(0,i));buf=buf.slice(i+1);",
  "if(!(n>0))process.exit(0);const b=Buffer.allocUnsafeSlow(n);b.fill(0);held.push(b);process.stdout.write('ok\\n')}});",
  "process.stdin.on('end',()=>process.exit(0));",
  "process.stdout.write('ready\\n');",
].join("");

/** Options for {@link childProcessArena}. */
export interface ChildArenaOptions {
  /** The node binary. Default process.execPath. */
  execPath?: string;
  /** Longest wait for the helper to exit after its input ends, before SIGKILL. Default 1000 ms. */
  exitTimeoutMs?: number;
}

/** A {@link ZeroArena} in a short-lived `node -e` child process. */
export function childProcessArena(options: ChildArenaOptions = {}): ZeroArenaFactory {
  return (signal) =>
    new Promise<ZeroArena>((resolve, reject) => {
      const child = spawn(options.execPath ?? process.execPath, ["-e", ZERO_HELPER_SCRIPT], {
        stdio: ["pipe", "pipe", "ignore"],
      });
      const exitTimeoutMs = options.exitTimeoutMs ?? 1000;
      let exited = false;
      const exit = new Promise<void>((res) => {
        child.once("exit", () => {
          exited = true;
          res();
        });
        // A failed spawn emits "error" and maybe no "exit".
        child.once("error", () => {
          exited = true;
          res();
        });
      });
      const waiting: Array<{ resolve: () => void; reject: (err: Error) => void }> = [];
      const failAll = (err: Error) => {
        for (const w of waiting.splice(0)) w.reject(err);
      };
      child.once("error", (err) => failAll(new ActionError(`zeroing helper: ${errorMessage(err)}`, { cause: err })));
      child.once("exit", (code, signal) => failAll(new ActionError(`zeroing helper exited (${signal ?? code})`)));
      child.stdin.on("error", () => undefined);
      let buf = "";
      child.stdout.setEncoding("utf8");
      child.stdout.on("data", (d: string) => {
        buf += d;
        let i: number;
        while ((i = buf.indexOf("\n")) >= 0) {
          buf = buf.slice(i + 1);
          waiting.shift()?.resolve();
        }
      });
      const nextLine = () => new Promise<void>((res, rej) => (exited ? rej(new ActionError("zeroing helper exited")) : waiting.push({ resolve: res, reject: rej })));
      const release = async (): Promise<void> => {
        if (exited) return;
        child.stdin.end();
        const timer = setTimeout(() => {
          if (!exited) child.kill("SIGKILL");
        }, exitTimeoutMs);
        await exit;
        clearTimeout(timer);
      };
      const arena: ZeroArena = {
        grow: (bytes) => {
          const ok = nextLine();
          child.stdin.write(`${Math.floor(bytes)}\n`);
          return ok;
        },
        release,
      };
      const onAbort = () => failAll(new ActionError("zeroing helper start abandoned"));
      signal.addEventListener("abort", onAbort, { once: true });
      nextLine().then(
        () => {
          signal.removeEventListener("abort", onAbort);
          resolve(arena);
        },
        (err: unknown) => {
          signal.removeEventListener("abort", onAbort);
          void release();
          reject(err instanceof Error ? err : new Error(String(err)));
        },
      );
    });
}

/** The outcome of one zeroing. */
export interface ZeroResult {
  plannedBytes: number;
  /** Zero-filled and released. */
  zeroedBytes: number;
  chunks: number;
  stoppedBy: ZeroStop | "budget" | "aborted" | "error";
  detail: string;
  /** Start to release, release included. */
  elapsedMs: number;
  /** The helper's start-up. */
  startMs: number;
  /** Giving the memory back. */
  releaseMs: number;
  error?: string;
}

/** Options for {@link FreeMemoryZeroer}. */
export interface ZeroerOptions {
  /** Default: {@link childProcessArena}. */
  arena?: ZeroArenaFactory;
  /** Monotonic ms. Default performance.now. */
  now?: () => number;
}

/**
 * Fills free memory with zeros for a moment and gives it back. Between units
 * it asks `next` (built on {@link nextZeroChunk}) whether to go on; it stops
 * at the time budget or on abort, and always releases what it holds.
 */
export class FreeMemoryZeroer {
  private readonly arena: ZeroArenaFactory;
  private readonly now: () => number;

  constructor(options: ZeroerOptions = {}) {
    this.arena = options.arena ?? childProcessArena();
    this.now = options.now ?? (() => performance.now());
  }

  /** Never throws: a failed zeroing only means more bytes to migrate. */
  async zero(plannedBytes: number, budgetMs: number, next: (zeroedBytes: number) => ZeroStep, signal?: AbortSignal): Promise<ZeroResult> {
    const start = this.now();
    const deadline = start + budgetMs;
    const result: ZeroResult = { plannedBytes, zeroedBytes: 0, chunks: 0, stoppedBy: "done", detail: "", elapsedMs: 0, startMs: 0, releaseMs: 0 };
    const finish = () => {
      result.elapsedMs = this.now() - start;
      return result;
    };
    let arena: ZeroArena | undefined;
    const abandon = new AbortController();
    const starting = this.arena(abandon.signal);
    try {
      arena = await bounded(starting, deadline - this.now(), signal);
    } catch (err) {
      // The helper must not outlive a start we gave up on, nor keep memory.
      abandon.abort();
      starting.then((a) => a.release(), () => undefined);
      result.stoppedBy = signal?.aborted ? "aborted" : err instanceof BudgetError ? "budget" : "error";
      result.error = errorMessage(err);
      return finish();
    }
    result.startMs = this.now() - start;
    try {
      for (;;) {
        if (signal?.aborted) {
          result.stoppedBy = "aborted";
          break;
        }
        if (this.now() >= deadline) {
          result.stoppedBy = "budget";
          break;
        }
        const step = next(result.zeroedBytes);
        result.detail = step.detail;
        if (step.stop || step.bytes <= 0) {
          result.stoppedBy = step.stop ?? "done";
          break;
        }
        await bounded(arena.grow(step.bytes), deadline - this.now(), signal);
        result.zeroedBytes += step.bytes;
        result.chunks++;
      }
    } catch (err) {
      result.stoppedBy = signal?.aborted ? "aborted" : err instanceof BudgetError ? "budget" : "error";
      result.error = errorMessage(err);
    } finally {
      const r0 = this.now();
      await arena.release();
      result.releaseMs = this.now() - r0;
    }
    return finish();
  }
}

class BudgetError extends ActionError {}

/** Races work against a time budget and an abort signal; the work itself goes on (its owner cleans up). */
function bounded<T>(work: Promise<T>, ms: number, signal?: AbortSignal): Promise<T> {
  work.catch(() => undefined);
  if (signal?.aborted) return Promise.reject(new ActionError("aborted"));
  if (ms <= 0) return Promise.reject(new BudgetError("time budget used up"));
  let timer: NodeJS.Timeout | undefined;
  let onAbort: (() => void) | undefined;
  const stop = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new BudgetError(`time budget of ${Math.round(ms)} ms used up`)), ms);
    onAbort = () => reject(new ActionError("aborted"));
    signal?.addEventListener("abort", onAbort, { once: true });
  });
  return Promise.race([work, stop]).finally(() => {
    clearTimeout(timer);
    if (onAbort) signal?.removeEventListener("abort", onAbort);
  });
}

/** Options for {@link Actuator}. */
export interface ActuatorOptions {
  /** Sends one message on the session stream. */
  send: (request: SessionRequestInit) => Promise<void>;
  /** Default: a reclaimer on "/proc" and "/sys". Null disables reclaim. */
  reclaimer?: PageCacheReclaimer | null;
  /** Zeroes free memory before migration. Default null (off): it also needs `sample`. */
  zeroer?: FreeMemoryZeroer | null;
  /** A fresh reading (undefined if incomplete), for the checks between units of zeroing. */
  sample?: () => Sample | undefined;
  /** Thresholds of those checks. Default {@link DEFAULT_POLICY_OPTIONS}. */
  policy?: PolicyOptions;
  logger?: Logger;
}

/** Performs effects in order; a send failure propagates (the stream is gone), a reclaim or zeroing failure does not. */
export class Actuator {
  private readonly send: (request: SessionRequestInit) => Promise<void>;
  private readonly reclaimer: PageCacheReclaimer | null;
  private readonly zeroer: FreeMemoryZeroer | null;
  private readonly sample: (() => Sample | undefined) | undefined;
  private readonly policy: PolicyOptions;
  private readonly log: Logger;

  constructor(options: ActuatorOptions) {
    this.send = options.send;
    this.reclaimer = options.reclaimer === undefined ? new PageCacheReclaimer() : options.reclaimer;
    this.zeroer = options.zeroer ?? null;
    this.sample = options.sample;
    this.policy = options.policy ?? DEFAULT_POLICY_OPTIONS;
    this.log = options.logger ?? silentLogger();
  }

  /** Whether "zero" effects do anything. */
  get canZero(): boolean {
    return this.zeroer !== null && this.sample !== undefined;
  }

  /** Runs the effects one after another. `signal` cuts a zeroing short (the migration moved on). */
  async run(effects: readonly Effect[], signal?: AbortSignal): Promise<void> {
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
        case "zero": {
          if (!this.zeroer || !this.sample) break;
          const r = await this.zeroer.zero(effect.bytes, effect.budgetMs, this.zeroChecks(effect.bytes, effect.chunkBytes), signal);
          const level = r.stoppedBy === "error" ? "warn" : "info";
          this.log[level]({ ...r, zeroed: formatMiB(r.zeroedBytes), planned: formatMiB(r.plannedBytes), migrationId: effect.migrationId }, "free memory zeroed before migration");
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

  /** The checks between units: a fresh reading each time, compared with the one taken when the helper was up. */
  private zeroChecks(plannedBytes: number, chunkBytes: number): (zeroedBytes: number) => ZeroStep {
    let start: Sample | undefined;
    return (zeroedBytes) => {
      const now = this.sample?.();
      if (!now) return { bytes: 0, stop: "sample", detail: "incomplete sample: stop zeroing" };
      start ??= now;
      return nextZeroChunk({ plannedBytes, chunkBytes, zeroedBytes, start, now }, this.policy);
    };
  }
}
