#!/usr/bin/env node
// Ballast lab workload: runs INSIDE the guest (plain Node, no dependencies).
// Each mode produces one kind of memory state that ballooning should (or
// should not) be able to reclaim before a migration:
//
//   freed-anon --mib N                      write N MiB of anon memory, free it, exit
//   cache-read --mib N [--file PATH]        read N MiB through the page cache, exit
//                                           (default file: /data/blob on the data disk)
//   hot-writer --mib N --rate-mib R [--seconds S] [--progress FILE]
//                                           hold N MiB and rewrite it at R MiB/s
//   burst --mib N [--after-file FILE | --delay-ms MS] [--hold-ms MS]
//                                           wait, then allocate and touch N MiB, hold, exit
//
// Memory lives in Buffers (off the V8 heap) so sizes are not limited by
// --max-old-space-size, and is filled with non-zero bytes because QEMU sends
// zero pages almost for free; only dirty non-zero pages cost migration bytes.
import { appendFileSync, closeSync, existsSync, openSync, readSync, writeFileSync } from "node:fs";

const MiB = 1024 * 1024;
// Allocation unit. Above glibc's maximum mmap threshold (32 MiB), so every
// chunk is its own mmap and really returns to the kernel when freed.
const CHUNK = 64 * MiB;

function usage(message) {
  process.stderr.write(`workload: ${message}\n` +
    "usage: workload.mjs freed-anon --mib N\n" +
    "       workload.mjs cache-read --mib N [--file PATH]   (default --file /data/blob)\n" +
    "       workload.mjs hot-writer --mib N --rate-mib R [--seconds S] [--progress FILE]\n" +
    "       workload.mjs burst --mib N [--after-file FILE | --delay-ms MS] [--hold-ms MS]\n");
  process.exit(2);
}

function parseArgs(argv) {
  const opts = {};
  for (let i = 0; i < argv.length; i++) {
    const key = argv[i];
    if (!key.startsWith("--")) usage(`unexpected argument ${JSON.stringify(key)}`);
    const value = argv[i + 1];
    if (value === undefined || value.startsWith("--")) usage(`${key} needs a value`);
    opts[key.slice(2)] = value;
    i++;
  }
  return opts;
}

