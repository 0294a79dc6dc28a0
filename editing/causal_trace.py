"""Causal tracing (Meng et al. 2022, ROME §2): where in the network a fact's recall runs.

For a prompt whose answer the model predicts, three runs:

* **clean**: ``p* = P(answer | prompt)``;
* **corrupted**: Gaussian noise ``ν · σ_emb`` added to the subject tokens' embeddings (σ_emb: the standard
  deviation of the model's token embeddings; ν = 3 as in ROME), ``p_corr`` averaged over ``samples`` noise draws;
* **corrupted with one state restored**: the clean value of one state put back — block ``l``'s output
  (the *hidden* state) at token ``t``, or the MLP's or the attention's output at ``t`` for a window of layers
  centred on ``l`` (ROME restores 10) — giving ``p_restored(kind, l, t)``.

The **indirect effect** of a state is ``p_restored − p_corr``: how much of the answer's probability that one
clean state brings back. Averaged over facts by token *role* (first / middle / last subject token, first
token after the subject, later tokens, last token), since prompts differ in length. ROME's observation, the
basis of its and MEMIT's layer choice: the MLP outputs at the last subject token carry a peak of effect in
the early-middle layers; the suggested edit window is where that peak is (:func:`suggest_layers`).

Noise draws are fixed per fact (seeded), so every restoration of a fact is compared on the same corruption.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from editing.models.adapter import ModelAdapter, block_hidden
from editing.tokens import encode_prompt, encode_target, last_token_before

KINDS = ("hidden", "mlp", "attn")
ROLES = ("first subject", "middle subject", "last subject", "first after", "further", "last")


@dataclass(frozen=True)
class TraceSettings:
    samples: int = 10
    """Noise draws per fact (ROME: 10)."""
    noise: float = 3.0
    """ν: the noise's standard deviation in units of the embeddings' (ROME: 3)."""
    window: int = 10
    """Layers restored together for the MLP and attention kinds (ROME: 10); the hidden state is one layer."""
    seed: int = 0
    kinds: tuple[str, ...] = KINDS
    """Which states are restored (a subset of :data:`KINDS`)."""
    layers: tuple[int, ...] | None = None
    """The layers traced (None: every layer); untraced rows of the tables stay NaN."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"trace kinds must be among {', '.join(KINDS)}, got {', '.join(unknown)}")
        if self.samples < 1 or self.window < 1 or self.noise < 0:
            raise ValueError("trace settings: samples and window must be at least 1 and noise at least 0")


@dataclass(frozen=True)
class TraceFact:
    """A prompt, where its subject is in it, and the answer token traced (the model's own prediction)."""

    prompt: str
    subject: str
    answer: str = ""


@dataclass
class FactTrace:
    """One fact's traces: ``effect[kind]`` is (layers × tokens) of ``p_restored``; ``roles[t]`` the role of token t."""

    fact: TraceFact
    tokens: list[str]
    answer_token: str
    p_clean: float
    p_corrupted: float
    restored: dict[str, np.ndarray]
    roles: list[int]


@dataclass
class TraceSummary:
    """Indirect effects averaged over facts by token role: ``effect[kind]`` is (layers × roles)."""

    n_facts: int
    p_clean: float
    p_corrupted: float
    effect: dict[str, np.ndarray]
    traces: list[FactTrace] = field(default_factory=list)


def embedding_std(adapter: ModelAdapter) -> float:
    """σ_emb: the standard deviation of every entry of the input embedding matrix (the scale the noise is in)."""
    return float(adapter.model.get_input_embeddings().weight.detach().float().std())


def _module(adapter: ModelAdapter, kind: str, layer: int) -> torch.nn.Module:
    block = adapter.block(layer)
    if kind == "hidden":
        return block
    return block.get_submodule(adapter.spec.mlp if kind == "mlp" else adapter.spec.attention)


def _layers_restored(kind: str, layer: int, n_layers: int, window: int) -> range:
    if kind == "hidden":
        return range(layer, layer + 1)
    # centred on the layer and cut at the model's ends, as ROME's trace does: a window shifted inwards instead
    # would restore the same layers for every layer near an end and flatten the curve there
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def _roles(n_tokens: int, first: int, last: int) -> list[int]:
    roles = []
    for t in range(n_tokens):
        if t == n_tokens - 1:
            roles.append(5)
        elif t == first:
            roles.append(0)
        elif first < t < last:
            roles.append(1)
        elif t == last:
            roles.append(2)
        elif t == last + 1:
            roles.append(3)
        elif t > last:
            roles.append(4)
        else:
            roles.append(-1)  # before the subject: no corruption reaches it, so no effect to average
    return roles


