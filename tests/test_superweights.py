"""Super weights: detection, the causal test, ranks and published coordinates, on tiny models with
super weights planted on purpose (and on the real 260K Llama, which has none)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cwa_core.architectures import UnsupportedArchitectureError, arch_spec, down_projections, scored_params
from cwa_core.data import read_text, split, tokenize
from cwa_core.metrics import score
from cwa_core.selection import ScoreCollector
from cwa_core.superweight_plots import plot_super_weight_spikes
from cwa_core.superweights import (
    CONVENTION,
    STATUSES,
    CandidateRanks,
    Coordinate,
    LayerTrace,
    StudyLabels,
    StudyRequest,
    SuperWeightOptions,
    add_ranks,
    causal_test,
    detect_super_weights,
    down_proj_shapes,
    known_super_weights,
    match_published,
    published_coordinates,
    registry_entries,
    super_weight_study,
    super_weights_report,
)
from cwa_core.superweights.detection import _propose
from cwa_core.superweights.plumbing import _down_proj_refs, _LayerPass, _Spikes
from conftest import STORIES, TINYSTORIES
from test_plots import assert_real_png
from tiny_models import TINY_TYPES, tiny_config, tiny_model

T, U = 5, 7  # trigger token (carries the massive activation) and the token that follows it
DENSE = [t for t in TINY_TYPES if t != "mixtral"]


# ----------------------------------------------------------------------------- planting


def _mlp_inputs(model, layer: int, col: int) -> list[torch.Tensor]:
    """Views of the weights producing MLP input channel ``col``: gated families get two
    (gate, up), others one; each is (hidden,) and written in place."""
    block = model.get_submodule(arch_spec(model).layers)[layer]
    mt = model.config.model_type
    inter = down_projections(model)[layer][1].weight.shape[1 if mt != "gpt2" else 0]
    if mt == "phi3":
        w = block.mlp.gate_up_proj.weight  # (2I, H): gate rows then up rows
        return [w[col], w[inter + col]]
    if mt == "gpt2":
        block.mlp.c_fc.bias.data[col] = 0
        return [block.mlp.c_fc.weight[:, col]]  # Conv1D (H, I)
    if mt == "gpt_neox":
        block.mlp.dense_h_to_4h.bias.data[col] = 0
        return [block.mlp.dense_h_to_4h.weight[col]]
    return [block.mlp.gate_proj.weight[col], block.mlp.up_proj.weight[col]]


@torch.no_grad()
def plant(model, layer: int, row: int, col: int, trigger: int = T, channel: int = 3, value: float = 2.0,
          new_trigger: bool = True, amp: float | None = None) -> None:
    """A super weight W[row, col] in ``layer``'s down projection: token ``trigger`` carries a
    large embedding on hidden ``channel`` (and no other token does), the MLP input ``col`` reads
    only that channel with weight ``amp`` (so it spikes on the trigger), and W[row, col] turns that
    spike into a massive output on ``row``. The rest of column ``col`` is zeroed so that only
    ``row`` spikes (and nothing is left once the weight is zeroed)."""
    emb = model.get_submodule(arch_spec(model).embeddings[0]).weight
    if new_trigger:
        emb[:, channel] = 0
        emb[trigger, channel] = 10.0
    if amp is None:
        amp = 4.0 if len(_mlp_inputs(model, layer, col)) == 2 else 20.0
    for w in _mlp_inputs(model, layer, col):
        w.zero_()
        w[channel] = amp
    down = down_projections(model)[layer][1].weight
    if type(down_projections(model)[layer][1]).__name__ == "Conv1D":  # stored (in, out)
        down[col] = 0
        down[col, row] = value
    else:
        down[:, col] = 0
        down[row, col] = value


@torch.no_grad()
def make_dependent(model, row: int, col: int, channel: int = 3) -> None:
    """Llama only, after ``plant`` in layer 0: residual channels ``row`` and ``channel`` are
    written by nothing but the super weight and the embedding; lm_head predicts U from ``row``
    (the massive activation) and, without it, the trigger again from ``channel``: removing the
    weight makes the model confidently wrong after every trigger."""
    model.model.embed_tokens.weight[:, row] = 0
    planted = float(model.model.layers[0].mlp.down_proj.weight[row, col])
    for blk in model.model.layers:
        blk.self_attn.o_proj.weight[[channel, row]] = 0
        blk.mlp.down_proj.weight[[channel, row]] = 0
    model.model.layers[0].mlp.down_proj.weight[row, col] = planted
    model.lm_head.weight[U, row] = 5.0
    model.lm_head.weight[T, channel] = 5.0


def windows(n: int, length: int, seed: int, triggers=(T,)) -> torch.Tensor:
    """Random tokens (8..127) with ``T U`` every third position (and other triggers sprinkled)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(8, 128, (n, length), generator=g)
    w[:, 0::3] = triggers[0]
    w[:, 1::3] = U
    for i, t in enumerate(triggers[1:]):
        w[:, 2 + 3 * i::9] = t
    return w


def _bits(model) -> dict[str, bytes]:
    return {n: p.detach().clone().view(-1).view(torch.int32 if p.dtype == torch.float32 else torch.int16)
            .numpy().tobytes() for n, p in model.named_parameters()}


def _keys(det):
    return [c.key for c in det.candidates]


# ----------------------------------------------------------------------------- detection


def test_one_planted_weight_is_found_exactly_and_the_loop_stops_after_it():
    model = tiny_model("llama")
    plant(model, 0, row=11, col=20)
    before = _bits(model)
    prompts = windows(4, 48, seed=1)
    det = detect_super_weights(model, prompts)
    assert _keys(det) == [(0, 11, 20)]
    assert det.rounds == 2 and det.converged  # round 1 (the weight zeroed) finds nothing new
    c = det.candidates[0]
    assert (c.round, c.col_rule, c.value, c.module) == (0, "input_max", 2.0, "model.layers.0.mlp.down_proj")
    assert c.spike_out_before > 500 and c.spike_out_after < 5  # the massive output goes with the weight
    assert c.spike_in_after == c.spike_in_before > 200  # its input does not depend on it
    assert c.contribution == pytest.approx(1.0, abs=1e-3)  # the weight makes the whole spike
    # the spike sits on every trigger token and nowhere else
    expected = [(w, p) for w in range(4) for p in range(0, 48, 3)]
    assert c.token_positions == expected and c.n_token_positions == len(expected)
    assert c.out_position[1] % 3 == 0 and c.in_position[1] % 3 == 0
    assert det.layers[0].max_out[0] == c.spike_out_before and det.layers[0].max_out[1] < 5
    assert _bits(model) == before  # zeroed weights restored bit for bit


