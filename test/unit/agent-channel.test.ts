// coordinator/agent-channel.ts against a stand-in for QEMU's chardev socket (a unix server on 127.0.0.1's file system):
// the "guest" end is the accepted connection, and the agent's real transport (agent/channel.ts sessionOverStream,
// connect-node HTTP/2) runs on it against the channel's real grpc-js server.
import * as grpc from "@grpc/grpc-js";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as delay } from "node:timers/promises";
import { afterEach, describe, expect, it } from "vitest";
import { sessionOverStream } from "../../agent/channel.js";
import { AgentService, type SessionRequest } from "../../gen/ballast/v1/agent_pb.js";
import { AgentChannel } from "../../coordinator/agent-channel.js";
import type { DriverEvent, VmFacts } from "../../coordinator/hypervisor.js";
import type { VmObserver } from "../../coordinator/vm-supervisor.js";
import { addService } from "../../shared/grpc-adapter.js";
import { silentLogger } from "../../shared/logger.js";

const facts = (runState: string): VmFacts => ({ ramBytes: 1 << 30, runState, balloonActualBytes: 1 << 30 });

/** QEMU's `-chardev socket,server=on`: one client at a time; the accepted socket is what the guest's port is wired to. */
class FakeChardev {
  readonly guests: Socket[] = [];
  private server: Server | undefined;
  constructor(readonly path: string) {}
  async start(): Promise<void> {
    this.server = createServer((s) => {
      s.on("error", () => undefined);
      this.guests.push(s);
    });
    await new Promise<void>((r) => this.server!.listen(this.path, () => r()));
  }
  get last(): Socket | undefined {
    return this.guests[this.guests.length - 1];
  }
  close(): void {
    for (const s of this.guests) s.destroy();
    this.server?.close();
  }
}

interface Rig {
  dir: string;
  chardev: FakeChardev;
  channel: AgentChannel;
  emit(e: DriverEvent): void;
  driver: { connected: boolean; facts: VmFacts | undefined; agentChannelPath(): Promise<string | undefined> };
  /** Sessions the channel's server got: their hellos, and whether their call has ended. */
  sessions: { hello: SessionRequest; ended: boolean }[];
}

let rig: Rig | undefined;
const cleanups: (() => void)[] = [];

afterEach(() => {
  for (const c of cleanups.splice(0)) c();
  rig?.channel.close();
  rig?.chardev.close();
  if (rig) rmSync(rig.dir, { recursive: true, force: true });
  rig = undefined;
});

async function startRig(runState: string): Promise<Rig> {
  const dir = mkdtempSync(join(tmpdir(), "ballast-ach-"));
  const chardev = new FakeChardev(join(dir, "agent.sock"));
  await chardev.start();
  let observer: VmObserver = {};
  const vm = { name: "vm1", observe: (o: VmObserver) => ((observer = o), () => undefined) };
  const driver = { connected: true, facts: facts(runState) as VmFacts | undefined, agentChannelPath: async () => chardev.path };
  const sessions: Rig["sessions"] = [];
  const server = new grpc.Server();
  addService(
    server,
    AgentService,
    {
      session: async (ctx) => {
        const it = ctx[Symbol.asyncIterator]();
        const first = await it.next();
        if (first.done) return;
        const s = { hello: first.value, ended: false };
        sessions.push(s);
        ctx.signal.addEventListener("abort", () => (s.ended = true));
        await ctx.send({ msg: { case: "welcome", value: { vmName: "vm1", hostId: "host-x" } } });
        for (;;) if ((await it.next()).done) break;
        s.ended = true;
      },
    },
    (err) => ({ code: grpc.status.UNAVAILABLE, details: String(err) }),
  );
  const channel = new AgentChannel({ vm, driver, server, logger: silentLogger(), backoff: { initialMs: 50, maxMs: 200 }, settleMs: 20 });
  rig = {
    dir,
    chardev,
    channel,
    driver,
    sessions,
    emit: (e) => {
      if (e.type === "up") driver.facts = e.facts;
      observer.driverEvent?.(e);
    },
  };
  return rig;
}