class _Tracer:
    """Hooks for one fact: noise on the subject's embeddings, and clean states put back per row."""

    def __init__(self, adapter: ModelAdapter, ids: list[int], subject: tuple[int, int], settings: TraceSettings,
                 sigma: float) -> None:
        self.adapter = adapter
        self.ids = torch.tensor([ids], device=adapter.device)
        self.subject = subject
        generator = torch.Generator().manual_seed(settings.seed)
        width = adapter.model.get_input_embeddings().weight.shape[1]
        self.noise = torch.randn(settings.samples, subject[1] - subject[0], width, generator=generator) * \
            settings.noise * sigma
        self.clean: dict[tuple[str, int], torch.Tensor] = {}

    def _forward(self, rows: int, restore: dict[torch.nn.Module, torch.Tensor] | None = None,
                 corrupt: bool = True, record: dict[torch.nn.Module, tuple[str, int]] | None = None) -> torch.Tensor:
        """Probabilities at the last token of ``rows`` copies of the prompt; ``restore[module]`` is a
        (rows × tokens) mask of where that module's clean output is put back."""
        handles = []
        embeddings = self.adapter.model.get_input_embeddings()
        first, last = self.subject
        samples = self.noise.shape[0]

        def add_noise(module, args, output):
            noise = self.noise.to(output)[torch.arange(rows) % samples]
            output = output.clone()
            output[:, first:last] += noise
            return output

        def put_back(mask: torch.Tensor, clean: torch.Tensor):
            def hook(module, args, output):
                hidden = block_hidden(output)
                mixed = torch.where(mask[:, :, None].to(hidden.device), clean.to(hidden), hidden)
                return (mixed, *output[1:]) if isinstance(output, tuple) else mixed
            return hook

        def keep(name):
            def hook(module, args, output):
                self.clean[name] = block_hidden(output)[0].detach()
            return hook

        try:
            if corrupt:
                handles.append(embeddings.register_forward_hook(add_noise))
            for module, mask in (restore or {}).items():
                handles.append(module.register_forward_hook(put_back(mask, self.clean[self._names[module]][None])))
            for module, name in (record or {}).items():
                handles.append(module.register_forward_hook(keep(name)))
            with torch.no_grad():  # the LM head only at the last token: the vocabulary is most of a small model's cost
                hidden = self.adapter.model.base_model(input_ids=self.ids.expand(rows, -1)).last_hidden_state
                logits = self.adapter.logits(hidden[:, -1]).float()
        finally:
            for handle in handles:
                handle.remove()
        return torch.softmax(logits, dim=-1)

    def run(self, settings: TraceSettings) -> tuple[int, float, float, dict[str, np.ndarray]]:
        adapter, n_layers, n_tokens = self.adapter, self.adapter.n_layers, self.ids.shape[1]
        modules = {(kind, layer): _module(adapter, kind, layer) for kind in KINDS for layer in range(n_layers)}
        self._names = {module: name for name, module in modules.items()}
        clean = self._forward(1, corrupt=False, record={module: name for name, module in modules.items()})[0]
        answer = int(clean.argmax())
        p_corrupted = float(self._forward(settings.samples)[:, answer].mean())
        restored = {}
        samples, first = settings.samples, self.subject[0]
        traced = range(n_layers) if settings.layers is None else settings.layers
        tokens = torch.arange(first, n_tokens)  # before the subject no noise reaches: nothing to restore
        for kind in settings.kinds:
            table = np.full((n_layers, n_tokens), np.nan)
            table[:, :first] = p_corrupted
            for layer in traced:
                rows = len(tokens) * samples  # row r restores token first + r // samples under draw r % samples
                mask = torch.zeros(rows, n_tokens, dtype=torch.bool)
                mask[torch.arange(rows), tokens.repeat_interleave(samples)] = True
                restore = {modules[(kind, l)]: mask for l in _layers_restored(kind, layer, n_layers, settings.window)}
                probabilities = self._forward(rows, restore)[:, answer].reshape(len(tokens), samples)
                table[layer, first:] = probabilities.mean(dim=1).cpu().numpy()
            restored[kind] = table
        return answer, float(clean[answer]), p_corrupted, restored


