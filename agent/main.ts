/**
 * CLI entry of the guest agent, bundled by scripts/build.mjs into
 * dist/ballast-agent.mjs.
 *
 *   ballast-agent run [flags]      the service loop (see ballast-agent.service)
 *   ballast-agent sample [flags]   one reading + steady/PREPARE decisions as JSON on stdout
 *
 * Exit codes: 0 ok, 1 runtime failure (e.g. unreadable /proc), 2 bad usage or config.
 */
import { isEntryPoint } from "../shared/entry-point.js";
import { BallastError, ConfigError, errorMessage } from "../shared/errors.js";
import { createLogger, type Logger } from "../shared/logger.js";
import { PageCacheReclaimer } from "./act.js";
import { channelConnector, describeChannel } from "./channel.js";
import { USAGE, parseCommand, runtimeOptionsOf, type AgentConfig, type Command } from "./config.js";
import { UsageError } from "./errors.js";
import {
  assessPressure,
  clampTarget,
  estimateMemory,
  prepareDecision,
  prepareReclaimBytes,
  resolveBounds,
} from "./policy.js";
import { Collector } from "./sample.js";
import { AgentSession } from "./session.js";
import { SystemdNotifier } from "./systemd.js";
import { AGENT_VERSION } from "./version.js";

/** Where the CLI writes; injectable so tests call {@link main} directly. */
export interface MainIo {
  stdout: (text: string) => void;
  stderr: (text: string) => void;
  /** Resolves when the process should stop (`run` only). Default: SIGTERM or SIGINT. */
  stopSignal?: Promise<void>;
  /** Logger for `run`. Default: pino JSON on stdout at the configured level. */
  logger?: Logger;
}

const defaultIo: MainIo = {
  stdout: (t) => process.stdout.write(t),
  stderr: (t) => process.stderr.write(t),
};

/** Runs the CLI; resolves to the exit code. */
export async function main(argv: readonly string[], io: MainIo = defaultIo): Promise<number> {
  let command: Command;
  try {
    command = parseCommand(argv);
  } catch (err) {
    if (err instanceof UsageError || err instanceof ConfigError) {
      io.stderr(`ballast-agent: ${err.message}\n${err instanceof UsageError ? "Run 'ballast-agent --help' for usage.\n" : ""}`);
      return 2;
    }
    throw err;
  }
  switch (command.kind) {
    case "help":
      io.stdout(USAGE);
      return 0;
    case "sample":
      return sampleCommand(command, io);
    case "run":
      return runCommand(command.config, io);
  }
}

/** The `sample` report: one reading, the estimate, and both decisions. */
export function sampleReport(command: Extract<Command, { kind: "sample" }>): Record<string, unknown> {
  const { config } = command;
  const collector = new Collector({ procRoot: config.procRoot, sysRoot: config.sysRoot });
  const sample = collector.collect();
  const estimate = estimateMemory(sample, { ramBytes: command.ramBytes ?? 0 }, config.policy);
  const policyBounds: { floorBytes?: number; maxBytes?: number } = {};
  if (command.floorBytes !== undefined) policyBounds.floorBytes = command.floorBytes;
  if (command.maxBytes !== undefined) policyBounds.maxBytes = command.maxBytes;
  const bounds = resolveBounds(policyBounds, estimate.ramBytes, config.policy);
  const pressure = assessPressure(sample, undefined, config.policy);
  // Without a coordinator the balloon's target is unknown: assume what the guest holds now.
  const current = Math.max(0, estimate.ramBytes - estimate.balloonBytes);
  const prepare = prepareDecision(estimate, pressure, current, bounds, config.policy);
  const prepareTarget = prepare.targetBytes ?? current;
  return {
    agentVersion: AGENT_VERSION,
    procRoot: config.procRoot,
    sysRoot: config.sysRoot,
    sample,
    estimate,
    pressure,
    bounds,
    currentTargetBytes: current,
    decisions: {
      steady: { targetBytes: clampTarget(estimate.steadyRawBytes, bounds, config.policy), rawBytes: estimate.steadyRawBytes },
      prepare: {
        targetBytes: prepareTarget,
        rawBytes: estimate.prepareRawBytes,
        reason: prepare.reason,
        detail: prepare.detail,
        reclaimBytes: prepareReclaimBytes(estimate, sample, current, prepareTarget),
      },
    },
  };
}

function sampleCommand(command: Extract<Command, { kind: "sample" }>, io: MainIo): number {
  try {
    io.stdout(`${JSON.stringify(sampleReport(command), null, 2)}\n`);
    return 0;
  } catch (err) {
    if (err instanceof BallastError) {
      io.stderr(`ballast-agent: ${err.message}\n`);
      return 1;
    }
    throw err;
  }
}

function stopOnSignal(): Promise<void> {
  return new Promise((resolve) => {
    process.once("SIGTERM", () => resolve());
    process.once("SIGINT", () => resolve());
  });
}

async function runCommand(config: AgentConfig, io: MainIo): Promise<number> {
  const log = io.logger ?? createLogger({ name: "ballast-agent", level: config.logLevel });
  const collector = new Collector({ procRoot: config.procRoot, sysRoot: config.sysRoot });
  try {
    collector.collect();
  } catch (err) {
    // Keep running: the agent then only reports, never shrinks, until /proc reads cleanly.
    log.warn({ err: errorMessage(err) }, "first sample incomplete");
  }
  const reclaimer = config.dropCaches ? new PageCacheReclaimer({ procRoot: config.procRoot, sysRoot: config.sysRoot }) : null;
  const channel = { kind: config.channel, coordinatorGiven: config.coordinatorGiven, roots: { sysRoot: config.sysRoot }, logger: log };
  const session = new AgentSession({
    coordinator: config.coordinator,
    connect: channelConnector(channel),
    vmId: config.vmId,
    collector,
    reclaimer,
    runtime: runtimeOptionsOf(config),
    logger: log,
  });
  const systemd = new SystemdNotifier({ logger: log });
  log.info(
    { version: AGENT_VERSION, channel: config.channel, uses: describeChannel(channel), coordinator: config.coordinator, vmId: config.vmId, reclaim: reclaimer?.method() ?? "off", systemd: systemd.enabled },
    "ballast-agent starting",
  );
  session.start();
  // Ready means "running", not "attached": the coordinator may be away for a long time and that is normal.
  await systemd.ready(`attaching (${describeChannel(channel)})`);
  const stopWatchdog = systemd.startWatchdog();
  await (io.stopSignal ?? stopOnSignal());
  log.info({}, "stopping");
  await systemd.stopping();
  stopWatchdog();
  await session.stop();
  return 0;
}

if (isEntryPoint(import.meta.url)) {
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (err: unknown) => {
      process.stderr.write(`ballast-agent: ${errorMessage(err)}\n`);
      process.exitCode = 1;
    },
  );
}
