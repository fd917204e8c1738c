/**
 * The error → status mapping (coordinator/grpc-errors.ts): every error
 * class's code, its google.rpc.ErrorInfo (reason, domain, ids) and, for
 * INVALID_ARGUMENT, its google.rpc.BadRequest; then the same details read
 * back with the generated schemas from real grpc-js calls to an in-process
 * server, including the self-migration refusal.
 */
import { create, fromBinary } from "@bufbuild/protobuf";
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MigrationService } from "../../gen/ballast/v1/migration_pb.js";
import { PeerService } from "../../gen/ballast/v1/peer_pb.js";
import { VmService } from "../../gen/ballast/v1/vm_pb.js";
import { BadRequestSchema, ErrorInfoSchema } from "../../gen/google/rpc/error_details_pb.js";
import { StatusSchema } from "../../gen/google/rpc/status_pb.js";
import {
  ERROR_DOMAIN,
  STATUS_DETAILS_KEY,
  buildStatus,
  cleanGrpcMessage,
  codeOfReason,
  createErrorMapper,
  decodeStatusDetails,
  toGrpcStatus,
} from "../../coordinator/grpc-errors.js";
import { QmpCommandError, QmpDisconnectedError, QmpTimeoutError } from "../../coordinator/qmp-client.js";
import { migrationService, peerService, vmService, type Domain } from "../../coordinator/services.js";
import {
  BallastError,
  CancelledError,
  ConfigError,
  DeadlineError,
  FailedPreconditionError,
  InvalidArgumentError,
  NotFoundError,
  PermissionDeniedError,
  ResourceExhaustedError,
  StateFileError,
  UnavailableError,
} from "../../shared/errors.js";
import { addService, createClient } from "../../shared/grpc-adapter.js";

const S = grpc.status;

/** Decodes a mapped status's trailer with the generated schemas, the way any client would. */
function decode(metadata: grpc.Metadata | undefined) {
  const raw = metadata?.get(STATUS_DETAILS_KEY)[0];
  expect(raw).toBeInstanceOf(Buffer);
  const st = fromBinary(StatusSchema, raw as Buffer);
  const infos = st.details.map((d) => anyUnpack(d, ErrorInfoSchema)).filter((x) => x !== undefined);
  const bad = st.details.map((d) => anyUnpack(d, BadRequestSchema)).filter((x) => x !== undefined);
  expect(infos).toHaveLength(1);
  expect(bad.length).toBeLessThanOrEqual(1);
  return { status: st, info: infos[0]!, badRequest: bad[0], typeUrls: st.details.map((d) => d.typeUrl) };
}

