/**
 * The libvirt hypervisor driver: one libvirt domain, managed by name,
 * entirely through libvirt's own API. libvirtd keeps the QEMU monitor; this
 * driver never touches it (no `qemu-monitor-command`).
 *
 * The binding is the `virsh` CLI run as a child process (execa): no native
 * addon to build, it is exactly the installed libvirt's client, and every
 * call is one command line in the debug log (`virsh -c URI setmem vm1
 * 524288 --live`). A migration is one long `virsh migrate` child; its exit
 * is the outcome. Outputs are parsed strictly in coordinator/virsh-parse.ts.
 *
 * Connection: a poll loop (`dominfo` + `domstate --reason`, every second
 * while up, every 500 ms while a migration is tracked, with the shared
 * reconnect backoff while down) reports `up` once the domain is active and
 * inspected, and `down` when the daemon is unreachable, the domain is gone
 * or shut off, or its id changed (a restart: a different QEMU process).
 *
 * libvirt creates the incoming domain on the destination itself, so
 * `prepareIncoming` only picks a port and the destination's driver comes up
 * when the domain appears ({@link LibvirtDriver.incomingNeedsQemu} is false).
 *
 * Units: virsh speaks KiB (`setmem`, `dommemstat`) and MiB/s
 * (`--bandwidth`); this driver speaks bytes and bytes/s like QMP.
 */
import { execa, type ResultPromise } from "execa";
import { FailedPreconditionError, InvalidArgumentError, UnavailableError, errorMessage } from "../shared/errors.js";
import type { Logger } from "../shared/logger.js";
import { freePort } from "../shared/net.js";
import { BACKOFF, Backoff, sleep } from "../shared/retry.js";
import type { DriverEvent, GuestMemoryStats, HypervisorDriver, MigrationSettings, VmFacts } from "./hypervisor.js";
import type { MigrateStats } from "./qemu.js";
import {
  JOB_TYPE,
  classifyVirshError,
  cleanVirshError,
  emptyMigrateStats,
  jobStatsToMigrateStats,
  migrationStatusOf,
  parseDominfo,
  parseDomjobinfoRaw,
  parseDommemstat,
  parseDomstate,
  parseIncomingUri,
  runStateOf,
  VirshEventStream,
  type DomState,
  type MigrationRole,
  type VirshEvent,
  type VirshFailure,
} from "./virsh-parse.js";

/** Options for {@link LibvirtDriver}. */
export interface LibvirtDriverOptions {
  /** libvirt connection URI, e.g. `qemu:///system` or `qemu+unix:///system?socket=/run/libvirt/libvirt-sock`. */
  uri: string;
  /** The domain's name. */
  domain: string;
  logger: Logger;
  /** The URI a source host's virsh must dial to reach this daemon (sent by prepareIncoming). Default: `uri`. */
  dialUri?: string;
  /** Per-command timeout. Default 10000 ms. */
  commandTimeoutMs?: number;
  /** Poll period while up and idle. Default 1000 ms. */
  pollMs?: number;
  /** Poll period while a migration is tracked. Default 500 ms. */
  jobPollMs?: number;
  /** `dommemstat --period` set once per domain start. Default 2; 0 leaves it. */
  statsPeriodS?: number;
  /** Backoff while down. Default {@link BACKOFF.reconnect}. */
  backoff?: { initialMs: number; maxMs: number };
  /** The virsh binary. Default "virsh". */
  virsh?: string;
}

/** A virsh command that could not reach the daemon or the domain (gRPC UNAVAILABLE). */
export class VirshError extends UnavailableError {
  constructor(
    message: string,
    readonly failure: VirshFailure,
  ) {
    super(message);
  }
}

/** A virsh command libvirt refused (gRPC FAILED_PRECONDITION), e.g. `domjobabort` in post-copy. */
export class VirshRefusal extends FailedPreconditionError {
  readonly failure = "other" as const;
}

/** What kind of virsh failure `err` is, or undefined when it is none. */
export function virshFailure(err: unknown): VirshFailure | undefined {
  return err instanceof VirshError || err instanceof VirshRefusal ? err.failure : undefined;
}

