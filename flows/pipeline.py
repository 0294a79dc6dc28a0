"""Prefect flows: sequential editing, evaluation, rollback and ingestion.

``sequential_edit`` is the product: facts stream from the ledger in batches;
each batch is claimed, edited into the loaded model, and committed (deltas,
hashes, statuses, checkpoint) in one database transaction; every
``eval_every`` batches the model is evaluated, every metric is recorded, and
the collapse policy is applied. If the commit fails (after its retries), the
edited layers are put back as they were before the batch, so the model in
memory never runs ahead of the ledger. (This was a Prefect transaction's
``on_rollback`` hook; Prefect runs such hooks at a task's *first* failed
attempt, before its retries, on a deep copy of what the transaction holds —
which a loaded model is not — so the hook failed and nothing was restored; the
restore is now explicit.) A crash anywhere is recovered by opening the run
again (``run_id=``): the weights are rebuilt from the ledger, and a batch that
was claimed but not committed is given back or redone.

Retries: claiming (atomic, and a retry first looks for the batch it may have
claimed) and recording are retried; editing is not (it is deterministic, and
retrying would only repeat the error); evaluation is read-only and retried once.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from tqdm.auto import tqdm

from db.engine import make_engine
from db.errors import RequestLostError
from db.evaluation_requests import fail_request
from db.evaluations import AlarmRow, Metric, record_evaluation
from db.history import (applied_count, batch_facts, claimable_count, has_batch_in_progress, metrics_frame,
                        pending_count)
from db.ingest import ingest_file
from db.ledger import ClaimedBatch, RunWriter, acquire_writer, release_abandoned_claims
from db.migrate import require_current
from db.models import RunStatus
from db.replay import last_applied_seq, weights_at
from db.runs import get_run, set_run_status
from editing.delta import weight_sha256
from editing.editor import BatchEdit
from editing.evaluation import PROBE_PROMPTS, evaluate
from editing.facts import Fact
from flows.async_evaluation import AsyncEvaluations, Lease, claim
from flows.collapse import Alarm, CollapsePolicy, detect, last_healthy_seq
from flows.failpoints import failpoint
from flows.model_export import build_provenance, delivered_provenance, write_model_folder
from flows.model_session import ModelSession
from flows.prefect_ui import (TASK_NAMES, artifact_key, edit_flow_run_name, ledger_tag, name_flow_run,
                              send_logs_to_prefect)
from flows.run_state import RunContext, create_run_context, open_run_context
from flows.settings import RunSettings

log = logging.getLogger(__name__)
send_logs_to_prefect()

NOT_PERSISTED = {"cache_policy": NONE, "persist_result": False}
"""Tasks pass live objects (the model, the writer); nothing of theirs is cached or persisted."""

SPLITS = {"retention": "retention", "ppl": "perplexity", "acc": "downstream", "chance": "downstream",
          "norm": "norms", "ge": "generation", "seconds": "timing", "seconds_per_fact": "timing"}


def metric_split(name: str) -> str:
    """The family a metric belongs to (the ledger's ``split`` column)."""
    return SPLITS.get(name.split(".", 1)[0], "counterfact")


# -- tasks ---------------------------------------------------------------------------------
@task(name="claim-batch", task_run_name=TASK_NAMES["claim-batch"], retries=2, retry_delay_seconds=1,
      **NOT_PERSISTED)
def claim_batch(writer: RunWriter, size: int) -> ClaimedBatch | None:
    """The run's uncommitted batch if there is one (crash or lost reply), else a new claim."""
    return writer.in_progress_batch() or writer.claim_batch(size)


@task(name="apply-edit", task_run_name=TASK_NAMES["apply-edit"], **NOT_PERSISTED)
def apply_edit(context: RunContext, batch: ClaimedBatch) -> BatchEdit:
    """Edit the batch into the model (all layers or, on an error, none: :meth:`Editor.apply`)."""
    edit = context.editor.apply(list(batch.facts),
                                on_layer=lambda update: failpoint("during_solve", batch.seq))
    failpoint("before_commit", batch.seq)
    return edit


@task(name="commit-batch", task_run_name=TASK_NAMES["commit-batch"], retries=2, retry_delay_seconds=2,
      **NOT_PERSISTED)
def commit_batch(context: RunContext, writer: RunWriter, batch: ClaimedBatch, edit: BatchEdit,
                 seconds: dict[str, float]) -> None:
    checkpoint = context.adapter.snapshot(list(context.run.layers)) if batch.checkpoint_due else None
    writer.commit_batch(batch, {update.layer: update.delta for update in edit.updates}, edit.weights_sha256,
                        timings=seconds, checkpoint=checkpoint, diagnostics=edit.diagnostics(), keys=edit.keys)


@task(name="evaluate-model", task_run_name=TASK_NAMES["evaluate-model"], retries=1, **NOT_PERSISTED)
def evaluate_model(context: RunContext, seq: int, batch_facts: list[Fact]) -> dict[str, float]:
    """Every metric of the evaluation at ``seq``, the time of each part included (``seconds.*``)."""
    config = context.settings.evaluation_config()
    with context.delivered() as adapter:
        report = evaluate(adapter, config, facts=batch_facts, earlier_facts=context.retention_facts(seq),
                          original_weights=context.original, generation_prompts=PROBE_PROMPTS[:config.generation_facts])
    return report.metrics()


@task(name="record-evaluation", task_run_name=TASK_NAMES["record-evaluation"], retries=2, retry_delay_seconds=2,
      **NOT_PERSISTED)
def record_metrics(context: RunContext, seq: int, metrics: dict[str, float], seconds: float, kind: str,
                   alarms: list[Alarm], request: tuple[int, str] | None = None) -> int:
    """Metrics, alarms and (for an evaluation request) its completion, in one ledger transaction."""
    rows = [Metric(name, value, metric_split(name)) for name, value in sorted(metrics.items())]
    alarm_rows = [AlarmRow(rule=alarm.rule.describe(), metric=alarm.metric, value=alarm.value,
                           baseline=alarm.baseline, threshold=alarm.rule.threshold,
                           action=context.settings.collapse.action, message=alarm.message) for alarm in alarms]
    return record_evaluation(context.engine, context.run.id, seq, rows, duration_s=seconds, kind=kind,
                             alarms=alarm_rows, request=request)


# -- the editing loop ----------------------------------------------------------------------
def _edit_one_batch(context: RunContext, writer: RunWriter, batch: ClaimedBatch) -> BatchEdit:
    """Apply, then commit; a commit that fails for good puts the edited layers back before it re-raises."""
    started = time.perf_counter()
    before = context.adapter.snapshot(list(context.run.layers))
    edit = apply_edit(context, batch)
    seconds = {**edit.seconds, "edit": time.perf_counter() - started}
    commit_started = time.perf_counter()
    try:
        commit_batch(context, writer, batch, edit, seconds)
    except BaseException:
        context.adapter.restore(before)
        raise
    context.seq = batch.seq
    context.editor.remember(edit)  # only once the ledger holds the batch
    seconds["commit"] = time.perf_counter() - commit_started
    log.info("run %d batch %d committed: %d facts, edit %.1fs, commit %.1fs", context.run.id, batch.seq,
             len(batch.facts), seconds["edit"], seconds["commit"])
    failpoint("after_commit", batch.seq)
    return edit


def _baseline(context: RunContext) -> dict[str, float]:
    """Metrics before the first batch (the full evaluation and the health check), measured now if the
    run has none yet; collapse rules compare every later point with them."""
    frame = metrics_frame(context.engine, context.run.id)
    at_zero = frame[frame["seq"] == 0]
    if not at_zero.empty:
        return dict(zip(at_zero["name"], at_zero["value"]))
    if context.seq != 0:
        return {}
    health = context.health() if context.settings.health_checks else {}
    if context.settings.eval_every:
        return _evaluate_point(context, 0, [], baseline={}, extra=health, announce="baseline")[0]
    _record_point(context, 0, health, {}, kind="health", seconds=0.0, announce="baseline health")
    return health


def _evaluate_point(context: RunContext, seq: int, batch_facts: list[Fact], baseline: dict[str, float],
                    extra: dict[str, float] | None = None, announce: str = "evaluation",
                    request: tuple[int, str] | None = None) -> tuple[dict[str, float], list[Alarm]]:
    """A full evaluation at ``seq`` (with ``extra`` metrics merged in, e.g. the batch's health check),
    recorded, checked against the baseline, and published as an artifact; ``request`` is the evaluation
    request this completes (asynchronous evaluation)."""
    started = time.perf_counter()
    metrics = {**(extra or {}), **evaluate_model(context, seq, batch_facts)}
    alarms = _record_point(context, seq, metrics, baseline, kind="full", seconds=time.perf_counter() - started,
                           announce=announce, request=request)
    create_table_artifact(key=artifact_key(context.engine, context.run.id, "evaluation"),
                          table=[{"metric": name, "value": round(value, 6)} for name, value in sorted(metrics.items())],
                          description=f"Run {context.run.id}, {announce} after batch {seq}")
    return metrics, alarms


def _record_point(context: RunContext, seq: int, metrics: dict[str, float], baseline: dict[str, float], kind: str,
                  seconds: float, announce: str = "health", request: tuple[int, str] | None = None) -> list[Alarm]:
    """Run the collapse rules on ``metrics`` against the baseline, and record the metrics and every alarm
    at ``seq`` in one transaction (so an alarm never goes missing when a process dies).

    A full evaluation is announced with its summary line; a health check only when it raises an alarm.
    """
    alarms = detect(metrics, baseline, context.settings.collapse.rules) if baseline else []
    record_metrics(context, seq, metrics, seconds, kind, alarms, request)
    if kind == "full" or alarms:
        line = _summary_line(announce, seq, metrics, alarms, seconds)
        print(line, flush=True)
        (log.warning if alarms else log.info)("run %d %s", context.run.id, line)  # the flow run's Logs tab
    return alarms


def _summary_line(label: str, seq: int, metrics: dict[str, float], alarms: list[Alarm], seconds: float) -> str:
    def mean(prefix: str) -> float | None:
        values = [v for k, v in metrics.items() if k.startswith(prefix)]
        return sum(values) / len(values) if values else None

    parts = [f"{name.upper()} {metrics[key]:.3f}" for name, key in
             (("es", "es"), ("ps", "ps"), ("ns", "ns"), ("ret", "retention.es"), ("ge", "ge")) if key in metrics]
    for label_, prefix in (("ppl", "ppl."), ("acc", "acc."), ("|dW|", "norm.dw.")):
        value = mean(prefix)
        if value is not None:
            parts.append(f"{label_} {value:.3f}")
    warning = f"  ALARM: {'; '.join(a.message for a in alarms)}" if alarms else ""
    return f"[{label} @ batch {seq}] " + "  ".join(parts) + f"  ({seconds:.0f}s){warning}"


def _apply_policy(context: RunContext, writer: RunWriter, policy: CollapsePolicy, seq: int) -> bool:
    """Act on alarms at ``seq``; True when the run must stop."""
    if policy.action == "warn":
        return False
    if policy.action == "stop":
        print(f"collapse detected at batch {seq}: stopping run {context.run.id}", flush=True)
        return True
    target = last_healthy_seq(context.engine, context.run.id, up_to=seq)
    weights = writer.rollback(target, restore_facts=False, reason=f"collapse detected at batch {seq}")
    context.restore(target, weights)
    print(f"collapse detected at batch {seq}: rolled run {context.run.id} back to batch {target}", flush=True)
    return policy.after_rollback == "stop"


def _remaining(context: RunContext) -> int | None:
    limit = context.settings.limit
    if limit is None:
        return None
    return max(0, limit - applied_count(context.engine, context.run.id))


def _edit_loop(context: RunContext, writer: RunWriter) -> str:
    settings = context.settings
    baseline = _baseline(context) if settings.eval_every or settings.health_checks else {}
    background = None
    if settings.eval_every and settings.eval_mode == "async":
        background = AsyncEvaluations(context.engine, context.run.id, settings.eval_deployment, settings.eval_lease_s,
                                      settings.eval_max_attempts,
                                      on_alarm=lambda seq: _apply_policy(context, writer, settings.collapse, seq))
    remaining = _remaining(context)
    planned = pending_count(context.engine, context.run.id)
    evaluated_seq = context.seq
    with tqdm(total=planned if remaining is None else min(planned, remaining), desc=f"run {context.run.id}",
              unit="fact") as progress:
        while True:
            if background is not None and background.poll():
                return RunStatus.STOPPED
            remaining = _remaining(context)  # recounted: a rollback gives facts back
            if remaining == 0:
                break
            batch = claim_batch(writer, settings.batch_size if remaining is None else min(settings.batch_size,
                                                                                          remaining))
            if batch is None:
                break
            edit = _edit_one_batch(context, writer, batch)
            progress.update(len(batch.facts))
            progress.set_postfix(batch=batch.seq, v_nll=f"{float(edit.v_star.final_nll.mean()):.3f}")
            last = _remaining(context) == 0 or pending_count(context.engine, context.run.id) == 0
            alarms, evaluated = _check_batch(context, batch, edit, baseline, background, last)
            evaluated_seq = batch.seq if evaluated else evaluated_seq
            if alarms and _apply_policy(context, writer, settings.collapse, batch.seq):
                return RunStatus.STOPPED
    if settings.eval_every and context.seq not in (0, evaluated_seq):  # others claimed what was to be the rest
        if background is not None:
            background.submit(context.seq)
        else:
            last_batch = batch_facts(context.engine, context.run.id, context.seq)
            _evaluate_point(context, context.seq, last_batch, baseline, announce="final evaluation")
    if background is not None and background.drain(settings.eval_wait_s):
        return RunStatus.STOPPED
    return RunStatus.COMPLETED


def _check_batch(context: RunContext, batch: ClaimedBatch, edit: BatchEdit, baseline: dict[str, float],
                 background: AsyncEvaluations | None, last: bool) -> tuple[list[Alarm], bool]:
    """After a committed batch: its health check and, at an evaluation point or after the ``last`` batch, the
    full evaluation — here (with the health metrics in the same evaluation, so the final point has the
    perplexity probe and the norms like every other point), or submitted to the work pool (``background``;
    its alarms come back through :meth:`AsyncEvaluations.poll`). Returns the alarms raised now and whether
    the batch was evaluated."""
    settings = context.settings
    started = time.perf_counter()
    health = context.health(edit) if settings.health_checks else {}
    point = bool(settings.eval_every) and (batch.seq % settings.eval_every == 0 or last)
    if point and background is None:
        announce = "evaluation" if batch.seq % settings.eval_every == 0 else "final evaluation"
        return _evaluate_point(context, batch.seq, list(batch.facts), baseline, extra=health,
                               announce=announce)[1], True
    alarms = _record_point(context, batch.seq, health, baseline, kind="health",
                           seconds=time.perf_counter() - started) if health else []
    if point:
        background.submit(batch.seq)
    return alarms, point


def _publish_report(context: RunContext) -> None:
    from flows.reporting import markdown_summary, metrics_wide, summary_table

    wide = metrics_wide(context.engine, context.run.id, kind="full")
    if not wide.empty:  # the headline columns (the summary artifact has their legend); every metric: `history`
        create_table_artifact(key=artifact_key(context.engine, context.run.id, "metrics"),
                              table=summary_table(wide).round(4).to_dict(orient="records"),
                              description=f"Run {context.run.id}: headline metrics per evaluated batch (legend in "
                                          f"the summary artifact; every metric: `seqedit history --run "
                                          f"{context.run.id} --metrics`)")
    create_markdown_artifact(key=artifact_key(context.engine, context.run.id, "summary"),
                             markdown=markdown_summary(context.engine, context.run.id))


# -- flows ---------------------------------------------------------------------------------
class NothingToEdit(LookupError):
    """A new run would claim no fact: it is not created (no run row, no baseline, no checkpoint)."""


def check_something_to_edit(engine, settings: RunSettings) -> int:
    """The number of facts a new run with ``settings`` could claim; :class:`NothingToEdit` when none."""
    available = claimable_count(engine, settings.fact_pool, settings.fact_source)
    if available == 0:
        source = f"source {settings.fact_source!r}" if settings.fact_source else "any source"
        state = "valid facts" if settings.fact_pool == "private" else "pending facts"
        raise NothingToEdit(f"nothing to edit: no {state} in {source} (pool {settings.fact_pool}); "
                            f"`seqedit ingest FILE` adds facts, `seqedit history` shows what was edited")
    return available


@flow(name="sequential_edit", flow_run_name=edit_flow_run_name)
def sequential_edit(settings: dict[str, Any] | None = None, run_id: int | None = None,
                    db_url: str | None = None) -> dict[str, Any]:
    """Create a run from ``settings`` (or resume run ``run_id``) and edit until the facts, the limit
    or the collapse policy stop it. Returns the run id, its status and the last batch.

    A new run with nothing to claim is not created (:class:`NothingToEdit`). A resumed run takes its writer
    lock before the model is loaded, so a second writer is refused at once. A shared pool first takes back
    the claims of runs that died without unwinding (:func:`db.ledger.release_abandoned_claims`); a run that
    fails or is interrupted gives its own claimed batch back (facts to ``pending``, the batch ``failed``), so
    no fact stays claimed by a run nobody is running.
    """
    engine = make_engine(db_url)
    require_current(engine)
    with ExitStack() as stack:
        if run_id is None:
            run_settings = RunSettings.from_dict(settings or {})
            run_settings.edit_config()  # the edit overrides' keys and types, before the model loads
            check_something_to_edit(engine, run_settings)
            context = create_run_context(engine, run_settings)
            writer = stack.enter_context(acquire_writer(engine, context.run.id))
        else:
            writer = stack.enter_context(acquire_writer(engine, run_id))
            context = open_run_context(engine, run_id)
        if context.settings.fact_pool == "shared":
            for abandoned_run, seq in release_abandoned_claims(engine, except_run=context.run.id):
                print(f"took back the claimed facts of run {abandoned_run}'s batch {seq} (no process was "
                      f"running it)", flush=True)
        name_flow_run(engine, context.run.id, "sequential edit" if run_id is None else "resume")
        context.settings.runtime.apply_threads()
        set_run_status(engine, context.run.id, RunStatus.RUNNING)
        try:
            status = _edit_loop(context, writer)
        except BaseException as error:
            _give_back_claim(writer, error)
            set_run_status(engine, context.run.id, RunStatus.FAILED)
            raise
        set_run_status(engine, context.run.id, status)
    if context.settings.save_model:  # the same folder, checks and provenance as `seqedit export-model`
        with context.delivered() as adapter:
            write_model_folder(adapter, context.settings.save_model,
                               delivered_provenance(adapter, build_provenance(engine, context.run.id, context.seq),
                                                    context.config.restraint), force=True)
    _publish_report(context)
    return {"run_id": context.run.id, "status": str(status), "seq": context.seq,
            "weights_sha256": context.adapter.weights_sha256(list(context.run.layers))}


def _give_back_claim(writer: RunWriter, error: BaseException) -> None:
    """The run stops on ``error``: return its claimed, uncommitted batch to the pool (the model is rebuilt
    from the ledger by whoever edits next, so nothing of the batch survives)."""
    try:
        batch = writer.in_progress_batch()
        if batch is not None:
            writer.fail_batch(batch, f"{type(error).__name__}: {error}"[:500] or type(error).__name__)
    except Exception:  # the database itself may be what failed; the abandoned-claims sweep catches it later
        log.warning("could not give back the claimed batch of run %d", writer.run.id, exc_info=True)


@flow(name="evaluate", flow_run_name="run {run_id} · evaluate")
def evaluate_run(run_id: int, seq: int | None = None, db_url: str | None = None,
                 request_id: int | None = None) -> dict[str, float]:
    """Evaluate run ``run_id`` at batch ``seq`` (default: its last), restoring that point first;
    the metrics are recorded in the ledger at that batch.

    With ``request_id`` (an asynchronous evaluation point, :mod:`flows.async_evaluation`) the request
    is claimed first — nothing is done if it is finished, held by a live worker or its batch was rolled
    back — its lease is renewed while the evaluation runs, and the request is completed in the
    transaction that records the metrics (a failure marks it failed, to be claimed again)."""
    engine = make_engine(db_url)
    require_current(engine)
    held = None
    if request_id is not None:
        lease_s = RunSettings.recorded(get_run(engine, run_id).spec.hyperparameters["settings"]).eval_lease_s
        held = claim(engine, request_id, lease_s)
        if held is None:
            print(f"evaluation request {request_id} needs no work (done, held, or its batch was rolled back)")
            return {}
        seq = held[0].seq
    try:
        context = open_run_context(engine, run_id, at_seq=seq)
        name_flow_run(engine, run_id, f"evaluate batch {context.seq}")
        context.settings.runtime.apply_threads()
        facts = batch_facts(engine, run_id, context.seq) if context.seq else []
        baseline = _baseline(context) if context.seq else {}
        if held is None:
            return _evaluate_point(context, context.seq, facts, baseline, announce="evaluation")[0]
        request, worker = held
        with Lease(engine, request.id, worker, lease_s):
            return _evaluate_point(context, context.seq, facts, baseline, announce="evaluation",
                                   request=(request.id, worker))[0]
    except Exception as error:
        if held is not None and not isinstance(error, RequestLostError):
            fail_request(engine, held[0].id, held[1], f"{type(error).__name__}: {error}")
        raise


@flow(name="rollback", flow_run_name="run {run_id} · rollback to batch {to_seq}")
def rollback_run(run_id: int, to_seq: int, restore_facts: bool = True, db_url: str | None = None) -> dict[str, Any]:
    """Restore run ``run_id`` to batch ``to_seq``: later batches are marked rolled back (kept), their
    facts return to the queue (or stay out, ``restore_facts=False``), and a model this process holds
    is put into the restored state. A run already at ``to_seq`` (nothing applied or claimed after it) is
    left as it is: no rollback is recorded (``rolled_back`` is False)."""
    engine = make_engine(db_url)
    require_current(engine)
    name_flow_run(engine, run_id, f"rollback to batch {to_seq}")
    with acquire_writer(engine, run_id) as writer:
        if rollback_is_noop(engine, run_id, to_seq):
            weights, rolled_back = weights_at(engine, run_id, to_seq), False
        else:
            weights, rolled_back = writer.rollback(to_seq, restore_facts=restore_facts, reason="requested"), True
    stored = get_run(engine, run_id).spec.hyperparameters.get("settings")
    if stored is not None:  # a run made by these flows: put a model this process holds in the restored state
        run_settings = RunSettings.recorded(stored)
        session = ModelSession.loaded(run_settings.model, run_settings.runtime)
        if session is not None:
            session.load_state(weights)
    hashes = {layer: weight_sha256(weight) for layer, weight in weights.items()}
    return {"run_id": run_id, "seq": to_seq, "rolled_back": rolled_back, "weights_sha256": hashes}


def rollback_is_noop(engine, run_id: int, to_seq: int) -> bool:
    """True when run ``run_id`` stands at ``to_seq`` already: its last applied batch, none in progress."""
    return last_applied_seq(engine, run_id) == to_seq and not has_batch_in_progress(engine, run_id)


@task(name="ingest-file", retries=0, **NOT_PERSISTED)
def _ingest(engine, path: str, source: str | None):
    return ingest_file(engine, path, source=source)


@flow(name="ingest")
def ingest_facts(path: str, source: str | None = None, db_url: str | None = None) -> dict[str, Any]:
    """Validate and store the facts of a file (see ``db.ingest``); the summary becomes an artifact."""
    engine = make_engine(db_url)
    require_current(engine)
    summary = _ingest(engine, path, source)
    create_markdown_artifact(key=f"{ledger_tag(engine)}-ingest-summary",
                             markdown=f"```\n{summary.render()}\n```")
    return summary.to_dict()
