"""The locally trained demo model: built once per module (about 1.5 minutes of one CPU core)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from cwa_core import demo
from cwa_core.demo import DemoAssets, build_demo_corpus, demo_cache_dir, ensure_demo_assets

N_WINDOWS = 20


@pytest.fixture(scope="module")
def built(demo_assets: DemoAssets) -> tuple[DemoAssets, float]:
    """The session's demo build (conftest: one per checkout, so a fresh clone builds it from
    scratch; the smoke sweep then uses the same cache)."""
    start = time.perf_counter()
    assets = ensure_demo_assets(demo_assets.model_dir.parent, progress=False)
    return assets, time.perf_counter() - start


@pytest.fixture(scope="module")
def assets(built: tuple[DemoAssets, float]) -> DemoAssets:
    return built[0]


@pytest.fixture(scope="module")
def info(assets: DemoAssets) -> dict:
    return json.loads(assets.info_path.read_text(encoding="utf-8"))


def _ppl(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy), computed here independently of cwa_core.demo."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return math.exp(loss.item())


def test_build_layout_and_loading(built: tuple[DemoAssets, float], assets: DemoAssets) -> None:
    cache = assets.model_dir.parent
    assert assets.corpus_path.parent == cache
    assert assets.info_path.parent == assets.model_dir
    # Nothing temporary left beside the cache after a successful build.
    assert not [p.name for p in cache.parent.iterdir() if p.name.startswith(f".{cache.name}.tmp")]

    model = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    assert cfg.tie_word_embeddings
    assert cfg.max_position_embeddings >= demo.DEMO_RECIPE.seq_len
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert (assets.model_dir / "model.safetensors").is_file()

    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == cfg.vocab_size
    text = "Return a new list containing all items from the iterable."
    plain = tok(text, add_special_tokens=False).input_ids
    assert plain and 1 not in plain and 0 not in plain
    assert tok(text).input_ids == [1, *plain]
    assert tok.decode(plain) == text
    print(f"demo build took {built[1]:.1f} s")


def test_corpus_is_big_and_deterministic(assets: DemoAssets, info: dict) -> None:
    text = assets.corpus_path.read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) > 1_000_000
    assert text == build_demo_corpus()
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == info["corpus_sha256"]
    assert "\n\n" in text and len(text.split("\n\n")) > 3000


def test_tokenizer_training_is_deterministic(assets: DemoAssets) -> None:
    text = assets.corpus_path.read_text(encoding="utf-8")
    again = demo._train_tokenizer(text, demo.DEMO_RECIPE.vocab_size)
    saved = AutoTokenizer.from_pretrained(assets.model_dir)
    assert again.get_vocab() == saved.get_vocab()


def test_model_is_trained_on_heldout(assets: DemoAssets, info: dict) -> None:
    vocab = info["vocab_size"]
    assert 512 <= vocab <= 1024
    assert info["heldout_ppl"] < 0.25 * vocab
    assert info["final_train_loss"] < math.log(0.25 * vocab)

    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    text = assets.corpus_path.read_text(encoding="utf-8")
    ids = tok(text, add_special_tokens=False, verbose=False).input_ids
    assert len(ids) == info["num_tokens"]
    split = info["split_token"]
    assert split == int(len(ids) * (1 - demo.DEMO_RECIPE.holdout_fraction))
    held = torch.tensor(ids[split:])
    body = demo.DEMO_RECIPE.seq_len - 1
    starts = torch.linspace(0, len(held) - body, N_WINDOWS).long()
    windows = torch.stack([torch.cat([torch.tensor([1]), held[s : s + body]]) for s in starts])

    trained = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    ppl_trained = _ppl(trained, windows)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = AutoModelForCausalLM.from_config(trained.config)
    ppl_fresh = _ppl(fresh, windows)
    print(f"held-out ppl, {N_WINDOWS} windows: trained {ppl_trained:.1f}, random {ppl_fresh:.1f}")
    assert ppl_trained < 0.25 * vocab
    assert ppl_fresh > 3 * ppl_trained
    # The recorded number (all held-out windows) agrees with this sample.
    assert 0.5 < ppl_trained / info["heldout_ppl"] < 2.0


def test_second_call_uses_cache(assets: DemoAssets) -> None:
    weights = assets.model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    again = ensure_demo_assets(assets.model_dir.parent, progress=False)
    assert time.perf_counter() - start < 1.0
    assert again == assets
    assert weights.stat().st_mtime_ns == mtime


def test_cache_dir_follows_env_and_recipe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CWA_CACHE", raising=False)
    assert demo_cache_dir().parent == Path.home() / ".cache" / "cwa"
    monkeypatch.setenv("CWA_CACHE", str(tmp_path))
    first = demo_cache_dir()
    assert first.parent == tmp_path and first.name.startswith("demo-")
    assert demo_cache_dir() == first
    monkeypatch.setattr(demo, "DEMO_RECIPE", dataclasses.replace(demo.DEMO_RECIPE, steps=7))
    assert demo_cache_dir() != first


def test_killed_build_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def dies(out: Path, recipe: object, *, progress: bool) -> None:
        (out / "corpus.txt").write_text("half", encoding="utf-8")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_build", dies)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_assets(tmp_path / "cache", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_builder_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, assets: DemoAssets
) -> None:
    target = tmp_path / "cache"
    source = assets.model_dir.parent

    def other_process_finishes_first(out: Path, recipe: object, *, progress: bool) -> None:
        shutil.copytree(source, target)  # the other builder's rename lands first
        shutil.copytree(source, out, dirs_exist_ok=True)
        (out / "corpus.txt").write_text("ours, to be discarded", encoding="utf-8")

    monkeypatch.setattr(demo, "_build", other_process_finishes_first)
    result = ensure_demo_assets(target, progress=False)
    assert result.model_dir == target / demo.MODEL_SUBDIR
    theirs = assets.corpus_path.read_text(encoding="utf-8")
    assert result.corpus_path.read_text(encoding="utf-8") == theirs
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_foreign_folder_is_not_touched(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(FileExistsError):
        ensure_demo_assets(tmp_path, progress=False)
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "keep me"


def test_damaged_cache_is_rebuilt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, assets: DemoAssets
) -> None:
    source = assets.model_dir.parent
    target = tmp_path / "cache"
    shutil.copytree(source, target)
    (target / demo.MODEL_SUBDIR / "model.safetensors").unlink()  # e.g. deleted by hand
    calls = []

    def rebuild(out: Path, recipe: object, *, progress: bool) -> None:
        calls.append(out)
        shutil.copytree(source, out, dirs_exist_ok=True)

    monkeypatch.setattr(demo, "_build", rebuild)
    result = ensure_demo_assets(target, progress=False)
    assert len(calls) == 1
    assert (result.model_dir / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_import_has_no_side_effects() -> None:
    heavy = "{'torch', 'transformers', 'tokenizers', 'curses'}"
    code = f"import sys, cwa_core.demo; print(sorted({heavy} & set(sys.modules)))"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert out.stdout.strip() == "[]"
