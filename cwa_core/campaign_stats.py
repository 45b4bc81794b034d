"""Statistics of a protection campaign (issue 17): per arm and level the ratio's quantiles and the
failure rate with its Wilson interval, the paired comparison of each arm with a reference arm
(exact McNemar), and the headline: how much level protecting the top-K weights buys over
protecting K random weights at a given failure rate, with a paired-bootstrap interval.

Torch-free (numpy and the standard library): ``analysis/`` imports it. Rows are the campaign's
trial rows (issue 17 contract: ``arm``, ``level``, ``seed``, ``trial``, ``ppl``, ``ppl_ratio``,
``status``), in any order. A trial **fails** when its ``ppl_ratio`` > ``fail_ratio`` or its ratio
or perplexity is not finite (inf or NaN; a ``null`` ratio reads as NaN).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

from . import schema

#: How each level is interpolated for the headline, and the headline's unit.
SCALES = {"error_rate": "log10", "quant_bits": "linear", "sparsity": "linear"}
UNITS = {"error_rate": "x", "quant_bits": "bits", "sparsity": "sparsity"}
BOOTSTRAP_REPLICATES = 2000
BOOTSTRAP_SEED = 17  # fixed: the same rows give the same interval
QUANTILES = (("q05", 0.05), ("q25", 0.25), ("median_ratio", 0.5), ("q75", 0.75), ("q95", 0.95))


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of ``k`` successes in ``n`` trials (Wilson 1927; Agresti & Coull 1998,
    eq. 2). ``n`` = 0: (nan, nan); ``k`` = 0 gives lo 0 and ``k`` = ``n`` hi 1, exactly."""
    if not (0 <= k <= n) or int(k) != k or int(n) != n:
        raise ValueError(f"wilson: k and n must be integers with 0 <= k <= n, got k={k}, n={n}")
    _check_confidence(confidence)
    if n == 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p, z2 = k / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (0.0 if k == 0 else max(0.0, center - half)), (1.0 if k == n else min(1.0, center + half))


def mcnemar_exact(b: int, c: int) -> float:
    """Exact McNemar p-value of ``b`` and ``c`` discordant pairs: the two-sided exact binomial sign
    test, min(1, 2 P(X <= min(b, c))) with X ~ Binomial(b + c, 1/2); 1 when b + c = 0."""
    if b < 0 or c < 0 or int(b) != b or int(c) != c:
        raise ValueError(f"mcnemar_exact: discordant counts must be integers >= 0, got b={b}, c={c}")
    m = int(b) + int(c)
    tail = sum(math.comb(m, i) for i in range(min(int(b), int(c)) + 1))
    return min(1.0, 2 * tail / 2 ** m)  # exact integers; int / int is correctly rounded


def quantile(values: Iterable[float], q: float) -> float:
    """numpy's default (linear, Hyndman & Fan type 7) ``q``-quantile of finite or +inf ``values``,
    +inf being an ordinary largest value (numpy returns NaN between two infs): inf as soon as the
    interpolation gives an inf positive weight. NaN when there is no value; NaN or -inf raise."""
    x = np.sort(np.asarray(list(values), dtype=np.float64))
    if np.isnan(x).any() or np.isneginf(x).any():
        raise ValueError("quantile: values must be finite or +inf (leave NaN out before, count them apart)")
    if x.size == 0:
        return math.nan
    h = (x.size - 1) * q
    lo, frac = math.floor(h), h - math.floor(h)
    a, b = float(x[lo]), float(x[math.ceil(h)])
    if frac == 0:
        return a
    return math.inf if math.isinf(b) else (1 - frac) * a + frac * b


def trial_ratio(row: Mapping[str, Any]) -> float:
    """A row's perplexity ratio as a float: a ``null`` is NaN, and so is -inf (no ratio is negative)."""
    r = schema.number(row.get("ppl_ratio"))
    return math.nan if r == -math.inf else r