interface Outgoing {
  child: VirshChild;
  /** The job-completed event's numbers, once the event stream delivered them. */
  completed: MigrateStats | undefined;
  /** The migration status last reported to the supervisor. */
  lastStatus: string | undefined;
  cancelRequested: boolean;
  exited: boolean;
  /** The last stats polled while the job ran. */
  last: MigrateStats | undefined;
  lastIteration: number;
}

const MiBps = 1024 * 1024;

/** execa options of every virsh child: never throws, C locale (stable output), no stdin. */
const CHILD_OPTIONS = { reject: false, env: { LC_ALL: "C" }, stdin: "ignore" } as const;
type VirshChild = ResultPromise<typeof CHILD_OPTIONS>;

/** {@link HypervisorDriver} over libvirt (virsh). */
export class LibvirtDriver implements HypervisorDriver {
  readonly kind = "libvirt";
  readonly incomingNeedsQemu = false;
  private readonly log: Logger;
  private readonly backoff: Backoff;
  private readonly virshBin: string;
  private readonly timeoutMs: number;
  private listener: (e: DriverEvent) => void = () => {};
  private factsValue: VmFacts | undefined;
  private domId: number | undefined;
  private closed = false;
  private timer: NodeJS.Timeout | undefined;
  private polling = false;
  private settings: MigrationSettings = { postcopy: false };
  private outgoing: Outgoing | undefined;
  /** The outcome of the last migration this driver saw end (either side), for queryMigration after the job is gone. */
  private lastFinal: MigrateStats | undefined;
  /** prepareIncoming ran here; the domain that appears next is the incoming one. */
  private incomingExpected = false;
  /** Destination: the migration status last reported while tracking the incoming domain. */
  private incomingStatus: string | undefined;
  private statsEnabledFor: number | undefined;
  /** `Used memory` at the last poll, to report balloon changes. */
  private lastUsedBytes: number | undefined;
  /** The long-lived `virsh event --all --loop` child: lifecycle, migration-iteration and job-completed as they happen. */
  private eventChild: VirshChild | undefined;
  private readonly eventStream = new VirshEventStream();
  private readonly eventBackoff = new Backoff(BACKOFF.reconnect);
  private eventFlushTimer: NodeJS.Timeout | undefined;

  constructor(private readonly options: LibvirtDriverOptions) {
    if (!/^[A-Za-z0-9][A-Za-z0-9._-]*$/.test(options.domain)) {
      throw new InvalidArgumentError(`libvirt driver: domain name ${JSON.stringify(options.domain)} must be [A-Za-z0-9._-]`);
    }
    this.log = options.logger.child({ driver: "libvirt", uri: options.uri, domain: options.domain });
    this.backoff = new Backoff(options.backoff ?? BACKOFF.reconnect);
    this.virshBin = options.virsh ?? "virsh";
    this.timeoutMs = options.commandTimeoutMs ?? 10_000;
  }

  get connected(): boolean {
    return this.factsValue !== undefined;
  }

  get facts(): VmFacts | undefined {
    return this.factsValue;
  }

  onEvent(listener: (e: DriverEvent) => void): void {
    this.listener = listener;
  }

  start(): void {
    this.startEvents();
    this.schedule(0);
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    if (this.eventFlushTimer) clearTimeout(this.eventFlushTimer);
    // A running `virsh migrate` is left alone: the migration belongs to libvirt, not to this process.
    this.eventChild?.kill();
  }

  // ---- virsh ------------------------------------------------------------------

  /** Runs `virsh -c URI ARGS`; resolves with stdout, rejects with a {@link VirshError} (unreachable) or {@link VirshRefusal}. */
  async virsh(args: string[], timeoutMs = this.timeoutMs): Promise<string> {
    this.log.debug({ cmd: ["virsh", "-c", this.options.uri, ...args].join(" ") }, "virsh");
    const r = await execa(this.virshBin, ["-c", this.options.uri, ...args], { ...CHILD_OPTIONS, timeout: timeoutMs });
    if (r.exitCode === 0) return r.stdout;
    const what = `virsh ${args[0]}`;
    if (r.timedOut) throw new VirshError(`${what}: no answer in ${timeoutMs} ms`, "no-daemon");
    const stderr = r.stderr || r.stdout || (r.cause instanceof Error ? r.cause.message : `exit ${r.exitCode}`);
    const message = `${what}: ${cleanVirshError(stderr) || `exit ${r.exitCode}`}`;
    const failure = classifyVirshError(stderr);
    throw failure === "other" ? new VirshRefusal(message) : new VirshError(message, failure);
  }

