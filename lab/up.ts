/**
 * `npm run lab`: brings the two-host lab up and keeps it up for a person to
 * drive with ballastctl. The guest runs on one host; the other host always
 * has an incoming QEMU waiting, so any number of migrations can be made by
 * hand, in either direction. Ctrl-C stops everything the lab started.
 */
import { parseArgs } from "node:util";
import { Phase } from "../gen/ballast/v1/common_pb.js";
import { errorMessage } from "../shared/errors.js";
import { Lab, type HostName } from "./lab.js";
import { ensureHostPackages } from "./preflight.js";

const USAGE = `usage: npm run lab -- [--steady-state] [--free-page-reporting] [--mem-mib N]

Boots a real guest with the Ballast agent on "host a" and keeps an incoming
QEMU ready on "host b"; prints the ballastctl commands to migrate it.`;

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      "steady-state": { type: "boolean" },
      "free-page-reporting": { type: "boolean" },
      "mem-mib": { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    return;
  }
  const memMiB = Number(values["mem-mib"] ?? 1024);
  if (!Number.isInteger(memMiB) || memMiB < 256) throw new Error(`--mem-mib: expected an integer ≥ 256, got ${values["mem-mib"]}`);
  const onProgress = (s: string) => process.stdout.write(`• ${s}\n`);
  await ensureHostPackages({ onProgress });
  const lab = await Lab.start({
    memMiB,
    steadyState: values["steady-state"] === true,
    freePageReporting: values["free-page-reporting"] === true,
    onProgress,
  });
  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    process.stdout.write("\n• stopping the lab\n");
    await lab.stop();
    process.exit(0);
  };
  process.on("SIGINT", () => void stop());
  process.on("SIGTERM", () => void stop());

  const show = async () => {
    await lab.startIncoming();
    const a = lab.hosts[lab.active].coordinator.address;
    const b = lab.hosts[lab.other].coordinator.address;
    process.stdout.write(
      [
        "",
        `guest "vm1" runs on host ${lab.active} (coordinator ${a}); host ${lab.other} (coordinator ${b}) has an incoming QEMU ready.`,
        "try:",
        `  node dist/ballastctl.mjs --server ${a} vm vm1`,
        `  node dist/ballastctl.mjs --server ${a} migrate vm1 --to ${b}`,
        `  node dist/ballastctl.mjs --server ${a} migrate vm1 --to ${b} --mode postcopy`,
        "Ctrl-C stops the lab.",
        "",
      ].join("\n"),
    );
  };
  await show();
  // Follow migrations made by anyone: when the guest's source QEMU is left
  // in postmigrate, the guest lives on the other host now.
  let shownFor: HostName = lab.active;
  for (;;) {
    await new Promise((r) => setTimeout(r, 1000));
    if (stopping) return;
    try {
      const vm = await lab.vm(lab.active);
      if (vm.runState === "postmigrate") {
        const list = await lab.hosts[lab.active].migrations.listMigrations({ vm: "vm1" });
        const last = list.migrations[0];
        process.stdout.write(`• migration ${last?.id ?? "?"} ${last ? Phase[last.phase] : ""}: following the guest to host ${lab.other}\n`);
        await lab.followGuest();
      }
      if (lab.active !== shownFor || !(await lab.incomingReady())) {
        shownFor = lab.active;
        await show();
      }
    } catch (err) {
      process.stderr.write(`lab: ${errorMessage(err)}\n`);
    }
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`lab failed: ${errorMessage(err)}\n`);
  process.exit(1);
});