function num(opts, key, fallback) {
  const raw = opts[key];
  if (raw === undefined) {
    if (fallback === undefined) usage(`--${key} is required`);
    return fallback;
  }
  const n = Number(raw);
  if (!Number.isFinite(n) || n < 0) usage(`--${key} must be a non-negative number, got ${JSON.stringify(raw)}`);
  return n;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function log(line) {
  process.stdout.write(`${line}\n`);
}

// Allocates `mib` MiB as 64 MiB Buffers and writes a non-zero pattern into
// every byte, so each page is present, dirty and not a zero page.
function allocTouched(mib, pattern) {
  const chunks = [];
  let left = Math.floor(mib * MiB);
  while (left > 0) {
    const size = Math.min(CHUNK, left);
    const buf = Buffer.allocUnsafeSlow(size);
    buf.fill(pattern);
    chunks.push(buf);
    left -= size;
  }
  return chunks;
}

async function freedAnon(opts) {
  const mib = num(opts, "mib");
  const t0 = Date.now();
  let chunks = allocTouched(mib, 0xa5);
  const ms = Date.now() - t0;
  chunks = null;
  // Exit frees everything at once; the pages go back to the guest's free
  // lists still holding 0xa5 (init_on_free is off), which is the state we want.
  log(`freed-anon: wrote ${mib} MiB in ${ms} ms, freeing and exiting`);
  void chunks;
}

// The data disk's random file; rc.sysinit mounts the disk at /data.
const DEFAULT_CACHE_FILE = "/data/blob";

function cacheRead(opts) {
  const file = opts.file ?? DEFAULT_CACHE_FILE;
  const mib = num(opts, "mib");
  const want = Math.floor(mib * MiB);
  const buf = Buffer.allocUnsafeSlow(MiB);
  const fd = openSync(file, "r"); // buffered reads: the data lands in the page cache
  const t0 = Date.now();
  let done = 0;
  try {
    while (done < want) {
      const n = readSync(fd, buf, 0, Math.min(buf.length, want - done), done);
      if (n === 0) break;
      done += n;
    }
  } finally {
    closeSync(fd);
  }
  const ms = Date.now() - t0;
  log(`cache-read: read ${(done / MiB).toFixed(1)} MiB of ${file} in ${ms} ms`);
}

async function hotWriter(opts) {
  const mib = num(opts, "mib");
  const rate = num(opts, "rate-mib");
  const seconds = num(opts, "seconds", 0);
  const progress = opts.progress;
  const total = Math.floor(mib * MiB);
  if (total === 0 || rate === 0) usage("--mib and --rate-mib must be positive");
  const chunks = allocTouched(mib, 0x5a);
  const tickMs = 100;
  const started = Date.now();
  let written = 0;
  let offset = 0;
  let pass = 0;
  let lastTick = started;
  let lastReport = 0;

  const report = (now) => {
    const line = JSON.stringify({ t: now, elapsedMs: now - started, bytes: written, passes: pass, mib, rateMib: rate });
    if (progress) appendFileSync(progress, `${line}\n`);
    else log(line);
  };
  if (progress) writeFileSync(progress, "");
  let stop = false;
  process.on("SIGTERM", () => { stop = true; });
  process.on("SIGINT", () => { stop = true; });
  log(`hot-writer: holding ${mib} MiB, rewriting at ${rate} MiB/s`);
  report(started);

  while (!stop) {
    const now = Date.now();
    if (seconds > 0 && now - started >= seconds * 1000) break;
    // Budget from the real time since the last tick, capped, so a guest that
    // was paused or starved does not burst to "catch up": the achieved rate
    // then shows how much the guest was slowed, which is what tests measure.
    const dt = Math.min(now - lastTick, 5 * tickMs);
    lastTick = now;
    let budget = Math.floor((rate * MiB * dt) / 1000);
    while (budget > 0) {
      const idx = Math.floor(offset / CHUNK);
      const within = offset % CHUNK;
      const chunk = chunks[idx];
      const n = Math.min(budget, chunk.length - within);
      // A pattern that changes every pass, so each rewrite really changes the page.
      chunk.fill((pass % 254) + 1, within, within + n);
      budget -= n;
      written += n;
      offset += n;
      if (offset >= total) {
        offset = 0;
        pass++;
      }
    }
    if (now - lastReport >= 500) {
      report(now);
      lastReport = now;
    }
    await sleep(tickMs);
  }
  report(Date.now());
  log(`hot-writer: done, wrote ${(written / MiB).toFixed(1)} MiB`);
}

async function burst(opts) {
  const mib = num(opts, "mib");
  const holdMs = num(opts, "hold-ms", 3000);
  const afterFile = opts["after-file"];
  const delayMs = num(opts, "delay-ms", 0);
  if (afterFile) {
    log(`burst: waiting for ${afterFile}`);
    while (!existsSync(afterFile)) await sleep(100);
  } else if (delayMs > 0) {
    await sleep(delayMs);
  }
  const t0 = Date.now();
  let chunks = allocTouched(mib, 0x3c);
  log(`burst: touched ${mib} MiB in ${Date.now() - t0} ms, holding ${holdMs} ms`);
  await sleep(holdMs);
  chunks = null;
  void chunks;
  log("burst-done");
}

const [mode, ...rest] = process.argv.slice(2);
const opts = parseArgs(rest);
switch (mode) {
  case "freed-anon":
    await freedAnon(opts);
    break;
  case "cache-read":
    cacheRead(opts);
    break;
  case "hot-writer":
    await hotWriter(opts);
    break;
  case "burst":
    await burst(opts);
    break;
  default:
    usage(mode === undefined ? "missing mode" : `unknown mode ${JSON.stringify(mode)}`);
}
process.exit(0);
