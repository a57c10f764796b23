"""What one rank's device costs: the calibrated constants of the model, per parameter (ns per element of
the fused float32 vector) or in GB/s. Measured by ``calibrate.py`` on the user's machine, or given as a
JSON file (``--device-profile FILE``) for a device one cannot run here (a GPU of the cluster planned for).

All the passes of the optimizer step are memory-bound, so their cost is linear in the parameters d:
a constant per element is enough, and one measured at one d predicts another.
"""
from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class DeviceProfile:
    """One rank's costs. Time per step of a pass = ns·d·1e-9 s.

    - ``worker_update_ns``: the error-feedback step of SPEC §1 on one rank, minus the server step: momentum,
      worker error + blocksign compression (one fused pass), then decompressing Δ̃ and the update.
    - ``server_ns``, ``server_payload_ns``: the server step on n elements with k workers' payloads costs
      n·(server_ns + (k−1)·server_payload_ns) (decompress-average of k payloads, error, compression).
    - ``stock_ns``: stock Horovod's step on one rank (``hvd.DistributedOptimizer``: SGD with momentum,
      Horovod's own work around its allreduce); ``fp16_ns`` the same with ``Compression.fp16``.
    - ``memory_gbs``: a copy of a large float32 vector, bytes read plus written per second (Horovod's
      fusion copies, MPI's reduction, the shared-memory sums of ``hierarchical``).
    - ``transport_gbs``: bytes sent plus received per second that one core's network stack moves (TCP:
      each byte is copied by a CPU); ``inf`` where a NIC moves them (RDMA, NCCL).
    - ``cores``: cores of one machine that the ranks on it share (the emulated cluster: all ranks on one).
    """

    name: str
    worker_update_ns: float
    server_ns: float
    server_payload_ns: float
    stock_ns: float
    fp16_ns: float
    memory_gbs: float
    transport_gbs: float = math.inf
    cores: int = 1

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "name" and not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"device profile {self.name!r}: {f.name} must be a number >= 0, got {value!r}")
        if self.memory_gbs <= 0 or self.transport_gbs <= 0 or self.cores < 1:
            raise ValueError(f"device profile {self.name!r}: memory_gbs and transport_gbs must be > 0 and "
                             f"cores >= 1")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["transport_gbs"] = None if math.isinf(self.transport_gbs) else self.transport_gbs
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "DeviceProfile":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"device profile: unknown keys {unknown}; expected some of {sorted(known)}")
        missing = sorted(f.name for f in fields(cls) if f.default is MISSING and f.name not in data)
        if missing:
            raise ValueError(f"device profile: missing keys {missing}")
        data = dict(data)
        if data.get("transport_gbs") is None:
            data["transport_gbs"] = math.inf
        return cls(**data)


#: measured with ``calibrate.measure_device`` (one core of the AMD EPYC of our benchmarks, 25M params, the
#: compiled kernels; torch 2.13 CPU): the profile used when nothing is measured and no file is given
EPYC_CORE = DeviceProfile(name="epyc-core (built in)", worker_update_ns=2.5, server_ns=0.72,
                          server_payload_ns=0.082, stock_ns=1.5, fp16_ns=2.0, memory_gbs=20.0,
                          transport_gbs=math.inf, cores=1)
BUILT_IN = {"epyc-core": EPYC_CORE}


def load_profile(spec: str) -> DeviceProfile:
    """A built-in profile by name, or a JSON file of ``DeviceProfile`` fields."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--device-profile {spec!r}: neither a built-in profile ({', '.join(BUILT_IN)}) nor a "
                         f"JSON file; write one with the fields of hvd_distef.plan.device.DeviceProfile")
    data = json.loads(path.read_text())
    data.setdefault("name", path.stem)
    return DeviceProfile.from_dict(data)
