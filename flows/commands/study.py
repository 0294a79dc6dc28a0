"""``seqedit study``: the seed paper's experiments and lifelong comparisons as named sets of arms.

    seqedit study run studies/unified-batch-scaling.yaml --n-facts 32 --batch-sizes 1,8,32
    seqedit study status unified-batch-scaling
    seqedit study report unified-batch-scaling --out reports/ [--json]

An arm is an objective × edit distribution × layers × batch size × mode × hyperparameter overrides × seed
(``studies/*.yaml`` say how a spec is written). ``independent`` arms follow the paper's protocol: each batch
of B facts is edited into the unedited model, scored on its own facts and undone, so the metrics describe
batch size B alone; ``sequential`` arms are runs (the lifelong protocol). Each arm is a flow run of
``study-arm``: in this process, or on a work pool with ``--deployment`` (``seqedit study deploy`` makes it;
``prefect worker start --pool POOL`` on as many machines as you like). Running the same study again
continues it: done arms are skipped, a half-done arm resumes. A fact's v* is computed once and reused by
every arm that shares its ingredients (model, last layer, v* settings, prefixes). ``report`` gives every
metric with its 95 % bootstrap interval over facts, paired differences, and the paper-style figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from flows.commands.common import DB_HELP

DEFAULT_POOL = "seqedit"
DEFAULT_DEPLOYMENT = "seqedit-study"


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes are comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return sizes


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("study", help="run and report studies (sets of arms: objective × distribution × "
                                   "batch size × mode …)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="study_command", required=True, metavar="ACTION")
    run = actions.add_parser("run", help="run (or continue) the study of a spec", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("spec", type=Path, help="the study's YAML spec (studies/*.yaml)")
    run.add_argument("--facts", help="fact file (or catalog dataset) instead of the spec's (all its records)")
    run.add_argument("--n-facts", type=int, help="facts per arm instead of the spec's")
    run.add_argument("--batch-sizes", type=_batch_sizes, help="batch sizes instead of the spec's, e.g. 1,8,32")
    run.add_argument("--name", help="the study's name instead of the spec's (a study with other overrides "
                     "should have its own)")
    run.add_argument("--deployment", help="submit the arms to this study-arm deployment's work pool "
                     f"(e.g. study-arm/{DEFAULT_DEPLOYMENT}) instead of running them here")
    run.add_argument("--db", metavar="URL", help=DB_HELP)
    run.add_argument("--json", action="store_true", help="print the study's summary as JSON when it ends")
    run.set_defaults(handler=handle_run)
    for action, text in (("status", "each arm's status, progress and metrics so far"),
                         ("report", "the markdown table and figures of a study (and --json)")):
        sub = actions.add_parser(action, help=text, description=text)
        sub.add_argument("name", help="the study's name")
        sub.add_argument("--db", metavar="URL", help=DB_HELP)
        sub.add_argument("--json", action="store_true", help="print {arms: [...], v_star: {computed, reused}, "
                         "differences: [...]} as JSON")
        if action == "report":
            sub.add_argument("--out", type=Path, default=Path("reports"), help="folder for the files "
                             "(default: ./reports)")
        sub.set_defaults(handler=handle_status if action == "status" else handle_report)
    deploy = actions.add_parser("deploy", help="deploy the study-arm flow to a Prefect work pool")
    deploy.add_argument("--pool", default=DEFAULT_POOL, help=f"process work pool (default {DEFAULT_POOL}; created "
                        "if missing)")
    deploy.add_argument("--name", default=DEFAULT_DEPLOYMENT, help=f"deployment name (default {DEFAULT_DEPLOYMENT})")
    deploy.set_defaults(handler=handle_deploy)


def handle_run(args: argparse.Namespace) -> int:
    from flows.commands.common import check_datasets, open_ledger
    from flows.studies.runner import prepare_study, run_study
    from flows.studies.report import study_summary
    from flows.studies.spec import load_spec

    if args.n_facts is not None and args.n_facts < 1:
        raise ValueError(f"--n-facts must be at least 1, got {args.n_facts}")
    spec = load_spec(args.spec, facts=args.facts, n_facts=args.n_facts, batch_sizes=args.batch_sizes,
                     name=args.name)
    engine = open_ledger(args.db)
    for arm in spec.arms:  # an independent arm reads only the C0 text (it scores its facts, nothing else)
        settings = arm.run_settings()
        check_datasets(settings if arm.mode == "sequential" else
                       dataclasses.replace(settings, eval_every=0, health_checks=False))
    study_id, arms = prepare_study(engine, spec)
    print(f"study {spec.name}: {len(arms)} arms, {sum(arm.status == 'done' for arm in arms)} done", flush=True)
    outcome = run_study(study_id, db_url=args.db, deployment=args.deployment or spec.deployment)
    summary = study_summary(engine, spec.name)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"study {spec.name}: {sum(s == 'done' for s in outcome['arms'].values())}/{len(outcome['arms'])} arms "
              f"done; v* computed {summary['v_star']['computed']}, reused {summary['v_star']['reused']}; see "
              f"`seqedit study report {spec.name}`")
    return 0


def handle_status(args: argparse.Namespace) -> int:
    from flows.commands.common import open_ledger
    from flows.studies.report import study_summary

    summary = study_summary(open_ledger(args.db, read_only=True), args.name)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"study {summary['study']} (facts: {summary['fact_source']}); v* computed {summary['v_star']['computed']}, "
          f"reused {summary['v_star']['reused']}")
    for arm in summary["arms"]:
        progress = arm["progress"]
        where = (f"{progress['batches_done']}/{progress['batches']} batches" if arm["mode"] == "independent"
                 else f"run {arm['run_id']}, evaluated at batch {progress['evaluated_at_batch']}")
        es = arm["metrics"].get("es", {})
        es_text = "" if es.get("mean") is None else f", ES {es['mean']:.3f}"
        error = f" — {arm['error']}" if arm["error"] else ""
        print(f"  {arm['name']:<40} {arm['mode']:<12} {arm['status']:<8} {where}{es_text}{error}")
    return 0


def handle_report(args: argparse.Namespace) -> int:
    from flows.commands.common import open_ledger
    from flows.studies.report import markdown, write_study_report

    summary, paths = write_study_report(open_ledger(args.db, read_only=True), args.name, args.out)
    if args.json:
        print(json.dumps(summary))
    else:
        print(markdown(summary))
        print("\n".join(f"wrote {path}" for path in paths))
    return 0


def handle_deploy(args: argparse.Namespace) -> int:
    from flows.commands.deploy_evaluator import deploy_flow
    from flows.studies.runner import study_arm

    deployment = deploy_flow(study_arm, args.pool, args.name, "Run one arm of a seqedit study.", ["seqedit", "study"])
    print(f"deployed {deployment} on work pool {args.pool!r}; start workers with `prefect worker start --pool "
          f"{args.pool}` and studies with `seqedit study run SPEC --deployment {deployment}`")
    return 0