def test_two_planted_in_different_layers_one_in_the_last_are_both_found():
    model = tiny_model("llama", num_hidden_layers=3)
    plant(model, 0, row=11, col=20, trigger=T, channel=3)
    plant(model, 2, row=25, col=40, trigger=9, channel=6)
    det = detect_super_weights(model, windows(4, 48, seed=2, triggers=(T, 9)))
    assert sorted(_keys(det)) == [(0, 11, 20), (2, 25, 40)]
    assert {c.round for c in det.candidates} == {0} and det.rounds == 2
    assert det.layers[1].max_out[0] < 50  # the middle layer has no spike


def test_two_weights_in_one_row_are_found_in_successive_rounds():
    """Llama-13B's pattern (2, 2231, 2278), (2, 2231, 6939): once the first is zeroed the row still
    spikes through the second column, which the largest-contribution rule then finds."""
    model = tiny_model("llama")
    plant(model, 0, row=11, col=20, value=2.0)
    plant(model, 0, row=11, col=30, value=1.5, new_trigger=False, amp=3.0)  # same trigger, weaker input
    det = detect_super_weights(model, windows(4, 48, seed=3))
    assert [(c.key, c.round, c.col_rule) for c in det.candidates] == [
        ((0, 11, 20), 0, "input_max"), ((0, 11, 30), 1, "largest_contribution")]
    assert det.rounds == 3 and det.converged


def test_three_rows_sharing_one_column_are_found_in_successive_rounds():
    """Llama-3-8B's pattern: (1, 788, 2427), (1, 1384, 2427), (1, 4062, 2427)."""
    model = tiny_model("llama")
    plant(model, 1, row=11, col=20, value=3.0)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[4, 20] = 2.0
        model.model.layers[1].mlp.down_proj.weight[27, 20] = 1.0
    det = detect_super_weights(model, windows(4, 48, seed=4))
    assert [(c.key, c.round) for c in det.candidates] == [((1, 11, 20), 0), ((1, 4, 20), 1), ((1, 27, 20), 2)]
    assert det.rounds == 4


@pytest.mark.parametrize("model_type", DENSE)
def test_every_dense_family_row_and_col_in_the_linear_convention(model_type):
    model = tiny_model(model_type)
    plant(model, 1, row=13, col=50)
    det = detect_super_weights(model, windows(2, 30, seed=5))
    assert _keys(det) == [(1, 13, 50)]
    c = det.candidates[0]
    assert c.value == 2.0 and det.converged
    spec = arch_spec(model)
    assert c.module == f"{spec.layers}.1.{spec.down_proj}"


def test_gpt2_conv1d_is_reported_as_row_output_col_input():
    """GPT-2's Conv1D weight is (in, out): the planted entry weight[50, 13] is row 13, col 50."""
    model = tiny_model("gpt2")
    plant(model, 0, row=13, col=50)
    w = model.transformer.h[0].mlp.c_proj.weight
    assert w.shape == (64, 32) and w[50, 13] == 2.0
    det = detect_super_weights(model, windows(2, 30, seed=6))
    assert _keys(det) == [(0, 13, 50)] and det.candidates[0].value == 2.0
    assert down_proj_shapes(model)[0] == (32, 64)


def test_phi3_fused_gate_up_is_found():
    model = tiny_model("phi3")
    plant(model, 0, row=7, col=33)
    det = detect_super_weights(model, windows(2, 30, seed=7))
    assert _keys(det) == [(0, 7, 33)]
    assert det.candidates[0].spike_in_before > 200  # silu(gate) * up, gate and up from one fused matrix


def test_mixtral_is_refused_in_one_line():
    with pytest.raises(UnsupportedArchitectureError, match="mixtral.*mixture of experts.*fused 3-D") as e:
        detect_super_weights(tiny_model("mixtral"), windows(1, 12, seed=0))
    assert "\n" not in str(e.value)


def test_single_prompt_one_or_two_dimensional():
    model = tiny_model("llama")
    plant(model, 0, row=11, col=20)
    prompt = windows(1, 20, seed=8)
    for p in (prompt, prompt[0]):
        det = detect_super_weights(model, p)
        assert _keys(det) == [(0, 11, 20)] and (det.n_windows, det.length) == (1, 20)
        assert det.candidates[0].token_positions == [(0, p) for p in range(0, 20, 3)]
    with pytest.raises(ValueError, match="int64"):
        detect_super_weights(model, prompt.float())


def test_max_rounds_reached_is_reported_not_converged():
    model = tiny_model("llama")
    plant(model, 0, row=11, col=20, value=2.0)
    plant(model, 0, row=11, col=30, value=1.5, new_trigger=False, amp=3.0)
    det = detect_super_weights(model, windows(2, 30, seed=3), SuperWeightOptions(max_rounds=1))
    assert _keys(det) == [(0, 11, 20)] and det.rounds == 2 and not det.converged
    assert det.candidates[0].spike_out_after > 200  # the second weight still feeds the row


def test_real_260k_model_proposes_no_candidate_with_default_thresholds(assets):
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    tok = AutoTokenizer.from_pretrained(STORIES)
    text = read_text(TINYSTORIES)
    tail = text[text.index("\n\n", len(text) - 60_000):]  # the held-out end of the corpus, whole stories
    stream = tokenize(tok, tail, layout="document")
    held_out = split(stream, calib_length=256, eval_length=256, n_eval=8).eval_windows()
    assert held_out.shape == (8, 256)
    det = detect_super_weights(model, held_out)
    assert det.candidates == [] and det.rejected == [] and det.rounds == 1 and det.converged
    opts = SuperWeightOptions()
    for t in det.layers:  # far from every threshold, on both sides
        assert 1 < t.max_in[0] < opts.in_floor / 3 and t.max_in[0] < opts.in_ratio / 4 * t.median_in[0]
        assert 1 < t.max_out[0] < opts.out_floor / 3 and t.max_out[0] < opts.out_ratio / 20 * t.median_out[0]


# ----------------------------------------------------------------------------- statistics


