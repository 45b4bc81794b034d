"""RTN quantization: against a plain reference written here, protected weights bit for bit, the
degenerate groups, and a planted super weight on the real 260K model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cwa_core.evaluate import perplexity
from cwa_core.quantize import parse_group, rtn
from conftest import STORIES, TINYSTORIES

_BITS = {torch.float32: np.int32, torch.float16: np.int16, torch.bfloat16: np.int16}


def _reference_rtn(w: np.ndarray, bits: int, group, protected: np.ndarray) -> np.ndarray:
    """Symmetric absmax RTN, one weight at a time (Dettmers et al. 2022, LLM.int8(), §2: s = absmax / qmax,
    q = round(x / s); held-out weights as in Yu et al. 2024, The Super Weight, §4: kept, not in the
    absmax). ``w`` (rows, cols) float32, inputs along axis 1; np.round rounds half to even."""
    qmax = np.float32(2 ** (bits - 1) - 1)
    rows, cols = w.shape
    size = {"tensor": rows * cols, "row": cols}.get(group, group)
    out = w.copy()
    flat_groups = ([[(r, c) for r in range(rows) for c in range(cols)]] if group == "tensor" else
                   [[(r, c) for c in range(start, min(start + size, cols))]
                    for r in range(rows) for start in range(0, cols, size)])
    for members in flat_groups:
        counted = [w[r, c] for r, c in members if not protected[r, c] and np.isfinite(w[r, c])]
        scale = np.float32(max([abs(v) for v in counted], default=np.float32(0))) / qmax
        if scale == 0:
            continue
        for r, c in members:
            if not protected[r, c] and np.isfinite(w[r, c]):
                out[r, c] = np.clip(np.round(w[r, c] / scale), -qmax, qmax) * scale
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                                              b.view(torch.int16 if b.element_size() == 2 else torch.int32))


def _heavy(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.rand(shape, generator=g).pow(4) * 3  # outliers, near-zeros


@pytest.mark.parametrize("group", ["tensor", "row", "1", "4", "5", "13", "40"])
@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("with_protected", [False, True])
def test_rtn_equals_the_reference_bit_for_bit(group, bits, with_protected):
    w = _heavy((6, 13), seed=bits)  # 13 inputs: groups of 4 and 5 leave a shorter last group
    prot = torch.rand(w.shape, generator=torch.Generator().manual_seed(7)) < (0.2 if with_protected else 0)
    if with_protected:
        prot[2] = True  # a fully protected row
        prot.view(-1)[w.abs().view(-1).argmax()] = True  # the largest weight held out: the scale shrinks
    got = rtn(w, bits, group, protected=prot)
    want = torch.from_numpy(_reference_rtn(w.numpy(), bits, parse_group(group), prot.numpy()))
    assert _same_bits(got, want)
    assert _same_bits(got[prot], w[prot])
    assert (got != w).any() or group == "1"  # something was quantized (group 1: each weight is its own absmax)


def test_conv1d_input_axis_and_experts_rows():
    w = _heavy((13, 6), seed=1)  # GPT-2 Conv1D: (in, out)
    assert _same_bits(rtn(w, 4, "5", in_dim=0), rtn(w.T.contiguous(), 4, "5", in_dim=1).T.contiguous())
    e = _heavy((3, 4, 10), seed=2)  # fused experts (E, out, in): the last axis is the input
    per_expert = torch.stack([rtn(e[i], 3, "row") for i in range(3)])
    assert _same_bits(rtn(e, 3, "row", in_dim=None), per_expert)
    assert _same_bits(rtn(e, 3, "row", in_dim=2), per_expert)
    t = e.transpose(1, 2).contiguous()  # (E, in, out)
    assert _same_bits(rtn(t, 3, "4", in_dim=1), rtn(e, 3, "4", in_dim=2).transpose(1, 2).contiguous())
    v = _heavy((9,), seed=3)  # a 1-D tensor is one row
    assert _same_bits(rtn(v, 4, "row", in_dim=None), rtn(v[None], 4, "tensor")[0])


def test_round_half_to_even():
    # bits 3: qmax 3; absmax 3 gives scale 1, so w / scale is exactly each value
    w = torch.tensor([[3.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49]])
    got = rtn(w, 3, "row")
    assert got.tolist() == [[3.0, 0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 0.0]]
    assert torch.signbit(got[0, 4])  # -0.5 rounds to -0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_protected_bits_survive_in_every_dtype(dtype):
    w = _heavy((4, 8), seed=4).to(dtype)
    w[0, 0] = -0.0
    w[1, 1] = 1000.0  # would dominate its row's scale
    ints = w.view(torch.int16 if w.element_size() == 2 else torch.int32)
    ints[2, 2] = 0x7FC1 if w.element_size() == 2 else 0x7FC00001  # a NaN with a payload
    prot = torch.zeros(w.shape, dtype=torch.bool)
    prot[0, 0] = prot[1, 1] = True
    got = rtn(w, 4, "row", protected=prot)
    assert got.dtype == dtype and _same_bits(got[prot], w[prot])
    assert _same_bits(got[2, 2:3], w[2, 2:3])  # a non-finite weight is kept, payload and all
    assert _same_bits(w, rtn(w, 4, "row", protected=torch.ones_like(prot)))  # all protected: unchanged
    others = [0, *range(2, 8)]
    scale = w[1].float().abs()[others].max() / 7  # the row's scale without the 1000
    err = (got[1].float() - w[1].float()).abs()[others].max()
    assert err <= scale * (0.5 + 7 * torch.finfo(dtype).eps)  # half a step, plus the dtype's rounding


def test_zero_groups_non_finite_weights_and_two_bits():
    z = torch.zeros(3, 5)
    assert _same_bits(rtn(z, 8, "tensor"), z) and _same_bits(rtn(z, 2, "2"), z)
    w = torch.tensor([[float("inf"), 1.0, -0.4, 0.2], [float("nan"), 0.0, 0.0, 0.0], [-float("inf"), 2.0, 1.2, -0.9]])
    got = rtn(w, 2, "row")  # qmax 1: every finite weight becomes -s, 0 or s
    assert _same_bits(got[:, 0], w[:, 0])  # inf / nan kept, not in the scale
    assert got[0, 1:].tolist() == [1.0, -0.0, 0.0] and got[1, 1:].tolist() == [0.0, 0.0, 0.0]
    assert got[2, 1:].tolist() == [2.0, 2.0, -0.0]
    assert torch.isfinite(rtn(w, 4, "tensor")[:, 1:]).all()  # the infs do not leak into the tensor's scale
    col = _heavy((5, 1), seed=5)  # one-column rows: each weight is its own absmax, kept to rounding
    torch.testing.assert_close(rtn(col, 3, "row"), col, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", [1, 9, 0, 4.0, True, "8"])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match=r"^quant_bits: must be an integer in 2\.\.8, got"):
        rtn(torch.ones(2, 2), bits, "row")


@pytest.mark.parametrize("group", ["0", "-3", "rows", "", "4.0", " row", 0, True])
def test_bad_group(group):
    with pytest.raises(ValueError, match=r"^quant_group: .*allowed: tensor, row or a positive integer$"):
        rtn(torch.ones(2, 2), 4, group)


def test_bad_protected_mask():
    with pytest.raises(ValueError, match="^protected: must be a bool mask of shape"):
        rtn(torch.ones(2, 3), 4, "row", protected=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="^protected: must be a bool mask"):
        rtn(torch.ones(2, 3), 4, "row", protected=torch.ones(2, 3))


# --------------------------------------------------------------------------- planted super weight

def _windows(tok, text: str, n: int, length: int = 128) -> torch.Tensor:
    ids = torch.tensor(tok(text)["input_ids"][: n * length]).view(n, length)
    ids[:, 0] = tok.bos_token_id
    return ids


@pytest.fixture(scope="module")
def stories(assets):
    tok = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    return model, _windows(tok, TINYSTORIES.read_text(encoding="utf-8")[-20_000:], 16)


def _replaced_ppl(model, windows, new: dict) -> float:
    """Perplexity with parameters replaced by ``new`` (param -> tensor), restored after."""
    saved = {p: p.detach().clone() for p in new}
    with torch.no_grad():
        for p, t in new.items():
            p.copy_(t)
        try:
            return perplexity(model, windows).ppl
        finally:
            for p, t in saved.items():
                p.copy_(t)


def _quietest_channels(model, windows) -> list[int]:
    """Per block, the MLP channel (down_proj input) with the least sum of squares on ``windows``."""
    sq = {}

    def hook(i):
        return lambda m, args: sq.__setitem__(i, sq.get(i, 0) + args[0].reshape(-1, args[0].shape[-1]).square().sum(0))

    hooks = [b.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, b in enumerate(model.model.layers)]
    try:
        perplexity(model, windows)
    finally:
        for h in hooks:
            h.remove()
    return [int(sq[i].argmin()) for i in range(len(hooks))]


@pytest.fixture
def planted(stories):
    """The 260K model with a silenced channel and a planted super weight in every block (see the test);
    yields (model, windows, untouched ppl, silenced ppl, [(down_proj weight, plant mask)]); restores all."""
    model, windows = stories
    blocks = model.model.layers
    original = {p: p.detach().clone() for b in blocks for p in (b.mlp.up_proj.weight, b.mlp.down_proj.weight)}
    base = perplexity(model, windows).ppl
    try:
        channels = _quietest_channels(model, windows)
        with torch.no_grad():
            for b, c in zip(blocks, channels):
                b.mlp.up_proj.weight[c] = 0.0
            silenced = perplexity(model, windows).ppl
            plants = []
            for b, c in zip(blocks, channels):
                w = b.mlp.down_proj.weight
                w[0, c] = 4 * 127 * w.abs().max()
                mask = torch.zeros(w.shape, dtype=torch.bool)
                mask[0, c] = True
                plants.append((w, mask))
        yield model, windows, base, silenced, plants
    finally:
        with torch.no_grad():
            for p, t in original.items():
                p.copy_(t)


def test_a_planted_super_weight_held_out_keeps_perplexity_quantized_with_the_rest_does_not(planted):
    """The plant. In every block, MLP channel c (the one with the least activation on the text) is
    silenced exactly: up_proj row c = 0, so h_c = silu(gate_c) * 0 = 0 on every token. Then
    down_proj[0, c] = M = 4 * qmax * max |down_proj| is planted. It multiplies exactly 0, so the planted
    model computes the silenced model's numbers bit for bit (equal perplexity, asserted), and silencing
    one of 172 channels costs little (measured against the untouched model). Quantized with the rest
    (8 bits, one scale per tensor) the scale is M / 127, every other weight has |w| / scale <= 1 / 4 < 1 / 2
    and rounds to exactly 0: every MLP output is wiped out and perplexity rises far above baseline.
    Held out, the scale comes from the others (error <= scale / 2 per weight), the plant is kept bit for
    bit (still multiplying 0), and 8-bit RTN of the rest costs well under 1% of perplexity."""
    model, windows, base, silenced, plants = planted
    ppl = perplexity(model, windows).ppl
    assert ppl == silenced  # the plant multiplies exact zeros
    assert silenced / base < 1.03  # silencing the quietest channel of each block costs < 3%
    wiped = {w: rtn(w, 8, "tensor") for w, _ in plants}
    held = {w: rtn(w, 8, "tensor", protected=m) for w, m in plants}
    for w, m in plants:
        assert (wiped[w][~m] == 0).all()  # the whole group rounds to zero
        assert _same_bits(held[w][m], w[m])
        assert (held[w][~m] - w[~m]).abs().max() <= w[~m].abs().max() / 127 / 2 * (1 + 1e-6)
    ratio_held = _replaced_ppl(model, windows, held) / ppl
    ratio_wiped = _replaced_ppl(model, windows, wiped) / ppl
    assert ratio_held < 1.01, ratio_held
    assert ratio_wiped > 10.0, ratio_wiped  # measured: about 550x (held: 1.003x; silencing: 1.012x)


def test_a_planted_super_weight_wipes_only_its_row_under_row_groups(planted):
    *_, plants = planted
    for w, m in plants:
        got = rtn(w, 8, "row")
        assert (got[0][~m[0]] == 0).all()  # the plant's row: every other weight rounds to 0
        assert (got[1:] != 0).float().mean() > 0.9  # the other rows keep their weights
