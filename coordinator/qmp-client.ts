/**
 * A hand-written QMP (QEMU Machine Protocol) client over a unix socket.
 *
 * QMP is newline-delimited JSON: QEMU greets, the client must send
 * `qmp_capabilities` before anything else, then commands and their replies
 * are matched by the `id` QEMU echoes back, with asynchronous events
 * interleaved between replies. QEMU serves one client per QMP socket; a
 * second client is accepted by the kernel but never greeted, which is why
 * the whole handshake (not only the socket connect) runs under a timeout.
 */
import { EventEmitter } from "node:events";
import net from "node:net";
import { BallastError, DeadlineError, InvalidArgumentError, UnavailableError, errorMessage } from "../shared/errors.js";
import { silentLogger, type Logger } from "../shared/logger.js";

/** An asynchronous QMP event such as `MIGRATION`, `STOP` or `BALLOON_CHANGE`. */
export interface QmpEvent {
  /** Event name, e.g. "MIGRATION". */
  event: string;
  /** Event payload; `{}` for events that carry none (QEMU omits the key, e.g. for STOP). */
  data: Record<string, unknown>;
  /** QEMU's host wall-clock time when the event was raised. */
  timestamp: { seconds: number; microseconds: number };
}

/** The greeting QEMU sends on connect, as received. */
export interface QmpGreeting {
  /** e.g. `{ qemu: { major: 7, minor: 2, micro: 22 }, package: "Debian ..." }` */
  version: { qemu: { major: number; minor: number; micro: number }; package: string };
  /** Protocol capabilities QEMU offers (7.2 offers "oob"; this client enables none). */
  capabilities: string[];
}

/** Options for {@link QmpClient}. */
export interface QmpClientOptions {
  /** Path of QEMU's `-qmp unix:PATH,server=on,wait=off` socket. */
  socketPath: string;
  /** Default per-command timeout; default 10000 ms. */
  commandTimeoutMs?: number;
  /** Reconnect with backoff after an unexpected disconnect; default true. */
  reconnect?: boolean;
  /** First reconnect delay; doubles per failed attempt. Default 200 ms. */
  reconnectMinMs?: number;
  /** Upper bound for the reconnect delay. Default 5000 ms. */
  reconnectMaxMs?: number;
  /** Budget for socket connect + greeting + qmp_capabilities. Default 5000 ms. */
  connectTimeoutMs?: number;
  /** Defaults to a silent logger. */
  logger?: Logger;
}

/** Per-call options for {@link QmpClient.execute}. */
export interface QmpExecuteOptions {
  /** Overrides {@link QmpClientOptions.commandTimeoutMs} for this call. */
  timeoutMs?: number;
}

/** Events emitted by {@link QmpClient}. */
export type QmpClientEvents = {
  /** Every QMP event from QEMU. */
  event: [QmpEvent];
  /** The handshake finished (first connect and every reconnect). */
  connected: [];
  /** A previously `connected` session ended; the argument says why. Always paired with a prior `connected`. */
  disconnected: [Error];
};

/** QEMU answered a command with an `error` object. */
export class QmpCommandError extends BallastError {
  /** QMP error class, e.g. "GenericError", "CommandNotFound", "DeviceNotActive". */
  readonly errorClass: string;
  /** The command that failed. */
  readonly command: string;
  /** QEMU's human-readable description. */
  readonly desc: string;
  constructor(command: string, errorClass: string, desc: string) {
    super("qmp-error", `QMP ${command} failed: ${errorClass}: ${desc}`);
    this.command = command;
    this.errorClass = errorClass;
    this.desc = desc;
  }
}

/**
 * No reply within the command timeout. QEMU may still execute the command
 * later; its late reply is logged and dropped.
 */
export class QmpTimeoutError extends DeadlineError {
  /** The command that timed out. */
  readonly command: string;
  /** The timeout that elapsed. */
  readonly timeoutMs: number;
  constructor(command: string, timeoutMs: number) {
    super(`QMP ${command}: no reply within ${timeoutMs} ms`);
    this.command = command;
    this.timeoutMs = timeoutMs;
  }
}

/** The QMP connection is absent, failed to open, or was lost before a reply arrived. */
export class QmpDisconnectedError extends UnavailableError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

/**
 * The peer broke the protocol (malformed JSON, a non-object message, no
 * greeting). The client drops the connection; pending commands and the
 * `disconnected` event carry this error (or a {@link QmpDisconnectedError}
 * caused by it).
 */
