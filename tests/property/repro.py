"""Re-run one property-test example on a fresh gloo worker group and print the verdict."""

from __future__ import annotations

from tests.harness import WorkerPool
from tests.property.arch import Spec
from tests.property.jobs import check_example
from tpcompile.verify import verdict


def main(spec: Spec, *, seed: int, tp: int, sp: bool, batch: int, seq: int,
         on_indivisible: str = "error", dp: bool = False, world: int = 4) -> None:
    pool = WorkerPool(world)
    try:
        res = pool.run(check_example, spec.model_dump_json(), seed, tp, sp, batch, seq,
                       on_indivisible, dp=dp)
    finally:
        pool.close()
    if res[0]["error"]:
        print({r["error"]: r["message"] for r in res})
        return
    print("styles:", res[0]["styles"])
    for r in res:
        name, err, bound = r["report"].worst
        print(f"rank {r['report'].rank}: closest to its bound: {name} {err:.3g} "
              f"(allowed {bound:.3g})")
    problems = verdict([r["report"] for r in res])
    print("\n".join(problems) if problems else "matches the unsharded model on every rank")
