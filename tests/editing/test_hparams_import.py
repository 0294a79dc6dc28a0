"""``--hparams-from``: the authors' own hparams files (tests/data/hparams, sources in its README), read as they are,
give the settings of seqedit's reference hparams file for that model; what cannot be mapped is refused by name."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from editing.config import flatten, load_edit_config
from editing.hparams_import import HparamsImportError, import_hparams
from flows.cli import main

DATA = Path(__file__).resolve().parents[1] / "data" / "hparams"


def _settings(config) -> dict:
    return dataclasses.asdict(config)


@pytest.mark.parametrize("file, algorithm, model, differs", [
    # seqedit's reference files compute C0 on 10,000 texts where the references use 100,000 (a deliberate
    # saving, docs/math.md "Reference hyperparameters"): that one setting differs, nothing else.
    ("easyedit-MEMIT-llama-7b.yaml", None, "llama-2-7b", {"stats.n_samples"}),
    ("memit-MEMIT-EleutherAI_gpt-j-6B.json", "memit", "gpt-j-6b", {"stats.n_samples"}),
    ("alphaedit-AlphaEdit-Llama3-8B.json", "alphaedit", "llama-3-8b", set()),
    ("encore-ENCORE-llama3-8b.json", "encore", "llama-3-8b", set()),
])
def test_a_published_file_gives_seqedits_reference_settings(file, algorithm, model, differs):
    imported = import_hparams(DATA / file, algorithm)
    method = imported.algorithm
    assert method == (algorithm or "memit")
    ours = _settings(load_edit_config(model, method))
    theirs = _settings(load_edit_config(model, method, imported.overrides))
    ours, theirs = flatten(ours), flatten(theirs)
    different = {key for key in ours if ours[key] != theirs.get(key)}
    assert different == differs, {key: (ours[key], theirs[key]) for key in different}
    assert imported.overrides["values.lr"] == theirs["values.lr"]


def test_an_unknown_key_or_an_unmappable_value_is_refused_by_name(tmp_path):
    base = json.loads((DATA / "memit-MEMIT-EleutherAI_gpt-j-6B.json").read_text())
    cases = {"v_prob_threshold": (0.9, "unknown key(s) v_prob_threshold"),
             "fact_token": ("last", "fact_token: 'last' is not supported"),
             "context_template_length_params": ([[5, 10], [10, 10]], "prefixes of several lengths"),
             "rewrite_module_tmp": ("model.layers.{}.mlp.up_proj", "rewrite_module_tmp")}
    for key, (value, message) in cases.items():
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps({**base, key: value}))
        with pytest.raises(HparamsImportError, match=re.escape(message)):
            import_hparams(path, "memit")


def test_seqedit_run_takes_a_reference_file_as_it_is(tiny_model_folder, tmp_path, prefect_server, capsys):
    """An EasyEdit MEMIT file for the tiny model's two layers: the run records the file's settings."""
    from db.engine import make_engine
    from db.runs import get_run
    from fixtures.runs import new_tiny_ledger

    url, engine = new_tiny_ledger(tmp_path, 4)
    text = (DATA / "easyedit-MEMIT-llama-7b.yaml").read_text()
    text = text.replace("layers: [4, 5, 6, 7, 8]", "layers: [1, 2]").replace("v_loss_layer: 31", "v_loss_layer: 3")
    text = text.replace("mom2_n_samples: 100000", "mom2_n_samples: 40").replace("v_num_grad_steps: 25",
                                                                                "v_num_grad_steps: 3")
    path = tmp_path / "memit-tiny.yaml"
    path.write_text(text)
    assert main(["run", "--db", url, "--hparams-from", str(path), "--model", tiny_model_folder, "--hparams",
                 "smollm2-135m", "--set", "values.n_prefixes=0", "--set", "stats.corpus=wikitext-2-valid",
                 "--batch-size", "4", "--eval-every", "0", "--no-health-checks", "--source", "cf", "--json"]) == 0
    outcome = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    edit = get_run(make_engine(url), outcome["run_id"]).spec.hyperparameters["edit"]
    assert edit["algorithm"] == "memit" and list(edit["layers"]) == [1, 2]
    assert edit["values"]["clamp_norm_factor"] == 4 and edit["values"]["weight_decay"] == 1e-3
    assert edit["values"]["steps"] == 3 and edit["objective"]["mom2_update_weight"] == 15000
    assert edit["stats"]["n_samples"] == 40 and edit["stats"]["corpus"] == "wikitext-2-valid"  # --set wins