def trial_failed(row: Mapping[str, Any], fail_ratio: float) -> bool:
    """Whether a trial failed: ratio > ``fail_ratio``, or ratio, perplexity or status not finite."""
    r = trial_ratio(row)
    ppl = schema.number(row.get("ppl", 0.0))
    status = row.get("status", "finite")
    return not math.isfinite(r) or r > fail_ratio or not math.isfinite(ppl) or status != "finite"


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: must lie strictly between 0 and 1, got {confidence}")


def _check(fail_ratio: float, level_name: str, harsher: int, arms: Sequence[str], target: float,
           confidence: float, reference: str) -> None:
    if not (math.isfinite(fail_ratio) and fail_ratio > 0):
        raise ValueError(f"fail_ratio: must be a finite number > 0, got {fail_ratio}")
    if level_name not in SCALES:
        raise ValueError(f"level_name: must be one of {', '.join(SCALES)}, got {level_name!r}")
    if harsher not in (1, -1):
        raise ValueError(f"harsher: must be +1 or -1, got {harsher}")
    if isinstance(arms, str) or len(set(arms)) != len(arms) or not arms:
        raise ValueError(f"arms: must be a non-empty list of distinct arm names, got {arms!r}")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target: a failure rate in (0, 1], got {target}")
    _check_confidence(confidence)
    if not isinstance(reference, str) or not reference:
        raise ValueError(f"reference: must be an arm name, got {reference!r}")


def _grouped(rows: Sequence[Mapping[str, Any]], arms: Sequence[str],
             fail_ratio: float) -> tuple[dict, dict]:
    """({(arm, level float): {(seed, trial): (ratio, failed)}}, {level float: level as given})."""
    cells: dict[tuple[str, float], dict[tuple, tuple[float, bool]]] = {}
    raw: dict[float, Any] = {}
    for row in rows:
        missing = [k for k in ("arm", "level", "seed") if k not in row]
        if missing:
            raise ValueError(f"rows: a trial row lacks {', '.join(missing)}; each row needs arm, level, seed")
        if row["arm"] not in arms:
            continue
        level = float(row["level"])
        if math.isnan(level):
            raise ValueError(f"rows: level must be a number, got {row['level']!r}")
        raw.setdefault(level, row["level"])
        unit = (row["seed"], row.get("trial", 0))
        cell = cells.setdefault((row["arm"], level), {})
        if unit in cell:
            raise ValueError(f"rows: arm {row['arm']} level {row['level']} seed {unit[0]} trial {unit[1]} "
                             "appears twice; a trial has one row per arm")
        cell[unit] = (trial_ratio(row), trial_failed(row, fail_ratio))
    return cells, raw


def _summary_entry(arm: str, level: Any, cell: Mapping[tuple, tuple[float, bool]],
                   confidence: float) -> dict:
    ratios = np.array([r for r, _ in cell.values()], dtype=np.float64)
    n, k = int(ratios.size), sum(f for _, f in cell.values())
    kept = ratios[~np.isnan(ratios)]  # NaN: no ratio to rank (a failure all the same)
    lo, hi = wilson(k, n, confidence)
    return {"arm": arm, "level": level, "n": n, **{key: quantile(kept, q) for key, q in QUANTILES},
            "failures": int(k), "failure_rate": k / n, "failure_lo": lo, "failure_hi": hi,
            "nonfinite": int((~np.isfinite(ratios)).sum()), "n_inf": int(np.isposinf(ratios).sum()),
            "n_nan": int(np.isnan(ratios).sum())}


def _paired_entry(arm: str, reference: str, level: Any, a: Mapping, r: Mapping) -> dict:
    units = sorted(set(a) & set(r), key=repr)
    b = sum(a[u][1] and not r[u][1] for u in units)
    c = sum(r[u][1] and not a[u][1] for u in units)
    diffs = [math.log(a[u][0]) - math.log(r[u][0]) for u in units
             if math.isfinite(a[u][0]) and math.isfinite(r[u][0]) and a[u][0] > 0 and r[u][0] > 0]
    return {"level": level, "arm": arm, "reference": reference, "n_pairs": len(units),
            "arm_only_fail": int(b), "reference_only_fail": int(c), "p_value": mcnemar_exact(b, c),
            "median_log_ratio_diff": float(np.median(diffs)) if diffs else math.nan}


