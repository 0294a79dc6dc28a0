"""Datasets resolve mirror → bundle → hub, the bundle reproduces the mirror, hub copies convert to the file form.

No test downloads: the hub's schema is rebuilt locally as a ``datasets`` dataset (saved with
``save_to_disk`` and loaded back, as a download would arrive), from the mirror's own records, so each
conversion is checked against the file it must reproduce.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import datasets
import pytest
import torch

from editing.config import StatsParams
from editing.corpus import TEXT_CORPORA, open_corpus
from editing.data import DataUnavailable, Sample, catalog, dataset_spec, resolve
from editing.data.bundle import packed_path, sampled_lines
from editing.data.hub import hub_cache_path, materialise, read_provenance
from editing.evaluation import TASKS, load_records
from editing.stats import second_moments
from flows.cli import main
from fixtures.data import MIRROR


@pytest.fixture
def no_mirror(tmp_path, monkeypatch) -> Path:
    """A machine without the data mirror and with an empty cache: what a user's clone has."""
    empty = tmp_path / "no-mirror"
    empty.mkdir()
    monkeypatch.setenv("SEQEDIT_DATA", str(empty))
    monkeypatch.setenv("SEQEDIT_CACHE", str(tmp_path / "cache"))
    return empty


def _hub_dataset(rows: list[dict], features: datasets.Features | None, tmp_path: Path, name: str) -> datasets.Dataset:
    """``rows`` as the hub would hand them over: a ``datasets`` dataset, saved and loaded back."""
    folder = tmp_path / f"hub-{name}"
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(folder))
    return datasets.load_from_disk(str(folder))


# -- resolution order ---------------------------------------------------------------------------------------------

def test_the_mirror_wins_then_the_bundle_then_nothing_with_one_line_naming_each_place(no_mirror, tmp_path):
    mirror = tmp_path / "mirror"
    (mirror / "downstream").mkdir(parents=True)
    (mirror / "downstream" / "sst2.json").write_text("[]")
    assert resolve("sst2", root=mirror).origin == "mirror"
    assert resolve("sst2").origin == "bundle"
    with pytest.raises(DataUnavailable) as missing:
        resolve("mrpc", download=False)
    message = str(missing.value)
    assert "\n" not in message
    assert message.startswith("dataset 'mrpc' not available (mirror, bundle, hub): ")
    assert f"mirror {no_mirror / 'downstream' / 'mrpc.json'} (missing)" in message
    assert "bundle (not bundled)" in message and "hub nyu-mll/glue@" in message


def test_a_sampled_bundle_serves_its_sample_only(no_mirror):
    assert resolve("wikipedia-leads", Sample(2000, 0)).origin == "bundle"
    for other in (Sample(120, 0), Sample(2000, 1), None):
        with pytest.raises(DataUnavailable, match=r"bundle \(holds the sample n=2000 seed=0 only"):
            resolve("wikipedia-leads", other, download=False)


def test_an_offline_hub_is_one_line_too(no_mirror, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataUnavailable) as missing:
        resolve("rte")
    assert "\n" not in str(missing.value) and "hub nyu-mll/glue@" in str(missing.value)


# -- the bundle is the mirror ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(name for name, spec in catalog().items() if spec.bundle is not None))
def test_each_bundled_file_is_the_mirrors_file_or_its_sample(name):
    spec = dataset_spec(name)
    bundled = gzip.decompress(packed_path(spec).read_bytes())
    if name == "counterfact-sample":  # the demo's facts: the first 200 records of counterfact-1000
        assert json.loads(bundled) == _mirror_json_at("counterfact-1000")[:200]
        return
    mirrored = _mirror_path(name).read_bytes()
    assert bundled == (mirrored if spec.bundle.complete else sampled_lines(spec, mirrored))