export class QmpProtocolError extends QmpDisconnectedError {}

/** QMP lines are small (the 7.2 schema, the biggest answer, is about 200 KB); anything far larger means a broken peer. */
const MAX_LINE_CHARS = 16 * 1024 * 1024;

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

interface Handshake {
  resolve: () => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

type Phase = "idle" | "greeting" | "negotiating" | "ready";

/**
 * QMP client with id-matched commands, per-command timeouts, event fan-out
 * and automatic reconnect after an unexpected disconnect.
 *
 * Commands issued while not connected fail at once with
 * {@link QmpDisconnectedError} rather than queueing: a command queued across
 * a QEMU restart could act on a different VM incarnation.
 */
export class QmpClient extends EventEmitter<QmpClientEvents> {
  private readonly socketPath: string;
  private readonly commandTimeoutMs: number;
  private readonly reconnectEnabled: boolean;
  private readonly reconnectMinMs: number;
  private readonly reconnectMaxMs: number;
  private readonly connectTimeoutMs: number;
  private readonly log: Logger;

  private phase: Phase = "idle";
  private socket: net.Socket | undefined;
  private partial: string[] = [];
  private partialChars = 0;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private handshake: Handshake | undefined;
  private attempt: Promise<void> | undefined;
  private reconnectTimer: NodeJS.Timeout | undefined;
  private failedAttempts = 0;
  private everConnected = false;
  private closed = false;
  private greetingValue: QmpGreeting | undefined;

  /** Creates an unconnected client; call {@link QmpClient.connect}. */
  constructor(options: QmpClientOptions) {
    super();
    if (typeof options.socketPath !== "string" || options.socketPath.length === 0) {
      throw new InvalidArgumentError("QMP socketPath must be a non-empty string");
    }
    this.socketPath = options.socketPath;
    this.commandTimeoutMs = positive(options.commandTimeoutMs, 10_000, "commandTimeoutMs");
    this.reconnectEnabled = options.reconnect ?? true;
    this.reconnectMinMs = positive(options.reconnectMinMs, 200, "reconnectMinMs");
    this.reconnectMaxMs = Math.max(this.reconnectMinMs, positive(options.reconnectMaxMs, 5_000, "reconnectMaxMs"));
    this.connectTimeoutMs = positive(options.connectTimeoutMs, 5_000, "connectTimeoutMs");
    this.log = (options.logger ?? silentLogger()).child({ component: "qmp", socket: this.socketPath });
  }

  /** True once the handshake finished and until the connection is lost or closed. */
  get connected(): boolean {
    return this.phase === "ready";
  }

  /** The greeting of the current or last session, e.g. for logging QEMU's version. */
  get greeting(): QmpGreeting | undefined {
    return this.greetingValue;
  }

  /**
   * Opens the socket, waits for the greeting and negotiates capabilities.
   * Resolves at once if already connected and joins an attempt in progress.
   * A failed first connect rejects with {@link QmpDisconnectedError} and does
   * not start background reconnects; after a session has existed, failures
   * keep the backoff loop going.
   */
  connect(): Promise<void> {
    if (this.closed) return Promise.reject(new QmpDisconnectedError(`QMP ${this.socketPath}: client is closed`));
    if (this.phase === "ready") return Promise.resolve();
    if (this.attempt) return this.attempt;
    this.clearReconnectTimer();
    return this.startAttempt();
  }

  /**
   * Runs one QMP command and resolves with its `return` value.
   * Rejects with {@link QmpCommandError} on a QMP error reply,
   * {@link QmpTimeoutError} after the timeout, and
   * {@link QmpDisconnectedError} if not connected or the connection drops first.
   */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, options?: QmpExecuteOptions): Promise<T> {
    if (this.phase !== "ready") {
      return Promise.reject(
        new QmpDisconnectedError(`QMP ${command}: not connected to ${this.socketPath}${this.closed ? " (client closed)" : ""}`),
      );
    }
    let timeoutMs: number;
    try {
      timeoutMs = positive(options?.timeoutMs, this.commandTimeoutMs, "timeoutMs");
    } catch (err) {
      return Promise.reject(err as Error);
    }
    return this.send(command, args, timeoutMs) as Promise<T>;
  }

