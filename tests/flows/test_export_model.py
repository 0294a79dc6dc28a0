"""``seqedit export-model``: a run's model at any applied batch, rebuilt from a real ledger, loaded back by
plain transformers (from the safetensors folder and from the GGUF), with the ledger's hashes.

The runs are real ledger runs on tiny random models saved to disk (Llama with grouped-query attention,
GPT-2 with its transposed ``Conv1D``), edited by random low-rank deltas through the ledger API exactly as
the editor commits them. The tokenizer is a small byte-level BPE trained here, so that reading a GGUF's
vocabulary back (pure Python in transformers) takes milliseconds instead of the seconds SmolLM2's 49k
tokens would.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import pytest
import torch
from sqlalchemy import Engine
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerBase, PreTrainedTokenizerFast)

from db.engine import make_engine, transaction
from db.errors import BatchStateError, RunNotFoundError
from db.history import applied_facts
from db.ledger import acquire_writer
from db.migrate import upgrade
from db.replay import expected_hashes
from db.runs import RunSpec, create_run
from editing.delta import weight_sha256
from editing.models import ModelAdapter, load_model
from flows.cli import main
from editing.models.gguf_export import GgufExportError, _llama_cpp_pre_tokenizer
from flows.model_export import (GGUF_FILE, PROVENANCE_FILE, ExportError, build_provenance, export_model,
                                write_model_folder)
from fixtures.database import add_facts, apply_and_commit
from fixtures.models import build_tiny_model

N_BATCHES = 4
"""Batches committed; the last is then rolled back, so batches 1..3 are applied and 4 is not."""
SAMPLES = ["Subject 3 lives in City 3", "Hello world! 123 4567", "  spaces   and\ttabs\n", "Café déjà vu <|im_end|>"]


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level BPE (GPT-2's pre-tokenizer) with a few hundred tokens and chat-style special tokens."""
    corpus = [f"Subject {i} lives in City {i}. Where does Subject {i} live?" for i in range(50)]
    corpus += ["The quick brown fox jumps over the lazy dog.", "Hello world! 1234567890", "Café déjà vu"] * 5
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=360, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")


@dataclass
class TinyRun:
    """A run on a tiny model saved in ``model_dir``, with the edited layers' weights after every batch."""

    url: str
    engine: Engine
    run_id: int
    model_dir: Path
    layers: tuple[int, ...]
    history: list[dict[int, torch.Tensor]]
    """``history[seq]``: the edited layers after batch ``seq`` (0: the original)."""


def record_run(folder: Path, model: str, adapter: ModelAdapter, layers: tuple[int, ...]) -> TinyRun:
    """A SQLite ledger with a run editing ``layers`` of ``adapter`` (loaded from ``model``): ``N_BATCHES``
    batches of 2 facts, checkpoints every 2, then the last batch rolled back."""
    folder.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{folder / 'ledger.db'}"
    upgrade(url)
    engine = make_engine(url)
    add_facts(engine, 2 * N_BATCHES)
    spec = RunSpec(model_name=adapter.name, algorithm="emmet", distribution="single_layer", batch_size=2,
                   checkpoint_every=2, model_fingerprint=adapter.fingerprint, name="export-test",
                   hyperparameters={"settings": {"model": model, "runtime": {"device": "cpu", "dtype": "float32"}}})
    original = adapter.original_weights(layers)
    run = create_run(engine, spec, original)
    weights = {layer: weight.clone() for layer, weight in original.items()}
    history = [{layer: weight.clone() for layer, weight in weights.items()}]
    generator = torch.Generator().manual_seed(1)
    with acquire_writer(engine, run.id) as writer:
        for _ in range(N_BATCHES):
            apply_and_commit(writer, writer.claim_batch(), weights, generator)
            history.append({layer: weight.clone() for layer, weight in weights.items()})
        writer.rollback(N_BATCHES - 1)
    return TinyRun(url, engine, run.id, Path(model), layers, history)


def saved_tiny_model(folder: Path, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> Path:
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer_small() -> PreTrainedTokenizerBase:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory, tokenizer_small) -> TinyRun:
    """Llama (4 layers, 4 heads, 2 key/value heads, untied embeddings), layers 1 and 2 edited."""
    folder = tmp_path_factory.mktemp("llama-run")
    tiny = build_tiny_model("llama", tokenizer_small)
    model_dir = saved_tiny_model(folder / "tiny-llama", tiny.model, tokenizer_small)
    return record_run(folder, str(model_dir), load_model(str(model_dir), device="cpu"), (1, 2))


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory: pytest.TempPathFactory, tokenizer_small) -> TinyRun:
    """GPT-2 (Conv1D: the parameter is stored d_in × d_out), layer 1 edited."""
    folder = tmp_path_factory.mktemp("gpt2-run")
    tiny = build_tiny_model("gpt2", tokenizer_small)
    model_dir = saved_tiny_model(folder / "tiny-gpt2", tiny.model, tokenizer_small)
    return record_run(folder, str(model_dir), load_model(str(model_dir), device="cpu"), (1,))


