/**
 * VmSupervisor over a scripted hypervisor driver (test/helpers/fake-driver.ts),
 * a fake agent link, a fake destination peer and an in-memory migration
 * store. Real timers, with the supervisor's tick, the machine's timing and
 * the agent lease made small through the options.
 */
import { create } from "@bufbuild/protobuf";
import { pino } from "pino";
import { afterEach, describe, expect, it } from "vitest";
import { HelloSchema } from "../../gen/ballast/v1/agent_pb.js";
import { AgentState, BalloonReason, BalloonStrategy, MemorySampleSchema, MigrationMode, MigrationStatsSchema, Phase } from "../../gen/ballast/v1/common_pb.js";
import { GetIncomingResponseSchema, type GetIncomingResponse, type PeerService } from "../../gen/ballast/v1/peer_pb.js";
import type { MigrationDefaults, VmConfig } from "../../coordinator/config.js";
import type { MachineTiming } from "../../coordinator/migration-machine.js";
import type { MigrateParams, MigrationRecord } from "../../coordinator/migration-record.js";
import { MigrationStore } from "../../coordinator/migration-store.js";
import { VmSupervisor, type AgentBalloonRequest, type AgentLink } from "../../coordinator/vm-supervisor.js";
import { FailedPreconditionError } from "../../shared/errors.js";
import type { Client } from "../../shared/grpc-adapter.js";
import { silentLogger } from "../../shared/logger.js";
import { MiB, toU64 } from "../../shared/units.js";
import { FakeDriver, migrateStats, type FakeDriverOptions } from "../helpers/fake-driver.js";

const RAM = 1024 * MiB;
const LOSS_MS = 300;
const LEASE_MS = 300;
const TIMING: MachineTiming = { lossMs: LOSS_MS, pollMs: 40, cancelWaitMs: 1500, recoverEveryMs: 200 };
const TICK_MS = 20;

// ---- fakes -------------------------------------------------------------------

type PhaseSent = Parameters<AgentLink["sendPhase"]>[0] & { atMs: number };

/** An attached agent session as the supervisor sees it. */
class FakeLink implements AgentLink {
  readonly hello = create(HelloSchema, { vmId: "agent-1", agentVersion: "fake-1", capabilities: [] });
  readonly connectedAtMs = Date.now();
  readonly peer = "fake";
  readonly phases: PhaseSent[] = [];
  readonly pushes: Array<{ targetBytes: number; actualBytes: number; ramBytes: number }> = [];
  closed: string | undefined;
  /** Called (on a later macrotask) for every phase event. */
  onPhase: (e: PhaseSent) => void = () => {};
  private talking: NodeJS.Timeout | undefined;

  async sendPhase(e: Parameters<AgentLink["sendPhase"]>[0]): Promise<boolean> {
    const sent = { ...e, atMs: performance.now() };
    this.phases.push(sent);
    setTimeout(() => this.onPhase(sent), 0);
    return true;
  }

  pushBalloon(state: { targetBytes: number; actualBytes: number; ramBytes: number }): void {
    this.pushes.push(state);
  }

  close(reason: string): void {
    this.closed = reason;
    this.quiet();
  }

  /** Sends a valid sample every `everyMs` (an agent that keeps its lease). */
  talk(sup: VmSupervisor, everyMs = 50): void {
    const sample = create(MemorySampleSchema, { memTotalBytes: toU64(RAM), memFreeBytes: toU64(100 * MiB), memAvailableBytes: toU64(300 * MiB) });
    sup.agentSample(this, sample);
    this.talking = setInterval(() => sup.agentSample(this, sample), everyMs);
  }

  quiet(): void {
    if (this.talking) clearInterval(this.talking);
    this.talking = undefined;
  }

  phase(p: Phase): PhaseSent | undefined {
    return this.phases.find((e) => e.phase === p);
  }
}

/** The destination coordinator's PeerService, scripted. */
class FakePeer {
  readonly prepareCalls: Array<{ vm: string; migrationId: string; mode: MigrationMode }> = [];
  readonly getIncomingCalls: string[] = [];
  readonly recoverCalls: string[] = [];
  recoverFails = 0;
  uri = "tcp:10.0.0.2:4444";
  incoming: GetIncomingResponse = create(GetIncomingResponseSchema, {
    phase: Phase.COMPLETED,
    stats: create(MigrationStatsSchema, { status: "completed", totalTimeMs: 1200n, downtimeMs: 0n, postcopyBlocktimeMs: 77n, rawJson: '{"status":"completed"}' }),
  });

  readonly client = {
    prepareIncoming: async (req: { vm?: string; migrationId?: string; mode?: MigrationMode }) => {
      this.prepareCalls.push({ vm: req.vm ?? "", migrationId: req.migrationId ?? "", mode: req.mode ?? MigrationMode.UNSPECIFIED });
      return { uri: this.uri };
    },
    getIncoming: async (req: { migrationId?: string }) => {
      this.getIncomingCalls.push(req.migrationId ?? "");
      return this.incoming;
    },
    recoverIncoming: async (req: { migrationId?: string }) => {
      this.recoverCalls.push(req.migrationId ?? "");
      if (this.recoverFails > 0) {
        this.recoverFails--;
        throw new Error("destination not reachable");
      }
      return { uri: "tcp:10.0.0.2:5555" };
    },
    close: () => {},
  } as unknown as Client<typeof PeerService>;
}

/** A pino logger whose lines are kept for assertions. */
function capturingLogger(): { logger: pino.Logger; lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = [];
  const logger = pino({ level: "debug" }, { write: (s: string) => lines.push(JSON.parse(s) as Record<string, unknown>) });
  return { logger, lines };
}

// ---- harness -------------------------------------------------------------------

interface Harness {
  sup: VmSupervisor;
  driver: FakeDriver;
  store: MigrationStore;
  peer: FakePeer;
  logs: Array<Record<string, unknown>>;
  /** performance.now() when the harness started the supervisor. */
  t0: number;
}

const running: Array<() => Promise<void>> = [];

