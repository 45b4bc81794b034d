"""Protocol `published` is the literature's WikiText-2 loop, exactly: the whole text tokenized once
with the tokenizer's own special tokens (one BOS at the start for Llama), contiguous windows from
token 0, the last partial one dropped, every next-token prediction scored (GPTQ/SparseGPT:
IST-DASLab/sparsegpt datautils.py and llama.py llama_eval; AWQ: mit-han-lab/llm-awq awq/entry.py).
The reference loop below uses transformers and torch only: no project code."""
from __future__ import annotations

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import orchestrator
from cwa_core import data
from cwa_core.config import ConfigError, ExperimentConfig
from cwa_core.experiment import baseline_perplexity, load_split
from conftest import STORIES, TINYSTORIES, WIKITEXT


def _convention_ppl(model, tokenizer, text: str, seqlen: int) -> tuple[float, int]:
    """(perplexity, windows) the way the published evaluation loops compute it."""
    ids = tokenizer(text, return_tensors="pt").input_ids  # (1, T), with the tokenizer's special tokens
    nsamples = ids.numel() // seqlen
    nll = 0.0
    with torch.no_grad():
        for i in range(0, nsamples, 8):
            batch = torch.cat([ids[:, j * seqlen:(j + 1) * seqlen] for j in range(i, min(i + 8, nsamples))])
            logits = model(batch).logits  # (B, seqlen, V)
            nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                                   reduction="sum").double().item()
    return math.exp(nll / (nsamples * (seqlen - 1))), nsamples


