"""Windows and perplexity: the published convention, held-out evaluation, no overlap."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from cwa_core import data
from cwa_core.evaluate import perplexity
from conftest import STORIES, TINYSTORIES, WIKITEXT


@pytest.fixture(scope="module")
def stories():
    return AutoModelForCausalLM.from_pretrained(STORIES).eval(), AutoTokenizer.from_pretrained(STORIES)


def _full_corpus_ppl(stories, path, layout):
    model, tok = stories
    stream = data.tokenize(tok, data.read_text(path), layout=layout, source=str(path))
    other = dataclasses.replace(stream)  # a separate eval stream: every window is scored
    split = data.split(other, stream, calib_length=512, eval_length=512, n_eval=None)
    return perplexity(model, split.eval_windows(), batch_size=16)


@pytest.mark.slow
def test_reference_perplexity_tinystories(assets, stories):
    """../shared/assets/README.md: 5.353 over 751 windows, BOS at each story."""
    r = _full_corpus_ppl(stories, TINYSTORIES, "document")
    assert r.n_windows == 751 and r.window_length == 512 and r.n_tokens == 751 * 511
    assert abs(r.ppl / 5.353 - 1) < 0.01, r.ppl


@pytest.mark.slow
def test_reference_perplexity_wikitext(assets, stories):
    """../shared/assets/README.md: 125.7 over 1,583 windows, BOS at each window start (the `--bos window`
    layout of protocol heldout; protocol published, BOS once at the start, is
    tests/test_published_convention.py)."""
    r = _full_corpus_ppl(stories, WIKITEXT, "window")
    assert r.n_windows == 1583
    assert abs(r.ppl / 125.7 - 1) < 0.01, r.ppl


def test_perplexity_is_exp_mean_cross_entropy_by_hand(stories):
    model, tok = stories
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(3, 512, (5, 40), generator=g)
    with torch.no_grad():
        total, count = 0.0, 0
        for w in windows:  # one window at a time, the textbook way
            logits = model(w[None]).logits[0]
            total += F.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
            count += len(w) - 1
    r = perplexity(model, windows, batch_size=2)
    assert r.n_tokens == count == 5 * 39
    assert r.ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    assert r.nll == pytest.approx(total / count, rel=1e-5)


def _stream(n_tokens=5000, layout="window"):
    return data.TokenStream(torch.arange(n_tokens) % 500 + 3, 1, layout, "synthetic")


@pytest.mark.parametrize("layout", ["window", "document"])
def test_calibration_and_eval_windows_never_overlap(layout):
    s = _stream(layout=layout)
    split = data.split(s, None, calib_length=64, eval_length=128, n_eval=10)
    c_eval = s.content_len(128)
    eval_spans = [(int(a), int(a) + c_eval) for a in split.eval_starts]
    first_eval = min(a for a, _ in eval_spans)
    seen_eval = None
    for seed in range(20):
        starts = split.calib_starts(30, seed)
        c = s.content_len(64)
        assert len(set(starts.tolist())) == 30
        assert int(starts.max()) + c <= first_eval  # every calibration span ends before eval
        spans = sorted((int(a), int(a) + c) for a in starts)
        assert all(b0 >= a1 for (_, a1), (b0, _) in zip(spans, spans[1:]))  # no mutual overlap
        ev = split.eval_windows()
        seen_eval = ev if seen_eval is None else seen_eval
        assert torch.equal(ev, seen_eval)  # evaluation does not depend on the seed
    assert not torch.equal(split.calib_starts(30, 0), split.calib_starts(30, 1))
    # token positions: no stream position is in both sets
    calib_pos = set()
    for a in split.calib_starts(30, 0).tolist():
        calib_pos.update(range(a, a + s.content_len(64)))
    eval_pos = set()
    for a, b in eval_spans:
        eval_pos.update(range(a, b))
    assert not calib_pos & eval_pos and len(eval_pos) == 10 * c_eval


def test_window_layouts():
    s = _stream(1000, "window")
    w = s.windows(8, torch.tensor([0, 7]))
    assert w[:, 0].tolist() == [1, 1] and w[0, 1:].tolist() == s.tokens[:7].tolist()
    assert w[1, 1:].tolist() == s.tokens[7:14].tolist()
    d = _stream(1000, "document").windows(8, torch.tensor([8]))
    assert d[0].tolist() == _stream(1000).tokens[8:16].tolist()


def test_document_layout_puts_bos_before_every_story(stories):
    _, tok = stories
    s = data.tokenize(tok, "One day.\n\nTwo cats.\n\n\n\nThree.", layout="document")
    assert int((s.tokens == tok.bos_token_id).sum()) == 3 and s.tokens[0] == tok.bos_token_id


def test_token_cache_tokenizes_each_text_and_layout_once(stories):
    """The same ids as tokenize(), per (text, layout); a text that tokenizes to nothing is refused
    every time (nothing cached); equal texts from two sources share ids, not streams."""
    _, tok = stories
    cache = data.TokenCache(tok)
    text = "One day.\n\nTwo cats.\n\n\n\nThree."
    for layout in data.LAYOUTS:
        got = cache.stream(text, layout=layout, source="a")
        again = cache.stream(text, layout=layout, source="b")
        want = data.tokenize(tok, text, layout=layout, source="a")
        assert torch.equal(got.tokens, want.tokens) and got.tokens.dtype == want.tokens.dtype == torch.long
        assert (got.bos_id, got.layout, got.source) == (want.bos_id, want.layout, "a")
        assert again.tokens is got.tokens and again is not got
        assert (again.bos_id, again.layout, again.source) == (want.bos_id, layout, "b")
    assert cache.tokenizations == len(data.LAYOUTS) == 3
    cache.stream(text + " ", layout="window")  # another text, by one character
    assert cache.tokenizations == 4
    for _ in range(2):
        with pytest.raises(ValueError, match="tokenizes to nothing"):
            cache.stream("", layout="window", source="empty")
    with pytest.raises(ValueError, match="unknown BOS layout"):
        cache.stream(text, layout="sentence")
    assert cache.tokenizations == 4


def test_too_few_calibration_windows_is_a_clear_error():
    split = data.split(_stream(2000), None, calib_length=100, eval_length=100, n_eval=15)
    with pytest.raises(ValueError, match="holds only"):
        split.calib_starts(10, 0)
