/**
 * Reusable zod 4 pieces for Ballast's JSON config files, and the one place
 * that turns a ZodError into a {@link ConfigError} users can act on: one line
 * per issue, each naming the file and the key path, e.g.
 *
 *     coordinator.json: vms[0].floor: 1e+300 bytes is above the 1 PiB limit (1125899906842624 bytes)
 *     coordinator.json: vms[1].flor: unknown key (allowed here: name, qmpSocket, agentId, floor, max, agentPort)
 *
 * Objects are built with {@link strictObject} so unknown keys are errors and
 * a typo never silently becomes a default.
 */
import { z } from "zod";
import { ConfigError } from "./errors.js";
import { MAX_SIZE_BYTES, parseSize } from "./units.js";

/** A short description of a JSON value for messages: `number 5`, `string "x"`, `an array`, `nothing`. */
export function describeValue(v: unknown): string {
  if (v === undefined) return "nothing";
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  if (typeof v === "object") return "an object";
  if (typeof v === "number") return `number ${String(v)}`;
  return `${typeof v} ${JSON.stringify(v)?.slice(0, 40) ?? String(v)}`;
}

const IDENT = /^[A-Za-z_$][A-Za-z0-9_$]*$/;

/** Renders a zod issue path as `a.b[0].c`; keys that are not identifiers are quoted: `a["x y"]`. */
export function renderPath(path: readonly PropertyKey[]): string {
  let out = "";
  for (const key of path) {
    if (typeof key === "number") out += `[${key}]`;
    else if (typeof key === "string" && IDENT.test(key)) out += out === "" ? key : `.${key}`;
    else out += `[${typeof key === "string" ? JSON.stringify(key) : String(key)}]`;
  }
  return out;
}

/**
 * One line per issue: `FILE: PATH: message` (`FILE: message` for the top
 * level). An unknown-keys issue becomes one line per unknown key, with the
 * key in the path.
 */
export function formatZodError(error: z.ZodError, file: string): string {
  const lines: string[] = [];
  const line = (path: readonly PropertyKey[], message: string) => {
    const p = renderPath(path);
    lines.push(p === "" ? `${file}: ${message}` : `${file}: ${p}: ${message}`);
  };
  for (const issue of error.issues) {
    if (issue.code === "unrecognized_keys") {
      for (const key of issue.keys) line([...issue.path, key], issue.message);
    } else {
      line(issue.path, issue.message);
    }
  }
  return lines.join("\n");
}

const TYPE_WORDS: Record<string, string> = {
  string: "a string",
  number: "a number",
  int: "an integer",
  boolean: "true or false",
  object: "an object",
  array: "an array",
};

/**
 * The error map used for every config parse: messages in the words of the
 * old hand-written parser ("expected true or false, got string "yes""). Any
 * schema-level `error` set below takes precedence.
 */
export const configErrorMap: z.core.$ZodErrorMap = (issue) => {
  switch (issue.code) {
    case "invalid_type":
      return `expected ${TYPE_WORDS[issue.expected] ?? issue.expected}, got ${describeValue(issue.input)}`;
    case "unrecognized_keys":
      return "unknown key";
    default:
      return undefined;
  }
};

/**
 * Parses `value` with `schema`; on failure throws a ConfigError whose
 * message is {@link formatZodError}'s, so every line names `file`.
 */
export function parseConfig<S extends z.ZodType>(schema: S, value: unknown, file: string): z.output<S> {
  const result = schema.safeParse(value, { error: configErrorMap });
  if (!result.success) throw new ConfigError(formatZodError(result.error, file), { cause: result.error });
  return result.data;
}

/**
 * `z.strictObject` whose unknown-key message lists the keys allowed there:
 * `unknown key (allowed here: a, b, c)`.
 */
export function strictObject<T extends z.core.$ZodLooseShape>(shape: T) {
  const allowed = Object.keys(shape).join(", ");
  return z.strictObject(shape, {
    error: (issue) => (issue.code === "unrecognized_keys" ? `unknown key (allowed here: ${allowed})` : undefined),
  });
}

/** A non-empty string. */
export const nonEmptyString = z
  .string({ error: (issue) => `expected a non-empty string, got ${describeValue(issue.input)}` })
  .min(1, { error: "expected a non-empty string, got an empty one" });

/** true or false. */
export const boolSchema = z.boolean({ error: (issue) => `expected true or false, got ${describeValue(issue.input)}` });

/** An integer in [min, max] (both inclusive), reported as one issue whatever is wrong with it. */
export function intInRange(min: number, max: number) {
  const message = (input: unknown) => `expected an integer in [${min}, ${max}], got ${describeValue(input)}`;
  return z
    .number({ error: (issue) => message(issue.input) })
    .refine((v) => Number.isSafeInteger(v) && v >= min && v <= max, { error: (issue) => message(issue.input) });
}