afterEach(async () => {
  for (const stop of running.splice(0).reverse()) await stop();
});

function harness(o: { driver?: FakeDriverOptions; store?: MigrationStore; leaseMs?: number; config?: Partial<VmConfig>; start?: boolean } = {}): Harness {
  const { logger, lines } = capturingLogger();
  const driver = new FakeDriver({ ramBytes: RAM, ...o.driver });
  const ownStore = !o.store;
  const store = o.store ?? new MigrationStore({ stateDir: "", logger: silentLogger() });
  const peer = new FakePeer();
  const defaults: MigrationDefaults = {
    maxBandwidthBytesPerSec: 1e8,
    downtimeLimitMs: 300,
    prepareDeadlineMs: 1000,
    steadyState: true,
    sampleIntervalMs: 100,
    // Long unless the test is about the lease: a silent test agent must not deflate under a migration test.
    agentLeaseMs: o.leaseMs ?? 60_000,
  };
  const sup = new VmSupervisor({
    config: { name: "vm1", qmpSocket: "/nonexistent/vm1.qmp", agentId: "agent-1", floorBytes: 128 * MiB, maxBytes: 0, agentPort: 0, ...o.config },
    defaults,
    driver,
    store,
    peer: () => peer.client,
    incomingHost: "127.0.0.1",
    logger,
    timing: TIMING,
    tickMs: TICK_MS,
    readyTimeoutMs: 1000,
  });
  const t0 = performance.now();
  if (o.start ?? true) sup.start();
  running.push(async () => {
    await sup.stop();
    if (ownStore) store.close();
  });
  return { sup, driver, store, peer, logs: lines, t0 };
}

function params(o: Partial<MigrateParams> = {}): MigrateParams {
  return {
    vm: "vm1",
    destination: "10.0.0.2:50050",
    mode: MigrationMode.PRECOPY,
    strategy: BalloonStrategy.INFLATE_THEN_MIGRATE,
    maxBandwidthBytesPerSec: 1e8,
    downtimeLimitMs: 300,
    prepareDeadlineMs: 5000,
    postcopyAfterPasses: 1,
    ...o,
  };
}

