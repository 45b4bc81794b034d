"""Subprocess entry point for one memory measurement (see ``common.run_child``):

    python -m benchmarks._child MODULE VARIANT SHAPE SETTINGS_JSON

prints one JSON line: the variant's own figures plus ``rss_start`` and ``peak`` (bytes).
"""
from __future__ import annotations

import importlib
import json
import sys


def main(argv: list[str]) -> None:
    module, variant, shape, settings = argv
    from benchmarks.common import SHAPES, PeakMeter

    import torch

    settings = json.loads(settings)
    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    mod = importlib.import_module(f"benchmarks.{module}")
    meter = PeakMeter()
    out = mod.run_variant(variant, SHAPES[shape], settings, meter) or {}
    print(json.dumps({**out, "rss_start": meter.rss_start, "peak": meter.peak}))


if __name__ == "__main__":
    main(sys.argv[1:])
