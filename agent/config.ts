/**
 * Agent configuration: built-in defaults, then an optional strict JSON file
 * (unknown keys rejected, Firecracker-style), then command-line flags.
 */
import { existsSync, readFileSync } from "node:fs";
import { hostname } from "node:os";
import { parseArgs } from "node:util";
import { ConfigError, errorMessage } from "../shared/errors.js";
import { asObject, optionalBool, optionalInt, optionalString, rejectUnknownKeys, sizeField, type Json } from "../shared/strict-config.js";
import { parseSize } from "../shared/units.js";
import { CHANNEL_KINDS, type ChannelKind } from "./channel.js";
import { UsageError } from "./errors.js";
import { DEFAULT_POLICY_OPTIONS, type PolicyOptions } from "./policy.js";
import { DEFAULT_RUNTIME_OPTIONS, type RuntimeOptions } from "./runtime.js";

/** Where `run` looks for a config file when `--config` is not given. */
export const DEFAULT_CONFIG_PATH = "/etc/ballast/agent.json";

/** The merged configuration. */
export interface AgentConfig {
  /** Coordinator address, host:port, for the TCP channel. Default "10.0.2.100:50051" (the slirp guestfwd address). */
  coordinator: string;
  /** Whether `coordinator` was set (flag or file): `channel: "auto"` falls back to TCP only then. */
  coordinatorGiven: boolean;
  /** How to reach the coordinator (agent/channel.ts). Default "auto": the virtio-serial port if present, else TCP if a coordinator was given. */
  channel: ChannelKind;
  /** Hello.vm_id. Default: the guest's hostname. */
  vmId: string;
  /** Default "/proc". */
  procRoot: string;
  /** Default "/sys". */
  sysRoot: string;
  /** Default 1000 ms; the coordinator's Policy.sample_interval_ms overrides it when non-zero. */
  sampleIntervalMs: number;
  /** Default 200 ms, used in post-copy. */
  fastSampleIntervalMs: number;
  /** A quiet steady-state guest's samples are reported to the coordinator this often (each is still decided on). Default 5000 ms; 0 reports every sample. */
  reportIntervalMs: number;
  /** Reclaim page cache before PREPARE inflation. Default true. */
  dropCaches: boolean;
  /** pino level. Default "info". */
  logLevel: string;
  /** Policy tuning; `reserve` and `hardFloor` in the file and `--reserve` land here. */
  policy: PolicyOptions;
}

/** The defaults. */
export function defaultConfig(): AgentConfig {
  return {
    coordinator: "10.0.2.100:50051",
    coordinatorGiven: false,
    channel: "auto",
    vmId: hostname(),
    procRoot: "/proc",
    sysRoot: "/sys",
    sampleIntervalMs: DEFAULT_RUNTIME_OPTIONS.sampleIntervalMs,
    fastSampleIntervalMs: DEFAULT_RUNTIME_OPTIONS.fastSampleIntervalMs,
    reportIntervalMs: DEFAULT_RUNTIME_OPTIONS.reportEveryMs,
    dropCaches: DEFAULT_RUNTIME_OPTIONS.dropCaches,
    logLevel: "info",
    policy: { ...DEFAULT_POLICY_OPTIONS },
  };
}

const LOG_LEVELS = ["fatal", "error", "warn", "info", "debug", "trace", "silent"];
const FILE_KEYS = [
  "coordinator",
  "channel",
  "vmId",
  "procRoot",
  "sysRoot",
  "sampleIntervalMs",
  "fastSampleIntervalMs",
  "reportIntervalMs",
  "dropCaches",
  "logLevel",
  "reserve",
  "hardFloor",
  "tuning",
] as const;
const SIZE_TUNING = [
  "maxShrinkStepBytes",
  "minChangeBytes",
  "growStepBytes",
  "lowAvailableBytes",
  "bootReservedBaseBytes",
  "alignBytes",
] as const;
const INT_TUNING = ["shrinkHoldSamples", "refaultRateThreshold", "pressureCooldownMs", "minRateWindowMs"] as const;
const FRACTION_TUNING = ["prepareActiveFileKeep", "bootReservedFraction"] as const;
const PERCENT_TUNING = ["psiSomeThresholdPct"] as const;

