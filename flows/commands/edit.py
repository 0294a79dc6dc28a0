"""``seqedit edit``: a one-shot batch edit of facts from a file, with pre/post CounterFact metrics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flows.commands.common import ALGORITHMS, add_runtime_options, parse_layers, parse_override, runtime_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("edit", help="edit facts from a file into a model and report pre/post metrics",
                                   description=__doc__)
    parser.add_argument("--facts", type=Path, required=True, help="CounterFact JSON/JSONL (full or EasyEdit schema)")
    parser.add_argument("--limit", type=int, help="edit only the first N facts")
    parser.add_argument("--algo", choices=ALGORITHMS, required=True, help="objective to solve")
    parser.add_argument("--batch-size", type=int, default=1, help="facts per edit batch (rome: 1)")
    parser.add_argument("--layers", type=parse_layers, help="edit layers, e.g. 4,5,6,7,8 (default: the model's hparams)")
    parser.add_argument("--model", help="Hugging Face name, local folder or .gguf file (default: SmolLM2-135M)")
    parser.add_argument("--hparams", help="hyperparameter set name in editing/hparams (default: matched to the model)")
    parser.add_argument("--set", dest="overrides", type=parse_override, action="append", default=[], metavar="KEY=VALUE",
                        help="override a hyperparameter, e.g. --set values.steps=10 --set objective.mom2_update_weight=1000")
    parser.add_argument("--save", type=Path, help="save the edited model (safetensors) to this folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_runtime_options(parser)
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from editing.runtime import Runtime
    from flows.one_shot import METRIC_KEYS, OneShotRequest, run_one_shot

    report = run_one_shot(OneShotRequest(
        facts_path=args.facts, algorithm=args.algo, batch_size=args.batch_size, limit=args.limit,
        layers=args.layers, model=args.model, hparams=args.hparams, overrides=dict(args.overrides), save=args.save,
        runtime=Runtime(**runtime_from_args(args))))
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['algorithm']} on {report['model']}: {report['n_facts']} facts, batch {report['batch_size']}, "
          f"layers {report['layers']} ({report['distribution']})")
    print(f"{'':6}" + "".join(f"{key:>8}" for key in METRIC_KEYS))
    for phase in ("pre", "post"):
        print(f"{phase:6}" + "".join("       -" if report[phase][key] is None else f"{report[phase][key]:8.3f}"
                                     for key in METRIC_KEYS))
    print("memorization per layer: " + ", ".join(f"{layer} {value:.3f}" for layer, value in
                                                 report["memorization"].items()))
    print("seconds: " + ", ".join(f"{key} {value:.1f}" for key, value in report["seconds"].items()))
    return 0
