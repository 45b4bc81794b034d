"""Text corpora -> token windows: seeded calibration windows and held-out evaluation windows.

The text is tokenized once. Windows are non-overlapping spans of one token stream, in one of
three layouts:

* ``"tokenizer"`` (protocol ``published``): the whole text is tokenized once with the tokenizer's
  own special tokens (``tokenizer(text)``: for Llama one BOS at the very start) and cut into
  contiguous windows of ``L`` tokens from token 0, the last partial window dropped: the WikiText-2
  convention of GPTQ/SparseGPT and AWQ (sources beside :data:`WIKITEXT2_TEST_JOIN_SHA256`).
* ``bos="window"`` (``heldout``): the text is one stream; every window is ``[BOS] + L-1`` stream tokens.
* ``bos="document"`` (``heldout``): documents (separated by blank lines) each start with BOS, are
  joined, and cut into windows of ``L`` tokens. (TinyStories.)

Evaluation windows are the *last* ``n_eval`` windows of the evaluation stream and never depend
on the seed. When calibration and evaluation share a text, calibration windows are drawn (with
the seed, without replacement) only from the part of the stream before the first evaluation
window, so the two never overlap.
"""
from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

BOS_LAYOUTS = ("window", "document")  # --bos: the layouts protocol heldout lets one choose
TOKENIZER_LAYOUT = "tokenizer"  # protocol published: the tokenizer's own special tokens, text tokenized once
LAYOUTS = (*BOS_LAYOUTS, TOKENIZER_LAYOUT)

# The WikiText-2 test text, as sha256 of its UTF-8 bytes. Two strings go by that name:
# * the rows of Hugging Face `datasets` ("wikitext", "wikitext-2-raw-v1", split "test") joined with
#   "\n\n": the text behind the papers' numbers. GPTQ/SparseGPT (IST-DASLab/sparsegpt datautils.py,
#   get_wikitext2: testenc = tokenizer("\n\n".join(testdata['text']))) and AWQ (mit-han-lab/llm-awq
#   awq/entry.py, citing GPTQ's llama.py) tokenize exactly that once, cut nsamples = numel // seqlen
#   contiguous windows and drop the rest. Its rows are the lines of wiki.test.raw, each kept with its
#   "\n", a whitespace-only line as "" (huggingface/datasets datasets/wikitext/wikitext.py,
#   _generate_examples); 4,358 rows, row 1 " = Robert Boulter = \n" (brain-score/language
#   brainscore_language/data/wikitext/test.py). :func:`wikitext2_join` rebuilds it from the raw file.
# * the byte-exact raw file wiki.test.raw of wikitext-2-raw-v1.zip (the assets' corpora/wikitext2_test.raw,
#   sha256 in ../shared/assets/README.md): the offline stand-in.
WIKITEXT2_TEST_JOIN_SHA256 = "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"
WIKITEXT2_TEST_RAW_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
KNOWN_TEXTS = {
    WIKITEXT2_TEST_JOIN_SHA256: "WikiText-2 test: the datasets rows joined with \\n\\n (the papers' text)",
    WIKITEXT2_TEST_RAW_SHA256: "WikiText-2 test: the byte-exact raw file wiki.test.raw (offline stand-in)",
}


@dataclass(frozen=True)
class TokenStream:
    """A tokenized text. ``tokens`` is 1-D; ``bos_id`` is prepended per window ("window" layout) or
    is already in ``tokens`` (per document, or where the tokenizer put its special tokens)."""

    tokens: torch.Tensor  # (T,) int64
    bos_id: int | None
    layout: str  # one of LAYOUTS: "window", "document" or "tokenizer"
    source: str  # file path or dataset name, for provenance

    def __len__(self) -> int:
        return self.tokens.numel()

    def content_len(self, length: int) -> int:
        """Stream tokens per window of ``length`` tokens."""
        return length - 1 if (self.layout == "window" and self.bos_id is not None) else length

    def n_windows(self, length: int, end: int | None = None) -> int:
        end = len(self) if end is None else end
        return end // self.content_len(length)

    def windows(self, length: int, starts: torch.Tensor) -> torch.Tensor:
        """Windows whose stream content starts at ``starts``: (N, length) int64."""
        c = self.content_len(length)
        offsets = torch.arange(c)
        body = self.tokens[starts[:, None] + offsets[None, :]]  # (N, c)
        if c == length:
            return body
        bos = torch.full((len(starts), 1), self.bos_id, dtype=body.dtype)
        return torch.cat([bos, body], dim=1)