describe("toGrpcStatus: each error class", () => {
  const cases: Array<[string, unknown, grpc.status, string]> = [
    ["InvalidArgumentError", new InvalidArgumentError("bad thing"), S.INVALID_ARGUMENT, "INVALID_ARGUMENT"],
    ["ConfigError", new ConfigError("config.json: vms[0].name: required"), S.INVALID_ARGUMENT, "CONFIG"],
    ["NotFoundError", new NotFoundError('no VM named "x" on this host'), S.NOT_FOUND, "NOT_FOUND"],
    ["FailedPreconditionError", new FailedPreconditionError("VM vm1 is already in migration m1"), S.FAILED_PRECONDITION, "FAILED_PRECONDITION"],
    ["UnavailableError", new UnavailableError("no QMP connection"), S.UNAVAILABLE, "UNAVAILABLE"],
    ["QmpDisconnectedError", new QmpDisconnectedError("QMP socket closed"), S.UNAVAILABLE, "UNAVAILABLE"],
    ["DeadlineError", new DeadlineError("too slow"), S.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"],
    ["QmpTimeoutError", new QmpTimeoutError("query-migrate", 5000), S.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"],
    ["PermissionDeniedError", new PermissionDeniedError("agent on another VM's port"), S.PERMISSION_DENIED, "PERMISSION_DENIED"],
    ["CancelledError", new CancelledError("cancelled by request"), S.CANCELLED, "CANCELLED"],
    ["QmpCommandError", new QmpCommandError("migrate", "GenericError", "no incoming"), S.FAILED_PRECONDITION, "QMP_ERROR"],
    ["ResourceExhaustedError", new ResourceExhaustedError("too many agent sessions"), S.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"],
  ];

  it.each(cases)("%s → its code, message and ErrorInfo", (_n, err, code, reason) => {
    const m = toGrpcStatus(err, { method: "/ballast.v1.VmService/GetVm", request: { name: "vm1" } });
    expect(m.code).toBe(code);
    expect(m.details).toBe((err as Error).message);
    const d = decode(m.metadata);
    expect(d.status.code).toBe(code);
    expect(d.status.message).toBe((err as Error).message);
    expect(d.info.reason).toBe(reason);
    expect(d.info.domain).toBe(ERROR_DOMAIN);
    expect(d.info.metadata).toEqual({ vm: "vm1" });
    expect(d.typeUrls[0]).toBe("type.googleapis.com/google.rpc.ErrorInfo");
    // Only field errors carry a BadRequest.
    expect(d.badRequest).toBeUndefined();
    // The reason maps back to the same code (ballastctl reads record reasons this way).
    expect(codeOfReason(reason)).toBe(code);
  });

  it("INVALID_ARGUMENT with fields carries a BadRequest with the proto field names", () => {
    const err = new InvalidArgumentError("two things", {
      violations: [
        { field: "downtime_limit_ms", description: "--downtime-ms: 70000 is above the maximum of 60000" },
        { field: "destination", description: "--to: not a host:port address" },
      ],
    });
    const d = decode(toGrpcStatus(err).metadata);
    expect(d.typeUrls).toEqual(["type.googleapis.com/google.rpc.ErrorInfo", "type.googleapis.com/google.rpc.BadRequest"]);
    expect(d.info.reason).toBe("INVALID_ARGUMENT");
    expect(d.badRequest?.fieldViolations.map((v) => [v.field, v.description])).toEqual([
      ["downtime_limit_ms", "--downtime-ms: 70000 is above the maximum of 60000"],
      ["destination", "--to: not a host:port address"],
    ]);
  });

  it("puts the ids the request named into the ErrorInfo metadata", () => {
    const cancel = decode(toGrpcStatus(new NotFoundError('no migration "m9"'), { method: "/ballast.v1.MigrationService/CancelMigration", request: { id: "m9" } }).metadata);
    expect(cancel.info.metadata).toEqual({ migration_id: "m9" });
    const migrate = decode(toGrpcStatus(new NotFoundError("x"), { method: "/ballast.v1.MigrationService/Migrate", request: { vm: "nope", destination: "h:1", mode: 1 } }).metadata);
    expect(migrate.info.metadata).toEqual({ vm: "nope", destination: "h:1" });
    const peer = decode(toGrpcStatus(new FailedPreconditionError("x"), { method: "/ballast.v1.PeerService/PrepareIncoming", request: { vm: "vm1", migrationId: "m1" } }).metadata);
    expect(peer.info.metadata).toEqual({ vm: "vm1", migration_id: "m1" });
  });

  it("unknown errors become INTERNAL with a generic message, an incident id, and the internals only in the log", () => {
    const logged: Array<[string, unknown]> = [];
    const map = createErrorMapper({ onInternal: (incident, err) => logged.push([incident, err]) });
    for (const err of [new TypeError("Cannot read properties of undefined (reading 'secret')"), new StateFileError("/var/lib/ballast/m.db", "locked"), new BallastError("proc-parse", "/proc/x: y"), "a string"]) {
      const m = map(err, { method: "/ballast.v1.VmService/ListVms", request: {} });
      expect(m.code).toBe(S.INTERNAL);
      expect(m.details).toMatch(/^internal error \(incident [0-9a-f]{8}\); the coordinator's log has the details$/);
      expect(m.details).not.toMatch(/secret|\/var\/lib|proc|string/);
      const d = decode(m.metadata);
      expect(d.info.reason).toBe("INTERNAL");
      expect(d.info.domain).toBe(ERROR_DOMAIN);
      expect(d.info.metadata.incident).toBe(logged.at(-1)?.[0]);
      expect(logged.at(-1)?.[1]).toBe(err);
    }
  });

  it("a downstream grpc-js error keeps its code and reason, without grpc-js internals", () => {
    const bare = Object.assign(new Error("14 UNAVAILABLE: No connection established. Last error: Error: connect ECONNREFUSED 127.0.0.1:1. Resolution note: "), {
      code: 14,
      details: "No connection established. Last error: Error: connect ECONNREFUSED 127.0.0.1:1. Resolution note: ",
      metadata: new grpc.Metadata(),
    });
    const m = toGrpcStatus(bare);
    expect(m.code).toBe(S.UNAVAILABLE);
    expect(m.details).toBe("peer: no connection established. last error: connect ECONNREFUSED 127.0.0.1:1");
    expect(decode(m.metadata).info.reason).toBe("UNAVAILABLE");

    const peer = buildStatus(S.FAILED_PRECONDITION, "QMP migrate-incoming failed", "QMP_ERROR", { vm: "vm1" });
    const fromPeer = Object.assign(new Error("9 FAILED_PRECONDITION: QMP migrate-incoming failed"), { code: 9, details: peer.details, metadata: peer.metadata });
    const d = decode(toGrpcStatus(fromPeer).metadata);
    expect(d.status.code).toBe(S.FAILED_PRECONDITION);
    expect(d.status.message).toBe("peer: QMP migrate-incoming failed");
    expect(d.info).toMatchObject({ reason: "QMP_ERROR", domain: ERROR_DOMAIN, metadata: { vm: "vm1" } });
  });

  it("cleanGrpcMessage drops the code prefix and an empty resolution note, keeps a real one", () => {
    expect(cleanGrpcMessage("9 FAILED_PRECONDITION: VM vm1 here is running")).toBe("VM vm1 here is running");
    expect(cleanGrpcMessage("No connection established. Last error: Error: connect ECONNREFUSED 127.0.0.1:9. Resolution note: ")).toBe(
      "no connection established. last error: connect ECONNREFUSED 127.0.0.1:9",
    );
    expect(cleanGrpcMessage("No addresses resolved. Resolution note: DNS lookup of nowhere.invalid failed")).toBe("No addresses resolved. resolution: DNS lookup of nowhere.invalid failed");
  });
});

describe("status details over a real grpc-js call", () => {
  const servers: grpc.Server[] = [];
  const addresses: string[] = [];
  const started: string[] = [];
  const defaults = { maxBandwidthBytesPerSec: 125_000_000, downtimeLimitMs: 300, prepareDeadlineMs: 15_000, steadyState: true, sampleIntervalMs: 1000, agentLeaseMs: 10_000 };

  /** A coordinator's MigrationService, VmService and PeerService over a fake VM whose startOutgoing only records the call. */
  async function serve(): Promise<string> {
    const fakeVm = {
      startOutgoing: (p: { destination: string }) => {
        started.push(p.destination);
        throw new FailedPreconditionError(`fake VM: would migrate to ${p.destination}`);
      },
    };
    const domain = { vms: new Map([["vm1", fakeVm]]), defaults, store: {} } as unknown as Domain;
    const server = new grpc.Server();
    addService(server, MigrationService, migrationService(domain), toGrpcStatus);
    addService(server, VmService, vmService(domain), toGrpcStatus);
    addService(server, PeerService, peerService(domain), toGrpcStatus);
    const port = await new Promise<number>((res, rej) => server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (e, p) => (e ? rej(e) : res(p))));
    servers.push(server);
    return `127.0.0.1:${port}`;
  }

  beforeAll(async () => {
    addresses.push(await serve(), await serve());
  });
  afterAll(() => {
    for (const s of servers) s.forceShutdown();
  });

  /** The ServiceError a unary call ends with. */
  async function unaryError(call: () => Promise<unknown>): Promise<grpc.ServiceError> {
    try {
      await call();
    } catch (err) {
      return err as grpc.ServiceError;
    }
    throw new Error("the call succeeded");
  }

  /** The ServiceError a server-streaming call ends with. */
  async function streamError(stream: AsyncIterable<unknown>): Promise<grpc.ServiceError> {
    try {
      for await (const _ of stream) {
        // drain
      }
    } catch (err) {
      return err as grpc.ServiceError;
    }
    throw new Error("the stream ended OK");
  }

  it("NOT_FOUND from a unary call: ErrorInfo with the VM", async () => {
    const client = createClient(VmService, addresses[0]!);
    try {
      const err = await unaryError(() => client.getVm({ name: "nope" }));
      expect(err.code).toBe(S.NOT_FOUND);
      expect(err.details).toBe('no VM named "nope" on this host');
      const d = decode(err.metadata);
      expect(d.status.code).toBe(S.NOT_FOUND);
      expect(d.info).toMatchObject({ reason: "NOT_FOUND", domain: ERROR_DOMAIN, metadata: { vm: "nope" } });
      // The shared decoder that ballastctl uses agrees.
      expect(decodeStatusDetails(err.metadata)?.errorInfo?.reason).toBe("NOT_FOUND");
    } finally {
      client.close();
    }
  });

  it("INVALID_ARGUMENT from a server-streaming call: BadRequest names the proto field, the message the flag", async () => {
    const client = createClient(MigrationService, addresses[0]!);
    try {
      const err = await streamError(client.migrate({ vm: "vm1", destination: "127.0.0.1:1", downtimeLimitMs: 70_000 }));
      expect(err.code).toBe(S.INVALID_ARGUMENT);
      const d = decode(err.metadata);
      expect(d.status.message).toBe("--downtime-ms: 70000 is above the maximum of 60000");
      expect(d.info).toMatchObject({ reason: "INVALID_ARGUMENT", domain: ERROR_DOMAIN, metadata: { vm: "vm1", destination: "127.0.0.1:1" } });
      expect(d.badRequest?.fieldViolations).toEqual([expect.objectContaining({ field: "downtime_limit_ms", description: "--downtime-ms: 70000 is above the maximum of 60000" })]);
    } finally {
      client.close();
    }
  });

  it.each(["127.0.0.1", "localhost"])("refuses --to this coordinator itself (reached as %s), before any migration starts", async (host) => {
    const port = addresses[0]!.split(":")[1];
    const client = createClient(MigrationService, addresses[0]!);
    try {
      const before = started.length;
      const err = await streamError(client.migrate({ vm: "vm1", destination: `${host}:${port}` }));
      expect(err.code).toBe(S.INVALID_ARGUMENT);
      expect(err.details).toBe(`--to ${host}:${port} is this coordinator itself; name the destination host's coordinator`);
      const d = decode(err.metadata);
      expect(d.badRequest?.fieldViolations.map((v) => v.field)).toEqual(["destination"]);
      expect(started.length).toBe(before);
    } finally {
      client.close();
    }
  });

  it("lets a migration to another coordinator, or to one that does not answer, through to the VM", async () => {
    const client = createClient(MigrationService, addresses[0]!);
    try {
      const other = await streamError(client.migrate({ vm: "vm1", destination: addresses[1]! }));
      expect(other.code).toBe(S.FAILED_PRECONDITION);
      expect(other.details).toBe(`fake VM: would migrate to ${addresses[1]}`);
      // Nothing listens on port 1: the check cannot ask, and PREPARE will report it on the record.
      const down = await streamError(client.migrate({ vm: "vm1", destination: "127.0.0.1:1" }));
      expect(down.details).toBe("fake VM: would migrate to 127.0.0.1:1");
      expect(started.slice(-2)).toEqual([addresses[1], "127.0.0.1:1"]);
    } finally {
      client.close();
    }
  });

  it("a client without Ballast's code decodes the trailer as a standard google.rpc.Status", async () => {
    const client = createClient(VmService, addresses[1]!);
    try {
      const err = await unaryError(() => client.getVm({ name: "" }));
      expect(err.code).toBe(S.INVALID_ARGUMENT);
      const st = fromBinary(StatusSchema, err.metadata.get("grpc-status-details-bin")[0] as Buffer);
      expect(st.code).toBe(S.INVALID_ARGUMENT);
      expect(st.message).toBe("a VM name is required (name)");
      const [info, bad] = st.details;
      expect(info?.typeUrl).toBe("type.googleapis.com/google.rpc.ErrorInfo");
      expect(fromBinary(ErrorInfoSchema, info!.value)).toMatchObject({ reason: "INVALID_ARGUMENT", domain: "ballast.dev" });
      expect(bad?.typeUrl).toBe("type.googleapis.com/google.rpc.BadRequest");
      expect(fromBinary(BadRequestSchema, bad!.value).fieldViolations[0]).toMatchObject({ field: "name" });
      // Round trip through create() keeps the wire shape stable.
      expect(create(StatusSchema, st).details).toHaveLength(2);
    } finally {
      client.close();
    }
  });
});
