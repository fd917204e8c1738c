// Bundles each entry point into one ESM file under dist/, with a shebang.
// One file per program keeps the guest image small: node + this bundle.
import { build } from "esbuild";
import { chmodSync } from "node:fs";

const entries = {
  "ballast-agent": "agent/main.ts",
  "ballast-coordinator": "coordinator/main.ts",
  "ballastctl": "coordinator/ctl.ts",
};

const banner = [
  "#!/usr/bin/env node",
  // Bundled CJS dependencies (grpc-js, pino) still call require().
  "import { createRequire as __ballastCreateRequire } from 'node:module';",
  "const require = __ballastCreateRequire(import.meta.url);",
].join("\n");

for (const [name, entry] of Object.entries(entries)) {
  const { existsSync } = await import("node:fs");
  if (!existsSync(entry)) continue;
  const out = `dist/${name}.mjs`;
  await build({
    entryPoints: [entry],
    outfile: out,
    bundle: true,
    platform: "node",
    target: "node20",
    format: "esm",
    banner: { js: banner },
    logLevel: "warning",
    legalComments: "none",
  });
  chmodSync(out, 0o755);
}