/** Settings of the removed zero-free feature: an old file that still has one gets told so, not just "unknown key". */
const REMOVED_ZERO_FREE = "zeroing free memory after the PREPARE inflation was removed from the agent: measured, it saved nothing";
const REMOVED_FILE_KEYS = ["zeroFree"];
const REMOVED_TUNING_KEYS = ["zeroMarginBytes", "zeroMaxBytes", "zeroChunkBytes", "zeroMinBytes"];

function rejectRemovedKeys(obj: Json, removed: readonly string[], where: string): void {
  for (const key of removed) if (Object.hasOwn(obj, key)) throw new ConfigError(`${where}: "${key}" is no longer supported (${REMOVED_ZERO_FREE}); delete the key`);
}

function checkAddress(value: string, where: string): string {
  if (!/^[^\s:]+:\d{1,5}$/.test(value) && !/^\[[0-9a-fA-F:]+\]:\d{1,5}$/.test(value)) {
    throw new ConfigError(`${where}: expected host:port, got ${JSON.stringify(value)}`);
  }
  return value;
}

function checkChannel(value: string, where: string): ChannelKind {
  if (!(CHANNEL_KINDS as readonly string[]).includes(value)) throw new ConfigError(`${where}: expected one of ${CHANNEL_KINDS.join(", ")}, got ${JSON.stringify(value)}`);
  return value as ChannelKind;
}

function checkLevel(value: string, where: string): string {
  if (!LOG_LEVELS.includes(value)) throw new ConfigError(`${where}: expected one of ${LOG_LEVELS.join(", ")}, got ${JSON.stringify(value)}`);
  return value;
}

function fraction(obj: Json, key: string, where: string, fallback: number, max: number): number {
  const v = obj[key];
  if (v === undefined) return fallback;
  if (typeof v !== "number" || !Number.isFinite(v) || v < 0 || v > max) throw new ConfigError(`${where}.${key}: expected a number in [0, ${max}], got ${JSON.stringify(v)}`);
  return v;
}

/**
 * Applies a parsed JSON config object over `base`. Every key is checked;
 * unknown keys (also inside "tuning") are rejected.
 * @param where names the file in error messages
 */
export function applyConfigObject(base: AgentConfig, value: unknown, where: string): AgentConfig {
  const obj = asObject(value, where);
  rejectRemovedKeys(obj, REMOVED_FILE_KEYS, where);
  rejectUnknownKeys(obj, FILE_KEYS, where);
  const policy: PolicyOptions = { ...base.policy };
  policy.reserveBytes = sizeField(obj, "reserve", where, policy.reserveBytes);
  policy.hardFloorBytes = sizeField(obj, "hardFloor", where, policy.hardFloorBytes);
  if (obj.tuning !== undefined) {
    const tw = `${where}.tuning`;
    const t = asObject(obj.tuning, tw);
    rejectRemovedKeys(t, REMOVED_TUNING_KEYS, tw);
    rejectUnknownKeys(t, [...SIZE_TUNING, ...INT_TUNING, ...FRACTION_TUNING, ...PERCENT_TUNING], tw);
    for (const k of SIZE_TUNING) policy[k] = sizeField(t, k, tw, policy[k]);
    for (const k of INT_TUNING) policy[k] = optionalInt(t, k, tw, policy[k], k === "shrinkHoldSamples" ? 1 : 0, 86_400_000);
    for (const k of FRACTION_TUNING) policy[k] = fraction(t, k, tw, policy[k], 1);
    for (const k of PERCENT_TUNING) policy[k] = fraction(t, k, tw, policy[k], 100);
  }
  return {
    coordinator: checkAddress(optionalString(obj, "coordinator", where, base.coordinator), `${where}.coordinator`),
    coordinatorGiven: base.coordinatorGiven || obj.coordinator !== undefined,
    channel: checkChannel(optionalString(obj, "channel", where, base.channel), `${where}.channel`),
    vmId: optionalString(obj, "vmId", where, base.vmId),
    procRoot: optionalString(obj, "procRoot", where, base.procRoot),
    sysRoot: optionalString(obj, "sysRoot", where, base.sysRoot),
    sampleIntervalMs: optionalInt(obj, "sampleIntervalMs", where, base.sampleIntervalMs, 50, 600_000),
    fastSampleIntervalMs: optionalInt(obj, "fastSampleIntervalMs", where, base.fastSampleIntervalMs, 50, 60_000),
    reportIntervalMs: optionalInt(obj, "reportIntervalMs", where, base.reportIntervalMs, 0, 600_000),
    dropCaches: optionalBool(obj, "dropCaches", where, base.dropCaches),
    logLevel: checkLevel(optionalString(obj, "logLevel", where, base.logLevel), `${where}.logLevel`),
    policy,
  };
}

