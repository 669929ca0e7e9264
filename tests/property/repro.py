"""Re-run one property-test example on a fresh gloo worker group and print the report."""

from __future__ import annotations

from tests.harness import WorkerPool
from tests.property.arch import Spec
from tests.property.jobs import check_example


def main(spec: Spec, *, seed: int, tp: int, sp: bool, batch: int, seq: int,
         on_indivisible: str = "error", dp: bool = False, world: int = 4) -> None:
    pool = WorkerPool(world)
    try:
        res = pool.run(check_example, spec.model_dump_json(), seed, tp, sp, batch, seq,
                       on_indivisible, dp=dp)
    finally:
        pool.close()
    print(res[0])
