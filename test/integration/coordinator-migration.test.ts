/**
 * End-to-end coordinator flow on real QEMU (TCG, no guest OS): two QEMU
 * processes and two coordinator processes on 127.0.0.1, a scripted agent on
 * real gRPC, and migrations driven through ballastctl and the gRPC API.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it, onTestFailed } from "vitest";
import { BalloonReason, BalloonStrategy, MigrationMode, Phase } from "../../gen/ballast/v1/common_pb.js";
import { MigrationService, type Migration } from "../../gen/ballast/v1/migration_pb.js";
import { VmService, type Vm } from "../../gen/ballast/v1/vm_pb.js";
import { createClient } from "../../shared/grpc-adapter.js";
import { freePort } from "../../shared/net.js";
import { MiB } from "../../shared/units.js";
import { startBareQemu, type BareQemu } from "../helpers/bare-qemu.js";
import { runCtl, startCoordinatorProcess, waitForVm, type CoordinatorProcess } from "../../lab/coordinator-process.js";
import { attachScriptedAgent, type ScriptedAgent } from "../helpers/scripted-agent.js";

interface Rig {
  dir: string;
  src: BareQemu;
  dst: BareQemu;
  srcCo: CoordinatorProcess;
  dstCo: CoordinatorProcess;
  agents: ScriptedAgent[];
}

let rig: Rig | undefined;

async function startRig(): Promise<Rig> {
  const dir = mkdtempSync(join(tmpdir(), "ballast-core-"));
  const src = await startBareQemu({ name: "src", dir });
  const dst = await startBareQemu({ name: "dst", dir, incoming: true });
  const vm = (qmp: string, agentPort: number) => ({ name: "vm1", qmpSocket: qmp, agentId: "vm1-agent", floor: "48MiB", agentPort });
  const srcCo = await startCoordinatorProcess(dir, "src", { hostId: "src-host", listen: "127.0.0.1:0", vms: [vm(src.qmp, await freePort())] });
  const dstCo = await startCoordinatorProcess(dir, "dst", { hostId: "dst-host", listen: "127.0.0.1:0", vms: [vm(dst.qmp, await freePort())] });
  rig = { dir, src, dst, srcCo, dstCo, agents: [] };
  onTestFailed(() => {
    // The coordinators' own logs are the quickest way to see why a flow stopped.
    for (const [name, co] of [["src", srcCo], ["dst", dstCo]] as const) {
      console.error(`--- ${name} coordinator log (last 40) ---\n${co.logs.slice(-40).map((l) => JSON.stringify(l)).join("\n")}`);
    }
  });
  return rig;
}

afterEach(async () => {
  if (!rig) return;
  for (const a of rig.agents) a.close();
  await Promise.all([rig.srcCo.stop(), rig.dstCo.stop()]);
  await Promise.all([rig.src.stop(), rig.dst.stop()]);
  rmSync(rig.dir, { recursive: true, force: true });
  rig = undefined;
});

async function waitVm(address: string, pred: (vm: Vm) => boolean, what: string): Promise<Vm> {
  const client = createClient(VmService, address);
  try {
    return await waitForVm(client, "vm1", pred, what, 20_000);
  } finally {
    client.close();
  }
}

/** Checks that phases come in the lifecycle order (passes may repeat). */
function expectOrdered(phases: Phase[]) {
  const order = [Phase.PREPARE, Phase.PRECOPY_PASS, Phase.SWITCHOVER, Phase.POSTCOPY_ACTIVE, Phase.COMPLETED];
  const ranks = phases.map((p) => order.indexOf(p));
  expect(ranks.every((r) => r >= 0)).toBe(true);
  for (let i = 1; i < ranks.length; i++) expect(ranks[i]).toBeGreaterThanOrEqual(ranks[i - 1] as number);
}

