// Fuzzing every RPC request the coordinator serves: each method of MigrationService, VmService and
// PeerService gets random bytes and random valid-but-hostile messages (protobuf-es create + toBinary with
// huge numbers, empty and huge strings, unknown enum values), decoded as the server decodes them and
// handed to the real handlers (coordinator/services.ts) over an in-memory MigrationStore and fake
// drivers; AgentService sessions get random SessionRequest messages after a valid hello. Then the same
// through a real in-process grpc-js server, and the coordinator must still answer ListVms.
// Property: a response that encodes, or an error that maps to a status other than INTERNAL/UNKNOWN with
// a message; never an exception out of a handler's reach.
import { create, fromBinary, ScalarType, toBinary, type DescField, type DescMessage, type DescMethod, type DescService } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AgentHub } from "../../coordinator/agent-hub.js";
import { checkSample } from "../../coordinator/agent-hub.js";
import { toGrpcStatus } from "../../coordinator/grpc-errors.js";
import { MigrationStore } from "../../coordinator/migration-store.js";
import { agentService, migrationService, peerService, vmService, type Domain } from "../../coordinator/services.js";
import { VmSupervisor } from "../../coordinator/vm-supervisor.js";
import { AgentService, SessionRequestSchema, type SessionRequest } from "../../gen/ballast/v1/agent_pb.js";
import { MigrationService } from "../../gen/ballast/v1/migration_pb.js";
import { PeerService } from "../../gen/ballast/v1/peer_pb.js";
import { VmService } from "../../gen/ballast/v1/vm_pb.js";
import { addService, createClient, type BidiContext, type Client } from "../../shared/grpc-adapter.js";
import { silentLogger } from "../../shared/logger.js";
import { FakeDriver } from "../helpers/fake-driver.js";

const RUNS = Number(process.env.BALLAST_FUZZ_RUNS ?? 10_000);
const logger = silentLogger();
const defaults = { maxBandwidthBytesPerSec: 1e8, downtimeLimitMs: 300, prepareDeadlineMs: 1000, steadyState: true, sampleIntervalMs: 750, agentLeaseMs: 10_000 };
const store = new MigrationStore({ stateDir: "", logger });
/** No destination coordinator: an outgoing migration fails at PREPARE, as with an unreachable peer. */
const noPeer = (): Client<typeof PeerService> => {
  throw new Error("no peer in this test");
};
const VM_NAMES = ["vm1", "vm2"];
const vms = new Map<string, VmSupervisor>();
let hub: AgentHub;
let domain: Domain;

beforeAll(() => {
  VM_NAMES.forEach((name, i) => {
    vms.set(
      name,
      new VmSupervisor({
        config: { name, qmpSocket: `/nonexistent/${name}.qmp`, agentId: `agent-${i + 1}`, floorBytes: 64 << 20, maxBytes: 0, agentPort: 0 },
        defaults,
        driver: new FakeDriver({ upOnStart: true }),
        store,
        peer: noPeer,
        incomingHost: "127.0.0.1",
        logger,
        timing: { pollMs: 20 },
      }),
    );
  });
  for (const vm of vms.values()) vm.start();
  // A budget no fuzz run reaches: the message budget has its own tests (agent-hub.test.ts).
  hub = new AgentHub({ hostId: "h1", vms, defaults, logger, helloTimeoutMs: 500, messagesPerSecond: 1e9 });
  domain = { vms, hub, store, defaults };
});

afterAll(async () => {
  for (const vm of vms.values()) await vm.stop();
  store.close();
});

// ---- random messages from the descriptors ---------------------------------------------

