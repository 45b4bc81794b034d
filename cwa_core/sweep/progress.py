"""The sweep's progress bars: one line per model and one overall."""
from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from .plan import Plan


class _Progress:
    """One live line per model and one overall: done, running, failed, elapsed, time left."""

    def __init__(self, plan: Plan, enabled: bool) -> None:
        self.bars = {}
        self.overall = tqdm(total=len(plan.cells), desc="sweep", position=0, disable=not enabled, unit="cell",
                            dynamic_ncols=True)
        for i, (mk, cells) in enumerate(plan.models.items(), start=1):
            name = Path(str(cells[0].settings["model"])).name
            self.bars[mk] = tqdm(total=len(cells), desc=f"  {name}", position=i, disable=not enabled, unit="cell",
                                 dynamic_ncols=True)
        self.failed = {key: 0 for key in [*self.bars, "all"]}

    def waiting(self, mk: tuple, on: bool = True) -> None:
        """Show that the model waits for resources (its actor is not placed yet)."""
        bar = self.bars[mk]
        bar.set_postfix_str("waiting for resources" if on else f"running {bar.total - bar.n}, failed {self.failed[mk]}")

    def update(self, mk: tuple, *, failed: bool = False) -> None:
        for key, bar in ((mk, self.bars[mk]), ("all", self.overall)):
            self.failed[key] += failed
            bar.update(1)
            bar.set_postfix_str(f"running {bar.total - bar.n}, failed {self.failed[key]}")

    def close(self) -> None:
        for b in [*self.bars.values(), self.overall]:
            b.close()
