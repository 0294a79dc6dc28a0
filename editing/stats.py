"""Second-moment statistics ``C0 = E[k kᵀ]`` of the keys of ordinary text, cached on disk.

``C0`` summarises the keys an edit must preserve (docs/math.md). Estimating it means
running the model over thousands of texts, the most expensive one-off step of
editing, so it is done once per (model, layer, corpus, sample count, length):

* all requested layers are read in one pass (one forward per text batch, hooks
  on every layer, stopped after the deepest one);
* each batch's ``KᵀK`` is formed in float32 and added to a float64 running sum,
  so precision does not depend on how many tokens are summed;
* every layer is stored in its own file, written atomically, so a later request
  for other layers computes only what is missing and nothing is computed twice;
* the statistics describe the model *as loaded*: they are cached under its
  fingerprint and shared by every run of it, so they are computed inside
  :meth:`ModelAdapter.original_state`, whatever edits the model holds at the time
  (a resumed run, an evaluation worker or another Prefect worker with an empty
  cache ask for ``C0`` after restoring an edited state).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from editing.config import StatsParams
from editing.corpus import OpenedCorpus, open_corpus
from editing.models.adapter import ModelAdapter
from editing.models.loading import cache_dir
from editing.tokens import PaddedBatch
from editing.tracing import forward_until

log = logging.getLogger(__name__)

SAMPLE_SEED = 0
"""Seed of the text sample; part of what the cached statistics mean, so it is fixed."""


def stats_path(adapter: ModelAdapter, layer: int, corpus: OpenedCorpus, params: StatsParams) -> Path:
    """Cache file of one layer's ``C0``, named by everything that determines it."""
    key = json.dumps({"model": adapter.fingerprint, "layer": layer, "corpus": corpus.fingerprint,
                      "n_samples": params.n_samples, "max_tokens": params.max_tokens, "seed": SAMPLE_SEED},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    name = f"layer{layer:03d}-{corpus.name.replace('/', '_')}-n{params.n_samples}-t{params.max_tokens}-{digest}"
    return cache_dir() / "stats" / adapter.fingerprint[:16] / f"{name}.safetensors"


def second_moments(adapter: ModelAdapter, layers: list[int], params: StatsParams,
                   progress: bool = True) -> dict[int, torch.Tensor]:
    """``C0`` (float32, d_in × d_in, on the CPU) for each of ``layers``; cached ones are only read."""
    corpus = open_corpus(params.corpus, params.n_samples, SAMPLE_SEED)
    paths = {layer: stats_path(adapter, layer, corpus, params) for layer in layers}
    missing = [layer for layer, path in paths.items() if not path.exists()]
    if len(missing) < len(layers):
        log.info("C0 for layers %s read from the cache (%s)", [layer for layer in layers if layer not in missing],
                 paths[layers[0]].parent)
    if missing:
        log.info("computing C0 for layers %s from %d texts of %s (once: cached for later runs)", missing,
                 params.n_samples, corpus.name)
        with adapter.original_state():
            computed, tokens = _accumulate(adapter, missing, corpus, params, progress)
        for layer, moment in computed.items():
            _save_atomically(paths[layer], {"c0": moment}, {"tokens": str(tokens), "corpus": corpus.name,
                                                            "n_samples": str(params.n_samples)})
    return {layer: load_file(paths[layer])["c0"] for layer in layers}


@torch.no_grad()
def _accumulate(adapter: ModelAdapter, layers: list[int], corpus: OpenedCorpus, params: StatsParams,
                progress: bool) -> tuple[dict[int, torch.Tensor], int]:
    texts = corpus.texts
    # Each layer's sum lives where its keys arrive: on a model dispatched over several devices
    # (device_map) that is the layer's own device, so no key crosses devices.
    sums = {layer: torch.zeros(adapter.key_dim, adapter.key_dim, dtype=torch.float64,
                               device=adapter.execution_device(layer))
            for layer in layers}
    masks: dict[torch.device, torch.Tensor] = {}
    """The current batch's attention mask, on every device a layer has asked for it."""

    def mask_on(device: torch.device) -> torch.Tensor:
        if device not in masks:
            masks[device] = masks[adapter.device].to(device)
        return masks[device]

    def hook(layer: int):
        def add(module, args):
            keys = args[0][mask_on(args[0].device)].float()
            total = sums[layer]
            total += (keys.T @ keys).to(total.device).double()
        return add

    handles = [adapter.edited_module(layer).register_forward_pre_hook(hook(layer)) for layer in layers]
    tokenizer = adapter.tokenizer
    tokens = 0
    try:
        batches = range(0, len(texts), params.batch_size)
        for start in tqdm(batches, desc=f"C0 layers {layers} on {corpus.name}", disable=not progress,
                          unit="batch"):
            encoded = tokenizer(texts[start:start + params.batch_size], truncation=True,
                                max_length=params.max_tokens, padding=True, return_tensors="pt")
            batch = PaddedBatch(encoded["input_ids"], encoded["attention_mask"])
            masks.clear()
            masks[adapter.device] = batch.attention_mask.to(adapter.device).bool()
            tokens += int(batch.attention_mask.sum())
            forward_until(adapter, batch, max(layers))
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise ValueError(f"corpus {corpus.name!r} gave no tokens")
    log.info("C0 for layers %s from %d texts, %d tokens", layers, len(texts), tokens)
    return {layer: (total / tokens).float().cpu() for layer, total in sums.items()}, tokens


def _save_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=path.stem, suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, temporary, metadata=metadata)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def null_space_bases(adapter: ModelAdapter, layers: list[int], params: StatsParams, threshold: float,
                     progress: bool = True) -> dict[int, torch.Tensor]:
    """Per layer, an orthonormal basis ``Û`` (d_in × k, float32) of ``C0``'s null space: the eigenvectors
    whose eigenvalues are below ``threshold`` (AlphaEdit's projector is ``P = Û Ûᵀ``).

    Computed once from the cached ``C0`` (a float64 eigendecomposition) and cached beside it, keyed by
    the threshold, so a run's projector is fixed for its whole history.
    """
    moments = second_moments(adapter, layers, params, progress)
    corpus = open_corpus(params.corpus, params.n_samples, SAMPLE_SEED)
    bases = {}
    for layer in layers:
        c0_path = stats_path(adapter, layer, corpus, params)
        path = c0_path.with_name(f"{c0_path.stem}-null{threshold:g}.safetensors")
        if not path.exists():
            eigenvalues, eigenvectors = torch.linalg.eigh(moments[layer].double())
            basis = eigenvectors[:, eigenvalues < threshold].float().contiguous()
            _save_atomically(path, {"basis": basis}, {"threshold": repr(threshold), "c0": c0_path.name,
                                                       "dimension": str(basis.shape[1])})
            log.info("null space of C0 at layer %d below %g: %d of %d dimensions", layer, threshold,
                     basis.shape[1], basis.shape[0])
        bases[layer] = load_file(path)["basis"]
    return bases
