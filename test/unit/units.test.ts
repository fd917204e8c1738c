// shared/units.ts: parseSize's units (SI = 1000, IEC and bare letters = 1024), its limits and its errors.
import { describe, expect, it } from "vitest";
import { GiB, KiB, MAX_SIZE_BYTES, MiB, PiB, TiB, parseSize } from "../../shared/units.js";

describe("parseSize", () => {
  it.each([
    // a bare number is bytes
    ["0", 0],
    ["1048576", 1048576],
    ["  42  ", 42],
    ["7B", 7],
    ["7 b", 7],
    // SI: powers of 1000 (`--bandwidth 125MB` is 125,000,000 B/s)
    ["1KB", 1000],
    ["125MB", 125_000_000],
    ["125 mb", 125_000_000],
    ["2GB", 2_000_000_000],
    ["1.5GB", 1_500_000_000],
    ["3TB", 3e12],
    ["1PB", 1e15],
    ["0.29MB", 290_000], // exact: 0.29 * 1e6 in floating point is 289999.99999999994
    // IEC: powers of 1024
    ["1KiB", KiB],
    ["512MiB", 512 * MiB],
    ["512mib", 512 * MiB],
    ["1GiB", GiB],
    ["1.5GiB", 1.5 * GiB],
    ["2TiB", 2 * TiB],
    ["1PiB", PiB],
    // bare letters are binary, as in QEMU's -m 512M
    ["4K", 4 * KiB],
    ["256M", 256 * MiB],
    ["1G", GiB],
    ["1g", GiB],
    ["1T", TiB],
    ["1P", PiB],
    ["0.5G", 512 * MiB],
  ])("%s is %d bytes", (text, bytes) => {
    expect(parseSize(text)).toBe(bytes);
  });

  it.each([
    ["empty", "", "not a size"],
    ["words", "lots", 'not a size: "lots"'],
    ["negative", "-1", "not a size"],
    ["exponent", "1e3", "not a size"],
    ["unit only", "MiB", "not a size"],
    ["two numbers", "1 2", "not a size"],
    ["unknown unit", "5XB", 'unknown unit "XB"'],
    ["bits", "5Mbit", 'unknown unit "Mbit"'],
    ["fraction of a byte", "1.5", "not a whole number of bytes"],
    ["fraction of a byte after a unit", "0.1GiB", "not a whole number of bytes"],
    ["above 1 PiB, binary", "1025TiB", "above the 1 PiB limit"],
    ["above 1 PiB, SI", "2PB", "above the 1 PiB limit"],
    ["far above 1 PiB", "99999999TiB", "above the 1 PiB limit"],
    ["above the safe-integer range", "9007199254740993", "above the 1 PiB limit"],
    ["absurdly long", "9".repeat(1000), "not a size"],
  ])("rejects %s (%s)", (_name, text, message) => {
    expect(() => parseSize(text)).toThrow(RangeError);
    expect(() => parseSize(text)).toThrow(message);
  });

  it("quotes the input in its errors", () => {
    expect(() => parseSize("99999999TiB")).toThrow('"99999999TiB"');
  });

  it("accepts exactly 1 PiB and nothing above, and every result is a safe integer", () => {
    expect(MAX_SIZE_BYTES).toBe(2 ** 50);
    expect(parseSize(String(MAX_SIZE_BYTES))).toBe(MAX_SIZE_BYTES);
    expect(() => parseSize(String(MAX_SIZE_BYTES + 1))).toThrow("above the 1 PiB limit");
    for (const text of ["1PiB", "1P", "1PB", "1125899906842624"]) expect(Number.isSafeInteger(parseSize(text))).toBe(true);
  });
});
