"""cwa_core.bit_errors: the bit-error draw of issue 17's campaign (count, uniform positions, bit
classes, paired arms, exact restore), checked against numpy's own float views."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, chisquare

from cwa_core import bit_errors as be

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def test_bit_classes_match_ieee_layout_from_numpy():
    """Independent reference: flipping the bits numpy calls sign/exponent/mantissa of 1.0."""
    for dtype, np_float, np_int in ((torch.float32, np.float32, np.uint32), (torch.float16, np.float16, np.uint16)):
        width = np.dtype(np_int).itemsize * 8
        assert sorted(be.bit_positions(dtype, "all").tolist()) == list(range(width))
        one = np.array([1.0], np_float).view(np_int)
        sign = be.bit_positions(dtype, "sign")
        assert sign.tolist() == [width - 1]
        assert (one ^ np_int(1 << int(sign[0]))).view(np_float)[0] == -1.0
        for b in be.bit_positions(dtype, "exponent"):  # an exponent bit scales 1.0 by a power of two
            v = float((one ^ np_int(1 << int(b))).view(np_float)[0])
            assert v == 0.0 or np.isinf(v) or np.log2(abs(v)) == round(np.log2(abs(v))) != 0
        for b in be.bit_positions(dtype, "mantissa"):  # a mantissa bit keeps 1 <= v < 2
            assert 1.0 < float((one ^ np_int(1 << int(b))).view(np_float)[0]) < 2.0
    # bfloat16 is the top half of float32
    assert be.bit_positions(torch.bfloat16, "exponent").tolist() == list(range(7, 15))
    assert be.bit_positions(torch.bfloat16, "mantissa").tolist() == list(range(7))
    with pytest.raises(ValueError, match="bits: unknown 'fraction'; allowed: all, sign, exponent, mantissa"):
        be.bit_positions(torch.float32, "fraction")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rate_zero_flips_nothing_and_rate_one_flips_every_allowed_bit(dtype):
    rng = np.random.default_rng(0)
    assert len(be.draw(10_000, dtype, 0.0, rng)) == 0
    d = be.draw(7, dtype, 1.0, rng, bits="exponent")
    assert len(d) == 7 * be.bit_positions(dtype, "exponent").size
    assert sorted(zip(d.index.tolist(), d.bits.tolist())) == [
        (i, b) for i in range(7) for b in be.bit_positions(dtype, "exponent").tolist()]


def test_the_count_is_binomial_and_positions_distinct():
    rng = np.random.default_rng(1)
    n, rate, width = 5_000, 1e-3, 16
    counts = [len(be.draw(n, torch.float16, rate, rng)) for _ in range(400)]
    mean = n * width * rate  # 80 flips a draw
    assert abs(np.mean(counts) - mean) < 4 * np.sqrt(mean * (1 - rate) / len(counts))
    assert abs(np.var(counts, ddof=1) / (mean * (1 - rate)) - 1) < 0.25
    d = be.draw(n, torch.float16, 0.2, rng)
    pairs = set(zip(d.index.tolist(), d.bits.tolist()))
    assert len(pairs) == len(d) and d.index.min() >= 0 and d.index.max() < n


@pytest.mark.parametrize("bits", be.BIT_CLASSES)
def test_positions_are_uniform_over_the_allowed_bits(bits):
    rng = np.random.default_rng(2)
    allowed = be.bit_positions(torch.float32, bits)
    seen = np.concatenate([be.draw(2_000, torch.float32, 0.002, rng, bits=bits).bits for _ in range(200)])
    assert set(np.unique(seen)) == set(allowed.tolist())
    counts = np.bincount(np.searchsorted(allowed, seen), minlength=allowed.size)
    if allowed.size > 1:
        assert chisquare(counts).pvalue > 1e-3
    weights = np.concatenate([be.draw(50, torch.float32, 0.01, rng, bits=bits).index for _ in range(3000)])
    assert chisquare(np.bincount(weights, minlength=50)).pvalue > 1e-3


def test_a_model_sized_draw_needs_no_mask():
    """8B weights x 16 bits at 1e-7: ~12,800 flips drawn among 1.28e11 bits."""
    rng = np.random.default_rng(3)
    d = be.draw(8_000_000_000, torch.bfloat16, 1e-7, rng)
    assert binomtest(len(d), 8_000_000_000 * 16, 1e-7).pvalue > 1e-3
    assert len(set(zip(d.index.tolist(), d.bits.tolist()))) == len(d)
    assert d.index.max() < 8_000_000_000 and d.index.nbytes < 1 << 20


@pytest.mark.parametrize("dtype", DTYPES)
def test_applying_a_draw_twice_restores_every_bit(dtype):
    rng = np.random.default_rng(4)
    w = torch.randn(3000).to(dtype)
    before = w.clone()
    d = be.draw(w.numel(), dtype, 0.05, rng)  # many weights get several flips (combined into one mask)
    assert (np.diff(d.index) == 0).any()
    be.apply(w, d)
    iv, ref = be.int_view(w), be.int_view(before)
    changed = torch.nonzero(iv != ref).flatten().numpy()
    assert set(changed.tolist()) == set(d.index.tolist())
    for i in changed[:200]:  # each changed weight differs in exactly its drawn bits
        want = sorted(d.bits[d.index == i].tolist())
        x = int(iv[i]) ^ int(ref[i])
        assert sorted(b for b in range(torch.finfo(dtype).bits) if x >> b & 1) == want
    assert torch.isnan(w).any() or torch.isinf(w).any()  # exponent flips make non-finite values here
    be.apply(w, d)
    assert torch.equal(be.int_view(w), be.int_view(before))


def test_arms_share_the_draw_outside_their_protected_sets():
    rng = np.random.default_rng(5)
    d = be.draw(1_000, torch.float32, 0.01, rng)
    top = np.arange(0, 1_000, 7)
    rand = np.random.default_rng(6).choice(1_000, size=top.size, replace=False)
    a, b = d.outside(top), d.outside(rand)
    assert not np.isin(a.index, top).any() and not np.isin(b.index, rand).any()
    assert len(a) + d.hits(top) == len(d) and len(b) + d.hits(rand) == len(d)
    both = ~np.isin(d.index, top) & ~np.isin(d.index, rand)  # outside both sets: the same flips
    common_a = set(zip(a.index.tolist(), a.bits.tolist()))
    common_b = set(zip(b.index.tolist(), b.bits.tolist()))
    assert common_a & common_b == set(zip(d.index[both].tolist(), d.bits[both].tolist()))
    ref = torch.randn(1_000)  # applying an arm's flips leaves its protected weights bit for bit
    ref2 = ref.clone()
    be.apply(ref2, a)
    assert torch.equal(ref2[torch.from_numpy(top)], ref[torch.from_numpy(top)])


def test_bad_rate_is_refused():
    with pytest.raises(ValueError, match=r"error_rate: must be a number in \[0, 1\]"):
        be.draw(10, torch.float32, 1.5, np.random.default_rng(0))