/** Reads and applies a JSON config file. */
export function loadConfigFile(base: AgentConfig, path: string): AgentConfig {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (err) {
    throw new ConfigError(`${path}: cannot read: ${errorMessage(err)}`, { cause: err });
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new ConfigError(`${path}: not valid JSON: ${errorMessage(err)}`, { cause: err });
  }
  return applyConfigObject(base, value, path);
}

/** The runtime options a config implies. */
export function runtimeOptionsOf(config: AgentConfig): RuntimeOptions {
  return {
    ...DEFAULT_RUNTIME_OPTIONS,
    policy: config.policy,
    sampleIntervalMs: config.sampleIntervalMs,
    fastSampleIntervalMs: config.fastSampleIntervalMs,
    reportEveryMs: config.reportIntervalMs,
    dropCaches: config.dropCaches,
  };
}

/** A parsed command line. */
export type Command =
  | { kind: "help" }
  | { kind: "run"; config: AgentConfig }
  | { kind: "sample"; config: AgentConfig; ramBytes?: number; floorBytes?: number; maxBytes?: number };

/** The --help text. */
export const USAGE = `Usage:
  ballast-agent run [flags]       run the agent (as a systemd service)
  ballast-agent sample [flags]    print one reading and the steady/PREPARE decisions as JSON
  ballast-agent --help

Flags:
  --config FILE             JSON config (default ${DEFAULT_CONFIG_PATH} if it exists; unknown keys are rejected)
  --channel KIND            auto|virtio-serial|tcp (default auto: the virtio-serial port
                            org.ballast.agent.0 if the guest has it, else TCP to --coordinator)
  --coordinator HOST:PORT   coordinator address for the TCP channel (default 10.0.2.100:50051)
  --vm-id ID                Hello.vm_id (default: hostname)
  --proc-root DIR           procfs root (default /proc)
  --sys-root DIR            sysfs root (default /sys)
  --sample-interval-ms N    sample interval until the coordinator's Policy sets one (default 1000)
  --reserve SIZE            free headroom above watermark and hot file set (default 128MiB)
  --no-drop-caches          do not reclaim page cache before PREPARE
  --log-level LEVEL         fatal|error|warn|info|debug|trace|silent (default info)
sample only:
  --ram SIZE                RAM size as QEMU sees it (default: estimated from MemTotal)
  --floor SIZE, --max SIZE  the coordinator's Policy bounds to apply
`;

const FLAGS = {
  config: { type: "string" },
  coordinator: { type: "string" },
  channel: { type: "string" },
  "vm-id": { type: "string" },
  "proc-root": { type: "string" },
  "sys-root": { type: "string" },
  "sample-interval-ms": { type: "string" },
  reserve: { type: "string" },
  "no-drop-caches": { type: "boolean" },
  "log-level": { type: "string" },
  ram: { type: "string" },
  floor: { type: "string" },
  max: { type: "string" },
  help: { type: "boolean", short: "h" },
} as const;