def tokenize(tokenizer, text: str, *, layout: str = "window", source: str = "") -> TokenStream:
    """Tokenize once. In ``document`` layout each blank-line-separated document gets a BOS; in
    ``tokenizer`` layout the text gets the tokenizer's own special tokens, once (``tokenizer(text)``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown BOS layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    bos = tokenizer.bos_token_id
    if layout == TOKENIZER_LAYOUT:  # exactly what the published loops do: tokenizer("\n\n".join(rows))
        ids = tokenizer(text, verbose=False)["input_ids"]
    elif layout == "document":
        if bos is None:
            raise ValueError("document layout needs a tokenizer with a BOS token")
        docs = [d for d in text.split("\n\n") if d.strip()]
        ids: list[int] = []
        for enc in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]:
            ids.append(bos)
            ids.extend(enc)
    else:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # a corpus, not a prompt: longer than the context
    if not ids:
        raise ValueError(f"text from {source or 'input'} tokenizes to nothing")
    return TokenStream(torch.tensor(ids, dtype=torch.long), bos, layout, source)


class TokenCache:
    """Token ids of texts, each tokenized once per layout with one tokenizer: the data settings
    that only cut windows (max_length, eval_length, eval_samples) reuse them. A text is known by
    the sha256 of its UTF-8 bytes; each call returns a new :class:`TokenStream` (its own source,
    two calls never the same object) over the shared, never written, token ids."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokenizations = 0  # texts tokenized (the rest came from the cache)
        self._ids: dict[tuple[str, str], torch.Tensor] = {}

    def stream(self, text: str, *, layout: str, source: str = "") -> TokenStream:
        """:func:`tokenize` ``(self.tokenizer, text, layout=layout, source=source)``, tokenized at most once."""
        key = (hashlib.sha256(text.encode("utf-8")).hexdigest(), layout)
        if key not in self._ids:
            stream = tokenize(self.tokenizer, text, layout=layout, source=source)
            self.tokenizations += 1
            self._ids[key] = stream.tokens
            return stream
        return TokenStream(self._ids[key], self.tokenizer.bos_token_id, layout, source)


class TextFileError(ValueError):
    """A text file that cannot be used: unreadable, not UTF-8, or empty (one-line message)."""


def read_text(path: str | Path) -> str:
    """The file's text, strictly UTF-8; a one-line :class:`TextFileError` otherwise."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise TextFileError(f"cannot read {str(path)!r} ({type(e).__name__}: {e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextFileError(f"{str(path)!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                            "convert it, e.g. iconv -t UTF-8") from None
    if not text.strip():
        raise TextFileError(f"{str(path)!r} holds no text")
    return text


def load_wikitext2(split_name: str = "test") -> str:
    """A WikiText-2 raw split through ``datasets`` (needs the network), its rows joined with "\\n\\n"
    as the published evaluations do (test: sha256 :data:`WIKITEXT2_TEST_JOIN_SHA256`)."""
    from datasets import load_dataset  # optional dependency, only where the network allows

    ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split_name)
    return "\n\n".join(ds["text"])


def wikitext2_rows(raw: str) -> list[str]:
    """The rows ``datasets`` makes of a WikiText raw file: one per line, the line with its "\\n", a
    whitespace-only line as "" (huggingface/datasets, datasets/wikitext/wikitext.py, _generate_examples)."""
    lines = io.StringIO(raw, newline=None)  # iterated like the script's open(data_file): universal newlines
    return [row if row.strip() else "" for row in lines]


def wikitext2_join(raw: str) -> str:
    """The published evaluation text, offline: the raw file's rows joined with "\\n\\n" (for
    wiki.test.raw its sha256 is :data:`WIKITEXT2_TEST_JOIN_SHA256`)."""
    return "\n\n".join(wikitext2_rows(raw))


def text_identity(sha256: str, source: str) -> str:
    """Which text ``sha256`` is, for the protocol record: one of :data:`KNOWN_TEXTS`, else where it came from."""
    if sha256 in KNOWN_TEXTS:
        return KNOWN_TEXTS[sha256]
    if source.startswith("wikitext-2-raw-v1/"):
        return f"{source} through datasets, rows joined with \\n\\n (sha256 not the recorded one)"
    return "another text"


def special_tokens_added(tokenizer) -> str:
    """What ``tokenizer(text)`` adds to a text, read off a probe, e.g. "tokenizer: <s> once at the
    start" (the layout of protocol published, recorded with its numbers)."""
    probe = "The cat sat."
    full = tokenizer(probe)["input_ids"]
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    n = len(bare)
    at = next((i for i in range(len(full) - n + 1) if full[i:i + n] == bare), None)
    if at is None:
        return "tokenizer: its own special tokens"
    head, tail = full[:at], full[at + n:]
    parts = [f"{' '.join(tokenizer.convert_ids_to_tokens(ids))} once at the {where}"
             for ids, where in ((head, "start"), (tail, "end")) if ids]
    return "tokenizer: " + (", ".join(parts) if parts else "no special tokens")


