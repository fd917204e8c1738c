/**
 * A small typed bridge between protobuf-es (v2) service descriptors and
 * @grpc/grpc-js. There is no maintained adapter between the two, and we need
 * only three call kinds: unary, server-streaming and bidi.
 *
 * Messages cross the wire with `toBinary`/`fromBinary`, so the generated code
 * from `buf generate` is the single source of truth for the contract.
 */
import {
  create,
  fromBinary,
  toBinary,
  type DescMessage,
  type DescMethod,
  type DescService,
  type MessageInitShape,
  type MessageShape,
} from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";

type AnyMethod = Pick<DescMethod, "input" | "output" | "methodKind">;
type In<M extends AnyMethod> = MessageShape<M["input"]>;
type Out<M extends AnyMethod> = MessageShape<M["output"]>;
type OutInit<M extends AnyMethod> = MessageInitShape<M["output"]>;
type InInit<M extends AnyMethod> = MessageInitShape<M["input"]>;

/** What a server handler learns about its call besides the request. */
export interface CallContext {
  /** Aborted when the client cancels or the deadline passes. */
  readonly signal: AbortSignal;
  /** The peer address as grpc-js reports it. */
  readonly peer: string;
  readonly metadata: grpc.Metadata;
}

/** A server-streaming call: write responses with `send`. */
export interface ServerStreamContext<O> extends CallContext {
  /** Writes one response; resolves when the transport accepted it. */
  send(message: O): Promise<void>;
}

/** A bidi call: read requests by iterating, write responses with `send`. */
export interface BidiContext<I, O> extends ServerStreamContext<O>, AsyncIterable<I> {}

/** The handler type for one method, chosen by its kind. */
export type ServerMethod<M extends AnyMethod> = M["methodKind"] extends "unary"
  ? (request: In<M>, ctx: CallContext) => Promise<OutInit<M>>
  : M["methodKind"] extends "server_streaming"
    ? (request: In<M>, ctx: ServerStreamContext<OutInit<M>>) => Promise<void>
    : M["methodKind"] extends "bidi_streaming"
      ? (ctx: BidiContext<In<M>, OutInit<M>>) => Promise<void>
      : never;

/** An implementation of every method of a service. */
export type ServiceImpl<S extends DescService> = {
  [K in keyof S["method"]]: ServerMethod<S["method"][K]>;
};

/** What the error mapper learns about the failed call. */
export interface ErrorContext {
  /** The full method path, e.g. "/ballast.v1.MigrationService/Migrate". */
  method: string;
  /** The request of a unary or server-streaming call (absent for bidi). */
  request?: unknown;
}

/** A status for the caller; `metadata` goes out as the call's trailers (e.g. grpc-status-details-bin). */
export interface MappedStatus {
  code: grpc.status;
  details: string;
  metadata?: grpc.Metadata;
}

/** Turns any thrown value into a gRPC status. Supplied by the caller so mapping stays in one place. */
export type ErrorMapper = (err: unknown, ctx?: ErrorContext) => MappedStatus;

function serializer(schema: DescMessage) {
  return (value: unknown) => Buffer.from(toBinary(schema, value as MessageShape<DescMessage>));
}

function deserializer(schema: DescMessage) {
  return (bytes: Buffer) => fromBinary(schema, bytes);
}

/** Builds the grpc-js ServiceDefinition for a protobuf-es service. */
export function serviceDefinition(service: DescService): grpc.ServiceDefinition {
  const def: Record<string, grpc.MethodDefinition<unknown, unknown>> = {};
  for (const method of service.methods) {
    if (method.methodKind === "client_streaming") {
      throw new Error(`grpc-adapter: client-streaming method ${method.name} is not supported`);
    }
    def[method.localName] = {
      path: `/${service.typeName}/${method.name}`,
      requestStream: method.methodKind === "bidi_streaming",
      responseStream: method.methodKind !== "unary",
      requestSerialize: serializer(method.input),
      requestDeserialize: deserializer(method.input),
      responseSerialize: serializer(method.output),
      responseDeserialize: deserializer(method.output),
      originalName: method.localName,
    };
  }
  return def;
}

