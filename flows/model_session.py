"""Models kept loaded for the life of a process, shared by the flow runs that use them.

Loading is cheap for SmolLM2 but not for a 7B model, and a scheduled worker
runs many flows: the model is loaded once per process and each flow run puts it
into the state it needs (a run's weights at some batch) from the ledger. The
adapter keeps every edited layer's loaded ("pristine") value, so that every run
starts from the same original model.
"""

from __future__ import annotations

import json
import logging
from typing import ClassVar, Iterable

import torch

from editing.models import DEFAULT_MODEL, ModelAdapter, load_model
from editing.runtime import Runtime

log = logging.getLogger(__name__)


class ModelSession:
    _loaded: ClassVar[dict[tuple[str, str, str, str, bool], "ModelSession"]] = {}
    loads: ClassVar[int] = 0
    """Models this process has loaded (a long-lived serving process should load each once)."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter

    @classmethod
    def get(cls, model: str | None, runtime: Runtime | None = None) -> "ModelSession":
        """The process's session for ``model`` on ``runtime``'s device (or device map) and dtype (loaded on
        first use)."""
        runtime = runtime or Runtime()
        key = cls._key(model, runtime)
        if key not in cls._loaded:
            if runtime.device_map is None:
                adapter = load_model(model, dtype=runtime.model_dtype, device=runtime.torch_device,
                                     float32_master=runtime.float32_master)
            else:  # placed by accelerate, not moved
                adapter = load_model(model, dtype=runtime.model_dtype, device_map=runtime.device_map,
                                     float32_master=runtime.float32_master)
            cls._loaded[key] = cls(adapter)
            cls.loads += 1
        else:  # said, so that a flow run's Logs tab explains why no load happened
            log.info("model %s already loaded in this process (%s, %s)", key[0], key[2].removeprefix("torch."),
                     runtime.device_map or key[1])
        return cls._loaded[key]

    @classmethod
    def unload(cls, model: str | None, runtime: Runtime | None = None) -> bool:
        """Forget the process's session for ``model`` (its next :meth:`get` loads it again); True if it had one."""
        return cls._loaded.pop(cls._key(model, runtime or Runtime()), None) is not None

    @classmethod
    def loaded(cls, model: str | None, runtime: Runtime | None = None) -> "ModelSession | None":
        return cls._loaded.get(cls._key(model, runtime or Runtime()))

    @staticmethod
    def _key(model: str | None, runtime: Runtime) -> tuple[str, str, str, str, bool]:
        placement = "" if runtime.device_map is None else json.dumps(runtime.device_map, sort_keys=True)
        master = runtime.float32_master and runtime.model_dtype.itemsize < 4  # irrelevant at float32
        return model or DEFAULT_MODEL, str(runtime.torch_device), str(runtime.model_dtype), placement, master

    def pristine(self, layers: Iterable[int]) -> dict[int, torch.Tensor]:
        """The layers' weights as loaded (see :meth:`ModelAdapter.original_weights`)."""
        return self.adapter.original_weights(layers)

    def load_state(self, weights: dict[int, torch.Tensor]) -> None:
        """Make the model the pristine one except for ``weights`` (e.g. a run's state from the ledger)."""
        self.adapter.original_weights(weights)
        originals = self.adapter.original_weights(self.adapter.touched_layers())
        self.adapter.restore({layer: w for layer, w in originals.items() if layer not in weights})
        self.adapter.restore(weights)
