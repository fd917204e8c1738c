/**
 * Real-guest lab smoke test: builds (or reuses) the guest image, boots a
 * 1 GiB TCG guest, drives it through its serial shell, exercises the
 * workloads and the balloon, live-migrates it to a second QEMU on
 * 127.0.0.1 and checks the same shell answers on the destination.
 *
 * It also captures real /proc files (and the balloon's sysfs features) into
 * test/fixtures/proc/ for unit tests of the agent: when a fixture file is
 * missing, or when BALLAST_CAPTURE_FIXTURES=1.
 */
import { createServer, type Server } from "node:net";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { QmpClient, type QmpEvent } from "../../coordinator/qmp-client.js";
import { ensureGuestImage, GUEST_DATA_BLOB, GUEST_DATA_MOUNT, GUEST_WORKLOAD_PATH, type GuestImage } from "../../lab/guest-image.js";
import { GuestShell } from "../../lab/serial-shell.js";
import { startVm, type StartVmOptions, type VmHandle } from "../../lab/vm.js";
import { createLogger, type Logger } from "../../shared/logger.js";
import { freePorts } from "../../shared/net.js";
import { MiB } from "../../shared/units.js";

const REPO = fileURLToPath(new URL("../../", import.meta.url));
const REAL_AGENT = path.join(REPO, "dist", "ballast-agent.mjs");
const FIXTURES = path.join(REPO, "test", "fixtures", "proc");
const FIXTURE_STATES = ["debian-6.1-guest", "debian-6.1-guest-cache", "debian-6.1-guest-ballooned"] as const;
// Guest paths under /proc; each lands at the same relative path in the fixture folder (the agent's procRoot).
const FIXTURE_FILES = ["meminfo", "vmstat", "pressure/memory", "zoneinfo", "sys/vm/min_free_kbytes", "sys/vm/watermark_scale_factor"] as const;
// The agent's sysRoot for each folder is its sibling "<folder>-sys" (like host-debian12-sys/).
const BALLOON_DRIVER = "bus/virtio/drivers/virtio_balloon";
const sysFixture = (state: string) => path.join(FIXTURES, `${state}-sys`);
function hasSysFixture(state: string): boolean {
  const dir = path.join(sysFixture(state), BALLOON_DRIVER);
  return existsSync(dir) && readdirSync(dir).some((d) => d.startsWith("virtio") && existsSync(path.join(dir, d, "features")));
}
const README_BEGIN = "<!-- lab-guest:begin -->";
const README_END = "<!-- lab-guest:end -->";
const CAPTURE =
  process.env.BALLAST_CAPTURE_FIXTURES === "1" ||
  FIXTURE_STATES.some((s) => !FIXTURE_FILES.every((f) => existsSync(path.join(FIXTURES, s, f))) || !hasSysFixture(s));

// Same bytes every run, so the image cache key stays stable.
const STAND_IN_AGENT = `#!/usr/bin/env node
// Stand-in for dist/ballast-agent.mjs, used by lab-guest.test.ts until the real agent is built.
process.stdout.write("agent-started " + JSON.stringify(process.argv.slice(2)) + "\\n");
setInterval(() => {}, 1 << 30);
`;

const log = createLogger({ name: "lab-guest-test", level: process.env.LOG_LEVEL ?? "warn", fd: 2 });

/** Parses /proc/meminfo into kB values. */
function meminfo(text: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const line of text.split("\n")) {
    const m = /^(\S+):\s+(\d+)/.exec(line);
    if (m?.[1] && m[2]) out[m[1]] = Number(m[2]);
  }
  return out;
}

function kib(info: Record<string, number>, key: string): number {
  const v = info[key];
  if (v === undefined) throw new Error(`meminfo has no ${key}`);
  return v;
}

