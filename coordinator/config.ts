/**
 * The coordinator's config file: which VMs this host manages and where it
 * listens. Parsed strictly: unknown keys are rejected and every error names
 * the file and the key, so a typo never silently becomes a default.
 */
import { readFileSync } from "node:fs";
import { isAbsolute, resolve, dirname } from "node:path";
import { ConfigError } from "../shared/errors.js";
import {
  asObject,
  optionalBool,
  optionalInt,
  optionalString,
  rejectUnknownKeys,
  requireString,
  sizeField,
  type Json,
} from "../shared/strict-config.js";
import { MiB } from "../shared/units.js";

/** One VM managed by this coordinator. */
export interface VmConfig {
  /** Name used by control planes (MigrateRequest.vm). Unique per host. */
  name: string;
  /** Path of the QEMU QMP unix socket reserved for the coordinator. */
  qmpSocket: string;
  /** The identity the guest agent announces in Hello.vm_id. Default: `name`. */
  agentId: string;
  /** The balloon is never set below this many bytes. */
  floorBytes: number;
  /** The balloon is never set above this; 0 means the VM's RAM size. */
  maxBytes: number;
  /**
   * Host port on 127.0.0.1 that this VM's guestfwd reaches. When set, the
   * coordinator listens there for this VM's agent only, so the connection
   * itself proves which VM is talking. 0: the agent uses `agentListen`.
   */
  agentPort: number;
}

/** Defaults applied to migrations that do not say otherwise. */
export interface MigrationDefaults {
  /** Default 125000000 (1 Gbit/s). QEMU 7.2's own default is only 32 MiB/s. */
  maxBandwidthBytesPerSec: number;
  /** Default 300 ms. */
  downtimeLimitMs: number;
  /** How long PREPARE may wait for the agent's inflation. Default 15000 ms. */
  prepareDeadlineMs: number;
  /** Whether agents self-balloon outside migrations. Default true. */
  steadyState: boolean;
  /** Agent sampling interval pushed in Policy. Default 1000 ms. */
  sampleIntervalMs: number;
}

/** The whole coordinator config. */
export interface CoordinatorConfig {
  /** Name of this host, sent to agents in Welcome. */
  hostId: string;
  /** host:port for the control-plane and peer gRPC API. Default 127.0.0.1:50050. */
  listen: string;
  /** host:port for agents that have no dedicated agentPort. Empty: none. */
  agentListen: string;
  /** Address the local QEMU listens on for incoming migrations. Default 127.0.0.1. */
  incomingHost: string;
  /** Directory for migration records. Default: none (records live in memory only). */
  stateDir: string;
  defaults: MigrationDefaults;
  vms: VmConfig[];
}

const TOP_KEYS = ["hostId", "listen", "agentListen", "incomingHost", "stateDir", "defaults", "vms"] as const;
const VM_KEYS = ["name", "qmpSocket", "agentId", "floor", "max", "agentPort"] as const;
const DEFAULT_KEYS = ["maxBandwidthBytesPerSec", "downtimeLimitMs", "prepareDeadlineMs", "steadyState", "sampleIntervalMs"] as const;

/** Default floor when a VM entry gives none: enough for a small Linux guest. */
export const DEFAULT_FLOOR_BYTES = 256 * MiB;

const HOST_PORT = /^[A-Za-z0-9.\-_]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$/;

function hostPort(obj: Json, key: string, where: string, fallback: string): string {
  const v = optionalString(obj, key, where, fallback);
  if (v !== "" && !HOST_PORT.test(v)) throw new ConfigError(`${where}.${key}: expected host:port, got ${JSON.stringify(v)}`);
  return v;
}

/**
 * Validates a parsed JSON value as a coordinator config. `baseDir` resolves
 * relative socket paths (the config file's folder).
 */
