"""tpcompile: tensor parallelism as a compiler pass.

    model = tpcompile.auto_parallelize(model, mesh)      # drop-in parallel module
    plan = tpcompile.plan(model, tp=8)                    # planning only, no processes
    best = tpcompile.suggest(model, 64, global_batch=64, seq_len=8192)[0]   # which mesh
"""

from .api import auto_parallelize, plan_of
from .counting import CollectiveCounter
from .errors import (ExampleInputsError, IndivisibleError, PlanError, RuntimeShapeError,
                     TPCompileError, TraceError, UnsupportedError)
from .generate import generate
from .hf import from_pretrained, save_pretrained
from .launch import init_distributed, init_mesh
from .planning import (ModulePlan, Plan, SegmentPlan, from_hf_tp_plan, plan, to_hf_tp_plan,
                       to_parallelize_plan)
from .planning import load as load_plan
from .planning import save as save_plan
from .suggest import DevicePreset, Suggestion, calibrate, suggest

__all__ = [
    "auto_parallelize", "plan", "plan_of", "generate", "from_pretrained", "save_pretrained",
    "init_distributed", "init_mesh", "Plan", "ModulePlan", "SegmentPlan",
    "save_plan", "load_plan", "to_parallelize_plan", "to_hf_tp_plan", "from_hf_tp_plan",
    "TPCompileError", "TraceError", "IndivisibleError", "PlanError", "UnsupportedError",
    "RuntimeShapeError", "ExampleInputsError", "CollectiveCounter", "suggest", "Suggestion",
    "calibrate", "DevicePreset",
]
__version__ = "0.1.0"
