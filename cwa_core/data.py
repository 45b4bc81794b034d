"""Text corpora -> token windows: seeded calibration windows and held-out evaluation windows.

The text is tokenized once. Windows are non-overlapping spans of one token stream, in one of
two layouts (the two conventions published perplexities use):

* ``bos="window"``: the text is one stream; every window is ``[BOS] + L-1`` stream tokens.
  (WikiText-2 as usually reported.)
* ``bos="document"``: documents (separated by blank lines) each start with BOS, are joined,
  and cut into windows of ``L`` tokens. (TinyStories.)

Evaluation windows are the *last* ``n_eval`` windows of the evaluation stream and never depend
on the seed. When calibration and evaluation share a text, calibration windows are drawn (with
the seed, without replacement) only from the part of the stream before the first evaluation
window, so the two never overlap.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

BOS_LAYOUTS = ("window", "document")


@dataclass(frozen=True)
class TokenStream:
    """A tokenized text. ``tokens`` is 1-D; ``bos_id`` is prepended per window or per document."""

    tokens: torch.Tensor  # (T,) int64
    bos_id: int | None
    layout: str  # "window" or "document"
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
    """Tokenize once. In ``document`` layout each blank-line-separated document gets a BOS."""
    if layout not in BOS_LAYOUTS:
        raise ValueError(f"unknown BOS layout {layout!r}; allowed: {', '.join(BOS_LAYOUTS)}")
    bos = tokenizer.bos_token_id
    if layout == "document":
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
    """A WikiText-2 raw split through ``datasets`` (needs the network), joined as usual."""
    from datasets import load_dataset  # optional dependency, only where the network allows

    ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split_name)
    return "\n\n".join(ds["text"])


@dataclass(frozen=True)
class Protocol:
    """A named way of measuring perplexity; its name and settings go with every number."""

    name: str
    all_windows: bool  # evaluate every window of the evaluation text (else the last eval_samples)
    separate_calibration: bool  # calibrate on another text than the one evaluated
    default_eval_samples: int | None  # None: every window
    max_default_window: int | None  # default window: min(this, context); None: max_length
    use: str  # when to use it (the README's table)


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("heldout", all_windows=False, separate_calibration=False, default_eval_samples=64,
             max_default_window=None,
             use="the last eval_samples windows (default 64) of eval_length tokens (default max_length) of the "
                 "evaluation text (default: the tail of the calibration text, which calibration never touches): "
                 "quick, honest held-out numbers for comparing selections, metrics and models measured the same way"),
    Protocol("published", all_windows=True, separate_calibration=True, default_eval_samples=None,
             max_default_window=2048,
             use="every window of eval_length tokens (default min(2048, the model's context)) of the whole "
                 "evaluation text (default WikiText-2 test), calibration from a separate training text (default "
                 "WikiText-2 train): the convention of published WikiText-2 perplexities, for checking baselines "
                 "against the literature"),
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
