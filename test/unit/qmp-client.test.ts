/**
 * QmpClient against a scripted QMP peer on a temporary unix socket. The peer
 * speaks like QEMU 7.2 (greeting shape, \r\n line ends, id echo) but each
 * test decides how it answers.
 */
import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import {
  QmpClient,
  QmpCommandError,
  QmpDisconnectedError,
  QmpProtocolError,
  QmpTimeoutError,
  type QmpClientOptions,
  type QmpEvent,
} from "../../coordinator/qmp-client.js";
import { DeadlineError, UnavailableError } from "../../shared/errors.js";

const GREETING = { QMP: { version: { qemu: { micro: 22, minor: 2, major: 7 }, package: "Debian 1:7.2+dfsg-7+deb12u18+b3" }, capabilities: ["oob"] } };

interface Cmd {
  execute: string;
  arguments?: Record<string, unknown>;
  id?: unknown;
}

/** A scripted QMP server. `onCommand` decides replies for everything but qmp_capabilities. */
class FakeQmp {
  readonly server: net.Server;
  readonly conns: net.Socket[] = [];
  readonly received: Cmd[] = [];
  greet = true;
  onCommand: (cmd: Cmd, sock: net.Socket) => void = (cmd, sock) => reply(sock, { return: {}, id: cmd.id });

  constructor(readonly path: string) {
    this.server = net.createServer((sock) => this.accept(sock));
  }

  listen(): Promise<void> {
    return new Promise((resolve) => this.server.listen(this.path, resolve));
  }

  /** Stops accepting and drops every connection. */
  stop(): Promise<void> {
    for (const c of this.conns) c.destroy();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }

  get last(): net.Socket {
    const c = this.conns[this.conns.length - 1];
    if (!c) throw new Error("no connection yet");
    return c;
  }

  private accept(sock: net.Socket): void {
    this.conns.push(sock);
    sock.on("error", () => undefined);
    if (this.greet) reply(sock, GREETING);
    let buf = "";
    sock.setEncoding("utf8");
    sock.on("data", (chunk: string) => {
      buf += chunk;
      let nl: number;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        const cmd = JSON.parse(line) as Cmd;
        this.received.push(cmd);
        if (cmd.execute === "qmp_capabilities") reply(sock, { return: {}, id: cmd.id });
        else this.onCommand(cmd, sock);
      }
    });
  }
}

function reply(sock: net.Socket, msg: unknown): void {
  sock.write(JSON.stringify(msg) + "\r\n");
}

function event(name: string, data?: Record<string, unknown>): Record<string, unknown> {
  const e: Record<string, unknown> = { timestamp: { seconds: 1795614118, microseconds: 156182 }, event: name };
  if (data) e.data = data;
  return e;
}

function waitFor(cond: () => boolean, timeoutMs = 3000): Promise<void> {
  const until = Date.now() + timeoutMs;
  return new Promise((resolve, reject) => {
    const tick = (): void => {
      if (cond()) resolve();
      else if (Date.now() > until) reject(new Error("waitFor timed out"));
      else setTimeout(tick, 5);
    };
    tick();
  });
}

function once<T extends unknown[]>(emitter: QmpClient, name: "connected" | "disconnected" | "event"): Promise<T> {
  return new Promise((resolve) => emitter.once(name, (...args: unknown[]) => resolve(args as T)));
}

/** A pino logger whose lines are kept for assertions. */
function capturingLogger(): { logger: pino.Logger; lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = [];
  const logger = pino({ level: "trace" }, { write: (s: string) => lines.push(JSON.parse(s) as Record<string, unknown>) });
  return { logger, lines };
}

let dir: string;
let peer: FakeQmp;
const clients: QmpClient[] = [];

function client(opts: Partial<QmpClientOptions> = {}): QmpClient {
  const c = new QmpClient({ socketPath: peer.path, reconnectMinMs: 20, reconnectMaxMs: 100, connectTimeoutMs: 1000, ...opts });
  clients.push(c);
  return c;
}