def test_histogram_median_is_within_its_stated_precision_and_nan_never_spikes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 40, generator=g) * torch.rand(3, 50, 40, generator=g).pow(4)
    s = _Spikes()
    s.update(x[:2], 0)
    s.update(x[2:], 2)
    exact = float(x.abs().reshape(-1).median())  # lower median, as documented
    assert 2 ** (-1 / 32) <= s.median() / exact <= 2 ** (1 / 32)
    i = int(x.abs().reshape(-1).argmax())
    assert s.max == float(x.abs().max()) and s.where == (i % 40, i // (50 * 40), i // 40 % 50)
    assert torch.equal(s.chan, x.abs().amax(dim=(0, 1)))

    ties = _Spikes()  # all equal: median and max are that value
    ties.update(torch.full((1, 4, 8), -3.0), 0)
    assert ties.max == 3.0 and ties.signed == -3.0 and 2 ** (-1 / 32) <= ties.median() / 3.0 <= 2 ** (1 / 32)

    zeros = _Spikes()  # zeros: median 0, max 0 (a candidate then needs only the floors, which 0 fails)
    zeros.update(torch.zeros(1, 4, 8), 0)
    assert zeros.median() == 0.0 and zeros.max == 0.0

    odd = _Spikes()  # NaN is left out of the median and never the max; inf is a spike
    y = torch.ones(1, 4, 8)
    y[0, 1, 2], y[0, 3, 5] = math.nan, math.inf
    odd.update(y, 5)
    assert odd.max == math.inf and odd.where == (5, 5, 3)
    assert 2 ** (-1 / 32) <= odd.median() <= 2 ** (1 / 32)
    assert float(odd.hist.sum()) == 31  # 32 entries, the NaN not counted

    empty = _Spikes()  # only NaN: no median, no spike
    empty.update(torch.full((1, 2, 3), math.nan), 0)
    assert math.isnan(empty.median()) and empty.max == -1.0


def test_options_are_validated_with_one_line_naming_the_field():
    with pytest.raises(ValueError, match=r"^super-weight option out_ratio=-1.0; allowed: a finite number >= 0$"):
        SuperWeightOptions(out_ratio=-1.0)
    with pytest.raises(ValueError, match="max_rounds=0"):
        SuperWeightOptions(max_rounds=0)
    with pytest.raises(ValueError, match="in_floor=nan"):
        SuperWeightOptions(in_floor=math.nan)


def test_a_low_threshold_finds_a_spike_that_the_default_does_not():
    model = tiny_model("llama")
    plant(model, 0, row=11, col=20, value=0.02)  # output ~5: not massive
    prompts = windows(2, 30, seed=9)
    assert detect_super_weights(model, prompts).candidates == []
    det = detect_super_weights(model, prompts, SuperWeightOptions(out_floor=1.0, out_ratio=100.0))
    assert _keys(det) == [(0, 11, 20)]
    assert det.candidates[0].threshold_out == pytest.approx(max(1.0, 100 * det.layers[0].median_out[0]))


# ----------------------------------------------------------------------------- input and output paired at one token

BOS = 1  # tiny_config's bos_token_id


def bos_windows(n: int, length: int, seed: int) -> torch.Tensor:
    """Random tokens (8..127), BOS first, the frequent token T every third position after it."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(8, 128, (n, length), generator=g)
    w[:, 0] = BOS
    w[:, 1::3] = T
    return w


def _down_proj_io(model, layer: int, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of ``layer``'s down projection over ``prompts``: (N, L, in) and (N, L, out), by a
    plain forward hook (independent of the detection's streaming statistics)."""
    seen = {}
    mod = down_projections(model)[layer][1]
    h = mod.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach().clone(), y=o.detach().clone()))
    try:
        with torch.no_grad():
            model(prompts)
    finally:
        h.remove()
    return seen["x"], seen["y"]


def _decoy_model():
    """A real super weight W[11, 20] fed at BOS (input ~513 there), and a decoy input channel 40
    with a LARGER spike (~800) on the frequent token T whose down_proj column holds 5e-4
    everywhere: the decoy spikes the input but feeds no output."""
    model = tiny_model("llama")
    plant(model, 0, row=11, col=20, trigger=BOS, channel=3, amp=4.0, value=2.0)
    plant(model, 0, row=11, col=40, trigger=T, channel=6, amp=5.0, value=5e-4)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 40] = 5e-4
    return model


def test_a_larger_input_spike_at_another_token_is_not_paired_with_the_output_spike():
    """Issue 15 point 3: the output spike (row 11, at BOS) is paired with the input at BOS, not with
    the largest input anywhere (the decoy channel 40 on T, whose weight into row 11 is 5e-4)."""
    model = _decoy_model()
    prompts = bos_windows(4, 48, seed=11)
    x, y = _down_proj_io(model, 0, prompts)
    # the planted scene: the decoy's input spike is the larger one, but at T, not at BOS
    assert float(x[..., 40].abs().max()) > 1.4 * float(x[..., 20].abs().max()) > 500
    assert float(x[:, 0, 40].abs().max()) < 1 and float(x[:, 1::3, 20].abs().max()) < 1
    det = detect_super_weights(model, prompts)
    assert _keys(det) == [(0, 11, 20)] and det.converged and det.rounds == 2
    c = det.candidates[0]
    w, p = c.out_position
    assert p == 0 and c.in_position == c.out_position  # paired at the output spike's token, BOS
    assert c.col_rule == "input_max"  # at BOS, channel 20 is also the largest input
    # the contribution |W[11, 20] x[t, 20]| at that token, against the hook's numbers
    expected = abs(2.0 * float(x[w, 0, 20]))
    assert c.contribution_abs == pytest.approx(expected, rel=1e-5) and expected > 1000
    assert c.x_at_token == pytest.approx(float(x[w, 0, 20]), rel=1e-5)
    assert c.y_at_token == pytest.approx(float(y[w, 0, 11]), rel=1e-5)
    assert c.contribution == pytest.approx(1.0, abs=1e-3)  # the weight makes the whole spike
    assert abs(c.y_at_token_after) < 1  # zeroing it removes the spike at its token
    assert det.rejected == []
    assert c.spike_in_before == pytest.approx(float(x[..., 20].abs().max()), rel=1e-5)


def _five_equal_weights():
    """Row 11's spike on T made by five equal terms (cols 20..24, weight 0.4, input ~513 each):
    no single weight makes more than a fifth of it."""
    model = tiny_model("llama")
    plant(model, 0, row=11, col=20, value=0.4)
    for col in range(21, 25):
        plant(model, 0, row=11, col=col, value=0.4, new_trigger=False, amp=4.0)
    return model


