/**
 * The coordinator's config file: which VMs this host manages and where it
 * listens. Parsed strictly with zod (shared/config-schema.ts): unknown keys
 * are rejected and every error names the file and the key path, e.g.
 * `coordinator.json: vms[0].floor: ...`, so a typo never silently becomes a
 * default.
 */
import { readFileSync, statSync } from "node:fs";
import { dirname, isAbsolute, resolve } from "node:path";
import { z } from "zod";
import {
  boolSchema,
  describeValue,
  hostPortSchema,
  hostSchema,
  intInRange,
  nonEmptyString,
  parseConfig,
  renderPath,
  sizeSchema,
  strictObject,
} from "../shared/config-schema.js";
import { ConfigError, errorMessage } from "../shared/errors.js";
import { MiB } from "../shared/units.js";

/** One VM managed by this coordinator. */
export interface VmConfig {
  /** Name used by control planes (MigrateRequest.vm). Unique per host. */
  name: string;
  /** Path of the QEMU QMP unix socket reserved for the coordinator; "" for a libvirt domain. */
  qmpSocket: string;
  /** A libvirt domain instead of a QMP socket (exactly one of the two is set). */
  libvirt?: LibvirtVmConfig;
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
  /**
   * The unix socket of the VM's agent virtio-serial port (QEMU
   * `-chardev socket,path=...,server=on` behind `virtserialport
   * name=org.ballast.agent.0`). The coordinator connects to it and serves
   * this VM's agent there only (coordinator/agent-channel.ts). Absent: no
   * channel (a libvirt VM's channel path comes from its domain XML instead).
   */
  agentSocket?: string;
}