async function until(cond: () => boolean, what: string, timeoutMs = 4000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Waits until the driver is up and the supervisor has its balloon controller. */
async function upAndReady(h: Harness): Promise<void> {
  await until(() => h.sup.view().connected, "the supervisor to see the driver up");
}

const recordPhases = (r: MigrationRecord) => r.phases.map((p) => Phase[p.phase]);
const actions = (r: MigrationRecord) => r.cleanups.map((c) => c.action);

const prepareRequest = (id: string, targetBytes: number): AgentBalloonRequest => ({ targetBytes, reason: BalloonReason.PREPARE, migrationId: id, detail: "test" });

/** Starts an outgoing migration that goes straight to `migrate` (no PREPARE) and waits until QEMU reports it active. */
async function startPrecopy(h: Harness, id: string, o: Partial<MigrateParams> = {}): Promise<void> {
  h.driver.migration = migrateStats("active", { transferredBytes: 10 * MiB, remainingBytes: 500 * MiB, totalBytes: RAM });
  h.sup.startOutgoing(params({ strategy: BalloonStrategy.NONE, ...o }), id);
  await until(() => h.driver.callsOf("startMigration").length === 1, "migrate");
  await until(() => h.store.get(id).migrateIssued && h.store.get(id).phase !== Phase.UNSPECIFIED, "QEMU's migration under way");
}

// ---- PREPARE -------------------------------------------------------------------------

describe("PREPARE", { timeout: 10_000 }, () => {
  const cases: Array<{
    name: string;
    deadlineMs: number;
    agent: "requests" | "silent" | "detaches";
    /** Window for `migrate`, in ms after the PREPARE phase event. */
    migrateAfter: [number, number];
  }> = [
    { name: "the agent's PREPARE target is applied and the inflation awaited before migrate", deadlineMs: 5000, agent: "requests", migrateAfter: [600, 3000] },
    { name: "no request: migrate at the deadline", deadlineMs: 400, agent: "silent", migrateAfter: [380, 700] },
    { name: "the agent detaches before asking: migrate at once", deadlineMs: 5000, agent: "detaches", migrateAfter: [80, 500] },
  ];

  it.each(cases)("$name", async ({ deadlineMs, agent, migrateAfter }) => {
    // The guest gives up memory at 600 MiB/s: 1024 -> 512 MiB takes about 850 ms.
    const h = harness({ driver: { balloonRateBytesPerSec: 600 * MiB } });
    await upAndReady(h);
    const link = new FakeLink();
    h.sup.attachAgent(link);
    const verdicts: Array<{ accepted: boolean; appliedBytes: number; why: string }> = [];
    link.onPhase = (e) => {
      if (e.phase !== Phase.PREPARE) return;
      if (agent === "requests") setTimeout(() => void h.sup.agentBalloonRequest(link, prepareRequest(e.migrationId, 512 * MiB)).then((v) => verdicts.push(v)), 50);
      if (agent === "detaches") setTimeout(() => h.sup.detachAgent(link), 100);
    };
    h.sup.startOutgoing(params({ prepareDeadlineMs: deadlineMs }), "m-prep");

    await until(() => h.driver.callsOf("startMigration").length === 1, "migrate", 6000);
    const prepare = link.phase(Phase.PREPARE);
    expect(prepare).toBeDefined();
    expect(prepare!.deadlineUnixMs).toBeGreaterThan(Date.now() - 6000);
    const migrate = h.driver.callsOf("startMigration")[0]!;
    expect(migrate.args).toEqual([h.peer.uri]);
    const after = migrate.atMs - prepare!.atMs;
    expect(after).toBeGreaterThanOrEqual(migrateAfter[0]);
    expect(after).toBeLessThanOrEqual(migrateAfter[1]);

    const r = h.store.get("m-prep");
    expect(recordPhases(r)[0]).toBe("PREPARE");
    expect(r.prepareMs).toBeGreaterThanOrEqual(migrateAfter[0] - 20);
    if (agent === "requests") {
      expect(verdicts).toEqual([{ accepted: true, appliedBytes: 512 * MiB, why: "" }]);
      expect(h.driver.balloonCalls).toEqual([512 * MiB]);
      expect(h.driver.callsOf("setBalloon")[0]!.atMs).toBeLessThan(migrate.atMs);
      // Inflation awaited: the guest was within the controller's tolerance (8 MiB) when migrate went out.
      expect(migrate.actualBytes).toBeLessThanOrEqual(512 * MiB + 8 * MiB);
    } else {
      expect(h.driver.balloonCalls).toEqual([]);
      expect(migrate.actualBytes).toBe(RAM);
    }
    if (agent === "detaches") expect(r.agentState).toBe(AgentState.DISCONNECTED);
  });
});

// ---- outcomes -------------------------------------------------------------------------

describe("outcomes", { timeout: 10_000 }, () => {
  /** Balloon at 900 MiB before the migration; the agent inflates to 512 MiB in PREPARE; QEMU goes active. */
  async function inflatedAndActive(id: string): Promise<{ h: Harness; link: FakeLink }> {
    const h = harness({ driver: { balloonActualBytes: 900 * MiB } });
    await upAndReady(h);
    const link = new FakeLink();
    h.sup.attachAgent(link);
    link.talk(h.sup);
    link.onPhase = (e) => {
      if (e.phase === Phase.PREPARE) void h.sup.agentBalloonRequest(link, prepareRequest(e.migrationId, 512 * MiB));
    };
    h.driver.migration = migrateStats("active", { transferredBytes: 10 * MiB, remainingBytes: 300 * MiB, totalBytes: RAM });
    h.sup.startOutgoing(params(), id);
    await until(() => h.driver.callsOf("startMigration").length === 1, "migrate");
    await until(() => h.store.get(id).phase === Phase.PRECOPY_PASS, "PRECOPY_PASS");
    return { h, link };
  }

  it("a migration through to COMPLETED writes its phases in order, both sides' stats, and leaves the balloon inflated", async () => {
    const { h } = await inflatedAndActive("m-ok");
    h.driver.emit({ type: "migration-pass", pass: 2 });
    h.driver.migration = migrateStats("active", { transferredBytes: 400 * MiB, remainingBytes: 10 * MiB, totalBytes: RAM });
    await until(() => h.store.get("m-ok").transferredBytes === 400 * MiB, "progress");
    h.driver.emit({ type: "stop" });
    await until(() => h.store.get("m-ok").phase === Phase.SWITCHOVER, "SWITCHOVER");
    h.driver.migration = migrateStats("completed", { transferredBytes: 420 * MiB, totalBytes: RAM });
    h.driver.setRunState("postmigrate");
    const r = await h.sup.whenDone("m-ok");

    expect(r.phase).toBe(Phase.COMPLETED);
    expect(r.error).toBe("");
    expect(recordPhases(r)).toEqual(["PREPARE", "PRECOPY_PASS", "PRECOPY_PASS", "SWITCHOVER", "COMPLETED"]);
    expect(r.phases.map((p) => p.pass)).toEqual([0, 1, 2, 2, 2]);
    const at = r.phases.map((p) => p.atMs);
    expect([...at].sort((a, b) => a - b)).toEqual(at);
    expect(r.migrateIssued).toBe(true);
    expect(r.balloonTargetBeforeBytes).toBe(900 * MiB);
    expect(r.ramBytes).toBe(RAM);
    expect(r.sourceStats).toMatchObject({ status: "completed", totalTimeMs: 1234, transferredBytes: 420 * MiB });
    expect(r.destinationStats).toMatchObject({ status: "completed", totalTimeMs: 1200, postcopyBlocktimeMs: 77 });
    expect(h.peer.prepareCalls).toEqual([{ vm: "vm1", migrationId: "m-ok", mode: MigrationMode.PRECOPY }]);
    expect(h.peer.getIncomingCalls).toContain("m-ok");
    // The source of a completed migration keeps its balloon: no restore.
    expect(h.driver.balloonCalls).toEqual([512 * MiB]);
    expect(actions(r)).not.toContain("restore-balloon");
    // The events on disk fold to what whenDone returned.
    const events = h.store.events("m-ok").map((e) => e.type);
    expect(events[0]).toBe("created");
    expect(events).toContain("final");
    expect(events.indexOf("migrate-issued")).toBeLessThan(events.indexOf("final"));
  });

  const endings: Array<{ name: string; end: (h: Harness, id: string) => Promise<unknown>; phase: Phase; error: RegExp }> = [
    {
      name: "FAILED (QEMU reports failed)",
      end: async (h) => {
        h.driver.migration = migrateStats("failed", { errorDesc: "Unable to write to socket" });
      },
      phase: Phase.FAILED,
      error: /QEMU reports the migration failed/,
    },
    { name: "CANCELLED (by request in pre-copy)", end: (h, id) => h.sup.cancel(id), phase: Phase.CANCELLED, error: /cancelled by request/ },
  ];

  it.each(endings)("$name restores the balloon to the pre-migration target", async ({ end, phase, error }) => {
    const id = `m-${Phase[phase]}`;
    const { h } = await inflatedAndActive(id);
    expect(h.driver.balloonTargetBytes).toBe(512 * MiB);
    await end(h, id);
    const r = await h.sup.whenDone(id);
    expect(r.phase).toBe(phase);
    expect(r.error).toMatch(error);
    expect(recordPhases(r).at(-1)).toBe(Phase[phase]);
    // Restored: the last target set is the one from before the migration, and the record says so.
    expect(h.driver.balloonCalls).toEqual([512 * MiB, 900 * MiB]);
    expect(h.driver.balloonTargetBytes).toBe(900 * MiB);
    const restore = r.cleanups.find((c) => c.action === "restore-balloon");
    expect(restore).toMatchObject({ ok: true });
    expect(r.balloonTargetBytes).toBe(900 * MiB);
    expect(r.sourceStats?.status).toBe(phase === Phase.FAILED ? "failed" : "cancelled");
    // No destination numbers for a migration that did not complete.
    expect(r.destinationStats).toBeUndefined();
  });
});

// ---- cancel -------------------------------------------------------------------------

describe("cancel", { timeout: 10_000 }, () => {
  it("in PREPARE answers CANCELLED at once and never issues migrate", async () => {
    const h = harness();
    await upAndReady(h);
    const link = new FakeLink();
    h.sup.attachAgent(link);
    h.sup.startOutgoing(params({ prepareDeadlineMs: 5000 }), "m-c1");
    await until(() => link.phase(Phase.PREPARE) !== undefined, "PREPARE");
    const t = performance.now();
    const r = await h.sup.cancel("m-c1");
    expect(performance.now() - t).toBeLessThan(1000);
    expect(r.phase).toBe(Phase.CANCELLED);
    expect(r.error).toBe("cancelled by request");
    expect(recordPhases(r)).toEqual(["PREPARE", "CANCELLED"]);
    await sleep(100);
    expect(h.driver.callsOf("startMigration")).toHaveLength(0);
    expect(h.driver.callsOf("cancelMigration")).toHaveLength(0);
    expect(link.phases.map((p) => Phase[p.phase])).toEqual(["PREPARE", "CANCELLED"]);
  });

  it("in pre-copy cancels QEMU's migration and answers CANCELLED once QEMU confirms", async () => {
    const h = harness();
    await upAndReady(h);
    await startPrecopy(h, "m-c2");
    const r = await h.sup.cancel("m-c2");
    expect(r.phase).toBe(Phase.CANCELLED);
    expect(r.error).toBe("cancelled by request");
    expect(h.driver.callsOf("cancelMigration")).toHaveLength(1);
    // A second cancel of a finished migration is refused with the reason.
    await expect(h.sup.cancel("m-c2")).rejects.toThrow(/already CANCELLED/);
  });

  it("in post-copy is refused with FailedPreconditionError naming the reason, and nothing is cancelled", async () => {
    const h = harness();
    await upAndReady(h);
    await startPrecopy(h, "m-c3", { mode: MigrationMode.POSTCOPY });
    h.driver.migration = migrateStats("postcopy-active");
    await until(() => h.store.get("m-c3").phase === Phase.POSTCOPY_ACTIVE, "POSTCOPY_ACTIVE");
    const err = await h.sup.cancel("m-c3").catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FailedPreconditionError);
    expect((err as Error).message).toMatch(/in post-copy: the guest already runs on the destination, and cancelling would lose it/);
    await sleep(100);
    expect(h.driver.callsOf("cancelMigration")).toHaveLength(0);
    expect(h.store.get("m-c3").phase).toBe(Phase.POSTCOPY_ACTIVE);
    // It still completes normally.
    h.driver.migration = migrateStats("completed");
    await expect(h.sup.whenDone("m-c3")).resolves.toMatchObject({ phase: Phase.COMPLETED });
  });
});