def test_the_demos_c0_texts_and_statistics_are_the_same_from_the_bundle_and_the_mirror(tiny_model, tmp_path,
                                                                                       monkeypatch):
    _mirror_path("wikipedia-leads")  # the mirror is needed to compare with
    params = StatsParams(corpus="wikipedia-leads", n_samples=2000, max_tokens=32, batch_size=64)
    mirrored = open_corpus(params.corpus, params.n_samples, 0)
    monkeypatch.setenv("SEQEDIT_CACHE", str(tmp_path / "mirror-cache"))
    adapter = tiny_model("llama", n_layers=2, hidden=32)
    from_mirror = second_moments(adapter, [1], params, progress=False)[1]

    monkeypatch.setenv("SEQEDIT_DATA", str(tmp_path / "no-mirror"))
    monkeypatch.setenv("SEQEDIT_CACHE", str(tmp_path / "bundle-cache"))
    bundled = open_corpus(params.corpus, params.n_samples, 0)
    assert (mirrored.origin, bundled.origin) == ("mirror", "bundle")
    assert bundled.texts == mirrored.texts and len(bundled.texts) == 2000  # same texts, same order
    assert bundled.fingerprint == mirrored.fingerprint
    assert torch.equal(second_moments(adapter, [1], params, progress=False)[1], from_mirror)


# -- hub copies converted to the file form ---------------------------------------------------------------------------

def test_wikitext_rows_convert_to_the_mirrors_paragraphs(no_mirror, tmp_path):
    lines = _mirror_text_lines("wikitext-2-test")
    rows = [{"text": f" {line.strip()} \n" if line.strip() else ""} for line in lines]  # the hub's line format
    path = materialise(dataset_spec("wikitext-2-test"), _hub_dataset(rows, None, tmp_path, "wikitext"))
    assert resolve("wikitext-2-test", Sample(12, 0)).origin == "bundle"  # the bundle still comes first
    assert TEXT_CORPORA["wikitext-2-test"].read(path) == TEXT_CORPORA["wikitext-2-test"].read(_mirror_path("wikitext-2-test"))


def test_glue_and_mmlu_rows_convert_to_the_mirrors_records(no_mirror, tmp_path):
    label = datasets.ClassLabel(names=["negative", "positive"])
    cases = {
        "mrpc": datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                                   "label": datasets.ClassLabel(names=["not_equivalent", "equivalent"]),
                                   "idx": datasets.Value("int32")}),
        "rte": datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["entailment", "not_entailment"]),
                                  "idx": datasets.Value("int32")}),
        "sst2": datasets.Features({"sentence": datasets.Value("string"), "label": label,
                                   "idx": datasets.Value("int32")}),
        "mmlu": datasets.Features({"question": datasets.Value("string"), "subject": datasets.Value("string"),
                                   "choices": datasets.Sequence(datasets.Value("string")),
                                   "answer": datasets.ClassLabel(names=["A", "B", "C", "D"])}),
    }
    for name, features in cases.items():
        records = _mirror_json_at(name)
        materialise(dataset_spec(name), _hub_dataset(records, features, tmp_path, name))
        if dataset_spec(name).bundle is None:
            assert resolve(name).origin == "hub"
        assert json.loads(hub_cache_path(dataset_spec(name)).read_text()) == records, name
    provenance = read_provenance(hub_cache_path(dataset_spec("mrpc")))
    assert provenance["repo"] == "nyu-mll/glue" and provenance["config"] == "mrpc" and len(provenance["sha256"]) == 64
    assert load_records(TASKS["mrpc"]) == _mirror_json_at("mrpc")  # the evaluation reads the hub copy


def test_rte_train_rows_become_the_nli_file_with_named_labels(no_mirror, tmp_path):
    records = _mirror_json_at("nli")
    names = ["entailment", "not_entailment"]
    rows = [{"sentence1": r["sentence1"], "sentence2": r["sentence2"], "label": names.index(r["label"]),
             "idx": int(r["index"])} for r in records]
    features = datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=names), "idx": datasets.Value("int32")})
    path = materialise(dataset_spec("nli"), _hub_dataset(rows, features, tmp_path, "nli"))
    assert json.loads(path.read_text()) == records