async function waitFor<T>(what: string, fn: () => T | undefined | false, timeoutMs = 3000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = fn();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await delay(10);
  }
}

/** The agent's side: a Session over the guest end of the port; resolves with the Welcome's host id. */
async function agentSession(guest: Socket, vmId = "vm1") {
  const c = sessionOverStream(guest);
  cleanups.push(() => c.close());
  await c.stream.send({ msg: { case: "hello", value: { vmId } } });
  const it = c.stream[Symbol.asyncIterator]();
  const welcome = await it.next();
  const rest = (async () => {
    try {
      while (!(await it.next()).done);
      return "ended";
    } catch (err) {
      return `failed: ${String(err)}`;
    }
  })();
  return { welcome: welcome.value, rest, connection: c };
}

describe("the host end of the agent's port", () => {
  it("connects to a running guest, and gRPC runs over the port (connect-node client, grpc-js server)", async () => {
    const r = await startRig("running");
    const guest = await waitFor("the host end", () => r.chardev.last);
    const s = await agentSession(guest);
    expect(s.welcome?.msg.case).toBe("welcome");
    await waitFor("the hello on the server", () => r.sessions[0]);
    expect(r.sessions[0]!.hello.msg.case).toBe("hello");
    expect(r.channel.state).toBe("connected");
  });

  it("never connects while the QEMU is inmigrate; connects at once on RESUME", async () => {
    const r = await startRig("inmigrate");
    r.emit({ type: "up", facts: facts("inmigrate") });
    r.emit({ type: "migration-status", status: "active" });
    await delay(400);
    expect(r.chardev.guests).toHaveLength(0);
    const t0 = performance.now();
    r.emit({ type: "migration-status", status: "completed" });
    r.emit({ type: "resume" });
    await waitFor("the host end after RESUME", () => r.chardev.last);
    expect(performance.now() - t0).toBeLessThan(200);
    const s = await agentSession(r.chardev.last!);
    expect(s.welcome?.msg.case).toBe("welcome");
  });

  it("the source drops its host end at STOP during a migration (the old session's calls end), and reconnects on RESUME after a failed one", async () => {
    const r = await startRig("running");
    const guest = await waitFor("the host end", () => r.chardev.last);
    const s = await agentSession(guest);
    await waitFor("a session", () => r.sessions[0]);
    r.emit({ type: "migration-status", status: "active" });
    r.emit({ type: "stop" });
    // The guest's end sees the host go away; the server's call ends instead of hanging forever.
    await waitFor("guest sees the host end close", () => guest.destroyed || guest.readableEnded);
    await waitFor("the server's call ended", () => r.sessions[0]!.ended);
    expect(await s.rest).toMatch(/failed|ended/);
    await delay(300);
    expect(r.chardev.guests).toHaveLength(1);
    // The migration failed: the source resumes, and the host end comes back.
    r.emit({ type: "migration-status", status: "failed" });
    r.emit({ type: "resume" });
    const again = await waitFor("a new host end", () => r.chardev.guests[1]);
    expect((await agentSession(again)).welcome?.msg.case).toBe("welcome");
  });

  it("a STOP outside a migration (a pause) keeps the host end", async () => {
    const r = await startRig("running");
    await waitFor("the host end", () => r.chardev.last);
    r.emit({ type: "stop" });
    await delay(200);
    expect(r.channel.state).toBe("connected");
    expect(r.chardev.last!.destroyed).toBe(false);
  });

  it("VSERPORT_CHANGE open:false (the agent closed the port) resets the host end; open:true does not", async () => {
    const r = await startRig("running");
    const first = await waitFor("the host end", () => r.chardev.last);
    first.resume(); // nobody else reads this guest end: let it see the EOF
    r.emit({ type: "agent-port", open: true });
    await delay(200);
    expect(r.chardev.guests).toHaveLength(1);
    r.emit({ type: "agent-port", open: false });
    await waitFor("a fresh host end", () => r.chardev.guests[1]);
    await waitFor("the old one closed", () => first.destroyed || first.readableEnded);
    expect(r.channel.connects).toBe(2);
  });

  it("reconnects with backoff when QEMU closes the socket, and not while the guest is paused", async () => {
    const r = await startRig("running");
    const first = await waitFor("the host end", () => r.chardev.last);
    first.destroy();
    await waitFor("reconnected", () => r.chardev.guests[1]);
    r.emit({ type: "stop" });
    r.chardev.guests[1]!.destroy();
    await delay(400);
    expect(r.chardev.guests).toHaveLength(2);
    r.emit({ type: "resume" });
    await waitFor("reconnected after resume", () => r.chardev.guests[2]);
  });
});

