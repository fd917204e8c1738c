/**
 * The host end of a VM's agent channel: the virtio-serial port
 * `org.ballast.agent.0`, whose QEMU chardev is a unix socket
 * (`vms[].agentSocket`, or the path libvirt reports). The coordinator is
 * that socket's one client, and feeds the connection into a grpc-js server
 * that serves AgentService bound to this VM (grpc-js
 * `createConnectionInjector`): whatever speaks on the port IS this VM, as
 * with a dedicated agentPort, and cannot touch another.
 *
 * When the host end is connected decides when the guest's HTTP/2 session
 * restarts (measured on the rig, see README "Agent channel"):
 * - The guest sees EOF when the host end goes away, and only then; a host
 *   client connected to the destination's socket *before* switchover sees
 *   the old byte stream simply carry on, which no new HTTP/2 server can
 *   read. So the host end connects only to a RUNNING guest: never while the
 *   QEMU is `inmigrate`; the destination connects right after its RESUME.
 *   Its guest then gets EOF on the old session, reopens and starts afresh.
 * - The source drops its host end at STOP during an outgoing migration:
 *   the old session's RPCs would otherwise never end. If the migration
 *   fails or is cancelled the source RESUMEs and the host end reconnects.
 * - `VSERPORT_CHANGE open:false` (the guest closed the port: the agent
 *   exited) resets the host end, so the next open starts with a clean
 *   HTTP/2 server session. `open:true` is ignored (a reset there would
 *   loop: it makes the guest reopen). The event is rate-limited by QEMU to
 *   one a second and carries the latest state: a hint, nothing relies on it.
 * - A dropped connection (QEMU gone, the server closed the session)
 *   reconnects with the shared backoff (`BACKOFF.reconnect`), at once on
 *   the driver's `up` and on RESUME.
 *
 * - Bytes of an old session can still reach a fresh host end (what the guest
 *   wrote before it saw the EOF, queued in the port). They are discarded up
 *   to the HTTP/2 client preface, so they do not cost a reconnect; if stale
 *   bytes keep coming without a preface (the old session is still alive),
 *   the host end is dropped so the guest sees EOF.
 *
 * It learns all this from the VM's supervisor (`VmSupervisor.observe`).
 */
import * as grpc from "@grpc/grpc-js";
import { connect as netConnect, type Socket } from "node:net";
import { errorMessage } from "../shared/errors.js";
import type { Logger } from "../shared/logger.js";
import { BACKOFF, Backoff, type BackoffSettings } from "../shared/retry.js";
import { FINAL_STATUSES, type DriverEvent, type HypervisorDriver } from "./hypervisor.js";
import type { AgentLink, VmObserver } from "./vm-supervisor.js";

/** What the channel needs of the VM's supervisor. */
export interface ObservableVm {
  readonly name: string;
  observe(o: VmObserver): () => void;
}

/** Options for {@link AgentChannel}. */
export interface AgentChannelOptions {
  vm: ObservableVm;
  /** The VM's driver: connected, run state and the socket path (`agentChannelPath`). */
  driver: Pick<HypervisorDriver, "connected" | "facts" | "agentChannelPath">;
  /** A grpc-js server with AgentService bound to this VM; the channel feeds it connections. Not bound to any port. */
  server: grpc.Server;
  logger: Logger;
  /** Reconnect backoff. Default `BACKOFF.reconnect`. */
  backoff?: BackoffSettings;
  /** A connection that lived this long resets the backoff. Default 2000 ms. */
  stableMs?: number;
  /**
   * The host end stays away at least this long after RESUME and after it
   * closed, so the guest sees it gone (EOF) before it is back: if the guest
   * handles both port events in one go it never sees the EOF, and its old
   * HTTP/2 session runs into the new server ("bad client magic"). Measured
   * on TCG: the guest sees EOF about 110 ms after RESUME. Default 150 ms.
   */
  settleMs?: number;
  /** Stale bytes (no client preface) for this long drop the host end. Default 300 ms. */
  staleMs?: number;
  /** Clock (ms), for logs. Default Date.now. */
  now?: () => number;
}

