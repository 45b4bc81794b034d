"""Faults on purpose: how the tests make workers and drivers fail for real.

Never set in normal use. ``CWA_FAULTS`` holds a JSON list of faults; ``CWA_FAULTS_STATE`` a folder
where firings are counted, so that a fault fires the stated number of times across processes,
actor replacements and driver restarts. A fault::

    {"where": "evaluate",            # a worker task (baseline, score, evaluate) or a driver
                                     # point (driver:after_write, driver:mid_log, driver:after_log)
     "action": "kill",               # kill (SIGKILL this process), raise, oom (torch's
                                     # OutOfMemoryError), leak (raise PerturbationLeakError),
                                     # sleep (for "seconds": a task still running when stopped)
     "match": {"seed": 1, "kind": "top_k"},   # optional: fire only where these context values match
     "after": 0,                     # let this many matching calls pass first
     "times": 1}                     # then fire this many times (-1: always)

The runner passes both variables on to its actors (``runtime_env``) when they are set.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

ENV = "CWA_FAULTS"
STATE_ENV = "CWA_FAULTS_STATE"


class InjectedFault(RuntimeError):
    """An exception raised on purpose by a fault."""


def env_vars() -> dict[str, str]:
    """The fault variables of this process, to pass to actors (empty in normal use)."""
    return {k: os.environ[k] for k in (ENV, STATE_ENV) if os.environ.get(k)}


def _count(state: Path, name: str) -> int:
    """Add one to the counter ``name`` (a file grown by one byte, atomic with O_APPEND) and
    return the new count."""
    path = state / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, b".")
    finally:
        os.close(fd)
    return path.stat().st_size


def maybe_fault(where: str, **context) -> None:
    """Fire the faults configured for ``where`` whose ``match`` fits ``context``."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    state = Path(os.environ.get(STATE_ENV) or ".")
    for i, fault in enumerate(json.loads(spec)):
        if fault.get("where") != where:
            continue
        if any(context.get(k) != v for k, v in (fault.get("match") or {}).items()):
            continue
        n = _count(state, f"calls-{i}")
        after, times = int(fault.get("after", 0)), int(fault.get("times", 1))
        if n <= after or (times >= 0 and n > after + times):
            continue
        action = fault.get("action", "raise")
        if action == "sleep":
            time.sleep(float(fault.get("seconds", 60)))
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "oom":
            import torch

            raise torch.OutOfMemoryError(f"injected fault at {where}: CUDA out of memory")
        if action == "leak":
            from ..perturb import PerturbationLeakError

            raise PerturbationLeakError(f"injected fault at {where}: weights not restored")
        raise InjectedFault(f"injected fault at {where} ({n - after} of {times})")
