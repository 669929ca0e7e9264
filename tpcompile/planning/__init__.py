"""Stage 3, the plan: the :class:`Plan` value (``value``), its files (``files``: YAML and
JSON, flat hand-written plans), binding a given plan to a model (``bind``), conversion to
and from ``parallelize_module`` and Hugging Face ``tp_plan`` (``interop``), and planning
itself (``build``: trace -> analyze per distinct module, then the Plan)."""

from .build import Compiled, Unit, compile_model, plan, synthesize_inputs
from .files import dumps, from_yaml, load, loads, save, to_yaml
from .interop import from_hf_tp_plan, to_hf_tp_plan, to_parallelize_plan
from .value import PLACEMENTS, ModulePlan, NotePlan, Plan, SegmentPlan, Style, placement

__all__ = ["PLACEMENTS", "Compiled", "ModulePlan", "NotePlan", "Plan", "SegmentPlan", "Style",
           "Unit", "compile_model", "dumps", "from_hf_tp_plan", "from_yaml", "load", "loads",
           "placement", "plan", "save", "synthesize_inputs", "to_hf_tp_plan",
           "to_parallelize_plan", "to_yaml"]
