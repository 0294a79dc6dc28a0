"""Soak: 10,000 edits through the real pipeline, SIGKILLed again and again, and a ledger that survives it.

    OMP_NUM_THREADS=1 .venv/bin/python bench/soak.py [--edits 10000] [--kills 20] [--batch-size 10]
        [--seed 0] [--db URL] [--postgres URL] [--keep] [--json] [--workdir DIR]

What it does:

* builds a tiny randomly initialised Llama (4 layers, hidden 64, seeded) with SmolLM2's tokenizer and saves it
  as a Hugging Face folder;
* creates a fresh schema in the PostgreSQL database (default ``test`` on 127.0.0.1:5432; ``--db URL`` uses any
  ledger, SQLite included), runs ``seqedit init`` and ingests the two EasyEdit CounterFact files
  (9,788 + 9,791 records) under one source with ``seqedit ingest``;
* starts one ``prefect server start`` for the whole soak (temporary ``PREFECT_HOME``, SQLite, analytics off)
  and points every worker at it;
* runs ``seqedit run --model <folder> --hparams smollm2-135m --layers 1,2 --set values.steps=2
  --set values.n_prefixes=0 --set stats.n_samples=64 --eval-every 0 --checkpoint-every 50 --pool private
  --source soak --limit EDITS`` (health checks off through ``--config``) and then ``seqedit run --resume RUN_ID``,
  killing the worker with SIGKILL ``--kills`` times at seeded random points in seven ways: from outside during
  the start-up (model load and restore from the ledger), during v*, at a random moment of a batch, right
  after a commit is seen, and from inside with ``SEQEDIT_FAILPOINT`` during the solve, before the commit and
  right after the commit; after each kill it checks the ledger (contiguous applied batches, at most one batch
  in progress, and the state each failpoint implies), and that a batch left in progress is later committed
  with the same facts;
* once the run has applied ``--edits`` facts, verifies (1) that every applied batch's hashes replay from the
  origin without checkpoints, that every stored checkpoint equals the replay (``torch.equal``), that
  ``db.replay.weights_at(n)`` (nearest checkpoint, hash-verified) works for every n and equals the origin
  replay at sampled n, and that the last worker's live weights have the hashes of ``weights_at(last)``;
  (2) that the applied batches hold exactly the first K facts of the source in id order, each once, with no
  batch in progress or failed and no batch row doubled; (3) ten rollbacks to decreasing random points, each
  checked (weights, head, later batches marked), then one resume that must redo the next batches with the
  same facts and the same hashes as before the rollbacks; (4) the ledger's size per 1,000 edits and the
  restore time against history length with and without checkpoints; (5) kills, edits and times.

Prints a table (stdout), or with ``--json`` one JSON object on stdout and the table on stderr. Any worker that
ends other than by the planned SIGKILL (or, for the last one, by completing the run) stops the soak with its
output and exit code 1; a failed check exits 1 after the report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from soak_helpers import (DEFAULT_POSTGRES, HISTORY_TABLES, ROOT, LedgerState, batch_estimates, batch_hashes,
                          batch_rows, build_tiny_llama, check_chain, editable_count, expected_fact_ids,
                          last_json_line, ledger_size, ledger_state, max_run_id, median, newest_run,
                          replay_from_origin, scratch_ledger, seqedit_command, tail)
from flows.local_prefect import prefect_server

COUNTERFACT = ROOT.parent / "shared" / "data" / "counterfact"
FACT_FILES = ("counterfact-easyedit-edit.json", "counterfact-easyedit-train.json")
KILL_MODES = ("startup", "v_star", "random", "after_commit_seen", "fp:during_solve", "fp:before_commit",
              "fp:after_commit")
"""How a worker is killed. ``startup``: SIGKILL at a random moment between launch and its first batch (imports,
model load, restore from the ledger); ``v_star``: SIGKILL a random fraction of v* into batch S; ``random``:
SIGKILL a random fraction of a batch period after batch S−1 is committed (any phase); ``after_commit_seen``:
SIGKILL as soon as batch S is seen committed (the next claim, or the idle moment after the commit);
``fp:*``: the worker kills itself at that failpoint of batch S (``SEQEDIT_FAILPOINT=point:S``)."""
POLL_S = 0.02
ROLLBACKS = 10
RESTORE_POINTS = (10, 99, 100, 999, 1000)
"""History lengths whose restore is timed (and the last batch): with a checkpoint every 50 batches, 99 and 999
replay 49 deltas from the nearest checkpoint, 100 and 1000 none."""


class SoakFailure(RuntimeError):
    """A worker ended in a way the soak did not plan: the ledger or the pipeline misbehaved."""


@dataclass
class Worker:
    index: int
    mode: str | None
    target_seq: int | None
    resume: bool
    started_at: float = 0.0
    first_progress_s: float | None = None
    ended_s: float = 0.0
    returncode: int | None = None
    state_before: LedgerState | None = None
    state_after: LedgerState | None = None
    killed_by_us: bool = False
    note: str = ""
    planned_kill: bool = False
    """One of the soak's ``--kills`` (not the final worker, not the resume after the rollbacks)."""


