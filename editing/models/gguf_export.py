"""A float32 GGUF file of a Llama-architecture model as it is in memory, for llama.cpp and other GGUF runtimes.

Why its own writer rather than llama.cpp's ``convert_hf_to_gguf.py``: the file must hold *exactly* the
matrices in memory (an edited model's, whose hashes are on record) and be checked after writing, and
this is done in-process from the loaded model, without a llama.cpp checkout. Why only plain Llama:
that is the architecture whose llama.cpp layout is written here tensor by tensor (names, the q/k row
permutation llama.cpp's converter applies and transformers' GGUF loader undoes, hyperparameter keys);
anything else (another architecture, rope scaling, biases, a tokenizer that is not byte-level BPE) is
refused when the plan is made, before any file is written, rather than written wrongly. Why float32:
it is exact, so the matrices read back from the file hash like the ones in memory (for a float32
model; a bfloat16 model's values survive the round trip through float32 exactly).

Use: :func:`plan_gguf` (checks the model and tokenizer, works out everything to write), then
:meth:`GgufPlan.write` and :meth:`GgufPlan.verify`. Everything refused or found wrong raises
:class:`GgufExportError`. Pure torch, transformers and ``gguf``: nothing here knows about runs or ledgers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from editing.delta import weight_sha256
from editing.models.adapter import ModelAdapter
from editing.models.loading import DEFAULT_ALIASES, DEFAULT_MODEL, default_gguf_path


class GgufExportError(ValueError):
    """The model or tokenizer cannot be written as a faithful llama.cpp GGUF, or the written file does not
    read back as written. A ``ValueError``: it is about the model asked for, not a fault of this code."""


_LLAMA_GGUF_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                       "ffn_down")
"""The per-block tensors of llama.cpp's ``llama`` architecture (all weights, no biases)."""


def _llama_cpp_permute(weight: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's row order for a q or k projection (Hugging Face rotates the two halves of each head,
    llama.cpp interleaved pairs): per head, rows ``(2, d/2)`` become ``(d/2, 2)``. transformers' GGUF
    loader applies the inverse (``LlamaTensorProcessor._reverse_permute_weights``)."""
    heads = n_head_kv if n_head_kv is not None and n_head_kv != n_head else n_head
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .transpose(1, 2)
            .reshape(weight.shape))


def _source_gguf(source: str | None) -> Path | None:
    """The GGUF file the model was converted from (the embedded default or a ``.gguf`` path), if any."""
    name = source or DEFAULT_MODEL
    if name.lower() in DEFAULT_ALIASES:
        return default_gguf_path()
    if name.lower().endswith(".gguf") and Path(name).is_file():
        return Path(name)
    return None


def _llama_cpp_pre_tokenizer(tokenizer_json: Mapping[str, Any]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE ``tokenizer.json``, from its structure.

    llama.cpp's converter identifies a pre-tokenizer by hashing how a reference text tokenizes and
    looking the hash up in a table of known models; here the few splitting rules llama.cpp implements
    and that are recognisable from the Hugging Face pre-tokenizer itself are matched exactly (GPT-2's
    regex; the same with every digit split off, llama.cpp's ``smollm``/``starcoder``; Llama 3's split
    regex, which llama.cpp pairs with ``ignore_merges``, so the tokenizer must have it too, and the
    others must not). Anything else is refused rather than written with a wrong rule: llama.cpp would
    tokenize differently from the model's own tokenizer, silently.
    """
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or tokenizer_json.get("normalizer"):
        raise GgufExportError("GGUF export supports byte-level BPE tokenizers only (tokenizer.ggml.model 'gpt2'); "
                              f"this one is {model.get('type')!r} "
                              f"with normalizer {tokenizer_json.get('normalizer')!r}. "
                              "Export safetensors and convert with llama.cpp's convert_hf_to_gguf.py")
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]

    def byte_level(step: Mapping[str, Any], regex: bool) -> bool:
        return (step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == regex
                and not step.get("add_prefix_space", False))

    ignore_merges = bool(model.get("ignore_merges", False))
    if len(steps) == 1 and byte_level(steps[0], regex=True) and not ignore_merges:
        return "gpt-2"
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and byte_level(steps[1], regex=True) and not ignore_merges):
        return "smollm"
    if (len(steps) == 2 and steps[0].get("type") == "Split" and byte_level(steps[1], regex=False)
            and ignore_merges):
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if steps[0].get("behavior") == "Isolated" and pattern == GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]:
            return "llama-bpe"
    raise GgufExportError("cannot tell which llama.cpp pre-tokenizer matches this tokenizer's "
                          f"{json.dumps(pre)[:200]}; export safetensors and convert with llama.cpp's "
                          "convert_hf_to_gguf.py")


