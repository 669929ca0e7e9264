"""Property tests; ``STATS`` collects what every example measured, for the run summary."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Stats:
    examples: int = 0
    compared: int = 0
    two_d: int = 0  # examples on the (dp, tp) mesh with FSDP2
    errors: dict[str, int] = field(default_factory=dict)
    worst: float = 0.0
    worst_where: str = "-"

    def record(self, r: dict, two_d: bool = False) -> None:
        self.examples += 1
        self.two_d += two_d
        if r.get("error"):
            self.errors[r["error"]] = self.errors.get(r["error"], 0) + 1
            return
        self.compared += 1
        err, where = max((r["output"], "<output>"), (r["worst"], r["worst_name"]))
        if err > self.worst:
            self.worst, self.worst_where = err, where


STATS = _Stats()