/**
 * A size in bytes: a JSON integer or a string for {@link parseSize}
 * ("512MiB", "1.5GiB", "125MB"). At most 1 PiB, a whole number of bytes;
 * output is a safe integer.
 */
export const sizeSchema = z
  .union([z.number(), z.string()], {
    error: (issue) => `expected bytes or a size string like "512MiB", got ${describeValue(issue.input)}`,
  })
  .transform((v, ctx): number => {
    let problem: string | undefined;
    let bytes = 0;
    if (typeof v === "number") {
      if (!Number.isFinite(v) || !Number.isInteger(v)) problem = `${v} is not a whole number of bytes`;
      else if (v < 0) problem = `a size cannot be negative, got ${v}`;
      else if (v > MAX_SIZE_BYTES) problem = `${v} bytes is above the 1 PiB limit (${MAX_SIZE_BYTES} bytes)`;
      else bytes = v;
    } else {
      try {
        bytes = parseSize(v);
      } catch (err) {
        problem = (err as Error).message;
      }
    }
    if (problem !== undefined) {
      ctx.issues.push({ code: "custom", message: problem, input: v });
      return z.NEVER;
    }
    return bytes;
  });

/** A TCP port, 1-65535. */
export const portSchema = intInRange(1, 65535);

const IPV4 = /^(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)$/;
/** RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens, 1-63 each, 253 in all. */
const HOSTNAME = /^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;

/** Whether `text` is an IPv4 literal (dotted quad, no leading zeros). */
export function isIPv4(text: string): boolean {
  return IPV4.test(text);
}

/** Whether `text` is an IPv6 literal without brackets (zod's check; no zone ids). */
export function isIPv6(text: string): boolean {
  return z.ipv6().safeParse(text).success;
}

/** Whether `text` is an RFC 1123 host name. All-numeric dotted names must be valid IPv4 instead. */
export function isHostname(text: string): boolean {
  return HOSTNAME.test(text) && !/^[\d.]+$/.test(text);
}

function hostProblem(host: string, allowIPv6: boolean): string | undefined {
  if (isIPv4(host) || isHostname(host)) return undefined;
  if (isIPv6(host)) return allowIPv6 ? undefined : `IPv6 literal ${JSON.stringify(host)} is not supported here; use a host name or an IPv4 address`;
  return `expected a host name or an IP address, got ${describeValue(host)}`;
}

/**
 * A host name (RFC 1123) or an IP literal (IPv4; IPv6 without brackets
 * unless `allowIPv6` is false). Rejects anything else, e.g. `"not a host; rm -rf"`.
 */
export function hostSchema(options: { allowIPv6?: boolean } = {}) {
  const allowIPv6 = options.allowIPv6 ?? true;
  return z
    .string({ error: (issue) => `expected a host name or an IP address, got ${describeValue(issue.input)}` })
    .superRefine((host, ctx) => {
      const problem = hostProblem(host, allowIPv6);
      if (problem !== undefined) ctx.addIssue({ code: "custom", message: problem, input: host });
    });
}

/**
 * `host:port` with a {@link hostSchema} host (IPv6 in brackets:
 * `[::1]:50050`) and a port in 1-65535, or 0 ("pick a free port") when
 * `allowPortZero` is set; `""` too when `allowEmpty` is set (meaning "none").
 * Output is the string unchanged.
 */
export function hostPortSchema(options: { allowPortZero?: boolean; allowEmpty?: boolean } = {}) {
  const minPort = options.allowPortZero ? 0 : 1;
  const portRange = options.allowPortZero ? "0 (pick a free port) or 1-65535" : "1-65535";
  const expected = (input: unknown) => `expected host:port like 127.0.0.1:50050${options.allowEmpty ? ' or "" (none)' : ""}, got ${describeValue(input)}`;
  return z.string({ error: (issue) => expected(issue.input) }).superRefine((text, ctx) => {
    if (text === "" && options.allowEmpty) return;
    const fail = (message: string) => ctx.addIssue({ code: "custom", message, input: text });
    const m = /^\[([^\]]*)\]:([^:]*)$/.exec(text) ?? /^([^:[\]]*):([^:]*)$/.exec(text);
    if (!m) {
      fail(isIPv6(text.replace(/:[^:]*$/, "")) ? `${expected(text)} (write IPv6 addresses in brackets: [::1]:50050)` : expected(text));
      return;
    }
    const [, host = "", portText = ""] = m;
    const bracketed = text.startsWith("[");
    if (bracketed && !isIPv6(host)) return fail(`expected an IPv6 address in brackets, got ${JSON.stringify(`[${host}]`)}`);
    if (!bracketed) {
      const problem = hostProblem(host, true);
      if (problem !== undefined) return fail(`${problem} (in ${JSON.stringify(text)})`);
    }
    const port = /^\d{1,6}$/.test(portText) ? Number(portText) : NaN;
    if (!(port >= minPort && port <= 65535)) fail(`expected a port in ${portRange}, got ${JSON.stringify(portText)} (in ${JSON.stringify(text)})`);
  });
}
