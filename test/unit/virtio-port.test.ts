// agent/virtio-port.ts on the host: a fake sysfs tree, mknod, and a FIFO standing in for the port's character device
// (both are pollable fds that a plain read() would block on). The real port is exercised in the lab guest
// (test/integration/channel.test.ts).
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { execFileSync } from "node:child_process";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AGENT_PORT_NAME, ensureDeviceNode, findVirtioPort, openPollableDevice, openVirtioPort } from "../../agent/virtio-port.js";

const ROOT = resolve(import.meta.dirname, "../..");
let dir = "";

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "ballast-vport-"));
  // Two ports, as a guest with qemu-guest-agent and Ballast would have; ours is the second.
  const cls = join(dir, "sys/class/virtio-ports");
  for (const [dev, name, numbers] of [
    ["vport2p1", "org.qemu.guest_agent.0", "247:1"],
    ["vport3p1", AGENT_PORT_NAME, "1:3"],
  ] as const) {
    mkdirSync(join(cls, dev), { recursive: true });
    writeFileSync(join(cls, dev, "name"), `${name}\n`);
    writeFileSync(join(cls, dev, "dev"), `${numbers}\n`);
  }
  mkdirSync(join(dir, "dev"));
});

afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("finding the port by name", () => {
  it("reads /sys/class/virtio-ports/*/name and the device numbers", () => {
    const p = findVirtioPort(AGENT_PORT_NAME, { sysRoot: join(dir, "sys"), devRoot: join(dir, "dev") });
    expect(p).toEqual({ name: AGENT_PORT_NAME, device: "vport3p1", devPath: join(dir, "dev/vport3p1"), major: 1, minor: 3 });
    expect(findVirtioPort("org.example.none", { sysRoot: join(dir, "sys") })).toBeUndefined();
    // No virtio-ports class at all (virtio_console not loaded): not there, not an error.
    expect(findVirtioPort(AGENT_PORT_NAME, { sysRoot: join(dir, "nowhere") })).toBeUndefined();
  });

  it("creates a missing device node with mknod, as udev would (the lab guest has no udev)", () => {
    const p = findVirtioPort(AGENT_PORT_NAME, { sysRoot: join(dir, "sys"), devRoot: join(dir, "dev") })!;
    ensureDeviceNode(p);
    const st = statSync(p.devPath);
    expect(st.isCharacterDevice()).toBe(true);
    // 1:3 is /dev/null's numbers: the node really is that device.
    expect([Math.floor(st.rdev / 256), st.rdev % 256]).toEqual([1, 3]);
    ensureDeviceNode(p); // already there: fine
    const { socket } = openVirtioPort(AGENT_PORT_NAME, { sysRoot: join(dir, "sys"), devRoot: join(dir, "dev") });
    socket.destroy();
  });

  it("refuses a node that is not a character device, and says which", () => {
    writeFileSync(join(dir, "dev/vport9p9"), "");
    expect(() => ensureDeviceNode({ name: "x", device: "vport9p9", devPath: join(dir, "dev/vport9p9"), major: 1, minor: 3 })).toThrow(/vport9p9 exists but is not a character device/);
  });
});

describe("the port as an event-loop stream (FIFO stand-in)", () => {
  it("reads and writes through the pipe handle", async () => {
    const fifo = join(dir, "rw.fifo");
    execFileSync("mkfifo", [fifo]);
    const s = openPollableDevice(fifo);
    const got = new Promise<string>((r) => s.once("data", (d: Buffer) => r(d.toString())));
    s.write("ping\n");
    // O_RDWR on a FIFO reads back what it wrote: the round trip went through epoll, not a thread.
    expect(await got).toBe("ping\n");
    s.destroy();
  });

  /** Spawns a node that opens `fifo` the given way and idles; returns how long it took to exit after SIGTERM (or undefined if it did not within `limitMs`). */
  async function exitAfterSigterm(how: "pipe-handle" | "read-stream", fifo: string, limitMs: number): Promise<number | undefined> {
    const script =
      how === "pipe-handle"
        ? `import { openPollableDevice } from ${JSON.stringify(join(ROOT, "agent/virtio-port.ts"))};
           import { sessionOverStream } from ${JSON.stringify(join(ROOT, "agent/channel.ts"))};
           // The agent's transport on the idle port: an HTTP/2 session waiting for a peer that never answers.
           const c = sessionOverStream(openPollableDevice(${JSON.stringify(fifo)}));
           void c.stream.send({ msg: { case: "hello", value: { vmId: "t" } } }).catch(() => {});
           (async () => { try { for await (const _ of c.stream) {} } catch {} })();
           process.once("SIGTERM", () => c.close());
           process.stdout.write("ready\\n");`
        : `import { createReadStream } from "node:fs";
           const s = createReadStream(${JSON.stringify(fifo)}, { flags: "r+" });
           s.on("data", () => {}); s.on("error", () => {});
           process.once("SIGTERM", () => s.destroy());
           setTimeout(() => process.stdout.write("ready\\n"), 200);`;
    // --lite-mode as agent/ballast-agent.service runs it (no WebAssembly: see loadHeadersGlobal in agent/channel.ts).
    const flags = how === "pipe-handle" ? ["--lite-mode"] : [];
    const child = spawn(process.execPath, [...flags, "--import", "tsx", "--input-type=module", "-e", script], { cwd: ROOT, stdio: ["ignore", "pipe", "inherit"] });
    let how2: string | undefined;
    const exited = new Promise<void>((r) => child.once("exit", (code, signal) => ((how2 = `${code ?? signal}`), r())));
    await new Promise<void>((r, j) => {
      child.stdout.on("data", (d: Buffer) => d.toString().includes("ready") && r());
      child.once("exit", (code) => j(new Error(`child exited early (${code})`)));
    });
    await new Promise((r) => setTimeout(r, 300));
    const t0 = performance.now();
    child.kill("SIGTERM");
    const done = await Promise.race([exited.then(() => performance.now() - t0), new Promise<undefined>((r) => setTimeout(() => r(undefined), limitMs))]);
    if (done === undefined) {
      child.kill("SIGKILL");
      await exited;
      return undefined;
    }
    // It ended by itself (its SIGTERM handler closed the port), not by the signal's default action.
    expect(how2).toBe("0");
    return done;
  }

  it("a process holding the open, idle port exits promptly on SIGTERM; a read stream on it would not", async () => {
    // An idle port: a pty slave whose master (held by python3 here) never writes and never reads.
    // (A FIFO would read back the agent's own HTTP/2 preface.)
    const holder = spawn("python3", ["-c", "import os,pty,sys,time,tty\nm,s=pty.openpty()\ntty.setraw(s)\nprint(os.ttyname(s),flush=True)\ntime.sleep(30)"], { stdio: ["ignore", "pipe", "inherit"] });
    const ptyPath = await new Promise<string>((r) => holder.stdout.once("data", (d: Buffer) => r(d.toString().trim())));
    let ms: number | undefined;
    try {
      ms = await exitAfterSigterm("pipe-handle", ptyPath, 3000);
    } finally {
      holder.kill("SIGKILL");
    }
    console.log(`virtio-port: exit after SIGTERM with the port open and idle: ${ms?.toFixed(1)} ms`);
    expect(ms).toBeDefined();
    expect(ms!).toBeLessThan(1000);
    // The contrast that makes the pipe handle necessary: a threadpool read() parks and the process cannot exit.
    const fifo = join(dir, "idle.fifo");
    execFileSync("mkfifo", [fifo]);
    const parked = await exitAfterSigterm("read-stream", fifo, 1500);
    expect(parked).toBeUndefined();
  }, 20_000);
});
