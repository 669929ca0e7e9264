"""Stage 2, the analysis: find tensor-parallel segments and sequence-parallel regions in a traced graph.

A *segment* is a connected region of shard-preserving ops whose entries are Linear
outputs (colwise) and whose exits are Linear inputs (rowwise), or graph outputs (a
colwise head whose output is gathered). Detection comes from dataflow alone: we
propose a Linear as colwise, propagate the shard through the op table, pull in the other
Linears the ops demand (k and v once q is sharded, ``w3`` once ``w1`` is), and accept the
region only if every op in it is provably safe. Anything else stays replicated, with the
reason recorded.

Modules: ``ops`` (the op table, keyed by ATen overloads) and ``layout`` (what a value
is: replicated, sharded, partial), ``layers`` (which nodes compute which layer),
``propagate`` (layouts through the graph), ``segments`` (detection), ``sequence``
(sequence-parallel regions and block contracts).
"""

from .layers import (EXPERT_KINDS, NORM_OPS, Contract, Layer, Note, Propagation, Segment,
                     canonical_linears, dataflow_graph, is_block, layer_of, layer_params,
                     mark_layers, param_role, source_line, tied_pairs, unlayered_weights, where)
from .propagate import propagate
from .segments import (check_divisibility, detect_segments, embedding_styles, head_layers,
                       replicate_layer)

__all__ = ["EXPERT_KINDS", "NORM_OPS", "Contract", "Layer", "Note", "Propagation", "Segment",
           "canonical_linears", "check_divisibility", "dataflow_graph", "detect_segments",
           "embedding_styles", "head_layers", "is_block", "layer_of", "layer_params",
           "mark_layers", "param_role", "propagate", "replicate_layer", "source_line",
           "tied_pairs", "unlayered_weights", "where"]
