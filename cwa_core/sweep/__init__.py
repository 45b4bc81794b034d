"""The orchestration layer: sweep spec, plan, Ray workers, MLflow tracking.

Only this package imports Ray, MLflow and YAML; the science in ``cwa_core`` never knows it
runs inside a sweep.
"""