@pytest.mark.slow
def test_published_perplexity_equals_the_literature_loop_written_independently(assets, tmp_path):
    """The first ~250 KB of WikiText-2 test (whole lines; the whole file is measured in the README),
    512-token windows. The BOS-per-window layout this protocol had before gives another number."""
    raw = WIKITEXT.read_text(encoding="utf-8")
    text = raw[:raw.index("\n", 250_000) + 1]
    ev, cal = tmp_path / "wikitext2_test_part.raw", tmp_path / "train.txt"
    ev.write_text(text, encoding="utf-8")
    cal.write_text(TINYSTORIES.read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    expected, n = _convention_ppl(model, tok, text, 512)

    cfg = ExperimentConfig(model=str(STORIES), metric="grad_x_weight", topk=5, protocol="published",
                           data_file=str(cal), eval_file=str(ev), eval_batch_size=16).with_context(512)
    split = load_split(cfg, tok)
    got = baseline_perplexity(model, split, cfg)
    assert got.n_windows == n == len(tok(text)["input_ids"]) // 512 and n > 300
    assert got.n_tokens == n * 511
    assert got.ppl == pytest.approx(expected, rel=1e-6), (got.ppl, expected)
    assert split.protocol["bos"] == "tokenizer: <s> once at the start"
    assert split.protocol["eval_text"] == "another text"
    assert split.protocol["eval_sha256"] == hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_published_cuts_the_whole_test_text_into_the_convention_windows(assets):
    """Whole WikiText-2 test file, 512 tokens: exactly tokenizer(text) cut at multiples of 512."""
    tok = AutoTokenizer.from_pretrained(STORIES)
    cfg = ExperimentConfig(model=str(STORIES), metric="grad_x_weight", topk=5, protocol="published",
                           data_file=str(TINYSTORIES), eval_file=str(WIKITEXT)).with_context(512)
    split = load_split(cfg, tok)
    ids = torch.tensor(tok(WIKITEXT.read_text(encoding="utf-8"))["input_ids"])
    n = len(ids) // 512
    assert n == 1580 and len(ids) % 512 == 325  # a partial window of 325 tokens is left over, and dropped
    assert torch.equal(split.eval_windows(), ids[:n * 512].view(n, 512))
    assert int((split.eval_windows() == tok.bos_token_id).sum()) == 1  # one BOS, at token 0
    # calibration: the same layout on the training text, seeded windows at multiples of the window length
    calib_ids = torch.tensor(tok(TINYSTORIES.read_text(encoding="utf-8"))["input_ids"])
    starts = split.calib_starts(4, seed=3)
    assert torch.equal(split.calib_windows(4, seed=3), torch.stack([calib_ids[s:s + 128] for s in starts.tolist()]))
    assert all(s % 128 == 0 for s in starts.tolist())
    p = split.protocol
    assert (p["eval_windows"], p["window_length"], p["all_windows"]) == (1580, 512, True)
    assert p["eval_text"] == data.KNOWN_TEXTS[data.WIKITEXT2_TEST_RAW_SHA256] and "raw file" in p["eval_text"]


def test_the_datasets_join_is_rebuilt_from_the_raw_file_with_the_recorded_sha256(assets):
    """huggingface/datasets datasets/wikitext/wikitext.py, _generate_examples: a row per line of
    wiki.test.raw, the line with its newline, a whitespace-only line as "". 4,358 rows and row 1
    " = Robert Boulter = \\n" (brain-score/language brainscore_language/data/wikitext/test.py)."""
    with open(WIKITEXT, encoding="utf-8") as f:  # the loading script's own loop
        rows = [row if row.strip() else "" for row in f]
    assert len(rows) == 4358 and rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    join = "\n\n".join(rows)
    assert hashlib.sha256(join.encode("utf-8")).hexdigest() == data.WIKITEXT2_TEST_JOIN_SHA256
    assert hashlib.sha256(WIKITEXT.read_bytes()).hexdigest() == data.WIKITEXT2_TEST_RAW_SHA256
    assert data.wikitext2_join(data.read_text(WIKITEXT)) == join
    assert len(join) - len(WIKITEXT.read_text(encoding="utf-8")) == 5780  # not the same string
    assert "papers" in data.text_identity(data.WIKITEXT2_TEST_JOIN_SHA256, "x")
    assert data.text_identity("0" * 64, "wikitext-2-raw-v1/test").startswith("wikitext-2-raw-v1/test through datasets")
    assert data.text_identity("0" * 64, "/some/file.txt") == "another text"


def test_wikitext2_rows_on_degenerate_lines():
    """Whitespace-only lines become "", the last line may lack its newline, \\r\\n reads as \\n."""
    assert data.wikitext2_rows(" \n = A = \n\t \nx y\r\nlast") == ["", " = A = \n", "", "x y\n", "last"]
    assert data.wikitext2_rows("") == [] and data.wikitext2_join("") == ""
    assert data.wikitext2_join("a\n \nb\n") == "a\n" + "\n\n" + "" + "\n\n" + "b\n"


class ToyTokenizer:
    """One token per character (its code point), a BOS (id 1) and optionally an EOS (id 2) added."""

    bos_token_id = 1

    def __init__(self, bos: bool = True, eos: bool = False) -> None:
        self.bos, self.eos = bos, eos

    def __call__(self, text, add_special_tokens=True, verbose=True):
        ids = [ord(c) for c in text]
        if add_special_tokens:
            ids = [1] * self.bos + ids + [2] * self.eos
        return {"input_ids": ids}

    def convert_ids_to_tokens(self, ids):
        return [{1: "<s>", 2: "</s>"}.get(i, chr(i)) for i in ids]


def test_tokenizer_layout_windows_are_contiguous_with_one_bos_and_no_partial_window():
    s = data.tokenize(ToyTokenizer(), "abcdefghij", layout="tokenizer")  # 11 tokens: <s> a..j
    assert s.tokens.tolist() == [1, *range(97, 107)] and s.content_len(4) == 4 and s.n_windows(4) == 2
    other = data.tokenize(ToyTokenizer(), "z" * 40, layout="tokenizer")
    sp = data.split(other, s, calib_length=4, eval_length=4, n_eval=None)
    w = sp.eval_windows()
    assert w.tolist() == [[1, 97, 98, 99], [100, 101, 102, 103]]  # from token 0; "hij" (3 tokens) dropped
    assert int((w == 1).sum()) == 1 and torch.equal(w.flatten(), s.tokens[:8])
    exact = data.tokenize(ToyTokenizer(), "abcdefg", layout="tokenizer")  # 8 tokens: two whole windows
    assert data.split(other, exact, calib_length=4, eval_length=4, n_eval=None).n_eval == 2
    with pytest.raises(ValueError, match="too short for one 4-token window"):
        data.split(other, data.tokenize(ToyTokenizer(), "ab", layout="tokenizer"), calib_length=4, eval_length=4,
                   n_eval=None)
    # the heldout layouts are untouched: BOS at every window
    win = data.split(other, data.tokenize(ToyTokenizer(), "abcdefghij", layout="window"), calib_length=4,
                     eval_length=4, n_eval=None).eval_windows()
    assert win.tolist() == [[1, 97, 98, 99], [1, 100, 101, 102], [1, 103, 104, 105]]


def test_the_record_names_the_special_tokens_the_tokenizer_adds():
    assert data.special_tokens_added(ToyTokenizer()) == "tokenizer: <s> once at the start"
    assert data.special_tokens_added(ToyTokenizer(eos=True)) == "tokenizer: <s> once at the start, </s> once at the end"
    assert data.special_tokens_added(ToyTokenizer(bos=False)) == "tokenizer: no special tokens"
    assert data.tokenize(ToyTokenizer(bos=False), "ab", layout="tokenizer").tokens.tolist() == [97, 98]


def test_bos_does_not_apply_to_published(tmp_path, capsys):
    with pytest.raises(ConfigError, match="^bos: protocol published tokenizes the whole text once"):
        ExperimentConfig(model="m", metric="magnitude", topk=1, protocol="published", bos="document")
    assert ExperimentConfig(model="m", metric="magnitude", topk=1, bos="document").bos == "document"  # heldout
    rc = orchestrator.main(["--model", str(STORIES), "--metric", "magnitude", "--topk", "5", "--protocol", "published",
                            "--bos", "document", "--data-file", str(TINYSTORIES), "--eval-file", str(WIKITEXT),
                            "--out-dir", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--bos" in err[0] and "heldout only" in err[0]
    assert not (tmp_path / "out").exists()
