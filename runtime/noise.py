"""The seeded noise stream shared by every engine: numpy only, and portable to any language.

Sample k of a run with seed s owns an endless stream of standard normals, cut into *slots* of one image each
(C*H*W values): slot 0 is its starting noise x_T, slots 1, 2, ... the fresh noise z that a plan's rows ask for, in the
order the plan numbers them (`Plan.z_slot`). A sample's digits therefore depend only on (seed, k, plan), never on
batch size, process count or engine, and any engine fills its buffers from this host-side stream.

The stream is counter based, so every value can be computed directly from (s, k, its position):

    block j of sample k:  (r0, r1, r2, r3) = Philox4x32-10(counter = (j, k mod 2^32, k div 2^32, 0),
                                                         key = (s mod 2^32, s div 2^32))
    u_i = (r_i + 0.5) / 2^32                                          (float64, in (0, 1))
    normals 4j .. 4j+3 = sqrt(-2 ln u0) cos(2 pi u1), sqrt(-2 ln u0) sin(2 pi u1),
                         sqrt(-2 ln u2) cos(2 pi u3), sqrt(-2 ln u2) sin(2 pi u3)    (Box-Muller), cast to float32

Philox4x32-10 is Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3" (Random123); the known-answer
vectors of its reference implementation are pinned in tests/test_noise.py. A slot starts at normal q*C*H*W, a
multiple of 4 for every image shape used here (C*H*W = 784), so slot q starts at block q*C*H*W/4. The same
definition is written in JavaScript for the browser page (export/page/noise.mjs) and tested against this one, bit
for bit (tests/test_web.py).
"""

from __future__ import annotations

import numpy as np

from ..errors import OptionError, brief

MAX_SEED = 2**64 - 1
_MASK = np.uint64(0xFFFFFFFF)
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)     # Philox multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85                          # Weyl key increments


def philox4x32(counter: np.ndarray, key: tuple[int, int], rounds: int = 10) -> np.ndarray:
    """Philox4x32-R of every row of counter (N, 4) uint32 under key (k0, k1): (N, 4) uint32."""
    c = np.asarray(counter, dtype=np.uint32).astype(np.uint64)
    c0, c1, c2, c3 = c[:, 0], c[:, 1], c[:, 2], c[:, 3]
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for r in range(rounds):
        if r:   # the key is bumped before every round but the first
            k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
        p0, p1 = _M0 * c0, _M1 * c2                              # exact: 32 x 32 -> 64 bits
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ np.uint64(k0), p1 & _MASK,
                          (p0 >> 32) ^ c3 ^ np.uint64(k1), p0 & _MASK)
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32)


def check_seed(seed: int) -> int:
    """The seed as an int in 0..2^64-1; ValueError otherwise."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"seed must be an integer in 0..2^64-1, got {seed!r}")
    return int(seed)


def check_start(start: int, count: int) -> None:
    """ValueError unless samples start..start+count-1 are indices of the stream (0..2^64-1); the message names
    start, the argument a caller gives."""
    if not 0 <= start or start + max(count - 1, 0) > MAX_SEED:
        raise OptionError(f"start must be in 0..2^64-1 - (n - 1) (samples start..start+n-1 are indices of the seeded "
                         f"stream, at most 2^64-1), got start={brief(start)} with n={brief(count)}", "start")


def normals(seed: int, index: int, first: int, count: int) -> np.ndarray:
    """Normals first..first+count-1 of sample `index` of the stream `seed`: (count,) float32. first % 4 == 0."""
    seed, index = check_seed(seed), check_seed(index)
    if first % 4:
        raise ValueError("normals are drawn in blocks of 4: first must be a multiple of 4")
    blocks = -(-count // 4)
    ctr = np.zeros((blocks, 4), dtype=np.uint32)
    ctr[:, 0] = np.arange(first // 4, first // 4 + blocks, dtype=np.uint64).astype(np.uint32)
    ctr[:, 1], ctr[:, 2] = index & 0xFFFFFFFF, index >> 32
    r = philox4x32(ctr, (seed & 0xFFFFFFFF, seed >> 32))
    u = (r.astype(np.float64) + 0.5) * (1.0 / 4294967296.0)
    radius = np.sqrt(-2.0 * np.log(u[:, 0::2]))               # (blocks, 2): from u0 and u2
    angle = (2.0 * np.pi) * u[:, 1::2]                        # (blocks, 2): from u1 and u3
    out = np.empty((blocks, 2, 2), dtype=np.float64)
    out[:, :, 0] = radius * np.cos(angle)
    out[:, :, 1] = radius * np.sin(angle)
    return out.reshape(-1)[:count].astype(np.float32)


def slots(seed: int, index: int, first_slot: int, count: int, shape: tuple[int, int, int]) -> np.ndarray:
    """Slots first_slot..first_slot+count-1 of sample `index`: (count, *shape) float32; shape: the model's (C, H, W),
    one slot's image."""
    size = int(np.prod(shape))
    return normals(seed, index, first_slot * size, count * size).reshape(count, *shape)


def make_noise(seed: int, start: int, count: int, num_slots: int, shape: tuple[int, int, int]):
    """(x_T (B,C,H,W), z (B,num_slots,C,H,W) or None) float32 for samples start..start+count-1; shape: the model's
    image shape (C, H, W) (ModelConfig.image_shape, Bundle.image_shape).

    x_T is slot 0 of each sample's stream, z its slots 1..num_slots (the plan's fresh noise, `Plan.z_slot`).
    """
    check_start(start, count)
    x_T = np.empty((count, *shape), dtype=np.float32)
    z = np.empty((count, num_slots, *shape), dtype=np.float32) if num_slots else None
    for b in range(count):
        s = slots(seed, start + b, 0, 1 + num_slots, shape)
        x_T[b] = s[0]
        if z is not None:
            z[b] = s[1:]
    return x_T, z
