/**
 * Named error classes shared by the agent and the coordinator. Domain code
 * throws these; only the gRPC boundary (coordinator/grpc-errors.ts) turns them
 * into status codes.
 */

/** Base class: every Ballast error has a stable `code` string for logs and tests. */
export class BallastError extends Error {
  /** Stable machine-readable kind, e.g. "invalid-argument". */
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.code = code;
  }
}

/** One bad field of a request: its proto field name (e.g. "downtime_limit_ms") and why. */
export interface FieldViolation {
  readonly field: string;
  readonly description: string;
}

/**
 * A request or config value is malformed. Maps to INVALID_ARGUMENT; the
 * `violations` become a google.rpc.BadRequest in the status details.
 */
export class InvalidArgumentError extends BallastError {
  /** The request fields at fault, if the error is about a request; empty otherwise. */
  readonly violations: readonly FieldViolation[];
  constructor(message: string, options?: { cause?: unknown; violations?: readonly FieldViolation[] }) {
    super("invalid-argument", message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.violations = options?.violations ?? [];
  }

  /** An error about one request field; the message is also the violation's description. */
  static field(field: string, message: string): InvalidArgumentError {
    return new InvalidArgumentError(message, { violations: [{ field, description: message }] });
  }
}

/** A named thing (VM, migration) does not exist. Maps to NOT_FOUND. */
export class NotFoundError extends BallastError {
  constructor(message: string) {
    super("not-found", message);
  }
}

/** The request conflicts with current state (e.g. a migration already running). Maps to FAILED_PRECONDITION. */
export class FailedPreconditionError extends BallastError {
  constructor(message: string) {
    super("failed-precondition", message);
  }
}

/** A dependency (QMP, a peer coordinator) is unreachable right now. Maps to UNAVAILABLE. */
export class UnavailableError extends BallastError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("unavailable", message, options);
  }
}

/** An operation ran past its deadline. Maps to DEADLINE_EXCEEDED. */
export class DeadlineError extends BallastError {
  constructor(message: string) {
    super("deadline-exceeded", message);
  }
}

/** A config file is malformed; names the file and the offending key. */
export class ConfigError extends BallastError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("config", message, options);
  }
}

/** A state file (e.g. the migration log) cannot be used as it is; names the file and what is wrong. */
export class StateFileError extends BallastError {
  /** The offending path. */
  readonly file: string;
  constructor(file: string, problem: string, options?: { cause?: unknown }) {
    super("state-file", `${file}: ${problem}`, options);
    this.file = file;
  }
}

/** Renders any thrown value as a one-line message. */
export function errorMessage(err: unknown): string {
  if (err instanceof Error) return err.message;
  return String(err);
}

/** A caller claims an identity it does not have (e.g. an agent on another VM's port). Maps to PERMISSION_DENIED. */
export class PermissionDeniedError extends BallastError {
  constructor(message: string) {
    super("permission-denied", message);
  }
}

/** The operation was cancelled by a caller. Maps to CANCELLED. */
export class CancelledError extends BallastError {
  constructor(message: string) {
    super("cancelled", message);
  }
}

/** A caller exceeded a limit (sessions waiting for hello, a message budget). Maps to RESOURCE_EXHAUSTED. */
export class ResourceExhaustedError extends BallastError {
  constructor(message: string) {
    super("resource-exhausted", message);
  }
}