def plan_gguf(adapter: ModelAdapter, *, source: str | None, name: str, provenance: Mapping[str, Any]) -> GgufPlan:
    """Check that ``adapter``'s model and tokenizer can be written as a llama.cpp ``llama`` GGUF and work out
    everything the file will hold, so that an unsupported model is refused (:class:`GgufExportError`)
    before any file is written.

    ``source``: what the model was loaded from (the name, folder or ``.gguf`` path given to
    :func:`editing.models.load_model`; None: the embedded default). A model converted from a GGUF file
    gets that file's tokenizer metadata, verbatim; any other gets its tokenizer described the way
    llama.cpp's converter does. ``name``: the file's ``general.name``. ``provenance``: any
    JSON-serialisable record of where the weights come from, written as JSON under the
    ``seqedit.provenance`` key.
    """
    import gguf

    config = adapter.model.config
    if config.model_type != "llama":
        raise GgufExportError(f"GGUF export supports the Llama architecture only; this model is "
                              f"{config.model_type!r}. Export safetensors and convert with llama.cpp's "
                              "convert_hf_to_gguf.py")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    unsupported = []
    if rope_type != "default" or rope_theta is None:
        unsupported.append(f"rope {rope_type!r}")
    if getattr(config, "hidden_act", "silu") != "silu":
        unsupported.append(f"activation {config.hidden_act!r}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        unsupported.append("biases")
    if unsupported:
        raise GgufExportError(f"GGUF export writes plain Llama models; this one has {', '.join(unsupported)}. "
                              "Export safetensors and convert with llama.cpp's convert_hf_to_gguf.py")
    n_layers = config.num_hidden_layers
    n_head = config.num_attention_heads
    n_head_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    n_vocab = adapter.model.get_input_embeddings().weight.shape[0]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = []
    for tensor_name in adapter.model.state_dict():
        if tied and tensor_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output tensor
        gguf_name = name_map.get_name(tensor_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GgufExportError(f"GGUF export: no llama.cpp tensor for {tensor_name}")
        tensors.append((gguf_name, tensor_name))
    wanted = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not tied else set())
    wanted |= {f"blk.{block}.{part}.weight" for block in range(n_layers) for part in _LLAMA_GGUF_TENSORS}
    written = {gguf_name for gguf_name, _ in tensors}
    if written != wanted:
        raise GgufExportError(f"GGUF export: the model's tensors do not make a llama.cpp Llama "
                              f"(missing {sorted(wanted - written)[:5]}, extra {sorted(written - wanted)[:5]})")
    hyperparameters = {"context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
                       "block_count": n_layers, "feed_forward_length": config.intermediate_size,
                       "head_count": n_head, "head_count_kv": n_head_kv, "rope_freq_base": float(rope_theta),
                       "layer_norm_rms_eps": float(config.rms_norm_eps), "rope_dimension_count": head_dim,
                       "head_dim": head_dim, "vocab_size": n_vocab}
    source_gguf = _source_gguf(source)
    pre = None
    if source_gguf is None:
        backend = getattr(adapter.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise GgufExportError("GGUF export needs a fast (tokenizers) tokenizer to describe the vocabulary")
        pre = _llama_cpp_pre_tokenizer(json.loads(backend.to_str()))
    return GgufPlan(adapter, name, provenance, tensors, hyperparameters, source_gguf, pre)


@dataclasses.dataclass
class GgufPlan:
    """Everything a GGUF export will write, worked out (and refused if unsupported) by :func:`plan_gguf`
    before any file is."""

    adapter: ModelAdapter
    name: str
    """The file's ``general.name``."""
    provenance: Mapping[str, Any]
    """Written as JSON under ``seqedit.provenance``."""
    tensors: list[tuple[str, str]]
    """(GGUF name, state-dict name), in writing order."""
    hyperparameters: dict[str, Any]
    source_gguf: Path | None
    pre_tokenizer: str | None
    """For a tokenizer described from the Hugging Face files; None when copied from ``source_gguf``."""

    # -- writing ---------------------------------------------------------------------------------------------
    def write(self, path: Path, tokenizer_folder: Path) -> None:
        """Write the GGUF to ``path``, streaming one tensor at a time.

        ``tokenizer_folder``: the model's tokenizer files as ``save_pretrained`` just wrote them, where the
        merges, special tokens and chat template of a described tokenizer are read from (the in-memory
        tokenizer does not expose them all).
        """
        import gguf

        hp = self.hyperparameters
        writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        try:
            writer.add_type(gguf.GGUFType.MODEL)
            writer.add_name(self.name)
            writer.add_context_length(hp["context_length"])
            writer.add_embedding_length(hp["embedding_length"])
            writer.add_block_count(hp["block_count"])
            writer.add_feed_forward_length(hp["feed_forward_length"])
            writer.add_head_count(hp["head_count"])
            writer.add_head_count_kv(hp["head_count_kv"])
            writer.add_rope_freq_base(hp["rope_freq_base"])
            writer.add_layer_norm_rms_eps(hp["layer_norm_rms_eps"])
            writer.add_rope_dimension_count(hp["rope_dimension_count"])
            if hp["head_dim"] != hp["embedding_length"] // hp["head_count"]:
                writer.add_key_length(hp["head_dim"])
                writer.add_value_length(hp["head_dim"])
            writer.add_vocab_size(hp["vocab_size"])
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            self._add_tokenizer(writer, tokenizer_folder)
            writer.add_string("seqedit.provenance", json.dumps(self.provenance, ensure_ascii=False))
            state = self.adapter.model.state_dict()
            for gguf_name, name in self.tensors:
                tensor = state[name]
                writer.add_tensor_info(gguf_name, tuple(tensor.shape), np.dtype(np.float32), tensor.numel() * 4)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for gguf_name, name in self.tensors:
                writer.write_tensor_data(self._gguf_values(gguf_name, state[name]))
        finally:
            writer.close()

    def _gguf_values(self, gguf_name: str, tensor: torch.Tensor) -> np.ndarray:
        """A tensor as the GGUF stores it: float32, C order, q/k rows in llama.cpp's order."""
        values = tensor.detach().to("cpu", torch.float32)
        if gguf_name.endswith(".attn_q.weight"):
            values = _llama_cpp_permute(values, self.hyperparameters["head_count"])
        elif gguf_name.endswith(".attn_k.weight"):
            hp = self.hyperparameters
            values = _llama_cpp_permute(values, hp["head_count"], hp["head_count_kv"])
        return np.ascontiguousarray(values.numpy())

    def _add_tokenizer(self, writer: Any, tokenizer_folder: Path) -> None:
        if self.source_gguf is not None:
            self._copy_tokenizer(writer, self.source_gguf)
        else:
            self._describe_tokenizer(writer, tokenizer_folder)

    def _copy_tokenizer(self, writer: Any, source: Path) -> None:
        """Every ``tokenizer.*`` key of the GGUF the model came from, verbatim: the original vocabulary,
        merges, pre-tokenizer, special ids and chat template, as llama.cpp's converter wrote them. Checked
        against the tokenizer in memory, token by token, so a mismatch cannot pass unnoticed."""
        import gguf

        reader = gguf.GGUFReader(source)
        tokens = reader.get_field("tokenizer.ggml.tokens")
        if tokens is None:
            raise GgufExportError(f"{source} has no tokenizer metadata to copy")
        vocabulary = tokens.contents()
        if len(vocabulary) != self.hyperparameters["vocab_size"]:
            raise GgufExportError(f"{source} lists {len(vocabulary)} tokens, the model has "
                                  f"{self.hyperparameters['vocab_size']} embeddings")
        model_field = reader.get_field("tokenizer.ggml.model")
        if model_field is not None and model_field.contents() == "gpt2":
            # transformers spells a byte-level token written with characters outside the byte alphabet
            # (a literal space, say) in that alphabet when it loads the file: compare with that spelling
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            spelling = bytes_to_unicode()
            alphabet = set(spelling.values())
            vocabulary = [token if set(token) <= alphabet else "".join(spelling[byte] for byte in token.encode())
                          for token in vocabulary]
        ours = self.adapter.tokenizer.convert_ids_to_tokens(list(range(len(vocabulary))))
        different = [index for index, (theirs, mine) in enumerate(zip(vocabulary, ours)) if theirs != mine]
        if different:
            raise GgufExportError(f"the tokenizer in memory differs from {source.name}'s at {len(different)} ids "
                                  f"(first: {different[0]})")
        for key, field in reader.fields.items():
            if not key.startswith("tokenizer."):
                continue
            kind = field.types[0]
            sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), kind, sub_type=sub_type)

    def _describe_tokenizer(self, writer: Any, tokenizer_folder: Path) -> None:
        """The vocabulary as llama.cpp's converter describes a byte-level BPE tokenizer: every id up to the
        embedding size with its token (``[PAD<i>]`` for ids the tokenizer does not use), added tokens as
        control (special) or user-defined, the merges, special ids, chat template, and whether BOS/EOS are
        added — taken from how the tokenizer actually encodes, not from a flag that may be absent."""
        import gguf

        tokenizer = self.adapter.tokenizer
        n_vocab = self.hyperparameters["vocab_size"]
        by_id = {index: token for token, index in tokenizer.get_vocab().items()}
        if max(by_id) >= n_vocab:
            raise GgufExportError(f"the tokenizer has ids up to {max(by_id)}, the model only {n_vocab} embeddings")
        added = tokenizer.added_tokens_decoder
        tokens, types = [], []
        for index in range(n_vocab):
            if index not in by_id:
                tokens.append(f"[PAD{index}]")
                types.append(gguf.TokenType.UNUSED)
            elif index in added:
                tokens.append(by_id[index])
                types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
            else:
                tokens.append(by_id[index])
                types.append(gguf.TokenType.NORMAL)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre_tokenizer)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(tokenizer_folder, load_merges=True, n_vocab=n_vocab)
        if not special.merges:
            raise GgufExportError("the tokenizer files have no BPE merges to write into the GGUF")
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a", add_special_tokens=True)["input_ids"]
        special.add_special_token["bos"] = bool(len(full) > len(plain) and tokenizer.bos_token_id is not None
                                                and full[0] == tokenizer.bos_token_id)
        special.add_special_token["eos"] = bool(len(full) > len(plain) and tokenizer.eos_token_id is not None
                                                and full[-1] == tokenizer.eos_token_id)
        special.add_to_gguf(writer, quiet=True)

    # -- checking ---------------------------------------------------------------------------------------------
    def verify(self, path: Path, expected_sha256: Mapping[int, str]) -> None:
        """Read the written GGUF back: the tensor set is the plan's, all float32, and every edited matrix,
        cast back to the model's dtype, has the ledger's sha256.

        ``expected_sha256``: by layer, the :func:`editing.delta.weight_sha256` the edited matrix (the
        Llama adapter's ``mlp.down_proj``, llama.cpp's ``ffn_down``) must have — the one a run's ledger
        recorded. Checked on the file rather than trusted from memory, because the file is what is used.

        Read with transformers' GGUF reader where it has one (an implementation independent of the
        ``gguf`` writer, and fast: it memory-maps the tensors and skips the vocabulary), else with
        ``gguf.GGUFReader``.
        """
        names = [f"blk.{layer}.ffn_down.weight" for layer in expected_sha256]
        types, edited = _read_gguf(path, names)
        if set(types) != {gguf_name for gguf_name, _ in self.tensors}:
            raise GgufExportError(f"{path.name} does not hold the tensors it was written with")
        if set(types.values()) != {0}:  # ggml type 0: F32
            raise GgufExportError(f"{path.name} holds tensors that are not float32 (ggml types "
                                  f"{sorted(set(types.values()))})")
        for layer, sha in expected_sha256.items():
            values = edited[f"blk.{layer}.ffn_down.weight"].to(self.adapter.stored_weight(layer).dtype)
            if weight_sha256(values) != sha:
                raise GgufExportError(f"{path.name}: layer {layer} reads back with sha256 {weight_sha256(values)}, "
                                      f"the ledger recorded {sha}")


def _read_gguf(path: Path, names: list[str]) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """(ggml type of every tensor by name, the tensors ``names`` in torch orientation) of a GGUF file."""
    try:
        from transformers.integrations.gguf.reader import GgufHeader, load_gguf_state_dict
    except ImportError:  # an older transformers: the gguf package's own reader (slow on large vocabularies)
        import gguf

        reader = gguf.GGUFReader(path)
        types = {tensor.name: int(tensor.tensor_type) for tensor in reader.tensors}
        data = {tensor.name: tensor.data for tensor in reader.tensors if tensor.name in names}
        return types, {name: torch.from_numpy(np.array(data[name])) for name in names}
    header = GgufHeader.from_file(str(path))
    lazy = load_gguf_state_dict(header)
    return header.ggml_types, {name: lazy[name][...] for name in names}
