"""Digest one cell's top weights: counts per tensor, candidate lines and sorted id sets per seed.

Top weights are digested one cell at a time so that a hundred cells of ~430k rows each never
sit in memory together. Rows are chosen by ``rank`` (or by score when there is no rank), never by
their order. :mod:`analysis.load` reads the folders and calls :func:`digest_top_weights`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

_ID_BITS = 21  # tensor id, row and column each get 21 bits of an int64 set key


@dataclass(frozen=True)
class LoadOptions:
    """How much of the top weights to keep while loading."""

    line_min_count: int = 5  # a row/column is a candidate line with at least this many top-K weights
    line_enrichment: float = 10.0  # ... and this many times what uniform placement would put there
    lines_per_seed: int = 200  # at most this many candidate lines per cell and seed (the largest)



def read_top_weights(path: Path) -> pd.DataFrame:
    """One top-weights file (Parquet preferred, CSV otherwise) with compact dtypes; ``expert``
    is added (empty) when the file predates it."""
    cats = ("parameter", "param_type")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        df = pq.read_table(path, read_dictionary=[c for c in (*cats, "expert") if c in names]).to_pandas()
    else:
        df = pd.read_csv(path, engine="pyarrow")
    for c in cats:
        if not isinstance(df[c].dtype, pd.CategoricalDtype):
            df[c] = df[c].astype("category")
    df["expert"] = _expert_column(df["expert"] if "expert" in df.columns else None, len(df))
    return df


def _expert_column(e: pd.Series | None, n: int) -> pd.Categorical:
    """Experts as a categorical of strings, "" for a dense tensor (CSV reads an int column with
    blanks as floats: 3.0 -> "3"). Works on the categories, never on every row's string."""
    if e is None or e.isna().all():
        return pd.Categorical.from_codes(np.zeros(n, dtype=np.int8), categories=[""])
    if pd.api.types.is_numeric_dtype(e.dtype):
        e = e.astype("Int64")
    if not isinstance(e.dtype, pd.CategoricalDtype):
        e = e.astype("category")
    cats = [str(c) for c in e.cat.categories]
    codes = e.cat.codes.to_numpy().astype(np.int64)
    if "" not in cats:
        cats.append("")
    codes = np.where(codes < 0, cats.index(""), codes)
    uniq = list(dict.fromkeys(cats))  # "3" and 3 both become "3"
    remap = np.array([uniq.index(c) for c in cats], dtype=np.int64)
    return pd.Categorical.from_codes(remap[codes], categories=uniq)


def _select_top(df: pd.DataFrame, k: int, mode: str) -> pd.DataFrame:
    """The top-K rows by rank (or by score when the file has no rank), whatever their order."""
    if "rank" in df.columns and df["rank"].notna().all():
        keep = df["rank"].to_numpy() <= k
        return df if keep.all() else df[keep]
    by = ["seed"] if mode == "global" else ["seed", "parameter", "expert"]
    order = df.sort_values("score", ascending=False, kind="stable")
    return order[order.groupby(by, observed=True).cumcount().to_numpy() < k]


