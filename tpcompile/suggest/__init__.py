"""``tpcompile.suggest``: how to split a model over N GPUs, from tpcompile's own plan.

    suggestions = tpcompile.suggest(config, 256, global_batch=256, seq_len=8192)
    best = suggestions[0]                       # a Suggestion: mesh, SP, checkpointing, ...
    model = tpcompile.auto_parallelize(model, best.device_mesh(), **best.kwargs())

``facts`` reads the plan and the rewritten programs (collectives, FLOPs, saved tensors,
placements); ``cost`` prices one candidate in closed form; ``search`` enumerates and
ranks; ``devices`` holds the presets; ``calibrate`` measures this machine.
"""

from .calibrate import calibrate
from .devices import PRESETS, CollectiveFit, DeviceError, DevicePreset, Link, load_device, save_device
from .search import SuggestError, suggest
from .table import table
from .value import MemoryBreakdown, Suggestion, TimeBreakdown

__all__ = ["PRESETS", "CollectiveFit", "DeviceError", "DevicePreset", "Link", "MemoryBreakdown",
           "SuggestError", "Suggestion", "TimeBreakdown", "calibrate", "load_device",
           "save_device", "suggest", "table"]
