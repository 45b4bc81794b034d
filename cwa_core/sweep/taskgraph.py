"""The sweep's task states, free of Ray: which tasks are ready, which wait for which, what a
failure costs (:class:`TaskGraph`).

A task is *waiting* (for the results of its ``deps``), *ready* (in its model's queue), *running*
(handed out), *done* (its result kept) or *failed*. A task that fails is charged a try and goes
back first in its queue until it has used its tries; then it gives up, and every task that
needs it, directly or not, fails with it. Tasks that serve one cell (``Task.cell``) and are
still queued when that cell has failed are dropped when their turn comes. A model has nothing
left when every task that no other task needs (a cell's finish) is done or failed and none of
its tasks is running: its actors can go. Tasks run by the driver (``Task.on_driver``) wait in a
queue of their own.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

from .plan import Task

WAITING, READY, RUNNING, DONE, FAILED = "waiting", "ready", "running", "done", "failed"
SETTLED = (DONE, FAILED)


class TaskGraph:
    """The states of ``tasks`` (each task's ``deps`` must come before it); ``tries``: how many
    times a task runs at most before it gives up."""

    def __init__(self, tasks: Iterable[Task], tries: int) -> None:
        if tries < 1:
            raise ValueError(f"tries must be at least 1, got {tries}")
        self.max_tries = tries
        self.tasks: dict[str, Task] = {}
        self.state: dict[str, str] = {}
        self.tries: dict[str, int] = {}  # tries charged so far
        self.errors: dict[str, list[str]] = {}
        self.results: dict[str, Any] = {}
        self.dependants: dict[str, list[str]] = {}  # in task order
        self._missing: dict[str, set[str]] = {}  # deps not done yet
        self._queues: dict[tuple, deque[str]] = {}
        self._driver: deque[str] = deque()
        self._running: dict[tuple, int] = {}  # per model
        self._sinks: dict[tuple, list[str]] = {}  # per model: the tasks no task needs
        self.dead_cells: set[str] = set()
        for t in tasks:
            self._add(t)
        for tid, t in self.tasks.items():
            self._queues.setdefault(t.model_key, deque())
            self._running.setdefault(t.model_key, 0)
            if not self.dependants[tid]:
                self._sinks.setdefault(t.model_key, []).append(tid)
            if not t.deps:
                self._make_ready(tid)

    def _add(self, t: Task) -> None:
        if t.id in self.tasks:
            raise ValueError(f"task {t.id!r} is listed twice")
        unknown = [d for d in t.deps if d not in self.tasks]
        if unknown:
            raise ValueError(f"task {t.id!r} needs {unknown[0]!r}, which is not listed before it")
        self.tasks[t.id] = t
        self.state[t.id] = WAITING
        self.tries[t.id] = 0
        self.errors[t.id] = []
        self.dependants[t.id] = []
        self._missing[t.id] = set(t.deps)
        for d in dict.fromkeys(t.deps):
            self.dependants[d].append(t.id)

    def _make_ready(self, tid: str, *, first: bool = False) -> None:
        self.state[tid] = READY
        t = self.tasks[tid]
        q = self._driver if t.on_driver else self._queues[t.model_key]
        q.appendleft(tid) if first else q.append(tid)

    def _start(self, tid: str) -> Task:
        self.state[tid] = RUNNING
        t = self.tasks[tid]
        self._running[t.model_key] += 1
        return t

    def _stop(self, tid: str, state: str) -> None:
        if self.state[tid] == RUNNING:
            self._running[self.tasks[tid].model_key] -= 1
        self.state[tid] = state

    # -- handing out ---------------------------------------------------------------------------
    def has_ready(self, mk: tuple) -> bool:
        """Whether ``mk``'s queue holds a task (one of a failed cell included)."""
        return bool(self._queues.get(mk))

    def take(self, mk: tuple) -> Task | None:
        """The next ready task of model ``mk``, now running; None if there is none. Tasks of a
        cell that has failed are dropped on the way (their work would be thrown away)."""
        q = self._queues.get(mk, deque())
        while q:
            tid = q.popleft()
            if self.tasks[tid].cell in self.dead_cells:
                self._stop(tid, FAILED)
                continue
            return self._start(tid)
        return None

    def take_all(self, mk: tuple) -> list[Task]:
        """Every ready task of ``mk``, now running (to give them up: no actor is left to run them)."""
        q = self._queues.get(mk, deque())
        out = [self._start(tid) for tid in q]
        q.clear()
        return out

    def take_driver(self) -> Task | None:
        """The next ready task the driver runs itself, now running; None if there is none."""
        while self._driver:
            tid = self._driver.popleft()
            if self.state[tid] == READY:
                return self._start(tid)
        return None

    # -- outcomes ------------------------------------------------------------------------------
    def done(self, tid: str, result: Any) -> list[Task]:
        """Record the result of a running task; returns the tasks it made ready, in task order."""
        if self.state[tid] != RUNNING:
            raise ValueError(f"task {tid!r} is {self.state[tid]}, not running")
        self._stop(tid, DONE)
        self.results[tid] = result
        ready = []
        for d in self.dependants[tid]:
            self._missing[d].discard(tid)
            if not self._missing[d] and self.state[d] == WAITING:
                self._make_ready(d)
                ready.append(self.tasks[d])
        return ready

    def charge(self, tid: str, why: str) -> bool:
        """A try of running task ``tid`` failed: True if it runs again (first in its queue),
        False if it has used its tries (then :meth:`give_up` it)."""
        if self.state[tid] != RUNNING:
            raise ValueError(f"task {tid!r} is {self.state[tid]}, not running")
        self.tries[tid] += 1
        self.errors[tid].append(why)
        if self.tries[tid] >= self.max_tries:
            return False
        self._stop(tid, READY)
        self._make_ready(tid, first=True)
        return True

    def requeue(self, tids: Iterable[str]) -> None:
        """Running tasks that did not get their turn (their actor was lost with another task):
        back first in their queue, in the given order, no try charged."""
        for tid in reversed(list(tids)):
            self._stop(tid, READY)
            self._make_ready(tid, first=True)

    def give_up(self, tid: str) -> list[Task]:
        """Task ``tid`` fails for good, and every task that needs it, directly or not; returns the
        tasks that failed now, in task order (the first is ``tid``)."""
        failed = []
        todo = [tid]
        while todo:
            x = todo.pop()
            if x != tid and self.state[x] in SETTLED:
                continue
            self._stop(x, FAILED)
            if self.tasks[x].cell is not None:
                self.dead_cells.add(self.tasks[x].cell)
            failed.append(x)
            todo.extend(self.dependants[x])
        order = {t: i for i, t in enumerate(self.tasks)}
        return [self.tasks[x] for x in sorted(dict.fromkeys(failed), key=order.__getitem__)]

    # -- models --------------------------------------------------------------------------------
    def model_finished(self, mk: tuple) -> bool:
        """Nothing left for ``mk``'s actors: every task no task needs is settled, none is running."""
        return self._running.get(mk, 0) == 0 and all(self.state[t] in SETTLED for t in self._sinks.get(mk, []))

    def drop(self, mk: tuple) -> None:
        """``mk`` is finished: what is left of its work (nothing needs it) fails unseen."""
        self._queues.get(mk, deque()).clear()
        for tid, t in self.tasks.items():
            if t.model_key == mk and self.state[tid] in (WAITING, READY):
                self.state[tid] = FAILED

    def unsettled(self, kind: str) -> list[Task]:
        """The tasks of ``kind`` neither done nor failed (cells still open when the sweep stops)."""
        return [t for tid, t in self.tasks.items() if t.kind == kind and self.state[tid] not in SETTLED]