def summarize(rows: Sequence[Mapping[str, Any]], *, fail_ratio: float, level_name: str, harsher: int,
              arms: Sequence[str], target: float = 0.5, confidence: float = 0.95,
              reference: str = "random_k") -> dict:
    """{"summary", "paired", "headline"} of a campaign's trial rows (the issue 17 contract).

    summary: one entry per (arm, level) with rows, arms in ``arms`` order, levels ascending: ``n``
    trials; quantiles of the ratio (numpy's default linear rule; +inf ratios included, so a quantile
    may be inf; NaN ratios left out, and all NaN gives NaN); ``failures`` (see the module docstring)
    and their rate with its Wilson interval at ``confidence``; ``nonfinite`` ratios (inf or NaN),
    also split as ``n_inf`` and ``n_nan``. paired: per level, each arm other than ``reference``
    against it over the (seed, trial) pairs both have: discordant failures, exact McNemar p, median
    of log(ratio arm) - log(ratio reference) over pairs with both ratios finite. headline: see
    :func:`_headline`. Rows of arms not in ``arms`` are left out; a repeated (arm, level, seed,
    trial) raises ValueError.
    """
    _check(fail_ratio, level_name, harsher, arms, target, confidence, reference)
    cells, raw = _grouped(rows, arms, fail_ratio)
    levels = sorted(raw)
    summary = [_summary_entry(arm, raw[lv], cells[(arm, lv)], confidence)
               for arm in arms for lv in levels if (arm, lv) in cells]
    paired = [_paired_entry(arm, reference, raw[lv], cells[(arm, lv)], cells[(reference, lv)])
              for lv in levels if (reference, lv) in cells
              for arm in arms if arm != reference and (arm, lv) in cells]
    return {"summary": summary, "paired": paired,
            "headline": _headline(cells, raw, level_name=level_name, harsher=harsher, target=target,
                                  confidence=confidence, reference=reference, fail_ratio=fail_ratio)}


def _harshness(level_name: str, harsher: int, levels: np.ndarray) -> np.ndarray:
    """Positions of the levels on the interpolation scale, growing with harshness."""
    return harsher * (np.log10(levels) if SCALES[level_name] == "log10" else levels)


def _crossing(u: np.ndarray, curves: np.ndarray, target: float) -> np.ndarray:
    """Harshness at which each failure curve (rows of ``curves``, over ``u`` ascending) first
    reaches ``target``, linear in ``u`` between tested levels; -inf where it already does at the
    mildest level, +inf where it never does."""
    reached = curves >= target
    first = reached.argmax(axis=1)
    hit = reached.any(axis=1)
    out = np.full(curves.shape[0], np.inf)
    out[hit & (first == 0)] = -np.inf
    rows = np.flatnonzero(hit & (first > 0))
    i = first[rows]
    f0, f1 = curves[rows, i - 1], curves[rows, i]
    frac = (target - f0) / (f1 - f0)  # f0 < target <= f1
    out[rows] = (1 - frac) * u[i - 1] + frac * u[i]  # exactly u[i] when frac is 1
    return out


