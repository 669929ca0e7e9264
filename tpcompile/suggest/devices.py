"""Device presets: what one accelerator computes, holds and sends, as data.

A preset is a pydantic value (``DevicePreset``), saved and loaded as JSON or YAML. The
built-in ones (``PRESETS``) are from vendor datasheets derated to what training reaches
(dense bf16 peak times a matmul efficiency, NCCL bus bandwidths rather than link
rates); ``tpcompile.calibrate()`` writes one measured on the machine it runs on.

Collectives are priced per kind, per level (``intra``: inside one node, ``inter``:
across nodes) and per group size as ``alpha + beta * bytes`` of the full (logical)
tensor, the number ``explain`` reports. A measured fit is used where the preset has one
for that kind, level and group size; otherwise the ring formula on the level's link
(bus bandwidth and per-hop latency). The fits are per collective because backends
differ: gloo's reduce-scatter is an all-reduce followed by a slice, so the ring formula
is off by 2x there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import TPCompileError

Kind = Literal["all_reduce", "all_gather", "reduce_scatter"]
Level = Literal["intra", "inter"]
GiB = 2**30


class DeviceError(TPCompileError):
    """A device preset that does not exist or does not load."""


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Link(_M):
    """A ring over one level: bus bandwidth (bytes/s each rank moves) and latency per hop."""

    bandwidth: float = Field(gt=0)
    latency: float = Field(ge=0)


class CollectiveFit(_M):
    """A measured ``seconds = alpha + beta * bytes`` for one collective on one group size
    (across nodes: with ``per_node`` of its ranks on each node)."""

    kind: Kind
    level: Level
    group: int = Field(ge=2)
    per_node: int = Field(default=1, ge=1)
    alpha: float = Field(ge=0)
    beta: float = Field(ge=0)


class DevicePreset(_M):
    name: str
    memory_bytes: int = Field(gt=0, description="memory of one device")
    reserved_bytes: int = Field(ge=0, description="held by the runtime, communication "
                                "buffers and allocator fragmentation")
    peak_flops: dict[str, float] = Field(description="dense matmul FLOP/s per dtype")
    matmul_efficiency: float = Field(gt=0, le=1, description="fraction of peak large "
                                     "training matmuls reach")
    matmul_half_size: float = Field(default=0, ge=0, description="Hockney's n_1/2: a matmul "
                                    "whose smallest dim is n runs at n / (n + n_1/2) of the rate")
    memory_bandwidth: float = Field(gt=0, description="bytes/s elementwise ops reach")
    op_overhead: float = Field(ge=0, description="seconds of host and autograd overhead per "
                               "op, forward and backward together")
    intra: Link
    inter: Link
    fsdp_overlap: float = Field(ge=0, le=1, description="fraction of FSDP communication "
                                "that can run under compute (prefetch, own stream)")
    loss_per_logit: float | None = Field(default=None, ge=0, description="seconds of an fp32 "
                                         "cross-entropy, forward and backward, per logit "
                                         "(None: six passes at the memory bandwidth)")
    gpus_per_node: int | None = None
    fits: list[CollectiveFit] = []
    source: str = "datasheet"

    @property
    def usable_bytes(self) -> int:
        return self.memory_bytes - self.reserved_bytes

    def flops(self, dtype: str) -> float:
        """Achievable matmul FLOP/s in ``dtype``."""
        peak = self.peak_flops.get(dtype) or self.peak_flops.get("fp32")
        if peak is None:
            raise DeviceError(f"device {self.name} has no peak_flops for {dtype} (has "
                              f"{sorted(self.peak_flops)}): add it to the preset")
        return peak * self.matmul_efficiency

    def loss_seconds(self, logits: float) -> float:
        """The cross-entropy over ``logits`` values, forward and backward."""
        if self.loss_per_logit is not None:
            return logits * self.loss_per_logit
        return logits * 4 * 6 / self.memory_bandwidth

    def matmul_seconds(self, flops: float, dtype: str, smallest: float = float("inf")) -> float:
        """A matmul of ``flops`` whose smallest dim is ``smallest``."""
        rate = self.flops(dtype)
        if self.matmul_half_size and smallest < float("inf"):
            rate *= smallest / (smallest + self.matmul_half_size)
        return flops / rate

    def collective_seconds(self, kind: str, level: str, group: int, nbytes: float,
                           per_node: int = 1) -> float:
        """One collective on ``group`` ranks moving a full tensor of ``nbytes``. Across
        nodes, a group with ``per_node`` ranks on each node runs that many rings side by
        side, one per NIC, so its bandwidth is ``per_node`` links' (at most NVLink's)."""
        if group <= 1:
            return 0.0
        factor = 2.0 if kind == "all_reduce" else 1.0
        ring = factor * (group - 1) / group
        same = [f for f in self.fits if f.kind == kind and f.level == level and
                (level == "intra" or f.per_node == per_node)]
        exact = next((f for f in same if f.group == group), None)
        if exact is not None:
            return exact.alpha + exact.beta * nbytes
        if same:  # the nearest measured group, its bandwidth term rescaled by the ring
            near = min(same, key=lambda f: abs(f.group - group))
            near_ring = factor * (near.group - 1) / near.group
            return near.alpha * (group - 1) / (near.group - 1) + near.beta * nbytes * ring / near_ring
        bandwidth, latency = self.intra.bandwidth, self.intra.latency
        if level == "inter":
            bandwidth = min(self.inter.bandwidth * per_node, self.intra.bandwidth)
            latency = self.inter.latency
        return factor * (group - 1) * latency + ring * nbytes / bandwidth


def _gpu(name: str, memory_gib: int, bf16: float, hbm: float, nvlink: float, ib: float,
         reserved_gib: float = 2.5) -> DevicePreset:
    return DevicePreset(
        name=name, memory_bytes=memory_gib * GiB, reserved_bytes=int(reserved_gib * GiB),
        peak_flops={"bf16": bf16, "fp16": bf16, "fp32": bf16 / 2},  # fp32 runs as TF32
        matmul_efficiency=0.6, matmul_half_size=96, memory_bandwidth=0.7 * hbm, op_overhead=20e-6,
        intra=Link(bandwidth=nvlink, latency=8e-6), inter=Link(bandwidth=ib, latency=15e-6),
        fsdp_overlap=0.9, gpus_per_node=8)


# Datasheet numbers (dense, no sparsity), derated: NCCL bus bandwidth inside an NVLink
# node, one 200/400 Gb/s NIC per GPU across nodes at ~85 %. calibrate() on one H200
# (Hopper, the H100's compute) read 700-760 TFLOP/s bf16 on 4096^3, n_1/2 86-107,
# 3.7 TB/s, 19-24 us per op forward and backward: the efficiency below (0.6) also
# covers real models' smaller and odd-shaped matmuls.
PRESETS: dict[str, DevicePreset] = {
    "a100-40gb": _gpu("a100-40gb", 40, 312e12, 1.55e12, 230e9, 21e9),
    "a100-80gb": _gpu("a100-80gb", 80, 312e12, 2.0e12, 230e9, 21e9),
    "h100-80gb": _gpu("h100-80gb", 80, 989e12, 3.35e12, 360e9, 42e9),
    "b200": _gpu("b200", 180, 2250e12, 8.0e12, 720e9, 42e9),
    # a CPU host running one process per core with gloo over loopback (rough; calibrate)
    "cpu-gloo": DevicePreset(
        name="cpu-gloo", memory_bytes=16 * GiB, reserved_bytes=1 * GiB,
        peak_flops={"fp32": 40e9, "bf16": 10e9}, matmul_efficiency=1.0, matmul_half_size=32,
        memory_bandwidth=5e9, op_overhead=15e-6,
        intra=Link(bandwidth=1.5e9, latency=60e-6), inter=Link(bandwidth=1e9, latency=100e-6),
        fsdp_overlap=0.3, gpus_per_node=None),
}


def load_device(device: str | Path | DevicePreset) -> DevicePreset:
    """A preset by name (``"h100-80gb"``), from a JSON/YAML file, or as given."""
    if isinstance(device, DevicePreset):
        return device
    key = str(device).lower()
    if key in PRESETS:
        return PRESETS[key]
    path = Path(device)
    if not path.is_file():
        raise DeviceError(f"unknown device {device!r}: use one of {', '.join(PRESETS)} or a "
                          "preset file (tpcompile.calibrate() writes one)")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        return DevicePreset.model_validate(data)
    except (ValueError, yaml.YAMLError, ValidationError) as e:
        raise DeviceError(f"{path}: not a device preset: {e}") from None


def save_device(preset: DevicePreset, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = preset.model_dump(mode="json")
    path.write_text(json.dumps(data, indent=2) + "\n" if path.suffix.lower() == ".json"
                    else yaml.safe_dump(data, sort_keys=False))
    return path
