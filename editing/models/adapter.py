"""Model adapters: where, in each architecture, the edited matrix and the residual stream live.

The editing algorithms are architecture-free: they need the MLP output matrix
``W`` of layer ``l`` in (d_out × d_in) orientation, its input (the *key*), and
the residual stream after block ``l``. An :class:`ArchitectureSpec` names those
modules for one family; :class:`ModelAdapter` wraps a loaded model with them.
Adding a family is adding one spec to :data:`ARCHITECTURES`.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editing.delta import WeightDelta, apply_delta, weight_sha256


@dataclass(frozen=True)
class ArchitectureSpec:
    """Module paths of one model family (``{layer}`` is the block index)."""

    family: str
    layers: str
    edited_module: str
    transposed: bool
    """True when the parameter is stored (d_in × d_out), as GPT-2's ``Conv1D`` does."""
    attention: str = "self_attn"
    """A block's attention module (causal tracing restores its output)."""
    mlp: str = "mlp"
    """A block's MLP module."""


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "gpt2": ArchitectureSpec("gpt2", "transformer.h", "mlp.c_proj", transposed=True, attention="attn"),
    "gptj": ArchitectureSpec("gptj", "transformer.h", "mlp.fc_out", transposed=False, attention="attn"),
    "llama": ArchitectureSpec("llama", "model.layers", "mlp.down_proj", transposed=False),
    # GPT-NeoX / Pythia: attention and MLP in parallel off one residual; the MLP's output projection is the
    # edited matrix all the same (its input is the key, its output is added to the residual stream).
    "gpt_neox": ArchitectureSpec("gpt_neox", "gpt_neox.layers", "mlp.dense_4h_to_h", transposed=False,
                                 attention="attention"),
}
# Families that share Llama's module layout (model.layers.{l}.mlp.down_proj): Llama-3 (rope scaling is inside
# the attention), Mistral (sliding window), Qwen2/2.5/3 (attention bias), Gemma/Gemma-2 (extra norms around the
# MLP, soft-capping: see :meth:`ModelAdapter.logits`), Phi-3 (gate and up projections fused into one matrix, the
# down projection as Llama's), OLMo.
for _alias in ("mistral", "qwen2", "qwen3", "olmo", "olmo2", "gemma", "gemma2", "phi3"):
    ARCHITECTURES[_alias] = ARCHITECTURES["llama"]


def block_hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden states of a block's output (a tensor in transformers 5, a tuple in some families)."""
    return output[0] if isinstance(output, tuple) else output


def _hooks(module: nn.Module) -> list:
    """The accelerate hooks attached to ``module`` (none, one, or those of a ``SequentialHook``)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))


def _execution_device(model: nn.Module, module: nn.Module) -> torch.device:
    """The device of ``module``'s weight, or, when accelerate offloads it (``meta``), the device the hook
    on ``module`` — or on the nearest ancestor that has one — loads it to for a forward pass."""
    weight = module.weight
    if weight.device.type != "meta":
        return weight.device
    name = next((name for name, candidate in model.named_modules() if candidate is module), "")
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        for hook in _hooks(model.get_submodule(".".join(parts[:depth]))):
            if getattr(hook, "execution_device", None) is not None:
                return torch.device(hook.execution_device)
    return weight.device


def _offloaded_value(model: nn.Module, name: str) -> torch.Tensor:
    """The stored value of state-dict entry ``name`` that accelerate offloaded (its parameter is on ``meta``):
    read from the weights map of the offloading hook on its module or on the nearest ancestor."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        module = model.get_submodule(".".join(parts[:depth]))
        for hook in _hooks(module):
            weights = getattr(hook, "weights_map", None)
            if getattr(hook, "offload", False) and weights is not None:
                try:
                    return weights[".".join(parts[depth:])]
                except KeyError:
                    continue
    raise ValueError(f"{name} is on the meta device and no accelerate offload hook holds its value")


