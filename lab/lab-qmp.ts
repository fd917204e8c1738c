/**
 * A minimal QMP client for the lab and its tests: connect, negotiate,
 * execute commands, collect events. The production client lives in
 * coordinator/; this one is deliberately small so lab tests do not depend on
 * code under development. Use it on a VM's `labQmpPath`, because QEMU serves
 * one client per QMP socket and the coordinator owns `qmpPath`.
 */
import { createConnection, type Socket } from "node:net";
import { DeadlineError, UnavailableError } from "../shared/errors.js";

/** One asynchronous QMP event, with the host time it arrived. */
export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  /** QEMU's own timestamp in milliseconds since the epoch. */
  qemuTimeMs: number;
  /** Date.now() when this client read it. */
  receivedAt: number;
}

/** An error QMP returned for a command. */
export class QmpCommandError extends Error {
  constructor(
    readonly command: string,
    readonly qmpClass: string,
    readonly desc: string,
  ) {
    super(`QMP ${command} failed: ${qmpClass}: ${desc}`);
    this.name = "QmpCommandError";
  }
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

/** A connected, capability-negotiated QMP session. */
export class LabQmp {
  /** Every event received so far, in order. */
  readonly events: QmpEvent[] = [];
  private readonly pending = new Map<string, Pending>();
  private readonly waiters = new Set<() => void>();
  private buffer = "";
  private nextId = 1;
  private closed = false;

  private constructor(private readonly socket: Socket) {
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => this.onData(chunk));
    socket.on("close", () => this.onClose(new UnavailableError("QMP socket closed")));
    socket.on("error", (err) => this.onClose(new UnavailableError(`QMP socket error: ${err.message}`, { cause: err })));
  }

  /**
   * Connects to a QMP unix socket and runs `qmp_capabilities`. Retries until
   * `timeoutMs` because QEMU may not have created the socket yet.
   */
  static async connect(socketPath: string, options: { timeoutMs?: number } = {}): Promise<LabQmp> {
    const deadline = Date.now() + (options.timeoutMs ?? 10_000);
    let lastErr: unknown;
    while (Date.now() < deadline) {
      let qmp: LabQmp | undefined;
      try {
        qmp = new LabQmp(await openSocket(socketPath));
        await qmp.waitForGreeting(Math.max(1, deadline - Date.now()));
        await qmp.execute("qmp_capabilities", undefined, { timeoutMs: Math.max(1, deadline - Date.now()) });
        return qmp;
      } catch (err) {
        qmp?.close();
        lastErr = err;
        await sleep(100);
      }
    }
    throw new UnavailableError(`QMP ${socketPath}: could not connect: ${(lastErr as Error | undefined)?.message ?? "timeout"}`);
  }

  /** Runs one command and resolves with its `return` value. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, options: { timeoutMs?: number } = {}): Promise<T> {
    if (this.closed) return Promise.reject(new UnavailableError("QMP session is closed"));
    const id = `lab-${this.nextId++}`;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new DeadlineError(`QMP ${command} got no answer in ${options.timeoutMs ?? 30_000} ms`));
      }, options.timeoutMs ?? 30_000);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      this.socket.write(`${JSON.stringify(args ? { execute: command, arguments: args, id } : { execute: command, id })}\n`);
    });
  }

  /**
   * Resolves with the first event named `name` (at index >= `since` in
   * {@link events}) that satisfies `match`. Pass `since: qmp.events.length`
   * before triggering an action to ignore older events.
   */
  waitForEvent(
    name: string,
    options: { match?: (data: Record<string, unknown>) => boolean; since?: number; timeoutMs?: number } = {},
  ): Promise<QmpEvent> {
    const since = options.since ?? 0;
    const find = () => this.events.slice(since).find((e) => e.event === name && (options.match?.(e.data) ?? true));
    const found = find();
    if (found) return Promise.resolve(found);
    return new Promise((resolve, reject) => {
      const check = () => {
        const hit = find();
        if (hit) {
          cleanup();
          resolve(hit);
        } else if (this.closed) {
          cleanup();
          reject(new UnavailableError(`QMP closed while waiting for ${name}`));
        }
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new DeadlineError(`QMP event ${name} did not arrive in ${options.timeoutMs ?? 30_000} ms`));
      }, options.timeoutMs ?? 30_000);
      const cleanup = () => {
        clearTimeout(timer);
        this.waiters.delete(check);
      };
      this.waiters.add(check);
    });
  }

  /** Closes the session (QEMU then accepts the next client on this socket). */
  close(): void {
    this.socket.destroy();
    this.onClose(new UnavailableError("QMP session closed by client"));
  }

  private greeting?: () => void;

  private waitForGreeting(timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.socket.destroy();
        reject(new DeadlineError("no QMP greeting"));
      }, timeoutMs);
      this.greeting = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    let nl: number;
    while ((nl = this.buffer.indexOf("\n")) >= 0) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (line) this.onMessage(line);
    }
  }

  private onMessage(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      return;
    }
    if ("QMP" in msg) {
      this.greeting?.();
      this.greeting = undefined;
      return;
    }
    if (typeof msg.event === "string") {
      const ts = msg.timestamp as { seconds?: number; microseconds?: number } | undefined;
      this.events.push({
        event: msg.event,
        data: (msg.data as Record<string, unknown> | undefined) ?? {},
        qemuTimeMs: (ts?.seconds ?? 0) * 1000 + (ts?.microseconds ?? 0) / 1000,
        receivedAt: Date.now(),
      });
      for (const w of [...this.waiters]) w();
      return;
    }
    const id = typeof msg.id === "string" ? msg.id : undefined;
    const p = id ? this.pending.get(id) : undefined;
    if (!p || !id) return;
    this.pending.delete(id);
    clearTimeout(p.timer);
    if ("error" in msg) {
      const e = msg.error as { class?: string; desc?: string };
      p.reject(new QmpCommandError(p.command, e.class ?? "GenericError", e.desc ?? "unknown error"));
    } else {
      p.resolve(msg.return);
    }
  }

  private onClose(err: Error): void {
    if (this.closed) return;
    this.closed = true;
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(err);
    }
    this.pending.clear();
    for (const w of [...this.waiters]) w();
  }
}

function openSocket(socketPath: string): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = createConnection(socketPath);
    socket.once("connect", () => {
      socket.removeListener("error", reject);
      resolve(socket);
    });
    socket.once("error", reject);
  });
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
