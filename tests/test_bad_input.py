"""Bad input, in a sweep file or on the command line: exit status 2 and one line naming the key and
what is allowed, before anything starts (no Ray, no MLflow store or run, no results folder)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

import orchestrator
from cwa_core.sweep import runner
from conftest import ROOT, STORIES, TINYSTORIES

TEXT = TINYSTORIES.read_text()[:120_000]  # enough for the good settings, quick to tokenize


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A working folder with a small corpus, a non-UTF-8 file, a model folder without weights and
    a 30-token text; Ray may not start."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    (tmp_path / "corpus.txt").write_text(TEXT)
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 au lait, d\xe9j\xe0 vu. ".encode("latin-1") * 200)
    (tmp_path / "short.txt").write_text("Once upon a time there was a cat.")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((STORIES / "config.json").read_text())
    (tmp_path / "a_folder").mkdir()
    return tmp_path


BASE = {"name": "bad", "model": str(STORIES), "data_file": "corpus.txt", "metric": "grad_x_weight", "topk": 5,
        "mode": "per_layer", "seeds": [0, 1], "max_samples": 4, "max_length": 64, "eval_samples": 8}

# (what is changed: a dict merged into BASE, or raw YAML text), words the one line must contain
SWEEP_CASES = [
    ({"metrik": "magnitude"}, ["metrik: unknown key; allowed:", "metric"]),
    ({"topk": "many"}, ["topk: expected int"]),
    ({"topk": {"grid_search": []}}, ["topk: a grid is written", "non-empty list"]),
    ({"metric": "fisher"}, ["metric: unknown 'fisher'; allowed:", "grad_x_weight"]),
    ({"perturb": "melt"}, ["perturb: unknown 'melt'; allowed:", "bit_flip"]),
    ({"controls": ["random_k", "top_k"]}, ["controls: unknown 'top_k'; allowed: random_k, bottom_k"]),
    ({"topk": 0}, ["topk: must be a positive integer"]),
    ({"topk": -3}, ["topk: must be a positive integer"]),
    ({"topk": 100}, ["topk: 100 per tensor is more than the 64 weights", "allowed: 1..64"]),
    ({"topk": 10**9, "mode": "global"}, ["topk: 1000000000 is more than the", "allowed: 1.."]),
    ({"seeds": [0, 1.5]}, ["seeds: expected a list of int"]),
    ({"seeds": [0, True]}, ["seeds: expected a list of int"]),
    ({"max_length": 100_000}, ["max_length: 100000 tokens is above the context", "allowed: 2..512"]),
    ({"eval_length": 4096}, ["eval_length: 4096 tokens is above the context", "allowed: 2..512"]),
    ({"eval_samples": 5000}, ["eval_samples: 5000 evaluation windows", "do not fit"]),
    ({"max_samples": 5000}, ["max_samples: 5000 calibration windows", "lower max_samples"]),
    ({"data_file": "short.txt"}, ["eval_samples:", "too short"]),
    ({"data_file": "missing.txt"}, ["data_file: no such file"]),
    ({"data_file": "a_folder"}, ["data_file:", "is a directory; expected a UTF-8 text file"]),
    ({"data_file": "latin1.txt"}, ["data_file:", "is not UTF-8 text", "offset"]),
    ({"model": "noweights"}, ["model:", "holds no weight files"]),
    ({"model": "/no/such/model"}, ["model:", "no such directory"]),
    ({"perturb": "bit_flip", "perturb_bit": 40, "dtype": "fp32"}, ["perturb_bit:", "0..31"]),
    ({"perturb": "bit_flip", "perturb_bit": 40}, ["perturb_bit: bit 40 out of range for float32: allowed 0..31"]),
    ({"protocol": "paper"}, ["protocol: unknown 'paper'; allowed: heldout, published"]),
    ({"protocol": "published"}, ["eval_samples: protocol published evaluates every window"]),
    ({"resources": {"cpus_per_actor": -1}}, ["resources:", "cpus_per_actor >= 0"]),
    ({"retries": {"task_tries": 0}}, ["retries: task_tries >= 1"]),
    ({"retries": {"attempts": 2}}, ["retries.attempts: unknown key; allowed: task_tries, actor_restarts"]),
    ("name: bad\nmodel: [unclosed\n", ["--sweep: bad.yaml is not valid YAML"]),
    ("- a\n- b\n", ["sweep file: expected a mapping"]),
    ("", ["sweep file: expected a mapping"]),
    ("name: bad\nname: again\n", ["name: given twice in the sweep file (line 2)"]),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
     ["expands (through YAML aliases) to more than 100,000 values"]),
    (b"name: caf\xe9\n", ["--sweep: bad.yaml is not UTF-8 text"]),
]


def _write(case, path):
    if isinstance(case, bytes):
        path.write_bytes(case)
    elif isinstance(case, str):
        path.write_text(case)
    else:
        path.write_text(yaml.safe_dump({**BASE, **case}))


def _assert_refused(rc, capsys, place, words):
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("orchestrator.py: error: ")
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "Traceback" not in err + out
    made = sorted(p.name for p in place.iterdir())
    assert made == ["a_folder", "bad.yaml", "corpus.txt", "latin1.txt", "noweights", "short.txt"] or \
        made == ["a_folder", "corpus.txt", "latin1.txt", "noweights", "short.txt"], made  # no results, no mlflow.db


@pytest.mark.parametrize("case,words", SWEEP_CASES, ids=[f"sweep{i}" for i in range(len(SWEEP_CASES))])
def test_a_bad_sweep_file_is_refused_before_anything_starts(case, words, place, capsys):
    f = place / "bad.yaml"
    _write(case, f)
    rc = orchestrator.main(["--sweep", str(f), "--no-progress"])
    _assert_refused(rc, capsys, place, words)


FLAG_CASES = [
    (["--max-length", "100000"], ["--max-length: 100000 tokens is above the context", "allowed: 2..512"]),
    (["--eval-length", "600"], ["--eval-length: 600 tokens is above the context"]),
    (["--topk", "0"], ["--topk: must be a positive integer"]),
    (["--topk", "65"], ["--topk: 65 per tensor is more than the 64 weights"]),
    (["--topk", "x"], ["argument --topk: invalid int value: 'x'"]),
    (["--seeds", "0,1.5"], ["--seeds", "integers"]),
    (["--data-file", "latin1.txt"], ["--data-file:", "is not UTF-8 text"]),
    (["--data-file", "short.txt"], ["--eval-samples:", "too short"]),
    (["--eval-samples", "5000"], ["--eval-samples: 5000 evaluation windows"]),
    (["--model", "noweights"], ["--model:", "holds no weight files"]),
    (["--perturb", "bit_flip", "--perturb-bit", "40", "--dtype", "fp32"], ["--perturb-bit:", "0..31"]),
    (["--perturb", "bit_flip", "--perturb-bit", "20", "--dtype", "bf16"], ["--perturb-bit:", "0..15"]),
    (["--perturb", "bit_flip", "--perturb-bit", "33"], ["--perturb-bit: bit 33 out of range for float32"]),
    (["--protocol", "published", "--eval-samples", "4"], ["--eval-samples: protocol published"]),
    (["--protocol", "published"], ["--data-file: protocol published calibrates on a training text"]),
    (["--device", "cuda:7"], ["--device: device 'cuda:7' requested but CUDA is not available", "use device 'cpu'"]),
]


@pytest.mark.parametrize("extra,words", FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_bad_flags_are_refused_before_anything_starts(extra, words, place, capsys):
    argv = ["--model", str(STORIES), "--data-file", "corpus.txt", "--metric", "grad_x_weight", "--topk", "5",
            "--max-samples", "4", "--max-length", "64", "--eval-samples", "8", "--out-dir", "out", "--no-progress"]
    if "--protocol" in extra:  # a later flag wins, but an explicit --eval-samples cannot be taken back
        i = argv.index("--eval-samples")
        del argv[i:i + 2]
    rc = orchestrator.main(argv + extra)
    _assert_refused(rc, capsys, place, words)


def test_the_real_process_prints_one_line_and_leaves_no_ray_behind(tmp_path):
    """The issue's case, as a user runs it: a sweep asking for windows longer than the model's
    context exits at once with one line; no Ray process, no store, no results."""
    f = tmp_path / "long.yaml"
    f.write_text(yaml.safe_dump({**BASE, "data_file": str(TINYSTORIES), "max_length": 100_000}))
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "ray")}
    p = subprocess.run([sys.executable, str(ROOT / "orchestrator.py"), "--sweep", str(f)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "orchestrator.py: error: max_length: 100000 tokens is above the context of "
        f"{STORIES} (512 tokens, config.max_position_embeddings); allowed: 2..512"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["long.yaml"]  # no ray folder, no mlflow.db, no results


def test_yaml_is_read_with_a_safe_loader_only(place, capsys):
    """A Python object tag is refused as bad YAML, never constructed."""
    f = place / "bad.yaml"
    f.write_text("name: !!python/object/apply:os.system ['touch pwned']\n")
    rc = orchestrator.main(["--sweep", str(f)])
    _assert_refused(rc, capsys, place, ["is not valid YAML"])
    assert not (place / "pwned").exists()


def test_trust_remote_code_stays_off_unless_asked(place, capsys):
    """A config that needs remote code is refused with a hint, not executed."""
    model = place / "remote"
    model.mkdir()
    cfg = json.loads((STORIES / "config.json").read_text())
    cfg.update({"model_type": "llama", "auto_map": {"AutoConfig": "evil.EvilConfig"}})
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "evil.py").write_text("open('pwned', 'w').write('x')\n")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer.model"):
        if (STORIES / name).exists():
            os.symlink(STORIES / name, model / name)
    argv = ["--model", str(model), "--data-file", "corpus.txt", "--metric", "magnitude", "--topk", "5",
            "--max-length", "64", "--eval-samples", "8", "--out-dir", "out", "--no-progress"]
    orchestrator.main(argv)
    capsys.readouterr()
    assert not (place / "pwned").exists() and not (model / "pwned").exists()


class _Payload:
    """Unpickling this runs a shell command: what a booby-trapped checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_checkpoint_is_loaded_with_weights_only_never_executed(place, capsys):
    """A .bin checkpoint whose pickle would run code is refused (torch's weights_only loading),
    with one line; the code never runs."""
    import torch

    model = place / "trapped"
    model.mkdir()
    (model / "config.json").write_text((STORIES / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if (STORIES / name).exists():
            os.symlink(STORIES / name, model / name)
    marker = place / "pwned"
    torch.save({"model.embed_tokens.weight": _Payload(str(marker))}, model / "pytorch_model.bin")
    rc = orchestrator.main(["--model", str(model), "--data-file", "corpus.txt", "--metric", "magnitude", "--topk", "5",
                            "--max-length", "64", "--eval-samples", "8", "--out-dir", "out", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("orchestrator.py: error: --model: cannot load the weights")
    assert not marker.exists() and not (place / "out").exists()
