/**
 * Error classes of the guest agent. Each names exactly what went wrong so a
 * log line is enough to fix it without a debugger in the guest.
 */
import { BallastError, InvalidArgumentError } from "../shared/errors.js";

/**
 * A kernel text file (procfs/sysfs) is missing, or a field in it is missing
 * or malformed. `file` is the path as read (including any test root) and
 * `field` the key as the kernel spells it, e.g. "MemAvailable".
 */
export class ProcParseError extends BallastError {
  /** The file that was read. */
  readonly file: string;
  /** The field that was missing or malformed; "(file)" when the whole file was. */
  readonly field: string;
  constructor(file: string, field: string, detail: string, options?: { cause?: unknown }) {
    super("proc-parse", `${file}: ${field}: ${detail}`, options);
    this.file = file;
    this.field = field;
  }
}

/** A command-line flag or argument is wrong. The CLI exits with code 2. */
export class UsageError extends InvalidArgumentError {}

/**
 * A guest-side action (dropping caches, reclaiming) failed. Never fatal: the
 * balloon request goes out anyway, the kernel then reclaims on its own.
 */
export class ActionError extends BallastError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("action", message, options);
  }
}
