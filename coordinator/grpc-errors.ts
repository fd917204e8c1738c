/**
 * The one place where errors become gRPC status codes. Domain code throws
 * the named classes from shared/errors.ts (or the QMP ones, which extend
 * them); handlers never pick status codes themselves.
 */
import { status } from "@grpc/grpc-js";
import { BallastError, errorMessage } from "../shared/errors.js";

const BY_CODE: Record<string, status> = {
  "invalid-argument": status.INVALID_ARGUMENT,
  config: status.INVALID_ARGUMENT,
  "not-found": status.NOT_FOUND,
  "failed-precondition": status.FAILED_PRECONDITION,
  unavailable: status.UNAVAILABLE,
  "deadline-exceeded": status.DEADLINE_EXCEEDED,
  "permission-denied": status.PERMISSION_DENIED,
  cancelled: status.CANCELLED,
  // QEMU refused a command: the VM is not in a state that allows it.
  "qmp-error": status.FAILED_PRECONDITION,
};

/** Maps any thrown value to a status and a message safe to show a caller. */
export function toGrpcStatus(err: unknown): { code: status; details: string } {
  if (err instanceof BallastError) {
    return { code: BY_CODE[err.code] ?? status.INTERNAL, details: err.message };
  }
  // A grpc-js error from a downstream call (e.g. a peer coordinator) keeps its code.
  if (typeof err === "object" && err !== null && "code" in err && typeof (err as { code: unknown }).code === "number") {
    const code = (err as { code: number }).code;
    if (code > 0 && code <= 16) return { code: code as status, details: `peer: ${(err as { details?: string }).details ?? errorMessage(err)}` };
  }
  return { code: status.INTERNAL, details: `internal error: ${errorMessage(err)}` };
}