def _bootstrap_curves(units: list[tuple[np.ndarray, np.ndarray]], replicates: int) -> tuple[np.ndarray, ...]:
    """Failure curves of both arms, (replicates, levels) each, resampling the paired units of every
    level with replacement (both arms together)."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    arm = np.empty((replicates, len(units)))
    ref = np.empty((replicates, len(units)))
    for j, (fa, fr) in enumerate(units):
        idx = rng.integers(0, fa.size, size=(replicates, fa.size))
        arm[:, j], ref[:, j] = fa[idx].mean(axis=1), fr[idx].mean(axis=1)
    return arm, ref


def _tolerated(name: str, u_cross: float, u: np.ndarray, levels: np.ndarray, given: list, rates: np.ndarray,
               n: list[int], level_name: str, harsher: int) -> dict:
    """One arm's tolerated level: a point, or a bound when its curve does not cross in range;
    ``given``: the levels as the rows gave them (bits stay integers), mildest first."""
    out = {"arm": name, "levels": given, "failure_rate": rates.tolist(), "n_units": n,
           "level": None, "censored": bool(math.isinf(u_cross)), "bound": None, "bound_level": None}
    if not out["censored"]:
        out["level"] = float(10 ** (u_cross / harsher) if SCALES[level_name] == "log10" else u_cross / harsher)
        return out
    beyond = u_cross > 0  # never reached: beyond the harshest tested level
    edge = float(levels[np.argmax(u) if beyond else np.argmin(u)])
    side = ">=" if beyond == (harsher == 1) else "<="
    out.update(bound=f"{side} {edge:g}", bound_level=edge)
    return out


def _headline(cells: Mapping, raw: Mapping[float, Any], *, level_name: str, harsher: int, target: float,
              confidence: float, reference: str, fail_ratio: float, arm: str = "top_k") -> dict:
    """How much level protecting ``arm`` buys over protecting ``reference`` at failure rate ``target``.

    L(a), the tolerated level of arm a, is the level at which a's failure rate first reaches
    ``target`` going in the harsher direction, interpolated linearly between tested levels in log10
    of the level for error_rate (levels <= 0 left out), linearly for bits and sparsity. The value:
    error_rate L(arm) / L(reference) (x times the rate); quant_bits L(reference) - L(arm) (bits);
    sparsity L(arm) - L(reference). Curves use the (seed, trial) units both arms have at a level.
    An arm whose curve never reaches the target in range, or already reaches it at the mildest
    level, has only a bound ("censored"); the value is then a bound (or none, when both bounds point
    the same way). Interval: paired bootstrap (units resampled with replacement within each level,
    both arms together; fixed seed; 2000 replicates), percentile (inverted CDF) at ``confidence``; a replicate
    where both arms are censored the same way is undetermined and counted at both ends (lo as
    -inf, hi as +inf), which can only widen the interval. Unavailable: an arm missing, or fewer than
    two common levels.
    """
    if not any(a == arm for a, _ in cells) or not any(a == reference for a, _ in cells):
        return {"available": False, "why": f"the arms {arm} and {reference} are both needed; "
                                           f"present: {', '.join(sorted({a for a, _ in cells})) or 'none'}"}
    common = sorted(lv for (a, lv) in cells if a == arm and (reference, lv) in cells
                    and set(cells[(arm, lv)]) & set(cells[(reference, lv)])
                    and (lv > 0 or SCALES[level_name] != "log10"))
    if len(common) < 2:
        return {"available": False, "why": f"{len(common)} {level_name} level(s) with paired trials of {arm} "
                                           f"and {reference}; the tolerated level needs at least 2"}
    levels = np.array(common)
    u = _harshness(level_name, harsher, levels)
    order = np.argsort(u)
    levels, u = levels[order], u[order]
    units = []
    for lv in levels:
        a, r = cells[(arm, float(lv))], cells[(reference, float(lv))]
        keys = sorted(set(a) & set(r), key=repr)
        units.append((np.array([a[k][1] for k in keys], float), np.array([r[k][1] for k in keys], float)))
    rates = {arm: np.array([fa.mean() for fa, _ in units]), reference: np.array([fr.mean() for _, fr in units])}
    point = {a: float(_crossing(u, rates[a][None, :], target)[0]) for a in (arm, reference)}
    boot_a, boot_r = _bootstrap_curves(units, BOOTSTRAP_REPLICATES)
    with np.errstate(invalid="ignore"):
        d = _crossing(u, boot_a, target) - _crossing(u, boot_r, target)
    undetermined = np.isnan(d)
    tail = (1 - confidence) / 2 * 100
    lo = float(np.percentile(np.where(undetermined, -np.inf, d), tail, method="inverted_cdf"))
    hi = float(np.percentile(np.where(undetermined, np.inf, d), 100 - tail, method="inverted_cdf"))
    n = [int(fa.size) for fa, _ in units]
    tolerated = {a: _tolerated(a, point[a], u, levels, [raw[float(v)] for v in levels], rates[a], n,
                               level_name, harsher)
                 for a in (arm, reference)}
    out = {"available": True, "arm": arm, "reference": reference, "level_name": level_name,
           "scale": SCALES[level_name], "unit": UNITS[level_name], "target": target, "fail_ratio": fail_ratio,
           "confidence": confidence, **_value(point[arm], point[reference], u, level_name),
           "interval": [_to_value(lo, level_name), _to_value(hi, level_name)],
           "bootstrap": {"replicates": BOOTSTRAP_REPLICATES, "seed": BOOTSTRAP_SEED,
                         "undetermined": int(undetermined.sum())},
           "tolerated": tolerated}
    out["text"] = _text(out)
    return out


def _to_value(d: float, level_name: str) -> float:
    """The headline's value of a harshness difference: a factor for error_rate, else the difference."""
    return 10.0 ** d if SCALES[level_name] == "log10" else d


