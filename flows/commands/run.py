"""``seqedit run``: a sequential-editing run (Prefect flow ``sequential_edit``), or ``--resume RUN_ID``.

Settings come from ``--config run.yaml`` (the fields of ``flows.settings.RunSettings``) and
the options below, which win over the file (``--set`` over the file's ``edit_overrides``, which win over
the hparams file). A resumed run uses the settings it was created with: run options beside ``--resume``
are refused. Everything is checked before Prefect starts or a model loads — unknown or mistyped settings,
layers the model lacks, a ledger with nothing to edit (exit 1, nothing written), a run another process writes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from flows.commands.common import (ALGORITHMS, DB_HELP, add_runtime_options, parse_layers, parse_override,
                                   runtime_from_args)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options that define a new run (shared with ``seqedit serve``)."""
    group = parser.add_argument_group("run settings (a new run)")
    group.add_argument("--config", type=Path, help="YAML file of run settings")
    group.add_argument("--algo", dest="algorithm", choices=ALGORITHMS, help="objective (default: emmet)")
    group.add_argument("--model", help="Hugging Face name, local folder or .gguf file (default: SmolLM2-135M)")
    group.add_argument("--hparams", help="hyperparameter set in editing/hparams or a YAML path (default: matched "
                       "to the model)")
    group.add_argument("--hparams-from", type=Path, metavar="FILE", help="a reference implementation's hparams file "
                       "as it is (EasyEdit YAML; ROME/MEMIT/UME/AlphaEdit/ENCORE JSON): every key mapped onto "
                       "seqedit's settings over --hparams, under --config and --set; unknown keys are refused")
    group.add_argument("--layers", type=parse_layers, help="edit layers, e.g. 3,4,5,6,7")
    group.add_argument("--distribution", choices=("single_layer", "memit_spread"), help="edit distribution (default: the hparams file's; "
                       "single_layer when --layers names one layer)")
    group.add_argument("--set", dest="edit_set", type=parse_override, action="append", default=[],
                       metavar="KEY=VALUE", help="edit hyperparameter override, e.g. values.steps=10 (wins over "
                       "--config's edit_overrides and the hparams file; unknown keys and wrong types are refused)")
    group.add_argument("--batch-size", type=int, help="facts per batch (default: 16)")
    group.add_argument("--eval-every", type=int, help="evaluate every N batches, 0 never (default: 2)")
    group.add_argument("--checkpoint-every", type=int, help="full layer checkpoint every N batches (default: 10)")
    group.add_argument("--limit", type=int, help="edit at most N facts in total (default: all it can claim)")
    group.add_argument("--pool", dest="fact_pool", choices=("shared", "private"),
                       help="shared: edit pending facts once (bulk updates); private: every fact of the source (studies) "
                       "(default: shared)")
    group.add_argument("--source", dest="fact_source", help="only facts ingested under this source name")
    group.add_argument("--eval-profile", dest="evaluation_profile", choices=("quick", "standard", "paper"),
                       help="evaluation sizes (default: standard)")
    group.add_argument("--eval-set", type=parse_override, action="append", default=[], metavar="KEY=VALUE",
                       help="evaluation override, e.g. n_downstream=50 or downstream_tasks='[\"sst2\"]'")
    group.add_argument("--retention-sample", type=int, help="earlier edits re-checked per evaluation (default: 64)")
    group.add_argument("--eval-mode", choices=("inline", "async"), help="inline (default): evaluate in this "
                       "process; async: submit each point to the evaluate deployment (seqedit deploy-evaluator) "
                       "and go on editing")
    group.add_argument("--eval-deployment", help="the evaluate deployment for --eval-mode async "
                       "(default evaluate/seqedit-evaluate)")
    group.add_argument("--no-health-checks", dest="health_checks", action="store_false", default=None,
                       help="skip the cheap check after every batch (norms, v*, perplexity probe)")
    group.add_argument("--collapse-policy", choices=("warn", "stop", "rollback"), help="on collapse (default: warn)")
    group.add_argument("--after-rollback", choices=("stop", "continue"), help="after a collapse rollback (default: stop)")
    group.add_argument("--collapse-rule", action="append", default=[], metavar="METRIC:TEST:THRESHOLD",
                       help="replace the default rules, e.g. 'acc.*:drop:0.15' 'ppl.*:ratio:2' (tests: drop, "
                            "ratio, below, above)")
    group.add_argument("--save-model", help="write the edited model to this folder when the run stops")
    group.add_argument("--name", help="a name for the run")
    runtime = add_runtime_options(parser)
    parser.set_defaults(run_options={action.dest: action.option_strings[0]
                                     for action in (*group._group_actions, *runtime._group_actions)})


def given_run_options(args: argparse.Namespace) -> list[str]:
    """The run options (their flags) given on this command line."""
    return [flag for dest, flag in args.run_options.items() if getattr(args, dest) not in (None, [], False)]


