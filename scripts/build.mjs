// Bundles each entry point into one ESM file under dist/, with a shebang.
// One file per program keeps the guest image small: node + this bundle.
import { build } from "esbuild";
import { chmodSync } from "node:fs";

// The agent runs in a guest that has only node and this one file, so it is
// bundled whole. Host programs keep node_modules external: @grpc/reflection
// and grpc-health-check load .proto files relative to their own folders.
const entries = {
  "ballast-agent": { entry: "agent/main.ts", standalone: true },
  "ballast-coordinator": { entry: "coordinator/main.ts", standalone: false },
  "ballastctl": { entry: "coordinator/ctl.ts", standalone: false },
};

const banner = [
  "#!/usr/bin/env node",
  // Bundled CJS dependencies (grpc-js, pino) still call require().
  "import { createRequire as __ballastCreateRequire } from 'node:module';",
  "const require = __ballastCreateRequire(import.meta.url);",
].join("\n");

const { existsSync } = await import("node:fs");
for (const [name, { entry, standalone }] of Object.entries(entries)) {
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
    packages: standalone ? "bundle" : "external",
    legalComments: "none",
  });
  chmodSync(out, 0o755);
}
