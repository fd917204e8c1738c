/**
 * The HypervisorDriver contract (coordinator/hypervisor.ts), run the same
 * way against both drivers on real guests: QmpDriver on a QEMU started by
 * lab/vm.ts, LibvirtDriver on a libvirt domain of the libvirt lab
 * (lab/libvirt-lab.ts). Both boot the lab's guest image with the agent off:
 * a bare QEMU (test/helpers/bare-qemu.ts) has no balloon driver in a guest,
 * so a balloon target could never be reached there.
 *
 * Cases: up with facts; setBalloon + queryBalloon reach the target; guest
 * stats are numbers; run state; configure + start + cancel a migration to a
 * second host; down when the VM goes away.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { DriverEvent, HypervisorDriver } from "../../coordinator/hypervisor.js";
import { LibvirtDriver } from "../../coordinator/libvirt-driver.js";
import { QmpDriver } from "../../coordinator/qmp-driver.js";
import { ensureGuestImage, type GuestImage } from "../../lab/guest-image.js";
import { createDomain, domainXml, startLibvirtHosts, type LibvirtHost } from "../../lab/libvirt-lab.js";
import { startVm, type VmHandle } from "../../lab/vm.js";
import { silentLogger } from "../../shared/logger.js";
import { freePort } from "../../shared/net.js";
import { MiB } from "../../shared/units.js";

const RAM = 512 * MiB;
const ROOT = resolve(import.meta.dirname, "../..");

/** What a contract run needs from a driver's world. */
interface Harness {
  /** A driver on a running guest, not started yet. */
  source: HypervisorDriver;
  /** A driver for the second host, ready for prepareIncoming once started (QMP: its QEMU runs with -incoming defer). */
  destination: HypervisorDriver;
  /** Ends the source VM the way a crash or an operator would. */
  killSource(): Promise<void>;
  close(): Promise<void>;
}

/** Records a driver's events and waits for one. */
class Events {
  readonly seen: DriverEvent[] = [];
  private waiters: Array<{ pred: (e: DriverEvent) => boolean; resolve: (e: DriverEvent) => void }> = [];
  constructor(driver: HypervisorDriver) {
    driver.onEvent((e) => {
      this.seen.push(e);
      for (const w of [...this.waiters]) if (w.pred(e)) (this.waiters.splice(this.waiters.indexOf(w), 1), w.resolve(e));
    });
  }
  wait(pred: (e: DriverEvent) => boolean, what: string, timeoutMs = 30_000): Promise<DriverEvent> {
    const hit = this.seen.find(pred);
    if (hit) return Promise.resolve(hit);
    return new Promise((resolveWait, reject) => {
      const t = setTimeout(() => reject(new Error(`no ${what} within ${timeoutMs} ms; saw ${this.seen.map((e) => (e.type === "migration-status" ? `status ${e.status}` : e.type)).join(", ")}`)), timeoutMs);
      this.waiters.push({ pred, resolve: (e) => (clearTimeout(t), resolveWait(e)) });
    });
  }
}

