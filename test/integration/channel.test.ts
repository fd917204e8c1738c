/**
 * The agent's virtio-serial channel on real guests (README "Agent channel"):
 * re-attach after switchover (measured: the destination's RESUME against the
 * agent's attach there, both in the destination coordinator's log), the
 * agent exiting on SIGTERM with the port open, an agent restart, and the
 * port as identity with two guests on one host.
 * Timing is printed; only generous functional bounds are asserted.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { BalloonStrategy, MigrationMode, Phase } from "../../gen/ballast/v1/common_pb.js";
import { VmService } from "../../gen/ballast/v1/vm_pb.js";
import { createClient } from "../../shared/grpc-adapter.js";
import { MiB } from "../../shared/units.js";
import { startCoordinatorProcess, waitForVm, type CoordinatorProcess } from "../../lab/coordinator-process.js";
import { ensureGuestImage } from "../../lab/guest-image.js";
import { Lab } from "../../lab/lab.js";
import { GuestShell } from "../../lab/serial-shell.js";
import { startVm, vmPaths, type VmHandle } from "../../lab/vm.js";

const ROOT = resolve(import.meta.dirname, "../..");
type Log = Record<string, unknown>;
const channelLogs = (co: CoordinatorProcess, msg: string, since = 0): Log[] =>
  co.logs.filter((l) => l.component === "agent-channel" && l.msg === msg && Number(l.time) >= since);

async function until<T>(what: string, fn: () => T | undefined | false | Promise<T | undefined | false>, timeoutMs: number): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

describe("the agent over its virtio-serial port, in the two-host lab", () => {
  let lab: Lab;
  beforeAll(async () => {
    lab = await Lab.start({ memMiB: 1024, dataDisk: false });
  }, 240_000);
  afterAll(async () => {
    await lab?.stop();
  });

  it("the guest has the port, no network device, and the agent uses the port", async () => {
    const names = await lab.shell.run("cat /sys/class/virtio-ports/*/name");
    expect(names.output).toContain("org.ballast.agent.0");
    expect((await lab.shell.run("test -e /sys/class/net/eth0")).exitCode).not.toBe(0);
    const log = await lab.shell.readFile("/tmp/agent.log");
    expect(log).toContain('"channel":"virtio-serial"');
    expect((await lab.vm()).agentConnected).toBe(true);
  });

  it("after switchover the agent talks to the destination within a few hundred ms of RESUME (pre-copy and post-copy, several runs)", async () => {
    const runs: { mode: string; sinceResumeMs: number; hostEndMs: number; beforeCompleted: boolean }[] = [];
    for (const mode of [MigrationMode.PRECOPY, MigrationMode.POSTCOPY, MigrationMode.PRECOPY, MigrationMode.POSTCOPY]) {
      const dst = lab.hosts[lab.other].coordinator;
      const t0 = Date.now();
      const m = await lab.migrate({ mode, balloonStrategy: BalloonStrategy.NONE, maxBandwidthBytesPerSec: 125_000_000n });
      expect(m.phase).toBe(Phase.COMPLETED);
      // Lab.migrate waited until the destination saw the agent; its channel logged the RESUME and the attach.
      const resumed = await until("RESUME in the destination's log", () => channelLogs(dst, "guest resumed", t0)[0], 10_000);
      const attached = await until("the attach after RESUME", () => channelLogs(dst, "agent attached", t0).find((l) => l.sinceResumeMs !== undefined), 10_000);
      const completedAt = Number(m.phases.find((p) => p.phase === Phase.COMPLETED)?.atUnixMs ?? 0n);
      runs.push({
        mode: MigrationMode[mode],
        sinceResumeMs: Number(attached.sinceResumeMs),
        hostEndMs: Number(attached.hostEndSinceResumeMs ?? -1),
        beforeCompleted: Number(attached.time) <= completedAt,
      });
      expect(Number(attached.time)).toBeGreaterThanOrEqual(Number(resumed.time));
    }
    console.log(`channel: re-attach after RESUME (destination coordinator's clock): ${JSON.stringify(runs)}`);
    for (const r of runs) expect(r.sinceResumeMs).toBeLessThan(3000);
  }, 300_000);

  it("the agent exits promptly on SIGTERM with the port open and idle; restarted, it attaches again on a fresh host end", async () => {
    const co = lab.hosts[lab.active].coordinator;
    const pid = (await lab.shell.run("pidof node")).output.trim().split(/\s+/)[0];
    expect(pid).toMatch(/^\d+$/);
    const t0 = Date.now();
    // /proc/uptime has 10 ms resolution; the loop polls every 10 ms.
    const r = await lab.shell.run(
      `a=$(cut -d' ' -f1 /proc/uptime); kill -TERM ${pid}; while kill -0 ${pid} 2>/dev/null; do usleep 10000; done; b=$(cut -d' ' -f1 /proc/uptime); echo "$a $b"`,
      { timeoutMs: 30_000 },
    );
    const [a, b] = r.output.trim().split(/\s+/).map(Number) as [number, number];
    const exitMs = Math.round((b - a) * 1000);
    console.log(`channel: agent exit after SIGTERM in the guest: ${exitMs} ms`);
    expect(exitMs).toBeLessThan(1000);
    // The supervisor restarts it (as systemd would); the closed port reset the host end for it.
    await until("the host end reset when the agent closed the port", () => channelLogs(co, "agent channel host end closed", t0).find((l) => l.why === "guest closed the port"), 20_000);
    const attachedBefore = co.logs.filter((l) => l.component === "agent-hub" && l.msg === "agent attached" && Number(l.time) >= t0).length;
    expect(attachedBefore).toBe(0);
    await until("the restarted agent attached", () => co.logs.some((l) => l.component === "agent-hub" && l.msg === "agent attached" && Number(l.time) >= t0), 90_000);
    await lab.waitVm(lab.active, (v) => v.agentConnected, "agent attached after restart", 10_000);
  }, 150_000);
});