// ---- hypervisor loss -------------------------------------------------------------------------

describe("the hypervisor goes away mid-migration", { timeout: 10_000 }, () => {
  const returns: Array<{ status: string; cancels: boolean; restores: boolean; action: string }> = [
    { status: "active", cancels: true, restores: true, action: "cancel-qemu-migration" },
    { status: "failed", cancels: false, restores: true, action: "restore-balloon" },
    { status: "completed", cancels: false, restores: false, action: "found-migrated" },
  ];

  it.each(returns)("FAILED after lossMs; back with query-migrate $status: cancel $cancels, restore $restores", async ({ status, cancels, restores, action }) => {
    const h = harness({ driver: { balloonActualBytes: 900 * MiB } });
    await upAndReady(h);
    const link = new FakeLink();
    h.sup.attachAgent(link);
    link.talk(h.sup);
    link.onPhase = (e) => {
      if (e.phase === Phase.PREPARE) void h.sup.agentBalloonRequest(link, prepareRequest(e.migrationId, 512 * MiB));
    };
    h.driver.migration = migrateStats("active", { transferredBytes: 10 * MiB });
    h.sup.startOutgoing(params(), "m-loss");
    await until(() => h.store.get("m-loss").phase === Phase.PRECOPY_PASS, "PRECOPY_PASS");

    const downAt = performance.now();
    h.driver.down("socket closed");
    const r = await h.sup.whenDone("m-loss");
    const tookMs = performance.now() - downAt;
    expect(r.phase).toBe(Phase.FAILED);
    expect(r.error).toMatch(/lost the connection to the source hypervisor mid-migration for 300 ms/);
    expect(tookMs).toBeGreaterThanOrEqual(LOSS_MS - 10);
    expect(tookMs).toBeLessThan(LOSS_MS + 400);
    // Nothing could be asked of the hypervisor meanwhile.
    expect(h.driver.callsOf("cancelMigration")).toHaveLength(0);
    expect(h.driver.balloonCalls).toEqual([512 * MiB]);
    // While down, the VM's state is not shown as current.
    expect(h.sup.view()).toMatchObject({ connected: false, runState: "unknown", balloonActualBytes: undefined });

    // QEMU is back, and says where its migration got to.
    h.driver.migration = migrateStats(status);
    h.driver.up();
    await until(() => h.store.get("m-loss").cleanups.some((c) => c.action === action), `cleanup ${action}`);
    if (restores) await until(() => actions(h.store.get("m-loss")).includes("restore-balloon"), "restore-balloon");
    await sleep(100);
    const after = h.store.get("m-loss");
    expect(h.driver.callsOf("cancelMigration")).toHaveLength(cancels ? 1 : 0);
    expect(h.driver.balloonCalls).toEqual(restores ? [512 * MiB, 900 * MiB] : [512 * MiB]);
    expect(after.cleanups.every((c) => c.ok)).toBe(true);
    expect(actions(after)).toEqual(
      status === "active" ? ["cancel-qemu-migration", "restore-balloon"] : status === "failed" ? ["restore-balloon"] : ["found-migrated"],
    );
    // The outcome stands: cleanups come after the final event.
    expect(after.phase).toBe(Phase.FAILED);
  });
});