function parseFlags(argv: readonly string[]) {
  try {
    return parseArgs({ args: [...argv], options: FLAGS, allowPositionals: true, strict: true });
  } catch (err) {
    // node:util names the offending flag, e.g. "Unknown option '--bogus'".
    if (argv.includes("--zero-free")) throw new UsageError(`--zero-free is no longer supported (${REMOVED_ZERO_FREE}); drop the flag`);
    throw new UsageError(errorMessage(err));
  }
}

function size(flag: string, value: string): number {
  try {
    return parseSize(value);
  } catch (err) {
    throw new UsageError(`--${flag}: ${errorMessage(err)}`);
  }
}

/**
 * Parses argv (without node and script). Throws {@link UsageError} for bad
 * flags and ConfigError for a bad config file; the CLI exits 2 on both.
 * @param fileExists injectable for tests; decides whether the default config file is read
 */
export function parseCommand(argv: readonly string[], fileExists: (path: string) => boolean = existsSync): Command {
  const parsed = parseFlags(argv);
  const { values, positionals } = parsed;
  if (values.help || positionals[0] === "help") return { kind: "help" };
  const verb = positionals[0];
  if (verb === undefined) throw new UsageError("missing command: run or sample (see --help)");
  if (verb !== "run" && verb !== "sample") throw new UsageError(`unknown command ${JSON.stringify(verb)}: expected run or sample`);
  if (positionals.length > 1) throw new UsageError(`unexpected argument ${JSON.stringify(positionals[1])}`);
  if (verb === "run") {
    for (const f of ["ram", "floor", "max"] as const) if (values[f] !== undefined) throw new UsageError(`--${f} is only for "sample"`);
  }

  let config = defaultConfig();
  const file = values.config ?? (verb === "run" && fileExists(DEFAULT_CONFIG_PATH) ? DEFAULT_CONFIG_PATH : undefined);
  if (file !== undefined) config = loadConfigFile(config, file);

  if (values.coordinator !== undefined) {
    try {
      config.coordinator = checkAddress(values.coordinator, "--coordinator");
      config.coordinatorGiven = true;
    } catch (err) {
      throw new UsageError(errorMessage(err));
    }
  }
  if (values.channel !== undefined) {
    try {
      config.channel = checkChannel(values.channel, "--channel");
    } catch (err) {
      throw new UsageError(errorMessage(err));
    }
  }
  if (values["vm-id"] !== undefined) {
    if (values["vm-id"].length === 0) throw new UsageError("--vm-id: must not be empty");
    config.vmId = values["vm-id"];
  }
  if (values["proc-root"] !== undefined) config.procRoot = values["proc-root"];
  if (values["sys-root"] !== undefined) config.sysRoot = values["sys-root"];
  if (values["sample-interval-ms"] !== undefined) {
    const n = Number(values["sample-interval-ms"]);
    if (!Number.isInteger(n) || n < 50 || n > 600_000) throw new UsageError(`--sample-interval-ms: expected an integer in [50, 600000], got ${JSON.stringify(values["sample-interval-ms"])}`);
    config.sampleIntervalMs = n;
  }
  if (values.reserve !== undefined) config.policy = { ...config.policy, reserveBytes: size("reserve", values.reserve) };
  if (values["no-drop-caches"]) config.dropCaches = false;
  if (values["log-level"] !== undefined) {
    if (!LOG_LEVELS.includes(values["log-level"])) throw new UsageError(`--log-level: expected one of ${LOG_LEVELS.join(", ")}`);
    config.logLevel = values["log-level"];
  }
  if (verb === "run") return { kind: "run", config };
  const out: Command = { kind: "sample", config };
  if (values.ram !== undefined) out.ramBytes = size("ram", values.ram);
  if (values.floor !== undefined) out.floorBytes = size("floor", values.floor);
  if (values.max !== undefined) out.maxBytes = size("max", values.max);
  return out;
}
