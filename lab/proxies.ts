/**
 * Fault-injection proxies for the lab: a unix-socket proxy (put between a
 * coordinator and QEMU's QMP socket) and a TCP proxy (put between the source
 * and destination QEMU's migration stream). Both are byte pipes the test
 * controls: cut every connection now, refuse new ones, delay the first reply.
 * The unix proxy can also rewrite the client's line-delimited JSON (QMP
 * commands), which is how a test interposes the TCP proxy on a migration
 * whose URI it does not choose (see {@link rewriteMigrateUri}).
 */
import { createConnection, createServer, type Server, type Socket } from "node:net";
import { rmSync } from "node:fs";

/** Counters a test can assert on. */
export interface ProxyStats {
  /** Client connections accepted (including refused ones). */
  accepted: number;
  /** Connections refused while blocked. */
  refused: number;
  /** Connections cut by {@link UnixProxy.cut} / {@link TcpProxy.cut}. */
  cut: number;
  /** Bytes client → upstream and upstream → client. */
  up: number;
  down: number;
}

interface Pair {
  client: Socket;
  upstream: Socket;
}

/** Common pipe logic for both proxies. */
abstract class PipeProxy {
  protected readonly server: Server;
  protected readonly pairs = new Set<Pair>();
  protected blocked = false;
  readonly stats: ProxyStats = { accepted: 0, refused: 0, cut: 0, up: 0, down: 0 };
  /** Delay (ms) for the first reply of the next connection; see delayFirstReply. */
  private firstReplyDelayMs = 0;
  /** Until this instant (ms since epoch) every new connection's first reply is held until then; see slowUntil. */
  private slowUntilMs = 0;
  /** Line rewriter for client → upstream data, if any. */
  private rewrite: ((line: string) => string) | undefined;

  protected constructor() {
    this.server = createServer((client) => this.accept(client));
  }

  protected abstract dialUpstream(): Socket;

  /** Destroys every open connection (both ends), as a dropped link would. Returns how many. */
  cut(): number {
    let n = 0;
    for (const p of [...this.pairs]) {
      p.client.destroy();
      p.upstream.destroy();
      this.pairs.delete(p);
      n++;
    }
    this.stats.cut += n;
    return n;
  }

  /**
   * While blocked, new connections fail. `reset` (default): they are accepted
   * and closed at once (the peer sees EOF/reset, like a middlebox); `refuse`:
   * the proxy stops listening (the peer sees ECONNREFUSED, like a host whose
   * link is down) and cuts the open connections too (call {@link cut} first
   * to count them), and listens on the same address again when unblocked.
   */
  async block(on = true, mode: "reset" | "refuse" = "reset"): Promise<void> {
    this.blocked = on && mode === "reset";
    if (on && mode === "refuse" && this.server.listening) {
      this.refusing = true;
      const closed = new Promise<void>((r) => this.server.close(() => r()));
      this.cut();
      await closed;
    } else if (!on && this.refusing) {
      this.refusing = false;
      await this.relisten();
    }
  }
  private refusing = false;

  /** Listens again where it listened before (after a `refuse` block). */
  protected abstract relisten(): Promise<void>;

  /** Open connections now. */
  get connections(): number {
    return this.pairs.size;
  }

  /**
   * Arms a delay for the next connection only: the greeting (whatever the
   * upstream sends before the client's first write) passes at once; the
   * upstream's answer to the client's first write is held for `ms`.
   */
  delayFirstReply(ms: number): void {
    this.firstReplyDelayMs = ms;
  }

  /**
   * Upstream is "slow to answer" for the next `ms`: every connection made in
   * that window gets the greeting at once but its first reply only when the
   * window ends (a client that gives up and reconnects meets the same delay).
   */
  slowFirstReplies(ms: number): void {
    this.slowUntilMs = Date.now() + ms;
  }

  /** Rewrites client → upstream data line by line ("\n"-terminated; QMP commands are). */
  rewriteClientLines(fn: ((line: string) => string) | undefined): void {
    this.rewrite = fn;
  }