describe("the hypervisor goes away as the migration fails", { timeout: 10_000 }, () => {
  it("the restore is kept and done when the hypervisor is back", async () => {
    const h = harness({ driver: { balloonActualBytes: 900 * MiB } });
    await upAndReady(h);
    const link = new FakeLink();
    h.sup.attachAgent(link);
    link.talk(h.sup);
    await h.sup.agentBalloonRequest(link, { targetBytes: 600 * MiB, reason: BalloonReason.STEADY_STATE, migrationId: "", detail: "t" });
    const before = h.driver.balloonCalls.length;
    // The destination refuses, and the source's QMP drops at that very moment.
    (h.peer.client as unknown as { prepareIncoming: () => Promise<never> }).prepareIncoming = async () => {
      h.driver.down("socket closed");
      throw new Error("destination refused");
    };
    h.sup.startOutgoing(params({ strategy: BalloonStrategy.NONE }), "m-late");
    const r = await h.sup.whenDone("m-late");
    expect(r.phase).toBe(Phase.FAILED);
    expect(r.cleanups.some((c) => c.action === "restore-balloon" && c.ok)).toBe(false);
    expect(h.driver.balloonCalls.length).toBe(before);

    h.driver.migration = migrateStats("none");
    h.driver.up();
    await until(() => h.store.get("m-late").cleanups.some((c) => c.action === "restore-balloon" && c.ok), "the restore after the reconnect");
    expect(h.driver.balloonCalls.at(-1)).toBe(600 * MiB);
  });
});

// ---- restart resume -------------------------------------------------------------------------

describe("resume after a coordinator restart", { timeout: 10_000 }, () => {
  /** The log a coordinator left behind mid pre-copy: created, vm, phase PRECOPY_PASS, migrate-issued. */
  function seed(id: string): MigrationStore {
    const store = new MigrationStore({ stateDir: "", logger: silentLogger() });
    const t = Date.now() - 5000;
    store.create({ type: "created", atMs: t, id, direction: "outgoing", params: params() });
    store.append(id, { type: "vm", atMs: t + 1, ramBytes: RAM, balloonTargetBeforeBytes: 900 * MiB });
    store.append(id, { type: "phase", atMs: t + 2, phase: Phase.PREPARE, pass: 0 });
    store.append(id, { type: "phase", atMs: t + 3, phase: Phase.PRECOPY_PASS, pass: 1 });
    store.append(id, { type: "migrate-issued", atMs: t + 4 });
    running.push(async () => store.close());
    return store;
  }

  const cases: Array<{ name: string; qemu: "active" | "none" | "never up"; phase: Phase; error: RegExp; restores: boolean }> = [
    { name: "QEMU still migrating: tracked to completion", qemu: "active", phase: Phase.COMPLETED, error: /^$/, restores: false },
    { name: "QEMU has no migration: FAILED and the balloon restored", qemu: "none", phase: Phase.FAILED, error: /after the coordinator restarted, QEMU reports no migration/, restores: true },
    { name: "the hypervisor never comes back: FAILED after lossMs", qemu: "never up", phase: Phase.FAILED, error: /after the coordinator restarted for 300 ms/, restores: false },
  ];

  it.each(cases)("$name", async ({ qemu, phase, error, restores }) => {
    const store = seed("m-r");
    const h = harness({ store, driver: { balloonActualBytes: 512 * MiB, upOnStart: qemu !== "never up" } });
    if (qemu !== "never up") h.driver.migration = migrateStats(qemu, { transferredBytes: 200 * MiB });
    if (qemu === "active") {
      await until(() => h.driver.callsOf("queryMigration").length > 0, "query-migrate after the restart");
      h.driver.migration = migrateStats("completed", { transferredBytes: 600 * MiB });
    }
    const r = await h.sup.whenDone("m-r");
    const tookMs = performance.now() - h.t0;
    expect(r.phase).toBe(phase);
    expect(r.error).toMatch(error);
    expect(actions(r)[0]).toBe("resume");
    if (qemu === "active") {
      expect(recordPhases(r)).toEqual(["PREPARE", "PRECOPY_PASS", "COMPLETED"]);
      expect(r.sourceStats).toMatchObject({ status: "completed", transferredBytes: 600 * MiB });
      expect(r.destinationStats).toMatchObject({ status: "completed" });
      expect(h.driver.callsOf("cancelMigration")).toHaveLength(0);
    }
    if (qemu === "never up") {
      expect(tookMs).toBeGreaterThanOrEqual(LOSS_MS - 10);
      expect(tookMs).toBeLessThan(LOSS_MS + 400);
      expect(h.driver.calls.map((c) => c.method)).toEqual(["start"]);
    }
    if (restores) {
      await until(() => actions(h.store.get("m-r")).includes("restore-balloon"), "restore-balloon");
      expect(h.driver.balloonCalls).toEqual([900 * MiB]);
    } else {
      await sleep(100);
      expect(h.driver.balloonCalls).toEqual([]);
    }

    if (qemu === "never up") {
      // When QEMU finally answers, the cleanup left for it runs: its migration is cancelled and the balloon restored.
      h.driver.migration = migrateStats("active");
      h.driver.up();
      await until(() => actions(h.store.get("m-r")).includes("restore-balloon"), "pending cleanup");
      expect(actions(h.store.get("m-r"))).toEqual(["resume", "cancel-qemu-migration", "restore-balloon"]);
      expect(h.driver.callsOf("cancelMigration")).toHaveLength(1);
      expect(h.driver.balloonCalls).toEqual([900 * MiB]);
    }
  });

  it("resumes only this VM's migrations", async () => {
    const store = seed("m-other");
    // The seeded record is for "vm1"; this supervisor is "vm2".
    const h = harness({ store, config: { name: "vm2" } });
    await upAndReady(h);
    await sleep(LOSS_MS + 100);
    expect(store.get("m-other").phase).toBe(Phase.PRECOPY_PASS);
    expect(actions(store.get("m-other"))).toEqual([]);
    expect(h.sup.view().migrationId).toBe("");
  });
});

