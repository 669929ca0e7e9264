"""Stage 5, distribution and run time: the programs installed as the modules' forwards
(``program``: one per input structure), parameters as DTensors, FSDP2 on the dp mesh and
meta-device materialisation (``distribute``), and the checks that keep every rank on the
same plan and the same inputs (``agreement``)."""

from .program import Program, install

__all__ = ["Program", "install"]