  private requireUp(what: string): void {
    if (!this.factsValue) throw new UnavailableError(`libvirt ${what}: domain ${this.options.domain} is not running on ${this.options.uri}`);
  }

  // ---- balloon ------------------------------------------------------------------

  async setBalloon(targetBytes: number): Promise<void> {
    if (!Number.isSafeInteger(targetBytes) || targetBytes <= 0) {
      throw new InvalidArgumentError(`setmem: target must be a positive integer number of bytes, got ${String(targetBytes)}`);
    }
    this.requireUp("setmem");
    // QMP caps a target above the RAM size silently; libvirt refuses it: cap here, like QEMU.
    const ram = this.factsValue?.ramBytes ?? targetBytes;
    const kib = Math.max(1, Math.floor(Math.min(targetBytes, ram) / 1024));
    await this.virsh(["setmem", this.options.domain, String(kib), "--live"]);
  }

  async queryBalloon(): Promise<number> {
    this.requireUp("dommemstat");
    return parseDommemstat(await this.virsh(["dommemstat", this.options.domain])).actualBytes;
  }

  async guestMemoryStats(): Promise<GuestMemoryStats | undefined> {
    this.requireUp("dommemstat");
    const m = parseDommemstat(await this.virsh(["dommemstat", this.options.domain]));
    if (m.lastUpdateS === 0 && m.usableBytes === undefined) return undefined;
    // libvirt's names: `usable` is the guest's MemAvailable (QEMU stat-available-memory); `available` is MemTotal.
    return { availableBytes: m.usableBytes, freeBytes: m.unusedBytes, diskCachesBytes: m.diskCachesBytes, lastUpdateS: m.lastUpdateS };
  }

  /**
   * The host socket of the agent's channel (`<channel type='unix'>` with
   * `<target type='virtio' name='org.ballast.agent.0'/>`), read from the live
   * domain XML: libvirt picks a new path with every start and migration.
   */
  async agentChannelPath(): Promise<string | undefined> {
    return agentChannelPathFromXml(await this.virsh(["dumpxml", this.options.domain]));
  }

  async runState(): Promise<string> {
    const st = parseDomstate(await this.virsh(["domstate", "--reason", this.options.domain]));
    const rs = runStateOf(st, this.role);
    if (rs === undefined) throw new UnavailableError(`libvirt: domain ${this.options.domain} is ${st.state} (${st.reason})`);
    return rs;
  }

  // ---- migration ------------------------------------------------------------------

  async configureMigration(s: MigrationSettings): Promise<void> {
    if (s.maxBandwidthBytesPerSec !== undefined && !(Number.isSafeInteger(s.maxBandwidthBytesPerSec) && s.maxBandwidthBytesPerSec >= 0)) {
      throw new InvalidArgumentError(`libvirt migration: maxBandwidthBytesPerSec must be a non-negative integer, got ${s.maxBandwidthBytesPerSec}`);
    }
    if (s.downtimeLimitMs !== undefined && !(Number.isSafeInteger(s.downtimeLimitMs) && s.downtimeLimitMs >= 0)) {
      throw new InvalidArgumentError(`libvirt migration: downtimeLimitMs must be a non-negative integer, got ${s.downtimeLimitMs}`);
    }
    this.settings = { ...s };
  }

  /** The `virsh migrate` argv (after `-c SRC`) for these settings; exported for tests and the README. */
  migrateArgs(uri: string): string[] {
    const { dconnuri, migrateuri } = parseIncomingUri(uri);
    const host = new URL(migrateuri).hostname;
    const args = ["migrate", "--live"];
    if (this.settings.postcopy) args.push("--postcopy");
    const bw = this.settings.maxBandwidthBytesPerSec;
    if (bw !== undefined && bw > 0) {
      // virsh takes MiB/s; never 0 (that means unlimited to libvirt).
      const mib = String(Math.max(1, Math.round(bw / MiBps)));
      args.push("--bandwidth", mib);
      if (this.settings.postcopy) args.push("--postcopy-bandwidth", mib);
    }
    args.push(this.options.domain, dconnuri, "--migrateuri", migrateuri, "--listen-address", host);
    return args;
  }