const MAX_U64 = (1n << 64n) - 1n;
const hugeString = fc.constantFrom("x".repeat(20_000), "é".repeat(5_000), "\u0000".repeat(1000));
/** Over the wire too, huge strings: statuses clip what they echo, so a 40 KB id cannot wedge the connection. */
const WIRE_SAFE = { huge: true };
let stringOptions = { huge: true };
const str = fc.oneof(
  { weight: 12, arbitrary: fc.string({ maxLength: 20 }) },
  { weight: 6, arbitrary: fc.constantFrom("", "vm1", "vm2", "agent-1", "127.0.0.1:1", "[::1]:1", "a:0", "a:65536", "0.0.0.0:50050", "../../etc", " ") },
  { weight: 1, arbitrary: fc.constant(null).chain(() => (stringOptions.huge ? hugeString : fc.string({ maxLength: 200 }))) },
);
function scalarArb(t: ScalarType): fc.Arbitrary<unknown> {
  switch (t) {
    case ScalarType.STRING:
      return str;
    case ScalarType.BOOL:
      return fc.boolean();
    case ScalarType.BYTES:
      return fc.uint8Array({ maxLength: 16 });
    case ScalarType.DOUBLE:
    case ScalarType.FLOAT:
      return fc.oneof(fc.double(), fc.constantFrom(Number.NaN, Infinity, -Infinity, -0, 1e308));
    case ScalarType.INT32:
    case ScalarType.SINT32:
    case ScalarType.SFIXED32:
      return fc.oneof(fc.integer(), fc.constantFrom(-1, 0, 1, 2 ** 31 - 1, -(2 ** 31)));
    case ScalarType.UINT32:
    case ScalarType.FIXED32:
      return fc.oneof(fc.nat(), fc.constantFrom(0, 1, 60_000, 60_001, 600_001, 2 ** 31, 2 ** 32 - 1), fc.integer({ min: 0, max: 2 ** 32 - 1 }));
    case ScalarType.UINT64:
    case ScalarType.FIXED64:
      return fc.oneof(fc.bigInt({ min: 0n, max: MAX_U64 }), fc.constantFrom(0n, 1n, 999n, 1000n, BigInt(Number.MAX_SAFE_INTEGER), BigInt(Number.MAX_SAFE_INTEGER) + 1n, MAX_U64));
    default: // INT64, SINT64, SFIXED64
      return fc.oneof(fc.bigInt({ min: -(1n << 63n), max: (1n << 63n) - 1n }), fc.constantFrom(0n, -1n, BigInt(Number.MAX_SAFE_INTEGER) + 1n));
  }
}
function fieldArb(f: DescField, depth: number): fc.Arbitrary<unknown> {
  switch (f.fieldKind) {
    case "scalar":
      return scalarArb(f.scalar);
    case "enum":
      // Known values, and values the schema does not have (proto3 enums are open).
      return fc.oneof(fc.constantFrom(...f.enum.values.map((v) => v.number)), fc.integer(), fc.constantFrom(-1, 99, 2 ** 31 - 1));
    case "message":
      return depth > 2 ? fc.constant(undefined) : messageInit(f.message, depth + 1);
    case "list":
      if (f.listKind === "scalar") return fc.array(scalarArb(f.scalar), { maxLength: 3 });
      if (f.listKind === "enum") return fc.array(fc.integer(), { maxLength: 3 });
      return depth > 2 ? fc.constant([]) : fc.array(messageInit(f.message, depth + 1), { maxLength: 2 });
    case "map":
      return fc.constant({});
  }
}
/** A random init object for `schema`: each field present or not; one case of each oneof. */
function messageInit(schema: DescMessage, depth = 0): fc.Arbitrary<Record<string, unknown>> {
  const plain = schema.fields.filter((f) => !f.oneof);
  const parts: Record<string, fc.Arbitrary<unknown>> = {};
  for (const f of plain) parts[f.localName] = fc.option(fieldArb(f, depth), { nil: undefined, freq: 3 });
  for (const o of schema.oneofs) {
    parts[o.localName] = fc.option(
      fc.oneof(...o.fields.map((f) => fieldArb(f, depth).map((value) => ({ case: f.localName, value })))),
      { nil: undefined, freq: 4 },
    );
  }
  return fc.record(parts).map((r) => Object.fromEntries(Object.entries(r).filter(([, v]) => v !== undefined)));
}
/** Wire bytes: a hostile but valid message (encoded by protobuf-es), or random bytes. */
function requestBytes(schema: DescMessage): fc.Arbitrary<Uint8Array> {
  return fc.oneof(
    { weight: 4, arbitrary: messageInit(schema).map((init) => toBinary(schema, create(schema, init))) },
    { weight: 1, arbitrary: fc.uint8Array({ maxLength: 48 }) },
    // Valid message plus trailing random bytes (unknown fields, truncated tags).
    { weight: 1, arbitrary: fc.tuple(messageInit(schema), fc.uint8Array({ maxLength: 8 })).map(([init, tail]) => new Uint8Array([...toBinary(schema, create(schema, init)), ...tail])) },
  );
}

