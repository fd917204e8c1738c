/**
 * Small network helpers. Everything Ballast opens in tests and the lab is on
 * loopback; these helpers never pick another address on their own.
 */
import { createServer } from "node:net";

/** Asks the kernel for a free TCP port on `host` (default 127.0.0.1). */
export function freePort(host = "127.0.0.1"): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, host, () => {
      const addr = srv.address();
      const port = typeof addr === "object" && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

/** Splits "host:port" (or "[v6]:port"); throws RangeError on anything else. */
export function splitHostPort(address: string): { host: string; port: number } {
  const m = /^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-_]+):(\d{1,5})$/.exec(address);
  const port = m ? Number(m[2]) : NaN;
  if (!m || !(port > 0 && port < 65536)) throw new RangeError(`not a host:port address: ${JSON.stringify(address)}`);
  return { host: m[1] as string, port };
}