describe("VSERPORT_CHANGE as a driver event", () => {
  it("is translated for the agent's port only (id=agentport), not for another port", async () => {
    const { translateQmpEvent } = await import("../../coordinator/qmp-driver.js");
    const ev = (data: Record<string, unknown>) => ({ event: "VSERPORT_CHANGE", data, timestamp: { seconds: 0, microseconds: 0 } });
    expect(translateQmpEvent(ev({ id: "agentport", open: false }))).toEqual({ type: "agent-port", open: false });
    expect(translateQmpEvent(ev({ id: "agentport", open: true }))).toEqual({ type: "agent-port", open: true });
    expect(translateQmpEvent(ev({ id: "qga0", open: false }))).toBeUndefined();
    expect(translateQmpEvent(ev({ id: "agentport" }))).toBeUndefined();
  });
});

describe("vms[].agentSocket in the coordinator config", () => {
  it("resolves against the config file's folder, is optional, and two VMs cannot share one", async () => {
    const { parseCoordinatorConfig } = await import("../../coordinator/config.js");
    const vm = (name: string, extra: Record<string, unknown>) => ({ name, qmpSocket: `${name}.qmp`, ...extra });
    const c = parseCoordinatorConfig({ vms: [vm("a", { agentSocket: "a.agent.sock" }), vm("b", {})] }, "c.json", "/etc/ballast");
    expect(c.vms[0]!.agentSocket).toBe("/etc/ballast/a.agent.sock");
    expect(c.vms[1]!.agentSocket).toBeUndefined();
    expect(() => parseCoordinatorConfig({ vms: [vm("a", { agentSocket: "/run/x.sock" }), vm("b", { agentSocket: "x.sock" })] }, "c.json", "/run")).toThrow(
      "c.json: vms[1].agentSocket: agent socket /run/x.sock is used by another VM (also vms[0].agentSocket)",
    );
    expect(() => parseCoordinatorConfig({ vms: [vm("a", { agentSocket: "" })] }, "c.json")).toThrow(/c\.json: vms\[0\]\.agentSocket: /);
  });
});

describe("an old session's bytes on a fresh host end", () => {
  it("are discarded up to the client preface: the new session works on the same connection", async () => {
    const r = await startRig("running");
    const guest = await waitFor("the host end", () => r.chardev.last);
    guest.write(Buffer.from("\x00\x00\x08\x06\x00\x00\x00\x00\x00stale-ping")); // an old session's frames
    const s = await agentSession(guest);
    expect(s.welcome?.msg.case).toBe("welcome");
    expect(r.channel.connects).toBe(1);
  });

  it("that keep coming without a preface drop the host end (the guest then sees EOF)", async () => {
    const r = await startRig("running");
    const guest = await waitFor("the host end", () => r.chardev.last);
    guest.resume();
    guest.write("old session frames, and no preface");
    await waitFor("the host end dropped", () => guest.readableEnded || guest.destroyed, 3000);
    await waitFor("a fresh host end", () => r.chardev.guests[1], 3000);
  });
});