// ---- the lease and the backstop -------------------------------------------------------------------------

const hostDeflates = (logs: Array<Record<string, unknown>>) => logs.filter((l) => l.msg === "balloon deflated by the host");

describe("the agent lease", { timeout: 10_000 }, () => {
  it("a silent agent's balloon is deflated to max after agentLeaseMs, once", async () => {
    const h = harness({ leaseMs: LEASE_MS, driver: { balloonActualBytes: 600 * MiB } });
    await upAndReady(h);
    const upAt = performance.now();
    const link = new FakeLink();
    h.sup.attachAgent(link);
    await until(() => h.driver.balloonCalls.length > 0, "the lease deflate", 2000);
    const deflateAt = h.driver.callsOf("setBalloon")[0]!.atMs;
    expect(deflateAt - upAt).toBeGreaterThanOrEqual(LEASE_MS - 10);
    expect(deflateAt - upAt).toBeLessThan(LEASE_MS + 300);
    expect(h.driver.balloonCalls).toEqual([RAM]);
    const logged = hostDeflates(h.logs);
    expect(logged).toHaveLength(1);
    expect(logged[0]).toMatchObject({ reason: "LEASE", applied: RAM });
    await sleep(LEASE_MS * 2);
    expect(h.driver.balloonCalls).toEqual([RAM]);
  });

  it("an agent that keeps talking keeps its lease", async () => {
    const h = harness({ leaseMs: LEASE_MS, driver: { balloonActualBytes: 600 * MiB } });
    await upAndReady(h);
    const link = new FakeLink();
    h.sup.attachAgent(link);
    link.talk(h.sup, 50);
    await sleep(LEASE_MS * 3);
    expect(h.driver.balloonCalls).toEqual([]);
    expect(hostDeflates(h.logs)).toHaveLength(0);
    // Once it falls silent, the lease runs out.
    link.quiet();
    await until(() => h.driver.balloonCalls.length > 0, "the lease deflate", 2000);
    expect(h.driver.balloonCalls).toEqual([RAM]);
  });

  it("never deflates the source of a running outgoing migration", async () => {
    const h = harness({ leaseMs: LEASE_MS, driver: { balloonActualBytes: 600 * MiB } });
    await upAndReady(h);
    await startPrecopy(h, "m-lease");
    await sleep(LEASE_MS * 3);
    expect(h.driver.balloonCalls).toEqual([]);
    expect(hostDeflates(h.logs)).toHaveLength(0);
    expect(h.store.get("m-lease").phase).toBe(Phase.PRECOPY_PASS);
  });

  it("does nothing when the balloon is at max", async () => {
    const h = harness({ leaseMs: LEASE_MS });
    await upAndReady(h);
    await sleep(LEASE_MS * 2);
    expect(h.driver.balloonCalls).toEqual([]);
  });
});

describe("the guest-stats backstop", { timeout: 10_000 }, () => {
  const cases: Array<{ name: string; availableMiB: number | undefined; lastUpdateS: number; deflates: boolean }> = [
    { name: "available below 64 MiB deflates even while the agent talks", availableMiB: 32, lastUpdateS: 1_700_000_000, deflates: true },
    { name: "available above 64 MiB leaves the balloon", availableMiB: 200, lastUpdateS: 1_700_000_000, deflates: false },
    { name: "stats never updated by the guest are ignored", availableMiB: 1, lastUpdateS: 0, deflates: false },
    { name: "no available-memory stat is ignored", availableMiB: undefined, lastUpdateS: 1_700_000_000, deflates: false },
  ];

  it.each(cases)("$name", async ({ availableMiB, lastUpdateS, deflates }) => {
    const h = harness({ leaseMs: LEASE_MS, driver: { balloonActualBytes: 600 * MiB } });
    h.driver.guestStats = { availableBytes: availableMiB === undefined ? undefined : availableMiB * MiB, freeBytes: 10 * MiB, diskCachesBytes: 0, lastUpdateS };
    await upAndReady(h);
    const link = new FakeLink();
    h.sup.attachAgent(link);
    link.talk(h.sup, 50);
    // Within the lease: only the backstop can act.
    await sleep(LEASE_MS - 50);
    expect(h.driver.callsOf("guestMemoryStats").length).toBeGreaterThan(0);
    if (deflates) {
      expect(h.driver.balloonCalls).toEqual([RAM]);
      expect(hostDeflates(h.logs)[0]).toMatchObject({ reason: "BACKSTOP" });
    } else {
      await sleep(LEASE_MS);
      expect(h.driver.balloonCalls).toEqual([]);
    }
  });
});

// ---- view -------------------------------------------------------------------------

describe("view()", () => {
  it.each([
    { driverKeepsStaleFacts: false },
    { driverKeepsStaleFacts: true },
  ])("while the driver is down shows no current state (driver keeps stale facts: $driverKeepsStaleFacts)", async ({ driverKeepsStaleFacts }) => {
    const h = harness({ driver: { balloonActualBytes: 700 * MiB, keepFactsWhenDown: driverKeepsStaleFacts } });
    await upAndReady(h);
    expect(h.sup.view()).toMatchObject({ name: "vm1", driver: "fake", connected: true, runState: "running", ramBytes: RAM, balloonActualBytes: 700 * MiB, maxBytes: RAM });
    h.driver.down();
    const v = h.sup.view();
    expect(v.connected).toBe(false);
    expect(v.runState).toBe("unknown");
    expect(v.balloonActualBytes).toBeUndefined();
    expect(v.balloonTargetBytes).toBeUndefined();
    h.driver.up();
    expect(h.sup.view()).toMatchObject({ connected: true, runState: "running", balloonActualBytes: 700 * MiB });
  });
});

// ---- agent balloon requests -------------------------------------------------------------------------

