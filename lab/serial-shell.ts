/**
 * Drives the root shell on a lab guest's serial console (ttyS0, exposed by
 * QEMU as a unix socket chardev). Commands are framed by unique begin/end
 * markers and the exit status comes from `echo $?`, so kernel noise, prompts
 * and leftovers of earlier commands never leak into a result.
 *
 * The socket is ALWAYS drained: if a connected client stops reading, the
 * guest UART blocks after a few hundred bytes and the whole guest looks hung.
 *
 * The shell lives in the guest, so it survives live migration: after a
 * migration, connect a new GuestShell to the destination's serial socket and
 * carry on (shell variables, cwd and background jobs are all still there).
 */
import { createConnection, type Socket } from "node:net";
import { DeadlineError, UnavailableError } from "../shared/errors.js";
import { silentLogger, type Logger } from "../shared/logger.js";
import { sleep } from "../shared/retry.js";

/** Result of one shell command. */
export interface ShellResult {
  /** Everything the command printed (stdout and stderr), with \r\n turned into \n. */
  output: string;
  /** The command's exit status as reported by `$?`. */
  exitCode: number;
}

// Longer lines risk the tty's 4095-byte canonical line limit.
const MAX_COMMAND_BYTES = 3000;
// Keep this much of the drained output when nothing is waiting for it.
const KEEP_BYTES = 64 * 1024;

let counter = 0;

function uniqueId(): string {
  counter = (counter + 1) % 1_000_000;
  return `${process.pid.toString(36)}${Date.now().toString(36)}${counter.toString(36)}`;
}