function toServiceError(err: unknown, mapError: ErrorMapper, ctx: ErrorContext): grpc.ServiceError {
  let mapped: MappedStatus;
  try {
    mapped = mapError(err, ctx);
  } catch {
    mapped = { code: grpc.status.INTERNAL, details: "internal error" };
  }
  const { code, details } = mapped;
  return Object.assign(new Error(details), { code, details, metadata: mapped.metadata ?? new grpc.Metadata() });
}

type AnyServerCall = grpc.ServerUnaryCall<unknown, unknown> | grpc.ServerWritableStream<unknown, unknown> | grpc.ServerDuplexStream<unknown, unknown>;

function contextOf(call: AnyServerCall): CallContext {
  const controller = new AbortController();
  const emitter = call as unknown as NodeJS.EventEmitter;
  emitter.on("cancelled", () => controller.abort(new Error("call cancelled by client")));
  emitter.on("close", () => controller.abort(new Error("call closed")));
  return { signal: controller.signal, peer: call.getPeer(), metadata: call.metadata };
}

function writer<O>(stream: grpc.ServerWritableStream<unknown, unknown> | grpc.ServerDuplexStream<unknown, unknown>, schema: DescMessage) {
  return (init: O): Promise<void> =>
    new Promise((resolve, reject) => {
      if (stream.destroyed || stream.writableEnded) {
        reject(new Error("stream already closed"));
        return;
      }
      const msg = create(schema, init as MessageInitShape<DescMessage>);
      const ok = stream.write(msg, (err?: Error | null) => (err ? reject(err) : resolve()));
      // grpc-js calls back on flush; backpressure is visible via ok === false.
      void ok;
    });
}

/**
 * Adds a protobuf-es service to a grpc-js server.
 * Every handler error goes through `mapError`, the single place where domain
 * errors become status codes.
 */
export function addService<S extends DescService>(
  server: grpc.Server,
  service: S,
  impl: ServiceImpl<S>,
  mapError: ErrorMapper,
): void {
  const handlers: grpc.UntypedServiceImplementation = {};
  for (const method of service.methods) {
    const fn = (impl as Record<string, unknown>)[method.localName] as (...args: unknown[]) => Promise<unknown>;
    const path = `/${service.typeName}/${method.name}`;
    if (typeof fn !== "function") throw new Error(`grpc-adapter: no handler for ${service.typeName}.${method.name}`);
    switch (method.methodKind) {
      case "unary":
        handlers[method.localName] = ((call: grpc.ServerUnaryCall<unknown, unknown>, callback: grpc.sendUnaryData<unknown>) => {
          const ctx = contextOf(call);
          fn(call.request, ctx).then(
            (res) => callback(null, create(method.output, res as MessageInitShape<DescMessage>)),
            (err: unknown) => callback(toServiceError(err, mapError, { method: path, request: call.request })),
          );
        }) as grpc.handleUnaryCall<unknown, unknown>;
        break;
      case "server_streaming":
        handlers[method.localName] = ((call: grpc.ServerWritableStream<unknown, unknown>) => {
          const base = contextOf(call);
          const ctx = { ...base, send: writer(call, method.output) };
          fn(call.request, ctx).then(
            () => call.end(),
            // grpc-js turns an 'error' event into the call's final status; destroy() would drop it.
            (err: unknown) => call.emit("error", toServiceError(err, mapError, { method: path, request: call.request })),
          );
        }) as grpc.handleServerStreamingCall<unknown, unknown>;
        break;
      case "bidi_streaming":
        handlers[method.localName] = ((call: grpc.ServerDuplexStream<unknown, unknown>) => {
          const base = contextOf(call);
          const ctx = {
            ...base,
            send: writer(call, method.output),
            // Node's default stream iterator destroys the duplex when the read side
            // ends, which would drop our final status; keep the write side alive.
            [Symbol.asyncIterator]: () => call.iterator({ destroyOnReturn: false })[Symbol.asyncIterator](),
          };
          fn(ctx).then(
            () => call.end(),
            (err: unknown) => call.emit("error", toServiceError(err, mapError, { method: path })),
          );
        }) as grpc.handleBidiStreamingCall<unknown, unknown>;
        break;
      default:
        throw new Error(`grpc-adapter: unsupported method kind ${method.methodKind}`);
    }
  }
  server.addService(serviceDefinition(service), handlers);
}

