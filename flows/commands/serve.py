"""``seqedit serve --cron "0 2 * * *"``: the scheduled bulk update, as a Prefect deployment.

Serves a deployment of the ``sequential_edit`` flow whose every scheduled run
resumes the *same* ledger run: it edits whatever facts are pending (those
ingested since the last time, by ``seqedit ingest``) into the model as that
run left it, evaluates, checks for collapse, and stops when the pool is empty.
The run is created here, from the run options, unless ``--run ID`` names an
existing one. Serving blocks until interrupted (Ctrl-C); the Prefect UI shows
the deployment, its schedule, its flow runs and their artifacts.

The serving process executes the scheduled flow runs itself (:mod:`flows.resident`), so the model is
loaded once and stays on its device between updates; each run restores the run's state from the ledger,
hash-verified. ``--process-per-run`` hands them to Prefect's runner instead, which starts a process (and
loads the model) per flow run.
"""

from __future__ import annotations

import argparse
from typing import Any

from flows.commands.common import DB_HELP
from flows.commands.run import add_run_options, settings_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve a cron-scheduled deployment that edits pending facts",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cron", required=True, help='cron schedule, e.g. "0 2 * * *" (02:00 every day)')
    parser.add_argument("--timezone", default="UTC", help="timezone of the schedule (default UTC)")
    parser.add_argument("--run", type=int, metavar="RUN_ID", help="serve this existing run instead of creating one")
    parser.add_argument("--deployment-name", default=None, help="default: seqedit-run-<RUN_ID>")
    parser.add_argument("--process-per-run", action="store_true", help="run each scheduled flow run in a new "
                        "process (Prefect's runner; the model is loaded every time) instead of in this one")
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between looks for due flow runs (default 5)")
    parser.add_argument("--db", metavar="URL", help=DB_HELP)
    add_run_options(parser)
    parser.set_defaults(handler=handle)


def bulk_update_deployment(run_id: int, db_url: str, cron: str, timezone: str = "UTC", name: str | None = None):
    """The deployment of ``sequential_edit`` that resumes run ``run_id`` on the ``cron`` schedule.

    ``db_url`` must be absolute: scheduled runs start in the server's working directory.
    """
    from prefect.schedules import Cron

    from flows.pipeline import sequential_edit

    parameters: dict[str, Any] = {"run_id": run_id, "db_url": db_url}
    return sequential_edit.to_deployment(name=name or f"seqedit-run-{run_id}", schedules=[Cron(cron, timezone=timezone)],
                                         parameters=parameters, tags=["seqedit", "bulk-update"],
                                         description=f"Edit pending facts into run {run_id} (cron {cron!r}).")


def handle(args: argparse.Namespace) -> int:
    from prefect import serve

    from db.engine import absolute_url
    from db.runs import get_run
    from flows.commands.common import check_datasets, open_ledger
    from flows.commands.run import check_layers
    from flows.run_state import create_run_context
    from flows.settings import RunSettings

    url = absolute_url(args.db)
    engine = open_ledger(url)
    if args.run is None:
        settings = RunSettings.from_dict(settings_from_args(args))
        check_layers(settings)
        check_datasets(settings)
        run_id = create_run_context(engine, settings).run.id
        print(f"created run {run_id} ({settings.algorithm}); each scheduled flow run continues it")
    else:
        run_id = get_run(engine, args.run).id
    deployment = bulk_update_deployment(run_id, url, args.cron, args.timezone, args.deployment_name)
    where = "a new process per flow run" if args.process_per_run else "this process, the model kept loaded"
    print(f"serving deployment {deployment.name!r} on cron {args.cron!r} ({args.timezone}) in {where}; "
          "Ctrl-C stops", flush=True)
    if args.process_per_run:
        serve(deployment)
    else:
        from flows.resident import serve_resident

        serve_resident(deployment, poll_s=args.poll)
    return 0