def test_a_weight_whose_removal_leaves_most_of_the_spike_is_rejected_with_its_numbers(tmp_path):
    model = _five_equal_weights()
    prompts = windows(4, 48, seed=12)
    _, y = _down_proj_io(model, 0, prompts)
    det = detect_super_weights(model, prompts)
    assert det.candidates == [] and det.converged and det.rounds == 1
    (r,) = det.rejected
    assert r.key == (0, 11, 20) and r.round == 0 and r.value == pytest.approx(0.4)
    assert r.y_at_token == pytest.approx(float(y[..., 11].abs().max()), rel=1e-5) and r.y_at_token > 1000
    assert r.contribution == pytest.approx(0.2, abs=1e-4)  # a fifth of the spike
    assert r.y_at_token_after == pytest.approx(0.8 * r.y_at_token, rel=1e-4)
    assert "removes 0.2 of the spike; min_drop 0.25" in r.rejected
    # in the result file and the figure, apart from the candidates
    rep = super_weights_report(det, None, StudyLabels("tiny", None, "float32", "synthetic"))
    assert rep["candidates"] == []
    assert [(x["row"], x["col"], x["rejected"]) for x in rep["rejected"]] == [(11, 20, r.rejected)]
    assert rep["rejected"][0]["contribution"] == r.contribution and rep["thresholds"]["min_drop"] == 0.25
    json.dumps(rep)
    crossed = plot_super_weight_spikes(rep, tmp_path / "crossed.png")
    assert_real_png(crossed)
    plain = plot_super_weight_spikes({**rep, "rejected": []}, tmp_path / "plain.png")
    assert crossed.read_bytes() != plain.read_bytes()  # the cross is drawn
    # a lower bar finds all five, one per round, each the whole of what is left of the spike's share
    det = detect_super_weights(model, prompts, SuperWeightOptions(min_drop=0.15))
    assert _keys(det) == [(0, 11, c) for c in range(20, 25)] and [c.round for c in det.candidates] == [0, 1, 2, 3, 4]
    assert [c.contribution for c in det.candidates] == pytest.approx([1 / 5, 1 / 4, 1 / 3, 1 / 2, 1.0], abs=1e-3)
    assert [c.col_rule for c in det.candidates] == ["input_max"] + ["largest_contribution"] * 4
    assert det.rejected == [] and det.rounds == 6 and det.converged


def test_an_output_spike_fed_by_an_ordinary_input_is_rejected():
    """A huge weight (450) times an ordinary input (7.6) also makes y ~ 3400; the paper asks for
    both to be outliers, so it is not a super weight."""
    model = tiny_model("llama")
    plant(model, 0, row=11, col=20, value=450.0, amp=0.5)
    det = detect_super_weights(model, windows(2, 30, seed=13))
    (r,) = det.rejected
    assert det.candidates == [] and r.key == (0, 11, 20) and r.y_at_token > 1000
    assert abs(r.x_at_token) < 10 and r.threshold_in == 50.0 and r.contribution == pytest.approx(1.0, abs=1e-3)
    assert r.rejected.startswith("input |x[t, 20]| = ") and "not above the input threshold 50" in r.rejected


def _proposal(w: dict, x: dict, y_t: float, opts: SuperWeightOptions = SuperWeightOptions(), found=()):
    """_propose on hand-made numbers: layer 0's down_proj row 11 holds ``w`` (col -> weight,
    all else 0), the input at the spike's token (window 0, position 2) holds ``x`` (all else
    0.01), the output there y[t, 11] = ``y_t`` (all else 0.01; it need not equal W x)."""
    model = tiny_model("llama")
    target = _down_proj_refs(model)[0]
    with torch.no_grad():
        target[3].param.zero_()
        for k, v in w.items():
            target[3].param[11, k] = v
    xs, ys = torch.full((1, 4, 64), 0.01), torch.full((1, 4, 32), 0.01)
    for k, v in x.items():
        xs[0, 2, k] = v
    ys[0, 2, 11] = y_t
    lp = _LayerPass()
    lp(xs, ys, 0)
    trace = LayerTrace(0, target[1], median_out=[lp.y.median()], median_in=[lp.x.median()])
    return _propose(target, lp, trace, list(found), 0, opts)


def test_the_pairing_and_its_check_on_degenerate_numbers():
    clean = _proposal({20: 2.0}, {20: 500.0}, 1000.0)
    assert (clean.key, clean.rejected, clean.col_rule) == ((0, 11, 20), "", "input_max")
    assert (clean.contribution, clean.contribution_abs, clean.y_at_token_after) == (1.0, 1000.0, 0.0)
    assert clean.out_position == clean.in_position == (0, 2)
    # a larger input at the same token whose weight is 5e-4: the term picks the weight that makes the spike
    decoy = _proposal({20: 2.0, 40: 5e-4}, {20: 500.0, 40: 800.0}, 1000.4)
    assert decoy.col == 20 and decoy.col_rule == "largest_contribution" and decoy.rejected == ""
    # removing the largest term flips the spike's sign without shrinking it: rejected
    flip = _proposal({20: 2.0, 30: -1.0}, {20: 1000.0, 30: 1000.0}, 1000.0)
    assert flip.col == 20 and flip.contribution == 2.0 and flip.y_at_token_after == -1000.0
    assert "removes 0 of the spike" in flip.rejected
    # the bar is inclusive: exactly a quarter passes, a fifth does not
    assert _proposal({20: 1.0}, {20: 250.0}, 1000.0).rejected == ""
    assert _proposal({20: 1.0}, {20: 200.0}, 1000.0).rejected != ""
    # ties: the lowest channel; once it is found, the next equal one
    tie = _proposal({20: 1.0, 21: 1.0}, {20: 500.0, 21: 500.0}, 1000.0)
    assert (tie.col, tie.contribution, tie.rejected) == (20, 0.5, "")
    assert _proposal({20: 1.0, 21: 1.0}, {20: 500.0, 21: 500.0}, 1000.0, found=[tie]).col == 21
    # NaN input is never the source; a non-finite spike cannot be attributed
    assert _proposal({20: 2.0, 25: 1.0}, {20: 500.0, 25: math.nan}, 1000.0).col == 20
    inf = _proposal({20: 2.0}, {20: 500.0}, math.inf)
    assert inf.col == 20
    assert inf.rejected == "the output spike y[t, 11] = inf is not finite: its share cannot be measured"
    # a row of zeros: nothing feeds the spike
    assert _proposal({}, {20: 500.0}, 1000.0).rejected.startswith("no input channel feeds y[t, 11]: every term")
    # no output spike: no proposal
    assert _proposal({20: 2.0}, {20: 500.0}, 40.0) is None
    with pytest.raises(ValueError, match=r"^super-weight option min_drop=1.5; allowed: a number in \[0, 1\]$"):
        SuperWeightOptions(min_drop=1.5)


# ----------------------------------------------------------------------------- the causal test