// ---- checks ------------------------------------------------------------------------------

function expectFiniteNumbers(v: unknown, path = "", depth = 0): void {
  if (depth > 20) return;
  if (typeof v === "number") {
    if (!Number.isFinite(v)) throw new Error(`${path} = ${v}`);
  } else if (typeof v === "object" && v !== null && !(v instanceof Uint8Array)) {
    for (const [k, x] of Object.entries(v)) expectFiniteNumbers(x, `${path}.${k}`, depth + 1);
  }
}

const BAD_CODES = new Set([grpc.status.INTERNAL, grpc.status.UNKNOWN]);
const outcomes = new Map<string, Map<string, number>>();
function count(method: string, what: string): void {
  const m = outcomes.get(method) ?? new Map<string, number>();
  m.set(what, (m.get(what) ?? 0) + 1);
  outcomes.set(method, m);
}

/** The status an error becomes on the wire; fails on INTERNAL/UNKNOWN or an empty message. */
function expectClearStatus(err: unknown, method: string, request: unknown): void {
  const st = toGrpcStatus(err, { method, request });
  if (BAD_CODES.has(st.code)) throw new Error(`${method}: ${grpc.status[st.code]} for ${String(err)}`, { cause: err });
  expect(st.details.length).toBeGreaterThan(0);
  count(method, grpc.status[st.code] ?? String(st.code));
}

/** A fake server-side call context; streaming calls end after their first message. */
function context(method: DescMethod) {
  const controller = new AbortController();
  if (method.name === "Migrate") controller.abort(); // no self-migration probe to random addresses; the record is still created
  const sent: unknown[] = [];
  return {
    sent,
    ctx: {
      signal: controller.signal,
      peer: "fuzz",
      metadata: new grpc.Metadata(),
      async send(m: unknown) {
        const msg = create(method.output, m as never);
        toBinary(method.output, msg);
        sent.push(msg);
        controller.abort();
      },
    },
  };
}

const SERVICES: ReadonlyArray<readonly [DescService, () => Record<string, (...a: unknown[]) => Promise<unknown>>]> = [
  [MigrationService, () => migrationService(domain) as never],
  [VmService, () => vmService(domain) as never],
  [PeerService, () => peerService(domain) as never],
];

describe("fuzz: every MigrationService, VmService and PeerService request, through the handlers", () => {
  for (const [service, impl] of SERVICES) {
    for (const method of service.methods) {
      it(`${service.name}.${method.name}: a response that encodes, or a clear status (${RUNS} cases)`, async () => {
        const handler = impl()[method.localName];
        expect(handler, `no handler for ${method.name}`).toBeTypeOf("function");
        const path = `/${service.typeName}/${method.name}`;
        await fc.assert(
          fc.asyncProperty(requestBytes(method.input), async (bytes) => {
            let req;
            try {
              req = fromBinary(method.input, bytes);
            } catch {
              // grpc-js answers an undecodable request itself (INTERNAL "Error deserializing request"); see the report.
              count(path, "undecodable");
              return;
            }
            const { ctx, sent } = context(method);
            let res: unknown;
            try {
              res = await (method.methodKind === "unary" ? handler!(req, ctx) : handler!(req, ctx));
            } catch (err) {
              expectClearStatus(err, path, req);
              return;
            }
            if (method.methodKind === "unary") {
              const msg = create(method.output, res as never);
              toBinary(method.output, msg);
              expectFiniteNumbers(msg);
            }
            sent.forEach((m) => expectFiniteNumbers(m));
            count(path, "OK");
          }),
          { numRuns: RUNS },
        );
      }, 120_000);
    }
  }
});

