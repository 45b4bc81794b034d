"""Critical weight analysis: the science (scores, selection, perturbation, perplexity, stability).

Modules here are pure: tensors and ``nn.Module``s in, tensors and dataclasses out. The
orchestration layer (sweep spec, Ray workers, MLflow tracking) lives in ``cwa_core.sweep``.
"""

__version__ = "0.1.0"