def ledger_hashes(run: TinyRun, seq: int) -> dict[int, str]:
    with transaction(run.engine) as session:
        return expected_hashes(session, run.run_id, seq)


def llama_edited(model: torch.nn.Module, layer: int) -> torch.Tensor:
    return model.model.layers[layer].mlp.down_proj.weight


# -- the Hugging Face folder -----------------------------------------------------------------------------------

@pytest.mark.parametrize("seq", [0, 1, None])
def test_a_point_of_the_run_loads_with_plain_transformers_with_the_ledger_hashes(llama_run, tmp_path, seq):
    target = N_BATCHES - 1 if seq is None else seq
    out = export_model(llama_run.engine, llama_run.run_id, seq, tmp_path / "model")

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ledger = ledger_hashes(llama_run, target)
    for layer in llama_run.layers:
        assert weight_sha256(llama_edited(model, layer)) == ledger[layer]
        assert torch.equal(llama_edited(model, layer), llama_run.history[target][layer])
        matrix = llama_edited(model, layer).detach()  # the convention seqedit.json states, without seqedit
        digest = hashlib.sha256(f"{matrix.dtype}|{tuple(matrix.shape)}|".encode() + matrix.numpy().tobytes())
        assert digest.hexdigest() == ledger[layer]
    original = AutoModelForCausalLM.from_pretrained(llama_run.model_dir, dtype=torch.float32).state_dict()
    edited = {f"model.layers.{layer}.mlp.down_proj.weight" for layer in llama_run.layers}
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]) == (name not in edited or target == 0), name
    source_tokenizer = AutoTokenizer.from_pretrained(llama_run.model_dir)
    assert [tokenizer(text)["input_ids"] for text in SAMPLES] == [source_tokenizer(text)["input_ids"]
                                                                   for text in SAMPLES]

    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert (record["run_id"], record["seq"], record["last_applied_seq"]) == (llama_run.run_id, target, N_BATCHES - 1)
    assert (record["algorithm"], record["distribution"]) == ("emmet", "single_layer")
    assert record["model"]["name"] == str(llama_run.model_dir)
    assert record["model"]["fingerprint"] == load_model(str(llama_run.model_dir), device="cpu").fingerprint
    assert record["edited_layers"] == list(llama_run.layers)
    assert record["layer_sha256"] == {str(layer): sha for layer, sha in ledger.items()}
    assert record["parameters"] == {str(layer): f"model.layers.{layer}.mlp.down_proj.weight"
                                    for layer in llama_run.layers}
    facts = applied_facts(llama_run.engine, llama_run.run_id, before_seq=target + 1)
    assert len(facts) == record["n_facts"] == 2 * target
    assert [(entry["fact_id"], entry["case_id"], entry["subject"], entry["target_new"]) for entry in record["facts"]] \
        == [(fact_id, fact.case_id, fact.subject, fact.target_new) for fact_id, fact in facts]
    assert record["files"] == {"weights": ["model.safetensors"]}
    assert not list(tmp_path.glob(".model.export-*")), "the staging folder is gone"


def test_gpt2_conv1d_hashes_are_of_the_transposed_parameter(gpt2_run, tmp_path):
    out = export_model(gpt2_run.engine, gpt2_run.run_id, 2, tmp_path / "gpt2")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    parameter = model.transformer.h[1].mlp.c_proj.weight
    assert parameter.shape[0] != parameter.shape[1], "d_in x d_out: the test needs a rectangular matrix"
    assert weight_sha256(parameter.T) == ledger_hashes(gpt2_run, 2)[1]
    assert torch.equal(parameter.T, gpt2_run.history[2][1])
    assert json.loads((out / PROVENANCE_FILE).read_text())["parameters"] == {"1": "transformer.h.1.mlp.c_proj.weight"}


def test_points_that_are_not_applied_and_unknown_runs_are_refused(llama_run, tmp_path):
    engine = llama_run.engine
    for seq in (N_BATCHES, N_BATCHES + 3, -1):  # rolled back, beyond the end, before the start
        with pytest.raises(BatchStateError, match=f"no applied batch {seq}"):
            export_model(engine, llama_run.run_id, seq, tmp_path / f"at-{seq}")
        assert not (tmp_path / f"at-{seq}").exists()
    with pytest.raises(RunNotFoundError, match="no run 999"):
        export_model(engine, 999, None, tmp_path / "none")
    assert sorted(path.name for path in tmp_path.iterdir()) == [], "nothing written, not even staging folders"


