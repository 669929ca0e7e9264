"""Which ATen ops does ``torch.export`` leave in each zoo model's graph?

For every family in ``models/hf_zoo.py`` plus ``models/reference_llama.py`` and
``models/nanogpt.py`` (tiny sizes, train mode, CPU), this runs

    torch.export.export(model, (), kwargs, dynamic_shapes=..., strict=False)

with ``torch.export.Dim.AUTO`` on the batch and sequence dims of every input, and prints
the export time and the sorted distinct targets (``str(node.target)``) of the graph's
call_function nodes, including those inside higher-order-op subgraphs (autocast and
grad-mode regions, if any). An untimed warm-up export goes first. Then the union over all
models, each with the number of models that use it and the total node count; the union,
one op per line, goes to ``--out`` (``bench/aten_ops.txt``). The graph is torch.export's
training IR, so composites such as ``aten.linear`` and ``aten.scaled_dot_product_attention``
stay whole. Models that fail to build or export are listed with the error.

    python bench/aten_ops.py [--only llama,nanogpt] [--attn eager] [--eval] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import traceback
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.export import Dim  # noqa: E402

from models import hf_zoo, nanogpt, reference_llama  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aten_ops.txt")


def zoo(attn: str | None) -> dict[str, Callable[[], tuple[nn.Module, dict]]]:
    """name -> builder returning (model, keyword inputs); HF families first."""
    def hf(family: str):
        def make():
            kw = {} if attn is None else {"attn_implementation": attn}
            return hf_zoo.build(family, **kw), hf_zoo.example_inputs(family)
        return make

    out: dict[str, Callable[[], tuple[nn.Module, dict]]] = {f: hf(f) for f in hf_zoo.FAMILIES}
    out["reference_llama"] = lambda: (reference_llama.build_model(),
                                      reference_llama.example_inputs())
    out["nanogpt"] = lambda: (nanogpt.build_model(flash=attn != "eager"),
                              nanogpt.example_inputs())
    return out


def op_counts(gm: torch.fx.GraphModule) -> collections.Counter:
    """call_function targets in gm and every GraphModule nested in it, with counts."""
    counts: collections.Counter = collections.Counter()
    for mod in gm.modules():
        if isinstance(mod, torch.fx.GraphModule):
            for node in mod.graph.nodes:
                if node.op == "call_function":
                    counts[str(node.target)] += 1
    return counts


def export_one(model: nn.Module, kwargs: dict) -> tuple[float, collections.Counter]:
    dynamic = {k: {0: Dim.AUTO, 1: Dim.AUTO} for k in kwargs}
    t0 = time.perf_counter()
    ep = torch.export.export(model, (), kwargs, dynamic_shapes=dynamic, strict=False)
    seconds = time.perf_counter() - t0
    return seconds, op_counts(ep.graph_module)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated model names (default: all)")
    ap.add_argument("--attn", default=None, choices=["sdpa", "eager"],
                    help="HF attn_implementation (default: hf_zoo's) and nanoGPT's path")
    ap.add_argument("--eval", action="store_true", help="export in eval mode (default: train)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="where to write the union")
    ap.add_argument("--quiet", action="store_true", help="no per-model op lists")
    args = ap.parse_args(argv)

    builders = zoo(args.attn)
    names = [n for n in args.only.split(",") if n] or list(builders)
    unknown = [n for n in names if n not in builders]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {', '.join(builders)}")

    # the first export in a process pays one-off costs (imports, caches); not a model's
    export_one(nn.Linear(4, 4), {"input": torch.randn(2, 3, 4)})

    torch.manual_seed(0)
    per_model: dict[str, tuple[float, collections.Counter]] = {}
    failures: dict[str, str] = {}
    for name in names:
        stage = "build"
        try:
            model, kwargs = builders[name]()
            model.train(not args.eval)
            stage = "export"
            per_model[name] = export_one(model, kwargs)
        except Exception as e:  # report and go on with the others
            last = traceback.extract_tb(e.__traceback__)[-1]
            failures[name] = (f"{stage}: {type(e).__name__}: {str(e).strip().splitlines()[0]}"
                              f" (at {os.path.basename(last.filename)}:{last.lineno})")
            print(f"== {name}: FAILED {failures[name]}", flush=True)
            continue
        seconds, counts = per_model[name]
        print(f"== {name}: export {seconds:.2f} s, {len(counts)} distinct ops, "
              f"{sum(counts.values())} nodes", flush=True)
        if not args.quiet:
            for op in sorted(counts):
                print(f"   {op}  x{counts[op]}")

    users: collections.Counter = collections.Counter()
    nodes: collections.Counter = collections.Counter()
    for _, counts in per_model.values():
        users.update(counts.keys())
        nodes.update(counts)

    print(f"\n== summary ({'eval' if args.eval else 'train'} mode, attn {args.attn or 'default'})")
    print(f"   {'model':16s} {'export s':>8s} {'ops':>4s} {'nodes':>5s}")
    for name, (seconds, counts) in per_model.items():
        print(f"   {name:16s} {seconds:8.2f} {len(counts):4d} {sum(counts.values()):5d}")
    print(f"\n== union over {len(per_model)} models: {len(users)} ops "
          f"(models using it / total nodes)")
    for op in sorted(users):
        print(f"   {op:48s} {users[op]:3d} {nodes[op]:5d}")
    if failures:
        print(f"\n== failed ({len(failures)})")
        for name, err in failures.items():
            print(f"   {name}: {err}")

    if per_model:
        with open(args.out, "w") as f:
            f.write("".join(f"{op}\n" for op in sorted(users)))
        print(f"\nwrote {len(users)} ops to {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