// ---- AgentService sessions ---------------------------------------------------------------

/** A session's request side fed from a list, then ended; responses recorded. */
function sessionContext(messages: SessionRequest[]): { ctx: BidiContext<SessionRequest, never>; sent: unknown[] } {
  const sent: unknown[] = [];
  async function* requests() {
    for (const m of messages) {
      yield m;
      await Promise.resolve();
    }
  }
  const it = requests();
  const ctx = {
    signal: new AbortController().signal,
    peer: "fuzz",
    metadata: new grpc.Metadata(),
    async send(m: unknown) {
      toBinary(AgentService.method.session.output, create(AgentService.method.session.output, m as never));
      sent.push(m);
    },
    [Symbol.asyncIterator]: () => it,
  } as unknown as BidiContext<SessionRequest, never>;
  return { ctx, sent };
}

describe("fuzz: AgentService sessions", () => {
  it(`random SessionRequest messages after a valid hello: the session ends cleanly or with a clear status (${RUNS} cases)`, async () => {
    const request = requestBytes(SessionRequestSchema).chain((bytes) => {
      try {
        return fc.constant(fromBinary(SessionRequestSchema, bytes));
      } catch {
        return fc.constant(create(SessionRequestSchema, {}));
      }
    });
    const session = fc.record({ vm: fc.constantFrom(1, 2), hello: fc.boolean(), messages: fc.array(request, { minLength: 1, maxLength: 4 }) });
    await fc.assert(
      fc.asyncProperty(session, async ({ vm, hello, messages }) => {
        const first = hello ? [create(SessionRequestSchema, { msg: { case: "hello", value: { vmId: `agent-${vm}`, agentVersion: "fuzz" } } })] : [];
        const { ctx, sent } = sessionContext([...first, ...messages]);
        try {
          await hub.serve(ctx);
          count("AgentService.Session", "ended");
        } catch (err) {
          expectClearStatus(err, "/ballast.v1.AgentService/Session", undefined);
        }
        sent.forEach((m) => expectFiniteNumbers(m));
        // A refused sample is never stored: whatever the VM holds passed the hub's checks.
        const last = vms.get(`vm${vm}`)!.view().lastSample;
        if (last) expect(checkSample(last)).toBe("");
      }),
      { numRuns: RUNS },
    );
  }, 120_000);
});

// ---- a real in-process grpc-js server ------------------------------------------------------