/** Quotes a string for a POSIX shell single-quoted context. */
export function shQuote(text: string): string {
  return `'${text.replace(/'/g, `'\\''`)}'`;
}

/** A connection to a guest's serial shell. */
export class GuestShell {
  private buf = "";
  /** Absolute stream offset of buf[0], so waiters survive trimming. */
  private base = 0;
  private readonly waiters = new Set<() => void>();
  private queue: Promise<unknown> = Promise.resolve();
  private busy = 0;
  private closedErr: Error | undefined;

  private constructor(
    private readonly socket: Socket,
    private readonly log: Logger,
  ) {
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => {
      this.buf += chunk;
      if (this.busy === 0 && this.buf.length > 16 * KEEP_BYTES) this.trim();
      for (const w of [...this.waiters]) w();
    });
    socket.on("error", (err) => this.onClosed(new UnavailableError(`serial socket error: ${err.message}`, { cause: err })));
    socket.on("close", () => this.onClosed(new UnavailableError("serial socket closed")));
  }

  /**
   * Connects to a serial unix socket, retrying until `timeoutMs` (QEMU may
   * still be creating it). Does not wait for the guest: use {@link ready}.
   */
  static async connect(serialPath: string, options: { timeoutMs?: number; logger?: Logger } = {}): Promise<GuestShell> {
    const log = (options.logger ?? silentLogger()).child({ component: "guest-shell", serialPath });
    const deadline = Date.now() + (options.timeoutMs ?? 10_000);
    let lastErr: unknown;
    while (Date.now() < deadline) {
      try {
        const socket = await new Promise<Socket>((resolve, reject) => {
          const s = createConnection(serialPath);
          s.once("connect", () => {
            s.removeListener("error", reject);
            resolve(s);
          });
          s.once("error", reject);
        });
        return new GuestShell(socket, log);
      } catch (err) {
        lastErr = err;
        await sleep(100);
      }
    }
    throw new UnavailableError(`GuestShell: cannot connect to ${serialPath}: ${(lastErr as Error | undefined)?.message ?? "timeout"}`);
  }

  /**
   * Waits until the guest shell answers (boot can take several seconds under
   * TCG), then turns off tty echo so commands are not copied back. Probes
   * are re-sent periodically because input sent before the shell opened the
   * tty is dropped.
   */
  async ready(timeoutMs = 60_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    const id = uniqueId();
    const marker = `__BLST_R_${id}__`;
    const probe = `\necho "__BLST_""R_${id}__"\n`;
    const from = this.base + this.buf.length;
    this.busy++;
    try {
      while (true) {
        this.write(probe);
        const left = deadline - Date.now();
        if (left <= 0) throw new DeadlineError(`GuestShell: guest shell did not answer in ${timeoutMs} ms; last output: ${this.tail()}`);
        const hit = await this.waitFor(() => this.indexFrom(marker, from) >= 0, Math.min(2_000, left));
        if (hit) break;
      }
    } finally {
      this.busy--;
    }
    // Echo off: keeps the UART quiet and the output free of our own input.
    await this.run("stty -echo 2>/dev/null; true", { timeoutMs: Math.max(5_000, deadline - Date.now()) });
    this.log.debug("guest shell ready");
  }

  /** Alias of {@link ready}. */
  waitForPrompt(timeoutMs = 60_000): Promise<void> {
    return this.ready(timeoutMs);
  }

  /**
   * Runs one command line in the guest shell (in the shell itself, via eval,
   * so `cd`, variables and `&` jobs persist) with stdin from /dev/null.
   * Commands are serialized. On timeout a ^C is sent to the guest and the
   * promise rejects with DeadlineError.
   */
  run(cmd: string, opts: { timeoutMs?: number } = {}): Promise<ShellResult> {
    const next = this.queue.then(
      () => this.runNow(cmd, opts.timeoutMs ?? 30_000),
      () => this.runNow(cmd, opts.timeoutMs ?? 30_000),
    );
    this.queue = next.catch(() => undefined);
    return next;
  }

  /** Returns a guest file's text (e.g. /proc/meminfo); rejects if cat fails. */
  async readFile(guestPath: string, opts: { timeoutMs?: number } = {}): Promise<string> {
    const res = await this.run(`cat ${shQuote(guestPath)}`, { timeoutMs: opts.timeoutMs ?? 60_000 });
    if (res.exitCode !== 0) throw new Error(`GuestShell: cat ${guestPath} failed (${res.exitCode}): ${res.output.trim()}`);
    return res.output;
  }

  /** Closes the connection (the guest shell keeps running). */
  close(): void {
    this.socket.destroy();
    this.onClosed(new UnavailableError("GuestShell closed"));
  }

  private async runNow(cmd: string, timeoutMs: number): Promise<ShellResult> {
    if (this.closedErr) throw this.closedErr;
    if (/[\r\n]/.test(cmd)) throw new Error("GuestShell.run: the command must be a single line");
    if (Buffer.byteLength(cmd) > MAX_COMMAND_BYTES) throw new Error(`GuestShell.run: command longer than ${MAX_COMMAND_BYTES} bytes`);
    const id = uniqueId();
    const begin = `__BLST_B_${id}__`;
    const endMarker = `__BLST_E_${id}__ `;
    const end = new RegExp(`^__BLST_E_${id}__ (\\d+)\\r?\\n`);
    // The quotes split the markers in the typed text, so even an echoed
    // command line can never be mistaken for the command's output.
    const line = `echo "__BLST_""B_${id}__"; eval ${shQuote(cmd)} </dev/null; echo "__BLST_""E_${id}__ $?"\n`;
    const from = this.base + this.buf.length;
    this.busy++;
    try {
      this.write(line);
      let result: ShellResult | undefined;
      const parse = (): boolean => {
        const b = this.indexFrom(begin, from);
        if (b < 0) return false;
        let start = b + begin.length;
        if (this.buf[start] === "\r") start++;
        if (this.buf[start] === "\n") start++;
        // indexOf first: cheap even when a command prints megabytes.
        const e = this.buf.indexOf(endMarker, start);
        if (e < 0) return false;
        const m = end.exec(this.buf.slice(e, e + endMarker.length + 16));
        if (!m) return false;
        result = { output: this.buf.slice(start, e).replace(/\r\n/g, "\n").replace(/\r/g, ""), exitCode: Number(m[1]) };
        return true;
      };
      const ok = await this.waitFor(parse, timeoutMs);
      if (!ok || !result) {
        if (this.closedErr) throw this.closedErr;
        this.write("\x03");
        throw new DeadlineError(`GuestShell: "${cmd.slice(0, 120)}" did not finish in ${timeoutMs} ms; last output: ${this.tail()}`);
      }
      return result;
    } finally {
      this.busy--;
    }
  }

  private indexFrom(needle: string, absFrom: number): number {
    return this.buf.indexOf(needle, Math.max(0, absFrom - this.base));
  }

  /** Resolves true once `check()` holds, false on timeout; rejects if the socket closes. */
  private waitFor(check: () => boolean, timeoutMs: number): Promise<boolean> {
    if (check()) return Promise.resolve(true);
    if (this.closedErr) return Promise.reject(this.closedErr);
    return new Promise((resolve, reject) => {
      const waiter = () => {
        if (this.closedErr) {
          done();
          reject(this.closedErr);
        } else if (check()) {
          done();
          resolve(true);
        }
      };
      const timer = setTimeout(() => {
        done();
        resolve(false);
      }, timeoutMs);
      const done = () => {
        clearTimeout(timer);
        this.waiters.delete(waiter);
      };
      this.waiters.add(waiter);
    });
  }

  private write(text: string): void {
    if (!this.closedErr) this.socket.write(text);
  }

  private trim(): void {
    const drop = this.buf.length - KEEP_BYTES;
    if (drop <= 0) return;
    this.buf = this.buf.slice(drop);
    this.base += drop;
  }

  private tail(): string {
    return JSON.stringify(this.buf.slice(-400));
  }

  private onClosed(err: Error): void {
    if (this.closedErr) return;
    this.closedErr = err;
    for (const w of [...this.waiters]) w();
  }
}