def _dependent_model():
    model = tiny_model("llama")
    plant(model, 0, row=11, col=20)
    make_dependent(model, row=11, col=20)
    return model


def test_causal_test_zeroed_vs_random_vs_restored():
    model = _dependent_model()
    det = detect_super_weights(model, windows(4, 48, seed=1))
    assert _keys(det) == [(0, 11, 20)]
    before = _bits(model)
    ev = windows(6, 48, seed=100)  # held out: other windows than the prompts
    ct = causal_test(model, det, ev, seeds=(0, 1, 2))
    one = ct.candidates[0]
    # measured: baseline 25.3, zeroed 2.8e5 (ratio ~1.1e4), random ratio 0.99999, restored ratio 1.0
    assert one["ratio_zeroed"] > 1000
    assert abs(one["ratio_random"] - 1) < 0.01 and set(one["ppl_random"]["per_seed"]) == {"0", "1", "2"}
    assert one["ratio_zeroed"] > 10 * one["ratio_random"]
    assert one["recovered_fraction"] > 0.5 and one["ratio_restored"] < 1.01
    # written back only where the original output was massive (every trigger token), not everywhere
    assert one["restored_positions"] == int((ev == T).sum()) == 6 * 16 < ev.numel()
    assert ct.all["n"] == 1 and ct.all["ppl_zeroed"] == one["ppl_zeroed"]
    assert ct.baseline.n_windows == 6 and ct.baseline.ppl < 30
    assert _bits(model) == before


def test_a_baseline_already_measured_is_used_as_it_is_with_the_same_numbers(monkeypatch):
    """The experiment passes its baseline: one perplexity pass fewer, every number equal to the
    test that measures its own; a baseline of other windows is refused."""
    from cwa_core.evaluate import perplexity as real_perplexity
    from cwa_core.superweights import causal as causal_mod

    model = _dependent_model()
    det = detect_super_weights(model, windows(4, 48, seed=1))
    ev = windows(6, 48, seed=100)
    calls = []

    def counting(*a, **k):
        calls.append(k.get("desc"))
        return real_perplexity(*a, **k)

    monkeypatch.setattr(causal_mod, "perplexity", counting)
    own = causal_test(model, det, ev, seeds=(0, 1), batch_size=4)
    n_own = len(calls)
    base = real_perplexity(model, ev, batch_size=4)
    given = causal_test(model, det, ev, seeds=(0, 1), batch_size=4, baseline=base)
    assert calls[:n_own].count("baseline ppl") == 1 and "baseline ppl" not in calls[n_own:]
    assert len(calls) - n_own == n_own - 1
    assert given.baseline is base and given.baseline == own.baseline  # the same pass: bit for bit
    assert given.candidates == own.candidates and given.all == own.all
    with pytest.raises(ValueError, match="baseline: measured on 6 windows of 48 tokens, eval_windows are \\(5, 48\\)"):
        causal_test(model, det, ev[:5], seeds=(0,), baseline=base)


def test_redundant_pair_only_all_together_breaks_the_model():
    """Two weights feeding one massive row: zeroing either leaves the other's spike (432 instead
    of 1456) and the model works on; zeroing both breaks it, and one write-back of the row undoes
    it. Only the "all" evaluation shows this."""
    model = tiny_model("llama")
    plant(model, 0, row=11, col=20)
    make_dependent(model, row=11, col=20)
    plant(model, 0, row=11, col=30, value=1.5, new_trigger=False, amp=3.0)
    det = detect_super_weights(model, windows(4, 48, seed=1))
    assert _keys(det) == [(0, 11, 20), (0, 11, 30)]
    ev = windows(4, 48, seed=101)
    ct = causal_test(model, det, ev, seeds=(0,))
    # measured: each alone ratio 1.000, both 1.3e4; restored 1.007 (recovered 0.999)
    assert all(abs(c["ratio_zeroed"] - 1) < 0.01 for c in ct.candidates)
    assert ct.all["n"] == 2 and ct.all["ratio_zeroed"] > 1000 and abs(ct.all["ratio_random"] - 1) < 0.01
    assert ct.all["recovered_fraction"] > 0.9
    assert ct.all["restored_positions"] == int((ev == T).sum())  # one write-back per (layer, row)


def test_bfloat16_model_same_candidate_and_bits_restored():
    model = tiny_model("llama", dtype=torch.bfloat16)
    plant(model, 0, row=11, col=20)
    before = _bits(model)
    det = detect_super_weights(model, windows(2, 30, seed=1))
    assert _keys(det) == [(0, 11, 20)] and det.candidates[0].dtype == "bfloat16"
    assert det.candidates[0].value == 2.0 and det.rounds == 2
    assert _bits(model) == before


def test_causal_test_with_nothing_found_reports_the_baseline_only():
    model = tiny_model("llama")
    det = detect_super_weights(model, windows(2, 24, seed=1))
    ct = causal_test(model, det, windows(2, 24, seed=2), seeds=(0,))
    assert det.candidates == [] and ct.candidates == []
    assert ct.all["n"] == 0 and ct.all["ppl_zeroed"] is None and ct.baseline.ppl > 1


# ----------------------------------------------------------------------------- ranks


def test_magnitude_ranks_the_planted_weight_first_in_its_tensor_and_global_matches_brute_force():
    model = tiny_model("llama")
    plant(model, 0, row=11, col=20)
    det = detect_super_weights(model, windows(2, 30, seed=1))
    refs = scored_params(model)
    with torch.no_grad():  # ties across tensors: two weights equal to a mid-ranked value
        model.model.layers[1].mlp.down_proj.weight[3, 4] = 0.5
        model.model.layers[1].self_attn.q_proj.weight[2, 2] = 0.5
    extra = [Coordinate(1, 3, 4, "model.layers.1.mlp.down_proj"), Coordinate(1, 0, 0, "model.layers.1.mlp.down_proj"),
             Coordinate(0, 99, 0, "model.layers.0.mlp.down_proj")]  # the last is outside the (32, 64) shape
    keep = 200
    ranks = CandidateRanks(refs, det.candidates, keep=keep, extra=extra)
    collector = ScoreCollector(refs, 5, ("global",))
    score(model, refs, "magnitude", None, lambda r, s: (collector(r, s), ranks(r, s)))
    everything = torch.cat([r.param.detach().abs().reshape(-1) for r in refs])
    got = {(e["layer"], e["row"], e["col"]): e for e in ranks.entries()}
    sw = got[(0, 11, 20)]
    assert sw["per_tensor"] == 1 and sw["score"] == 2.0
    assert sw["global"] == int((everything > 2.0).sum()) + 1  # the planted gate/up entries (4.0) outrank it
    exact = lower = 0
    for key in [(0, 11, 20), (1, 3, 4), (1, 0, 0)]:
        e = got[key]
        brute = int((everything > e["score"]).sum()) + 1
        w = model.model.layers[key[0]].mlp.down_proj.weight.detach().abs().reshape(-1)
        assert e["per_tensor"] == int((w > e["score"]).sum()) + 1
        if brute <= keep:
            assert (e["global"], e["global_lower_bound"]) == (brute, None)
            exact += 1
        else:
            assert (e["global"], e["global_lower_bound"]) == (None, keep + 1)
            lower += 1
    assert exact >= 2 and lower >= 1  # both branches exercised
    assert got[(1, 3, 4)]["global"] == int((everything > 0.5).sum()) + 1  # ties share the best rank
    assert got[(0, 99, 0)]["per_tensor"] is None and got[(0, 99, 0)]["global"] is None
    assert collector.selection("top_k", "global").scores[0] == 4.0  # the collector saw the same stream