describe("agent balloon requests go through the guard", { timeout: 10_000 }, () => {
  const cases: Array<{ name: string; migrating: boolean; reason: BalloonReason; targetMiB: number; accepted: boolean; why?: RegExp }> = [
    { name: "a steady-state shrink during a migration is refused", migrating: true, reason: BalloonReason.STEADY_STATE, targetMiB: 400, accepted: false, why: /steady-state shrink refused while migration m-g is PRECOPY_PASS/ },
    { name: "DEMAND growth during a migration is applied", migrating: true, reason: BalloonReason.DEMAND, targetMiB: 800, accepted: true },
    { name: "a DEMAND shrink is refused", migrating: false, reason: BalloonReason.DEMAND, targetMiB: 400, accepted: false, why: /DEMAND request would shrink/ },
    { name: "a steady-state shrink outside a migration is applied", migrating: false, reason: BalloonReason.STEADY_STATE, targetMiB: 400, accepted: true },
    { name: "a PREPARE request without a migration is refused", migrating: false, reason: BalloonReason.PREPARE, targetMiB: 400, accepted: false, why: /none such is outgoing here/ },
  ];

  it.each(cases)("$name", async ({ migrating, reason, targetMiB, accepted, why }) => {
    const h = harness({ driver: { balloonActualBytes: 600 * MiB } });
    await upAndReady(h);
    const link = new FakeLink();
    h.sup.attachAgent(link);
    if (migrating) await startPrecopy(h, "m-g");
    const v = await h.sup.agentBalloonRequest(link, { targetBytes: targetMiB * MiB, reason, migrationId: "", detail: "test" });
    expect(v.accepted).toBe(accepted);
    if (accepted) {
      expect(v.appliedBytes).toBe(targetMiB * MiB);
      expect(h.driver.balloonCalls).toEqual([targetMiB * MiB]);
    } else {
      expect(v.why).toMatch(why!);
      expect(h.driver.balloonCalls).toEqual([]);
    }
  });

  it("a request from a replaced session is ignored", async () => {
    const h = harness({ driver: { balloonActualBytes: 600 * MiB } });
    await upAndReady(h);
    const old = new FakeLink();
    h.sup.attachAgent(old);
    expect(h.sup.attachAgent(new FakeLink())).toBe(old);
    const v = await h.sup.agentBalloonRequest(old, { targetBytes: 800 * MiB, reason: BalloonReason.DEMAND, migrationId: "", detail: "" });
    expect(v).toEqual({ accepted: false, appliedBytes: 0, why: "session replaced" });
    expect(h.driver.balloonCalls).toEqual([]);
  });

  it("the attached agent is told the balloon state", async () => {
    const h = harness({ driver: { balloonActualBytes: 600 * MiB } });
    await upAndReady(h);
    const link = new FakeLink();
    h.sup.attachAgent(link);
    expect(link.pushes[0]).toEqual({ targetBytes: 600 * MiB, actualBytes: 600 * MiB, ramBytes: RAM });
    h.driver.emit({ type: "balloon-change", actualBytes: 650 * MiB });
    expect(link.pushes.at(-1)).toMatchObject({ actualBytes: 650 * MiB });
  });
});

// ---- the agent's balloon budget -------------------------------------------------------------------------

describe("the agent's balloon budget", { timeout: 15_000 }, () => {
  it("5000 alternating RESTORE requests reach QEMU only within the budget", async () => {
    const h = harness({ driver: { balloonActualBytes: 900 * MiB } });
    await upAndReady(h);
    const link = new FakeLink();
    h.sup.attachAgent(link);
    const started = performance.now();
    const results = await Promise.all(
      Array.from({ length: 5000 }, (_, i) =>
        h.sup.agentBalloonRequest(link, { targetBytes: (i % 2 === 0 ? 300 : 900) * MiB, reason: BalloonReason.RESTORE, migrationId: "", detail: "flood" }),
      ),
    );
    await sleep(600);
    const seconds = (performance.now() - started) / 1000;
    // At most SHRINK_BURST shrinks plus the refill, and grows at most one per 250 ms (plus one), coalesced.
    const shrinks = h.driver.balloonCalls.filter((b) => b < 900 * MiB).length;
    expect(shrinks).toBeLessThanOrEqual(3 + Math.ceil(seconds * 0.5));
    expect(h.driver.balloonCalls.length).toBeLessThanOrEqual(3 + Math.ceil(seconds * 0.5) + Math.ceil((seconds * 1000) / 250) + 1);
    expect(results.filter((r) => !r.accepted && /rate limited/.test(r.why)).length).toBeGreaterThan(2000);
    expect([...h.sup.refusedRequests().values()].reduce((a, b) => a + b, 0)).toBeGreaterThan(2000);
    // Refusals are logged at most once per kind per 10 s.
    expect(h.logs.filter((l) => l.msg === "balloon request refused").length).toBeLessThanOrEqual(2);
  });

  it("a grow under real pressure goes through within 250 ms even with the shrink budget spent", async () => {
    const h = harness({ driver: { balloonActualBytes: 900 * MiB } });
    await upAndReady(h);
    const link = new FakeLink();
    h.sup.attachAgent(link);
    for (const t of [800, 700, 600, 500]) await h.sup.agentBalloonRequest(link, { targetBytes: t * MiB, reason: BalloonReason.STEADY_STATE, migrationId: "", detail: "" });
    const refused = await h.sup.agentBalloonRequest(link, { targetBytes: 400 * MiB, reason: BalloonReason.STEADY_STATE, migrationId: "", detail: "" });
    expect(refused.accepted).toBe(false);
    const t0 = performance.now();
    const v = await h.sup.agentBalloonRequest(link, { targetBytes: 1000 * MiB, reason: BalloonReason.DEMAND, migrationId: "", detail: "pressure" });
    expect(v.accepted).toBe(true);
    expect(performance.now() - t0).toBeLessThan(400);
    expect(h.driver.balloonCalls.at(-1)).toBe(1000 * MiB);
  });

  it("the same target twice costs no QEMU command", async () => {
    const h = harness({ driver: { balloonActualBytes: 900 * MiB } });
    await upAndReady(h);
    const link = new FakeLink();
    h.sup.attachAgent(link);
    await h.sup.agentBalloonRequest(link, { targetBytes: 700 * MiB, reason: BalloonReason.STEADY_STATE, migrationId: "", detail: "" });
    for (let i = 0; i < 50; i++) await h.sup.agentBalloonRequest(link, { targetBytes: 700 * MiB, reason: BalloonReason.STEADY_STATE, migrationId: "", detail: "" });
    expect(h.driver.balloonCalls).toEqual([700 * MiB]);
  });
});

