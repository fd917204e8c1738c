/**
 * The one place where errors become gRPC statuses. Domain code throws the
 * named classes from shared/errors.ts (or the QMP ones, which extend them);
 * handlers never pick status codes themselves.
 *
 * Every status carries `grpc-status-details-bin`: a serialized
 * google.rpc.Status with the same code and message and
 *   - a google.rpc.ErrorInfo: `reason` is the error's stable code in
 *     UPPER_SNAKE (NOT_FOUND, INVALID_ARGUMENT, QMP_ERROR, INTERNAL, ...),
 *     `domain` is "ballast.dev", `metadata` holds the ids the request named
 *     (`vm`, `migration_id`, `destination`);
 *   - for INVALID_ARGUMENT with known fields, a google.rpc.BadRequest whose
 *     field violations use the request's proto field names.
 */
import { randomBytes } from "node:crypto";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { anyPack, anyUnpack } from "@bufbuild/protobuf/wkt";
import { Metadata, status } from "@grpc/grpc-js";
import { BadRequestSchema, ErrorInfoSchema, type BadRequest, type ErrorInfo } from "../gen/google/rpc/error_details_pb.js";
import { StatusSchema, type Status } from "../gen/google/rpc/status_pb.js";
import { BallastError, InvalidArgumentError, StateFileError, errorMessage } from "../shared/errors.js";
import type { ErrorContext, MappedStatus } from "../shared/grpc-adapter.js";

/** ErrorInfo.domain of every Ballast error. */
export const ERROR_DOMAIN = "ballast.dev";
/** The trailer that carries the serialized google.rpc.Status. */
export const STATUS_DETAILS_KEY = "grpc-status-details-bin";

const BY_CODE: Record<string, status> = {
  "invalid-argument": status.INVALID_ARGUMENT,
  config: status.INVALID_ARGUMENT,
  "not-found": status.NOT_FOUND,
  "failed-precondition": status.FAILED_PRECONDITION,
  unavailable: status.UNAVAILABLE,
  "deadline-exceeded": status.DEADLINE_EXCEEDED,
  "permission-denied": status.PERMISSION_DENIED,
  cancelled: status.CANCELLED,
  "resource-exhausted": status.RESOURCE_EXHAUSTED,
  // QEMU refused a command: the VM is not in a state that allows it.
  "qmp-error": status.FAILED_PRECONDITION,
};

/** The gRPC status name of a code, e.g. "NOT_FOUND". */
export function statusName(code: number): string {
  return (status as unknown as Record<number, string>)[code] ?? `CODE_${code}`;
}

/** An error's stable `code` as an ErrorInfo reason: "not-found" → "NOT_FOUND". */
export function reasonOf(code: string): string {
  return code.toUpperCase().replace(/[^A-Z0-9]+/g, "_");
}

/**
 * The gRPC code an ErrorInfo reason stands for: the same table as the
 * mapping, read backwards (reasons that are gRPC names stand for
 * themselves). Undefined for reasons it does not know.
 */
export function codeOfReason(reason: string): status | undefined {
  for (const [code, s] of Object.entries(BY_CODE)) if (reasonOf(code) === reason) return s;
  const named = (status as unknown as Record<string, number>)[reason];
  return typeof named === "number" && named > 0 && named <= 16 ? (named as status) : undefined;
}

/**
 * Removes grpc-js internals from a status message: the `N CODE: ` prefix of
 * a ServiceError's message, an empty "Resolution note", and the doubled
 * "Error: " of a wrapped Node error.
 */
export function cleanGrpcMessage(text: string): string {
  return text
    .replace(/^\d{1,2} [A-Z_]+: /, "")
    .replace(/\.?\s*Resolution note:\s*$/, "")
    .replace(/Resolution note: /, "resolution: ")
    .replace(/Last error: (?:Error: )?/, "last error: ")
    .replace(/^No connection established\b/, "no connection established")
    .trim();
}

/** Request fields that name something, and the ErrorInfo metadata key for each. */
const ID_FIELDS: ReadonlyArray<readonly [string, string]> = [
  ["vm", "vm"],
  // VmService.GetVm names the VM `name`.
  ["name", "vm"],
  ["id", "migration_id"],
  ["migrationId", "migration_id"],
  ["destination", "destination"],
];

function idsOf(request: unknown): Record<string, string> {
  const out: Record<string, string> = {};
  if (typeof request !== "object" || request === null) return out;
  for (const [field, key] of ID_FIELDS) {
    const v = (request as Record<string, unknown>)[field];
    if (typeof v === "string" && v !== "" && out[key] === undefined) out[key] = v;
  }
  return out;
}

/** A grpc-js ServiceError from a downstream call (e.g. a peer coordinator). */
function asGrpcError(err: unknown): { code: status; details: string; metadata?: Metadata } | undefined {
  if (typeof err !== "object" || err === null || err instanceof BallastError) return undefined;
  const e = err as { code?: unknown; details?: unknown; metadata?: unknown };
  if (typeof e.code !== "number" || !(e.code > 0 && e.code <= 16)) return undefined;
  return {
    code: e.code as status,
    details: typeof e.details === "string" && e.details !== "" ? e.details : errorMessage(err),
    metadata: e.metadata instanceof Metadata ? e.metadata : undefined,
  };
}