beforeEach(async () => {
  dir = mkdtempSync(join(tmpdir(), "ballast-qmp-"));
  peer = new FakeQmp(join(dir, "qmp.sock"));
  await peer.listen();
});

afterEach(async () => {
  for (const c of clients.splice(0)) await c.close();
  await peer.stop();
  rmSync(dir, { recursive: true, force: true });
});

describe("handshake", () => {
  it("reads the greeting, negotiates qmp_capabilities first, then is connected", async () => {
    const c = client();
    const connected = once(c, "connected");
    expect(c.connected).toBe(false);
    await c.connect();
    await connected;
    expect(c.connected).toBe(true);
    expect(c.greeting?.version.qemu).toEqual({ micro: 22, minor: 2, major: 7 });
    expect(peer.received[0]?.execute).toBe("qmp_capabilities");
    expect(peer.received[0]?.arguments).toBeUndefined();
    // connect() while connected is a no-op.
    await c.connect();
    expect(peer.conns).toHaveLength(1);
  });

  it("concurrent connect() calls share one attempt", async () => {
    const c = client();
    await Promise.all([c.connect(), c.connect(), c.connect()]);
    expect(peer.conns).toHaveLength(1);
  });

  it("first connect failure rejects with QmpDisconnectedError and does not retry in the background", async () => {
    const c = client({ socketPath: join(dir, "absent.sock") });
    const err = await c.connect().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpDisconnectedError);
    expect(err).toBeInstanceOf(UnavailableError);
    expect((err as Error).message).toMatch(/ENOENT/);
    let connectedEvents = 0;
    c.on("connected", () => connectedEvents++);
    await new Promise((r) => setTimeout(r, 150));
    expect(connectedEvents).toBe(0);
  });

  it("times out when the peer accepts but never greets (QEMU's second-client behaviour)", async () => {
    peer.greet = false;
    const c = client({ connectTimeoutMs: 150 });
    const t0 = Date.now();
    const err = await c.connect().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpDisconnectedError);
    expect((err as Error).message).toMatch(/no greeting.*150 ms.*one QMP client per socket/);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(140);
    expect(c.connected).toBe(false);
  });

  it.each([
    { label: "not a greeting", first: { hello: "world" } },
    { label: "a greeting without a version", first: { QMP: {} } },
    { label: "a greeting with a non-numeric version", first: { QMP: { version: { qemu: { major: "7", minor: 2, micro: 0 } } } } },
  ])("rejects a peer whose first message is $label", async ({ first }) => {
    peer.greet = false;
    peer.server.on("connection", (s) => reply(s, first));
    const err = await client().connect().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpProtocolError);
    expect((err as Error).message).toMatch(/expected the QMP greeting/);
  });

  it("rejects when qmp_capabilities itself fails", async () => {
    peer.greet = false;
    peer.server.on("connection", (s) => {
      reply(s, GREETING);
      s.removeAllListeners("data");
      s.on("data", (d: Buffer | string) => {
        const cmd = JSON.parse(String(d)) as Cmd;
        reply(s, { id: cmd.id, error: { class: "GenericError", desc: "nope" } });
      });
    });
    const err = await client().connect().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpDisconnectedError);
    expect((err as Error).message).toMatch(/handshake failed.*nope/);
  });
});