describe("fuzz: a real grpc-js server keeps serving", () => {
  let server: grpc.Server;
  let address = "";
  beforeAll(async () => {
    server = new grpc.Server();
    addService(server, MigrationService, migrationService(domain), toGrpcStatus);
    addService(server, VmService, vmService(domain), toGrpcStatus);
    addService(server, PeerService, peerService(domain), toGrpcStatus);
    addService(server, AgentService, agentService(domain), toGrpcStatus);
    const port = await new Promise<number>((res, rej) => server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (e, p) => (e ? rej(e) : res(p))));
    address = `127.0.0.1:${port}`;
  });
  afterAll(() => server.forceShutdown());

  it("300 hostile unary requests as raw bytes over the wire, then ListVms still answers", async () => {
    stringOptions = WIRE_SAFE;
    const raw = new grpc.Client(address, grpc.credentials.createInsecure());
    const unary = [...MigrationService.methods, ...VmService.methods, ...PeerService.methods].filter((m) => m.methodKind === "unary");
    const call = (path: string, bytes: Uint8Array) =>
      new Promise<grpc.ServiceError | undefined>((resolve) => {
        raw.makeUnaryRequest(path, (b: Uint8Array) => Buffer.from(b), (b: Buffer) => b, bytes, new grpc.Metadata(), { deadline: Date.now() + 10_000 }, (err) => resolve(err ?? undefined));
      });
    try {
      await fc.assert(
        fc.asyncProperty(fc.constantFrom(...unary).chain((m) => requestBytes(m.input).map((b) => [m, b] as const)), async ([method, bytes]) => {
          const err = await call(`/${method.parent.typeName}/${method.name}`, bytes);
          if (!err) return;
          expect(err.details.length).toBeGreaterThan(0);
          if (err.code === grpc.status.INTERNAL && err.details.startsWith("Error deserializing request")) return; // grpc-js's own answer to undecodable bytes
          expect(BAD_CODES.has(err.code), `${method.name}: ${grpc.status[err.code]} ${err.details}`).toBe(false);
        }),
        { numRuns: 300 },
      );
    } finally {
      raw.close();
    }
    const vmClient = createClient(VmService, address);
    try {
      const list = await vmClient.listVms({}, { deadlineMs: 5000 });
      expect(list.vms.map((v) => v.name).sort()).toEqual(VM_NAMES);
    } finally {
      vmClient.close();
    }
  }, 120_000);

  it("200 random SessionRequest messages on one real session after hello, then ListVms still answers", async () => {
    const client = createClient(AgentService, address);
    const stream = client.session();
    const done = (async () => {
      try {
        for await (const _ of stream) void _;
        return undefined;
      } catch (err) {
        return err as grpc.ServiceError;
      }
    })();
    await stream.send({ msg: { case: "hello", value: { vmId: "agent-1", agentVersion: "fuzz" } } });
    stringOptions = WIRE_SAFE;
    const messages = fc.sample(messageInit(SessionRequestSchema), { numRuns: 200, seed: 42 });
    for (const m of messages) {
      try {
        await stream.send(m as never);
      } catch {
        break; // the hub ended the session (a second hello is ignored, so only a status would)
      }
    }
    stream.end();
    const err = await done;
    if (err) {
      expect(BAD_CODES.has(err.code), `${grpc.status[err.code]} ${err.details}`).toBe(false);
      expect(err.details.length).toBeGreaterThan(0);
    }
    client.close();
    const vmClient = createClient(VmService, address);
    try {
      const list = await vmClient.listVms({}, { deadlineMs: 5000 });
      expect(list.vms).toHaveLength(VM_NAMES.length);
    } finally {
      vmClient.close();
    }
  }, 60_000);
});

// Found by the fuzzing above and NOT fixed here (coordinator/grpc-errors.ts and the handlers' messages are not
// this change's files): a request whose id is tens of KB long gets a status that echoes the id in grpc-message
// and in the ErrorInfo metadata of grpc-status-details-bin; trailers that large wedge the caller's HTTP/2
// connection: that call and every later call on the connection hang until their deadline (fresh connections
// are still served). Expected to fail until statuses cap what they echo; then flip it to a plain it().
describe("known bug: an oversized id wedges the caller's connection", () => {
  let server: grpc.Server;
  let address = "";
  beforeAll(async () => {
    server = new grpc.Server();
    addService(server, VmService, vmService(domain), toGrpcStatus);
    const port = await new Promise<number>((res, rej) => server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (e, p) => (e ? rej(e) : res(p))));
    address = `127.0.0.1:${port}`;
  });
  afterAll(() => server.forceShutdown());

  it("GetVm with a 40 KB name: INVALID_ARGUMENT, and the same client's ListVms still answers", async () => {
    const c = createClient(VmService, address, grpc.credentials.createInsecure(), { "grpc.use_local_subchannel_pool": 1 });
    try {
      const err = await c.getVm({ name: "é".repeat(20_000) }, { deadlineMs: 1500 }).then(
        () => undefined,
        (e: grpc.ServiceError) => e,
      );
      expect(err?.code).toBe(grpc.status.INVALID_ARGUMENT);
      await c.listVms({}, { deadlineMs: 1500 });
    } finally {
      c.close();
    }
  }, 10_000);
});

afterAll(() => {
  // Which outcomes the fuzzing reached, per method (visible with --reporter=verbose on failure only).
  if (process.env.BALLAST_FUZZ_OUTCOMES) console.log(JSON.stringify(Object.fromEntries([...outcomes].map(([k, v]) => [k, Object.fromEntries(v)])), null, 1));
});