describe("coordinator on real QEMU", () => {
  it("runs a pre-copy migration through ballastctl and streams every phase to the agent", async () => {
    const r = await startRig();
    await waitVm(r.srcCo.address, (v) => v.qmpConnected, "source QMP");
    await waitVm(r.dstCo.address, (v) => v.qmpConnected, "destination QMP");
    const agent = await attachScriptedAgent({ address: r.srcCo.agents.vm1 as string, vmId: "vm1-agent", prepareTargetBytes: 96 * MiB });
    r.agents.push(agent);
    await agent.request(112 * MiB, BalloonReason.STEADY_STATE);
    await waitVm(r.srcCo.address, (v) => v.agentConnected && v.balloon?.targetBytes === BigInt(112 * MiB), "steady target 112 MiB");

    const res = await runCtl(["--server", r.srcCo.address, "--json", "migrate", "vm1", "--to", r.dstCo.address, "--strategy", "inflate", "--prepare-deadline-ms", "2500", "--bandwidth", "200000000"]);
    expect(res.stderr).toBe("");
    expect(res.code).toBe(0);
    const m = JSON.parse(res.stdout) as Record<string, any>;
    expect(m.phase).toBe("PHASE_COMPLETED");
    expect(m.sourceStats.status).toBe("completed");
    expect(Number(m.sourceStats.transferredBytes)).toBeGreaterThan(0);
    expect(m.destinationStats.status).toBe("completed");
    expect(Number(m.balloonTargetBeforeBytes)).toBe(112 * MiB);
    // The agent asked for 96 MiB during PREPARE; the coordinator applied it.
    expect(m.balloonTimeline.some((p: Record<string, string>) => Number(p.targetBytes) === 96 * MiB)).toBe(true);

    await agent.waitFor(Phase.COMPLETED, 10_000);
    const seen = agent.phases.map((p) => p.phase);
    expect(seen[0]).toBe(Phase.PREPARE);
    expect(seen).toContain(Phase.PRECOPY_PASS);
    expect(seen.at(-1)).toBe(Phase.COMPLETED);
    expectOrdered(seen);
    expect(new Set(agent.phases.map((p) => p.migrationId))).toEqual(new Set([m.id]));

    const dst = await waitVm(r.dstCo.address, (v) => v.runState === "running", "destination running");
    expect(dst.qmpConnected).toBe(true);
  });

  it("runs a post-copy migration through the gRPC API; both hosts' agents hear POSTCOPY_ACTIVE", async () => {
    const r = await startRig();
    await waitVm(r.srcCo.address, (v) => v.qmpConnected, "source QMP");
    await waitVm(r.dstCo.address, (v) => v.qmpConnected, "destination QMP");
    const srcAgent = await attachScriptedAgent({ address: r.srcCo.agents.vm1 as string, vmId: "vm1-agent", prepareTargetBytes: 100 * MiB });
    // Stands in for the guest agent after it re-attaches on the destination host.
    const dstAgent = await attachScriptedAgent({ address: r.dstCo.agents.vm1 as string, vmId: "vm1-agent" });
    r.agents.push(srcAgent, dstAgent);

    const client = createClient(MigrationService, r.srcCo.address);
    let last: Migration | undefined;
    const snapshots: Migration[] = [];
    for await (const msg of client.migrate({
      vm: "vm1",
      destination: r.dstCo.address,
      mode: MigrationMode.POSTCOPY,
      balloonStrategy: BalloonStrategy.OVERLAP,
      // Slow enough that post-copy starts before the first pass could finish.
      maxBandwidthBytesPerSec: 1_000_000n,
    })) {
      last = msg.migration;
      if (last) snapshots.push(last);
    }
    client.close();
    expect(last?.phase).toBe(Phase.COMPLETED);
    expect(last?.sourceStats?.status).toBe("completed");
    const raw = JSON.parse(last?.sourceStats?.rawJson ?? "{}") as { ram?: Record<string, unknown> };
    expect(raw.ram).toHaveProperty("postcopy-requests");
    expect(last?.destinationStats?.status).toBe("completed");
    expect(last?.phases.some((p) => p.phase === Phase.POSTCOPY_ACTIVE)).toBe(true);
    expect(snapshots.length).toBeGreaterThan(1);

    await srcAgent.waitFor(Phase.POSTCOPY_ACTIVE, 5000);
    expectOrdered(srcAgent.phases.map((p) => p.phase));
    await dstAgent.waitFor(Phase.COMPLETED, 10_000);
    expect(dstAgent.phases.map((p) => p.phase)).toEqual([Phase.POSTCOPY_ACTIVE, Phase.COMPLETED]);
  });

  it("cancel during pre-copy restores the balloon target and keeps the VM running on the source", async () => {
    const r = await startRig();
    await waitVm(r.srcCo.address, (v) => v.qmpConnected, "source QMP");
    await waitVm(r.dstCo.address, (v) => v.qmpConnected, "destination QMP");
    const agent = await attachScriptedAgent({ address: r.srcCo.agents.vm1 as string, vmId: "vm1-agent", prepareTargetBytes: 64 * MiB });
    r.agents.push(agent);
    await agent.request(100 * MiB, BalloonReason.STEADY_STATE);
    await waitVm(r.srcCo.address, (v) => v.balloon?.targetBytes === BigInt(100 * MiB), "steady target 100 MiB");

    const client = createClient(MigrationService, r.srcCo.address);
    // 1000 B/s keeps the first pass running for minutes, so the cancel lands mid-pass.
    const stream = client.migrate({ vm: "vm1", destination: r.dstCo.address, maxBandwidthBytesPerSec: 1000n, prepareDeadlineMs: 1500 });
    let id = "";
    for await (const msg of stream) {
      id = msg.migration?.id ?? id;
      if (msg.migration?.phase === Phase.PRECOPY_PASS) break;
    }
    expect(id).not.toBe("");
    const during = await waitVm(r.srcCo.address, (v) => v.balloon?.targetBytes === BigInt(64 * MiB), "PREPARE target 64 MiB");
    expect(during.balloon?.targetBytes).toBe(BigInt(64 * MiB));

    const res = await runCtl(["--server", r.srcCo.address, "--json", "cancel", id]);
    expect(res.code).toBe(0);
    const m = JSON.parse(res.stdout) as Record<string, string>;
    expect(m.phase).toBe("PHASE_CANCELLED");
    const after = await waitVm(r.srcCo.address, (v) => v.balloon?.targetBytes === BigInt(100 * MiB), "balloon restored to 100 MiB");
    expect(after.runState).toBe("running");
    await agent.waitFor(Phase.CANCELLED, 5000);
    client.close();

    // Bad input gets a specific status, not a crash: NOT_FOUND exits 4.
    const bad = await runCtl(["--server", r.srcCo.address, "migrate", "nosuchvm", "--to", r.dstCo.address]);
    expect(bad.code).toBe(4);
    expect(bad.stderr).toContain("no VM named");
    expect(bad.stderr).toContain("NOT_FOUND");
  });
});
