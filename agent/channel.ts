/**
 * How the agent reaches its coordinator: the transport under the one
 * session logic of agent/session.ts.
 *
 * - `virtio-serial` (the default when the port exists): the port named
 *   `org.ballast.agent.0` (agent/virtio-port.ts), like qemu-guest-agent.
 *   gRPC runs over it with connect-node's gRPC transport, HTTP/2 straight
 *   on the already open port stream (`nodeOptions.createConnection`), with
 *   HTTP/2 PINGs every 2 s for liveness; the host end is a grpc-js server
 *   in the coordinator (coordinator/agent-channel.ts). The port itself is
 *   the VM's identity: the host end belongs to exactly one VM.
 *   Every attach opens the port afresh and starts a new HTTP/2 session. On
 *   EOF (the host end went away: a migration's switchover, a coordinator
 *   restart) the session fails and the agent reopens with the short
 *   `BACKOFF.attach` backoff.
 * - `tcp`: grpc-js to `--coordinator HOST:PORT` (slirp guestfwd, a routed
 *   address), keepalive 2 s; unchanged.
 * - `auto`: per attach, the port if the guest has it, else TCP if a
 *   coordinator address was given, else wait for the port to appear.
 */
import { createClient as createConnectClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import type { Socket } from "node:net";
import { AgentService, type SessionResponse } from "../gen/ballast/v1/agent_pb.js";
import type { Logger } from "../shared/logger.js";
import { silentLogger } from "../shared/logger.js";
import { ActionError } from "./errors.js";
import { grpcConnector, type SessionConnection, type SessionConnector, type SessionStream } from "./session.js";
import { AGENT_PORT_NAME, findVirtioPort, openVirtioPort, type VirtioPortRoots } from "./virtio-port.js";
import type { SessionRequestInit } from "./wire.js";

/** The `--channel` choices. */
export const CHANNEL_KINDS = ["auto", "virtio-serial", "tcp"] as const;
export type ChannelKind = (typeof CHANNEL_KINDS)[number];

/** HTTP/2 liveness on the port: the same 2 s / 1 s as the TCP channel's gRPC keepalive. */
export const PORT_PING = Object.freeze({ pingIntervalMs: 2000, pingTimeoutMs: 1000, pingIdleConnection: true });

/**
 * The request side of a bidi call as an async iterable that the transport
 * pulls from. `send` resolves when the transport took the message (it pulls
 * the next one only when it has written the previous), so a wedged transport
 * shows up as a send that does not settle, which session.ts's step deadline
 * handles.
 */
class RequestQueue implements AsyncIterable<SessionRequestInit> {
  private readonly items: { msg: SessionRequestInit; resolve: () => void; reject: (e: Error) => void }[] = [];
  private pull: ((r: IteratorResult<SessionRequestInit>) => void) | undefined;
  private done: Error | "ended" | undefined;

  send(msg: SessionRequestInit): Promise<void> {
    if (this.done) return Promise.reject(this.done === "ended" ? new Error("stream already closed") : this.done);
    return new Promise<void>((resolve, reject) => {
      this.items.push({ msg, resolve, reject });
      this.flush();
    });
  }

  end(): void {
    if (this.done) return;
    this.done = "ended";
    this.flush();
  }

  fail(err: Error): void {
    if (this.done && this.done !== "ended") return;
    this.done = err;
    for (const item of this.items.splice(0)) item.reject(err);
    this.flush();
  }

  private flush(): void {
    if (!this.pull) return;
    const item = this.items.shift();
    if (item) {
      const pull = this.pull;
      this.pull = undefined;
      item.resolve();
      pull({ value: item.msg, done: false });
    } else if (this.done) {
      const pull = this.pull;
      this.pull = undefined;
      pull({ value: undefined, done: true });
    }
  }

  [Symbol.asyncIterator](): AsyncIterator<SessionRequestInit> {
    return {
      next: () =>
        new Promise<IteratorResult<SessionRequestInit>>((resolve) => {
          this.pull = resolve;
          this.flush();
        }),
      return: async () => {
        this.end();
        return { value: undefined, done: true };
      },
      // connect-es calls throw() when the call fails while it is reading requests.
      throw: async (err?: unknown) => {
        this.fail(err instanceof Error ? err : new Error(String(err)));
        return { value: undefined, done: true };
      },
    };
  }
}

let headersLoaded = false;

/**
 * connect-es uses the WHATWG `Headers` global. Node loads it lazily from its
 * bundled undici, whose HTTP/1 client then compiles llhttp as WebAssembly in
 * an async step whose rejection nobody catches. Under `--lite-mode` (the
 * agent's systemd unit and the lab's supervisor; it implies `--jitless`)
 * there is no `WebAssembly`, so that rejection would kill the agent the first
 * time a Session starts (measured in the lab guest). We never use undici's
 * HTTP/1 client: load the globals once here and drop exactly that rejection.
 */
function loadHeadersGlobal(): void {
  if (headersLoaded) return;
  headersLoaded = true;
  if ((globalThis as { WebAssembly?: unknown }).WebAssembly !== undefined) return;
  const ignore = (reason: unknown) => {
    if (reason instanceof ReferenceError && /WebAssembly/.test(reason.message)) return;
    // Anything else keeps Node's default behaviour: crash loudly.
    process.off("unhandledRejection", ignore);
    throw reason;
  };
  process.on("unhandledRejection", ignore);
  void globalThis.Headers;
  // The rejection is reported after this tick's microtasks; the handler goes once that is over.
  setTimeout(() => process.off("unhandledRejection", ignore), 100).unref();
}

/**
 * One AgentService.Session call over an open byte stream (the port), with
 * connect-node's gRPC transport: HTTP/2 on `socket`, PINGs for liveness.
 * `close()` cancels the call and closes the stream (the fd).
 */
export function sessionOverStream(socket: Socket, authority = "virtio-port"): SessionConnection {
  loadHeadersGlobal();
  // The port's own errors (EOF, EIO) surface through the HTTP/2 session; never as an unhandled 'error'.
  socket.on("error", () => undefined);
  const transport = createGrpcTransport({
    baseUrl: `http://${authority}`,
    // Exactly one connection per attach: the port that was opened for it. A second
    // connection attempt (after this one died) gets the same, dead, stream and fails.
    nodeOptions: { createConnection: () => socket },
    ...PORT_PING,
    connectTimeoutMs: 5000,
  });
  const client = createConnectClient(AgentService, transport);
  const abort = new AbortController();
  const requests = new RequestQueue();
  const responses = client.session(requests, { signal: abort.signal });
  let cancelled = false;
  const stream: SessionStream = {
    send: (msg) => requests.send(msg),
    end: () => requests.end(),
    cancel: () => {
      if (cancelled) return;
      cancelled = true;
      requests.fail(new Error("session cancelled"));
      abort.abort();
    },
    [Symbol.asyncIterator]: () => {
      const it = responses[Symbol.asyncIterator]();
      return {
        next: async () => {
          try {
            return (await it.next()) as IteratorResult<SessionResponse>;
          } catch (err) {
            // A dead port also fails whatever is still queued to be written.
            requests.fail(err instanceof Error ? err : new Error(String(err)));
            throw err;
          }
        },
        return: async () => {
          stream.cancel();
          return { value: undefined, done: true };
        },
      };
    },
  };
  return {
    stream,
    close: () => {
      stream.cancel();
      socket.destroy();
    },
  };
}

/** Options for {@link channelConnector}. */
export interface ChannelConnectorOptions {
  kind: ChannelKind;
  /** Whether a coordinator address was configured (auto falls back to TCP only then). */
  coordinatorGiven: boolean;
  /** The virtio-serial port's name. Default {@link AGENT_PORT_NAME}. */
  portName?: string;
  /** sysfs and /dev roots, for tests. */
  roots?: VirtioPortRoots;
  logger?: Logger;
}

/** What an attach will use, for logs: "virtio-serial", "tcp" or "none". */
export function describeChannel(o: ChannelConnectorOptions): "virtio-serial" | "tcp" | "none" {
  if (o.kind === "virtio-serial") return "virtio-serial";
  if (o.kind === "tcp") return "tcp";
  if (findVirtioPort(o.portName ?? AGENT_PORT_NAME, o.roots)) return "virtio-serial";
  return o.coordinatorGiven ? "tcp" : "none";
}

/**
 * The connector for a `--channel` choice. Throws (an attach failure: the
 * session backs off and tries again) when the chosen channel is not there.
 */
export function channelConnector(o: ChannelConnectorOptions): SessionConnector {
  const log = o.logger ?? silentLogger();
  const name = o.portName ?? AGENT_PORT_NAME;
  let lastUsed = "";
  return (coordinator, channelOptions) => {
    const use = describeChannel(o);
    if (use !== lastUsed) {
      log.info({ channel: use, port: use === "virtio-serial" ? name : undefined, coordinator: use === "tcp" ? coordinator : undefined }, "agent channel");
      lastUsed = use;
    }
    if (use === "tcp") return grpcConnector(coordinator, channelOptions);
    if (use === "none") throw new ActionError(`no virtio-serial port named ${name} yet, and no --coordinator to fall back to`);
    const { socket } = openVirtioPort(name, o.roots);
    return sessionOverStream(socket);
  };
}