  async startMigration(uri: string): Promise<void> {
    this.requireUp("migrate");
    if (this.outgoing && !this.outgoing.exited) throw new FailedPreconditionError(`libvirt: a migration of ${this.options.domain} is already running`);
    const args = this.migrateArgs(uri);
    if (this.settings.downtimeLimitMs !== undefined && this.settings.downtimeLimitMs > 0) {
      await this.virsh(["migrate-setmaxdowntime", this.options.domain, String(this.settings.downtimeLimitMs)]);
    }
    this.lastFinal = undefined;
    const startedAt = Date.now();
    const child = this.spawnVirsh(args);
    const out: Outgoing = { child, completed: undefined, lastStatus: undefined, cancelRequested: false, exited: false, last: undefined, lastIteration: 0 };
    this.outgoing = out;
    this.log.info({ cmd: ["virsh", "-c", this.options.uri, ...args].join(" ") }, "migration started");
    let accepted = false;
    let acceptedHook: (() => void) | undefined;
    const exit = child.then(async (r) => {
      let final: MigrateStats;
      let from = "event";
      if (r.exitCode === 0) {
        const ev = await this.finalFromEvent(out);
        if (!ev) from = out.last ? "last poll" : "nothing";
        final = ev ?? { ...(out.last ?? emptyMigrateStats("completed")), status: "completed", remainingBytes: 0 };
      } else {
        from = "virsh migrate";
        const msg = cleanVirshError(r.stderr) || `virsh migrate exited with ${r.exitCode ?? r.signal}`;
        const status = out.cancelRequested && /cancel|abort/i.test(msg) ? "cancelled" : "failed";
        final = { ...(out.last ?? emptyMigrateStats(status)), status, errorDesc: msg };
      }
      // libvirt's elapsed time when it gave none: a zero would read as "not final yet".
      if (final.totalTimeMs === 0) final = { ...final, totalTimeMs: Math.max(1, Date.now() - startedAt) };
      // Only now: until the outcome is known, a poll that finds the source domain gone must not report `down`.
      this.lastFinal = final;
      out.exited = true;
      this.log.info({ status: final.status, error: final.errorDesc || undefined, transferred: final.transferredBytes, numbersFrom: from }, "virsh migrate ended");
      // Never before startMigration resolved: a final status before `migrate-accepted` would be taken for an older migration's.
      const report = () => this.outgoingStatus(out, final.status);
      if (accepted) setTimeout(report, 0);
      else acceptedHook = report;
      setTimeout(() => this.schedule(0), 0);
      return r;
    });
    // Resolves once libvirt shows the job, or the command has already ended well.
    const until = Date.now() + 30_000;
    for (;;) {
      if (out.exited) {
        const r = await exit;
        if (r.exitCode !== 0) throw new FailedPreconditionError(`virsh migrate: ${cleanVirshError(r.stderr) || `exit ${r.exitCode}`}`);
        break;
      }
      try {
        const j = parseDomjobinfoRaw(await this.virsh(["domjobinfo", this.options.domain, "--rawstats"]));
        // libvirt opens the job in its Begin phase, before QEMU got its capabilities and `migrate`:
        // only memory numbers say QEMU migrates (a migrate-postcopy before that is refused).
        if ((j.jobType === JOB_TYPE.unbounded || j.jobType === JOB_TYPE.bounded) && (j.numbers.memory_total ?? 0) > 0) break;
      } catch (err) {
        this.log.debug({ err: errorMessage(err) }, "domjobinfo while waiting for the migration job");
      }
      if (Date.now() > until) throw new UnavailableError("virsh migrate: libvirt showed no migration job within 30 s");
      await sleep(100);
    }
    accepted = true;
    if (acceptedHook) setTimeout(acceptedHook, 0);
    else this.outgoingStatus(out, "active");
    this.schedule(0);
  }

  async startPostcopy(): Promise<void> {
    this.requireUp("migrate-postcopy");
    // Right after the start QEMU may still be in setup ("Enable postcopy with migrate_set_capability before the
    // start of migration"): a few quick retries, never past the migration's end.
    for (let attempt = 1; ; attempt++) {
      try {
        await this.virsh(["migrate-postcopy", this.options.domain]);
        return;
      } catch (err) {
        if (attempt >= 10 || !this.outgoingActive || !/before the start of migration|not active|no job/i.test(errorMessage(err))) throw err;
        await sleep(200);
      }
    }
  }

