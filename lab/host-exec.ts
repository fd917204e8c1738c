/**
 * Running host commands for the lab's image builder and preflight: finding
 * an executable, running it to completion, and turning a failure into a
 * FailedPreconditionError that names the command and shows its stderr tail.
 */
import { spawn, spawnSync } from "node:child_process";
import { statSync } from "node:fs";
import path from "node:path";
import { FailedPreconditionError } from "../shared/errors.js";
import { MiB } from "../shared/units.js";

/** Options for {@link run}. */
export interface RunOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** Prefix of error messages, naming the operation that ran the command. Default "ensureGuestImage". */
  context?: string;
}

/** Finds an executable in PATH plus the sbin directories a root shell would have. */
export function findCommand(command: string): string | undefined {
  const dirs = [...(process.env.PATH ?? "").split(":"), "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"];
  for (const dir of dirs) {
    if (!dir) continue;
    const candidate = path.join(dir, command);
    try {
      const st = statSync(candidate);
      if (st.isFile() && (st.mode & 0o111) !== 0) return candidate;
    } catch {
      // not here
    }
  }
  return undefined;
}

/** True if this process runs as root. */
export function isRoot(): boolean {
  return typeof process.getuid === "function" && process.getuid() === 0;
}

/** The last `max` characters of a command's output, trimmed. */
export function tail(text: string, max = 2000): string {
  const t = text.trim();
  return t.length > max ? `…${t.slice(-max)}` : t;
}

/** Runs a command to completion; rejects with its stderr tail on failure. */
export function run(command: string, args: string[], opts: RunOptions = {}): Promise<{ stdout: string; stderr: string }> {
  const context = opts.context ?? "ensureGuestImage";
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { cwd: opts.cwd, env: opts.env ?? process.env, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => {
      stdout += d;
      if (stdout.length > 4 * MiB) stdout = stdout.slice(-MiB);
    });
    child.stderr.setEncoding("utf8").on("data", (d: string) => {
      stderr += d;
      if (stderr.length > 4 * MiB) stderr = stderr.slice(-MiB);
    });
    child.once("error", (err) => reject(new FailedPreconditionError(`${context}: cannot run ${command}: ${err.message}`)));
    child.once("close", (code, signal) => {
      if (code === 0) resolve({ stdout, stderr });
      else reject(new FailedPreconditionError(`${context}: ${command} ${args.join(" ")} failed (${signal ?? code}): ${tail(stderr || stdout)}`));
    });
  });
}

/** Runs a command synchronously and returns its stdout; throws with its stderr tail on failure. */
export function runSync(command: string, args: string[], context = "ensureGuestImage"): string {
  const res = spawnSync(command, args, { encoding: "utf8", maxBuffer: 64 * MiB });
  if (res.error) throw new FailedPreconditionError(`${context}: cannot run ${command}: ${res.error.message}`);
  if (res.status !== 0) throw new FailedPreconditionError(`${context}: ${command} ${args.join(" ")} failed (${res.status}): ${tail(res.stderr)}`);
  return res.stdout;
}