def trace_fact(adapter: ModelAdapter, fact: TraceFact, settings: TraceSettings = TraceSettings(),
               sigma: float | None = None) -> FactTrace:
    """The three traces of one fact (:class:`FactTrace`)."""
    tokenizer = adapter.tokenizer
    start = fact.prompt.find(fact.subject)
    if start < 0:
        raise ValueError(f"subject {fact.subject!r} does not occur in prompt {fact.prompt!r}")
    ids = encode_prompt(tokenizer, fact.prompt)
    _, first = last_token_before(tokenizer, fact.prompt, start + 1)
    _, last = last_token_before(tokenizer, fact.prompt, start + len(fact.subject))
    tracer = _Tracer(adapter, ids, (first, last + 1), settings, embedding_std(adapter) if sigma is None else sigma)
    answer, p_clean, p_corrupted, restored = tracer.run(settings)
    return FactTrace(fact, [tokenizer.decode([i]) for i in ids], tokenizer.decode([answer]), p_clean, p_corrupted,
                     restored, _roles(len(ids), first, last))


def knows(adapter: ModelAdapter, fact: TraceFact) -> bool:
    """Whether the model's top prediction after the prompt is the first token of the fact's answer (ROME traces
    the facts a model knows: elsewhere the prediction it restores is a function word, not the fact)."""
    if not fact.answer:
        return True
    ids = torch.tensor([encode_prompt(adapter.tokenizer, fact.prompt)], device=adapter.device)
    with torch.no_grad():
        hidden = adapter.model.base_model(input_ids=ids).last_hidden_state[:, -1]
    return int(adapter.logits(hidden).argmax()) == encode_target(adapter.tokenizer, fact.answer)[0]


def known_facts(adapter: ModelAdapter, facts: Sequence[TraceFact], limit: int | None = None) -> list[TraceFact]:
    """The first ``limit`` of ``facts`` the model :func:`knows`."""
    kept = []
    for fact in facts:
        if limit is not None and len(kept) >= limit:
            break
        if knows(adapter, fact):
            kept.append(fact)
    return kept


def trace_facts(adapter: ModelAdapter, facts: Sequence[TraceFact], settings: TraceSettings = TraceSettings(),
                progress: bool = True) -> TraceSummary:
    """:func:`trace_fact` for each fact, and the indirect effects averaged by token role."""
    sigma = embedding_std(adapter)
    iterator: Iterator[TraceFact] = iter(facts)
    if progress:
        from tqdm.auto import tqdm
        iterator = iter(tqdm(facts, desc="causal trace", unit="fact"))
    traces = [trace_fact(adapter, fact, settings, sigma) for fact in iterator]
    effect = {}
    for kind in settings.kinds:
        total = np.zeros((adapter.n_layers, len(ROLES)))
        count = np.zeros(len(ROLES))
        for trace in traces:
            for t, role in enumerate(trace.roles):
                if role >= 0:
                    total[:, role] += trace.restored[kind][:, t] - trace.p_corrupted
                    count[role] += 1
        effect[kind] = total / np.maximum(count, 1)
    return TraceSummary(len(traces), float(np.mean([t.p_clean for t in traces])),
                        float(np.mean([t.p_corrupted for t in traces])), effect, traces)


def suggest_layers(summary: TraceSummary, width: int = 5) -> tuple[int, ...]:
    """The edit window: the ``width`` consecutive layers with the largest summed MLP indirect effect at the
    last subject token (MEMIT's rule of reading the window off that peak; ROME edits its single peak layer).
    Ties go to the earlier window."""
    curve = summary.effect["mlp"][:, ROLES.index("last subject")]
    width = min(width, len(curve))
    sums = [curve[start:start + width].sum() for start in range(len(curve) - width + 1)]
    start = int(np.argmax(sums))
    return tuple(range(start, start + width))


def peak_layer(summary: TraceSummary) -> int:
    """The layer of the largest MLP indirect effect at the last subject token (ROME's single edit layer)."""
    return int(np.argmax(summary.effect["mlp"][:, ROLES.index("last subject")]))