describe("commands", () => {
  it("sends execute/arguments/id and resolves with return", async () => {
    peer.onCommand = (cmd, s) => reply(s, { return: { actual: 268435456 }, id: cmd.id });
    const c = client();
    await c.connect();
    await expect(c.execute("query-balloon")).resolves.toEqual({ actual: 268435456 });
    await c.execute("balloon", { value: 134217728 });
    const sent = peer.received.filter((r) => r.execute !== "qmp_capabilities");
    expect(sent[0]).toEqual({ execute: "query-balloon", id: expect.any(Number) });
    expect(sent[1]).toEqual({ execute: "balloon", arguments: { value: 134217728 }, id: expect.any(Number) });
    expect(sent[0]?.id).not.toBe(sent[1]?.id);
  });

  it("matches replies to commands by id when they come back out of order", async () => {
    const held: Cmd[] = [];
    peer.onCommand = (cmd, s) => {
      held.push(cmd);
      if (held.length === 3) for (const h of [...held].reverse()) reply(s, { return: { echo: h.arguments?.n }, id: h.id });
    };
    const c = client();
    await c.connect();
    const results = await Promise.all([1, 2, 3].map((n) => c.execute("echo", { n })));
    expect(results).toEqual([{ echo: 1 }, { echo: 2 }, { echo: 3 }]);
  });

  it("delivers events interleaved with replies, in order, with data defaulted to {}", async () => {
    peer.onCommand = (cmd, s) =>
      s.write(
        [event("MIGRATION", { status: "setup" }), { return: {}, id: cmd.id }, event("STOP"), event("BALLOON_CHANGE", { actual: 1024 })]
          .map((m) => JSON.stringify(m) + "\r\n")
          .join(""),
      );
    const c = client();
    await c.connect();
    const events: QmpEvent[] = [];
    c.on("event", (e) => events.push(e));
    await c.execute("migrate", { uri: "tcp:127.0.0.1:1" });
    await waitFor(() => events.length === 3);
    expect(events.map((e) => e.event)).toEqual(["MIGRATION", "STOP", "BALLOON_CHANGE"]);
    expect(events[0]).toEqual({ event: "MIGRATION", data: { status: "setup" }, timestamp: { seconds: 1795614118, microseconds: 156182 } });
    expect(events[1]?.data).toEqual({});
    expect(events[2]?.data).toEqual({ actual: 1024 });
  });

  const errorCases = [
    { class: "GenericError", desc: "Enable postcopy with migrate_set_capability before the start of migration", command: "migrate-start-postcopy" },
    { class: "CommandNotFound", desc: "The command nosuch has not been found", command: "nosuch" },
    { class: "DeviceNotActive", desc: "No balloon device has been activated", command: "query-balloon" },
  ];
  it.each(errorCases)("QMP error $class → QmpCommandError", async (ec) => {
    peer.onCommand = (cmd, s) => reply(s, { id: cmd.id, error: { class: ec.class, desc: ec.desc } });
    const c = client();
    await c.connect();
    const err = await c.execute(ec.command).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpCommandError);
    expect(err).toMatchObject({ code: "qmp-error", errorClass: ec.class, desc: ec.desc, command: ec.command, name: "QmpCommandError" });
    expect((err as Error).message).toBe(`QMP ${ec.command} failed: ${ec.class}: ${ec.desc}`);
    // The connection stays usable.
    peer.onCommand = (cmd, s) => reply(s, { return: { ok: true }, id: cmd.id });
    await expect(c.execute("query-status")).resolves.toEqual({ ok: true });
  });

  it("times out a command, drops its late reply and keeps working", async () => {
    const { logger, lines } = capturingLogger();
    let slow: Cmd | undefined;
    peer.onCommand = (cmd, s) => {
      if (cmd.execute === "slow") slow = cmd;
      else reply(s, { return: "fast", id: cmd.id });
    };
    const c = client({ commandTimeoutMs: 5000, logger });
    await c.connect();
    const t0 = Date.now();
    const err = await c.execute("slow", undefined, { timeoutMs: 80 }).catch((e: unknown) => e);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(75);
    expect(err).toBeInstanceOf(QmpTimeoutError);
    expect(err).toBeInstanceOf(DeadlineError);
    expect(err).toMatchObject({ code: "deadline-exceeded", command: "slow", timeoutMs: 80 });
    reply(peer.last, { return: "late", id: slow?.id });
    await expect(c.execute("other")).resolves.toBe("fast");
    expect(lines.some((l) => String(l.msg).includes("late QMP reply"))).toBe(true);
    expect(c.connected).toBe(true);
  });

  it("uses the client-wide default timeout", async () => {
    peer.onCommand = () => undefined;
    const c = client({ commandTimeoutMs: 60 });
    await c.connect();
    await expect(c.execute("never")).rejects.toMatchObject({ name: "QmpTimeoutError", timeoutMs: 60 });
  });

  it("rejects at once when not connected", async () => {
    const c = client();
    await expect(c.execute("query-status")).rejects.toBeInstanceOf(QmpDisconnectedError);
  });

  it("rejects an invalid per-call timeout without sending", async () => {
    const c = client();
    await c.connect();
    await expect(c.execute("query-status", undefined, { timeoutMs: -1 })).rejects.toMatchObject({ code: "invalid-argument" });
    expect(peer.received.map((r) => r.execute)).toEqual(["qmp_capabilities"]);
  });

  it("a throwing event listener does not break frame parsing", async () => {
    peer.onCommand = (cmd, s) => s.write(JSON.stringify(event("STOP")) + "\n" + JSON.stringify({ return: 7, id: cmd.id }) + "\n");
    const c = client();
    await c.connect();
    c.on("event", () => {
      throw new Error("listener bug");
    });
    await expect(c.execute("x")).resolves.toBe(7);
  });
});

