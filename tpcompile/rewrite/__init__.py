"""Stage 4, the rewrite: the traced ATen graph becomes an SPMD program on local shards
(``codegen``), calling the conversions between layouts (``collectives``: PyTorch's
functional collectives, each with the backward its forward needs; ``head``: a gathered
head's logits computed and gathered in pipelined row chunks)."""

from .codegen import Rewritten, Site, rewrite

__all__ = ["Rewritten", "Site", "rewrite"]