async function captureProc(shell: GuestShell, state: (typeof FIXTURE_STATES)[number]): Promise<void> {
  if (!CAPTURE) return;
  for (const file of FIXTURE_FILES) {
    const text = await shell.readFile(`/proc/${file}`);
    const dest = path.join(FIXTURES, state, file);
    mkdirSync(path.dirname(dest), { recursive: true });
    writeFileSync(dest, text);
  }
  // The balloon device's features, as /sys/bus/virtio/drivers/virtio_balloon/virtioN/features
  // (a symlinked device directory in the guest, a plain one in the fixture).
  const sysDir = sysFixture(state);
  rmSync(sysDir, { recursive: true, force: true });
  const devices = (await shell.run(`cd /sys/${BALLOON_DRIVER} && ls -d virtio*`)).output.split(/\s+/).filter(Boolean);
  expect(devices.length).toBeGreaterThan(0);
  for (const dev of devices) {
    const dest = path.join(sysDir, BALLOON_DRIVER, dev, "features");
    mkdirSync(path.dirname(dest), { recursive: true });
    writeFileSync(dest, await shell.readFile(`/sys/${BALLOON_DRIVER}/${dev}/features`));
  }
}

/** Connects a QmpClient (no reconnect: a test wants to see a lost QEMU) to one of the VM's QMP sockets. */
async function connectQmp(socketPath: string, logger: Logger): Promise<QmpClient> {
  const qmp = new QmpClient({ socketPath, reconnect: false, commandTimeoutMs: 30_000, logger });
  await qmp.connect();
  return qmp;
}

/**
 * Resolves with the first `name` event (matching `match`) that arrives after
 * this call. Call it before the action that triggers the event. The returned
 * promise is pre-handled, so an earlier failure of the test leaves no
 * unhandled rejection behind when it times out.
 */
function waitForEvent(
  qmp: QmpClient,
  name: string,
  options: { match?: (data: Record<string, unknown>) => boolean; timeoutMs?: number } = {},
): Promise<QmpEvent> {
  const timeoutMs = options.timeoutMs ?? 30_000;
  const p = new Promise<QmpEvent>((resolve, reject) => {
    const onEvent = (e: QmpEvent) => {
      if (e.event !== name || !(options.match?.(e.data) ?? true)) return;
      cleanup();
      resolve(e);
    };
    const onDisconnected = (err: Error) => {
      cleanup();
      reject(new Error(`QMP disconnected while waiting for ${name}: ${err.message}`));
    };
    const timer = setTimeout(() => {
      cleanup();
      reject(new Error(`QMP event ${name} did not arrive in ${timeoutMs} ms`));
    }, timeoutMs);
    const cleanup = () => {
      clearTimeout(timer);
      qmp.off("event", onEvent);
      qmp.off("disconnected", onDisconnected);
    };
    qmp.on("event", onEvent);
    qmp.on("disconnected", onDisconnected);
  });
  p.catch(() => undefined);
  return p;
}

async function balloonTo(qmp: QmpClient, bytes: number, timeoutMs: number): Promise<{ actual: number; ms: number }> {
  const t0 = Date.now();
  await qmp.execute("balloon", { value: bytes });
  let actual = 0;
  while (Date.now() - t0 < timeoutMs) {
    actual = (await qmp.execute<{ actual: number }>("query-balloon")).actual;
    // The driver works in 4 KiB pages; allow a MiB of slack.
    if (Math.abs(actual - bytes) <= MiB) return { actual, ms: Date.now() - t0 };
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`balloon did not reach ${bytes / MiB} MiB in ${timeoutMs} ms (actual ${actual / MiB} MiB)`);
}

