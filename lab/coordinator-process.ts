/**
 * Runs the built `ballast-coordinator` as a real child process with a
 * generated config, and the built `ballastctl` as a one-shot command.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";
import type { VmService, Vm } from "../gen/ballast/v1/vm_pb.js";
import { DeadlineError } from "../shared/errors.js";
import type { Client } from "../shared/grpc-adapter.js";

const ROOT = resolve(import.meta.dirname, "..");

/** A running coordinator process. */
export interface CoordinatorProcess {
  /** host:port it serves on (the same after {@link CoordinatorProcess.restart} when the config fixes the port). */
  address: string;
  /** Agent listener addresses by VM name, as the coordinator logged them. */
  agents: Record<string, string>;
  /** Every JSON log line of every run of this process, in order; a restart adds `{ lab: "restart" }` first. */
  logs: Record<string, unknown>[];
  /** The config file it was started with. */
  configFile: string;
  /** PID of the current process (changes on restart). */
  readonly pid: number;
  /** Whether the current process is still running. */
  readonly running: boolean;
  /** SIGTERM, SIGKILL after 5 s. */
  stop(): Promise<void>;
  /** `kill -9` by PID, as a crash would; resolves once it has exited. */
  kill9(): Promise<void>;
  /** Starts it again with the same config file (same ports, same stateDir) and waits until it serves. */
  restart(): Promise<void>;
}

interface Spawned {
  child: ChildProcess;
  exited: Promise<void>;
  serving: Promise<Record<string, unknown>>;
}

function spawnCoordinator(name: string, file: string, logs: Record<string, unknown>[]): Spawned {
  const child: ChildProcess = spawn(process.execPath, [join(ROOT, "dist/ballast-coordinator.mjs"), "serve", "--config", file], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, LOG_LEVEL: "debug" },
  });
  let stderr = "";
  child.stderr?.on("data", (b: Buffer) => (stderr += b.toString()));
  const exited = new Promise<void>((r) => child.on("exit", () => r()));
  const serving = new Promise<Record<string, unknown>>((resolveServing, reject) => {
    const rl = createInterface({ input: child.stdout! });
    rl.on("line", (line) => {
      try {
        const rec = JSON.parse(line) as Record<string, unknown>;
        logs.push(rec);
        if (rec.msg === "coordinator serving") resolveServing(rec);
      } catch {
        logs.push({ raw: line });
      }
    });
    child.on("exit", (code, signal) => reject(new Error(`coordinator ${name} exited with ${code ?? signal}: ${stderr}`)));
  });
  // A rejection after serving (the process ended later) is not an error here.
  serving.catch(() => {});
  return { child, exited, serving };
}

/** Writes `config` to `<dir>/<name>.json`, starts the coordinator and waits until it serves. */
export async function startCoordinatorProcess(dir: string, name: string, config: Record<string, unknown>): Promise<CoordinatorProcess> {
  const file = join(dir, `${name}.json`);
  writeFileSync(file, JSON.stringify(config, null, 2));
  const logs: Record<string, unknown>[] = [];
  let cur = spawnCoordinator(name, file, logs);
  const rec = await cur.serving;
  const proc: CoordinatorProcess = {
    address: String(rec.address),
    agents: (rec.agents ?? {}) as Record<string, string>,
    logs,
    configFile: file,
    get pid() {
      return cur.child.pid ?? 0;
    },
    get running() {
      return cur.child.exitCode === null && cur.child.signalCode === null;
    },
    async stop() {
      const { child, exited } = cur;
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill("SIGTERM");
      const t = setTimeout(() => child.kill("SIGKILL"), 5000);
      await exited;
      clearTimeout(t);
    },
    async kill9() {
      const { child, exited } = cur;
      if (child.exitCode !== null || child.signalCode !== null) return;
      process.kill(child.pid as number, "SIGKILL");
      await exited;
    },
    async restart() {
      if (proc.running) throw new Error(`coordinator ${name} is still running (pid ${proc.pid}); stop or kill9 it first`);
      logs.push({ lab: "restart", at: Date.now() });
      cur = spawnCoordinator(name, file, logs);
      const r = await cur.serving;
      proc.address = String(r.address);
      proc.agents = (r.agents ?? {}) as Record<string, string>;
    },
  };
  return proc;
}

/** Runs `ballastctl` with args; resolves with exit code and output. */
export function runCtl(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolveRun) => {
    const child = spawn(process.execPath, [join(ROOT, "dist/ballastctl.mjs"), ...args], { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (b: Buffer) => (stdout += b.toString()));
    child.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
    child.on("exit", (code) => resolveRun({ code: code ?? -1, stdout, stderr }));
  });
}

/**
 * Polls a coordinator's GetVm until `pred` holds; errors while polling (the
 * coordinator may be between QMP connections) count as "not yet".
 */
export async function waitForVm(vms: Client<typeof VmService>, name: string, pred: (vm: Vm) => boolean, what: string, timeoutMs = 30_000): Promise<Vm> {
  const until = Date.now() + timeoutMs;
  let last: Vm | undefined;
  for (;;) {
    try {
      last = (await vms.getVm({ name }, { deadlineMs: 5000 })).vm;
      if (last && pred(last)) return last;
    } catch {
      // not reachable yet; keep polling
    }
    if (Date.now() > until) throw new DeadlineError(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
