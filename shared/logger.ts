/**
 * pino JSON logging to stdout, shared by every process. One logger per
 * process; components take a child with a `component` field.
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
}

/** Creates the process logger. Synchronous writes, so nothing is lost on exit. */
export function createLogger(options: LoggerOptions): Logger {
  return pino(
    { name: options.name, level: options.level ?? process.env.LOG_LEVEL ?? "info", base: { pid: process.pid } },
    pino.destination({ fd: options.fd ?? 1, sync: true }),
  );
}

/** A logger that drops everything; for tests and library defaults. */
export function silentLogger(): Logger {
  return pino({ level: "silent" });
}
