/**
 * Tells whether a module is the program node was started with, so a file
 * can be both imported (for its exports) and run (as a CLI) without side
 * effects on import.
 */
import { realpathSync } from "node:fs";
import { fileURLToPath } from "node:url";

/** True when `importMetaUrl` (pass `import.meta.url`) is the script in process.argv[1]. */
export function isEntryPoint(importMetaUrl: string): boolean {
  const script = process.argv[1];
  if (!script) return false;
  try {
    return realpathSync(script) === realpathSync(fileURLToPath(importMetaUrl));
  } catch {
    return false;
  }
}