/** The first bytes of every HTTP/2 connection from a client (RFC 9113 §3.4). */
const CLIENT_PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "latin1");

/** Why the host end is (not) connected, for the view and tests. */
export type AgentChannelState = "connected" | "connecting" | "waiting" | "closed";

/** The host end of one VM's agent port. */
export class AgentChannel {
  private readonly log: Logger;
  private readonly injector: grpc.ConnectionInjector;
  private readonly backoff: Backoff;
  private readonly now: () => number;
  private readonly unobserve: () => void;
  private socket: Socket | undefined;
  private connectedAt = 0;
  private connecting = false;
  private timer: NodeJS.Timeout | undefined;
  private closed = false;
  /** The guest runs here, as the last driver events said. */
  private running = false;
  /** An outgoing or incoming migration is under way (MIGRATION status not final). */
  private migrating = false;
  /** When the guest last resumed here (ms), until an agent has attached after it. */
  private resumedAt: number | undefined;
  private connectsValue = 0;
  /** When the host end was last away from a running guest (closed, or the guest resumed here). */
  private awaySince = 0;
  private readonly settleMs: number;

  constructor(private readonly options: AgentChannelOptions) {
    this.log = options.logger.child({ component: "agent-channel", vm: options.vm.name });
    this.injector = options.server.createConnectionInjector(grpc.ServerCredentials.createInsecure());
    this.backoff = new Backoff(options.backoff ?? BACKOFF.reconnect);
    this.now = options.now ?? Date.now;
    this.settleMs = options.settleMs ?? 150;
    const facts = options.driver.facts;
    this.running = options.driver.connected && facts?.runState === "running";
    this.unobserve = options.vm.observe({
      driverEvent: (e) => this.onDriverEvent(e),
      agentAttached: (link) => this.onAgentAttached(link),
    });
    if (this.running) this.schedule(0);
  }

  /** Connections made so far (for tests). */
  get connects(): number {
    return this.connectsValue;
  }

  get state(): AgentChannelState {
    if (this.closed) return "closed";
    if (this.socket) return "connected";
    return this.connecting ? "connecting" : "waiting";
  }