  /** Stops reconnecting, rejects pending commands and closes the socket. Final: the client cannot reconnect afterwards. */
  close(): Promise<void> {
    this.closed = true;
    this.clearReconnectTimer();
    const socket = this.socket;
    if (!socket) return Promise.resolve();
    // While a socket is attached its 'close' has not fired yet (that handler detaches it), so this always settles.
    const closedPromise = new Promise<void>((resolve) => socket.once("close", () => resolve()));
    this.detach(socket, new QmpDisconnectedError(`QMP ${this.socketPath}: closed by client`));
    return closedPromise;
  }

  // ---- connection lifecycle -------------------------------------------------

  private startAttempt(): Promise<void> {
    const attempt = this.openSession().then(
      () => {
        this.attempt = undefined;
      },
      (err: unknown) => {
        this.attempt = undefined;
        this.failedAttempts++;
        // Before any session existed, the caller owns the retry decision (e.g. QEMU not started yet).
        if (this.everConnected) this.scheduleReconnect();
        throw err;
      },
    );
    this.attempt = attempt;
    return attempt;
  }

  private openSession(): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const socket = net.createConnection({ path: this.socketPath });
      socket.setEncoding("utf8"); // decodes multi-byte characters split across chunks
      this.socket = socket;
      this.phase = "greeting";
      this.partial = [];
      this.partialChars = 0;
      const timer = setTimeout(() => {
        this.failHandshake(
          socket,
          new QmpDisconnectedError(
            `QMP ${this.socketPath}: no greeting/capabilities within ${this.connectTimeoutMs} ms ` +
              "(QEMU serves one QMP client per socket; is another client connected?)",
          ),
        );
      }, this.connectTimeoutMs);
      this.handshake = { resolve, reject, timer };
      let lastError: Error | undefined;
      socket.on("data", (chunk: string) => this.onData(socket, chunk));
      socket.on("error", (err) => {
        lastError = err;
      });
      socket.on("close", () => {
        const reason = lastError
          ? new QmpDisconnectedError(`QMP ${this.socketPath}: ${lastError.message}`, { cause: lastError })
          : new QmpDisconnectedError(`QMP ${this.socketPath}: connection closed by peer`);
        this.detach(socket, reason);
      });
    });
  }

  private finishHandshake(): void {
    const hs = this.handshake;
    if (!hs) return;
    this.handshake = undefined;
    clearTimeout(hs.timer);
    this.phase = "ready";
    this.everConnected = true;
    this.failedAttempts = 0;
    this.log.info({ version: this.greetingValue?.version.qemu }, "QMP connected");
    hs.resolve();
    this.safeEmit("connected");
  }

  private failHandshake(socket: net.Socket, err: Error): void {
    const wrapped =
      err instanceof QmpDisconnectedError
        ? err
        : new QmpDisconnectedError(`QMP ${this.socketPath}: handshake failed: ${errorMessage(err)}`, { cause: err });
    this.detach(socket, wrapped);
  }

  /**
   * Ends the session on `socket` synchronously and idempotently: rejects
   * pending work, reports the disconnect and arranges a reconnect. Doing
   * this before the socket's 'close' event fires means state is already
   * idle when a failed attempt's promise handlers decide about retrying.
   */
  private detach(socket: net.Socket, reason: Error): void {
    if (socket !== this.socket) return;
    const wasReady = this.phase === "ready";
    this.socket = undefined;
    this.phase = "idle";
    this.partial = [];
    this.partialChars = 0;
    socket.destroy();

    for (const [id, p] of this.pending) {
      this.pending.delete(id);
      clearTimeout(p.timer);
      p.reject(new QmpDisconnectedError(`QMP ${p.command}: connection lost before the reply (${reason.message})`, { cause: reason }));
    }
    const hs = this.handshake;
    if (hs) {
      this.handshake = undefined;
      clearTimeout(hs.timer);
      hs.reject(reason instanceof QmpDisconnectedError ? reason : new QmpDisconnectedError(reason.message, { cause: reason }));
    }

    if (wasReady) {
      if (this.closed) this.log.info("QMP closed");
      else this.log.warn({ err: reason.message }, "QMP disconnected");
      this.safeEmit("disconnected", reason);
      // A failed handshake is rescheduled by startAttempt's handler instead, which also counts the failure.
      this.scheduleReconnect();
    }
  }

  private scheduleReconnect(): void {
    if (!this.reconnectEnabled || this.closed || this.reconnectTimer || this.attempt || this.phase !== "idle") return;
    // Plain exponential backoff, no jitter: there is exactly one client per QMP socket, so no herd to spread.
    const delay = Math.min(this.reconnectMaxMs, this.reconnectMinMs * 2 ** Math.min(this.failedAttempts, 20));
    this.log.debug({ delayMs: delay, failedAttempts: this.failedAttempts }, "QMP reconnect scheduled");
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      if (this.closed || this.attempt || this.phase !== "idle") return;
      this.startAttempt().catch((err: unknown) => {
        // Logged once per streak at warn so a dead QEMU does not flood the log every 5 s.
        const level = this.failedAttempts === 1 ? "warn" : "debug";
        this.log[level]({ err: errorMessage(err), failedAttempts: this.failedAttempts }, "QMP reconnect failed");
      });
    }, delay);
  }

  private clearReconnectTimer(): void {
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
  }

  /** Drops the connection because the peer broke the protocol; reconnect logic then runs as for any disconnect. */
  private protocolFailure(socket: net.Socket, message: string, cause?: unknown): void {
    const err = new QmpProtocolError(`QMP ${this.socketPath}: ${message}`, { cause });
    this.log.error({ err: err.message }, "QMP protocol error; dropping connection");
    this.detach(socket, err);
  }

  // ---- framing and dispatch -------------------------------------------------

  private onData(socket: net.Socket, chunk: string): void {
    if (socket !== this.socket || socket.destroyed) return;
    // Partial lines are kept as parts and joined once their newline arrives: growing one string and
    // rescanning it per chunk is quadratic for big answers such as query-qmp-schema.
    let rest = chunk;
    for (let nl = rest.indexOf("\n"); nl >= 0; nl = rest.indexOf("\n")) {
      const head = rest.slice(0, nl);
      const line = (this.partial.length > 0 ? this.partial.join("") + head : head).trim(); // QEMU ends lines with \r\n
      this.partial = [];
      this.partialChars = 0;
      rest = rest.slice(nl + 1);
      if (line.length === 0) continue;
      let msg: unknown;
      try {
        msg = JSON.parse(line);
      } catch (err) {
        this.protocolFailure(socket, `malformed JSON from peer: ${truncate(line)} (${errorMessage(err)})`, err);
        return;
      }
      this.dispatch(socket, msg);
      if (socket !== this.socket || socket.destroyed) return;
    }
    if (rest.length === 0) return;
    this.partial.push(rest);
    this.partialChars += rest.length;
    if (this.partialChars > MAX_LINE_CHARS) {
      this.protocolFailure(socket, `peer sent over ${MAX_LINE_CHARS} characters without a newline`);
    }
  }

  private dispatch(socket: net.Socket, msg: unknown): void {
    if (!isRecord(msg)) {
      this.protocolFailure(socket, `expected a JSON object, got ${preview(msg)}`);
      return;
    }
    if (this.phase === "greeting") {
      const greeting = parseGreeting(msg);
      if (!greeting) {
        this.protocolFailure(socket, `expected the QMP greeting, got ${preview(msg)}`);
        return;
      }
      this.greetingValue = greeting;
      this.phase = "negotiating";
      this.send("qmp_capabilities", undefined, this.connectTimeoutMs).then(
        () => {
          if (socket === this.socket && this.phase === "negotiating") this.finishHandshake();
        },
        (err: unknown) => {
          if (socket === this.socket && this.phase === "negotiating") {
            this.failHandshake(socket, err instanceof Error ? err : new Error(String(err)));
          }
        },
      );
      return;
    }
    if (typeof msg.event === "string") {
      this.onEvent(msg);
      return;
    }
    if ("return" in msg || "error" in msg) {
      this.onReply(msg);
      return;
    }
    if ("QMP" in msg) {
      this.log.warn("unexpected second QMP greeting; ignored");
      return;
    }
    this.log.warn({ msg: preview(msg) }, "unrecognised QMP message; ignored");
  }

  private onEvent(msg: Record<string, unknown>): void {
    const ts = isRecord(msg.timestamp) ? msg.timestamp : {};
    const event: QmpEvent = {
      event: msg.event as string,
      data: isRecord(msg.data) ? msg.data : {},
      timestamp: {
        // JSON.parse reads 1e400 as Infinity: only finite numbers count.
        seconds: typeof ts.seconds === "number" && Number.isFinite(ts.seconds) ? ts.seconds : 0,
        microseconds: typeof ts.microseconds === "number" && Number.isFinite(ts.microseconds) ? ts.microseconds : 0,
      },
    };
    this.log.debug({ event: event.event, data: event.data }, "QMP event");
    this.safeEmit("event", event);
  }

  private onReply(msg: Record<string, unknown>): void {
    const id = msg.id;
    if (typeof id !== "number") {
      // QEMU omits the id only when it could not parse a request, which this client never sends.
      this.log.warn({ reply: preview(msg) }, "QMP reply without a usable id; ignored");
      return;
    }
    const p = this.pending.get(id);
    if (!p) {
      this.log.debug({ id }, "late QMP reply for a timed-out command; dropped");
      return;
    }
    this.pending.delete(id);
    clearTimeout(p.timer);
    if ("error" in msg) {
      const e = isRecord(msg.error) ? msg.error : {};
      const cls = typeof e.class === "string" ? e.class : "GenericError";
      const desc = typeof e.desc === "string" ? e.desc : preview(msg.error);
      p.reject(new QmpCommandError(p.command, cls, desc));
    } else {
      p.resolve(msg.return);
    }
  }

  private send(command: string, args: Record<string, unknown> | undefined, timeoutMs: number): Promise<unknown> {
    const socket = this.socket;
    if (!socket || socket.destroyed) {
      return Promise.reject(new QmpDisconnectedError(`QMP ${command}: not connected to ${this.socketPath}`));
    }
    if (typeof command !== "string" || command.length === 0) {
      return Promise.reject(new QmpCommandError(String(command), "ClientError", "command name must be a non-empty string"));
    }
    const id = this.nextId++;
    const frame: Record<string, unknown> = { execute: command, id };
    if (args !== undefined) frame.arguments = args;
    let line: string;
    try {
      line = JSON.stringify(frame) + "\n";
    } catch (err) {
      return Promise.reject(new QmpCommandError(command, "ClientError", `arguments are not JSON-serialisable: ${errorMessage(err)}`));
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        if (this.pending.delete(id)) reject(new QmpTimeoutError(command, timeoutMs));
      }, timeoutMs);
      this.pending.set(id, { command, resolve, reject, timer });
      this.log.trace({ id, command }, "QMP execute");
      socket.write(line);
    });
  }

  /** A throwing listener must not break frame parsing for everyone else. */
  private safeEmit<K extends keyof QmpClientEvents>(name: K, ...args: QmpClientEvents[K]): void {
    try {
      (this.emit as (n: string, ...a: unknown[]) => boolean)(name, ...args);
    } catch (err) {
      this.log.error({ err: errorMessage(err), listenerOf: name }, "QMP listener threw");
    }
  }
}

