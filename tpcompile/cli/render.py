"""Render an :class:`~tpcompile.explain.Explanation`: a text table, JSON, or a picture of
one block's graph (Graphviz DOT, or a self-contained HTML page) coloured by placement,
with the inserted collectives drawn as nodes."""

from __future__ import annotations

import html

import networkx as nx

from ..analysis.layers import is_block, layer_of
from ..analysis.layout import R, info
from ..planning.build import Compiled, Unit
from .explain import Explanation, unit_collectives

COLORS = {"R": "#e0e0e0", "E": "#fff2a8", "S": "#a8d0ff", "Q": "#b5f0b5", "P": "#e8c8f0",
          "C": "#ff9f8f"}
LEGEND = ("R replicated", "E replicated, gradient summed over tp", "S sharded (tensor parallel)",
          "Q sequence-sharded", "P a term per rank, summed over tp where read", "C collective")


def _mb(b: float) -> str:
    if b < 2**10:
        return f"{int(b)} B"
    return f"{b / 2**20:,.2f} MiB" if b >= 2**20 else f"{b / 2**10:,.1f} KiB"


def _gb(b: float) -> str:
    return f"{b / 2**30:,.2f} GiB" if b >= 2**30 else _mb(b)


def text(e: Explanation) -> str:
    sp = "on" if e.sequence_parallel else "off"
    lines = [f"tpcompile explain: {e.model}  tp={e.tp} dp={e.dp} batch={e.batch} seq={e.seq} "
             f"dtype={e.dtype} sequence_parallel={sp}  (planned in {e.plan_seconds:.2f} s)", "",
             "Segments and placements"]
    for b in e.blocks:
        io = f"  in {' '.join(b.inputs)} -> out {b.output}" if b.inputs else ""
        lines.append(f"  {b.path}  ({b.members} x {b.module_type}){io}")
        for s in b.segments:
            for i, l in enumerate(s.layers):
                pl = ", ".join(f"{k} {v}" for k, v in l.placements.items()) or "-"
                lines.append(f"    {s.kind if i == 0 else '':<11} {l.name:<28} {l.style:<17} {pl}")
        for kind, rows in (("norm", b.norms), ("sliced", b.sliced)):
            for l in rows:
                pl = ", ".join(f"{k} {v}" for k, v in l.placements.items()) or "-"
                lines.append(f"    {kind:<11} {l.name:<28} {l.style:<17} {pl}")
    lines += ["", "Collectives per step (bytes of the full tensor; wire = sent per rank, ring)",
              f"  {'module':<10} {'phase':<8} {'op':<14} {'shape':<18} {'dtype':<8} {'x':>4} "
              f"{'each':>11} {'wire/step':>11}  at"]
    for c in e.collectives:
        lines.append(f"  {c.module:<10} {c.phase:<8} {c.kind:<14} {str(c.shape):<18} {c.dtype:<8} "
                     f"{c.count:>4} {_mb(c.bytes):>11} {_mb(c.wire_bytes_per_rank):>11}  {c.at}")
    m, k = e.memory, e.comm
    ratio = k.total_wire_bytes / k.megatron_min_wire_bytes if k.megatron_min_wire_bytes else 1.0
    lines += ["", "Communication per step, per rank",
              f"  forward {_gb(k.forward_wire_bytes)}, backward {_gb(k.backward_wire_bytes)}, "
              f"total {_gb(k.total_wire_bytes)}; Megatron minimum {_gb(k.megatron_min_wire_bytes)} "
              f"(x{ratio:.2f}: the rest is the gathered logits of the drop-in output, a "
              "vocab-parallel loss's per-row statistics and norm-weight gradient sums)"]
    if e.dp > 1:
        lines.append(f"  FSDP over dp={e.dp}: {_gb(k.dp_wire_bytes)} (params gathered forward and "
                     "backward, gradients reduce-scattered)")
    lines += ["", "Memory per rank",
              f"  parameters {_gb(m.params_per_rank_bytes)} (sharded {_gb(m.params_sharded_bytes)}, "
              f"replicated {_gb(m.params_replicated_bytes)}; whole model {_gb(m.params_total_bytes)})",
              f"  activations (every intermediate kept) {_gb(m.activations_sp_bytes)} with sequence "
              f"parallel, {_gb(m.activations_no_sp_bytes)} without"]
    lines += ["", "Left replicated"]
    lines += [f"  {r.layer}: {r.reason}" for r in e.replicated] or ["  nothing: every Linear and "
                                                                     "Embedding is sharded"]
    return "\n".join(lines) + "\n"