  async cancelMigration(): Promise<void> {
    this.requireUp("domjobabort");
    if (this.outgoing && !this.outgoing.exited) this.outgoing.cancelRequested = true;
    await this.virsh(["domjobabort", this.options.domain]);
  }

  async queryMigration(): Promise<MigrateStats> {
    const out = this.outgoing;
    if (out && !out.exited) {
      const st = parseDomstate(await this.virsh(["domstate", "--reason", this.options.domain]));
      const j = parseDomjobinfoRaw(await this.virsh(["domjobinfo", this.options.domain, "--rawstats"]));
      if (j.jobType === JOB_TYPE.none) return out.last ?? emptyMigrateStats("setup");
      const s = jobStatsToMigrateStats(j, migrationStatusOf(st, "source") ?? "active");
      out.last = s;
      return s;
    }
    if (out?.exited && this.lastFinal) return this.lastFinal;
    // Destination, or a source that is not migrating.
    let st: DomState;
    try {
      st = parseDomstate(await this.virsh(["domstate", "--reason", this.options.domain]));
    } catch (err) {
      if (virshFailure(err) === "no-domain") return this.lastFinal ?? emptyMigrateStats("none");
      throw err;
    }
    if (this.incomingExpected || this.incomingStatus !== undefined) {
      const status = migrationStatusOf(st, "destination");
      // libvirt reports no statistics on the destination while the migration runs.
      if (status && status !== "completed") return emptyMigrateStats(status);
      // Over in libvirt, but its numbers are still being collected: the final status follows as an event.
      return emptyMigrateStats("active");
    }
    if (this.lastFinal) return this.lastFinal;
    const done = await this.completedJob();
    return done ?? emptyMigrateStats("none");
  }

  async resumeMigration(_uri: string): Promise<void> {
    // libvirt 9.0 can recover a paused post-copy (`virsh migrate --postcopy-resume`); this driver does not drive it yet.
    throw new FailedPreconditionError("libvirt driver: resuming a paused post-copy migration is not supported yet; recover it with virsh migrate --postcopy --postcopy-resume");
  }

  async recoverIncoming(_host: string): Promise<string> {
    throw new FailedPreconditionError("libvirt driver: post-copy recovery is done by libvirt on the source (virsh migrate --postcopy-resume)");
  }

  async prepareIncoming(_s: MigrationSettings, host: string): Promise<string> {
    // libvirt sets up the incoming side itself (capabilities included, from the source's flags): only the port is ours.
    try {
      const info = parseDominfo(await this.virsh(["dominfo", this.options.domain]));
      if (info.id !== undefined) {
        throw new FailedPreconditionError(`libvirt: domain ${this.options.domain} already runs on ${this.options.uri} (${info.state}); it cannot be a migration destination`);
      }
    } catch (err) {
      if (virshFailure(err) !== "no-domain") throw err;
    }
    const port = await freePort(host);
    this.incomingExpected = true;
    this.incomingStatus = undefined;
    this.lastFinal = undefined;
    this.outgoing = undefined;
    // Look at the domain at the job rate from now on, not at the idle backoff.
    this.backoff.reset();
    this.schedule(0);
    return JSON.stringify({ dconnuri: this.options.dialUri ?? this.options.uri, migrateuri: `tcp://${host}:${port}` });
  }

  // ---- the poll loop ------------------------------------------------------------------

  private get outgoingActive(): boolean {
    return this.outgoing !== undefined && !this.outgoing.exited;
  }

  private get role(): MigrationRole {
    if (this.outgoingActive) return "outgoing";
    return this.incomingExpected || this.incomingStatus !== undefined ? "incoming" : "none";
  }

  private get tracking(): boolean {
    return this.outgoingActive || this.incomingExpected || this.incomingStatus !== undefined;
  }