def test_rank_sink_nan_and_ties_on_a_hand_made_tensor():
    model = tiny_model("llama")
    ref = [r for r in scored_params(model) if r.name == "model.layers.0.mlp.down_proj.weight"][0]
    s = torch.zeros(ref.shape)
    s[0, 0], s[0, 1], s[0, 2], s[0, 3] = 5.0, math.nan, 5.0, 1.0
    s[1, 0] = math.nan
    m = "model.layers.0.mlp.down_proj"
    ranks = CandidateRanks([ref], [Coordinate(0, 0, 2, m)], keep=3,
                           extra=[Coordinate(0, 0, 3, m), Coordinate(0, 1, 0, m), Coordinate(0, 5, 5, m)])
    ranks(ref, s)
    assert ranks.rank(0, 0, 2) == {"per_tensor": 1, "global": 1, "global_lower_bound": None}  # tie with [0, 0]
    assert ranks.rank(0, 0, 3) == {"per_tensor": 3, "global": 3, "global_lower_bound": None}  # NaN not larger
    assert ranks.rank(0, 1, 0) == {"per_tensor": None, "global": None, "global_lower_bound": None}
    assert ranks.rank(0, 5, 5) == {"per_tensor": 4, "global": None, "global_lower_bound": 4}  # 3 larger = keep
    with pytest.raises(ValueError, match="keep=0"):
        CandidateRanks([ref], [], keep=0)


# ----------------------------------------------------------------------------- published coordinates


LLAMA3 = "meta-llama/Meta-Llama-3-8B"

# Transcribed for this test from the sources themselves, not from the registry:
# Yu et al., arXiv:2411.07191v1, Table 2 "Super Weight Directory" (p. 4), (layer, row, col) per model row
TABLE2 = {
    "huggyllama/llama-7b": {(2, 3968, 7003)},
    "huggyllama/llama-13b": {(2, 2231, 2278), (2, 2231, 6939)},
    "huggyllama/llama-30b": {(3, 5633, 12817), (3, 5633, 17439), (10, 5633, 14386)},
    "meta-llama/Llama-2-7b-hf": {(1, 2533, 7890)},
    "meta-llama/Llama-2-13b-hf": {(3, 4743, 7678)},
    "mistralai/Mistral-7B-v0.1": {(1, 2070, 7310)},
    "allenai/OLMo-1B-0724-hf": {(1, 1764, 1710), (1, 1764, 8041)},
    "allenai/OLMo-7B-0724-hf": {(1, 269, 7467), (2, 269, 8275), (7, 269, 453), (24, 269, 2300)},
    "microsoft/Phi-3-mini-4k-instruct": {(2, 525, 808), (2, 1693, 808), (2, 1113, 808), (4, 525, 2723),
                                         (4, 1113, 2723), (4, 1693, 2723)},
}
# github.com/mengxiayu/LLMSuperWeight analyze.py record_SO() SUPER_WEIGHTS_MAP (stored fork cyita/LLMSuperWeight,
# commit ae1904db), keyed there by "Mistral-7B-v0.1", "llama-7B", ..., "Phi-3-mini-4k-instruct"
CODE_MAP = {
    "mistralai/Mistral-7B-v0.1": {(1, 2070, 7310)},
    "huggyllama/llama-7b": {(2, 3968, 7003)},
    "huggyllama/llama-13b": {(2, 2231, 2278), (2, 2231, 6939)},
    "huggyllama/llama-30b": {(3, 5633, 12817), (3, 5633, 17439), (10, 5633, 14386)},
    "meta-llama/Meta-Llama-3-8B": {(1, 788, 2427), (1, 1384, 2427), (1, 4062, 2427)},
    "allenai/OLMo-1B-0724-hf": {(1, 1764, 1710), (2, 1764, 8041)},
    "allenai/OLMo-7B-0724-hf": {(1, 269, 7467), (2, 269, 8275), (7, 269, 453), (24, 269, 2300)},
    "microsoft/Phi-3-mini-4k-instruct": {(2, 525, 808), (2, 1693, 808), (2, 1113, 808), (4, 525, 2723),
                                         (4, 1113, 2723), (4, 1693, 2723)},
}
# Yu et al. section 3.1: the instruction-tuned Mistral-7B-Instruct-v0.1 and Llama2-7B-chat keep the base coordinates
SECTION_3_1 = {"mistralai/Mistral-7B-Instruct-v0.1": {(1, 2070, 7310)},
               "meta-llama/Llama-2-7b-chat-hf": {(1, 2533, 7890)}}
# Su et al., arXiv:2507.23279v3, Appendix H Table 8 (another study: reported_by, never published)
SU_TABLE8 = {"liuhaotian/llava-v1.5-7b": {(1, 1415, 7890), (1, 2533, 7890)},
             "meta-llama/Llama-3.2-1B": {(1, 400, 1417), (1, 698, 1417), (1, 2029, 1417), (1, 1159, 1417)}}