/** A VM managed through libvirt (coordinator/libvirt-driver.ts). */
export interface LibvirtVmConfig {
  /** libvirt connection URI, e.g. `qemu:///system` or `qemu+unix:///system?socket=/run/libvirt/libvirt-sock`. */
  uri: string;
  /** The domain's name. */
  domain: string;
  /** This daemon's URI as other hosts must dial it for a migration here (e.g. `qemu+tcp://host-b/system`). Default: `uri`. */
  peerUri: string;
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
  /**
   * An inflated balloon stays below the VM's max only while its agent keeps
   * talking; after this long without a message from the agent the
   * coordinator deflates by itself. Default 10000 ms, range 1000-600000.
   */
  agentLeaseMs: number;
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

/** Default floor when a VM entry gives none: enough for a small Linux guest. */
export const DEFAULT_FLOOR_BYTES = 256 * MiB;

/** QEMU refuses a balloon target of 0, and no guest survives near it. */
const MIN_FLOOR_BYTES = 16 * MiB;

const VM_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

/** A libvirt URI: driver[+transport]://[host][/path][?query], no whitespace or shell metacharacters. */
const LIBVIRT_URI = /^[a-z][a-z0-9]*(\+[a-z0-9]+)?:\/\/[A-Za-z0-9.@:\[\]_-]*\/[A-Za-z0-9._\/-]*(\?[A-Za-z0-9._\/=&%:-]+)?$/;

const libvirtUriSchema = nonEmptyString.regex(LIBVIRT_URI, {
  error: (issue) => `${JSON.stringify(issue.input)} is not a libvirt URI like "qemu:///system" or "qemu+unix:///system?socket=/run/libvirt/libvirt-sock"`,
});

const libvirtSchema = strictObject({
  uri: libvirtUriSchema,
  domain: nonEmptyString.regex(VM_NAME, { error: (issue) => `${JSON.stringify(issue.input)} must be a domain name of 1-63 [A-Za-z0-9._-], starting with a letter or digit` }),
  peerUri: libvirtUriSchema.optional(),
});

const defaultsSchema = strictObject({
  maxBandwidthBytesPerSec: intInRange(1_000, 1e12).default(125_000_000),
  downtimeLimitMs: intInRange(1, 60_000).default(300),
  prepareDeadlineMs: intInRange(0, 600_000).default(15_000),
  steadyState: boolSchema.default(true),
  sampleIntervalMs: intInRange(100, 60_000).default(1000),
  agentLeaseMs: intInRange(1_000, 600_000).default(10_000),
});

/** Relative paths resolve against the config file's folder. */
function resolveIn(baseDir: string) {
  return (p: string) => (p === "" || isAbsolute(p) ? p : resolve(baseDir, p));
}

function vmSchema(baseDir: string) {
  return strictObject({
    name: nonEmptyString.regex(VM_NAME, { error: (issue) => `${JSON.stringify(issue.input)} must be 1-63 of [A-Za-z0-9._-], starting with a letter or digit` }),
    qmpSocket: nonEmptyString.transform(resolveIn(baseDir)).optional(),
    agentId: nonEmptyString.optional(),
    floor: sizeSchema
      .refine((bytes) => bytes >= MIN_FLOOR_BYTES, { error: (issue) => `${String(issue.input)} bytes is below the 16 MiB minimum` })
      .default(DEFAULT_FLOOR_BYTES),
    max: sizeSchema.default(0),
    agentPort: intInRange(0, 65535).default(0),
    agentSocket: nonEmptyString.transform(resolveIn(baseDir)).optional(),
    libvirt: libvirtSchema.optional(),
  })
    // A transform, not a refinement: zod runs it only once every field is valid.
    .transform((vm, ctx): VmConfig => {
      if (vm.max !== 0 && vm.max < vm.floor) {
        ctx.issues.push({ code: "custom", path: ["max"], message: `${vm.max} bytes is below floor (${vm.floor} bytes); 0 means the VM's RAM size`, input: vm.max });
      }
      // Exactly one hypervisor connection: a QMP socket or a libvirt domain.
      if (vm.qmpSocket === undefined && vm.libvirt === undefined) {
        ctx.issues.push({ code: "custom", path: ["qmpSocket"], message: 'expected a non-empty string, got nothing; or give "libvirt": { "uri": ..., "domain": ... } instead', input: undefined });
      } else if (vm.qmpSocket !== undefined && vm.libvirt !== undefined) {
        ctx.issues.push({ code: "custom", path: ["libvirt"], message: "give either qmpSocket or libvirt, not both", input: vm.libvirt });
      }
      const libvirt = vm.libvirt ? { libvirt: { uri: vm.libvirt.uri, domain: vm.libvirt.domain, peerUri: vm.libvirt.peerUri ?? vm.libvirt.uri } } : {};
      const agentSocket = vm.agentSocket !== undefined ? { agentSocket: vm.agentSocket } : {};
      return { name: vm.name, qmpSocket: vm.qmpSocket ?? "", ...libvirt, agentId: vm.agentId ?? vm.name, floorBytes: vm.floor, maxBytes: vm.max, agentPort: vm.agentPort, ...agentSocket };
    });
}

/** Rejects a second VM with the same value of `key`; the message names the first one. */
function unique(vms: readonly VmConfig[], ctx: z.core.$RefinementCtx, key: keyof VmConfig, configKey: string, what: (v: string) => string, skip?: (v: unknown) => boolean) {
  const first = new Map<unknown, number>();
  vms.forEach((vm, i) => {
    const v = vm[key];
    if (skip?.(v)) return;
    const j = first.get(v);
    if (j === undefined) first.set(v, i);
    else ctx.issues.push({ code: "custom", path: [i, configKey], message: `${what(String(v))} (also ${renderPath(["vms", j, configKey])})`, input: v });
  });
}

function vmsSchema(baseDir: string) {
  return z
    .array(vmSchema(baseDir), { error: (issue) => `expected an array of VM entries, got ${describeValue(issue.input)}` })
    .transform((vms, ctx) => {
      // Runs only when every entry is valid, so the values compared here are the parsed ones.
      unique(vms, ctx, "name", "name", (v) => `duplicate VM name ${JSON.stringify(v)}`);
      unique(vms, ctx, "agentId", "agentId", (v) => `duplicate agent id ${JSON.stringify(v)}`);
      unique(vms, ctx, "agentPort", "agentPort", (v) => `port ${v} is used by another VM`, (v) => v === 0);
      // QEMU serves one QMP client per socket: two entries on one socket would fight over it.
      unique(vms, ctx, "qmpSocket", "qmpSocket", (v) => `QMP socket ${v} is used by another VM`, (v) => v === "");
      // One chardev socket is one VM's port: the port is the agent's identity.
      unique(vms, ctx, "agentSocket", "agentSocket", (v) => `agent socket ${v} is used by another VM`, (v) => v === undefined);
      // One libvirt domain is one VM: two entries for it would fight over its balloon.
      const domains = new Map<string, number>();
      vms.forEach((vm, i) => {
        if (!vm.libvirt) return;
        const key = `${vm.libvirt.domain} on ${vm.libvirt.uri}`;
        const j = domains.get(key);
        if (j === undefined) domains.set(key, i);
        else ctx.issues.push({ code: "custom", path: [i, "libvirt"], message: `libvirt domain ${key} is used by another VM (also ${renderPath(["vms", j, "libvirt"])})`, input: vm.libvirt });
      });
      return vms;
    });
}

/** The whole file's schema; `baseDir` resolves relative paths. */
export function coordinatorConfigSchema(baseDir: string) {
  const path = resolveIn(baseDir);
  return strictObject({
    hostId: nonEmptyString.default("ballast-host"),
    listen: hostPortSchema({ allowPortZero: true }).default("127.0.0.1:50050"),
    agentListen: hostPortSchema({ allowPortZero: true, allowEmpty: true }).default(""),
    // IPv6 is refused: the QEMU URI is built as tcp:HOST:PORT without brackets (coordinator/qmp-driver.ts prepareIncoming).
    incomingHost: hostSchema({ allowIPv6: false }).default("127.0.0.1"),
    stateDir: z.string({ error: (issue) => `expected a directory path, got ${describeValue(issue.input)}` }).default("").transform(path),
    defaults: defaultsSchema.prefault({}),
    vms: vmsSchema(baseDir),
  }).transform(
    (c): CoordinatorConfig => ({
      hostId: c.hostId,
      listen: c.listen,
      agentListen: c.agentListen,
      incomingHost: c.incomingHost,
      stateDir: c.stateDir,
      defaults: c.defaults,
      vms: c.vms,
    }),
  );
}

/**
 * Validates a parsed JSON value as a coordinator config. `where` names the
 * file in messages; `baseDir` resolves relative paths (the config file's
 * folder). Every problem is reported, one line each.
 */
export function parseCoordinatorConfig(value: unknown, where = "config", baseDir = process.cwd()): CoordinatorConfig {
  return parseConfig(coordinatorConfigSchema(baseDir), value, where);
}

/**
 * Checks the config's paths against the file system: a `stateDir` that
 * exists must be a directory; one that does not exist yet (it is created on
 * start) needs an existing parent directory, which catches typos.
 */
export function checkConfigPaths(config: CoordinatorConfig, where: string): void {
  const dir = config.stateDir;
  if (dir === "") return;
  const fail = (message: string, cause?: unknown): never => {
    throw new ConfigError(`${where}: stateDir: ${message}`, { cause });
  };
  const kind = (p: string): "dir" | "other" | "missing" => {
    try {
      return statSync(p).isDirectory() ? "dir" : "other";
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      // ENOTDIR: some folder on the way is a file, so this path does not exist either.
      if (code === "ENOENT" || code === "ENOTDIR") return "missing";
      return fail(`cannot check ${dir}: ${errorMessage(err)}`, err);
    }
  };
  const self = kind(dir);
  if (self === "dir") return;
  if (self === "other") fail(`${dir} exists but is not a directory`);
  const parent = dirname(dir);
  const up = kind(parent);
  if (up === "missing") fail(`${dir} does not exist, and neither does its parent ${parent} (it is created on start, but only inside an existing directory)`);
  if (up === "other") fail(`${dir} cannot be created: its parent ${parent} is not a directory`);
}

/** Reads and validates a config file, then checks its paths; errors name the file. */
export function loadCoordinatorConfig(path: string): CoordinatorConfig {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (err) {
    throw new ConfigError(`cannot read config ${path}: ${errorMessage(err)}`, { cause: err });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new ConfigError(`${path}: not valid JSON: ${errorMessage(err)}`, { cause: err });
  }
  const config = parseCoordinatorConfig(json, path, dirname(resolve(path)));
  checkConfigPaths(config, path);
  return config;
}