  private accept(client: Socket): void {
    this.stats.accepted++;
    if (this.blocked) {
      this.stats.refused++;
      client.destroy();
      return;
    }
    const upstream = this.dialUpstream();
    const pair: Pair = { client, upstream };
    this.pairs.add(pair);
    const end = () => {
      if (!this.pairs.delete(pair)) return;
      client.destroy();
      upstream.destroy();
    };
    client.on("error", end);
    upstream.on("error", end);
    client.on("close", end);
    upstream.on("close", end);
    client.setNoDelay?.(true);

    // upstream → client, with an optional hold on the first reply.
    let delayMs = this.firstReplyDelayMs;
    this.firstReplyDelayMs = 0;
    const windowLeft = this.slowUntilMs - Date.now();
    if (windowLeft > 0) delayMs = Math.max(delayMs, 1);
    const slowUntil = this.slowUntilMs;
    let clientWrote = false;
    let holding: Buffer[] | undefined;
    upstream.on("data", (chunk: Buffer) => {
      this.stats.down += chunk.length;
      if (holding) {
        holding.push(chunk);
        return;
      }
      if (delayMs > 0 && clientWrote) {
        holding = [chunk];
        const held = holding;
        const ms = Math.max(delayMs, slowUntil - Date.now());
        delayMs = 0;
        setTimeout(() => {
          holding = undefined;
          if (!client.destroyed) for (const c of held) client.write(c);
        }, ms);
        return;
      }
      client.write(chunk);
    });

    // client → upstream, with an optional line rewrite.
    let partial = "";
    client.on("data", (chunk: Buffer) => {
      clientWrote = true;
      this.stats.up += chunk.length;
      const fn = this.rewrite;
      if (!fn) {
        upstream.write(chunk);
        return;
      }
      partial += chunk.toString("utf8");
      let nl: number;
      while ((nl = partial.indexOf("\n")) >= 0) {
        const line = partial.slice(0, nl + 1);
        partial = partial.slice(nl + 1);
        upstream.write(fn(line.replace(/\r?\n$/, "")) + line.slice(line.replace(/\r?\n$/, "").length));
      }
    });
  }

  async close(): Promise<void> {
    this.cut();
    if (!this.server.listening) return;
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}

/** A unix-socket proxy: clients connect to `path`, the proxy dials `upstreamPath` per connection. */
export class UnixProxy extends PipeProxy {
  private constructor(
    readonly path: string,
    private upstreamPath: string,
  ) {
    super();
  }

  /** Listens on `path` (removed first if stale). */
  static async start(path: string, upstreamPath: string): Promise<UnixProxy> {
    rmSync(path, { force: true });
    const p = new UnixProxy(path, upstreamPath);
    await new Promise<void>((resolve, reject) => {
      p.server.once("error", reject);
      p.server.listen(path, () => resolve());
    });
    return p;
  }

  protected dialUpstream(): Socket {
    return createConnection(this.upstreamPath);
  }

  protected relisten(): Promise<void> {
    rmSync(this.path, { force: true });
    return new Promise<void>((resolve, reject) => {
      this.server.once("error", reject);
      this.server.listen(this.path, () => resolve());
    });
  }

  /** Later connections dial this path instead. */
  setUpstream(path: string): void {
    this.upstreamPath = path;
  }

  override async close(): Promise<void> {
    await super.close();
    rmSync(this.path, { force: true });
  }
}

/** A TCP proxy on 127.0.0.1: clients connect to `port`, the proxy dials the upstream per connection. */
export class TcpProxy extends PipeProxy {
  port = 0;
  private constructor(private upstream: { host: string; port: number }) {
    super();
  }

  /** Listens on 127.0.0.1:`port` (0: any free port). */
  static async start(upstream: { host: string; port: number }, port = 0): Promise<TcpProxy> {
    const p = new TcpProxy(upstream);
    await new Promise<void>((resolve, reject) => {
      p.server.once("error", reject);
      p.server.listen(port, "127.0.0.1", () => resolve());
    });
    const addr = p.server.address();
    p.port = typeof addr === "object" && addr ? addr.port : 0;
    return p;
  }

  protected dialUpstream(): Socket {
    const s = createConnection(this.upstream.port, this.upstream.host);
    s.setNoDelay(true);
    return s;
  }

  protected relisten(): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.server.once("error", reject);
      this.server.listen(this.port, "127.0.0.1", () => resolve());
    });
  }

  /** Later connections dial this address instead. */
  setUpstream(upstream: { host: string; port: number }): void {
    this.upstream = upstream;
  }
}

/**
 * A QMP line rewriter for {@link PipeProxy.rewriteClientLines}: the first
 * `migrate` command with a `tcp:HOST:PORT` URI is sent to a {@link TcpProxy}
 * instead; `onMigrate` learns the original URI (the proxy's upstream is set
 * from it before QEMU dials). Later `migrate` commands (e.g. a resume) go
 * through the same proxy too.
 */
export function rewriteMigrateUri(proxy: TcpProxy, onMigrate?: (originalUri: string) => void): (line: string) => string {
  return (line) => {
    let msg: { execute?: string; arguments?: { uri?: string } };
    try {
      msg = JSON.parse(line) as typeof msg;
    } catch {
      return line;
    }
    const uri = msg.execute === "migrate" ? msg.arguments?.uri : undefined;
    const m = uri ? /^tcp:([^:]+):(\d+)$/.exec(uri) : null;
    if (!m || !msg.arguments) return line;
    proxy.setUpstream({ host: m[1] as string, port: Number(m[2]) });
    onMigrate?.(uri as string);
    msg.arguments.uri = `tcp:127.0.0.1:${proxy.port}`;
    return JSON.stringify(msg);
  };
}
