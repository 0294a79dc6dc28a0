"""Tensors ↔ safetensors bytes, the only form in which the ledger stores weights.

safetensors keeps dtype, shape and the exact bits (bfloat16 included) and
cannot execute code when loaded, unlike pickle; bytes go into a BLOB/bytea.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch
from safetensors.torch import load, save

from editing.delta import DenseDelta, LowRankDelta, WeightDelta


def tensors_to_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise named tensors (any device, any layout) to safetensors bytes."""
    return save({name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()})


def tensors_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Inverse of :func:`tensors_to_bytes`; tensors come back on the CPU."""
    return load(bytes(data))


def delta_to_bytes(delta: WeightDelta) -> bytes:
    """Factors as ``u``/``v``, a dense delta as ``dense``."""
    if isinstance(delta, DenseDelta):
        return tensors_to_bytes({"dense": delta.matrix})
    return tensors_to_bytes({"u": delta.u, "v": delta.v})


def delta_from_bytes(data: bytes) -> WeightDelta:
    tensors = tensors_from_bytes(data)
    if "dense" in tensors:
        return DenseDelta(tensors["dense"])
    return LowRankDelta(tensors["u"], tensors["v"])


def weight_to_bytes(weight: torch.Tensor) -> bytes:
    return tensors_to_bytes({"weight": weight})


def weight_from_bytes(data: bytes) -> torch.Tensor:
    return tensors_from_bytes(data)["weight"]


def keys_to_bytes(keys: torch.Tensor) -> tuple[bytes, str]:
    """A batch's keys at one layer (d_in × B) as float32 safetensors bytes, and their sha256."""
    blob = tensors_to_bytes({"k": keys.to(torch.float32)})
    return blob, hashlib.sha256(blob).hexdigest()


def keys_from_bytes(data: bytes) -> torch.Tensor:
    return tensors_from_bytes(data)["k"]
