"""``seqedit deploy-evaluator``: the ``evaluate`` flow as a deployment on a Prefect work pool.

Asynchronous evaluation (``seqedit run --eval-mode async``) submits every
evaluation point as a flow run of this deployment; Prefect workers on any
machine that has seqedit installed, the model and the data, and reaches the
ledger's database, pick them up:

    prefect server start                      # (or any Prefect server; PREFECT_API_URL points at it)
    seqedit deploy-evaluator --pool seqedit   # creates the process work pool if needed, then the deployment
    prefect worker start --pool seqedit       # as many as you like, on any machine

The deployment imports ``flows.pipeline.evaluate_run`` by module path, so a
process worker needs no source storage or image: only seqedit installed where
it runs.
"""

from __future__ import annotations

import argparse

DEFAULT_POOL = "seqedit"
DEFAULT_NAME = "seqedit-evaluate"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("deploy-evaluator", help="deploy the evaluate flow to a Prefect work pool "
                                   "(for --eval-mode async)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", default=DEFAULT_POOL, help=f"process work pool (default {DEFAULT_POOL}; created "
                        "if missing)")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"deployment name (default {DEFAULT_NAME}; runs refer "
                        f"to it as evaluate/NAME, the eval_deployment setting)")
    parser.set_defaults(handler=handle)


def deploy_evaluator(pool: str = DEFAULT_POOL, name: str = DEFAULT_NAME) -> str:
    """Create the process work pool ``pool`` if it does not exist and deploy the ``evaluate`` flow to it;
    returns the deployment's full name (``evaluate/<name>``)."""
    from flows.pipeline import evaluate_run

    return deploy_flow(evaluate_run, pool, name, "Evaluate a point of a seqedit run (asynchronous evaluation).",
                       ["seqedit", "evaluation"])


def deploy_flow(flow, pool: str, name: str, description: str, tags: list[str]) -> str:
    """Deploy ``flow`` by module path (a process worker needs only seqedit installed) to the process work
    pool ``pool``, created if missing; returns ``<flow>/<name>``. Shared with ``seqedit study deploy``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments.runner import EntrypointType
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise ValueError("a work pool needs a Prefect server: start one (`prefect server start`) and set "
                         "PREFECT_API_URL to its API, e.g. http://127.0.0.1:4200/api")
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    flow.deploy(name=name, work_pool_name=pool, entrypoint_type=EntrypointType.MODULE_PATH, build=False,
                push=False, print_next_steps=False, tags=tags, description=description)
    return f"{flow.name}/{name}"


def handle(args: argparse.Namespace) -> int:
    deployment = deploy_evaluator(args.pool, args.name)
    print(f"deployed {deployment} on work pool {args.pool!r}; start workers with `prefect worker start --pool "
          f"{args.pool}` and runs with `seqedit run --eval-mode async` (eval_deployment {deployment!r})")
    return 0
