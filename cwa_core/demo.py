"""A tiny, locally trained demo model and corpus, built with no network and no download.

The text is the documentation that every Python installation carries: docstrings of a
fixed list of standard-library modules, their classes and functions. From it
:func:`ensure_demo_assets` trains a byte-level BPE tokenizer and a small Llama model
(about a minute and a half of one CPU core), saves both as a Hugging Face folder and
caches the result, so a fresh machine can run the whole critical-weight pipeline on a
model that has really learned something.

Held-out data: the corpus is tokenized in one piece (``tokenizer(corpus,
add_special_tokens=False)``); the model is trained on windows of the first 90% of
those tokens only, and ``demo_info.json`` records the split (``split_token``; the
character offset ``split_char`` where the held-out text begins) with the recipe,
the final train loss and the held-out perplexity.

Determinism: the same Python version gives the same corpus and tokenizer, and the
same seed gives the same weights on the same machine; weights are not promised to be
bit-identical across machines (floating-point reductions differ).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .demo_corpus import STDLIB_MODULES, build_demo_corpus  # noqa: F401 (STDLIB_MODULES: re-export)

logger = logging.getLogger(__name__)

#: Bump when the recipe changes in a way the hyperparameters do not show (corpus, code).
DEMO_VERSION = 1

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

CORPUS_FILE = "corpus.txt"
MODEL_SUBDIR = "cwa-demo"  # the folder name is the model's name in results and analyses
INFO_FILE = "demo_info.json"
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_STALE_TMP_SECONDS = 6 * 3600


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that decides the demo model; part of the cache key."""

    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 176  # 2.75x hidden
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    seq_len: int = 128  # tokens per window, BOS included
    batch_size: int = 16
    steps: int = 1000
    lr: float = 6e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    holdout_fraction: float = 0.1
    seed: int = 0
    # One thread: ~1.6x slower than two on an idle 2-core machine, but on a busy one two
    # OpenMP threads spin-wait for each other (measured up to 10x slower), and one thread
    # makes the weights independent of the core count.
    num_threads: int = 1


DEMO_RECIPE = DemoRecipe()