@dataclass
class Soak:
    args: argparse.Namespace
    workdir: Path
    url: str
    engine: object
    api_url: str
    model_dir: Path
    config: Path
    rng: random.Random
    run_id: int | None = None
    workers: list[Worker] = field(default_factory=list)
    redo_checks: dict[int, tuple[int, tuple[int, ...]]] = field(default_factory=dict)
    """batch id left in progress by a kill → (seq, its facts); must end applied with the same facts."""
    redone: int = 0
    period_s: float = 0.4
    v_star_s: float = 0.2
    startup_s: float = 10.0

    # -- workers ------------------------------------------------------------------------------------------------
    def command(self, resume: bool) -> list[str]:
        base = seqedit_command() + ["run", "--db", self.url, "--json"]
        if resume:
            return base + ["--resume", str(self.run_id)]
        a = self.args
        return base + ["--config", str(self.config), "--model", str(self.model_dir), "--hparams", "smollm2-135m",
                       "--layers", "1,2", "--set", "values.steps=2", "--set", "values.n_prefixes=0",
                       "--set", "stats.n_samples=64", "--batch-size", str(a.batch_size), "--eval-every", "0",
                       "--checkpoint-every", str(a.checkpoint_every), "--pool", "private", "--source", a.source,
                       "--limit", str(a.edits), "--threads", str(a.threads), "--name", "soak"]

    def env(self, failpoint: str | None) -> dict[str, str]:
        env = dict(os.environ, PREFECT_API_URL=self.api_url, PREFECT_HOME=str(self.workdir / "prefect"),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false",
                   OMP_NUM_THREADS=str(self.args.threads), MKL_NUM_THREADS=str(self.args.threads),
                   SEQEDIT_CACHE=str(self.workdir / "cache"))
        env.pop("SEQEDIT_FAILPOINT", None)
        if failpoint:
            env["SEQEDIT_FAILPOINT"] = failpoint
        return env

    def launch(self, worker: Worker) -> tuple[subprocess.Popen, Path]:
        failpoint = None
        if worker.mode and worker.mode.startswith("fp:"):
            failpoint = f"{worker.mode[3:]}:{worker.target_seq}"
        log_path = self.workdir / "logs" / f"worker-{worker.index:03d}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("w") as log:
            process = subprocess.Popen(self.command(worker.resume), cwd=ROOT, env=self.env(failpoint), stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        worker.started_at = time.monotonic()
        return process, log_path

    def state(self) -> LedgerState:
        return ledger_state(self.engine, self.run_id) if self.run_id is not None else LedgerState(0, 0, None, 0, 0, 0)

    def run_worker(self, worker: Worker, timeout_s: float) -> str:
        """Run one worker, killing it as its mode says; returns its output."""
        known_runs = max_run_id(self.engine) if self.run_id is None else None
        worker.state_before = self.state()
        process, log_path = self.launch(worker)
        start_state = worker.state_before
        trigger_at: float | None = None
        if worker.mode == "startup":
            trigger_at = worker.started_at + self.rng.uniform(0.5, max(1.0, self.startup_s))
        external = worker.mode is not None and not worker.mode.startswith("fp:")
        try:
            self.watch(worker, process, log_path, start_state, known_runs, trigger_at, external, timeout_s)
        except BaseException:  # the soak itself failed or was interrupted: leave no worker behind
            self.kill(process)
            process.wait()
            raise
        process.wait()
        worker.returncode = process.returncode
        worker.ended_s = time.monotonic() - worker.started_at
        if self.run_id is None:
            self.run_id = newest_run(self.engine, known_runs)
        worker.state_after = self.state()
        return log_path.read_text()

    def watch(self, worker: Worker, process: subprocess.Popen, log_path: Path, start_state: LedgerState,
              known_runs: int | None, trigger_at: float | None, external: bool, timeout_s: float) -> None:
        """Poll the ledger while the worker runs; SIGKILL it when its kill is due."""
        while process.poll() is None:
            now = time.monotonic()
            if now - worker.started_at > timeout_s:
                self.kill(process)
                raise SoakFailure(f"worker {worker.index} ran past {timeout_s:.0f} s:\n{tail(log_path.read_text())}")
            if self.run_id is None:
                self.run_id = newest_run(self.engine, known_runs)
            if self.run_id is not None:
                state = self.state()
                if worker.first_progress_s is None and (state.head, state.in_progress) != (
                        start_state.head, start_state.in_progress):
                    worker.first_progress_s = now - worker.started_at
                if external and trigger_at is None:
                    trigger_at = self.trigger(worker, state, now)
            if trigger_at is not None and now >= trigger_at:
                self.kill(process)
                worker.killed_by_us = True
                return
            time.sleep(POLL_S)

    def trigger(self, worker: Worker, state: LedgerState, now: float) -> float | None:
        """When to SIGKILL (monotonic time), once the worker's ledger state calls for it."""
        target = worker.target_seq
        if worker.mode == "v_star":
            if state.in_progress == target:
                return now + self.rng.uniform(0.0, 0.9 * self.v_star_s)
            if state.head >= target:  # the claim went by between two polls: kill now, wherever it is
                worker.note = "claim not seen"
                return now
        elif worker.mode == "random":
            if state.head >= target - 1:
                return now + self.rng.uniform(0.0, self.period_s)
        elif worker.mode == "after_commit_seen":
            if state.head >= target:
                return now
        return None

    @staticmethod
    def kill(process: subprocess.Popen) -> None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # -- checks after each worker ----------------------------------------------------------------------------
    def check_after_kill(self, worker: Worker, output: str) -> None:
        if worker.returncode != -signal.SIGKILL:
            raise SoakFailure(f"worker {worker.index} ({worker.mode} at batch {worker.target_seq}) exited with "
                              f"{worker.returncode}, not by SIGKILL:\n{tail(output)}")
        state = worker.state_after
        if state.applied != state.head:
            raise SoakFailure(f"after worker {worker.index}: applied batches are not 1..{state.head} "
                              f"({state.applied} applied)")
        if state.in_progress_count > 1 or (state.in_progress is not None and state.in_progress != state.head + 1):
            raise SoakFailure(f"after worker {worker.index}: in-progress batch {state.in_progress} "
                              f"(count {state.in_progress_count}) with head {state.head}")
        if state.failed:
            raise SoakFailure(f"after worker {worker.index}: {state.failed} failed batches")
        target = worker.target_seq
        expected = {"fp:during_solve": (target - 1, target), "fp:before_commit": (target - 1, target),
                    "fp:after_commit": (target, None)}.get(worker.mode)
        if expected is not None and (state.head, state.in_progress) != expected:
            raise SoakFailure(f"worker {worker.index} killed at {worker.mode}:{target} left head {state.head}, "
                              f"in progress {state.in_progress}; expected {expected}")
        self.check_redone()
        if state.in_progress is not None:
            for batch_id, seq, status, facts in batch_rows(self.engine, self.run_id):
                if status == "in_progress":
                    self.redo_checks.setdefault(batch_id, (seq, facts))

    def check_redone(self) -> None:
        """Batches a kill left in progress must be committed later as the same row with the same facts."""
        if not self.redo_checks:
            return
        rows = {batch_id: (seq, status, facts) for batch_id, seq, status, facts in batch_rows(self.engine, self.run_id)}
        for batch_id, (seq, facts) in list(self.redo_checks.items()):
            now_seq, status, now_facts = rows[batch_id]
            if status == "in_progress":
                continue
            if status != "applied" or now_seq != seq or now_facts != facts:
                raise SoakFailure(f"batch {batch_id} (seq {seq}) left in progress by a kill ended {status} at seq "
                                  f"{now_seq} with {'the same' if now_facts == facts else 'other'} facts")
            del self.redo_checks[batch_id]
            self.redone += 1

    def update_estimates(self, worker: Worker) -> None:
        if worker.first_progress_s is not None:
            self.startup_s = worker.first_progress_s
        period, v_star = batch_estimates(self.engine, self.run_id)
        if period:
            self.period_s = period
        if v_star:
            self.v_star_s = v_star


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def run_cli(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(seqedit_command() + args, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SoakFailure(f"seqedit {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def plan_kills(rng: random.Random, kills: int, batches: int) -> list[tuple[str, int]]:
    """(mode, target batch) per kill: every mode about equally often, targets increasing over the run."""
    margin = 3
    if batches - 2 * margin < kills:
        raise SystemExit(f"{kills} kills need more than {kills + 2 * margin} batches; got {batches}: raise --edits")
    targets = sorted(rng.sample(range(margin, batches - margin), kills))
    modes = []
    while len(modes) < kills:
        round_ = list(KILL_MODES)
        rng.shuffle(round_)
        modes.extend(round_)
    modes = modes[:kills]
    if modes[0] == "startup":  # the first worker creates the run: kill it once there is something to kill
        swap = next(i for i, mode in enumerate(modes) if mode != "startup")
        modes[0], modes[swap] = modes[swap], modes[0]
    return list(zip(modes, targets))


def soak_loop(soak: Soak, plan: list[tuple[str, int]], batches: int) -> dict:
    started = time.monotonic()
    for number, (mode, target) in enumerate(plan, start=1):
        resume = soak.run_id is not None
        head = soak.state().head
        effective = max(target, head + 2)
        worker = Worker(len(soak.workers) + 1, mode, effective, resume, planned_kill=True)
        soak.workers.append(worker)
        timeout = 300 + 10 * soak.period_s * max(1, effective - head)
        output = soak.run_worker(worker, timeout)
        if worker.returncode == 0:
            raise SoakFailure(f"worker {worker.index} completed the run before kill {number} ({mode} at batch "
                              f"{effective}):\n{tail(output)}")
        soak.check_after_kill(worker, output)
        soak.update_estimates(worker)
        after = worker.state_after
        say(f"kill {number:3d}/{len(plan)}  worker {worker.index:3d} {'resume' if resume else 'new   '} "
            f"{mode:<18} target {effective:5d}  ran {worker.ended_s:6.1f} s  -> head {after.head:5d}"
            f"{'' if after.in_progress is None else f', batch {after.in_progress} in progress'}"
            f"{'  (' + worker.note + ')' if worker.note else ''}")
    # the last worker finishes the run
    worker = Worker(len(soak.workers) + 1, None, None, soak.run_id is not None)
    soak.workers.append(worker)
    output = soak.run_worker(worker, 600 + 10 * soak.period_s * batches)
    if worker.returncode != 0:
        raise SoakFailure(f"the final worker {worker.index} exited with {worker.returncode}:\n{tail(output)}")
    outcome = last_json_line(output)
    if outcome is None or outcome.get("status") != "completed":
        raise SoakFailure(f"the final worker did not complete the run ({outcome}):\n{tail(output)}")
    soak.check_redone()
    say(f"final  worker {worker.index:3d} resume ran {worker.ended_s:6.1f} s -> {outcome['status']} at batch "
        f"{outcome['seq']}")
    return {"outcome": outcome, "seconds": time.monotonic() - started}


# -- the checks once the run is complete -----------------------------------------------------------------------
def timed(function, *args, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function(*args)
        times.append(time.perf_counter() - started)
    return min(times)


def verify(soak: Soak, outcome: dict, failures: list[str]) -> dict:
    from db.errors import BatchStateError
    from db.ledger import acquire_writer
    from db.replay import last_applied_seq, weights_at
    from editing.delta import weight_sha256

    args, engine, run_id, rng = soak.args, soak.engine, soak.run_id, soak.rng
    result: dict = {}
    state = soak.state()
    head = state.head
    expected_batches = math.ceil(args.edits / args.batch_size)

    # (2) facts: the first K of the source, in id order, each once; nothing in progress, failed or doubled
    rows = batch_rows(engine, run_id)
    applied = sorted((seq, facts) for _, seq, status, facts in rows if status == "applied")
    fact_ids = [fact for _, facts in applied for fact in facts]
    expected = expected_fact_ids(engine, args.source, args.edits)
    facts = {"applied_batches": len(applied), "batch_rows": len(rows), "applied_facts": len(fact_ids),
             "distinct_facts": len(set(fact_ids)), "in_progress": state.in_progress_count, "failed": state.failed,
             "first_k_in_id_order": fact_ids == expected, "crashed_batches_redone_same_facts": soak.redone}
    result["facts"] = facts
    if fact_ids != expected:
        missing = sorted(set(expected) - set(fact_ids))[:10]
        extra = sorted(set(fact_ids) - set(expected))[:10]
        failures.append(f"applied facts are not the first {args.edits} of the source in id order "
                        f"(missing e.g. {missing}, unexpected e.g. {extra})")
    if len(fact_ids) != len(set(fact_ids)):
        failures.append(f"{len(fact_ids) - len(set(fact_ids))} facts applied more than once")
    if (len(applied), len(rows), head) != (expected_batches,) * 3 or [s for s, _ in applied] != list(
            range(1, head + 1)):
        failures.append(f"{len(applied)} applied batches, {len(rows)} batch rows, head {head}: expected "
                        f"{expected_batches} of each (no batch lost or doubled)")
    if state.in_progress_count or state.failed or soak.redo_checks:
        failures.append(f"{state.in_progress_count} batches in progress, {state.failed} failed, "
                        f"{len(soak.redo_checks)} crashed batches never committed")

    # (4a) size, before any rollback
    sizes = ledger_size(engine)
    total = sum(sizes.values())
    history = sum(size for name, size in sizes.items() if name in HISTORY_TABLES)
    per_thousand = 1000 / max(1, len(fact_ids))
    result["size"] = {"tables_bytes": sizes, "total_mb": total / 1e6, "history_mb": history / 1e6,
                      "facts_table_mb": sizes.get("facts", 0) / 1e6,
                      "history_mb_per_1000_edits": history / 1e6 * per_thousand,
                      "total_mb_per_1000_edits": total / 1e6 * per_thousand}

    # (1) replay: from the origin without checkpoints (every batch's hashes, every checkpoint), weights_at for
    # every n, torch.equal at sampled n, the live weights of the last worker
    rollback_points = sorted(rng.sample(range(1, head), min(ROLLBACKS, head - 1)), reverse=True)
    sample = set(rng.sample(range(1, head + 1), min(args.replay_sample, head))) | {0, head} | set(rollback_points)
    chain = check_chain(engine, run_id, head, keep=sample)
    if chain.hash_mismatches or chain.checkpoint_mismatches or chain.batches != head:
        failures.append(f"origin replay: {len(chain.hash_mismatches)} hash mismatches (e.g. "
                        f"{chain.hash_mismatches[:5]}), {len(chain.checkpoint_mismatches)} checkpoint mismatches, "
                        f"{chain.batches} batches for head {head}")
    started = time.perf_counter()
    weights_at_failures, equal_checked, unequal = [], 0, []
    for n in range(head + 1):
        try:
            weights = weights_at(engine, run_id, n)
        except Exception as error:  # noqa: BLE001 — reported, not hidden
            weights_at_failures.append(f"{n}: {error}")
            continue
        if n in chain.kept:
            equal_checked += 1
            if not all(torch.equal(weights[layer], chain.kept[n][layer]) for layer in weights):
                unequal.append(n)
    weights_at_seconds = time.perf_counter() - started
    live = {int(layer): sha for layer, sha in outcome["weights_sha256"].items()}
    final = {layer: weight_sha256(weight) for layer, weight in weights_at(engine, run_id, head).items()}
    result["replay"] = {"origin_replay_batches": chain.batches, "origin_replay_hashes_checked": chain.hashes_checked,
                        "origin_replay_hash_mismatches": len(chain.hash_mismatches),
                        "checkpoints_checked": chain.checkpoints_checked,
                        "checkpoint_mismatches": len(chain.checkpoint_mismatches),
                        "origin_replay_seconds": chain.seconds,
                        "weights_at_points": head + 1, "weights_at_failures": len(weights_at_failures),
                        "weights_at_all_seconds": weights_at_seconds,
                        "torch_equal_points": equal_checked, "torch_equal_mismatches": len(unequal),
                        "live_weights_match_ledger": live == final}
    if weights_at_failures or unequal:
        failures.append(f"weights_at failed at {len(weights_at_failures)} points ({weights_at_failures[:3]}), "
                        f"differs from the origin replay at {unequal[:10]}")
    if live != final:
        failures.append(f"the last worker's live weights {live} are not weights_at({head}) {final}")

    # (4b) restore time against history length
    restore = []
    for n in sorted({n for n in RESTORE_POINTS if n <= head} | {head}):
        restore.append({"n": n, "weights_at_s": timed(weights_at, engine, run_id, n),
                        "origin_only_s": timed(replay_from_origin, engine, run_id, n),
                        "deltas_replayed_with_checkpoints": n % args.checkpoint_every})
    result["restore"] = restore

    # (3) rollbacks to decreasing random points, each verified; then a resume must redo the same batches
    before_rollback = {batch_id: (seq, facts) for batch_id, seq, status, facts in rows if status == "applied"}
    hashes_before = batch_hashes(engine, run_id)
    rollbacks = []
    for n in rollback_points:
        started = time.perf_counter()
        with acquire_writer(engine, run_id) as writer:
            weights = writer.rollback(n, reason="soak rollback check")
        seconds = time.perf_counter() - started
        after = soak.state()
        restored = weights_at(engine, run_id, n)
        ok = (all(torch.equal(weights[layer], chain.kept[n][layer]) for layer in weights)
              and all(torch.equal(restored[layer], chain.kept[n][layer]) for layer in restored)
              and last_applied_seq(engine, run_id) == n and after.head == n and after.applied == n
              and after.in_progress_count == 0)
        try:
            weights_at(engine, run_id, n + 1)
            ok = False  # a rolled-back point must not restore
        except BatchStateError:
            pass
        rollbacks.append({"to": n, "seconds": seconds, "ok": ok, "rolled_back_batches": after.rolled_back})
        if not ok:
            failures.append(f"rollback to {n} did not verify")
    result["rollbacks"] = rollbacks
    resume_check = {}
    if rollback_points:
        last = rollback_points[-1]
        redo = min(3, head - last)
        worker = Worker(len(soak.workers) + 1, "fp:after_commit", last + redo, True)
        soak.workers.append(worker)
        output = soak.run_worker(worker, 600)
        if worker.returncode != -signal.SIGKILL:
            failures.append(f"resume after the rollbacks exited {worker.returncode}:\n{tail(output)}")
        else:
            by_seq_before = {seq: (batch_id, facts) for batch_id, (seq, facts) in before_rollback.items()}
            now = [(batch_id, seq, facts) for batch_id, seq, status, facts in batch_rows(engine, run_id)
                   if status == "applied" and seq > last]
            hashes_now = batch_hashes(engine, run_id)
            same = (sorted(seq for _, seq, _ in now) == list(range(last + 1, last + redo + 1)) and all(
                facts == by_seq_before[seq][1] and hashes_now[batch_id] == hashes_before[by_seq_before[seq][0]]
                for batch_id, seq, facts in now))
            resume_check = {"rolled_back_to": last, "batches_redone": len(now), "same_facts_and_hashes": same}
            if not same:
                failures.append(f"resume after rollback to {last} redid {len(now)} batches, not identical to the "
                                f"batches before the rollback")
    result["resume_after_rollback"] = resume_check
    return result


# -- the report -------------------------------------------------------------------------------------------------
def report(summary: dict) -> str:
    lines = []
    add = lines.append
    s = summary
    add(f"== soak: {s['edits_applied']} edits in batches of {s['batch_size']}, {s['kills_survived']} SIGKILLs "
        f"survived, ledger {s['database']} ==")
    add(f"model        tiny Llama {s['model']['layers']} layers, hidden {s['model']['hidden']}, "
        f"{s['model']['parameters'] / 1e6:.1f} M parameters, edited layers 1,2 (EMMET, v* 2 steps)")
    add(f"wall time    {s['wall_s'] / 60:.1f} min total; setup {s['setup_s']:.0f} s, edit loop "
        f"{s['loop_s'] / 60:.1f} min, checks {s['verify_s']:.0f} s")
    add(f"workers      {s['workers']} started; start-up to first batch median {s['startup_median_s']:.1f} s; "
        f"{s['edits_per_s']:.1f} edits/s over the loop")
    add("kills        " + ", ".join(f"{mode} {count}" for mode, count in s["kills_by_mode"].items()))
    add(f"             ledger at the kill: {s['kills_with_batch_in_progress']} with a batch in progress, "
        f"{s['kills_between_batches']} between batches")
    f = s["facts"]
    add(f"facts        {f['applied_facts']} applied in {f['applied_batches']} batches ({f['batch_rows']} batch rows), "
        f"{f['distinct_facts']} distinct, first K of the source in id order: {f['first_k_in_id_order']}; "
        f"in progress {f['in_progress']}, failed {f['failed']}; crashed batches redone with the same facts: "
        f"{f['crashed_batches_redone_same_facts']}")
    r = s["replay"]
    add(f"replay       from the origin (no checkpoints): {r['origin_replay_batches']} batches, "
        f"{r['origin_replay_hashes_checked']} layer hashes, {r['origin_replay_hash_mismatches']} mismatches, "
        f"{r['origin_replay_seconds']:.1f} s; {r['checkpoints_checked']} checkpoint layers torch.equal, "
        f"{r['checkpoint_mismatches']} mismatches")
    add(f"             weights_at(n) for all {r['weights_at_points']} n (hash-verified): {r['weights_at_failures']} "
        f"failures, {r['weights_at_all_seconds']:.1f} s; torch.equal vs origin replay at {r['torch_equal_points']} "
        f"n: {r['torch_equal_mismatches']} mismatches; live weights of the last worker = ledger: "
        f"{r['live_weights_match_ledger']}")
    z = s["size"]
    add(f"size         {z['total_mb']:.1f} MB total ({z['facts_table_mb']:.1f} MB facts table), run history "
        f"{z['history_mb']:.1f} MB = {z['history_mb_per_1000_edits']:.2f} MB per 1,000 edits "
        f"({z['total_mb_per_1000_edits']:.2f} MB per 1,000 edits with the facts)")
    tables = ", ".join(f"{name} {size / 1e6:.2f}" for name, size in sorted(z["tables_bytes"].items(),
                                                                          key=lambda item: -item[1]) if size > 0)
    add(f"             per table (MB): {tables}")
    add(f"restore      {'n':>6} {'weights_at (ckpt)':>18} {'deltas':>7} {'origin only':>12}")
    for row in s["restore"]:
        add(f"             {row['n']:>6} {1000 * row['weights_at_s']:>15.1f} ms "
            f"{row['deltas_replayed_with_checkpoints']:>7} {1000 * row['origin_only_s']:>9.1f} ms")
    add("rollbacks    " + "  ".join(f"{row['to']}:{'ok' if row['ok'] else 'FAIL'} {1000 * row['seconds']:.0f}ms"
                                    for row in s["rollbacks"]))
    rr = s.get("resume_after_rollback") or {}
    if rr:
        add(f"             resume after rollback to {rr['rolled_back_to']}: {rr['batches_redone']} batches redone, "
            f"same facts and hashes as before: {rr['same_facts_and_hashes']}")
    add(f"result       {'PASS' if not s['failures'] else 'FAIL: ' + '; '.join(s['failures'])}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=10_000, help="facts the run must apply (its --limit)")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs the run must survive")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="seeds the model and every random choice")
    parser.add_argument("--db", metavar="URL", help="use this ledger (SQLite or PostgreSQL) instead of a new schema")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, metavar="URL",
                        help="database in which a fresh schema is made (default %(default)s)")
    parser.add_argument("--source", default="soak", help="source name of the ingested facts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--replay-sample", type=int, default=25, help="points compared with torch.equal")
    parser.add_argument("--workdir", type=Path, help="folder for the model, logs and Prefect (default: temporary)")
    parser.add_argument("--keep", action="store_true", help="keep the schema and the work folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-ups (workers, Prefect, schema)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    batches = math.ceil(args.edits / args.batch_size)
    plan = plan_kills(rng, args.kills, batches)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="seqedit-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    began = time.monotonic()
    ok = False
    try:
        from db.engine import display_url, make_engine

        model_dir = workdir / "tiny-llama"
        model = build_tiny_llama(model_dir, args.seed)
        config = workdir / "run.yaml"
        config.write_text(yaml.safe_dump({"health_checks": False}))
        with scratch_ledger(args.db, args.postgres, args.keep) as (url, schema), \
                prefect_server(workdir / "prefect", workdir / "prefect-server.log") as api_url:
            engine = make_engine(url)
            say(f"ledger {display_url(engine)}; Prefect {api_url}; work folder {workdir}")
            soak = Soak(args, workdir, url, engine, api_url, model_dir, config, rng)
            cli_env = soak.env(None)
            run_cli(["init", "--db", url], cli_env)
            for name in FACT_FILES:
                ingested = json.loads(run_cli(["ingest", str(COUNTERFACT / name), "--source", args.source,
                                               "--db", url, "--json"], cli_env))
                say(f"ingested {name}: {ingested.get('accepted')} accepted")
            available = editable_count(engine, args.source)
            if available < args.edits:
                raise SystemExit(f"source {args.source!r} has {available} editable facts, fewer than {args.edits}")
            setup_s = time.monotonic() - began
            loop = soak_loop(soak, plan, batches)
            verify_started = time.monotonic()
            checks = verify(soak, loop["outcome"], failures)
            verify_s = time.monotonic() - verify_started
            kill_workers = [w for w in soak.workers if w.planned_kill and w.returncode == -signal.SIGKILL]
            kills_by_mode: dict[str, int] = {}
            for w in kill_workers:
                kills_by_mode[w.mode] = kills_by_mode.get(w.mode, 0) + 1
            startups = [w.first_progress_s for w in soak.workers if w.first_progress_s is not None]
            summary = {
                "edits_applied": checks["facts"]["applied_facts"], "edits_target": args.edits,
                "batch_size": args.batch_size, "checkpoint_every": args.checkpoint_every,
                "kills_survived": len(kill_workers), "kills_target": args.kills, "kills_by_mode": kills_by_mode,
                "kills_with_batch_in_progress": sum(w.state_after.in_progress is not None for w in kill_workers),
                "kills_between_batches": sum(w.state_after.in_progress is None for w in kill_workers),
                "kill_plan": [{"worker": w.index, "mode": w.mode, "target": w.target_seq, "ran_s": round(w.ended_s, 2),
                               "head_after": w.state_after.head, "in_progress_after": w.state_after.in_progress,
                               "note": w.note} for w in kill_workers],
                "workers": len(soak.workers), "startup_median_s": median(startups) or 0.0,
                "run_id": soak.run_id, "database": display_url(engine) + (f" (schema {schema})" if schema else ""),
                "model": model, "seed": args.seed, "setup_s": setup_s, "loop_s": loop["seconds"],
                "edits_per_s": checks["facts"]["applied_facts"] / loop["seconds"], "verify_s": verify_s,
                **checks,
            }
            engine.dispose()
        summary["wall_s"] = time.monotonic() - began
        summary["failures"] = failures
        table = report(summary)
        if args.json:
            say(table)
            print(json.dumps(summary, default=str))
        else:
            print(table)
        ok = not failures
        return 0 if ok else 1
    except SoakFailure as error:
        say(f"SOAK FAILED: {error}")
        say(f"worker logs are in {workdir / 'logs'}")
        return 1
    finally:
        if ok and not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not ok:
            say(f"work folder kept: {workdir}")


if __name__ == "__main__":
    sys.exit(main())