describe("the port is the VM's identity: two guests on one host", () => {
  let dir = "";
  let co: CoordinatorProcess | undefined;
  const vms: VmHandle[] = [];
  let shellX: GuestShell | undefined;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "bch-"));
    const image = await ensureGuestImage({ agentBundle: join(ROOT, "dist/ballast-agent.mjs") });
    const vm = (name: string) => ({ name, qmpSocket: vmPaths(dir, name).qmpPath, agentSocket: vmPaths(dir, name).agentSocket, floor: "128MiB" });
    co = await startCoordinatorProcess(dir, "co", { hostId: "host-1", listen: "127.0.0.1:0", defaults: { steadyState: true }, vms: [vm("vmX"), vm("vmY")] });
    // X runs an agent; Y runs none, so anything that moves Y's balloon came through X's port.
    vms.push(await startVm({ name: "vmX", workDir: dir, image, memMiB: 512, vmId: "vmX" }));
    vms.push(await startVm({ name: "vmY", workDir: dir, image, memMiB: 512, vmId: "vmY", agent: false }));
    shellX = await GuestShell.connect(vms[0]!.serialPath, {});
    await shellX.ready(120_000);
  }, 240_000);

  afterAll(async () => {
    shellX?.close();
    await Promise.all(vms.map((v) => v.stop()));
    await co?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it("an agent on X's port that claims Y's id is refused with PERMISSION_DENIED, and Y's balloon does not move", async () => {
    const client = createClient(VmService, co!.address);
    try {
      // X's own agent attaches on X's port.
      await waitForVm(client, "vmX", (v) => v.agentConnected, "X's agent", 90_000);
      const y0 = await waitForVm(client, "vmY", (v) => v.qmpConnected && v.balloon !== undefined, "Y's QMP", 30_000);
      const yTarget = Number(y0.balloon!.targetBytes);
      expect(yTarget).toBe(512 * MiB);
      // In guest X: stop the real agent and its supervisor, start one that says it is Y.
      await shellX!.run("for p in /proc/[0-9]*; do grep -q agent-supervisor $p/cmdline 2>/dev/null && kill ${p#/proc/}; done; for p in $(pidof node); do kill $p; done; sleep 1");
      await shellX!.run("(node --lite-mode /opt/ballast/ballast-agent.mjs run --vm-id vmY --channel virtio-serial --log-level debug > /tmp/imposter.log 2>&1 &)");
      const refused = await until(
        "the imposter refused",
        async () => {
          const t = (await shellX!.run("grep -c '\"code\":7' /tmp/imposter.log")).output.trim();
          return Number(t) >= 2 ? t : undefined;
        },
        90_000,
      );
      expect(Number(refused)).toBeGreaterThanOrEqual(2);
      const log = await shellX!.readFile("/tmp/imposter.log");
      expect(log).toMatch(/agent on the port of VM vmX claims to be \\"vmY\\"/);
      // Steady state is on: an agent accepted as Y would have shrunk Y by now (5 agreeing samples at 1 s).
      await new Promise((r) => setTimeout(r, 8000));
      const y1 = await waitForVm(client, "vmY", (v) => v.qmpConnected, "Y", 5000);
      expect(Number(y1.balloon!.targetBytes)).toBe(yTarget);
      expect(y1.agentConnected).toBe(false);
      expect((await waitForVm(client, "vmX", () => true, "X", 5000)).agentConnected).toBe(false);
    } finally {
      client.close();
    }
  }, 200_000);
});