def test_an_occupied_folder_needs_force_which_replaces_only_model_files(llama_run, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    with pytest.raises(ExportError, match="not empty.*--force"):
        export_model(llama_run.engine, llama_run.run_id, 1, out)
    assert sorted(path.name for path in out.iterdir()) == ["model-00001-of-00002.safetensors", "notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        export_model(llama_run.engine, llama_run.run_id, 1, tmp_path / "file")

    export_model(llama_run.engine, llama_run.run_id, 1, out, force=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "model-00001-of-00002.safetensors").exists(), "a stale shard would shadow the new weights"
    export_model(llama_run.engine, llama_run.run_id, 2, out, force=True)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert weight_sha256(llama_edited(model, 2)) == ledger_hashes(llama_run, 2)[2]
    assert json.loads((out / PROVENANCE_FILE).read_text())["seq"] == 2


def test_write_model_folder_exports_the_state_in_memory_only_if_it_is_the_ledgers(llama_run, tmp_path):
    """The pipeline's ``--save-model`` path: the model it holds, with the provenance of its batch."""
    adapter = load_model(str(llama_run.model_dir), device="cpu")
    provenance = build_provenance(llama_run.engine, llama_run.run_id, 2)
    with pytest.raises(ExportError, match="not run .* state at batch 2: layers \\[1, 2\\]"):
        write_model_folder(adapter, tmp_path / "wrong", provenance)
    assert not (tmp_path / "wrong").exists()
    adapter.restore(llama_run.history[2])
    out = write_model_folder(adapter, tmp_path / "right", provenance)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert weight_sha256(llama_edited(model, 1)) == provenance["layer_sha256"]["1"]
    with pytest.raises(BatchStateError, match="no applied batch 4"):
        build_provenance(llama_run.engine, llama_run.run_id, N_BATCHES)


# -- the command line -------------------------------------------------------------------------------------------

def test_the_command_exports_and_reports_errors_with_exit_code_2(llama_run, gpt2_run, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["export-model", "--run", str(llama_run.run_id), "--out", str(out), "--db", llama_run.url]) == 0
    printed = capsys.readouterr().out
    assert f"run {llama_run.run_id} at batch {N_BATCHES - 1}" in printed and "verified" in printed
    assert json.loads((out / PROVENANCE_FILE).read_text())["seq"] == N_BATCHES - 1

    failures = {
        "no applied batch 4": ["--run", str(llama_run.run_id), "--seq", str(N_BATCHES), "--out", str(tmp_path / "a")],
        "not empty": ["--run", str(llama_run.run_id), "--out", str(out)],
        "no run 999": ["--run", "999", "--out", str(tmp_path / "b")],
        "Llama architecture only": ["--run", str(gpt2_run.run_id), "--format", "gguf", "--out", str(tmp_path / "c")],
    }
    for message, arguments in failures.items():
        url = gpt2_run.url if "gguf" in arguments else llama_run.url
        assert main(["export-model", *arguments, "--db", url]) == 2, message
        error = capsys.readouterr().err
        assert error.startswith("seqedit export-model: error:") and message in error, error
    assert not (tmp_path / "c").exists()


# -- GGUF -------------------------------------------------------------------------------------------------------

def gguf_fields(path: Path, prefix: str) -> dict[str, object]:
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith(prefix)}


def assert_gguf_round_trip(out: Path, run: TinyRun, seq: int) -> torch.nn.Module:
    """The GGUF loads in transformers into exactly the safetensors model (q/k permutation undone), with the
    ledger's hashes, and its tokenizer encodes like the folder's."""
    from_folder = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    from_gguf = AutoModelForCausalLM.from_pretrained(out, gguf_file=GGUF_FILE, dtype=torch.float32)
    folder_state, gguf_state = from_folder.state_dict(), from_gguf.state_dict()
    assert folder_state.keys() == gguf_state.keys()
    assert [name for name in folder_state if not torch.equal(folder_state[name], gguf_state[name])] == []
    for layer, sha in ledger_hashes(run, seq).items():
        assert weight_sha256(llama_edited(from_gguf, layer)) == sha
    folder_tokenizer = AutoTokenizer.from_pretrained(out)
    gguf_tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=GGUF_FILE)
    for text in SAMPLES:
        assert gguf_tokenizer(text)["input_ids"] == folder_tokenizer(text)["input_ids"], text
    return from_gguf


