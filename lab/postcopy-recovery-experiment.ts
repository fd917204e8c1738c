/**
 * Standalone experiment (no coordinator): what QEMU does when the migration
 * stream breaks during post-copy, and whether migrate-recover + migrate
 * resume=true brings it back. Two lab QEMUs (real guest, no agent), raw QMP
 * on their lab sockets, a TcpProxy on the migration stream that we cut.
 *
 *   node --import tsx lab/postcopy-recovery-experiment.ts            # cut, then migrate-recover + resume
 *   node --import tsx lab/postcopy-recovery-experiment.ts --cancel   # cut, then migrate_cancel on the source
 *
 * Prints a JSON line per observation; the findings are in
 * docs/reliability-notes-postcopy.md.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { QmpClient, type QmpEvent } from "../coordinator/qmp-client.js";
import { freePort } from "../shared/net.js";
import { ensureGuestImage } from "./guest-image.js";
import { TcpProxy } from "./proxies.js";
import { GuestShell } from "./serial-shell.js";
import { startVm } from "./vm.js";
import { sleep } from "../shared/retry.js";

const ROOT = resolve(import.meta.dirname, "..");
const t0 = Date.now();
const say = (what: string, data: Record<string, unknown> = {}) => console.log(JSON.stringify({ t: ((Date.now() - t0) / 1000).toFixed(1), what, ...data }));

async function main(): Promise<void> {
  const image = await ensureGuestImage({ agentBundle: join(ROOT, "dist/ballast-agent.mjs") });
  const dir = mkdtempSync(join(tmpdir(), "bpcx-"));
  const fwd = await freePort();
  const base = { workDir: dir, image, memMiB: 512, guestfwdPort: fwd, agent: false, dataDisk: false } as const;
  const src = await startVm({ ...base, name: "s" });
  const dst = await startVm({ ...base, name: "d", incoming: true });
  const qs = new QmpClient({ socketPath: src.labQmpPath, reconnect: false });
  const qd = new QmpClient({ socketPath: dst.labQmpPath, reconnect: false });
  const proxies: TcpProxy[] = [];
  try {
    await qs.connect();
    await qd.connect();
    for (const [side, q] of [["src", qs], ["dst", qd]] as const) {
      q.on("event", (ev: QmpEvent) => {
        if (["MIGRATION", "STOP", "RESUME", "MIGRATION_PASS"].includes(ev.event)) say(`event ${side}`, { event: ev.event, data: ev.data });
      });
    }
    const shell = await GuestShell.connect(src.serialPath);
    await shell.ready(120_000);
    // Dirty memory so post-copy has lots to move: 300 MiB held and rewritten.
    await shell.run("node /opt/ballast/workload.mjs hot-writer --mib 300 --rate-mib 30 >/tmp/hw.out 2>&1 &");
    await sleep(15_000);
    shell.close();

    const caps = [{ capability: "events", state: true }, { capability: "postcopy-ram", state: true }];
    await qs.execute("migrate-set-capabilities", { capabilities: caps });
    await qd.execute("migrate-set-capabilities", { capabilities: caps });
    const inPort = await freePort();
    await qd.execute("migrate-incoming", { uri: `tcp:127.0.0.1:${inPort}` });
    const proxy = await TcpProxy.start({ host: "127.0.0.1", port: inPort });
    proxies.push(proxy);
    await qs.execute("migrate-set-parameters", { "max-bandwidth": 4_000_000, "max-postcopy-bandwidth": 2_000_000 });
    await qs.execute("migrate", { uri: `tcp:127.0.0.1:${proxy.port}` });
    await sleep(1500);
    await qs.execute("migrate-start-postcopy");
    for (let i = 0; i < 100; i++) {
      const s = (await qs.execute("query-migrate")) as { status?: string };
      if (s.status === "postcopy-active") break;
      await sleep(200);
    }
    await sleep(3000);
    const status = async (label: string) => {
      const ms = (await qs.execute("query-migrate").catch((e: Error) => ({ err: e.message }))) as Record<string, unknown>;
      const md = (await qd.execute("query-migrate").catch((e: Error) => ({ err: e.message }))) as Record<string, unknown>;
      const rs = (await qs.execute("query-status").catch((e: Error) => ({ err: e.message }))) as Record<string, unknown>;
      const rd = (await qd.execute("query-status").catch((e: Error) => ({ err: e.message }))) as Record<string, unknown>;
      say(label, {
        src: { status: ms.status, err: ms["error-desc"], run: rs.status, transferred: (ms.ram as Record<string, unknown> | undefined)?.transferred },
        dst: { status: md.status, err: md["error-desc"], run: rd.status },
      });
      return { src: String(ms.status), dst: String(md.status) };
    };
    await status("before cut");
    await proxy.block(true);
    say("cut", { connections: proxy.cut() });
    for (let i = 0; i < 6; i++) {
      await sleep(2000);
      await status(`after cut +${(i + 1) * 2}s`);
    }
    if (process.argv.includes("--cancel")) {
      // Variant: what migrate_cancel does to a paused post-copy migration.
      const c = await qs.execute("migrate_cancel").then(() => "ok", (e: Error) => `error: ${e.message}`);
      say("migrate_cancel on src while postcopy-paused", { c });
      for (let i = 0; i < 3; i++) {
        await sleep(2000);
        await status(`after migrate_cancel +${(i + 1) * 2}s`);
      }
      const dshell0 = await GuestShell.connect(dst.serialPath);
      const a0 = await dshell0.run("echo alive-on-dst", { timeoutMs: 8000 }).then((r) => r.output.trim(), (e: Error) => `no answer: ${e.message.slice(0, 60)}`);
      const sshell0 = await GuestShell.connect(src.serialPath);
      const b0 = await sshell0.run("echo alive-on-src", { timeoutMs: 8000 }).then((r) => r.output.trim(), (e: Error) => `no answer: ${e.message.slice(0, 60)}`);
      say("guest after migrate_cancel", { dst: a0, src: b0 });
      dshell0.close();
      sshell0.close();
      return;
    }
    // Is the guest responsive on the destination while paused?
    const dshell = await GuestShell.connect(dst.serialPath);
    const alive = await dshell.run("echo alive-on-dst", { timeoutMs: 8000 }).then(
      (r) => r.output.trim(),
      (e: Error) => `no answer: ${e.message.slice(0, 80)}`,
    );
    say("guest shell on dst while paused", { alive });

    // Recovery: a new listening URI on the destination, then migrate resume on the source.
    const recPort = await freePort();
    const rec = await qd.execute("migrate-recover", { uri: `tcp:127.0.0.1:${recPort}` }).then(
      () => "ok",
      (e: Error) => `error: ${e.message}`,
    );
    say("migrate-recover on dst", { rec });
    const proxy2 = await TcpProxy.start({ host: "127.0.0.1", port: recPort });
    proxies.push(proxy2);
    const res = await qs.execute("migrate", { uri: `tcp:127.0.0.1:${proxy2.port}`, resume: true }).then(
      () => "ok",
      (e: Error) => `error: ${e.message}`,
    );
    say("migrate resume=true on src", { res });
    let final = { src: "", dst: "" };
    for (let i = 0; i < 120; i++) {
      await sleep(2000);
      final = await status(`recovery +${(i + 1) * 2}s`);
      if (["completed", "failed", "cancelled"].includes(final.src) && ["completed", "failed"].includes(final.dst)) break;
    }
    const alive2 = await dshell.run("echo alive-on-dst; cat /tmp/hw.out | tail -1", { timeoutMs: 30_000 }).then(
      (r) => r.output.trim(),
      (e: Error) => `no answer: ${e.message.slice(0, 80)}`,
    );
    say("guest shell on dst after recovery", { alive2, final });
    dshell.close();

  } finally {
    await qs.close().catch(() => {});
    await qd.close().catch(() => {});
    for (const p of proxies) await p.close();
    await src.stop();
    await dst.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    console.error(err);
    process.exit(1);
  },
);
