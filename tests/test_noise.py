"""The noise stream: Philox4x32-10 against its reference vectors, Box-Muller normals, slots, seeds."""

import numpy as np
import pytest

from ddpm.runtime.noise import make_noise, normals, philox4x32, slots
from helpers import MNIST

# Random123's known-answer vectors for Philox4x32-10 (its tests/kat_vectors): counter, key, output
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    assert tuple(int(v) for v in philox4x32(np.array([counter]), key)[0]) == expected


def test_normals_are_box_muller_of_philox():
    """Block j of sample k is Philox((j, k lo, k hi, 0), (s lo, s hi)); its 4 words give 4 normals."""
    seed, k = 2**40 + 7, 2**33 + 5
    r = philox4x32(np.array([[3, k & 0xFFFFFFFF, k >> 32, 0]]), (seed & 0xFFFFFFFF, seed >> 32))[0]
    u = (r.astype(np.float64) + 0.5) / 2**32
    want = [np.sqrt(-2 * np.log(u[0])) * np.cos(2 * np.pi * u[1]), np.sqrt(-2 * np.log(u[0])) * np.sin(2 * np.pi * u[1]),
            np.sqrt(-2 * np.log(u[2])) * np.cos(2 * np.pi * u[3]), np.sqrt(-2 * np.log(u[2])) * np.sin(2 * np.pi * u[3])]
    assert np.array_equal(normals(seed, k, 12, 4), np.asarray(want, dtype=np.float32))


def test_normals_statistics():
    n = normals(0, 0, 0, 400_000).astype(np.float64)
    assert abs(n.mean()) < 0.01 and abs(n.std() - 1) < 0.01
    assert abs((n ** 3).mean()) < 0.03 and abs((n ** 4).mean() - 3) < 0.05
    assert abs(np.corrcoef(n[:-1], n[1:])[0, 1]) < 0.01


def test_pinned_values():
    """The stream is part of the contract between engines, languages and releases."""
    assert normals(0, 0, 0, 4).tolist() == pytest.approx([0.99113768, -0.92466259, -0.61760896, -0.48206860], abs=1e-6)


def test_slots_and_batches():
    x_T, z = make_noise(5, 10, 3, 4, MNIST)
    assert x_T.shape == (3, 1, 28, 28) and z.shape == (3, 4, 1, 28, 28) and x_T.dtype == np.float32
    one = slots(5, 11, 0, 5, MNIST)
    assert np.array_equal(one[0], x_T[1]) and np.array_equal(one[1:], z[1])
    assert np.array_equal(slots(5, 11, 3, 2, MNIST), one[3:5])        # any slot can be drawn directly
    assert make_noise(5, 10, 3, 0, MNIST)[1] is None
    assert not np.array_equal(make_noise(6, 10, 1, 0, MNIST)[0], x_T[:1])   # another seed, other noise


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, "3", True])
def test_seed_range(bad):
    with pytest.raises(ValueError, match="seed"):
        normals(bad, 0, 0, 4)