describe("framing", () => {
  const replyLine = (id: unknown): string => `${JSON.stringify({ return: { text: "größe ✓ 🎈", n: 1 }, id })}\r\n`;
  const splits: Array<{ label: string; write: (s: net.Socket, id: unknown) => Promise<void> }> = [
    {
      label: "one byte at a time",
      write: async (s, id) => {
        for (const b of Buffer.from(replyLine(id))) {
          s.write(Buffer.from([b]));
          await new Promise((r) => setImmediate(r));
        }
      },
    },
    {
      label: "split inside a multi-byte UTF-8 character",
      write: async (s, id) => {
        const buf = Buffer.from(replyLine(id));
        const at = buf.indexOf(Buffer.from("🎈")) + 2;
        s.write(buf.subarray(0, at));
        await new Promise((r) => setTimeout(r, 20));
        s.write(buf.subarray(at));
      },
    },
    {
      label: "split right before the newline",
      write: async (s, id) => {
        const line = replyLine(id);
        s.write(line.slice(0, -1));
        await new Promise((r) => setTimeout(r, 20));
        s.write(line.slice(-1));
      },
    },
    {
      label: "event and reply in one chunk with blank lines",
      write: async (s, id) => {
        s.write(`\r\n${JSON.stringify(event("RESUME"))}\r\n\n${replyLine(id)}`);
      },
    },
    {
      label: "reply glued to the start of the next event",
      write: async (s, id) => {
        const ev = JSON.stringify(event("RESUME"));
        s.write(replyLine(id) + ev.slice(0, 10));
        await new Promise((r) => setTimeout(r, 20));
        s.write(ev.slice(10) + "\n");
      },
    },
  ];

  it.each(splits)("$label", async ({ write }) => {
    peer.onCommand = (cmd, s) => void write(s, cmd.id);
    const c = client();
    await c.connect();
    await expect(c.execute("x")).resolves.toEqual({ text: "größe ✓ 🎈", n: 1 });
    expect(c.connected).toBe(true);
  });

  it("ignores a reply without an id (QEMU's answer to an unparseable request) and logs it", async () => {
    const { logger, lines } = capturingLogger();
    peer.onCommand = (cmd, s) => {
      reply(s, { error: { class: "GenericError", desc: "JSON parse error, invalid keyword 'garbage'" } });
      reply(s, { return: 1, id: cmd.id });
    };
    const c = client({ logger });
    await c.connect();
    await expect(c.execute("x")).resolves.toBe(1);
    expect(lines.some((l) => l.level === 40 && String(l.msg).includes("without a usable id"))).toBe(true);
  });
});

