"""Causal tracing: the restorations whose outcome is known without tracing, and ``seqedit trace`` end to end.

Known outcomes: the last block's output at the last token *is* what the prediction is read from, so restoring
it gives back p(clean) exactly, and restoring the last block's output at any other token gives p(corrupted)
exactly (no later layer reads it); without noise, every restoration gives p(clean)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from editing.causal_trace import TraceFact, TraceSettings, knows, suggest_layers, trace_fact, trace_facts
from editing.config import load_edit_config
from flows.cli import main

FACT = TraceFact("The Eiffel Tower is located in the city of", "The Eiffel Tower")


@pytest.mark.smollm
def test_restoring_the_last_blocks_output_gives_back_exactly_what_it_should(smollm2):
    last = smollm2.n_layers - 1
    trace = trace_fact(smollm2, FACT, TraceSettings(samples=3, kinds=("hidden",), layers=(last,)))
    assert trace.answer_token.strip() == "Paris" and trace.p_clean > 0.3
    assert trace.p_corrupted < trace.p_clean
    row = trace.restored["hidden"][last]
    assert row[-1] == pytest.approx(trace.p_clean, abs=1e-5)
    first = trace.roles.index(0)
    np.testing.assert_allclose(row[first:-1], trace.p_corrupted, atol=1e-5)
    assert np.isnan(trace.restored["hidden"][0]).all()  # a layer not traced stays unmeasured
    # the facts traced by default are those the model knows: its top prediction starts the answer
    assert knows(smollm2, TraceFact(FACT.prompt, FACT.subject, "Paris"))
    assert not knows(smollm2, TraceFact(FACT.prompt, FACT.subject, "Rome"))


def test_without_noise_every_restoration_is_the_clean_run(tiny_model):
    adapter = tiny_model("llama")
    summary = trace_facts(adapter, [FACT], TraceSettings(samples=2, noise=0.0, window=2), progress=False)
    trace = summary.traces[0]
    assert trace.p_corrupted == pytest.approx(trace.p_clean, abs=1e-6)
    for kind in ("hidden", "mlp", "attn"):
        np.testing.assert_allclose(trace.restored[kind], trace.p_clean, atol=1e-6)
        np.testing.assert_allclose(summary.effect[kind], 0.0, atol=1e-6)


def test_the_window_is_the_largest_summed_mlp_effect_at_the_last_subject_token(tiny_model):
    summary = trace_facts(tiny_model("llama", n_layers=6), [FACT], TraceSettings(samples=2, window=2), progress=False)
    curve = summary.effect["mlp"][:, 2]
    window = suggest_layers(summary, 3)
    sums = [curve[start:start + 3].sum() for start in range(4)]
    assert window == tuple(range(int(np.argmax(sums)), int(np.argmax(sums)) + 3))


def test_seqedit_trace_writes_the_heatmap_the_tables_and_a_usable_hparams_file(tiny_model_folder, tmp_path, capsys):
    out = tmp_path / "trace"
    assert main(["trace", "--model", tiny_model_folder, "--all-facts", "--limit", "2", "--samples", "2", "--window", "2",
                 "--width", "2", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "2 facts of known_1000.json" in printed and "suggested edit window" in printed
    document = json.loads((out / "trace.json").read_text())
    assert document["n_facts"] == 2 and len(document["indirect_effect"]["mlp"]) == 4
    assert len(document["suggested_layers"]) == 2
    assert (out / "trace.png").stat().st_size > 10_000
    hparams = next(out.glob("*-traced.yaml"))
    config = load_edit_config(str(hparams), "memit")
    assert list(config.layers) == document["suggested_layers"]
    assert list(load_edit_config(str(hparams), "rome").layers) == [document["peak_layer"]]