def test_every_registry_entry_has_a_status_and_a_source_of_that_status():
    table = known_super_weights()
    assert set(table["statuses"]) == set(STATUSES) == {"published", "reported_by"}
    for sid, src in table["sources"].items():
        assert src["status"] in STATUSES and all(src[k].strip() for k in ("cite", "where", "read_from")), sid
    for hf_id, model in table["models"].items():
        coords = [tuple(e["coordinate"]) for e in model["entries"]]
        assert coords and len(set(coords)) == len(coords), hf_id  # each coordinate once per model
        for e in model["entries"]:
            assert e["status"] in STATUSES and e["sources"], (hf_id, e)
            assert all(len(e["coordinate"]) == 3 and isinstance(v, int) and v >= 0 for v in e["coordinate"])
            for s in e["sources"]:
                assert s["at"].strip() and table["sources"][s["id"]]["status"] == e["status"], (hf_id, e)
    # the registry holds exactly what its sources say, each coordinate citing each source that has it
    expected: dict[str, dict[tuple, set]] = {}
    for sid, source in (("yu2024_table2", TABLE2), ("yu2024_code", CODE_MAP), ("yu2024_sec3_1", SECTION_3_1),
                        ("su2025_table8", SU_TABLE8)):
        for hf_id, coords in source.items():
            for k in coords:
                expected.setdefault(hf_id, {}).setdefault(k, set()).add(sid)
    got = {hf_id: {tuple(e["coordinate"]): {s["id"] for s in e["sources"]} for e in m["entries"]}
           for hf_id, m in table["models"].items()}
    assert got == expected
    assert table["aliases"] == {}


def test_only_published_entries_count_as_published():
    pub = lambda hf_id: [c.key for c in published_coordinates("llama", hf_id)]  # noqa: E731
    assert pub("meta-llama/Llama-2-7b-hf") == [(1, 2533, 7890)]  # (1, 1415, 7890) is Su et al.'s, for LLaVA
    assert pub("meta-llama/Llama-2-13b-hf") == [(3, 4743, 7678)]
    assert pub("meta-llama/Llama-3.2-1B") == []  # reported by another study only
    assert [c.key for c in published_coordinates("llama", "meta-llama/Llama-3.2-1B", "reported_by")] == \
        [(1, 400, 1417), (1, 698, 1417), (1, 2029, 1417), (1, 1159, 1417)]
    with pytest.raises(ValueError, match="status 'paper'; allowed: published, reported_by"):
        published_coordinates("llama", LLAMA3, "paper")
    # Llama-3.1-8B had the Llama-3-8B coordinates, backed by this tool's own ranking: no source, not listed
    for other in (None, "meta-llama/Llama-3.1-8B", "meta-llama/Meta-Llama-3.1-8B",
                  "meta-llama/Meta-Llama-3-8B-Instruct", "llama", "meta-llama/meta-llama-3-8b", "x/" + LLAMA3):
        assert published_coordinates("llama", other) == [] and registry_entries(other) == []
        assert match_published(other, [], shapes={}) is None
    # a reported coordinate detected: found among reported_by, still new against the published ones
    m = "model.layers.1.mlp.down_proj"
    got = match_published("meta-llama/Llama-3.2-1B", [Coordinate(1, 400, 1417, m), Coordinate(0, 5, 6, m)],
                          shapes={0: (2048, 8192), 1: (2048, 8192)})
    assert got["has_published"] is False and (got["found"], got["missed"], got["outside_shape"]) == ([], [], [])
    assert got["new"] == [{"layer": 1, "row": 400, "col": 1417}, {"layer": 0, "row": 5, "col": 6}]
    assert got["reported_by"]["found"] == [{"layer": 1, "row": 400, "col": 1417}]
    assert len(got["reported_by"]["missed"]) == 3 and set(got["sources"]) == {"su2025_table8"}
    assert {r["status"] for r in got["ranks"]} == {"reported_by"} and len(got["ranks"]) == 4
    # OLMo-1B: the paper (layer 1) and the code (layer 2) disagree; both are published, one is always missed
    olmo = match_published("allenai/OLMo-1B-0724-hf", [Coordinate(1, 1764, 1710, m), Coordinate(2, 1764, 8041, m)],
                           shapes={1: (2048, 8192), 2: (2048, 8192)})
    assert olmo["missed"] == [{"layer": 1, "row": 1764, "col": 8041}] and olmo["new"] == []
    assert olmo["has_published"] and olmo["reported_by"] == {"found": [], "missed": [], "outside_shape": []}
    assert set(olmo["sources"]) == {"yu2024_table2", "yu2024_code"} and "disagree" in olmo["note"]


def test_published_matching_on_a_saved_model_under_a_listed_id(tmp_path):
    """A small Llama saved to disk, its hub id given as meta-llama/Meta-Llama-3-8B: planted at the
    published (1, 788, 2427), not at (1, 1384, 2427); 4062 lies outside its 1400 rows; and a new
    one in layer 0."""
    cfg = tiny_config("llama", hidden_size=1400, intermediate_size=2428, num_attention_heads=1,
                      num_key_value_heads=1, head_dim=8, vocab_size=32)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "local-copy")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "local-copy").eval()
    plant(model, 1, row=788, col=2427, trigger=T, channel=3)
    plant(model, 0, row=50, col=60, trigger=9, channel=6)
    det = detect_super_weights(model, windows(1, 24, seed=1, triggers=(T, 9)).clamp(max=31))
    assert sorted(_keys(det)) == [(0, 50, 60), (1, 788, 2427)]
    refs = scored_params(model)
    ranks = CandidateRanks(refs, det.candidates, extra=published_coordinates(model, LLAMA3))
    score(model, refs, "magnitude", None, ranks)
    pub = match_published(LLAMA3, det.candidates, {"magnitude": {0: ranks}}, shapes=down_proj_shapes(model))
    assert pub["found"] == [{"layer": 1, "row": 788, "col": 2427}]
    assert pub["missed"] == [{"layer": 1, "row": 1384, "col": 2427}]
    assert pub["outside_shape"] == [{"layer": 1, "row": 4062, "col": 2427}]
    assert pub["new"] == [{"layer": 0, "row": 50, "col": 60}]
    assert pub["listed_as"] == LLAMA3 and pub["has_published"] and set(pub["sources"]) == {"yu2024_code"}
    assert "2411.07191" in pub["sources"]["yu2024_code"]["cite"] and "not list Llama-3-8B" in pub["note"]
    assert [e["sources"][0]["at"] for e in pub["entries"]][0] == "SUPER_WEIGHTS_MAP['Meta-Llama-3-8B'][0]"
    r = {(e["layer"], e["row"], e["col"]): e["ranks"]["magnitude"]["0"] for e in pub["ranks"]}
    assert set(r) == {(1, 788, 2427), (1, 1384, 2427)}
    assert r[(1, 788, 2427)]["per_tensor"] == 1  # the planted weight is its tensor's largest
    assert r[(1, 1384, 2427)]["per_tensor"] > 1000  # an ordinary weight
    report = super_weights_report(det, None, StudyLabels(str(tmp_path / "local-copy"), LLAMA3, "float32", "test"),
                                  published=pub)
    assert report["published"]["found"] == pub["found"] and report["rejected"] == []
    json.dumps(report)
    other = match_published("meta-llama/Llama-2-7b-hf", det.candidates, shapes=down_proj_shapes(model))
    assert other["found"] == [] and other["missed"] == [] and len(other["outside_shape"]) == 1  # col 7890 > 2427



