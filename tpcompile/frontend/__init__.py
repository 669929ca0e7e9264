"""Stage 1: the front end. A module goes in, an ATen graph (``torch.export``'s training IR)
comes out, with its blocks kept as opaque calls.

Every trace runs on a *skeleton*: a structural copy of the user's model whose parameters
and buffers live on the meta device. Tracing therefore never touches the user's model
(no proxies left in its buffers, nothing changed when a trace fails) and costs no memory.

Repeated blocks (the children of an ``nn.ModuleList`` / ``nn.ModuleDict``) are exported
once per distinct signature. In the graph of their parent each call of a block is one
node, ``torch.ops.tpcompile.block(member, tensors)``: an opaque custom op whose fake
implementation gives the shapes the block's own export found. The block inputs are
learnt while exporting the parent: the first call of an unknown block stops that export,
the block is exported on the inputs it was about to get, and the parent is exported again.

``tracer="fx"`` runs ``torch.fx.symbolic_trace`` first and exports the traced
``GraphModule``: both front ends end in the same ATen IR, read by one op table.
"""

from .blocks import (BLOCK_OP, TENSOR, BlockCall, BlockShapes, TensorInfo, TracerName,
                     block_signature, canonical_call, find_blocks)
from .export import Traced, grads_wanted
from .fake import cast_floats, example_for, fake_like, fake_state, follow_devices, skeleton
from .trace import annotate, clear_cache, shapes_of, trace

__all__ = ["BLOCK_OP", "TENSOR", "BlockCall", "BlockShapes", "TensorInfo", "TracerName",
           "Traced", "annotate", "block_signature", "canonical_call", "cast_floats",
           "clear_cache", "example_for", "fake_like", "fake_state", "find_blocks", "follow_devices",
           "grads_wanted", "shapes_of",
           "skeleton", "trace"]