def test_gguf_round_trips_through_transformers_with_the_ledger_hashes(llama_run, tmp_path):
    out = export_model(llama_run.engine, llama_run.run_id, 2, tmp_path / "gguf", "gguf")
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert record["files"]["gguf"] == GGUF_FILE
    assert_gguf_round_trip(out, llama_run, 2)

    general = gguf_fields(out / GGUF_FILE, "general.")
    assert (general["general.architecture"], general["general.file_type"]) == ("llama", gguf.LlamaFileType.ALL_F32)
    llama = gguf_fields(out / GGUF_FILE, "llama.")
    assert (llama["llama.block_count"], llama["llama.attention.head_count"],
            llama["llama.attention.head_count_kv"], llama["llama.rope.dimension_count"]) == (4, 4, 2, 16)
    tokenizer = gguf_fields(out / GGUF_FILE, "tokenizer.")
    assert (tokenizer["tokenizer.ggml.model"], tokenizer["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert tokenizer["tokenizer.ggml.bos_token_id"] == 1 and tokenizer["tokenizer.ggml.eos_token_id"] == 2
    assert tokenizer["tokenizer.ggml.token_type"][:3] == [gguf.TokenType.CONTROL] * 3
    embedded = json.loads(gguf_fields(out / GGUF_FILE, "seqedit.")["seqedit.provenance"])
    assert (embedded["run_id"], embedded["seq"], embedded["layer_sha256"]) == \
        (llama_run.run_id, 2, record["layer_sha256"])
    names = {tensor.name for tensor in gguf.GGUFReader(out / GGUF_FILE).tensors}
    assert "output.weight" in names and "blk.3.ffn_down.weight" in names and len(names) == 3 + 4 * 9


def test_gguf_of_a_model_loaded_from_gguf_keeps_its_tokenizer_metadata(tmp_path, tokenizer_small, monkeypatch):
    """Tied embeddings (no output tensor), and a model that came from a GGUF file (as the default SmolLM2
    does): the export copies that file's tokenizer metadata verbatim."""
    monkeypatch.setenv("SEQEDIT_CACHE", str(tmp_path / "cache"))  # where a GGUF model gets converted
    torch.manual_seed(0)
    tied = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=4, vocab_size=len(tokenizer_small),
                                        max_position_embeddings=256, tie_word_embeddings=True,
                                        bos_token_id=1, eos_token_id=2))
    model_dir = saved_tiny_model(tmp_path / "tied", tied, tokenizer_small)
    first = record_run(tmp_path / "first", str(model_dir), load_model(str(model_dir), device="cpu"), (1,))
    source = export_model(first.engine, first.run_id, 0, tmp_path / "source", "gguf") / GGUF_FILE

    run = record_run(tmp_path / "second", str(source), load_model(str(source), device="cpu"), (0, 2))
    out = export_model(run.engine, run.run_id, 3, tmp_path / "edited", "gguf")
    loaded = assert_gguf_round_trip(out, run, 3)
    assert loaded.config.tie_word_embeddings
    assert "output.weight" not in {tensor.name for tensor in gguf.GGUFReader(out / GGUF_FILE).tensors}
    assert gguf_fields(out / GGUF_FILE, "tokenizer.") == gguf_fields(source, "tokenizer.")
    assert json.loads((out / PROVENANCE_FILE).read_text())["model"]["source"] == str(source)


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.mark.parametrize("pre_tokenizer, ignore_merges, expected", [
    (pre_tokenizers.ByteLevel(add_prefix_space=False), False, "gpt-2"),
    (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                              pre_tokenizers.ByteLevel(add_prefix_space=False)]), False, "smollm"),
    (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), True, "llama-bpe"),
    (pre_tokenizers.ByteLevel(add_prefix_space=True), False, None),  # a leading space llama.cpp would not add
    (pre_tokenizers.ByteLevel(add_prefix_space=False), True, None),  # GPT-2's rule without its merge order
    (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{N}{1,2}| ?\p{L}+|\s+"), behavior="isolated"),
                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), True, None),
    (pre_tokenizers.Metaspace(), False, None),  # sentencepiece-style
])
def test_the_llama_cpp_pre_tokenizer_is_recognised_or_refused(pre_tokenizer, ignore_merges, expected):
    backend = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizer
    described = json.loads(backend.to_str())
    if expected is None:
        with pytest.raises(GgufExportError, match="pre-tokenizer"):
            _llama_cpp_pre_tokenizer(described)
    else:
        assert _llama_cpp_pre_tokenizer(described) == expected