class TensorIds:
    """Tensor name ("parameter" or "parameter#expert") -> a small int shared by every cell, so
    that the weight ids of different cells line up."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def of(self, names: Sequence[str]) -> np.ndarray:
        return np.array([self.ids.setdefault(n, len(self.ids)) for n in names], dtype=np.int64)


@dataclass
class _Tensors:
    """The tensors of one top-weights table: a local index per row and per-tensor lookups."""

    local: np.ndarray  # (n,) local tensor index of every row
    names: np.ndarray  # (T,) parameter name
    experts: np.ndarray  # (T,) expert ("" if dense)
    layer: np.ndarray  # (T,)
    ptype: np.ndarray  # (T,)

    @classmethod
    def of(cls, df: pd.DataFrame) -> "_Tensors":
        pc = df["parameter"].cat.codes.to_numpy().astype(np.int64)
        ec = df["expert"].cat.codes.to_numpy().astype(np.int64)
        ne = len(df["expert"].cat.categories)
        combined = pc * ne + ec
        present = np.bincount(combined, minlength=len(df["parameter"].cat.categories) * ne) > 0  # O(n), no sort
        uniq = np.flatnonzero(present)
        local = (np.cumsum(present) - 1)[combined]
        layer = np.zeros(len(uniq), dtype=np.int64)
        ptc = np.zeros(len(uniq), dtype=np.int64)
        layer[local] = df["layer"].to_numpy()
        ptc[local] = df["param_type"].cat.codes.to_numpy()
        pcat = np.asarray(df["parameter"].cat.categories, dtype=object)
        ecat = np.asarray(df["expert"].cat.categories, dtype=object)
        tcat = np.asarray(df["param_type"].cat.categories, dtype=object)
        return cls(local.astype(np.int64), pcat[uniq // ne], ecat[uniq % ne], layer, tcat[ptc])

    def keys(self) -> list[str]:
        return [n if e == "" else f"{n}#{e}" for n, e in zip(self.names, self.experts)]


def _weight_keys(tid: np.ndarray, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """(n,) int64 ids of weights: packed (tensor, row, col) when they fit, else a hash."""
    lim = 1 << _ID_BITS
    if tid.size == 0 or (tid.max() < lim and row.max() < lim and col.max() < lim and row.min() >= 0 and col.min() >= 0):
        return (tid << (2 * _ID_BITS)) | (row << _ID_BITS) | col
    return pd.util.hash_array(tid * 1_000_003 + row * 7919 + col).astype(np.int64)


def digest_top_weights(df: pd.DataFrame, cell: str, k: int, mode: str, ids: TensorIds, shapes: dict[str, tuple],
                       opts: LoadOptions) -> tuple[pd.DataFrame, pd.DataFrame, dict[tuple[str, int], np.ndarray]]:
    """Counts per tensor, candidate lines and sorted id sets per seed, from one cell's top weights
    (``df`` from :func:`read_top_weights`; rows in any order).

    ``shapes``: parameter -> (n_rows, n_cols or None) from the cell's statistics (may be empty).
    """
    df = _select_top(df, k, mode)
    tens = _Tensors.of(df)
    n_t = len(tens.names)
    row = df["row"].to_numpy(dtype=np.int64, na_value=0)
    col_f = df["col"].to_numpy(dtype=np.float64, na_value=np.nan)
    vec_t = np.array([shapes.get(n, (None, 0))[1] is None for n in tens.names], dtype=bool)  # old files: col 0
    is_matrix = ~(np.isnan(col_f) | vec_t[tens.local])
    col = np.where(np.isnan(col_f), 0, col_f).astype(np.int64)
    seed = df["seed"].to_numpy(dtype=np.int64)
    useeds = np.unique(seed)  # a few values: hashing, then a search beats a full sort
    sidx = np.searchsorted(useeds, seed)
    tid = ids.of(tens.keys())[tens.local]
    keys = _weight_keys(tid, row, col)
    sets = {(cell, int(s)): np.unique(keys[sidx == i]) for i, s in enumerate(useeds)}

    per = np.bincount(sidx * n_t + tens.local, minlength=len(useeds) * n_t).reshape(len(useeds), n_t)
    si, ti = np.nonzero(per)
    counts = pd.DataFrame({"cell": cell, "seed": useeds[si], "parameter": tens.names[ti], "expert": tens.experts[ti],
                           "layer": tens.layer[ti], "param_type": tens.ptype[ti], "n": per[si, ti]})
    return counts, _lines(cell, tens, per, useeds, sidx, row, col, is_matrix, shapes, opts), sets


def _lines(cell: str, tens: _Tensors, per: np.ndarray, useeds: np.ndarray, sidx: np.ndarray, row: np.ndarray,
           col: np.ndarray, is_matrix: np.ndarray, shapes: dict, opts: LoadOptions) -> pd.DataFrame:
    """Rows and columns of matrices that hold many of their tensor's top-K weights: at least
    ``line_min_count`` and ``line_enrichment`` times the uniform expectation (K_tensor / lines).
    ``per``: (seeds, tensors) top-K count of each tensor in each seed."""
    if not is_matrix.any():
        return pd.DataFrame()
    st = (sidx[is_matrix].astype(np.int64) << 32) | tens.local[is_matrix]  # (seed, tensor)
    out = []
    for axis, idx in (("row", row[is_matrix]), ("col", col[is_matrix])):
        uk, cnt = np.unique((st << 26) | idx, return_counts=True)  # (seed, tensor, index); indices < 2**26
        hit = cnt >= opts.line_min_count
        uk, cnt = uk[hit], cnt[hit]
        if not cnt.size:
            continue
        s, t, i = uk >> 58, (uk >> 26) & ((1 << 32) - 1), uk & ((1 << 26) - 1)
        kt = per[s, t]
        n_lines = np.array([shapes.get(n, (None, None))[0 if axis == "row" else 1] or np.nan for n in tens.names[t]],
                           dtype=float)
        keep = ~(cnt < opts.line_enrichment * kt / n_lines)  # unknown shape (NaN): the count alone decides
        s, t = s[keep], t[keep]
        out.append(pd.DataFrame({"cell": cell, "seed": useeds[s], "parameter": tens.names[t], "expert": tens.experts[t],
                                 "layer": tens.layer[t], "param_type": tens.ptype[t], "axis": axis, "index": i[keep],
                                 "count": cnt[keep], "k_tensor": kt[keep], "n_lines": n_lines[keep]}))
    if not out:
        return pd.DataFrame()
    lines = pd.concat(out, ignore_index=True)
    lines["share"] = lines["count"] / lines["k_tensor"]
    lines["enrichment"] = lines["count"] / (lines["k_tensor"] / lines["n_lines"])
    return (lines.sort_values(["seed", "count"], ascending=[True, False], kind="stable")
            .groupby("seed").head(opts.lines_per_seed).reset_index(drop=True))