  private schedule(ms: number): void {
    if (this.closed) return;
    if (this.timer) clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = undefined;
      void this.poll();
    }, ms);
  }

  private async poll(): Promise<void> {
    if (this.closed || this.polling) return;
    this.polling = true;
    let next: number;
    try {
      next = await this.pollOnce();
    } catch (err) {
      this.log.warn({ err: errorMessage(err) }, "libvirt poll failed");
      next = this.options.pollMs ?? 1000;
    } finally {
      this.polling = false;
    }
    this.schedule(next);
  }

  /** One look at the domain; returns the delay before the next one. */
  private async pollOnce(): Promise<number> {
    const d = this.options.domain;
    let state: DomState | undefined;
    let id: number | undefined;
    let ramBytes = 0;
    let usedBytes = 0;
    let problem = "";
    try {
      const info = parseDominfo(await this.virsh(["dominfo", d]));
      id = info.id;
      ramBytes = info.maxMemoryBytes;
      usedBytes = info.usedMemoryBytes;
      if (id !== undefined) state = parseDomstate(await this.virsh(["domstate", "--reason", d]));
      else problem = `domain ${d} is ${info.state}`;
    } catch (err) {
      const f = virshFailure(err);
      if (f === undefined || f === "other") this.log.warn({ err: errorMessage(err) }, "libvirt: unexpected answer while polling");
      problem = errorMessage(err);
    }
    const runState = state ? runStateOf(state, this.role) : undefined;
    if (!state || runState === undefined) {
      if (state) problem = `domain ${d} is ${state.state} (${state.reason})`;
      // The source domain disappears just before `virsh migrate` returns: its exit tells the outcome, not this poll.
      if (this.outgoingActive) return this.options.jobPollMs ?? 500;
      if (this.incomingStatus !== undefined && this.incomingStatus !== "completed") {
        const status = "failed";
        this.lastFinal = emptyMigrateStats(status, `the incoming domain went away on ${this.options.uri}: ${problem}`);
        this.incomingStatus = undefined;
        this.incomingExpected = false;
        this.emit({ type: "migration-status", status });
      }
      this.goDown(problem);
      const delay = this.backoff.next();
      if (this.backoff.attempts === 1) this.log.info({ problem, retryInMs: delay }, "libvirt domain not available");
      return this.tracking ? Math.min(delay, this.options.jobPollMs ?? 500) : delay;
    }

    if (this.factsValue && this.domId !== id) this.goDown(`domain ${d} restarted (id ${this.domId} → ${id})`);
    if (!this.factsValue) {
      const balloonActualBytes = parseDommemstat(await this.virsh(["dommemstat", d])).actualBytes;
      const period = this.options.statsPeriodS ?? 2;
      if (period > 0 && this.statsEnabledFor !== id) {
        await this.virsh(["dommemstat", d, "--period", String(period), "--live"]).then(
          () => (this.statsEnabledFor = id),
          (err: unknown) => this.log.debug({ err: errorMessage(err) }, "balloon stats period not set"),
        );
      }
      this.domId = id;
      this.factsValue = { ramBytes, runState, balloonActualBytes };
      this.backoff.reset();
      this.log.info({ ...this.factsValue, id }, "libvirt domain up");
      this.emit({ type: "up", facts: this.factsValue });
    } else {
      this.setRunState(runState);
      // dominfo's Used memory is the balloon's size: report changes as QEMU's BALLOON_CHANGE would.
      if (usedBytes !== this.lastUsedBytes) this.emit({ type: "balloon-change", actualBytes: usedBytes });
    }
    this.lastUsedBytes = usedBytes;

    if (this.outgoingActive) await this.trackOutgoing(state);
    else if (this.incomingExpected || this.incomingStatus !== undefined) await this.trackIncoming(state);
    return this.tracking ? (this.options.jobPollMs ?? 500) : (this.options.pollMs ?? 1000);
  }

  private async trackOutgoing(state: DomState): Promise<void> {
    const out = this.outgoing;
    if (!out) return;
    let j;
    try {
      j = parseDomjobinfoRaw(await this.virsh(["domjobinfo", this.options.domain, "--rawstats"]));
    } catch (err) {
      this.log.debug({ err: errorMessage(err) }, "domjobinfo failed while migrating");
      return;
    }
    if (j.jobType !== JOB_TYPE.unbounded && j.jobType !== JOB_TYPE.bounded) return;
    const s = jobStatsToMigrateStats(j, migrationStatusOf(state, "source") ?? "active");
    out.last = s;
    if (out.exited) return;
    this.outgoingPass(out, s.dirtySyncCount);
    // Post-copy is never taken back: a late pre-copy answer does not undo it.
    if (!(out.lastStatus === "postcopy-active" && s.status === "active")) this.outgoingStatus(out, s.status);
  }

  private outgoingStatus(out: Outgoing, status: string): void {
    if (out.lastStatus === status) return;
    out.lastStatus = status;
    this.emit({ type: "migration-status", status });
  }

  private outgoingPass(out: Outgoing, pass: number): void {
    if (pass <= out.lastIteration) return;
    out.lastIteration = pass;
    this.emit({ type: "migration-pass", pass });
  }

  private async trackIncoming(state: DomState): Promise<void> {
    let status = migrationStatusOf(state, "destination");
    // A domain that is simply running was not seen arriving: only "migrated" or post-copy says it came in.
    if (status === "completed" && this.incomingStatus === undefined && state.reason !== "migrated") status = undefined;
    // Post-copy is never taken back by a late look at a paused domain.
    if (status === "active" && this.incomingStatus === "postcopy-active") return;
    if (status) await this.setIncomingStatus(status);
  }

  /** Destination: reports the incoming migration's status once per change; on completion keeps libvirt's numbers. */
  private async setIncomingStatus(status: string): Promise<void> {
    if (!this.incomingExpected && this.incomingStatus === undefined) return;
    if (status === this.incomingStatus) return;
    this.incomingStatus = status;
    if (status === "completed" || status === "failed") {
      // The numbers first, while queryMigration still answers "in progress"; then the final status.
      this.lastFinal =
        status === "completed"
          ? ((await this.incomingNumbers()) ?? emptyMigrateStats("completed"))
          : emptyMigrateStats("failed", `the incoming migration failed on ${this.options.uri}`);
      this.incomingExpected = false;
      this.incomingStatus = undefined;
    }
    this.emit({ type: "migration-status", status });
  }

  // ---- the event stream ------------------------------------------------------------------

  private startEvents(): void {
    if (this.closed) return;
    const child = this.spawnVirsh(["event", "--all", "--loop", "--timestamp"]);
    this.eventChild = child;
    child.stdout?.setEncoding("utf8");
    child.stdout?.on("data", (chunk: string) => {
      this.eventBackoff.reset();
      try {
        for (const e of this.eventStream.push(chunk)) this.onVirshEvent(e);
      } catch (err) {
        this.log.warn({ err: errorMessage(err) }, "unreadable virsh event");
      }
      if (this.eventFlushTimer) clearTimeout(this.eventFlushTimer);
      // virsh prints an event in one go: a quiet moment ends a job-completed block.
      if (this.eventStream.hasPending) this.eventFlushTimer = setTimeout(() => this.flushEvents(), 100);
    });
    void child.then((r) => {
      if (this.closed) return;
      const delay = this.eventBackoff.next();
      this.log[this.eventBackoff.attempts === 1 ? "info" : "debug"]({ err: cleanVirshError(r.stderr) || `exit ${r.exitCode}`, retryInMs: delay }, "virsh event stream ended; restarting");
      setTimeout(() => this.startEvents(), delay);
    });
  }

  private flushEvents(): void {
    try {
      for (const e of this.eventStream.flush()) this.onVirshEvent(e);
    } catch (err) {
      this.log.warn({ err: errorMessage(err) }, "unreadable virsh event");
    }
  }

  private onVirshEvent(e: VirshEvent): void {
    if (e.domain !== this.options.domain) return;
    this.log.debug({ event: e.kind, detail: e.kind === "lifecycle" ? `${e.event} ${e.detail}` : undefined }, "libvirt event");
    const out = this.outgoingActive ? this.outgoing : undefined;
    switch (e.kind) {
      case "migration-iteration":
        if (out) this.outgoingPass(out, e.iteration);
        return;
      case "job-completed":
        if (this.outgoing && !this.outgoing.exited) this.outgoing.completed = jobStatsToMigrateStats(e.stats, "completed");
        return;
      case "lifecycle": {
        const what = `${e.event} ${e.detail}`;
        if (out) {
          if (what === "Suspended Post-copy") {
            this.setRunState("postmigrate");
            this.outgoingStatus(out, "postcopy-active");
          } else if (what === "Suspended Migrated") {
            this.setRunState("finish-migrate");
          }
        } else if (this.incomingExpected || this.incomingStatus !== undefined) {
          if (what === "Started Migrated") void this.setIncomingStatus("active");
          else if (what === "Resumed Post-copy") void this.setIncomingStatus("postcopy-active");
          else if (what === "Resumed Migrated") void this.setIncomingStatus("completed");
          else if (what === "Stopped Failed") void this.setIncomingStatus("failed");
        }
        // Facts (run state, a new domain id) follow at once.
        this.schedule(0);
        return;
      }
      default:
        return;
    }
  }

  /** Updates the run state in the facts, with stop/resume as QMP reports them. */
  private setRunState(runState: string): void {
    const f = this.factsValue;
    if (!f || f.runState === runState) return;
    this.factsValue = { ...f, runState };
    if (f.runState === "running") this.emit({ type: "stop" });
    else if (runState === "running") this.emit({ type: "resume" });
  }

  /**
   * The destination's numbers of a completed incoming migration. The
   * "Resumed Migrated" event can come before libvirt has stored them, so
   * ask a few times (up to about 3 s) before the status is reported.
   */
  private async incomingNumbers(): Promise<MigrateStats | undefined> {
    for (let i = 0; i < 15; i++) {
      const s = await this.completedJob().catch(() => undefined);
      if (s) return s;
      await sleep(200);
    }
    return undefined;
  }

  /** `domjobinfo --completed --keep-completed --rawstats` as MigrateStats, when libvirt still has them. */
  private async completedJob(): Promise<MigrateStats | undefined> {
    const j = parseDomjobinfoRaw(await this.virsh(["domjobinfo", this.options.domain, "--completed", "--keep-completed", "--rawstats"]));
    if (j.jobType === JOB_TYPE.completed) return jobStatsToMigrateStats(j, "completed");
    if (j.jobType === JOB_TYPE.failed) return jobStatsToMigrateStats(j, "failed");
    if (j.jobType === JOB_TYPE.cancelled) return jobStatsToMigrateStats(j, "cancelled");
    return undefined;
  }

  /** The job-completed event's numbers: they arrive around the time `virsh migrate` returns; wait up to 2 s. */
  private async finalFromEvent(out: Outgoing): Promise<MigrateStats | undefined> {
    const until = Date.now() + 2000;
    while (!out.completed && Date.now() < until) await sleep(50);
    return out.completed;
  }

  private spawnVirsh(args: string[]): VirshChild {
    this.log.debug({ cmd: ["virsh", "-c", this.options.uri, ...args].join(" ") }, "virsh (child)");
    return execa(this.virshBin, ["-c", this.options.uri, ...args], CHILD_OPTIONS);
  }

  private goDown(error: string): void {
    if (!this.factsValue) return;
    this.factsValue = undefined;
    this.domId = undefined;
    this.log.info({ error }, "libvirt domain down");
    this.emit({ type: "down", error });
  }

  private emit(e: DriverEvent): void {
    try {
      this.listener(e);
    } catch (err) {
      this.log.error({ err: errorMessage(err), event: e.type }, "driver listener threw");
    }
  }
}

/** The `<source path=...>` of the unix `<channel>` whose virtio target is named `name`, from a domain XML; undefined when there is none. */
export function agentChannelPathFromXml(xml: string, name = "org.ballast.agent.0"): string | undefined {
  for (const m of xml.matchAll(/<channel\b[^>]*\btype=['"]unix['"][^>]*>([\s\S]*?)<\/channel>/g)) {
    const body = m[1] ?? "";
    const target = /<target\b[^>]*>/.exec(body)?.[0] ?? "";
    if (!/\btype=['"]virtio['"]/.test(target) || !new RegExp(`\\bname=['"]${name.replace(/\./g, "\\.")}['"]`).test(target)) continue;
    const path = /<source\b[^>]*\bpath=['"]([^'"]+)['"]/.exec(body)?.[1];
    if (path) return path.replace(/&amp;/g, "&").replace(/&apos;/g, "'").replace(/&quot;/g, '"');
  }
  return undefined;
}
