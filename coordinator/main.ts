/**
 * `ballast-coordinator serve --config FILE`: runs one host coordinator until
 * SIGINT/SIGTERM.
 */
import { parseArgs } from "node:util";
import { errorMessage } from "../shared/errors.js";
import { createLogger } from "../shared/logger.js";
import { loadCoordinatorConfig } from "./config.js";
import { startCoordinator } from "./server.js";

const USAGE = `usage: ballast-coordinator serve --config FILE [--log-level LEVEL]

Runs the Ballast host coordinator: QMP to each configured VM, gRPC for
control planes, peers and guest agents. Logs are pino JSON on stdout.`;

async function main(argv: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: { config: { type: "string", short: "c" }, "log-level": { type: "string" }, help: { type: "boolean", short: "h" } },
    });
  } catch (err) {
    process.stderr.write(`${errorMessage(err)}\n${USAGE}\n`);
    return 2;
  }
  const { values, positionals } = parsed;
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  if (positionals[0] !== "serve" || positionals.length !== 1 || !values.config) {
    process.stderr.write(`${USAGE}\n`);
    return 2;
  }
  const logger = createLogger({ name: "ballast-coordinator", level: values["log-level"] });
  let config;
  try {
    config = loadCoordinatorConfig(values.config);
  } catch (err) {
    process.stderr.write(`ballast-coordinator: ${errorMessage(err)}\n`);
    return 2;
  }
  const coordinator = await startCoordinator(config, logger);
  await new Promise<void>((resolve) => {
    const stop = (signal: string) => {
      logger.info({ signal }, "shutting down");
      resolve();
    };
    process.once("SIGINT", () => stop("SIGINT"));
    process.once("SIGTERM", () => stop("SIGTERM"));
  });
  await coordinator.close();
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`ballast-coordinator: ${errorMessage(err)}\n`);
    process.exit(1);
  },
);
