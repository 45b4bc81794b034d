"""Perturbations: exact restore for every method and dtype; bit_flip flips the asked bit."""
from __future__ import annotations

import pytest
import torch

from cwa_core.architectures import scored_params
from cwa_core.perturb import EXPONENT_MSB, PERTURBATIONS, PerturbSpec, int_view, perturbed
from cwa_core.selection import random_selection
from tiny_models import tiny_model

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _model(dtype):
    model = tiny_model("llama", dtype=dtype)
    refs = scored_params(model)
    # special values must survive too: -0.0, NaN with a payload, inf, subnormal
    w = refs[0].param.data.view(-1)
    iv = int_view(w)
    w[0], w[1], w[2] = -0.0, float("inf"), torch.finfo(dtype).tiny / 4
    iv[3] = int_view(torch.tensor([float("nan")], dtype=dtype))[0] | 1  # NaN with a payload bit
    return model, refs


def _bits(model):
    return {n: int_view(p.detach().reshape(-1)).clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", PERTURBATIONS.names())
@pytest.mark.parametrize("mode", ["global", "per_layer"])
def test_perturb_then_restore_is_bit_exact(dtype, method, mode):
    model, refs = _model(dtype)
    before = _bits(model)
    sel = random_selection(refs, 40, mode, seed=1)
    # make sure the special values are among the touched entries
    sel.tensor_ids = torch.cat([torch.zeros(4, dtype=torch.long), sel.tensor_ids])
    sel.flat_idx = torch.cat([torch.arange(4), sel.flat_idx])
    keep = ~torch.stack([sel.tensor_ids == 0, sel.flat_idx < 4]).all(0)
    keep[:4] = True
    sel.tensor_ids, sel.flat_idx = sel.tensor_ids[keep], sel.flat_idx[keep]
    with perturbed(refs, sel, PerturbSpec(method, seed=3)) as n:
        during = _bits(model)
        changed = sum(int((during[k] != before[k]).sum()) for k in before)
        assert n == len(sel)
        # only selected entries may change, and (except zeroing an exact zero) they do
        assert 0 < changed <= len(sel)
    after = _bits(model)
    for k in before:
        assert torch.equal(after[k], before[k]), f"{k} not restored bit for bit"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bit", [None, 0, 7, "sign"])
def test_bit_flip_flips_exactly_the_asked_bit(dtype, bit):
    model = tiny_model("llama", dtype=dtype)
    refs = scored_params(model)
    nbits = torch.finfo(dtype).bits
    want_bit = {None: EXPONENT_MSB[dtype], "sign": nbits - 1}.get(bit, bit)
    sel = random_selection(refs, 25, "global", seed=0)
    before = _bits(model)
    spec = PerturbSpec("bit_flip", bit=None if bit is None else want_bit)
    with perturbed(refs, sel, spec):
        during = _bits(model)
    selected = {(refs[t].name, i) for t, i in zip(sel.tensor_ids.tolist(), sel.flat_idx.tolist())}
    for name, b in before.items():
        x = (during[name] ^ b).view(-1)
        for i in torch.nonzero(x).reshape(-1).tolist():
            assert (name, i) in selected
        for t, i in selected:
            if t == name:
                diff = int(x[i]) & ((1 << nbits) - 1)  # as an unsigned pattern
                assert diff == 1 << want_bit, f"flipped {diff:#x}, wanted bit {want_bit}"
    # the default bit is the exponent's highest: a weight of magnitude ~0.02 becomes huge
    if bit is None:
        t, i = sel.tensor_ids[0].item(), sel.flat_idx[0].item()
        flat = refs[t].param.detach().reshape(-1)
        v0 = flat[i].item()
        with perturbed(refs, sel, spec):
            v1 = flat[i].item()
        assert abs(v0) < 1 and abs(v1) > 1e4 * abs(v0)


def test_arithmetic_perturbations_do_what_they_say():
    model = tiny_model("llama")
    refs = scored_params(model)
    sel = random_selection(refs, 10, "global", seed=0)
    t, i = sel.tensor_ids, sel.flat_idx
    vals = lambda: torch.stack([refs[a].param.detach().reshape(-1)[b] for a, b in zip(t.tolist(), i.tolist())])
    w = vals()
    cases = {"zero": torch.zeros_like(w), "sign_flip": -w, "scale": w * 10.0}
    for method, want in cases.items():
        with perturbed(refs, sel, PerturbSpec(method)):
            torch.testing.assert_close(vals(), want)
    with perturbed(refs, sel, PerturbSpec("gauss_noise", scale=0.5, seed=1)):
        rel = ((vals() - w) / w.abs()).abs()
        assert (rel > 0).all() and rel.max() < 0.5 * 5  # N(0,1) * 0.5 * |w|, within 5 sigma
    with perturbed(refs, sel, PerturbSpec("gauss_noise", scale=0.5, seed=1)):
        again = vals()
    with perturbed(refs, sel, PerturbSpec("gauss_noise", scale=0.5, seed=1)):
        torch.testing.assert_close(vals(), again)  # seeded


def test_restore_happens_even_when_the_body_raises():
    model = tiny_model("llama")
    refs = scored_params(model)
    before = _bits(model)
    with pytest.raises(RuntimeError):
        with perturbed(refs, random_selection(refs, 50, "global", seed=0), PerturbSpec("sign_flip")):
            raise RuntimeError("evaluation failed")
    assert all(torch.equal(_bits(model)[k], v) for k, v in before.items())


def test_bad_bit_is_refused():
    model = tiny_model("llama", dtype=torch.bfloat16)
    refs = scored_params(model)
    with pytest.raises(ValueError, match="allowed 0..15"):
        with perturbed(refs, random_selection(refs, 3, "global", seed=0), PerturbSpec("bit_flip", bit=16)):
            pass


def test_the_restore_check_reads_back_once_per_device_not_once_per_tensor(monkeypatch):
    """_all_restored compares on each tensor's device and reads one flag per device; a tensor
    holding other bits (a NaN payload too: bits, not values, are compared) makes it False."""
    from cwa_core import perturb as P

    a = torch.tensor([1.0, float("nan"), -0.0, 3.0])
    b = torch.tensor([5.0, 6.0])
    saved = [(a, torch.tensor([1, 2]), P.int_view(a)[torch.tensor([1, 2])].clone()),
             (b, torch.tensor([0]), P.int_view(b)[torch.tensor([0])].clone())]
    reads = []
    real_stack = torch.stack
    monkeypatch.setattr(P.torch, "stack", lambda xs: reads.append(len(xs)) or real_stack(xs))
    assert P._all_restored(saved) and reads == [2]  # two tensors, one device: one read
    assert P._all_restored([])
    P.int_view(a)[1] = P.int_view(a)[1] ^ 1  # still a NaN, another payload: the bits differ
    assert not P._all_restored(saved)
    a.view(torch.int32)[1] ^= 1  # back to the saved payload
    b[0] = 0.0  # another value in the second tensor only
    assert not P._all_restored(saved)