export function parseCoordinatorConfig(value: unknown, where = "config", baseDir = process.cwd()): CoordinatorConfig {
  const top = asObject(value, where);
  rejectUnknownKeys(top, TOP_KEYS, where);
  const d = top.defaults === undefined ? {} : asObject(top.defaults, `${where}.defaults`);
  rejectUnknownKeys(d, DEFAULT_KEYS, `${where}.defaults`);
  const defaults: MigrationDefaults = {
    maxBandwidthBytesPerSec: optionalInt(d, "maxBandwidthBytesPerSec", `${where}.defaults`, 125_000_000, 1_000, 1e12),
    downtimeLimitMs: optionalInt(d, "downtimeLimitMs", `${where}.defaults`, 300, 1, 60_000),
    prepareDeadlineMs: optionalInt(d, "prepareDeadlineMs", `${where}.defaults`, 15_000, 0, 600_000),
    steadyState: optionalBool(d, "steadyState", `${where}.defaults`, true),
    sampleIntervalMs: optionalInt(d, "sampleIntervalMs", `${where}.defaults`, 1000, 100, 60_000),
  };
  if (!Array.isArray(top.vms)) throw new ConfigError(`${where}.vms: expected an array of VM entries`);
  const names = new Set<string>();
  const agentIds = new Set<string>();
  const ports = new Set<number>();
  const vms = top.vms.map((raw, i): VmConfig => {
    const w = `${where}.vms[${i}]`;
    const o = asObject(raw, w);
    rejectUnknownKeys(o, VM_KEYS, w);
    const name = requireString(o, "name", w);
    if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/.test(name)) throw new ConfigError(`${w}.name: ${JSON.stringify(name)} must be 1-63 of [A-Za-z0-9._-]`);
    if (names.has(name)) throw new ConfigError(`${w}.name: duplicate VM name ${JSON.stringify(name)}`);
    names.add(name);
    const qmp = requireString(o, "qmpSocket", w);
    const agentId = optionalString(o, "agentId", w, name);
    if (agentIds.has(agentId)) throw new ConfigError(`${w}.agentId: duplicate agent id ${JSON.stringify(agentId)}`);
    agentIds.add(agentId);
    const floorBytes = sizeField(o, "floor", w, DEFAULT_FLOOR_BYTES);
    // QEMU refuses a balloon target of 0, and no guest survives near it.
    if (floorBytes < 16 * MiB) throw new ConfigError(`${w}.floor: ${floorBytes} bytes is below the 16 MiB minimum`);
    const maxBytes = sizeField(o, "max", w, 0);
    if (maxBytes !== 0 && maxBytes < floorBytes) throw new ConfigError(`${w}: max (${maxBytes}) is below floor (${floorBytes})`);
    const agentPort = optionalInt(o, "agentPort", w, 0, 0, 65535);
    if (agentPort !== 0) {
      if (ports.has(agentPort)) throw new ConfigError(`${w}.agentPort: port ${agentPort} is used by another VM`);
      ports.add(agentPort);
    }
    return { name, qmpSocket: isAbsolute(qmp) ? qmp : resolve(baseDir, qmp), agentId, floorBytes, maxBytes, agentPort };
  });
  const stateDir = optionalString(top, "stateDir", where, "");
  return {
    hostId: optionalString(top, "hostId", where, "ballast-host"),
    listen: hostPort(top, "listen", where, "127.0.0.1:50050"),
    agentListen: hostPort(top, "agentListen", where, ""),
    incomingHost: optionalString(top, "incomingHost", where, "127.0.0.1"),
    stateDir: stateDir === "" || isAbsolute(stateDir) ? stateDir : resolve(baseDir, stateDir),
    defaults,
    vms,
  };
}

/** Reads and validates a config file; errors name the file. */
export function loadCoordinatorConfig(path: string): CoordinatorConfig {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (err) {
    throw new ConfigError(`cannot read config ${path}: ${(err as Error).message}`, { cause: err });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new ConfigError(`${path}: not valid JSON: ${(err as Error).message}`, { cause: err });
  }
  return parseCoordinatorConfig(json, path, dirname(resolve(path)));
}
