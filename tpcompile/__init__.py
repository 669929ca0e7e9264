"""tpcompile: tensor parallelism as a compiler pass.

    model = tpcompile.auto_parallelize(model, mesh)      # drop-in parallel module
    plan = tpcompile.plan(model, tp=8)                    # planning only, no processes
"""

from .api import auto_parallelize, plan_of
from .counting import CollectiveCounter
from .errors import (IndivisibleError, PlanError, RuntimeShapeError, TPCompileError, TraceError,
                     UnsupportedError)
from .plan import ModulePlan, Plan, SegmentPlan, plan

__all__ = [
    "auto_parallelize", "plan", "plan_of", "Plan", "ModulePlan", "SegmentPlan",
    "TPCompileError", "TraceError", "IndivisibleError", "PlanError", "UnsupportedError",
    "RuntimeShapeError", "CollectiveCounter",
]
__version__ = "0.1.0"
