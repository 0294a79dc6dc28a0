"""Studies end to end on a tiny random Llama: both modes, v* reuse, resume after SIGKILL, two workers.

The tiny model's metrics mean nothing; what is checked is the protocol: an independent arm scores every
fact once, right after its own batch's edit, each batch starting from the unedited model; a sequential arm
is a run; v* is computed once per fact and key, and the reused ``z`` is the one a fresh optimisation gives;
an arm killed mid-way resumes without redoing a batch and ends where an uninterrupted study ends.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from sqlalchemy import func, select

from db.engine import make_engine
from db.migrate import upgrade
from db.models import ArmBatchRecord, StudyArmRecord, VStarEntry
from db.studies import arm_scores_frame, find_study, study_arms
from db.tensors import tensors_from_bytes
from editing.delta import weight_sha256
from editing.v_star import compute_v_star
from flows.cli import main
from flows.model_session import ModelSession
from flows.studies.spec import expand, load_spec
from fixtures.data import counterfact_file
from fixtures.runs import SMALL_EVALUATION, TINY_EDIT

N_FACTS = 6


def _spec(model: str, **changes) -> dict:
    spec = {"name": "tiny", "facts": {"file": str(counterfact_file(40)), "start": 10, "stop": 30},
            "n_facts": N_FACTS, "mode": "independent",
            "settings": {"model": model, "hparams": "smollm2-135m", "evaluation_profile": "quick",
                         "evaluation_overrides": {**SMALL_EVALUATION, "generation_facts": 1, "max_new_tokens": 8},
                         "edit_overrides": {k: v for k, v in TINY_EDIT.items() if k != "layers"},
                         "health_checks": False, "eval_every": 0, "retention_sample": None},
            "grid": {"algorithm": ["memit", "emmet"], "layers": [[1, 2]], "batch_size": [3]}}
    spec.update(changes)
    return spec


def _write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# -- the spec --------------------------------------------------------------------------------------------------------
SHIPPED_SPECS = sorted((Path(__file__).resolve().parents[2] / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_SPECS, ids=[path.stem for path in SHIPPED_SPECS])
def test_every_shipped_spec_expands_into_arms_whose_settings_build(path: Path):
    """A shipped spec is a command in the README: a typo in an algorithm, a layer or an override key must fail
    here, not an hour into a study. ``load_spec`` builds every arm's edit configuration and refuses repeated arm
    names itself; the README's ``study report NAME`` lines need the name to be the file's."""
    spec = load_spec(path)
    assert spec.name == path.stem and spec.arms


def test_a_spec_expands_its_grid_and_arms_with_the_command_lines_overrides_last():
    spec = expand({"name": "s", "facts": {"file": "counterfact-1000", "start": 32, "stop": 999}, "n_facts": 8,
                   "settings": {"edit_overrides": {"values": {"steps": 3}}},
                   "grid": {"algorithm": ["memit", "emmet"], "layers": [[7], [3, 4, 5, 6, 7]]},
                   "arms": [{"name": "emmet-one", "algorithm": "emmet", "layers": [7], "overrides": {"values.steps": 9},
                             "n_facts": 16}]},
                  batch_sizes=[1, 4])
    names = [arm.name for arm in spec.arms]
    assert names[:4] == ["memit-L7-B1", "memit-L7-B4", "memit-L3-7-B1", "memit-L3-7-B4"]
    assert len(names) == 10 and spec.facts.source_name() == "counterfact-1000[32:999]"
    one_layer, spread = (spec.arms[0].run_settings().edit_config(), spec.arms[2].run_settings().edit_config())
    assert (one_layer.distribution, one_layer.layers) == ("single_layer", (7,))
    assert (spread.distribution, spread.layers) == ("memit_spread", (3, 4, 5, 6, 7))
    assert one_layer.values.steps == 3
    rome = [arm for arm in spec.arms if arm.name.startswith("emmet-one")]
    assert [arm.name for arm in rome] == ["emmet-one-B1", "emmet-one-B4"]
    assert [arm.settings["edit_overrides"]["values.steps"] for arm in rome] == [9, 9]  # the arm's entry wins
    assert [arm.settings["batch_size"] for arm in rome] == [1, 4]
    assert [arm.n_facts for arm in rome] == [16, 16] and spec.arms[0].n_facts == 8  # the arm's entry wins


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, "unknown key(s) colour"),
    ({"grid": {"algorithm": ["rome"], "batch_size": [4]}}, "arm rome-B4: rome edits at most 1 fact(s) at a time"),
    ({"grid": {"algorithm": ["memit"], "overrides": [{"values.stepz": 3}]}}, "unknown setting(s) values.stepz"),
    ({"n_facts": 0}, "n_facts must be at least 1"),
    ({"grid": {"algorithm": ["memit"]}, "arms": [{"algorithm": "memit"}]}, "arm names repeat: memit"),
])
def test_a_bad_spec_is_one_line_naming_the_field(tmp_path, change, message):
    spec = {"name": "s", "facts": "counterfact-1000", "n_facts": 4, "grid": {"algorithm": ["memit"]}, **change}
    with pytest.raises(ValueError) as error:
        load_spec(_write(tmp_path, spec))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_study_run_again_with_other_settings_is_refused_and_nothing_is_written(tmp_path):
    from flows.studies.runner import prepare_study

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    engine = make_engine(url)
    spec = _spec("some-model")
    study_id, arms = prepare_study(engine, expand(spec))
    assert prepare_study(engine, expand(spec)) == (study_id, arms)  # the same spec again: the same arms
    with pytest.raises(ValueError, match="arm\\(s\\) memit-L1-2-B3, emmet-L1-2-B3 with other settings"):
        prepare_study(engine, expand({**spec, "n_facts": 4}))
    assert study_arms(engine, study_id) == arms


# -- running ---------------------------------------------------------------------------------------------------------
def test_the_report_pairs_arms_that_differ_in_one_factor_and_batch_sizes_only_with_their_neighbours():
    from flows.studies.report import comparison_factor
    arm = {"algorithm": "emmet", "layers": (3, 4, 5, 6, 7), "distribution": None, "batch_size": 512, "mode":
           "independent", "n_facts": 2048, "seed": 0, "overrides": "[]"}
    sizes = {512, 1024, 2048}
    assert comparison_factor(arm, {**arm, "algorithm": "memit"}, sizes) == "objective"
    assert comparison_factor(arm, {**arm, "layers": (7,), "distribution": "single_layer"}, sizes) == "distribution"
    assert comparison_factor(arm, {**arm, "batch_size": 1024}, sizes) == "batch size"
    assert comparison_factor(arm, {**arm, "batch_size": 1024, "n_facts": 1024}, sizes) == "batch size"
    assert comparison_factor(arm, {**arm, "batch_size": 2048}, sizes) is None  # 1,024 lies between
    assert comparison_factor(arm, {**arm, "batch_size": 2048}, {512, 2048}) == "batch size"
    assert comparison_factor(arm, {**arm, "batch_size": 1024, "algorithm": "memit"}, sizes) is None
    assert comparison_factor(arm, {**arm, "layers": (7,), "batch_size": 1024}, sizes) is None
    assert comparison_factor(arm, {**arm, "overrides": "[('values.steps', '9')]"}, sizes) is None


def test_the_batch_scaling_figure_draws_a_metric_no_arm_measured_as_not_measured():
    """Facts of the reduced schema have no generation prompts, so no arm has a GE: the figure still draws (a log
    axis without data cannot be scaled), with the measured metrics plotted and GE marked as not measured."""
    from flows.studies.report import FIGURE_METRICS, batch_scaling_figure
    metrics = {name: {"mean": 0.9, "low": 0.85, "high": 0.95} for name in FIGURE_METRICS if name != "ge"}
    arms = [{"name": f"memit-B{size}", "mode": "independent", "progress": {"facts_scored": 8}, "metrics": metrics,
             "settings": {"algorithm": "memit", "batch_size": size, "edit_overrides": {"layers": [7]}}}
            for size in (1024, 2048)]
    figure = batch_scaling_figure({"study": "reduced", "arms": arms})
    titles = {axis.get_title(): axis for axis in figure.axes}
    assert [text.get_text() for text in titles["GE"].texts] == ["not measured"] and not titles["GE"].lines
    assert titles["ES"].get_xscale() == "log" and len(titles["ES"].lines) == 1
    figure.savefig(io.BytesIO(), format="png")


@pytest.fixture
def ledger(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    return url, make_engine(url)


def test_independent_and_sequential_arms_of_a_study(prefect_server, tiny_model_folder, ledger, tmp_path, capsys):
    url, engine = ledger
    spec = _spec(tiny_model_folder, grid={"algorithm": ["memit"], "layers": [[1, 2]], "batch_size": [3]},
                 arms=[{"name": "lifelong", "mode": "sequential", "algorithm": "memit", "layers": [1, 2],
                        "batch_size": 3, "eval_every": 1}])
    assert main(["study", "run", str(_write(tmp_path, spec)), "--db", url]) == 0
    study_id, _, source = find_study(engine, "tiny")
    independent, sequential = study_arms(engine, study_id)
    assert (independent.status, sequential.status) == ("done", "done")
    scores = arm_scores_frame(engine, independent.id)
    assert list(scores["seq"]) == [1, 1, 1, 2, 2, 2] and scores["fact_id"].is_unique
    assert scores["ge"].notna().sum() == 2  # generation_facts 1: the first fact of each batch
    from db.history import applied_count
    assert sequential.run_id is not None and applied_count(engine, sequential.run_id) == N_FACTS
    capsys.readouterr()
    assert main(["study", "report", "tiny", "--db", url, "--out", str(tmp_path / "report"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    arm = summary["arms"][0]
    assert set(arm) >= {"name", "settings", "n_facts", "v_star_key", "metrics"} and arm["n_facts"] == N_FACTS
    es = arm["metrics"]["es"]
    assert es["low"] <= es["mean"] <= es["high"] and es["mean"] == pytest.approx(scores["es"].mean())
    assert (summary["v_star"]["computed"], summary["v_star"]["reused"]) == (N_FACTS, 0)
    assert set(arm["memorization"]) == {"1", "2"} and all(share <= 1 for share in arm["memorization"].values())
    report = (tmp_path / "report" / "study-tiny.md").read_text()
    assert "written (least layer)" in report
    assert "| memit-L1-2-B3-independent |" in report and "| lifelong |" in report
    lifelong = summary["arms"][1]
    assert lifelong["progress"]["evaluated_at_batch"] == 2 and lifelong["metrics"]["es"]["low"] is not None
    assert (tmp_path / "report" / "study-tiny-batch-scaling.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "study-tiny-lifelong.png").is_file()
    assert main(["study", "run", str(_write(tmp_path, spec)), "--db", url]) == 0  # all done: nothing is redone
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(ArmBatchRecord)).scalar_one() == 2


def test_v_star_is_computed_once_per_fact_and_the_reused_z_is_a_fresh_optimisations(prefect_server,
                                                                                   tiny_model_folder, ledger,
                                                                                   tmp_path):
    url, engine = ledger
    assert main(["study", "run", str(_write(tmp_path, _spec(tiny_model_folder))), "--db", url]) == 0
    study_id, _, _ = find_study(engine, "tiny")
    memit, emmet = study_arms(engine, study_id)
    assert memit.v_star_key == emmet.v_star_key  # same model, last layer, v* settings and prefixes
    from db.studies import v_star_counts
    assert v_star_counts(engine, [memit.id]) == {"computed": N_FACTS, "reused": 0}
    assert v_star_counts(engine, [emmet.id]) == {"computed": 0, "reused": N_FACTS}
    with engine.connect() as connection:
        entries = connection.execute(select(VStarEntry.fact_id, VStarEntry.z).order_by(VStarEntry.fact_id)).all()
    assert len(entries) == N_FACTS
    session = ModelSession.get(tiny_model_folder)  # every batch was undone: this process holds the unedited model
    assert session.adapter.weights_sha256([1, 2]) == {layer: weight_sha256(weight)
                                                      for layer, weight in session.pristine([1, 2]).items()}
    # recomputed alone, in another batch composition (the last three facts in reverse order)
    from db.studies import source_facts
    facts = dict(source_facts(engine, find_study(engine, "tiny")[2]))
    from editing.config import EditConfig
    from flows.settings import RunSettings
    settings = RunSettings.from_dict({k: v for k, v in memit.settings.items() if k not in ("n_facts", "seed")})
    config: EditConfig = settings.edit_config(session.adapter.name)
    chosen = [fact_id for fact_id, _ in entries][::-1][:3]
    fresh = compute_v_star(session.adapter, [facts[i] for i in chosen], 2, ("",), config.values)
    kept = {fact_id: tensors_from_bytes(z)["z"] for fact_id, z in entries}
    for row, fact_id in enumerate(chosen):
        torch.testing.assert_close(kept[fact_id], fresh.z[row], rtol=1e-5, atol=1e-5)


def test_a_batch_whose_v_star_fails_midway_keeps_the_optimisations_it_finished(prefect_server, tiny_model_folder,
                                                                             ledger, tmp_path, monkeypatch):
    """v* is kept in chunks of STORE_EVERY facts: a batch that dies in its third chunk has stored two."""
    import flows.studies.v_star_reuse as reuse
    url, engine = ledger
    monkeypatch.setattr(reuse, "STORE_EVERY", 2)
    optimise, calls = reuse.compute_v_star, []

    def failing_third_time(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 3:
            raise RuntimeError("the machine went away")
        return optimise(*args, **kwargs)

    monkeypatch.setattr(reuse, "compute_v_star", failing_third_time)
    spec = _write(tmp_path, _spec(tiny_model_folder, grid={"algorithm": ["memit"], "layers": [[1, 2]],
                                                           "batch_size": [N_FACTS]}))
    with pytest.raises(RuntimeError, match="the machine went away"):
        main(["study", "run", str(spec), "--db", url])
    assert calls == [2, 2, 2]
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(VStarEntry)) == 4
    monkeypatch.setattr(reuse, "compute_v_star", optimise)
    assert main(["study", "run", str(spec), "--db", url]) == 0
    from db.studies import v_star_counts
    (arm,) = study_arms(engine, find_study(engine, "tiny")[0])
    assert v_star_counts(engine, [arm.id]) == {"computed": 2, "reused": 4}


def test_a_study_killed_mid_arm_resumes_without_redoing_a_batch(prefect_server, tiny_model_folder, tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    engine = make_engine(url)
    spec = _write(tmp_path, _spec(tiny_model_folder, n_facts=12, grid={"algorithm": ["memit"], "layers": [[1, 2]],
                                                                      "batch_size": [2]}))
    env = dict(os.environ, PREFECT_API_URL=prefect_server, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "flows.cli", "study", "run", str(spec), "--db", url]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while _batches(engine) < 2:
            assert process.poll() is None, "the study ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    with engine.connect() as connection:
        before = dict(connection.execute(select(ArmBatchRecord.seq, ArmBatchRecord.id)).all())
        assert connection.execute(select(StudyArmRecord.status)).scalar_one() == "running"  # died, not failed
    assert 2 <= len(before) < 6
    assert subprocess.run(command, env=env, capture_output=True, timeout=600).returncode == 0
    with engine.connect() as connection:
        after = dict(connection.execute(select(ArmBatchRecord.seq, ArmBatchRecord.id)).all())
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    assert {seq: after[seq] for seq in before} == before  # the batches it had were kept, not redone
    resumed = arm_scores_frame(engine, study_arms(engine, 1)[0].id)
    # an uninterrupted study of the same arm, in this process, scores every fact the same
    other = f"sqlite:///{tmp_path / 'other.db'}"
    upgrade(other)
    from flows.studies.runner import prepare_study, run_study
    other_engine = make_engine(other)
    study_id, _ = prepare_study(other_engine, load_spec(spec))
    run_study(study_id, db_url=other)
    uninterrupted = arm_scores_frame(other_engine, study_arms(other_engine, study_id)[0].id)
    assert resumed.drop(columns="fact_id").round(6).equals(uninterrupted.drop(columns="fact_id").round(6))


def _batches(engine) -> int:
    try:
        with engine.connect() as connection:
            return connection.execute(select(func.count()).select_from(ArmBatchRecord)).scalar_one()
    except Exception:  # the ledger is being written by the study: ask again
        return 0


def test_a_studys_two_arms_run_on_two_workers_of_a_process_pool(prefect_server, tiny_model_folder, ledger, tmp_path):
    from flows.commands.deploy_evaluator import deploy_flow
    from flows.local_prefect import start_worker, stop_process_group
    from flows.studies.runner import prepare_study, run_study, study_arm

    url, engine = ledger
    pool = f"study-test-{os.getpid()}"
    deployment = deploy_flow(study_arm, pool, "tiny-study", "test", ["seqedit"])
    env = dict(os.environ, PREFECT_API_URL=prefect_server, PREFECT_WORKER_QUERY_SECONDS="1",
               PREFECT_WORKER_PREFETCH_SECONDS="1", OMP_NUM_THREADS="1")
    workers = [start_worker(pool, env, tmp_path / f"worker-{index}.log", limit=1) for index in range(2)]
    try:
        study_id, _ = prepare_study(engine, load_spec(_write(tmp_path, _spec(tiny_model_folder))))
        outcome = run_study(study_id, db_url=url, deployment=deployment, poll_s=0.5)
    finally:
        for worker in workers:
            stop_process_group(worker)
    assert outcome["arms"] == {"memit-L1-2-B3": "done", "emmet-L1-2-B3": "done"}
    arms = study_arms(engine, study_id)
    parents = {int(arm.worker.rsplit(":", 1)[1]) for arm in arms}
    assert parents == {worker.pid for worker in workers}  # one arm on each worker
    assert len({arm.v_star_key for arm in arms}) == 1
    assert all(len(arm_scores_frame(engine, arm.id)) == N_FACTS for arm in arms)


def test_an_arm_another_process_runs_is_refused_at_once(prefect_server, tiny_model_folder, ledger, tmp_path):
    from db.errors import RunLockedError
    from db.locks import writer_lock
    from flows.studies.runner import prepare_study, study_arm

    url, engine = ledger
    _, arms = prepare_study(engine, load_spec(_write(tmp_path, _spec(tiny_model_folder))))
    held = writer_lock(engine, arms[0].id, subject="arm")
    held.acquire()  # as the process running the arm holds it
    try:
        with pytest.raises(RunLockedError, match=f"arm {arms[0].id} already has a writer"):
            study_arm(arms[0].id, url)
    finally:
        held.release()
    assert study_arms(engine, arms[0].study_id)[0].status == "pending"  # nothing was started or recorded