@dataclass(frozen=True)
class DemoAssets:
    """Paths of a complete demo build."""

    model_dir: Path  # HF folder: AutoModelForCausalLM / AutoTokenizer load it
    corpus_path: Path  # the corpus, UTF-8 text
    info_path: Path  # demo_info.json (recipe, split point, losses), inside model_dir
    train_seconds: float  # training time recorded when the cache was built

    def load_info(self) -> dict[str, Any]:
        """The contents of ``demo_info.json``."""
        return json.loads(self.info_path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- cache


def _recipe_key(recipe: DemoRecipe) -> str:
    payload = {
        "python": platform.python_version(),
        "demo_version": DEMO_VERSION,
        "recipe": dataclasses.asdict(recipe),
    }
    blob = json.dumps(payload, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:12]


def demo_cache_dir() -> Path:
    """``$CWA_CACHE`` (else ``~/.cache/cwa``) / ``demo-<hash of Python version and recipe>``."""
    root = os.environ.get("CWA_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "cwa"
    return base / f"demo-{_recipe_key(DEMO_RECIPE)}"


def _is_complete(cache_dir: Path) -> bool:
    model_dir = cache_dir / MODEL_SUBDIR
    return (
        (cache_dir / CORPUS_FILE).is_file()
        and (model_dir / INFO_FILE).is_file()
        and all((model_dir / name).is_file() for name in _MODEL_FILES)
    )


def _assets(cache_dir: Path) -> DemoAssets:
    model_dir = cache_dir / MODEL_SUBDIR
    info_path = model_dir / INFO_FILE
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if info.get("recipe") != dataclasses.asdict(DEMO_RECIPE):
        logger.warning("demo cache %s was built by another recipe; delete it to rebuild", cache_dir)
    return DemoAssets(
        model_dir=model_dir,
        corpus_path=cache_dir / CORPUS_FILE,
        info_path=info_path,
        train_seconds=float(info["train_seconds"]),
    )


def _sweep_stale_tmp(cache_dir: Path) -> None:
    """Remove temporary build folders left by killed builds long ago."""
    now = time.time()
    for path in cache_dir.parent.glob(f".{cache_dir.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(path, ignore_errors=True)


def _clear_damaged(cache_dir: Path) -> bool:
    """Move an incomplete cache folder out of the way, refusing to delete foreign data.

    Returns True when ``cache_dir`` holds a complete build (one may land meanwhile).
    """
    if _is_complete(cache_dir):
        return True
    if not cache_dir.exists() or (cache_dir.is_dir() and not any(cache_dir.iterdir())):
        return False  # an empty folder is replaced by the rename
    ours = (cache_dir / CORPUS_FILE).exists() or (cache_dir / MODEL_SUBDIR).exists()
    if not ours:
        raise FileExistsError(
            f"{cache_dir} exists, is not empty and is not a demo cache; pass an empty or new folder"
        )
    logger.warning("demo cache %s is incomplete; rebuilding it", cache_dir)
    trash = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
    old = trash / "old"
    try:
        os.replace(cache_dir, old)
    except FileNotFoundError:  # a concurrent builder moved it already
        pass
    if _is_complete(old):  # a concurrent build landed between the checks: put it back
        with contextlib.suppress(OSError):
            os.rename(old, cache_dir)
    shutil.rmtree(trash, ignore_errors=True)
    return _is_complete(cache_dir)


def demo_config(recipe: DemoRecipe = DEMO_RECIPE, *, vocab_size: int | None = None) -> Any:
    """The demo model's ``LlamaConfig``, known before anything is trained (its shapes and context
    let the command check settings at once, before the first-use build)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size or recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


#: Stands for the demo model (``model``) or its corpus (``data_file``, ``eval_file``).
BUILTIN = "builtin:demo"
BUILTIN_KEYS = ("model", "data_file", "eval_file")


def uses_builtin(values: dict) -> bool:
    """Whether any of ``values`` (settings by name) names the built-in demo."""
    return any(values.get(k) == BUILTIN for k in BUILTIN_KEYS)


def resolve_builtin(values: dict, assets: "DemoAssets | None" = None) -> dict:
    """``values`` with ``builtin:demo`` replaced by the demo model folder or corpus file,
    building (once, cached) the demo first when it is needed and ``assets`` is not given."""
    if not uses_builtin(values):
        return dict(values)
    assets = assets or ensure_demo_assets(progress=True)
    where = {"model": str(assets.model_dir), "data_file": str(assets.corpus_path), "eval_file": str(assets.corpus_path)}
    return {k: (where[k] if k in where and v == BUILTIN else v) for k, v in values.items()}


def ensure_demo_assets(cache_dir: Path | None = None, *, progress: bool = True) -> DemoAssets:
    """Return the demo model and corpus, building them first if not cached.

    ``cache_dir`` is the folder of this build (default :func:`demo_cache_dir`). A
    complete cache returns at once. Otherwise everything is built in a temporary
    sibling folder that is renamed into place only when complete, so a killed build
    leaves no half cache and concurrent builders keep whichever finished first.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else demo_cache_dir()
    if _is_complete(cache_dir):
        return _assets(cache_dir)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_tmp(cache_dir)
    if _clear_damaged(cache_dir):
        return _assets(cache_dir)
    logger.info("building the demo model and corpus in %s (no download, ~1.5 min)", cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
    try:
        _build(tmp, DEMO_RECIPE, progress=progress)
        try:
            os.rename(tmp, cache_dir)  # atomic; replaces an empty folder on POSIX
        except OSError:
            if _is_complete(cache_dir):
                logger.info("another process finished the demo build first; using its result")
            elif cache_dir.is_dir() and not any(cache_dir.iterdir()):
                cache_dir.rmdir()
                os.rename(tmp, cache_dir)
            else:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _assets(cache_dir)


# ----------------------------------------------------------------------------- build


def _train_tokenizer(corpus: str, vocab_size: int) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``<unk>``=0, ``<s>``=1, ``</s>``=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.split("\n\n"), trainer)
    # Like Llama: the default call prepends BOS; add_special_tokens=False gives plain ids.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    for token, token_id in ((UNK_TOKEN, UNK_ID), (BOS_TOKEN, BOS_ID), (EOS_TOKEN, EOS_ID)):
        if tokenizer.token_to_id(token) != token_id:
            raise RuntimeError(f"special token {token!r} did not get id {token_id}")
    return tokenizer


def _stream(ids: Any) -> Any:
    """The ids as a one-stream :class:`~cwa_core.data.TokenStream` with BOS at each window (this
    module is also loaded standalone for the corpus: the package is imported only here)."""
    from .data import TokenStream

    return TokenStream(ids, BOS_ID, "window", "demo corpus")


def _lr_at(step: int, recipe: DemoRecipe) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return recipe.lr * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * cosine)


def _build(out: Path, recipe: DemoRecipe, *, progress: bool) -> None:
    """Write corpus, tokenizer, trained model and ``demo_info.json`` under ``out``."""
    import torch

    t_start = time.perf_counter()
    corpus = build_demo_corpus()
    (out / CORPUS_FILE).write_text(corpus, encoding="utf-8")
    logger.info("demo corpus: %d characters of standard-library docstrings", len(corpus))

    raw_tok = _train_tokenizer(corpus, recipe.vocab_size)
    encoding = raw_tok.encode(corpus, add_special_tokens=False)
    ids = torch.tensor(encoding.ids, dtype=torch.long)
    split = int(len(ids) * (1 - recipe.holdout_fraction))
    split_char = encoding.offsets[split][0]
    train_ids, held_ids = ids[:split], ids[split:]
    logger.info(
        "demo tokenizer: vocab %d, %d tokens (%d held out)",
        raw_tok.get_vocab_size(), len(ids), len(held_ids),
    )

    model_dir = out / MODEL_SUBDIR
    _save_tokenizer(raw_tok, model_dir, recipe)
    config = demo_config(recipe, vocab_size=raw_tok.get_vocab_size())
    model, trained = _train_and_evaluate(config, train_ids, held_ids, recipe, progress=progress)
    model.save_pretrained(model_dir)
    logger.info(
        "demo model trained in %.0f s: final train loss %.3f, held-out perplexity %.1f (vocab %d)",
        trained["train_seconds"], trained["final_train_loss"], trained["heldout_ppl"], config.vocab_size,
    )
    info = _demo_info(recipe, corpus, ids, split, split_char, len(held_ids), model, trained)
    info["build_seconds"] = time.perf_counter() - t_start
    (model_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _save_tokenizer(raw_tok: Any, model_dir: Path, recipe: DemoRecipe) -> None:
    """Save ``raw_tok`` as a Hugging Face fast tokenizer in ``model_dir``."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw_tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=recipe.max_position_embeddings,
    )
    tokenizer.save_pretrained(model_dir)
    # The class name transformers 4 knows too (transformers 5 writes its new backend name).
    tok_config_path = model_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text(encoding="utf-8"))
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config_path.write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")


def _train_and_evaluate(config: Any, train_ids: Any, held_ids: Any, recipe: DemoRecipe, *,
                        progress: bool) -> tuple[Any, dict[str, Any]]:
    """The model trained from ``recipe.seed`` on ``train_ids`` (the caller's RNG and thread
    count left alone), and its numbers: final train loss, train seconds, held-out windows and
    perplexity."""
    import torch
    from transformers import LlamaForCausalLM

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.num_threads)
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
            torch.manual_seed(recipe.seed)
            model = LlamaForCausalLM(config).float()
            t_train = time.perf_counter()
            final_loss = _train(model, train_ids, recipe, progress=progress)
            train_seconds = time.perf_counter() - t_train
        from .evaluate import perplexity

        held_stream = _stream(held_ids)
        held = held_stream.windows(recipe.seq_len, torch.arange(held_stream.n_windows(recipe.seq_len))
                                   * held_stream.content_len(recipe.seq_len))
        heldout_ppl = perplexity(model.eval(), held, batch_size=32).ppl
    finally:
        torch.set_num_threads(previous_threads)
    return model, {"final_train_loss": final_loss, "train_seconds": train_seconds,
                   "heldout_windows": len(held), "heldout_ppl": heldout_ppl}


def _demo_info(recipe: DemoRecipe, corpus: str, ids: Any, split: int, split_char: int, n_held: int,
               model: Any, trained: dict[str, Any]) -> dict[str, Any]:
    """``demo_info.json`` (without ``build_seconds``, which the caller adds last)."""
    import tokenizers
    import torch
    import transformers

    return {
        "demo_version": DEMO_VERSION,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "recipe": dataclasses.asdict(recipe),
        "corpus_file": f"../{CORPUS_FILE}",
        "corpus_chars": len(corpus),
        "corpus_sha256": hashlib.sha256(corpus.encode("utf-8")).hexdigest(),
        "tokenization": "tokenizer(corpus, add_special_tokens=False)",
        "num_tokens": len(ids),
        "split_token": split,
        "split_char": split_char,
        "heldout_tokens": n_held,
        "heldout_windows": trained["heldout_windows"],
        "vocab_size": model.config.vocab_size,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "final_train_loss": trained["final_train_loss"],
        "heldout_loss": math.log(trained["heldout_ppl"]),
        "heldout_ppl": trained["heldout_ppl"],
        "train_seconds": trained["train_seconds"],
    }


def _train(model: Any, train_ids: Any, recipe: DemoRecipe, *, progress: bool) -> float:
    """AdamW on random windows of ``train_ids``; returns the mean loss of the last steps."""
    import torch
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(recipe.seed + 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": recipe.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=recipe.lr,
        betas=(0.9, 0.95),
    )
    high = len(train_ids) - (recipe.seq_len - 1) + 1
    train_stream = _stream(train_ids)
    recent: list[float] = []
    model.train()
    bar = tqdm(range(recipe.steps), desc="training demo model", disable=not progress, leave=False)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, recipe)
        starts = torch.randint(0, high, (recipe.batch_size,), generator=generator)
        batch = train_stream.windows(recipe.seq_len, starts)  # [BOS] + seq_len - 1 tokens from each start
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        recent = (recent + [loss.item()])[-50:]
        if step % 25 == 0:
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
    bar.close()
    model.eval()
    return sum(recent) / len(recent)
