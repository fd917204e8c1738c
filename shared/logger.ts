/**
 * pino JSON logging to stdout, shared by every process. One logger per
 * process; components take a child with a `component` field.
 *
 * Secrets never reach the log: values under the keys in {@link REDACT_PATHS}
 * are replaced by "[redacted]" wherever a caller logs them.
 */
import { pino, type Logger } from "pino";

export type { Logger };

/** Options for {@link createLogger}. */
export interface LoggerOptions {
  /** Process name recorded in every line. */
  name: string;
  /** Default: the LOG_LEVEL environment variable, else "info". */
  level?: string;
  /** Write to this fd instead of stdout (1). CLIs that print results use 2. */
  fd?: number;
  /**
   * Never block the process on a log write (default false: synchronous
   * writes, so nothing is lost on exit). For the guest agent: when its
   * stdout pipe stops draining (journald stalled under memory pressure), a
   * synchronous writer would freeze it; this one buffers up to 1 MiB and
   * drops lines beyond that.
   */
  neverBlock?: boolean;
}

/** Keys whose values are secrets, at the top level and one level down. */
export const REDACT_PATHS = [
  "token",
  "key",
  "password",
  "secret",
  "authorization",
  "*.token",
  "*.key",
  "*.password",
  "*.secret",
  "*.authorization",
  "*.privateKey",
  "headers.authorization",
];

/** Creates the process logger. */
export function createLogger(options: LoggerOptions): Logger {
  const destination = options.neverBlock
    ? pino.destination({ fd: options.fd ?? 1, sync: false, maxLength: 1024 * 1024, minLength: 0 })
    : pino.destination({ fd: options.fd ?? 1, sync: true });
  return pino(
    {
      name: options.name,
      level: options.level ?? process.env.LOG_LEVEL ?? "info",
      base: { pid: process.pid },
      redact: { paths: REDACT_PATHS, censor: "[redacted]" },
    },
    destination,
  );
}

/** A logger that drops everything; for tests and library defaults. */
export function silentLogger(): Logger {
  return pino({ level: "silent" });
}