// ---- post-copy paused -------------------------------------------------------------------------

describe("post-copy paused by a broken stream", { timeout: 10_000 }, () => {
  it("the source keeps asking the destination to listen again and resumes there; the record says paused, then recovered", async () => {
    const h = harness({ driver: { balloonActualBytes: 900 * MiB } });
    await upAndReady(h);
    h.peer.recoverFails = 2;
    await startPrecopy(h, "m-pp", { mode: MigrationMode.POSTCOPY });
    h.driver.emit({ type: "migration-status", status: "postcopy-active" });
    await until(() => h.store.get("m-pp").phase === Phase.POSTCOPY_ACTIVE, "POSTCOPY_ACTIVE");
    h.driver.migration = migrateStats("postcopy-paused");
    h.driver.emit({ type: "migration-status", status: "postcopy-paused" });
    await until(() => h.driver.callsOf("resumeMigration").length === 1, "a resume after two failed recover calls");
    expect(h.peer.recoverCalls.length).toBe(3);
    expect(h.driver.callsOf("resumeMigration")[0]?.args[0]).toBe("tcp:10.0.0.2:5555");
    expect(actions(h.store.get("m-pp"))).toContain("postcopy-paused");
    h.driver.migration = migrateStats("postcopy-active");
    h.driver.emit({ type: "migration-status", status: "postcopy-active" });
    await until(() => actions(h.store.get("m-pp")).includes("postcopy-recovered"), "recovered");
    // Never cancelled, and it can still complete.
    expect(h.driver.callsOf("cancelMigration")).toHaveLength(0);
    h.driver.migration = migrateStats("completed");
    h.driver.emit({ type: "migration-status", status: "completed" });
    expect((await h.sup.whenDone("m-pp")).phase).toBe(Phase.COMPLETED);
  });
});

// ---- incoming migrations that never began; QEMU's own error text -------------------------------------------

describe("incoming and failure text", { timeout: 10_000 }, () => {
  it("a new PrepareIncoming supersedes an incoming migration whose source never started sending", async () => {
    const h = harness({ driver: { runState: "inmigrate" } });
    await upAndReady(h);
    h.driver.migration = migrateStats("none");
    await h.sup.prepareIncoming("in-1", MigrationMode.PRECOPY);
    expect(h.sup.view().migrationId).toBe("in-1");
    await h.sup.prepareIncoming("in-2", MigrationMode.PRECOPY);
    const old = h.store.get("in-1");
    expect(old.phase).toBe(Phase.FAILED);
    expect(old.error).toMatch(/superseded by migration in-2/);
    expect(h.sup.view().migrationId).toBe("in-2");
  });

  it("an incoming migration under way is not superseded", async () => {
    const h = harness({ driver: { runState: "inmigrate" } });
    await upAndReady(h);
    await h.sup.prepareIncoming("in-a", MigrationMode.PRECOPY);
    h.driver.migration = migrateStats("active");
    h.driver.emit({ type: "migration-status", status: "active" });
    await expect(h.sup.prepareIncoming("in-b", MigrationMode.PRECOPY)).rejects.toThrow(/already in migration in-a/);
  });

  it("a failure QEMU reports carries QEMU's own error-desc", async () => {
    const h = harness({ driver: { balloonActualBytes: 900 * MiB } });
    await upAndReady(h);
    await startPrecopy(h, "m-ed");
    h.driver.migration = migrateStats("failed", { errorDesc: "Unable to write to socket: Connection reset by peer" });
    h.driver.emit({ type: "migration-status", status: "failed" });
    const r = await h.sup.whenDone("m-ed");
    expect(r.phase).toBe(Phase.FAILED);
    expect(r.error).toBe("QEMU reports the migration failed: Unable to write to socket: Connection reset by peer");
  });
});

describe("incoming whose QEMU was replaced", { timeout: 10_000 }, () => {
  it("a new PrepareIncoming ends an incoming migration whose QEMU reports no migration any more", async () => {
    const h = harness({ driver: { runState: "inmigrate" } });
    await upAndReady(h);
    await h.sup.prepareIncoming("in-x", MigrationMode.PRECOPY);
    h.driver.emit({ type: "migration-status", status: "active" });
    await sleep(50);
    // The lab (or an operator) replaced the destination QEMU: a fresh one has no migration.
    h.driver.migration = migrateStats("none");
    await h.sup.prepareIncoming("in-y", MigrationMode.PRECOPY);
    expect(h.store.get("in-x").phase).toBe(Phase.FAILED);
    expect(h.store.get("in-x").error).toMatch(/no migration any more/);
    expect(h.sup.view().migrationId).toBe("in-y");
  });
});

describe("the PREPARE budget", { timeout: 10_000 }, () => {
  it("steady-state shrinks that spent the shrink budget do not starve the migration's PREPARE target", async () => {
    const h = harness({ driver: { balloonActualBytes: 900 * MiB } });
    await upAndReady(h);
    const link = new FakeLink();
    h.sup.attachAgent(link);
    for (const t of [880, 860, 840, 820]) await h.sup.agentBalloonRequest(link, { targetBytes: t * MiB, reason: BalloonReason.STEADY_STATE, migrationId: "", detail: "" });
    link.onPhase = (e) => {
      if (e.phase === Phase.PREPARE) void h.sup.agentBalloonRequest(link, prepareRequest(e.migrationId, 512 * MiB));
    };
    h.driver.migration = migrateStats("active");
    h.sup.startOutgoing(params({ prepareDeadlineMs: 3000 }), "m-pb");
    await until(() => h.driver.balloonCalls.includes(512 * MiB), "the PREPARE target applied", 2000);
  });
});