  /** Stops reconnecting, closes the host end and the server's sessions. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.unobserve();
    if (this.timer) clearTimeout(this.timer);
    this.drop("coordinator closing");
    this.injector.destroy();
  }

  private wanted(): boolean {
    return !this.closed && this.running && this.options.driver.connected;
  }

  private onDriverEvent(e: DriverEvent): void {
    switch (e.type) {
      case "up":
        this.running = e.facts.runState === "running";
        if (this.running) this.schedule(0);
        return;
      case "migration-status":
        this.migrating = !FINAL_STATUSES.has(e.status) && e.status !== "none";
        return;
      case "stop":
        this.running = false;
        // The source's switchover: the guest leaves, and nothing would ever end this session's RPCs.
        if (this.migrating) this.drop("guest stopped for switchover");
        return;
      case "resume":
        this.running = true;
        this.resumedAt = this.now();
        this.awaySince = this.resumedAt;
        this.log.info({ resumedAt: this.resumedAt, connected: this.socket !== undefined }, "guest resumed");
        this.backoff.reset();
        this.schedule(0);
        return;
      case "agent-port":
        if (!e.open && this.socket) {
          // The guest closed the port (its agent exited): a fresh host end for the next open.
          this.drop("guest closed the port");
          this.schedule(0);
        }
        return;
      default:
        return;
    }
  }

  private onAgentAttached(link: AgentLink): void {
    const resumedAt = this.resumedAt;
    if (resumedAt === undefined) return;
    this.resumedAt = undefined;
    const hostEndSinceResumeMs = this.socket && this.connectedAt >= resumedAt ? this.connectedAt - resumedAt : undefined;
    this.log.info({ sinceResumeMs: this.now() - resumedAt, hostEndSinceResumeMs, peer: link.peer }, "agent attached");
  }

  private schedule(ms: number): void {
    if (this.closed) return;
    if (this.timer) clearTimeout(this.timer);
    ms = Math.max(ms, this.awaySince + this.settleMs - this.now());
    this.timer = setTimeout(() => {
      this.timer = undefined;
      void this.connectOnce();
    }, ms);
  }

  private retryLater(why: string, err?: unknown): void {
    const delay = this.backoff.next();
    this.log[this.backoff.attempts === 1 ? "info" : "debug"]({ why, err: err === undefined ? undefined : errorMessage(err), retryInMs: delay }, "agent channel not connected");
    this.schedule(delay);
  }

  private async connectOnce(): Promise<void> {
    if (!this.wanted() || this.socket || this.connecting) return;
    this.connecting = true;
    let path: string | undefined;
    try {
      path = await this.options.driver.agentChannelPath?.();
    } catch (err) {
      this.connecting = false;
      this.retryLater("channel path unknown", err);
      return;
    }
    if (!path) {
      this.connecting = false;
      this.retryLater("the VM has no agent channel (yet)");
      return;
    }
    const sock = netConnect(path);
    const failure = await new Promise<Error | undefined>((resolve) => {
      const onError = (err: Error) => resolve(err);
      sock.once("error", onError);
      sock.once("connect", () => {
        sock.off("error", onError);
        resolve(undefined);
      });
    });
    if (failure) {
      sock.destroy();
      this.connecting = false;
      this.retryLater(`cannot connect to ${path}`, failure);
      return;
    }
    this.connecting = false;
    // The guest may have stopped (or we were closed) while connecting: a host end now would be the wrong one.
    if (!this.wanted()) {
      sock.destroy();
      return;
    }
    sock.on("error", (err) => this.log.info({ err: errorMessage(err), livedMs: this.now() - this.connectedAt }, "agent channel session error"));
    sock.once("close", () => this.onClosed(sock));
    this.socket = sock;
    this.connectedAt = this.now();
    this.connectsValue++;
    this.log.info({ path, sinceResumeMs: this.resumedAt === undefined ? undefined : this.connectedAt - this.resumedAt }, "agent channel connected");
    this.injectAtPreface(sock);
  }

  /** Hands `sock` to the gRPC server from the client preface on; what comes before it is an old session's. */
  private injectAtPreface(sock: Socket): void {
    let buf: Buffer = Buffer.alloc(0);
    let discarded = 0;
    let staleTimer: NodeJS.Timeout | undefined;
    const done = () => {
      sock.off("data", onData);
      sock.off("close", done);
      if (staleTimer) clearTimeout(staleTimer);
    };
    const onData = (chunk: Buffer) => {
      buf = buf.length ? Buffer.concat([buf, chunk]) : chunk;
      const i = buf.indexOf(CLIENT_PREFACE);
      if (i < 0) {
        // Keep only what could be the start of a preface split across chunks.
        const keep = Math.min(buf.length, CLIENT_PREFACE.length - 1);
        discarded += buf.length - keep;
        buf = buf.subarray(buf.length - keep);
        if (discarded > 0 && !staleTimer) {
          staleTimer = setTimeout(() => {
            done();
            this.log.info({ discarded }, "agent channel: an old session is still talking; dropping the host end so the guest sees EOF");
            if (this.socket === sock) {
              this.drop("stale session on the port");
              this.schedule(0);
            }
          }, this.options.staleMs ?? 300);
        }
        return;
      }
      done();
      discarded += i;
      if (discarded > 0) this.log.info({ discarded }, "agent channel: bytes of an old session discarded before the new session");
      sock.pause();
      sock.unshift(buf.subarray(i));
      this.injector.injectConnection(sock);
    };
    sock.on("data", onData);
    sock.once("close", done);
  }

  private onClosed(sock: Socket): void {
    if (this.socket !== sock) return;
    this.socket = undefined;
    this.awaySince = this.now();
    const lived = this.now() - this.connectedAt;
    if (lived >= (this.options.stableMs ?? 2000)) this.backoff.reset();
    if (this.wanted()) this.retryLater(`host end closed after ${lived} ms`);
  }

  /** Closes the host end now: the guest sees EOF, the server's session and its calls end. */
  private drop(why: string): void {
    const sock = this.socket;
    if (!sock) return;
    this.socket = undefined;
    this.awaySince = this.now();
    this.log.info({ why }, "agent channel host end closed");
    sock.destroy();
  }
}
