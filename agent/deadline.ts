/**
 * Bounded waiting for the agent: one helper instead of hand-written
 * `Promise.race` + `setTimeout` pairs. The delay is shared/retry.ts `sleep`
 * (node:timers/promises), cancelled as soon as the work settles, so a bounded
 * wait leaves no timer behind.
 */
import { sleep } from "../shared/retry.js";
import { ActionError } from "./errors.js";

/** The work did not settle within its deadline. */
export class DeadlineError extends ActionError {
  constructor(
    readonly what: string,
    readonly ms: number,
  ) {
    super(`${what} did not finish within ${Math.round(ms)} ms`);
  }
}

/**
 * Settles like `work`, or rejects with {@link DeadlineError} after `ms`.
 * The work itself is not cancelled (a kernel write or a gRPC write cannot
 * be); its owner decides what to do with it, and a late rejection of it is
 * not reported as unhandled.
 */
export async function withDeadline<T>(work: Promise<T>, ms: number, what: string): Promise<T> {
  work.catch(() => undefined);
  if (!(ms > 0)) throw new DeadlineError(what, 0);
  const cancelTimer = new AbortController();
  const expired = sleep(ms, cancelTimer.signal).then(() => {
    throw new DeadlineError(what, ms);
  });
  // Aborted below once the work has settled: that rejection means nothing.
  expired.catch(() => undefined);
  try {
    return await Promise.race([work, expired]);
  } finally {
    cancelTimer.abort();
  }
}