/** The greeting if `msg` has QEMU's shape (`{"QMP": {"version": {"qemu": {...}}, "capabilities": [...]}}`), else undefined. */
function parseGreeting(msg: Record<string, unknown>): QmpGreeting | undefined {
  const qmp = msg.QMP;
  if (!isRecord(qmp) || !isRecord(qmp.version) || !isRecord(qmp.version.qemu)) return undefined;
  const q = qmp.version.qemu;
  const { major, minor, micro } = q;
  if (!isVersionPart(major) || !isVersionPart(minor) || !isVersionPart(micro)) return undefined;
  return {
    version: { qemu: { major, minor, micro }, package: typeof qmp.version.package === "string" ? qmp.version.package : "" },
    capabilities: Array.isArray(qmp.capabilities) ? qmp.capabilities.filter((c): c is string => typeof c === "string") : [],
  };
}

function isVersionPart(v: unknown): v is number {
  return typeof v === "number" && Number.isSafeInteger(v) && v >= 0;
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/**
 * A peer's message for a log line or an error, cut to 200 characters. JSON.stringify recurses: a
 * message nested some thousands deep (which JSON.parse accepts) would overflow the stack.
 */
function preview(v: unknown): string {
  try {
    return truncate(JSON.stringify(v));
  } catch {
    return "(a value nested too deep to show)";
  }
}

function truncate(s: string | undefined, max = 200): string {
  if (s === undefined) return "undefined";
  return s.length > max ? `${s.slice(0, max)}…` : s;
}

function positive(v: number | undefined, fallback: number, name: string): number {
  if (v === undefined) return fallback;
  if (typeof v !== "number" || !Number.isFinite(v) || v <= 0) {
    throw new InvalidArgumentError(`QMP option ${name} must be a positive number, got ${String(v)}`);
  }
  return v;
}