@dataclass(frozen=True)
class Protocol:
    """A named way of measuring perplexity; its name and settings go with every number."""

    name: str
    all_windows: bool  # evaluate every window of the evaluation text (else the last eval_samples)
    separate_calibration: bool  # calibrate on another text than the one evaluated
    default_eval_samples: int | None  # None: every window
    max_default_window: int | None  # default window: min(this, context); None: max_length
    use: str  # when to use it (the README's table)
    layout: str | None = None  # token layout of both texts; None: the --bos setting (window or document)


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("heldout", all_windows=False, separate_calibration=False, default_eval_samples=64,
             max_default_window=None,
             use="the last eval_samples windows (default 64) of eval_length tokens (default max_length) of the "
                 "evaluation text (default: the tail of the calibration text, which calibration never touches): "
                 "quick, honest held-out numbers for comparing selections, metrics and models measured the same way"),
    Protocol("published", all_windows=True, separate_calibration=True, default_eval_samples=None,
             max_default_window=2048,
             use="every window of eval_length tokens (default min(2048, the model's context)) of the whole "
                 "evaluation text (default WikiText-2 test), tokenized once with the tokenizer's own special tokens "
                 "and cut into contiguous windows from token 0 (the last partial one dropped); calibration from a "
                 "separate training text (default WikiText-2 train) in the same layout: the convention of published "
                 "WikiText-2 perplexities, for checking baselines against the literature",
             layout=TOKENIZER_LAYOUT),
)}


@dataclass(frozen=True)
class DataSplit:
    """Where evaluation and calibration windows come from; calibration depends on the seed."""

    calib: TokenStream
    eval: TokenStream
    calib_length: int
    eval_length: int
    eval_starts: torch.Tensor  # (n_eval,) stream offsets of the evaluation windows
    calib_end: int  # calibration windows lie wholly in calib.tokens[:calib_end]
    shared: bool  # calibration and evaluation come from the same stream
    protocol: dict | None = None  # name and settings of the evaluation protocol (recorded with every number)

    @property
    def n_eval(self) -> int:
        return len(self.eval_starts)

    def eval_windows(self) -> torch.Tensor:
        """(n_eval, eval_length): the held-out windows, independent of any seed."""
        return self.eval.windows(self.eval_length, self.eval_starts)

    @property
    def calib_pool(self) -> int:
        """How many calibration windows fit outside the evaluation windows."""
        return self.calib.n_windows(self.calib_length, self.calib_end)

    def calib_starts(self, n: int, seed: int) -> torch.Tensor:
        """Stream offsets of ``n`` calibration windows drawn without replacement with ``seed``."""
        pool = self.calib_pool
        if n > pool:
            raise ValueError(
                f"asked for {n} calibration windows of {self.calib_length} tokens but the "
                f"calibration text holds only {pool} outside the evaluation windows"
            )
        rng = np.random.default_rng(seed)
        picks = np.sort(rng.choice(pool, size=n, replace=False))
        return torch.from_numpy(picks).long() * self.calib.content_len(self.calib_length)

    def calib_windows(self, n: int, seed: int) -> torch.Tensor:
        """(n, calib_length) calibration windows for ``seed``."""
        return self.calib.windows(self.calib_length, self.calib_starts(n, seed))

    def describe(self) -> dict:
        return {
            "calib_source": self.calib.source,
            "eval_source": self.eval.source,
            "layout": self.eval.layout,
            "calib_length": self.calib_length,
            "eval_length": self.eval_length,
            "eval_windows": self.n_eval,
            "eval_tokens_scored": self.n_eval * (self.eval_length - 1),
            "calib_pool_tokens": self.calib_end,
            "shared_stream": self.shared,
            "protocol": self.protocol,
        }


def split(
    calib: TokenStream,
    held_out: TokenStream | None = None,
    *,
    calib_length: int,
    eval_length: int,
    n_eval: int | None,
) -> DataSplit:
    """Plan evaluation windows (the last ``n_eval`` of the eval stream, ``None`` = all) and
    the calibration region (everything before them when the stream is shared)."""
    shared = held_out is None or held_out is calib
    ev = calib if shared else held_out
    total = ev.n_windows(eval_length)
    if total == 0:
        raise ValueError(f"evaluation text from {ev.source!r} ({len(ev):,} tokens) is too short for one "
                         f"{eval_length}-token window; give a longer text or shorter windows")
    room = total if not shared else total - 1  # a shared stream keeps one window for calibration
    if n_eval is None:
        n_eval = total if not shared else total // 2
    if room <= 0 or n_eval <= 0:
        raise ValueError(f"text from {ev.source!r} ({len(ev):,} tokens) is too short to hold out an evaluation "
                         f"window of {eval_length} tokens")
    if n_eval > room:  # never silently fewer windows than asked: the protocol would change unseen
        raise ValueError(f"{n_eval} evaluation windows of {eval_length} tokens do not fit in the text from "
                         f"{ev.source!r} ({len(ev):,} tokens: {room} fit" + (", one kept for calibration" if shared else "")
                         + "); lower the evaluation windows or their length, or give a longer text")
    c = ev.content_len(eval_length)
    first = total - n_eval
    eval_starts = torch.arange(first, total, dtype=torch.long) * c
    calib_end = first * c if shared else len(calib)
    return DataSplit(calib, ev, calib_length, eval_length, eval_starts, calib_end, shared)