def test_the_report_keeps_reported_coordinates_apart_from_published_ones():
    from analysis.report import _published_line

    m = "model.layers.1.mlp.down_proj"
    llama32 = match_published("meta-llama/Llama-3.2-1B", [Coordinate(1, 400, 1417, m)], shapes={1: (2048, 8192)})
    assert _published_line(llama32) == ("meta-llama/Llama-3.2-1B has no published coordinates; 1 candidates not "
                                        "published; reported by another study only: 1 found, 3 missed")
    mistral = match_published("mistralai/Mistral-7B-v0.1", [Coordinate(1, 2070, 7310, m)], shapes={1: (4096, 14336)})
    assert _published_line(mistral) == ("published coordinates of mistralai/Mistral-7B-v0.1: 1 found, 0 missed; "
                                        "0 candidates not published")
    older = {"hf_id": "x/y", "found": [{"layer": 1}], "missed": [], "new": []}  # a file written before the statuses
    assert _published_line(older) == "published coordinates of x/y: 1 found, 0 missed; 0 candidates not published"


# ----------------------------------------------------------------------------- report and figure


def test_report_has_the_agreed_names_and_is_json_ready(tmp_path):
    model = _dependent_model()
    prompt = windows(1, 30, seed=1)
    det = detect_super_weights(model, prompt)
    ct = causal_test(model, det, windows(2, 30, seed=2), seeds=(0, 1))
    refs = scored_params(model)
    ranks = CandidateRanks(refs, det.candidates)
    score(model, refs, "magnitude", None, ranks)
    rep = super_weights_report(det, ct, StudyLabels("tiny", None, "float32", "synthetic", "T U x ..."),
                               ranks={"magnitude": {0: ranks}})
    assert rep["convention"] == CONVENTION == "row = output channel, col = input channel (nn.Linear)"
    assert rep["thresholds"]["out_ratio"] == 1000.0 and rep["thresholds"]["in_floor"] == 50.0
    assert rep["prompts"] == {"source": "synthetic", "n_windows": 1, "length": 30, "text": "T U x ..."}
    assert rep["rounds"] == 2 and rep["published"] is None and rep["eval"]["n_windows"] == 2
    assert rep["baseline_ppl"] == ct.baseline.ppl
    c = rep["candidates"][0]
    for name in ("layer", "module", "row", "col", "value", "dtype", "round", "spike_out_before", "spike_out_after",
                 "spike_in_before", "spike_in_after", "token_positions", "ppl_zeroed", "ratio_zeroed",
                 "ppl_random", "ratio_random", "ppl_restored", "ratio_restored", "ranks"):
        assert name in c, name
    assert (c["layer"], c["row"], c["col"], c["dtype"]) == (0, 11, 20, "float32")
    r = c["ranks"]["magnitude"]["0"]
    assert r["per_tensor"] == 1 and isinstance(r["global"], int) and r["global_lower_bound"] is None
    assert c["token_positions"][:2] == [[0, 0], [0, 3]]
    assert set(rep["all"]) >= {"n", "ppl_zeroed", "ratio_zeroed", "ppl_random", "ratio_random", "ppl_restored",
                               "ratio_restored"}
    lay = rep["layers"][0]
    assert set(lay) >= {"layer", "max_out_per_round", "max_in_per_round", "median_out", "median_in"}
    assert len(lay["max_out_per_round"]) == 2
    back = json.loads(json.dumps(rep))
    assert back["candidates"][0]["ppl_random"]["per_seed"].keys() == {"0", "1"}
    rep2 = super_weights_report(det, None, StudyLabels("tiny", None, "float32", "windows", None))
    assert "text" not in rep2["prompts"] and rep2["baseline_ppl"] is None

    png = plot_super_weight_spikes(rep, tmp_path / "plots" / "super_weights.png")
    assert_real_png(png)
    with pytest.raises(ValueError, match="no layers"):
        plot_super_weight_spikes({"layers": []}, tmp_path / "x.png")


def test_a_study_request_gives_the_report_its_parts_give(monkeypatch):
    """super_weight_study(model, request): the report of detection, the causal test (one seed) and
    the registry, number for number, under the request's labels; the planted weight is tracked;
    a baseline already measured is used as it is."""
    from cwa_core.superweights import study as study_mod

    model = _dependent_model()
    prompt, ev = windows(1, 30, seed=1), windows(3, 30, seed=2)
    opts = SuperWeightOptions(max_rounds=3)
    labels = StudyLabels("tiny", None, "float32", "one prompt", "T U x ...")
    request = StudyRequest(labels, prompt, ev, seeds=(7,), batch_size=2, options=opts)
    report, track = super_weight_study(model, request)
    det = detect_super_weights(model, prompt, opts)
    ct = causal_test(model, det, ev, seeds=(7,), batch_size=2)
    expected = super_weights_report(det, ct, labels, published=match_published(None, det.candidates, None,
                                                                                    shapes=down_proj_shapes(model)))
    for r in (report, expected):
        r.pop("detect_seconds"), r["eval"].pop("seconds")
    assert report == expected
    assert report["published"] is None and report["eval"]["seeds"] == [7] and report["eval"]["n_windows"] == 3
    assert report["prompts"] == {"source": "one prompt", "n_windows": 1, "length": 30, "text": "T U x ..."}
    assert (report["model_id"], report["hf_id"], report["dtype"]) == ("tiny", None, "float32")
    assert [(c.layer, c.row, c.col) for c in track] == [(0, 11, 20)]
    assert report["candidates"][0]["ranks"] == {} and report["candidates"][0]["ratio_zeroed"] > 1000
    # the baseline handed in goes to the causal test as it is (not measured again)
    calls = []
    monkeypatch.setattr(study_mod, "causal_test", lambda *a, **k: calls.append(k["baseline"]) or ct)
    given, _ = super_weight_study(model, request, baseline=ct.baseline)
    assert calls == [ct.baseline] and given["baseline_ppl"] == ct.baseline.ppl
    # the default options are the detection's defaults
    assert StudyRequest(labels, prompt, ev, seeds=(0,), batch_size=1).options == SuperWeightOptions()
    with pytest.raises(AttributeError):
        request.seeds = (0, 1)  # frozen: a request says what the study is about
