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


def main_variants(kind: str, spec_json: str, seed: int, variants: list[dict],
                  world: int = 4) -> None:
    """Re-run one ``test_rewrite_matches_original`` example (what its failure prints:
    the kind, the spec's JSON, the seed and the variants) and print each verdict."""
    from tests.property.jobs import check_variants
    pool = WorkerPool(world)
    try:
        per_rank = pool.run(check_variants, kind, spec_json, seed, variants)
    finally:
        pool.close()
    for i, v in enumerate(variants):
        res = [r[i] for r in per_rank]
        if res[0]["error"]:
            print(v, {r["error"]: r["message"] for r in res})
            continue
        problems = verdict([r["report"] for r in res])
        print(v, "\n".join(problems) if problems else "matches on every rank")