describe("disconnects and reconnects", () => {
  it("rejects pending commands with QmpDisconnectedError, emits disconnected, then reconnects and renegotiates", async () => {
    peer.onCommand = (cmd, s) => {
      if (cmd.execute === "hang") s.destroy();
      else reply(s, { return: "ok", id: cmd.id });
    };
    const c = client();
    await c.connect();
    const disconnected = once<[Error]>(c, "disconnected");
    const reconnected = new Promise<void>((resolve) => c.once("disconnected", () => c.once("connected", () => resolve())));
    const pending = [c.execute("hang"), c.execute("also-pending")];
    for (const p of pending) {
      const err = await p.catch((e: unknown) => e);
      expect(err).toBeInstanceOf(QmpDisconnectedError);
      expect((err as Error).message).toMatch(/connection lost before the reply/);
    }
    const [reason] = await disconnected;
    expect(reason).toBeInstanceOf(QmpDisconnectedError);
    expect(c.connected).toBe(false);
    await expect(c.execute("during-gap")).rejects.toBeInstanceOf(QmpDisconnectedError);
    await reconnected;
    expect(c.connected).toBe(true);
    expect(peer.conns).toHaveLength(2);
    expect(peer.received.filter((r) => r.execute === "qmp_capabilities")).toHaveLength(2);
    await expect(c.execute("after")).resolves.toBe("ok");
  });

  it("keeps retrying with backoff while the peer is gone, and reconnects when it is back", async () => {
    const { logger, lines } = capturingLogger();
    const c = client({ logger, reconnectMinMs: 20, reconnectMaxMs: 80 });
    await c.connect();
    const disconnected = once(c, "disconnected");
    await peer.stop();
    await disconnected;
    await new Promise((r) => setTimeout(r, 300));
    const failures = lines.filter((l) => String(l.msg) === "QMP reconnect failed");
    expect(failures.length).toBeGreaterThanOrEqual(2);
    const delays = lines.filter((l) => String(l.msg) === "QMP reconnect scheduled").map((l) => l.delayMs as number);
    expect(delays.slice(0, 3)).toEqual([20, 40, 80]);
    expect(Math.max(...delays)).toBe(80);
    rmSync(peer.path, { force: true });
    peer = new FakeQmp(peer.path);
    await peer.listen();
    await waitFor(() => c.connected, 2000);
    await expect(c.execute("x")).resolves.toEqual({});
  });

  it("keeps retrying when reconnect attempts time out in the handshake (another client holds QEMU's monitor)", async () => {
    const c = client({ connectTimeoutMs: 60, reconnectMinMs: 10, reconnectMaxMs: 20 });
    await c.connect();
    const disconnected = once(c, "disconnected");
    peer.greet = false;
    peer.last.destroy();
    await disconnected;
    await waitFor(() => peer.conns.length >= 4, 3000); // several attempts, each left ungreeted
    expect(c.connected).toBe(false);
    peer.greet = true;
    await waitFor(() => c.connected, 3000);
    await expect(c.execute("x")).resolves.toEqual({});
  });

  it("keeps retrying when qmp_capabilities fails during a reconnect", async () => {
    const c = client({ reconnectMinMs: 10, reconnectMaxMs: 20 });
    await c.connect();
    let refuse = true;
    peer.greet = false;
    peer.server.on("connection", (s) => {
      reply(s, GREETING);
      s.removeAllListeners("data");
      s.on("data", (d: Buffer | string) => {
        for (const line of String(d).split("\n").filter(Boolean)) {
          const cmd = JSON.parse(line) as Cmd;
          if (cmd.execute === "qmp_capabilities" && refuse) reply(s, { id: cmd.id, error: { class: "GenericError", desc: "busy" } });
          else reply(s, { return: {}, id: cmd.id });
        }
      });
    });
    peer.last.destroy();
    await waitFor(() => peer.conns.length >= 4, 3000);
    expect(c.connected).toBe(false);
    refuse = false;
    await waitFor(() => c.connected, 3000);
    await expect(c.execute("x")).resolves.toEqual({});
  });

  it("does not reconnect when reconnect is false", async () => {
    const c = client({ reconnect: false });
    await c.connect();
    const disconnected = once(c, "disconnected");
    peer.last.destroy();
    await disconnected;
    await new Promise((r) => setTimeout(r, 150));
    expect(peer.conns).toHaveLength(1);
    expect(c.connected).toBe(false);
    // An explicit connect() still works.
    await c.connect();
    expect(c.connected).toBe(true);
  });

  const malformed = [
    { label: "truncated JSON", line: '{"return": {}, "id": 2\n', match: /malformed JSON from peer/ },
    { label: "not JSON at all", line: "garbage{\n", match: /malformed JSON from peer: garbage\{/ },
    { label: "a JSON array", line: "[1,2]\n", match: /expected a JSON object, got \[1,2\]/ },
    { label: "a JSON number", line: "42\n", match: /expected a JSON object, got 42/ },
  ];
  it.each(malformed)("malformed input ($label) is logged, drops the connection and the client recovers", async ({ line, match }) => {
    const { logger, lines } = capturingLogger();
    let first = true;
    peer.onCommand = (cmd, s) => {
      if (first) {
        first = false;
        s.write(line);
      } else reply(s, { return: "fine", id: cmd.id });
    };
    const c = client({ logger });
    await c.connect();
    const disconnected = once<[Error]>(c, "disconnected");
    const err = await c.execute("x").catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpDisconnectedError);
    expect((err as Error).message).toMatch(match);
    const [reason] = await disconnected;
    expect(reason).toBeInstanceOf(QmpProtocolError);
    expect(reason.message).toMatch(match);
    const logged = lines.find((l) => l.level === 50 && String(l.msg).includes("protocol error"));
    expect(String(logged?.err)).toMatch(match);
    await waitFor(() => c.connected);
    await expect(c.execute("y")).resolves.toBe("fine");
  });

  it("drops a peer that sends an endless line", async () => {
    peer.onCommand = (_cmd, s) => s.write("x".repeat(17 * 1024 * 1024));
    const c = client({ reconnect: false });
    await c.connect();
    const err = await c.execute("x").catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpDisconnectedError);
    expect((err as Error).message).toMatch(/without a newline/);
  });
});

