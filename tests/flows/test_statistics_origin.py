"""C0 describes the model as loaded, whatever state a flow has put it in.

A resumed run and an ``evaluate`` flow restore a run's edited weights from the
ledger; on a machine whose statistics cache is empty (another Prefect worker, a
cleared cache) they then need ``C0``. It must come out bit for bit what it is
for the original model: computed on the edited model it would describe the
edits' keys and be cached under the original model's fingerprint for every
later run. With the run editing layers 3 and 4, layer 4's keys depend on the
edit of layer 3, so a C0 taken from the edited model differs.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from db.engine import make_engine
from db.migrate import upgrade
from editing.config import EditConfig, hparams_key_for, load_edit_config
from editing.corpus import open_corpus
from editing.stats import SAMPLE_SEED, stats_path
from flows.model_session import ModelSession
from flows.pipeline import evaluate_run, sequential_edit
from fixtures.runs import fast_settings, ingest_counterfact

pytestmark = pytest.mark.usefixtures("prefect_server")


def _cached_c0(adapter, config: EditConfig) -> dict[int, object]:
    corpus = open_corpus(config.stats.corpus, config.stats.n_samples, SAMPLE_SEED)  # what the cache key hashes
    return {layer: stats_path(adapter, layer, corpus, config.stats) for layer in config.layers}


def test_resume_and_evaluate_with_an_empty_cache_reproduce_the_original_c0(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    engine = make_engine(url)
    ingest_counterfact(engine)
    settings = fast_settings(limit=16, eval_every=0, fact_pool="private",
                             edit_overrides={**fast_settings().edit_overrides, "stats.n_samples": 120})
    adapter = ModelSession.get(settings.model).adapter
    adapter.restore(adapter.original_weights(adapter.touched_layers()))  # whatever earlier tests left
    config = load_edit_config(hparams_key_for(adapter.name), settings.algorithm, settings.edit_overrides)
    paths = _cached_c0(adapter, config)
    for path in paths.values():
        path.unlink(missing_ok=True)

    outcome = sequential_edit(settings=settings.to_dict(), db_url=url)  # computes C0 on the loaded model
    assert outcome["seq"] == 2
    original = {layer: load_file(path)["c0"] for layer, path in paths.items()}

    for reopen in (lambda: sequential_edit(run_id=outcome["run_id"], db_url=url),   # resume: nothing left to edit
                   lambda: evaluate_run(run_id=outcome["run_id"], seq=2, db_url=url)):
        for path in paths.values():
            path.unlink()
        reopen()  # restores batch 2's weights, then needs C0
        assert adapter.weights_sha256(list(config.layers)) == outcome["weights_sha256"]
        for layer, path in paths.items():
            assert torch.equal(load_file(path)["c0"], original[layer]), f"C0 of layer {layer} changed"