async function until<T>(f: () => Promise<T>, ok: (v: T) => boolean, what: string, timeoutMs = 60_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  let last: T | undefined;
  let err: unknown;
  for (;;) {
    try {
      last = await f();
      if (ok(last)) return last;
    } catch (e) {
      err = e;
    }
    if (Date.now() > end) throw new Error(`${what}: not reached in ${timeoutMs} ms (last ${JSON.stringify(last)}, ${String(err ?? "")})`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

let image: GuestImage;
beforeAll(async () => {
  image = await ensureGuestImage({ agentBundle: join(ROOT, "dist/ballast-agent.mjs") });
}, 300_000);

async function qmpHarness(): Promise<Harness> {
  const dir = mkdtempSync(join(tmpdir(), "bdc-"));
  const common = { workDir: dir, image, memMiB: RAM / MiB, dataDisk: false, agent: false, guestfwdPort: await freePort() };
  const vms: VmHandle[] = [];
  const src = await startVm({ ...common, name: "src" });
  vms.push(src);
  const dst = await startVm({ ...common, name: "dst", incoming: true });
  vms.push(dst);
  const logger = silentLogger();
  const source = new QmpDriver({ socketPath: src.qmpPath, logger });
  const destination = new QmpDriver({ socketPath: dst.qmpPath, logger });
  return {
    source,
    destination,
    killSource: () => src.stop(),
    async close() {
      await source.close();
      await destination.close();
      await Promise.all(vms.map((v) => v.stop()));
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

async function libvirtHarness(): Promise<Harness> {
  const dir = mkdtempSync(join(tmpdir(), "bdl-"));
  let hosts: Record<"a" | "b", LibvirtHost> | undefined;
  try {
    hosts = await startLibvirtHosts(dir);
    await createDomain(hosts.a, domainXml({ name: "vm1", image, memMiB: RAM / MiB, dataDisk: false, agent: false }), "vm1", dir);
    const logger = silentLogger();
    const source = new LibvirtDriver({ uri: hosts.a.uri, domain: "vm1", logger });
    const destination = new LibvirtDriver({ uri: hosts.b.uri, domain: "vm1", logger });
    const h = hosts;
    return {
      source,
      destination,
      killSource: async () => void (await h.a.virsh(["destroy", "vm1"])),
      async close() {
        await source.close();
        await destination.close();
        await Promise.all([h.a.stop(), h.b.stop()]);
        rmSync(dir, { recursive: true, force: true });
      },
    };
  } catch (err) {
    if (hosts) await Promise.all([hosts.a.stop(), hosts.b.stop()]);
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
}

describe.each([
  { kind: "qmp", make: qmpHarness },
  { kind: "libvirt", make: libvirtHarness },
])("the $kind driver keeps the HypervisorDriver contract", ({ kind, make }) => {
  let h: Harness;
  let ev: Events;

  beforeAll(async () => {
    h = await make();
    ev = new Events(h.source);
    h.source.start();
  }, 120_000);

  afterAll(async () => {
    await h?.close();
  });

  it("comes up with facts", async () => {
    const up = await ev.wait((e) => e.type === "up", "up");
    expect(h.source.kind).toBe(kind);
    expect(h.source.connected).toBe(true);
    if (up.type !== "up") throw new Error("unreachable");
    expect(up.facts.ramBytes).toBe(RAM);
    expect(up.facts.balloonActualBytes).toBe(RAM);
    expect(["running", "prelaunch"]).toContain(up.facts.runState);
    expect(h.source.facts).toEqual(up.facts);
  });

  it("reports the run state", async () => {
    expect(await h.source.runState()).toBe("running");
  });

  it("setBalloon and queryBalloon reach the target and come back", async () => {
    const target = 300 * MiB;
    await h.source.setBalloon(target);
    await until(() => h.source.queryBalloon(), (b) => b === target, "balloon inflated to 300 MiB");
    await h.source.setBalloon(RAM);
    await until(() => h.source.queryBalloon(), (b) => b === RAM, "balloon back at the RAM size");
  });

  it("returns the guest's memory stats as numbers", async () => {
    const s = await until(() => h.source.guestMemoryStats(), (g) => g !== undefined && g.lastUpdateS > 0, "guest stats");
    expect(s?.availableBytes).toBeGreaterThan(64 * MiB);
    expect(s?.availableBytes).toBeLessThanOrEqual(RAM);
    expect(s?.freeBytes).toBeGreaterThan(0);
    expect(typeof s?.diskCachesBytes).toBe("number");
  });

  it("configures, starts and cancels a migration; the guest keeps running", async () => {
    h.destination.start();
    if (h.destination.incomingNeedsQemu !== false) {
      await until(async () => h.destination.connected && (await h.destination.runState()), (s) => s === "inmigrate", "destination inmigrate");
    }
    const uri = await h.destination.prepareIncoming({ postcopy: false }, "127.0.0.1");
    // 2 MB/s: the first pass of a 512 MiB guest takes minutes, so the cancel lands mid-way.
    await h.source.configureMigration({ postcopy: false, maxBandwidthBytesPerSec: 2_000_000, downtimeLimitMs: 300 });
    await h.source.startMigration(uri);
    const running = await until(() => h.source.queryMigration(), (m) => m.status === "active" && m.transferredBytes > 0, "migration under way", 30_000);
    expect(running.totalBytes).toBeGreaterThan(0);
    await h.source.cancelMigration();
    await ev.wait((e) => e.type === "migration-status" && e.status === "cancelled", "migration-status cancelled", 30_000);
    expect((await until(() => h.source.queryMigration(), (m) => m.status === "cancelled", "cancelled")).status).toBe("cancelled");
    expect(await h.source.runState()).toBe("running");
    expect(h.source.connected).toBe(true);
  });

  it("reports down when the VM goes away", async () => {
    await h.killSource();
    const down = await ev.wait((e) => e.type === "down", "down", 30_000);
    expect(down.type === "down" && down.error.length).toBeGreaterThan(0);
    expect(h.source.connected).toBe(false);
    expect(h.source.facts).toBeUndefined();
    await expect(h.source.setBalloon(RAM)).rejects.toThrow();
  });
});