def test_counterfact_train_and_test_splits_become_one_file_in_case_order(no_mirror, tmp_path):
    records = _mirror_json_at("counterfact-1000")[:300]
    assert [r["case_id"] for r in records] == sorted(r["case_id"] for r in records)
    shuffled = random.Random(0).sample(records, len(records))
    train = _hub_dataset(shuffled[:250], None, tmp_path, "cf-train")
    test = _hub_dataset(shuffled[250:], None, tmp_path, "cf-test")
    path = materialise(dataset_spec("counterfact"), [*train, *test])
    assert resolve("counterfact").origin == "hub"
    assert json.loads(path.read_text()) == records
    assert main(["ingest", "counterfact", "--db", f"sqlite:///{tmp_path / 'l.db'}"]) == 2  # no ledger yet: one line


def test_wikipedia_articles_become_lead_records(no_mirror, tmp_path):
    rows = [{"id": "1", "url": "u", "title": "Alpha", "text": "Alpha is a letter.\n\nHistory\n\nIt is old."},
            {"id": "2", "url": "u", "title": "Empty", "text": "   "},
            {"id": "3", "url": "u", "title": "Beta", "text": "Beta is the second letter.\nIt follows alpha."}]
    path = materialise(dataset_spec("wikipedia-leads"), _hub_dataset(rows, None, tmp_path, "wiki"))
    assert TEXT_CORPORA["wikipedia-leads"].read(path) == ["Alpha is a letter.",
                                                          "Beta is the second letter.\nIt follows alpha."]
    assert resolve("wikipedia-leads").origin == "hub"  # all records: past the bundle's one sample


# -- seqedit data ----------------------------------------------------------------------------------------------------

def test_data_list_says_where_each_dataset_resolves(no_mirror, capsys):
    assert main(["data", "list", "--json"]) == 0
    rows = {row["dataset"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(catalog())
    assert rows["sst2"]["resolves"] == "bundle" and rows["sst2"]["records"] == 856
    assert rows["sst2"]["sha256"] == dataset_spec("sst2").sha256
    assert rows["wikipedia-leads"]["resolves"] == "bundle (sample n=2000 seed=0)"
    assert rows["wikipedia-leads"]["records"] == 2000
    assert rows["mrpc"]["resolves"] == "not here (hub: data fetch)" and rows["mrpc"]["records"] is None
    assert rows["counterfact-1000"]["resolves"] == "not here (mirror only)"


def test_data_verify_checks_every_local_copy_and_names_a_changed_one(no_mirror, tmp_path, capsys):
    assert main(["data", "verify"]) == 0
    assert "MISMATCH" not in capsys.readouterr().out
    records = [{"sentence1": "a", "sentence2": "b", "label": 1, "idx": 0}]
    path = materialise(dataset_spec("mrpc"), records)
    assert main(["data", "verify", "mrpc"]) == 0
    path.write_text(path.read_text().replace('"a"', '"A"'))  # the cached copy changed after it was fetched
    assert main(["data", "verify", "mrpc"]) == 1
    assert "mrpc" in (out := capsys.readouterr().out) and "MISMATCH" in out


def test_data_fetch_refuses_a_dataset_without_a_hub_copy(no_mirror, capsys):
    assert main(["data", "fetch", "counterfact-1000"]) == 2
    assert capsys.readouterr().err.strip() == ("seqedit data: error: dataset 'counterfact-1000' has no hub copy; "
                                               "it comes only from a mirror folder")


def _mirror_path(name: str) -> Path:
    """The mirror's file of ``name`` (looked up where the session found the mirror: tests here hide it)."""
    path = MIRROR / dataset_spec(name).file
    if not path.is_file():
        pytest.skip(f"dataset {name} not available (mirror, bundle, hub)")
    return path


def _mirror_json_at(name: str) -> list[dict]:
    return json.loads(_mirror_path(name).read_text(encoding="utf-8"))


def _mirror_text_lines(name: str) -> list[str]:
    return _mirror_path(name).read_text(encoding="utf-8").splitlines()


def test_the_catalog_pins_each_hub_copy_and_names_a_converter_for_it():
    from editing.data.convert import CONVERTERS

    for spec in catalog().values():
        if spec.hub is None:
            continue
        assert spec.hub.convert in CONVERTERS or (spec.hub.file and spec.hub.convert == "json_file"), spec.name
        assert len(spec.hub.revision) == 40 or spec.name == "zsre", spec.name  # a commit, not a branch
        assert spec.hub.split or spec.hub.file, spec.name
