/**
 * Starts a real QEMU with no guest OS: enough for QMP, the balloon device and
 * live migration (pre-copy and post-copy) without booting anything.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";

/** A bare QEMU process. */
export interface BareQemu {
  name: string;
  pid: number;
  /** QMP socket for the coordinator. */
  qmp: string;
  /** Second QMP socket for the test itself (QEMU serves one client per socket). */
  testQmp: string;
  stop(): Promise<void>;
}

/** Options for {@link startBareQemu}. */
export interface BareQemuOptions {
  name: string;
  dir: string;
  /** Default 128. */
  memMiB?: number;
  /** Adds -incoming defer. */
  incoming?: boolean;
}

/** Spawns QEMU (TCG, q35, -nodefaults) and waits for its QMP sockets. */
export async function startBareQemu(o: BareQemuOptions): Promise<BareQemu> {
  const qmp = join(o.dir, `${o.name}.qmp`);
  const testQmp = join(o.dir, `${o.name}.test.qmp`);
  const args = [
    "-name", o.name, "-machine", "q35", "-accel", "tcg", "-m", `${o.memMiB ?? 128}M`, "-smp", "1",
    "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
    "-device", "virtio-balloon-pci,id=balloon0,deflate-on-oom=on",
    "-qmp", `unix:${qmp},server=on,wait=off`,
    "-qmp", `unix:${testQmp},server=on,wait=off`,
  ];
  if (o.incoming) args.push("-incoming", "defer");
  const child: ChildProcess = spawn("qemu-system-x86_64", args, { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  child.stderr?.on("data", (b: Buffer) => (stderr += b.toString()));
  const exited = new Promise<number | null>((r) => child.on("exit", (code) => r(code)));
  const until = Date.now() + 15_000;
  while (!existsSync(qmp) || !existsSync(testQmp)) {
    if (child.exitCode !== null) throw new Error(`qemu ${o.name} exited at start: ${stderr}`);
    if (Date.now() > until) throw new Error(`qemu ${o.name} did not create its QMP sockets: ${stderr}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  const pid = child.pid ?? 0;
  return {
    name: o.name,
    pid,
    qmp,
    testQmp,
    async stop() {
      if (child.exitCode !== null) return;
      child.kill("SIGTERM");
      const t = setTimeout(() => child.kill("SIGKILL"), 3000);
      await exited;
      clearTimeout(t);
    },
  };
}
