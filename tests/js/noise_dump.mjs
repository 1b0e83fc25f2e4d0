// Writes the raw float32 normals of export/page/noise.mjs to stdout, for tests/test_web.py to compare with numpy.
// usage: node noise_dump.mjs NOISE_MODULE SEED INDEX FIRST COUNT [SEED INDEX FIRST COUNT ...]
import { pathToFileURL } from "node:url";

const [modulePath, ...args] = process.argv.slice(2);
const { normals } = await import(pathToFileURL(modulePath).href);
for (let a = 0; a < args.length; a += 4) {
  const v = normals(BigInt(args[a]), BigInt(args[a + 1]), Number(args[a + 2]), Number(args[a + 3]));
  process.stdout.write(Buffer.from(v.buffer, v.byteOffset, v.byteLength));
}
