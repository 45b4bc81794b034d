"""What the scheduler keeps per actor slot (the tasks' states are :mod:`.taskgraph`'s), and how
it reads resources and failures: what an actor asks Ray for, whether it fits, whether an error
lost the actor or left it untrustworthy."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_INFLIGHT = 2  # tasks per actor: one running, one queued behind it (so it never idles)


class SweepResourceError(RuntimeError):
    """The sweep's actors can never be placed on this Ray (one line; nothing is written)."""


def actor_demand(res) -> dict[str, float]:
    """What one actor asks Ray for."""
    return {"CPU": float(res.cpus_per_actor), "GPU": float(res.gpus_per_actor)}


def fits(need: dict[str, float], have: dict[str, float]) -> bool:
    return all(have.get(k, 0.0) >= v for k, v in need.items() if v > 0)


def _fmt_resources(r: dict) -> str:
    return ", ".join(f"{r.get(k, 0):g} {k}" for k in ("CPU", "GPU"))


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


@dataclass(eq=False)
class _Slot:
    """One actor of a model's group, replaced when it dies, released when its model is done.

    Tasks go only to an actor Ray has placed (loading its model, or ready): an actor still waiting
    for resources holds no work, so the work never waits behind a slot that another model's
    actors hold."""

    actor: Any
    ready_ref: Any = None  # the actor's __ray_ready__ call: returns once it is placed and loaded
    ready: bool = False
    placed: bool = False  # it has a process (loading its model): work may queue behind the load
    inflight: list = field(default_factory=list)  # [(ref, plan Task)] in submission order: the first is running
    deaths: int = 0
    alive: bool = True
    released: bool = False  # its model's cells are all done: the actor was let go
    completed: int = 0  # tasks the current actor finished (it has loaded its model)
    waiting: bool = False  # said to be waiting for resources (logged once per wait)
    last_error: str | None = None

    def renew(self, actor) -> None:
        self.actor, self.ready_ref, self.completed = actor, actor.__ray_ready__.remote(), 0
        self.ready = self.placed = self.waiting = False


def _is_actor_loss(ray, e: BaseException) -> bool:
    x = ray.exceptions
    return isinstance(e, (x.RayActorError, x.WorkerCrashedError, x.OutOfMemoryError, x.NodeDiedError,
                          x.LocalRayletDiedError, x.ActorUnschedulableError))


def _has_process(ray, actor) -> bool | None:
    """Whether Ray has given ``actor`` a process (placed it: it is loading its model, or ready);
    None where that cannot be read. From the GCS actor table (no dashboard needed): an actor
    still waiting for resources is pending creation without a pid."""
    try:
        from ray._private import state

        entry = state.actors(actor_id=actor._actor_id.hex())
        return entry.get("State") == "ALIVE" or bool(entry.get("Pid"))
    except Exception:  # noqa: BLE001 - a private API: without it, work waits for the actor to be ready
        return None


def _needs_fresh_actor(e: BaseException) -> bool:
    """A task error after which the actor's state cannot be trusted: out of (GPU) memory, or
    weights that could not be restored. The actor is replaced (and reloads its model)."""
    cause = getattr(e, "cause", None) or e
    name = type(cause).__name__
    return name in ("OutOfMemoryError", "PerturbationLeakError") or "out of memory" in str(cause).lower()