def imported_overrides(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """The edit overrides a reference hparams file maps to (:mod:`editing.hparams_import`); its method becomes
    the run's algorithm unless one is given."""
    import logging

    from editing.hparams_import import check_for_model, import_hparams
    from editing.models.loading import layer_count

    imported = import_hparams(path, data.get("algorithm"))
    if imported.algorithm is not None:
        data.setdefault("algorithm", imported.algorithm)
    try:
        check_for_model(imported, layer_count(data.get("model")), f"--hparams-from {path.name}")
    except ValueError as warning:  # the references read v*'s loss at this layer; seqedit at the output
        logging.getLogger(__name__).warning("%s (seqedit reads v*'s loss at the model's output)", warning)
    return imported.overrides


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """RunSettings as a dict: the YAML file, then every option given on the command line.

    An option whose name is a field of :class:`RunSettings` sets that field; the rest are merged into
    the nested settings they belong to (edit overrides, evaluation overrides, collapse policy, runtime).
    """
    import yaml

    from editing.config import flatten, layer_overrides
    from flows.settings import RunSettings

    data: dict[str, Any] = (yaml.safe_load(args.config.read_text()) or {}) if args.config else {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {args.config}: expected a mapping of run settings, got {type(data).__name__}")
    fields = set(RunSettings.__dataclass_fields__) - {"edit_overrides", "evaluation_overrides", "collapse", "runtime"}
    for name in args.run_options:
        if name in fields and getattr(args, name) is not None:
            data[name] = getattr(args, name)
    for nested in ("edit_overrides", "evaluation_overrides", "collapse", "runtime"):
        if not isinstance(data.get(nested, {}), dict):
            raise ValueError(f"{nested}: expected a mapping, got {data[nested]!r} (--config {args.config})")
    edit = {**flatten(data.get("edit_overrides", {})), **dict(args.edit_set)}  # --set wins (editing.config)
    if getattr(args, "hparams_from", None) is not None:
        edit = {**imported_overrides(args.hparams_from, data), **edit}
    if args.layers is not None:
        edit.update(layer_overrides(args.layers, args.distribution))
    elif args.distribution is not None:
        edit["distribution"] = args.distribution
    data["edit_overrides"] = edit
    data["evaluation_overrides"] = dict(data.get("evaluation_overrides", {}), **dict(args.eval_set))
    collapse = dict(data.get("collapse", {}))
    if args.collapse_policy:
        collapse["action"] = args.collapse_policy
    if args.after_rollback:
        collapse["after_rollback"] = args.after_rollback
    if args.collapse_rule:
        collapse["rules"] = list(args.collapse_rule)
    data["collapse"] = collapse
    data["runtime"] = dict(data.get("runtime", {}), **runtime_from_args(args))
    return data


def check_layers(settings) -> None:
    """Refuse edit layers the model does not have, from its configuration alone (no weights loaded)."""
    from editing.distribution import get_distribution
    from editing.models.loading import layer_count

    config = settings.edit_config()
    count = layer_count(settings.model)
    layers = get_distribution(config.distribution).edit_layers(config.layers)
    missing = [layer for layer in layers if count is not None and not 0 <= layer < count]
    if missing:
        raise ValueError(f"layers: {missing} not in the model ({settings.model or 'SmolLM2-135M'} has layers "
                         f"0-{count - 1})")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="edit pending facts sequentially, evaluating and checking for collapse",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", metavar="URL", help=DB_HELP)
    parser.add_argument("--resume", type=int, metavar="RUN_ID", help="continue this run from its last committed batch")
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    add_run_options(parser)
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    import sys

    from db.runs import get_run
    from flows.commands.common import check_datasets, check_run_datasets, check_writer_free, open_ledger
    from flows.pipeline import NothingToEdit, check_something_to_edit, sequential_edit
    from flows.settings import RunSettings

    engine = open_ledger(args.db)
    if args.resume is not None:
        ignored = given_run_options(args)
        if ignored:
            raise ValueError(f"--resume continues run {args.resume} with the settings it was created with; "
                             f"leave out {', '.join(ignored)}")
        run = get_run(engine, args.resume)
        check_writer_free(engine, args.resume)
        check_run_datasets(run)
        outcome = sequential_edit(run_id=args.resume, db_url=args.db)
    else:
        settings = RunSettings.from_dict(settings_from_args(args))  # keys and types, before Prefect starts
        settings.edit_config()  # the edit overrides' keys and types
        try:
            check_something_to_edit(engine, settings)
        except NothingToEdit as nothing:
            print(f"seqedit run: {nothing}", file=sys.stderr)
            return 1
        check_layers(settings)
        check_datasets(settings)
        outcome = sequential_edit(settings=settings.to_dict(), db_url=args.db)
    if args.json:
        print(json.dumps(outcome))
    else:
        print(f"run {outcome['run_id']} {outcome['status']} at batch {outcome['seq']}; "
              f"see `seqedit history --run {outcome['run_id']}` and `seqedit report --run {outcome['run_id']}`")
    return 0