def _value(u_arm: float, u_ref: float, u: np.ndarray, level_name: str) -> dict:
    """The headline value, or its bound when a tolerated level is censored (see :func:`_headline`)."""
    def span(x: float) -> tuple[float, float]:  # where the arm's tolerated harshness can lie
        if x == math.inf:
            return float(u.max()), math.inf
        return (-math.inf, float(u.min())) if x == -math.inf else (x, x)

    (a_lo, a_hi), (r_lo, r_hi) = span(u_arm), span(u_ref)
    lo, hi = a_lo - r_hi, a_hi - r_lo
    out = {"value": None, "censored": True, "bound": None, "bound_value": None}
    if math.isfinite(lo) and math.isfinite(hi):
        out.update(value=_to_value(lo, level_name), censored=False)
    elif math.isfinite(lo) or math.isfinite(hi):
        bound = _to_value(lo if math.isfinite(lo) else hi, level_name)
        out.update(bound=f"{'>=' if math.isfinite(lo) else '<='} {bound:.3g}", bound_value=bound)
    return out


_QUANTITY = {"error_rate": ("L({a}) / L({r})", "the factor by which it multiplies the tolerated error rate"),
             "quant_bits": ("L({r}) - L({a})", "the bits per weight it saves at the tolerated level"),
             "sparsity": ("L({a}) - L({r})", "the sparsity it adds to the tolerated level")}


def _text(h: Mapping[str, Any]) -> str:
    """The headline in words: its value or bound, its interval, and what L means."""
    arm, ref = (schema.ARM_LABELS.get(a, a) for a in (h["arm"], h["reference"]))
    formula, meaning = _QUANTITY[h["level_name"]]
    formula = formula.format(a=arm, r=ref)
    if h["value"] is not None:
        effect = f"{formula} = {h['value']:.3g}, {meaning}"
    elif h["bound"] is not None:
        effect = f"{formula} {h['bound']} ({meaning}; censored: a tolerated level lies outside the tested range)"
    else:
        effect = f"{formula} cannot be bounded: both tolerated levels lie beyond the same end of the tested range"
    lo, hi = h["interval"]
    scale = "log10 of the level" if h["scale"] == "log10" else "the level"
    return (f"At a failure rate of {h['target']:.0%} (failure: perplexity ratio > {h['fail_ratio']:g} or "
            f"non-finite), protecting the {arm} weights instead of the {ref} weights: {effect}; "
            f"{h['confidence']:.0%} paired-bootstrap interval {lo:.3g} to {hi:.3g}. "
            f"L(arm), the tolerated {h['level_name']}, is the level at which the arm's failure rate first reaches "
            f"{h['target']:.0%} going harsher, interpolated linearly in {scale} between tested levels.")