describe("lab guest (real QEMU, TCG)", () => {
  let workDir: string;
  let image: GuestImage;
  let standIn = false;
  let vmOptions: Omit<StartVmOptions, "name" | "guestfwdPort">;
  let src: VmHandle | undefined;
  let dst: VmHandle | undefined;
  let shell: GuestShell | undefined;
  let srcQmp: QmpClient | undefined;
  let dstQmp: QmpClient | undefined;
  let echoServer: Server | undefined;
  let ports: number[];
  const notes: Record<string, string> = {};
  const timings: Record<string, number> = {};

  beforeAll(async () => {
    workDir = mkdtempSync(path.join(tmpdir(), "blg-"));
    let agentBundle = REAL_AGENT;
    if (!existsSync(REAL_AGENT)) {
      standIn = true;
      const dir = path.join(tmpdir(), "ballast-stand-in-agent");
      mkdirSync(dir, { recursive: true });
      agentBundle = path.join(dir, "ballast-agent.mjs");
      writeFileSync(agentBundle, STAND_IN_AGENT, { mode: 0o755 });
    }
    let t0 = Date.now();
    image = await ensureGuestImage({ agentBundle, logger: log, onProgress: (s) => log.info({ step: s }, "image") });
    timings.imageMs = Date.now() - t0;

    // [src guestfwd, dst guestfwd, migration]
    ports = await freePorts(3);
    // A tiny "coordinator" on the source side, to prove guestfwd reaches 127.0.0.1 only through QEMU.
    echoServer = createServer((sock) => {
      sock.on("error", () => undefined);
      sock.end("hello-from-host\n");
    });
    await new Promise<void>((resolve) => echoServer?.listen(ports[0], "127.0.0.1", resolve));

    vmOptions = {
      workDir,
      image,
      memMiB: 1024,
      dataDisk: true,
      vmId: "lab-guest-1",
      // Run the stand-in under the supervisor; the real agent would only
      // retry against a coordinator that this test does not run.
      agent: standIn,
      logger: log,
    };
    t0 = Date.now();
    src = await startVm({ ...vmOptions, name: "src", guestfwdPort: ports[0] ?? 0 });
    shell = await GuestShell.connect(src.serialPath, { timeoutMs: 10_000, logger: log });
    await shell.ready(90_000);
    timings.bootToShellMs = Date.now() - t0;
    srcQmp = await connectQmp(src.labQmpPath, log);
  }, 300_000);

  afterAll(async () => {
    shell?.close();
    await Promise.all([srcQmp?.close(), dstQmp?.close()]);
    await Promise.all([src?.stop(), dst?.stop()]);
    await new Promise<void>((resolve) => (echoServer ? echoServer.close(() => resolve()) : resolve()));
    if (workDir) rmSync(workDir, { recursive: true, force: true });
    log.warn({ timings, notes }, "lab-guest timings");
  });

  it("boots the Debian kernel with the balloon driver, node and a 1 GiB MemTotal", async () => {
    const sh = shell!;
    const uname = await sh.run("uname -r");
    expect(uname.exitCode).toBe(0);
    expect(uname.output.trim()).toBe(image.kernelVersion);
    notes.kernel = uname.output.trim();
    notes.kernelBuild = (await sh.run("uname -v")).output.trim();

    const mem = meminfo(await sh.readFile("/proc/meminfo"));
    // 1 GiB minus what the kernel reserves at boot (about 65 MiB here).
    expect(kib(mem, "MemTotal")).toBeGreaterThan(880 * 1024);
    expect(kib(mem, "MemTotal")).toBeLessThanOrEqual(1024 * 1024);

    expect((await sh.run("test -d /sys/bus/virtio/drivers/virtio_balloon")).exitCode).toBe(0);
    const node = await sh.run("node -e 'console.log(1+1)'", { timeoutMs: 30_000 });
    expect(node).toEqual({ output: "2\n", exitCode: 0 });

    // The root is read-only squashfs; /tmp is the writable tmpfs.
    expect((await sh.run("grep ' / squashfs ro' /proc/mounts")).exitCode).toBe(0);
    expect((await sh.run("touch /tmp/x && ! touch /x 2>/dev/null")).exitCode).toBe(0);
    // The data disk is a read-only squashfs on /data holding the random blob.
    expect((await sh.run(`grep '^/dev/vdb ${GUEST_DATA_MOUNT} squashfs ro' /proc/mounts`)).exitCode).toBe(0);
    expect((await sh.run(`stat -c %s ${GUEST_DATA_BLOB}`)).output.trim()).toBe(String(500 * MiB));
  });

  it("captures the idle guest's /proc files", async () => {
    await captureProc(shell!, "debian-6.1-guest");
    const psi = await shell!.readFile("/proc/pressure/memory");
    expect(psi).toMatch(/^some avg10=/);
  });

  it("configures eth0 statically and reaches the host only through guestfwd", async () => {
    const sh = shell!;
    expect((await sh.run("ip -4 addr show eth0")).output).toContain("10.0.2.15/24");
    const hello = await sh.run("nc 10.0.2.100 50051 </dev/null", { timeoutMs: 20_000 });
    expect(hello.output).toContain("hello-from-host");
    // restrict=on: the slirp gateway itself is not reachable.
    const gw = await sh.run("timeout 5 nc 10.0.2.2 22 </dev/null", { timeoutMs: 20_000 });
    expect(gw.exitCode).not.toBe(0);
  });

  it("supervises the agent from the kernel command line, logging to /tmp/agent.log", async () => {
    const sh = shell!;
    const waitForLog = async (file: string, done: (text: string) => boolean): Promise<string> => {
      let text = "";
      for (let i = 0; i < 60; i++) {
        text = (await sh.run(`cat ${file} 2>/dev/null`)).output;
        if (done(text)) break;
        await new Promise((r) => setTimeout(r, 500));
      }
      return text;
    };
    // The boot-time supervisor, started by busybox init from the kernel command line.
    if (standIn) {
      const text = await waitForLog("/tmp/agent.log", (t) => t.includes("agent-started"));
      expect(text).toContain('agent-started ["run","--coordinator","10.0.2.100:50051","--vm-id","lab-guest-1"]');
    } else {
      const text = await waitForLog("/tmp/agent.log", (t) => t.includes("not starting"));
      expect(text).toContain("ballast.agent=0");
      const help = await sh.run(`node /opt/ballast/ballast-agent.mjs --help`, { timeoutMs: 30_000 });
      notes.realAgentHelpExit = String(help.exitCode);
    }

    // The restart loop itself, with a stand-in agent and a fake command line so
    // it behaves the same whichever bundle is in the image.
    await sh.run(
      `printf '%s\\n' 'process.stdout.write("agent-started "+JSON.stringify(process.argv.slice(2))+"\\n");setInterval(()=>{},1<<30)' > /tmp/sup-agent.mjs`,
    );
    await sh.run("echo 'console=ttyS0 ballast.vm_id=sup-1 ballast.coordinator=10.0.2.100:50099' > /tmp/sup-cmdline");
    await sh.run(
      "BALLAST_CMDLINE=/tmp/sup-cmdline BALLAST_AGENT=/tmp/sup-agent.mjs BALLAST_AGENT_LOG=/tmp/sup.log /etc/ballast/agent-supervisor & echo $! > /tmp/sup.pid",
    );
    let text = await waitForLog("/tmp/sup.log", (t) => t.includes("agent-started"));
    expect(text).toContain('agent-started ["run","--coordinator","10.0.2.100:50099","--vm-id","sup-1"]');
    const findAgent = "for p in $(pidof node); do grep -q sup-agent /proc/$p/cmdline && echo $p; done";
    const pid = (await sh.run(findAgent)).output.trim();
    expect(pid).toMatch(/^\d+$/);
    // Like OOMScoreAdjust=-900 in agent/ballast-agent.service.
    expect((await sh.readFile(`/proc/${pid}/oom_score_adj`)).trim()).toBe("-900");
    // Restart on exit, like systemd's Restart=always.
    await sh.run(`kill ${pid}`);
    text = await waitForLog("/tmp/sup.log", (t) => t.split("agent-started").length > 2);
    expect(text).toContain("exited with status 143");
    expect(text.split("agent-started").length).toBeGreaterThan(2);
    // Stop the loop first, then its current agent.
    await sh.run(`kill $(cat /tmp/sup.pid); sleep 0.2; for p in $(${findAgent}); do kill $p; done; true`);
  });

  it("cache-read fills Cached (clean page cache) with ≥ 450 MiB from /data/blob, and it stays", async () => {
    const sh = shell!;
    const before = meminfo(await sh.readFile("/proc/meminfo"));
    const t0 = Date.now();
    // No --file: the workload's default is the data disk's blob.
    const res = await sh.run(`node ${GUEST_WORKLOAD_PATH} cache-read --mib 500`, { timeoutMs: 90_000 });
    timings.cacheReadMs = Date.now() - t0;
    expect(res.exitCode, res.output).toBe(0);
    expect(res.output).toContain(`read 500.0 MiB of ${GUEST_DATA_BLOB}`);
    // The workload has exited; its file pages must still be cached (the mount keeps the device open).
    await new Promise((r) => setTimeout(r, 1000));
    const after = meminfo(await sh.readFile("/proc/meminfo"));
    const cachedGrownKiB = kib(after, "Cached") - kib(before, "Cached");
    timings.cachedBeforeMiB = Math.round(kib(before, "Cached") / 1024);
    timings.cachedAfterMiB = Math.round(kib(after, "Cached") / 1024);
    timings.buffersGrownMiB = Math.round((kib(after, "Buffers") - kib(before, "Buffers")) / 1024);
    expect(cachedGrownKiB).toBeGreaterThanOrEqual(450 * 1024);
    // A file on a filesystem, not raw block-device cache: Buffers stays small.
    expect(kib(after, "Buffers") - kib(before, "Buffers")).toBeLessThan(32 * 1024);
    await captureProc(sh, "debian-6.1-guest-cache");
  });

  it("inflates the balloon to 512 MiB through QMP", async () => {
    const { actual, ms } = await balloonTo(srcQmp!, 512 * MiB, 60_000);
    timings.inflateTo512Ms = ms;
    expect(actual).toBe(512 * MiB);
    const vmstat = await shell!.readFile("/proc/vmstat");
    const inflated = Number(/^balloon_inflate (\d+)$/m.exec(vmstat)?.[1] ?? 0);
    // 4 KiB pages: 1 GiB - 512 MiB = 131072 pages.
    expect(inflated).toBeGreaterThanOrEqual(131_072);
    await captureProc(shell!, "debian-6.1-guest-ballooned");
  });

  it("runs the workload modes", async () => {
    const sh = shell!;
    const w = `node ${GUEST_WORKLOAD_PATH}`;
    const freed = await sh.run(`${w} freed-anon --mib 64`, { timeoutMs: 60_000 });
    expect(freed.output).toMatch(/freed-anon: wrote 64 MiB/);
    const burst = await sh.run(`${w} burst --mib 32 --delay-ms 100 --hold-ms 200`, { timeoutMs: 60_000 });
    expect(burst.output).toContain("burst-done");
    const hot = await sh.run(`${w} hot-writer --mib 16 --rate-mib 16 --seconds 3 --progress /tmp/hot.jsonl`, { timeoutMs: 60_000 });
    expect(hot.exitCode, hot.output).toBe(0);
    const lines = (await sh.readFile("/tmp/hot.jsonl")).trim().split("\n").map((l) => JSON.parse(l) as { t: number; bytes: number });
    expect(lines.length).toBeGreaterThanOrEqual(4);
    const first = lines[0]!;
    const last = lines.at(-1)!;
    const rateMiBs = (last.bytes - first.bytes) / MiB / ((last.t - first.t) / 1000);
    timings.hotWriterMiBs = Math.round(rateMiBs * 10) / 10;
    // TCG is slow and noisy: only check it is in the right ballpark.
    expect(rateMiBs).toBeGreaterThan(8);
    expect(rateMiBs).toBeLessThan(24);
  });

  it("live-migrates to a second QEMU and the same shell answers there", async () => {
    const sh = shell!;
    const token = `mig-${Date.now()}`;
    await sh.run(`export BLST_TOKEN=${token}; cd /tmp`);
    const uptimeBefore = Number((await sh.readFile("/proc/uptime")).split(" ")[0]);

    dst = await startVm({ ...vmOptions, name: "dst", guestfwdPort: ports[1] ?? 0, incoming: true });
    dstQmp = await connectQmp(dst.labQmpPath, log);
    const caps = { capabilities: [{ capability: "events", state: true }] };
    await srcQmp!.execute("migrate-set-capabilities", caps);
    await dstQmp.execute("migrate-set-capabilities", caps);
    const uri = `tcp:127.0.0.1:${ports[2]}`;
    await dstQmp.execute("migrate-incoming", { uri });
    // QEMU 7.2 defaults to 32 MiB/s; always set a real limit.
    await srcQmp!.execute("migrate-set-parameters", { "max-bandwidth": 1_250_000_000, "downtime-limit": 300 });
    const finished = waitForEvent(srcQmp!, "MIGRATION", {
      match: (d) => d.status === "completed" || d.status === "failed" || d.status === "cancelled",
      timeoutMs: 90_000,
    });
    const resumed = waitForEvent(dstQmp, "RESUME", { timeoutMs: 90_000 });
    const t0 = Date.now();
    await srcQmp!.execute("migrate", { uri });
    const done = await finished;
    expect(done.data.status).toBe("completed");
    await resumed;
    timings.migrationWallMs = Date.now() - t0;
    const info = await srcQmp!.execute<{ "total-time"?: number; downtime?: number; ram?: { transferred: number } }>("query-migrate");
    timings.migrationTotalMs = info["total-time"] ?? -1;
    timings.migrationDowntimeMs = info.downtime ?? -1;
    timings.migrationTransferredMiB = Math.round((info.ram?.transferred ?? 0) / MiB);
    expect((await dstQmp.execute<{ status: string }>("query-status")).status).toBe("running");

    // The source is now paused for good; leave it and talk to the destination.
    sh.close();
    shell = undefined;
    await srcQmp!.close();
    srcQmp = undefined;
    await src!.stop();
    src = undefined;

    shell = await GuestShell.connect(dst.serialPath, { timeoutMs: 10_000, logger: log });
    const t1 = Date.now();
    const res = await shell.run('echo "$BLST_TOKEN $(pwd)"', { timeoutMs: 30_000 });
    timings.firstDstCommandMs = Date.now() - t1;
    expect(res).toEqual({ output: `${token} /tmp\n`, exitCode: 0 });
    const uptimeAfter = Number((await shell.readFile("/proc/uptime")).split(" ")[0]);
    expect(uptimeAfter).toBeGreaterThan(uptimeBefore);

    // The balloon device came along: deflate it on the destination.
    const { ms } = await balloonTo(dstQmp, 1024 * MiB, 30_000);
    timings.deflateOnDstMs = ms;
    const node = await shell.run("node -e 'console.log(6*7)'", { timeoutMs: 30_000 });
    expect(node.output).toBe("42\n");
  });

  afterAll(() => {
    if (!CAPTURE || !notes.kernel) return;
    const date = new Date().toISOString().slice(0, 10);
    const section = `${README_BEGIN}
## Real-guest captures (lab-guest.test.ts)

Captured by \`test/integration/lab-guest.test.ts\` (re-capture with
\`BALLAST_CAPTURE_FIXTURES=1 npx vitest run test/integration/lab-guest.test.ts\`).

Guest: the lab image from \`lab/guest-image.ts\`: Debian kernel \`${notes.kernel}\`
(\`${notes.kernelBuild ?? ""}\`), busybox init, read-only squashfs root with node,
1 GiB RAM (\`-m 1024M\`), QEMU 7.2 TCG, q35, \`-cpu max\`, one vCPU, virtio-balloon
with \`deflate-on-oom=on\` (no free-page reporting), and a data disk as /dev/vdb: an
uncompressed read-only squashfs holding one 500 MiB file of random bytes, mounted at
\`/data\` (so \`/data/blob\`). ${standIn ? "The agent was a stand-in (an idle node process)." : "The agent was not running (ballast.agent=0)."}
Captured on ${date}.

Each folder is a procRoot for the agent's \`Collector\`: \`meminfo\`, \`vmstat\`,
\`pressure/memory\`, \`zoneinfo\` and \`sys/vm/min_free_kbytes\`,
\`sys/vm/watermark_scale_factor\` (from \`/proc/sys/vm/\`), copied verbatim. Its
sibling \`<folder>-sys/\` is the matching sysRoot, laid out like \`host-debian12-sys/\`:
only \`bus/virtio/drivers/virtio_balloon/virtioN/features\` (a symlinked device
directory in the guest, a plain directory here), captured in the same state.

| folder | state |
|---|---|
| \`debian-6.1-guest/\` | idle guest a few seconds after boot, balloon at 1 GiB (not inflated) |
| \`debian-6.1-guest-cache/\` | a second after \`workload.mjs cache-read --mib 500\` (which reads \`/data/blob\`) exited: about 500 MiB of clean page cache of a file, counted in **Cached** (Buffers stays small) |
| \`debian-6.1-guest-ballooned/\` | then QMP \`balloon\` to 512 MiB, after \`query-balloon\` reported it reached: MemTotal unchanged (deflate-on-oom), MemFree lower, \`balloon_inflate\` in vmstat counts 4 KiB pages |
${README_END}
`;
    const readmePath = path.join(FIXTURES, "README.md");
    // Other folders here come from other tests or engineers: replace only our section.
    let readme = existsSync(readmePath) ? readFileSync(readmePath, "utf8") : "# /proc fixtures\n\nEach folder is a verbatim copy of files from /proc (or /sys) of one machine in one state.\nFolders with their own README (e.g. `host-debian12/`) describe themselves there.\n\n";
    const b = readme.indexOf(README_BEGIN);
    const e = readme.indexOf(README_END);
    if (b >= 0 && e > b) readme = readme.slice(0, b) + section.trimEnd() + readme.slice(e + README_END.length);
    else readme = `${readme.trimEnd()}\n\n${section}`;
    writeFileSync(readmePath, readme.endsWith("\n") ? readme : `${readme}\n`);
  });
});