class ModelAdapter:
    """A causal LM with its tokenizer and the knowledge of where edits go."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 name: str, source_fingerprint: str | None = None, float32_master: bool = True) -> None:
        model_type = model.config.model_type
        if model_type not in ARCHITECTURES:
            raise ValueError(f"model type {model_type!r} is not supported; known: {sorted(ARCHITECTURES)}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.spec = ARCHITECTURES[model_type]
        self._source_fingerprint = source_fingerprint
        self._originals: dict[int, torch.Tensor] = {}
        """The edited matrices as loaded (CPU copies), captured the first time each is handed out."""
        self.float32_master = float32_master
        """Keep a float32 master of each edited matrix of a low-precision model (see :meth:`weight`)."""
        self._masters: dict[int, torch.Tensor] = {}
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.eval()

    # -- structure -------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device the input embeddings run on.

        For a model on one device that is the model's device; for one dispatched by accelerate
        over several (``device_map``), the embeddings' device — every other module's hook moves
        what it receives to its own device, so each block, the final norm and the LM head may
        return tensors on another one.
        """
        try:
            embeddings = self.model.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            return next(self.model.parameters()).device
        return _execution_device(self.model, embeddings)

    def layer_device(self, layer: int) -> torch.device:
        """Where ``layer``'s edited matrix lives: its solve runs there and its update is written there.

        ``meta`` for a layer that accelerate offloads (to the CPU or disk, loaded only for the
        duration of a forward pass): such a layer cannot be edited (:meth:`offloaded_layers`).
        """
        return self.edited_module(layer).weight.device

    def layer_devices(self, layers: Sequence[int]) -> dict[int, torch.device]:
        """:meth:`layer_device` of each of ``layers``: where each layer's solve, edit memory and update live."""
        return {layer: self.layer_device(layer) for layer in layers}

    def execution_device(self, layer: int) -> torch.device:
        """The device ``layer``'s edited module computes on (its keys arrive there): the matrix's own
        device, or, for an offloaded layer, the device accelerate loads it to for a forward pass."""
        return _execution_device(self.model, self.edited_module(layer))

    def offloaded_layers(self, layers: Iterable[int]) -> list[int]:
        """Those of ``layers`` whose edited matrix is not resident (on ``meta``: offloaded by accelerate)."""
        return [layer for layer in layers if self.layer_device(layer).type == "meta"]

    def check_resident(self, layers: Iterable[int]) -> None:
        """Raise a clear error if any of ``layers`` is offloaded: an edit must write into real weights."""
        offloaded = self.offloaded_layers(layers)
        if offloaded:
            paths = ", ".join(f"{self.spec.layers}.{layer}" for layer in offloaded)
            raise ValueError(
                f"cannot edit layer(s) {offloaded} of {self.name}: their weights are offloaded (on the meta device, "
                f"loaded only during a forward pass), and an edit must write into real weights; place {paths} on a "
                "device (a GPU or 'cpu', not 'disk', and not 'cpu' beside a GPU main device, which accelerate "
                "offloads) in the device_map")

    @cached_property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.spec.layers)

    def block(self, layer: int) -> nn.Module:
        """Transformer block ``layer``; its output is the residual stream after that layer."""
        self._check_layer(layer)
        return self.blocks[layer]

    def edited_module(self, layer: int) -> nn.Module:
        """The MLP output projection of ``layer``: its input is the key, its output the value."""
        return self.block(layer).get_submodule(self.spec.edited_module)

    def weight(self, layer: int) -> torch.Tensor:
        """The matrix edits are defined on, in canonical (d_out × d_in) orientation.

        For a model in float32 (or wider) that is a view of the parameter. For a model stored in a
        narrower dtype (bfloat16, float16) it is a float32 *master* ``W0 + ΣΔ`` on the layer's device,
        and the parameter is the master rounded (:meth:`stored_weight`): were each batch's ``ΔW``
        rounded to bfloat16 and added to bfloat16 weights, the rounding would compound over a
        sequential run; rounding the exact sum once after each batch does not. The ledger's hashes,
        replay, rollback and resume are all of this matrix, so they are exact in either case.

        Write through :meth:`add_delta` and :meth:`restore`, which keep the parameter in step with the
        master. The first call for a layer is the moment to keep its loaded value
        (see :meth:`original_weights`).
        """
        view = self._canonical(layer)
        if view.device.type == "meta":  # writing into a meta tensor would silently do nothing
            self.check_resident([layer])
        if self._needs_master(view):
            if layer not in self._masters:
                self._masters[layer] = view.detach().to(torch.float32, copy=True)
            view = self._masters[layer]
        if layer not in self._originals:
            self._originals[layer] = view.detach().to("cpu", copy=True)
        return view

    def stored_weight(self, layer: int) -> torch.Tensor:
        """The parameter itself, in the model's dtype (canonical orientation): what a forward pass uses
        and ``save_pretrained`` writes — the rounded master when :meth:`weight` is a master."""
        self.weight(layer)
        return self._canonical(layer)

    def has_master(self, layer: int) -> bool:
        """Whether ``layer``'s edits are kept in a float32 master beside its parameter."""
        return self._needs_master(self._canonical(layer))

    def _needs_master(self, parameter: torch.Tensor) -> bool:
        return self.float32_master and parameter.is_floating_point() and parameter.dtype.itemsize < 4

    def add_delta(self, layer: int, delta: WeightDelta) -> None:
        """``W ← W + ΔW`` on the matrix edits are defined on, then the parameter rounded from it."""
        apply_delta(self.weight(layer), delta)
        self._publish(layer)

    def _publish(self, layer: int) -> None:
        """Round ``layer``'s master into its parameter (nothing to do without a master)."""
        if layer in self._masters:
            with torch.no_grad():
                self._canonical(layer).copy_(self._masters[layer])

    def _canonical(self, layer: int) -> torch.Tensor:
        parameter = self.edited_module(layer).weight
        return parameter.T if self.spec.transposed else parameter

    @property
    def key_dim(self) -> int:
        return self._canonical(0).shape[1]

    @property
    def hidden_dim(self) -> int:
        return self._canonical(0).shape[0]

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < len(self.blocks):
            raise ValueError(f"layer {layer} out of range: {self.name} has {len(self.blocks)} layers (0..{len(self.blocks) - 1})")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on final (normed) hidden states, as the model's own forward computes it: including
        Gemma-2's final soft-capping ``c · tanh(logits / c)``, which lives in the causal-LM wrapper and not in
        the head, so code that applies the head itself (scoring, v*) must apply it too."""
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return logits if not cap else torch.tanh(logits / cap) * cap

    # -- identity --------------------------------------------------------------------------
    @cached_property
    def fingerprint(self) -> str:
        """sha256 identifying the model's weights as loaded (before any edit).

        When the loader knows a hash of the source files it is used (free);
        otherwise every parameter is hashed once. Statistics caches are keyed on
        it, so it must change whenever the weights do.
        """
        if self._source_fingerprint is not None:
            return self._source_fingerprint
        digest = hashlib.sha256(self.model.config.to_json_string().encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            if tensor.device.type == "meta":  # offloaded by accelerate: hash the stored value
                tensor = _offloaded_value(self.model, name)
            digest.update(name.encode())
            digest.update(weight_sha256(tensor).encode())
        return digest.hexdigest()

    def weights_sha256(self, layers: list[int]) -> dict[int, str]:
        """sha256 of each edited matrix (canonical orientation, the master where there is one) for the ledger."""
        return {layer: weight_sha256(self.weight(layer)) for layer in layers}

    def stored_sha256(self, layers: list[int]) -> dict[int, str]:
        """sha256 of each edited parameter as the model stores it (what an export writes)."""
        return {layer: weight_sha256(self.stored_weight(layer)) for layer in layers}

    def snapshot(self, layers: list[int]) -> dict[int, torch.Tensor]:
        """Copies of the edited matrices, to restore later with :meth:`restore`."""
        return {layer: self.weight(layer).detach().clone() for layer in layers}

    def restore(self, weights: dict[int, torch.Tensor]) -> None:
        """Write snapshot (or ledger-restored) matrices back into the model, exactly."""
        with torch.no_grad():
            for layer, tensor in weights.items():
                weight = self.weight(layer)
                weight.copy_(tensor.to(weight.device))
                self._publish(layer)

    # -- the model as loaded ---------------------------------------------------------------
    def touched_layers(self) -> list[int]:
        """Layers whose matrix has been handed out for editing (the only ones that may differ from the load)."""
        return sorted(self._originals)

    def original_weights(self, layers: Iterable[int]) -> dict[int, torch.Tensor]:
        """The matrices of ``layers`` as loaded, before any edit (CPU tensors; do not modify them)."""
        for layer in layers:
            self.weight(layer)  # captures the loaded value if this is the first access
        return {layer: self._originals[layer] for layer in layers}

    @contextmanager
    def original_state(self) -> Iterator["ModelAdapter"]:
        """The model as loaded for the duration of the block, whatever edits it holds now.

        Anything defined on *the* model (the preserved-key statistics ``C0``, cached under
        its fingerprint) must be computed inside this block: computed on an edited model it
        would describe that edit's keys and poison every later run of the same model. Only
        matrices this adapter handed out can have been edited, so swapping those back is
        enough; the current values are put back afterwards, exactly.
        """
        current = self.snapshot(self.touched_layers())
        self.restore(self._originals)
        try:
            yield self
        finally:
            self.restore(current)
