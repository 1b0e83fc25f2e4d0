// The seeded noise stream of runtime/noise.py, exactly, for the browser: sample k of seed s owns the normals
//
//   block j:  (r0, r1, r2, r3) = Philox4x32-10(counter = (j, k mod 2^32, k div 2^32, 0),
//                                              key = (s mod 2^32, s div 2^32))
//   u_i = (r_i + 0.5) / 2^32                                                       (float64, in (0, 1))
//   normals 4j..4j+3 = sqrt(-2 ln u0) cos(2 pi u1), sqrt(-2 ln u0) sin(2 pi u1),
//                      sqrt(-2 ln u2) cos(2 pi u3), sqrt(-2 ln u2) sin(2 pi u3)     (Box-Muller), cast to float32
//
// and slot q (one image of C*H*W normals) starts at normal q*C*H*W; slot 0 is the starting noise x_T.
// Philox4x32-10: Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3" (Random123). Integers are uint32
// held in JS numbers; the 32 x 32 -> 64-bit products are computed exactly (Math.imul for the low half, 16-bit limbs
// in float64 for the high half). Seeds and sample indices are BigInts (or safe integers) in 0..2^64-1.

const M0 = 0xD2511F53, M1 = 0xCD9E8D57;   // Philox multipliers
const W0 = 0x9E3779B9, W1 = 0xBB67AE85;   // Weyl key increments
const TWO32 = 4294967296;
export const MAX_SEED = (1n << 64n) - 1n;

/** High 32 bits of the exact 64-bit product of the uint32s a and b. */
export function mulhi(a, b) {
  const al = a & 0xffff, ah = a >>> 16, bl = b & 0xffff, bh = b >>> 16;
  const t = al * bl;                                   // every partial product < 2^32: exact in float64
  const m1 = ah * bl + Math.floor(t / 65536);          // < 2^32 + 2^16
  const m2 = al * bh + (m1 % 65536);                   // < 2^32 + 2^16
  return (ah * bh + Math.floor(m1 / 65536) + Math.floor(m2 / 65536)) >>> 0;
}

/** Philox4x32-R of one counter [c0, c1, c2, c3] (uint32s) under the key (k0, k1): [r0, r1, r2, r3]. */
export function philox4x32(counter, k0, k1, rounds = 10) {
  let [c0, c1, c2, c3] = counter.map((v) => v >>> 0);
  k0 >>>= 0; k1 >>>= 0;
  for (let r = 0; r < rounds; r++) {
    if (r) { k0 = (k0 + W0) >>> 0; k1 = (k1 + W1) >>> 0; }   // the key is bumped before every round but the first
    const h0 = mulhi(M0, c0), l0 = Math.imul(M0, c0) >>> 0;
    const h1 = mulhi(M1, c2), l1 = Math.imul(M1, c2) >>> 0;
    [c0, c1, c2, c3] = [(h1 ^ c1 ^ k0) >>> 0, l1, (h0 ^ c3 ^ k1) >>> 0, l0];
  }
  return [c0, c1, c2, c3];
}

/** A seed or sample index (BigInt, integer number or decimal string) as [low, high] uint32; RangeError otherwise. */
export function split64(value, what = "seed") {
  let v;
  try {
    v = BigInt(typeof value === "string" ? value.trim() : value);
  } catch {
    throw new RangeError(`${what} must be an integer in 0..2^64-1, got ${value}`);
  }
  if (typeof value === "string" && !/^\d+$/.test(value.trim())) {
    throw new RangeError(`${what} must be an integer in 0..2^64-1, got ${value}`);
  }
  if (v < 0n || v > MAX_SEED) throw new RangeError(`${what} must be an integer in 0..2^64-1, got ${value}`);
  return [Number(v & 0xffffffffn), Number(v >> 32n)];
}

/** Normals first..first+count-1 of sample `index` of the stream `seed` (first % 4 == 0): a Float32Array. */
export function normals(seed, index, first, count) {
  if (first % 4) throw new RangeError("normals are drawn in blocks of 4: first must be a multiple of 4");
  const [s0, s1] = split64(seed, "seed");
  const [i0, i1] = split64(index, "index");
  const out = new Float32Array(count);
  const j0 = first / 4;
  for (let b = 0; 4 * b < count; b++) {
    const r = philox4x32([(j0 + b) >>> 0, i0, i1, 0], s0, s1);
    for (let h = 0; h < 2; h++) {
      const u0 = (r[2 * h] + 0.5) * (1.0 / TWO32), u1 = (r[2 * h + 1] + 0.5) * (1.0 / TWO32);
      const radius = Math.sqrt(-2.0 * Math.log(u0));
      const angle = (2.0 * Math.PI) * u1;
      const n = 4 * b + 2 * h;
      if (n < count) out[n] = radius * Math.cos(angle);           // Float32Array stores round to float32
      if (n + 1 < count) out[n + 1] = radius * Math.sin(angle);
    }
  }
  return out;
}

/** x_T of samples start..start+count-1 (slot 0 of each): a Float32Array of count*size values, sample-major. */
export function startingNoise(seed, start, count, size = 784) {
  const out = new Float32Array(count * size);
  const first = BigInt(start);
  for (let k = 0; k < count; k++) out.set(normals(seed, first + BigInt(k), 0, size), k * size);
  return out;
}