/** Per-call options for clients. */
export interface CallOptions {
  /** Absolute deadline or milliseconds from now. Default: none. */
  deadlineMs?: number;
  signal?: AbortSignal;
  metadata?: grpc.Metadata;
}

/** A client-side bidi stream. */
export interface BidiStream<I, O> extends AsyncIterable<O> {
  /** Writes one request. Resolves when flushed; rejects if the stream is gone. */
  send(message: I): Promise<void>;
  /** Half-closes the request side. */
  end(): void;
  /** Cancels the call. */
  cancel(): void;
}

/** The client function for one method, chosen by its kind. */
export type ClientMethod<M extends AnyMethod> = M["methodKind"] extends "unary"
  ? (request: InInit<M>, options?: CallOptions) => Promise<Out<M>>
  : M["methodKind"] extends "server_streaming"
    ? (request: InInit<M>, options?: CallOptions) => AsyncIterable<Out<M>>
    : M["methodKind"] extends "bidi_streaming"
      ? (options?: CallOptions) => BidiStream<InInit<M>, Out<M>>
      : never;

/** A typed client for a protobuf-es service, plus `close()`. */
export type Client<S extends DescService> = {
  [K in keyof S["method"]]: ClientMethod<S["method"][K]>;
} & { close(): void; readonly raw: grpc.Client };

function callOptions(options?: CallOptions): grpc.CallOptions {
  const out: grpc.CallOptions = {};
  if (options?.deadlineMs !== undefined) out.deadline = Date.now() + options.deadlineMs;
  return out;
}

function bindAbort(call: { cancel(): void }, signal?: AbortSignal): void {
  if (!signal) return;
  if (signal.aborted) call.cancel();
  else signal.addEventListener("abort", () => call.cancel(), { once: true });
}

/**
 * Creates a typed client. `address` is host:port; channel options go straight
 * to grpc-js (for example keepalive settings for agents).
 */
export function createClient<S extends DescService>(
  service: S,
  address: string,
  credentials: grpc.ChannelCredentials = grpc.credentials.createInsecure(),
  channelOptions: grpc.ChannelOptions = {},
): Client<S> {
  const raw = new grpc.Client(address, credentials, channelOptions);
  const client: Record<string, unknown> = { raw, close: () => raw.close() };
  for (const method of service.methods) {
    const path = `/${service.typeName}/${method.name}`;
    const ser = (init: unknown) => Buffer.from(toBinary(method.input, create(method.input, init as MessageInitShape<DescMessage>)));
    const de = deserializer(method.output);
    switch (method.methodKind) {
      case "unary":
        client[method.localName] = (req: unknown, options?: CallOptions) =>
          new Promise((resolve, reject) => {
            const call = raw.makeUnaryRequest(path, ser, de, req, options?.metadata ?? new grpc.Metadata(), callOptions(options), (err, res) =>
              err ? reject(err) : resolve(res),
            );
            bindAbort(call, options?.signal);
          });
        break;
      case "server_streaming":
        client[method.localName] = (req: unknown, options?: CallOptions) => {
          const call = raw.makeServerStreamRequest(path, ser, de, req, options?.metadata ?? new grpc.Metadata(), callOptions(options));
          bindAbort(call, options?.signal);
          return call as AsyncIterable<unknown>;
        };
        break;
      case "bidi_streaming":
        client[method.localName] = (options?: CallOptions) => {
          const call = raw.makeBidiStreamRequest(path, ser, de, options?.metadata ?? new grpc.Metadata(), callOptions(options));
          bindAbort(call, options?.signal);
          const stream: BidiStream<unknown, unknown> = {
            send: (msg) =>
              new Promise((resolve, reject) => {
                if (call.destroyed || call.writableEnded) {
                  reject(new Error("stream already closed"));
                  return;
                }
                call.write(msg, (err?: Error | null) => (err ? reject(err) : resolve()));
              }),
            end: () => call.end(),
            cancel: () => call.cancel(),
            [Symbol.asyncIterator]: () => (call as AsyncIterable<unknown>)[Symbol.asyncIterator](),
          };
          return stream;
        };
        break;
      default:
        throw new Error(`grpc-adapter: unsupported method kind ${method.methodKind}`);
    }
  }
  return client as Client<S>;
}
