"""Super weights: the registry of published (and reported) coordinates,
cwa_core/known_super_weights.json, and the comparison of detected candidates with it."""
from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Mapping, Sequence

from torch import nn

from ..architectures import arch_spec
from .ranks import RankSinks, _ranks_of
from .records import Coordinate

# Registry statuses (cwa_core/known_super_weights.json): only "published" (Yu et al. 2024, its
# Table 2, its text or its authors' code) counts as published; "reported_by" (another named
# study) is matched and listed apart.
PUBLISHED, REPORTED_BY = "published", "reported_by"
STATUSES = (PUBLISHED, REPORTED_BY)


@functools.lru_cache(maxsize=1)
def known_super_weights() -> dict:
    """The registry of super-weight coordinates (cwa_core/known_super_weights.json), as loaded."""
    return json.loads(resources.files("cwa_core").joinpath("known_super_weights.json").read_text("utf-8"))


def _listed(hf_id: str | None) -> str | None:
    """The table's key for exactly ``hf_id`` or a listed alias of it; never a substring match."""
    table = known_super_weights()
    key = table["aliases"].get(hf_id, hf_id)
    return key if key in table["models"] else None


def registry_entries(hf_id: str | None, status: str | None = None) -> list[dict]:
    """The registry's entries for exactly ``hf_id`` (or an alias): dicts with ``coordinate``
    [L, row, col], ``status`` and ``sources``; only those of ``status`` when given; [] when the
    id is not listed."""
    if status is not None and status not in STATUSES:
        raise ValueError(f"status {status!r}; allowed: {', '.join(STATUSES)}")
    key = _listed(hf_id)
    if key is None:
        return []
    return [e for e in known_super_weights()["models"][key]["entries"] if status is None or e["status"] == status]


def published_coordinates(model_or_type: nn.Module | str, hf_id: str | None,
                          status: str = PUBLISHED) -> list[Coordinate]:
    """The super weights of ``hf_id`` with registry ``status`` (published by default; or
    "reported_by") as coordinates of this architecture's down projections (to track with
    :class:`CandidateRanks`); [] when the id is not listed or has none of that status."""
    entries = registry_entries(hf_id, status)
    if not entries:
        return []
    spec = arch_spec(model_or_type)
    return [Coordinate(layer, row, col, f"{spec.layers}.{layer}.{spec.down_proj}")
            for layer, row, col in (e["coordinate"] for e in entries)]


def match_published(hf_id: str | None, candidates: Sequence[Coordinate], ranks: RankSinks | None = None, *,
                    shapes: Mapping[int, tuple[int, int]]) -> dict | None:
    """Compare detected ``candidates`` with the registry's coordinates of ``hf_id`` (the exact id
    or a listed alias); None when it is not listed. ``found``, ``missed``, ``outside_shape`` and
    ``new`` (candidates not published) count only ``published`` entries; the ``reported_by``
    ones (another study) get their own found / missed / outside_shape. ``shapes``: layer ->
    (rows, cols) of this model's down projections (:func:`down_proj_shapes`); a coordinate
    outside them means another checkpoint. ``ranks``: metric -> seed -> :class:`CandidateRanks`
    built with :func:`published_coordinates` of both statuses as ``extra``."""
    key = _listed(hf_id)
    if key is None:
        return None
    table = known_super_weights()
    model = table["models"][key]
    by_status = {s: [tuple(e["coordinate"]) for e in model["entries"] if e["status"] == s] for s in STATUSES}
    detected = {c.key for c in candidates}

    def inside(k) -> bool:
        s = shapes.get(k[0])
        return s is not None and 0 <= k[1] < s[0] and 0 <= k[2] < s[1]

    def d(k) -> dict:
        return {"layer": k[0], "row": k[1], "col": k[2]}

    def compare(known) -> dict:
        return {"found": [d(k) for k in known if k in detected],
                "missed": [d(k) for k in known if k not in detected and inside(k)],
                "outside_shape": [d(k) for k in known if not inside(k)]}

    published = set(by_status[PUBLISHED])
    used = sorted({s["id"] for e in model["entries"] for s in e["sources"]})
    return {"hf_id": hf_id, "listed_as": key, "has_published": bool(published),
            **compare(by_status[PUBLISHED]),
            "new": [d(c.key) for c in candidates if c.key not in published],  # not published (may be reported_by)
            "reported_by": compare(by_status[REPORTED_BY]),
            "entries": [{**d(tuple(e["coordinate"])), "status": e["status"], "sources": e["sources"]}
                        for e in model["entries"]],
            "sources": {s: table["sources"][s] for s in used}, "note": model.get("note"),
            "ranks": [{**d(k), "status": s, "ranks": _ranks_of(k, ranks)}
                      for s in STATUSES for k in by_status[s] if inside(k)]}
