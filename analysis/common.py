"""Shared vocabulary of the analysis: grouping keys, strict-JSON numbers, cell picking."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from cwa_core.schema import number, strict_number

# Cells pool (over seeds) only within one value of every key here: the evaluation protocol is
# first, so that nothing measured under two protocols is ever averaged or compared as alike.
GROUP = ["protocol", "model", "metric", "k", "mode", "perturbation", "variant"]
SCORING = ["protocol", "model", "metric", "k", "mode", "variant"]  # cells sharing one scoring pass
NUMBERS_NOTE = ("Numbers are JSON numbers when finite; an infinite value is the string \"inf\" (e.g. a "
                "perplexity that overflowed: real damage, not missing data); null means missing or undefined")


# A number read back from any result file (strict strings, Infinity/NaN tokens, null as NaN): the
# reader of cwa_core.schema, which also declares the strict encoding that :func:`num` writes.
value = number


def num(x) -> float | str | None:
    """A strict-JSON number (:func:`cwa_core.schema.strict_number`): finite floats as they are, +-inf
    as "inf"/"-inf", NaN, None and pandas' NA as null."""
    return None if x is pd.NA else strict_number(x)


def clean(o):
    """Recursively JSON-safe (strict): numpy scalars to Python, floats through :func:`num`."""
    if isinstance(o, dict):
        return {str(k): clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, set)):
        return [clean(v) for v in (sorted(o, key=str) if isinstance(o, set) else o)]
    if isinstance(o, (bool, np.bool_)):
        return bool(o)
    if isinstance(o, (int, np.integer)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        return num(o)
    if isinstance(o, Path):
        return str(o)
    if o is pd.NA or o is pd.NaT:
        return None
    return o


def display_name(model, source: str | None = None) -> str:
    """How the report names a model: a Hugging Face Hub id as it is (``meta-llama/Llama-3.1-8B``),
    a local folder by its name (``/home/u/.cache/cwa/demo-1a2b/cwa-demo`` -> ``cwa-demo``).
    ``source``: "hub" or "local" as the cell's provenance records it; without it (older files)
    an id of the form owner/name that does not start like a path is taken for a Hub id."""
    m = str(model).rstrip("/") or str(model)
    hub = source == "hub" if source in ("hub", "local") else (m.count("/") == 1 and not m.startswith((".", "~", "/")))
    return m if hub else m.rsplit("/", 1)[-1]


def cells_list(values: Iterable) -> list[str]:
    return sorted({str(v) for v in values})


def key_dict(cols: list[str], key) -> dict:
    key = key if isinstance(key, tuple) else (key,)
    return {c: (v.item() if isinstance(v, np.generic) else v) for c, v in zip(cols, key)}


def one_cell_per_seed(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Rows of one cell per (``by``, seed): cells sharing a scoring pass (e.g. differing only in
    the perturbation) hold the same top weights and scores; counting them twice would weigh
    one measurement double. The first cell by label is kept."""
    if df.empty:
        return df
    first = df.groupby([*by, "seed"], dropna=False)["cell"].transform("min")
    return df[df["cell"] == first]


def relative_depth_bin(layer: pd.Series, n_layers: pd.Series, bins: int) -> pd.Series:
    """Bin index 0..bins-1 of (layer + 0.5) / n_layers; -1 for tensors outside the decoder
    blocks (layer -1: final norm, embeddings, lm_head) or of unknown depth."""
    rel = (layer.astype(float) + 0.5) / n_layers.astype(float)
    b = np.floor(rel * bins).clip(0, bins - 1)
    return pd.Series(np.where((layer >= 0) & rel.notna(), b, -1), index=layer.index).astype(int)


def bin_label(b: int, bins: int) -> str:
    return "outside blocks" if b < 0 else f"{b / bins:.2f}-{(b + 1) / bins:.2f}"
