/**
 * Strict parsing of JSON config objects, in the spirit of Firecracker's
 * config: unknown keys are rejected, every error names the path and key.
 * The coordinator's config now uses the zod pieces in config-schema.ts
 * instead; the agent's config still uses these.
 */
import { ConfigError } from "./errors.js";
import { MAX_SIZE_BYTES, parseSize } from "./units.js";

/** A plain object read from JSON. */
export type Json = Record<string, unknown>;

/** Throws if `obj` has keys outside `allowed`; `where` names the object in messages. */
export function rejectUnknownKeys(obj: Json, allowed: readonly string[], where: string): void {
  for (const key of Object.keys(obj)) {
    if (!allowed.includes(key)) {
      throw new ConfigError(`${where}: unknown key "${key}" (allowed: ${allowed.join(", ")})`);
    }
  }
}

/** Asserts `value` is a plain object. */
export function asObject(value: unknown, where: string): Json {
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new ConfigError(`${where}: expected an object, got ${describe(value)}`);
  }
  return value as Json;
}

/** A required non-empty string. */
export function requireString(obj: Json, key: string, where: string): string {
  const v = obj[key];
  if (typeof v !== "string" || v.length === 0) throw new ConfigError(`${where}.${key}: expected a non-empty string, got ${describe(v)}`);
  return v;
}

/** An optional string with a default. */
export function optionalString(obj: Json, key: string, where: string, fallback: string): string {
  if (obj[key] === undefined) return fallback;
  return requireString(obj, key, where);
}

/** An optional integer in [min, max] with a default. */
export function optionalInt(obj: Json, key: string, where: string, fallback: number, min: number, max: number): number {
  const v = obj[key];
  if (v === undefined) return fallback;
  if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max) {
    throw new ConfigError(`${where}.${key}: expected an integer in [${min}, ${max}], got ${describe(v)}`);
  }
  return v;
}

/** An optional boolean with a default. */
export function optionalBool(obj: Json, key: string, where: string, fallback: boolean): boolean {
  const v = obj[key];
  if (v === undefined) return fallback;
  if (typeof v !== "boolean") throw new ConfigError(`${where}.${key}: expected true or false, got ${describe(v)}`);
  return v;
}

/** A size given as bytes (integer) or a string like "512MiB". Required unless `fallback` is given. */
export function sizeField(obj: Json, key: string, where: string, fallback?: number): number {
  const v = obj[key];
  if (v === undefined) {
    if (fallback === undefined) throw new ConfigError(`${where}.${key}: required size is missing`);
    return fallback;
  }
  if (typeof v === "number" && Number.isInteger(v) && v >= 0) {
    if (v > MAX_SIZE_BYTES) throw new ConfigError(`${where}.${key}: ${v} bytes is above the 1 PiB limit (${MAX_SIZE_BYTES} bytes)`);
    return v;
  }
  if (typeof v === "string") {
    try {
      return parseSize(v);
    } catch (err) {
      throw new ConfigError(`${where}.${key}: ${(err as Error).message}`);
    }
  }
  throw new ConfigError(`${where}.${key}: expected bytes or a size string like "512MiB", got ${describe(v)}`);
}

function describe(v: unknown): string {
  if (v === undefined) return "nothing";
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  let text: string | undefined;
  try {
    text = JSON.stringify(v)?.slice(0, 40);
  } catch {
    // Too deep (or cyclic) to print: the type is enough.
    text = "(too deeply nested to show)";
  }
  return `${typeof v} ${text}`;
}
