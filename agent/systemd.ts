/**
 * systemd Type=notify readiness and watchdog through the `systemd-notify`
 * CLI, so the bundle needs no native addon. systemd-notify runs as a child
 * process, which is why the unit sets NotifyAccess=all. Outside systemd
 * (no NOTIFY_SOCKET) every call is a no-op.
 */
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import type { Logger } from "../shared/logger.js";
import { silentLogger } from "../shared/logger.js";
import { errorMessage } from "../shared/errors.js";

/** Options for {@link SystemdNotifier}. */
export interface SystemdOptions {
  /** Default process.env. */
  env?: NodeJS.ProcessEnv;
  /** Default process.pid; compared with WATCHDOG_PID. */
  pid?: number;
  /** Runs systemd-notify with these arguments. Default: execFile with a 5 s timeout. */
  exec?: (args: string[]) => Promise<void>;
  logger?: Logger;
}

const execFileAsync = promisify(execFile);

async function runNotify(args: string[]): Promise<void> {
  await execFileAsync("systemd-notify", args, { timeout: 5000 });
}

/** Talks to the service manager, if there is one. */
export class SystemdNotifier {
  /** True when started by systemd with a notify socket. */
  readonly enabled: boolean;
  private readonly env: NodeJS.ProcessEnv;
  private readonly pid: number;
  private readonly exec: (args: string[]) => Promise<void>;
  private readonly log: Logger;

  constructor(options: SystemdOptions = {}) {
    this.env = options.env ?? process.env;
    this.pid = options.pid ?? process.pid;
    this.exec = options.exec ?? runNotify;
    this.log = options.logger ?? silentLogger();
    this.enabled = Boolean(this.env.NOTIFY_SOCKET);
  }

  /**
   * Half of WATCHDOG_USEC in ms (systemd's advice), or undefined when there is
   * no watchdog for this process (unset, malformed, or WATCHDOG_PID is another pid).
   */
  watchdogIntervalMs(): number | undefined {
    if (!this.enabled) return undefined;
    const usec = Number(this.env.WATCHDOG_USEC);
    if (!Number.isFinite(usec) || usec <= 0) return undefined;
    const forPid = this.env.WATCHDOG_PID;
    if (forPid !== undefined && forPid !== "" && Number(forPid) !== this.pid) return undefined;
    return Math.max(1, Math.floor(usec / 2000));
  }

  /** READY=1 with a status line. */
  ready(status = "running"): Promise<void> {
    return this.notify(["--ready", `--status=${status}`]);
  }

  /** STATUS=… shown by `systemctl status`. */
  status(text: string): Promise<void> {
    return this.notify([`--status=${text}`]);
  }

  /** STOPPING=1. */
  stopping(): Promise<void> {
    return this.notify(["STOPPING=1"]);
  }

  /**
   * Sends WATCHDOG=1 every WATCHDOG_USEC/2 while `healthy()` says so; a hung
   * event loop sends nothing and systemd restarts the service. Returns a stop
   * function (a no-op when there is no watchdog).
   */
  startWatchdog(healthy: () => boolean = () => true): () => void {
    const every = this.watchdogIntervalMs();
    if (every === undefined) return () => undefined;
    const timer = setInterval(() => {
      if (healthy()) void this.notify(["WATCHDOG=1"]);
      else this.log.warn({}, "unhealthy: withholding the watchdog ping");
    }, every);
    timer.unref();
    return () => clearInterval(timer);
  }

  private async notify(args: string[]): Promise<void> {
    if (!this.enabled) return;
    try {
      await this.exec(args);
    } catch (err) {
      // A missed notification is not worth dying for; systemd's own timeouts catch real trouble.
      this.log.warn({ err: errorMessage(err), args }, "systemd-notify failed");
    }
  }
}