def block_graph(c: Compiled, path: str | None = None) -> tuple[Unit, nx.DiGraph]:
    """One block's dataflow graph (the first block group unless ``path`` names one), each
    node with its layout, collectives inserted as nodes of their own."""
    units = [u for u in c.units if path in (u.plan.path, *u.members)] if path else \
        [u for u in c.units if u.plan.path] or c.units
    if not units:
        from ..errors import TPCompileError
        raise TPCompileError(f"no traced block is named {path!r}; blocks: "
                             f"{', '.join(u.plan.path or '<root>' for u in c.units)}")
    u = units[0]
    g = nx.DiGraph()
    ids: dict[str, str] = {}  # graph node name -> drawn id (a layer is drawn by its name)
    for n in u.gm.graph.nodes:
        if info(n) is None and n.op != "output" and not is_block(n):
            continue
        layer = layer_of(n)
        ids[n.name] = nid = layer.name if layer is not None else n.name
        lay = u.prop.layouts.get(n, R)
        g.add_node(nid, label=f"{nid}\n{lay}", kind=lay.kind)
        for p in n.all_input_nodes:
            if p.name in ids:
                g.add_edge(ids[p.name], nid)
    for i, (at, kind, phase, _, shape, _, (src, dst)) in enumerate(unit_collectives(u, c.plan.tp)):
        cid = f"c{i}"
        src, dst = ids.get(src or "", src), ids.get(dst or "", dst)
        g.add_node(cid, label=f"{kind} ({phase})\n{list(shape)}\n{at}", kind="C")
        if src in g:
            g.add_edge(src, cid)
        if dst in g:
            g.add_edge(cid, dst)
            if g.has_edge(src, dst):
                g.remove_edge(src, dst)
    return u, g


def dot(c: Compiled, path: str | None = None) -> str:
    u, g = block_graph(c, path)
    out = [f'digraph "{u.plan.path or "root"}" {{', "  rankdir=TB;",
           '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];']
    for n, d in g.nodes(data=True):
        shape = ", shape=octagon" if d["kind"] == "C" else ""
        label = d["label"].replace('"', "'").replace("\n", "\\n")
        out.append(f'  "{n}" [label="{label}", fillcolor="{COLORS[d["kind"]]}"{shape}];')
    out += [f'  "{a}" -> "{b}";' for a, b in g.edges]
    legend = "\\n".join(LEGEND)
    out.append(f'  legend [shape=note, fillcolor=white, label="{legend}"];')
    return "\n".join(out) + "\n}\n"


def page(e: Explanation, c: Compiled, path: str | None = None) -> str:
    u, g = block_graph(c, path)
    rows = []
    for n in nx.topological_sort(g):
        d = g.nodes[n]
        ins = ", ".join(g.predecessors(n))
        rows.append(f'<tr style="background:{COLORS[d["kind"]]}"><td>{html.escape(n)}</td>'
                    f'<td>{html.escape(d["label"]).replace(chr(10), "<br>")}</td>'
                    f"<td>{html.escape(ins)}</td></tr>")
    legend = " ".join(f'<span style="background:{COLORS[s[0]]};padding:2px 6px">{html.escape(s)}</span>'
                      for s in LEGEND)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>tpcompile explain "
            f"{html.escape(e.model)}</title></head><body style='font-family:sans-serif'>"
            f"<h1>{html.escape(e.model)}: tp={e.tp}</h1><pre>{html.escape(text(e))}</pre>"
            f"<h2>Block {html.escape(u.plan.path or '<root>')}</h2><p>{legend}</p>"
            "<table border=1 cellpadding=3 style='border-collapse:collapse'>"
            "<tr><th>node</th><th>op / layout</th><th>inputs</th></tr>" + "".join(rows) +
            f"</table><h2>DOT</h2><pre>{html.escape(dot(c, path))}</pre></body></html>\n")
