// The orchestrator's PREPARE wait against fakes: the "zero-free" ack is waited for, but never past the deadline.
import { EventEmitter } from "node:events";
import { describe, expect, it } from "vitest";
import type { PhaseAck } from "../../gen/ballast/v1/agent_pb.js";
import { BalloonReason, BalloonStrategy, MigrationMode, Phase } from "../../gen/ballast/v1/common_pb.js";
import type { AgentHub } from "../../coordinator/agent-hub.js";
import { MigrationOrchestrator, ZERO_FREE_CAPABILITY } from "../../coordinator/migration-orchestrator.js";
import type { MigrateParams } from "../../coordinator/migration-record.js";
import { MigrationStore } from "../../coordinator/migration-store.js";
import type { VmRuntime } from "../../coordinator/vm-runtime.js";
import { silentLogger } from "../../shared/logger.js";
import { MiB } from "../../shared/units.js";

interface AgentScript {
  capabilities: string[];
  /** ms after PREPARE until the balloon request; undefined: never. */
  requestAfterMs?: number;
  /** ms after PREPARE until the PREPARE ack; undefined: never. */
  ackAfterMs?: number;
  /** ms after PREPARE until the agent disconnects; undefined: never. */
  disconnectAfterMs?: number;
}

/** Records timestamps of what happened, relative to the migration start. */
class Timeline {
  private readonly t0 = Date.now();
  readonly events: Array<{ what: string; atMs: number }> = [];
  mark(what: string): void {
    this.events.push({ what, atMs: Date.now() - this.t0 });
  }
  at(what: string): number {
    const e = this.events.find((x) => x.what === what);
    if (!e) throw new Error(`${what} never happened: ${JSON.stringify(this.events)}`);
    return e.atMs;
  }
  has(what: string): boolean {
    return this.events.some((x) => x.what === what);
  }
}

class FakeHub extends EventEmitter {
  attached = true;
  constructor(
    private readonly script: AgentScript,
    private readonly tl: Timeline,
  ) {
    super();
  }
  session(_vm: string) {
    return this.attached ? { hello: { capabilities: this.script.capabilities } } : undefined;
  }
  async sendPhase(vmName: string, ev: { migrationId: string; phase: Phase }): Promise<boolean> {
    if (ev.phase !== Phase.PREPARE) return true;
    const s = this.script;
    if (s.requestAfterMs !== undefined) {
      setTimeout(() => this.emit("balloon-request", { vmName, targetBytes: 465 * MiB, reason: BalloonReason.PREPARE, accepted: true, why: "" }), s.requestAfterMs);
    }
    if (s.ackAfterMs !== undefined) {
      setTimeout(() => {
        this.tl.mark("ack");
        const ack = { migrationId: ev.migrationId, phase: Phase.PREPARE, targetBytes: BigInt(465 * MiB) } as unknown as PhaseAck;
        this.emit("ack", { vmName, ack });
      }, s.ackAfterMs);
    }
    if (s.disconnectAfterMs !== undefined) {
      setTimeout(() => {
        this.attached = false;
        this.tl.mark("disconnected");
        this.emit("disconnected", vmName);
      }, s.disconnectAfterMs);
    }
    return true;
  }
}

const STATS = {
  status: "completed",
  totalTimeMs: 100,
  downtimeMs: 5,
  setupTimeMs: 1,
  transferredBytes: 100 * MiB,
  remainingBytes: 0,
  totalBytes: 1024 * MiB,
  duplicatePages: 1,
  normalPages: 1,
  normalBytes: 4096,
  dirtySyncCount: 2,
  postcopyRequests: 0,
  precopyBytes: 0,
  postcopyBytes: 0,
  postcopyBlocktimeMs: 0,
  mbps: 1,
  errorDesc: "",
  raw: {},
};

/** A VM whose balloon reaches its target `inflateMs` after the wait starts and whose migration completes at once. */
function fakeVm(tl: Timeline, inflateMs: number): VmRuntime {
  const vm = new EventEmitter() as EventEmitter & Record<string, unknown>;
  const balloon = {
    targetBytes: 1024 * MiB,
    actualBytes: 1024 * MiB,
    refresh: async () => 1024 * MiB,
    setTarget: async (b: number) => b,
    waitForTarget: async (o: { deadlineMs: number }) => {
      await new Promise((r) => setTimeout(r, Math.min(inflateMs, o.deadlineMs)));
      tl.mark("inflated");
      return { actualBytes: 465 * MiB, targetBytes: 465 * MiB, reached: inflateMs <= o.deadlineMs, stalled: false, timedOut: inflateMs > o.deadlineMs, elapsedMs: inflateMs };
    },
  };
  Object.assign(vm, {
    config: { name: "vm1" },
    ramBytes: 1024 * MiB,
    balloon,
    migration: undefined,
    ready: async () => balloon,
    refreshRunState: async () => "running",
    qemu: {
      setMigrationCapabilities: async () => undefined,
      setMigrationParameters: async () => undefined,
      migrate: async () => {
        tl.mark("migrate");
        setTimeout(() => vm.emit("qmp-event", { event: "MIGRATION", data: { status: "completed" }, timestamp: { seconds: 0, microseconds: 0 } }), 10);
      },
      queryMigrate: async () => STATS,
      migrateCancel: async () => undefined,
      startPostcopy: async () => undefined,
    },
  });
  return vm as unknown as VmRuntime;
}

