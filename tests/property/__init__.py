"""Property tests; ``STATS`` collects what every example measured, for the run summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Stats:
    examples: int = 0
    compared: int = 0
    two_d: int = 0  # examples on the (dp, tp) mesh with FSDP2
    errors: dict[str, int] = field(default_factory=dict)
    worst: float = 0.0  # worst relative error of a tensor held to rtol
    worst_where: str = "-"
    noisy: int = 0  # tensors whose bound is the reference's own rounding error instead
    used: float = 0.0  # the largest share of its bound any tensor used
    used_where: str = "-"
    # parallel comparisons (every one has tp > 1) by code style, tracer, SP and mesh
    by: dict[str, dict[str, int]] = field(default_factory=dict)
    faults: dict[str, tuple[int, int]] = field(default_factory=dict)  # examples drawn, caught

    def record(self, results: list[dict], two_d: bool = False, **labels: Any) -> None:
        """One parallel comparison: the results of all ranks; ``labels`` (style,
        tracer, sp, mesh) split the count of comparisons in the summary."""
        self.examples += 1
        self.two_d += two_d
        if results[0].get("error"):
            e = results[0]["error"]
            self.errors[e] = self.errors.get(e, 0) + 1
            return
        self.compared += 1
        for k, v in labels.items():
            key = f"sp={v}" if k == "sp" else str(v)
            self.by.setdefault(k, {})[key] = self.by.setdefault(k, {}).get(key, 0) + 1
        for r in results:
            rep = r["report"]
            for c in rep.checks:
                if c.kind == "structure" or not c.ok:
                    continue
                where = f"{c.kind} {c.name}, rank {rep.rank}"
                if c.noisy:
                    self.noisy += 1
                elif c.err > self.worst:
                    self.worst, self.worst_where = c.err, where
                if c.bound and c.err / c.bound > self.used:
                    self.used, self.used_where = c.err / c.bound, where


STATS = _Stats()
