"""Named perplexity protocols: `published` reproduces the literature's convention (the whole test
text, the model's context, calibration from another text), `heldout` the quick held-out tail;
the protocol and its settings go with every number."""
from __future__ import annotations

import hashlib
import json

import torch
from transformers import AutoTokenizer

import orchestrator
from cwa_core import data
from cwa_core.config import ExperimentConfig
from cwa_core.experiment import load_split
from conftest import STORIES, TINYSTORIES, WIKITEXT


def test_published_protocol_cuts_exactly_the_reference_windows_of_the_whole_test_text(assets):
    """The windows of the literature's WikiText-2 loop (the whole text tokenized once with the
    tokenizer's BOS, contiguous 512-token windows, the partial last one dropped: 1,580 windows;
    tests/test_published_convention.py checks the perplexity against that loop written
    independently), with calibration drawn from another text."""
    tok = AutoTokenizer.from_pretrained(STORIES)
    raw = ExperimentConfig(model=str(STORIES), metric="grad_x_weight", topk=5, protocol="published",
                           data_file=str(TINYSTORIES), eval_file=str(WIKITEXT))
    cfg = raw.with_context(512)
    assert cfg.eval_length == 512 and cfg.eval_samples is None  # min(2048, the context); every window
    split = load_split(cfg, tok)
    ids = torch.tensor(tok(data.read_text(WIKITEXT))["input_ids"])
    assert split.n_eval == 1580 and torch.equal(split.eval_windows(), ids[:1580 * 512].view(1580, 512))
    assert split.calib.source == str(TINYSTORIES) and not split.shared
    p = split.protocol
    assert p["name"] == "published" and p["window_length"] == 512 and p["eval_windows"] == 1580 and p["all_windows"]
    assert p["eval_sha256"] == hashlib.sha256(WIKITEXT.read_bytes()).hexdigest()
    assert p["eval_sha256"].startswith("173c87a5")  # the byte-exact WikiText-2 test split (assets README)
    assert p["eval_text"] == data.KNOWN_TEXTS[data.WIKITEXT2_TEST_RAW_SHA256]
    assert p["calib_source"] == str(TINYSTORIES) and p["bos"] == "tokenizer: <s> once at the start"
    assert raw.with_context(4096).eval_length == 2048 and raw.with_context(None).eval_length == 2048


def test_heldout_protocol_keeps_its_defaults_and_records_them():
    cfg = ExperimentConfig(model=str(STORIES), metric="grad_x_weight", topk=5, data_file=str(TINYSTORIES),
                           max_length=64).with_context(512)
    assert (cfg.eval_length, cfg.eval_samples) == (64, 64)
    tok = AutoTokenizer.from_pretrained(STORIES)
    split = load_split(cfg, tok)
    p = split.protocol
    assert p["name"] == "heldout" and p["eval_windows"] == 64 and not p["all_windows"] and split.shared
    assert p["eval_source"] == p["calib_source"] == str(TINYSTORIES)
    # unchanged by the published layout: BOS at every window, the text tokenized without special tokens
    assert p["bos"] == "window" and split.eval.layout == "window"
    stream = data.tokenize(tok, data.read_text(TINYSTORIES), layout="window", source=str(TINYSTORIES))
    assert torch.equal(split.eval_windows(), data.split(stream, None, calib_length=64, eval_length=64,
                                                        n_eval=64).eval_windows())
    assert bool((split.eval_windows()[:, 0] == tok.bos_token_id).all())


def test_the_command_records_the_protocol_with_every_number(tmp_path, capsys):
    """On small texts: every window of the evaluation text is evaluated, calibration comes from the
    other text, and the protocol block is in the manifest and the perturbation results."""
    ev, cal = tmp_path / "test.txt", tmp_path / "train.txt"
    ev.write_text(WIKITEXT.read_text()[:20_000])
    cal.write_text(TINYSTORIES.read_text()[:60_000])
    out = tmp_path / "out"
    assert orchestrator.main(["--model", str(STORIES), "--metric", "grad_x_weight", "--topk", "5", "--protocol",
                              "published", "--data-file", str(cal), "--eval-file", str(ev), "--eval-length", "256",
                              "--max-samples", "4", "--max-length", "64", "--out-dir", str(out), "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    res = json.loads((out / "perturbation_results.json").read_text())
    tok = AutoTokenizer.from_pretrained(STORIES)
    n_windows = len(tok(ev.read_text())["input_ids"]) // 256  # tokenized once, one BOS, contiguous windows
    assert manifest["data"]["protocol"] == res["protocol"]
    assert res["protocol"]["bos"] == "tokenizer: <s> once at the start" and res["protocol"]["eval_text"] == "another text"
    assert res["protocol"]["eval_sha256"] == hashlib.sha256(ev.read_bytes()).hexdigest()
    assert res["protocol"]["name"] == "published" and res["protocol"]["eval_windows"] == n_windows == res["eval_windows"]
    assert res["window_length"] == 256 and manifest["settings"]["eval_length"] == 256
    assert manifest["settings"]["protocol"] == "published" and res["protocol"]["calib_source"] == str(cal)


def test_published_without_texts_needs_wikitext_and_says_so_offline(tmp_path, capsys):
    rc = orchestrator.main(["--model", str(STORIES), "--metric", "magnitude", "--topk", "5", "--protocol",
                            "published", "--out-dir", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("orchestrator.py: error: --data-file: not given, and WikiText-2 (train) could not be")
    assert not (tmp_path / "out").exists()