describe("close", () => {
  it("rejects pending commands, emits disconnected once, and stops reconnecting", async () => {
    peer.onCommand = () => undefined;
    const c = client();
    await c.connect();
    const reasons: Error[] = [];
    c.on("disconnected", (e) => reasons.push(e));
    const pending = c.execute("hang").catch((e: unknown) => e);
    await c.close();
    const err = await pending;
    expect(err).toBeInstanceOf(QmpDisconnectedError);
    expect((err as Error).message).toMatch(/closed by client/);
    expect(reasons).toHaveLength(1);
    expect(c.connected).toBe(false);
    await new Promise((r) => setTimeout(r, 100));
    expect(peer.conns).toHaveLength(1);
    await expect(c.execute("x")).rejects.toThrow(/client closed/);
    await expect(c.connect()).rejects.toBeInstanceOf(QmpDisconnectedError);
    await c.close(); // idempotent
  });

  it("cancels a scheduled reconnect", async () => {
    const c = client({ reconnectMinMs: 50 });
    await c.connect();
    const disconnected = once(c, "disconnected");
    peer.last.destroy();
    await disconnected;
    await c.close();
    await new Promise((r) => setTimeout(r, 150));
    expect(peer.conns).toHaveLength(1);
  });

  it("aborts a handshake in progress", async () => {
    peer.greet = false;
    const c = client({ connectTimeoutMs: 5000 });
    const connecting = c.connect().catch((e: unknown) => e);
    await waitFor(() => peer.conns.length === 1);
    await c.close();
    expect(await connecting).toBeInstanceOf(QmpDisconnectedError);
  });
});