async function migrateWith(script: AgentScript, opts: { inflateMs: number; deadlineMs: number; strategy?: BalloonStrategy }) {
  const tl = new Timeline();
  const hub = new FakeHub(script, tl);
  const vm = fakeVm(tl, opts.inflateMs);
  const store = new MigrationStore({ stateDir: "", logger: silentLogger() });
  const orch = new MigrationOrchestrator({
    vms: new Map([["vm1", vm]]),
    hub: hub as unknown as AgentHub,
    store,
    peer: () =>
      ({
        prepareIncoming: async () => ({ uri: "tcp:127.0.0.1:1" }),
        getIncoming: async () => ({ phase: Phase.FAILED }),
      }) as never,
    logger: silentLogger(),
    pollMs: 20,
  });
  const params: MigrateParams = {
    vm: "vm1",
    destination: "127.0.0.1:2",
    mode: MigrationMode.PRECOPY,
    strategy: opts.strategy ?? BalloonStrategy.INFLATE_THEN_MIGRATE,
    maxBandwidthBytesPerSec: 1,
    downtimeLimitMs: 300,
    prepareDeadlineMs: opts.deadlineMs,
    postcopyAfterPasses: 0,
  };
  const record = orch.start(params);
  const done = await orch.whenDone(record.id);
  return { tl, done };
}

describe("PREPARE with an agent that zeroes free memory", () => {
  it("waits for its ack after the inflation, then migrates", async () => {
    const { tl, done } = await migrateWith({ capabilities: ["psi", ZERO_FREE_CAPABILITY], requestAfterMs: 20, ackAfterMs: 400 }, { inflateMs: 100, deadlineMs: 5000 });
    expect(done.phase).toBe(Phase.COMPLETED);
    expect(tl.at("inflated")).toBeLessThan(tl.at("ack"));
    expect(tl.at("migrate")).toBeGreaterThanOrEqual(tl.at("ack"));
    expect(tl.at("migrate")).toBeLessThan(tl.at("ack") + 300);
  });

  it("an ack that came before the balloon got there counts too", async () => {
    const { tl, done } = await migrateWith({ capabilities: [ZERO_FREE_CAPABILITY], requestAfterMs: 20, ackAfterMs: 50 }, { inflateMs: 300, deadlineMs: 5000 });
    expect(done.phase).toBe(Phase.COMPLETED);
    expect(tl.at("migrate") - tl.at("inflated")).toBeLessThan(200);
  });

  it("no ack: migrates at the PREPARE deadline, not later, and completes", async () => {
    const { tl, done } = await migrateWith({ capabilities: [ZERO_FREE_CAPABILITY], requestAfterMs: 20 }, { inflateMs: 100, deadlineMs: 700 });
    expect(done.phase).toBe(Phase.COMPLETED);
    expect(tl.at("migrate")).toBeGreaterThanOrEqual(650);
    expect(tl.at("migrate")).toBeLessThan(1100);
    expect(done.prepareMs).toBeLessThan(1000);
  });

  it("the agent goes away while zeroing: migrates at once", async () => {
    const { tl, done } = await migrateWith({ capabilities: [ZERO_FREE_CAPABILITY], requestAfterMs: 20, disconnectAfterMs: 200 }, { inflateMs: 100, deadlineMs: 5000 });
    expect(done.phase).toBe(Phase.COMPLETED);
    expect(tl.at("migrate") - tl.at("disconnected")).toBeLessThan(200);
  });

  it("no PREPARE request at all: no extra wait for the ack after the deadline", async () => {
    const { tl, done } = await migrateWith({ capabilities: [ZERO_FREE_CAPABILITY] }, { inflateMs: 100, deadlineMs: 500 });
    expect(done.phase).toBe(Phase.COMPLETED);
    expect(tl.at("migrate")).toBeLessThan(900);
  });
});

describe("PREPARE with other agents or strategies: no ack wait", () => {
  it("an agent without the capability: migrate right after the inflation", async () => {
    const { tl, done } = await migrateWith({ capabilities: ["psi"], requestAfterMs: 20, ackAfterMs: 1500 }, { inflateMs: 100, deadlineMs: 5000 });
    expect(done.phase).toBe(Phase.COMPLETED);
    expect(tl.at("migrate")).toBeLessThan(600);
    expect(tl.has("ack")).toBe(false);
  });

  it("overlap: migrate at once even with the capability", async () => {
    const { tl, done } = await migrateWith({ capabilities: [ZERO_FREE_CAPABILITY], requestAfterMs: 20, ackAfterMs: 1500 }, { inflateMs: 100, deadlineMs: 5000, strategy: BalloonStrategy.OVERLAP });
    expect(done.phase).toBe(Phase.COMPLETED);
    expect(tl.at("migrate")).toBeLessThan(300);
  });
});