/** The details a Ballast status (or any status with google.rpc details) carries, decoded. */
export interface StatusDetails {
  status: Status;
  errorInfo?: ErrorInfo;
  badRequest?: BadRequest;
}

/** Decodes `grpc-status-details-bin` from a status's trailers; undefined if absent or unreadable. */
export function decodeStatusDetails(metadata: Metadata | undefined): StatusDetails | undefined {
  const raw = metadata?.get(STATUS_DETAILS_KEY)[0];
  if (!(raw instanceof Uint8Array)) return undefined;
  try {
    const st = fromBinary(StatusSchema, raw);
    const out: StatusDetails = { status: st };
    for (const d of st.details) {
      out.errorInfo ??= anyUnpack(d, ErrorInfoSchema);
      out.badRequest ??= anyUnpack(d, BadRequestSchema);
    }
    return out;
  } catch {
    return undefined;
  }
}

/** Options for {@link createErrorMapper}. */
export interface ErrorMapperOptions {
  /** Where the internals of an unexpected error go; the caller only sees the incident id. */
  onInternal?: (incident: string, err: unknown, ctx: ErrorContext | undefined) => void;
}

function logInternalToStderr(incident: string, err: unknown, ctx: ErrorContext | undefined): void {
  const line = { level: 50, time: Date.now(), name: "grpc-errors", msg: "internal error answered as INTERNAL", incident, method: ctx?.method, err: errorMessage(err), stack: err instanceof Error ? err.stack : undefined };
  process.stderr.write(`${JSON.stringify(line)}\n`);
}

const MAX_MESSAGE_CHARS = 512;
const MAX_METADATA_CHARS = 128;

function clip(s: string, max: number): string {
  return s.length > max ? `${s.slice(0, max)}… (${s.length - max} more characters)` : s;
}

/** Builds the status for `code`/`message` with an ErrorInfo (and a BadRequest if there are violations). */
export function buildStatus(
  code: status,
  message: string,
  reason: string,
  metadata: Record<string, string>,
  violations: ReadonlyArray<{ field: string; description: string }> = [],
): MappedStatus {
  // Trailers are bounded (HTTP/2 header lists are ~16 KB): hostile ids echoed in a message must not wedge the connection.
  message = clip(message, MAX_MESSAGE_CHARS);
  metadata = Object.fromEntries(Object.entries(metadata).map(([k, v]) => [k, clip(v, MAX_METADATA_CHARS)]));
  violations = violations.map((v) => ({ field: clip(v.field, MAX_METADATA_CHARS), description: clip(v.description, MAX_METADATA_CHARS * 2) }));
  const details = [anyPack(ErrorInfoSchema, create(ErrorInfoSchema, { reason, domain: ERROR_DOMAIN, metadata }))];
  if (violations.length > 0) {
    details.push(anyPack(BadRequestSchema, create(BadRequestSchema, { fieldViolations: violations.map((v) => ({ field: v.field, description: v.description })) })));
  }
  const st = create(StatusSchema, { code, message, details });
  const md = new Metadata();
  md.set(STATUS_DETAILS_KEY, Buffer.from(toBinary(StatusSchema, st)));
  return { code, details: message, metadata: md };
}

/** A mapper for shared/grpc-adapter's addService. */
export function createErrorMapper(options: ErrorMapperOptions = {}): (err: unknown, ctx?: ErrorContext) => MappedStatus {
  const onInternal = options.onInternal ?? logInternalToStderr;
  return (err, ctx) => {
    const ids = idsOf(ctx?.request);
    if (err instanceof BallastError) {
      const code = BY_CODE[err.code];
      if (code !== undefined) {
        const meta = { ...ids };
        if (err instanceof StateFileError) meta.file = err.file;
        const violations = err instanceof InvalidArgumentError ? err.violations : [];
        return buildStatus(code, err.message, reasonOf(err.code), meta, violations);
      }
    } else {
      // A grpc-js error from a downstream call (e.g. a peer coordinator) keeps its code and, if it has one, its reason.
      const g = asGrpcError(err);
      if (g) {
        const peer = decodeStatusDetails(g.metadata);
        const reason = peer?.errorInfo?.reason || statusName(g.code);
        return buildStatus(g.code, `peer: ${cleanGrpcMessage(peer?.status.message || g.details)}`, reason, { ...(peer?.errorInfo?.metadata ?? {}), ...ids });
      }
    }
    // Anything else is a bug or an unforeseen failure: no internals on the wire.
    const incident = randomBytes(4).toString("hex");
    onInternal(incident, err, ctx);
    return buildStatus(status.INTERNAL, `internal error (incident ${incident}); the coordinator's log has the details`, "INTERNAL", { ...ids, incident });
  };
}

/** The coordinator's mapper: maps any thrown value to a status, a message safe to show a caller, and its details. */
export const toGrpcStatus = createErrorMapper();
