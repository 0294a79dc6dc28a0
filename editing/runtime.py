"""How the computation runs — device, dtypes, threads — as opposed to what it computes.

The hyperparameters (:mod:`editing.config`) say *what* an edit is; a
:class:`Runtime` says how a machine executes it, so the same run settings work
on a 2-core CPU and on a GPU:

* on CUDA the model is held in bfloat16 (``dtype: auto``): half the memory and
  the tensor cores' speed for the forward and backward passes, while the edited
  layers' linear solves stay in float64 (``solve_dtype``) and the v*
  optimisation runs under autocast, so that δ, the losses and the softmaxes are
  float32;
* on a CPU the model stays float32 (bfloat16 matmuls are slower than float32 on
  most CPUs) and torch uses as many threads as this process may run on — the
  CPUs of its affinity mask, which is what a container or ``taskset`` grants,
  not the host's count.

A model larger than one device is placed by accelerate (``device_map``): its
blocks spread over several GPUs, or GPU and CPU, each edited layer solved on its
own device. Modules may also be offloaded (weights loaded only for a forward
pass) as long as no *edited* layer is: an edit writes into real weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's placement strategies, accepted as a ``device_map`` string."""
OFFLOAD_TARGETS = ("cpu", "disk")
"""``device_map`` values that mean "offloaded" to accelerate (``cpu`` only beside a GPU main device)."""


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # platforms without affinity masks
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Runtime:
    """Device, dtypes and threads of a run; every field has a machine-appropriate default."""

    device: str | None = None
    """``cuda``, ``cuda:1``, ``cpu``; None: CUDA when available, else the CPU."""
    dtype: str = "auto"
    """The model's weights: ``auto`` (bfloat16 on CUDA, float32 on the CPU) or a name in :data:`DTYPES`."""
    solve_dtype: str = "float64"
    """The edited layers' linear solves (``float64`` or ``float32``), whatever the model's dtype."""
    autocast: bool = True
    """On CUDA, run the v* optimisation under ``torch.autocast`` in the model's half dtype."""
    float32_master: bool = True
    """With a ``dtype`` below float32: keep each edited matrix as a float32 master ``W0 + ΣΔ`` and give
    the model its rounding after each batch (:meth:`editing.models.ModelAdapter.weight`), so that rounding
    never compounds over a sequential run. Off only to measure what the master prevents."""
    threads: int | None = None
    """CPU threads for torch; None: :func:`available_cpus`."""
    device_map: str | dict[str, str | int] | None = None
    """How a model too large for one device is placed, by accelerate (``from_pretrained(device_map=...)``).
    None (the default): the whole model is moved to :attr:`device`. Otherwise a strategy (``auto``,
    ``balanced``, ``balanced_low_0``, ``sequential``), one device (``cuda:1``), or an explicit mapping from
    module names to devices (``{"model.embed_tokens": 0, "model.layers.0": 0, ..., "lm_head": 1}``; a value
    is a GPU index, a device name, ``cpu`` or ``disk``). Inputs go to the input embeddings' device, each
    edited layer is solved on its own device, and an edited layer must not be offloaded (``disk``, or
    ``cpu`` beside a GPU main device): the editor refuses one. Exclusive with :attr:`device`; the main
    device (the first GPU of the mapping, else the CPU) decides ``dtype: auto`` and autocast."""

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"runtime.dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.solve_dtype not in ("float32", "float64"):
            raise ValueError(f"runtime.solve_dtype must be float32 or float64, got {self.solve_dtype!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"runtime.threads must be at least 1, got {self.threads}")
        if self.device_map is not None:
            _check_device_map(self.device_map)
            if self.device is not None:
                raise ValueError(f"runtime.device ({self.device!r}) and runtime.device_map are exclusive: the "
                                 "device_map places the model; leave device unset")
            if isinstance(self.device_map, dict):  # a private copy: the runtime is frozen
                object.__setattr__(self, "device_map", dict(self.device_map))

    def __hash__(self) -> int:  # a dict device_map is not hashable as it is
        device_map = (json.dumps(self.device_map, sort_keys=True) if isinstance(self.device_map, dict)
                      else self.device_map)
        return hash((self.device, self.dtype, self.solve_dtype, self.autocast, self.float32_master, self.threads,
                     device_map))

    @property
    def torch_device(self) -> torch.device:
        """The device of the run: :attr:`device`, or with a :attr:`device_map` its main device."""
        if self.device is not None:
            return torch.device(self.device)
        if self.device_map is not None:
            return _main_device(self.device_map)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def model_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32

    @property
    def solve_torch_dtype(self) -> torch.dtype:
        return DTYPES[self.solve_dtype]

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype v* runs under autocast, or None where autocast does not apply (CPU, float32 models)."""
        if not self.autocast or self.torch_device.type != "cuda" or self.model_dtype == torch.float32:
            return None
        return self.model_dtype

    def apply_threads(self) -> int:
        """Set torch's intra-op threads for this process; returns the number set."""
        threads = self.threads or available_cpus()
        torch.set_num_threads(threads)
        return threads


def _device_value(value: str | int, where: str) -> None:
    """Raise unless ``value`` is a GPU index, ``cpu``, ``disk`` or a torch device name."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{where} must be a GPU index, a device name, 'cpu' or 'disk', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{where} must be a GPU index (0, 1, ...), got {value}")
        return
    if value in OFFLOAD_TARGETS:
        return
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type == "meta":
        raise ValueError(f"{where} must be a GPU index, a device name ('cuda:1'), 'cpu' or 'disk', got {value!r}")


def _check_device_map(device_map: object) -> None:
    if isinstance(device_map, str):
        if device_map == "disk":
            raise ValueError("runtime.device_map 'disk' would offload every layer: an edit needs its layers "
                             "on a device")
        if device_map not in DEVICE_MAP_STRATEGIES:
            _device_value(device_map, f"runtime.device_map (a strategy {list(DEVICE_MAP_STRATEGIES)} or a device)")
        return
    if not isinstance(device_map, dict) or not device_map:
        raise ValueError("runtime.device_map must be None, a strategy "
                         f"{list(DEVICE_MAP_STRATEGIES)}, a device, or a non-empty mapping of module names to devices, "
                         f"got {device_map!r}")
    for module, value in device_map.items():
        if not isinstance(module, str):
            raise ValueError(f"runtime.device_map keys must be module names (strings), got {module!r}")
        _device_value(value, f"runtime.device_map[{module!r}]")


def _main_device(device_map: str | dict[str, str | int]) -> torch.device:
    """Where accelerate runs a model placed by ``device_map`` when it is not on one device: the first GPU
    (or other accelerator) the mapping names, else the CPU; for a strategy, CUDA when available."""
    if isinstance(device_map, str):
        if device_map in DEVICE_MAP_STRATEGIES:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(device_map)
    for value in device_map.values():
        if isinstance(value, int):  # accelerate's GPU index
            return torch.device("cuda", value)
        if value not in OFFLOAD_TARGETS:
            return torch.device(value)
    return torch.device("cpu")
