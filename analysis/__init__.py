"""Cross-model analysis of cwa results: reads result folders (or MLflow cell runs) with pandas,
compares models, metrics, K and seeds with stated statistics, draws the figures and writes
the research report. Never needs a model, a GPU or torch.

    from analysis import analyze, write_report
    a = analyze(["results/cross_model"], output="results/cross_model/statistical_analysis.json")
    write_report(a, "results/cross_model/research_summary.pdf", figures_dir="results/cross_model/figures")

Commands: ``python -m analysis.cross_model`` and ``python -m analysis.report`` (``--help``).
The names below are imported on first use, so that running a submodule with ``-m`` does not
import it twice.
"""
from __future__ import annotations

from importlib import import_module

_EXPORTS = {"AnalysisOptions": "cross_model", "analyze": "cross_model", "analyze_mlflow": "cross_model",
            "load_tables": "cross_model", "load_results": "load", "write_report": "report"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}; it exports {', '.join(__all__)}")
