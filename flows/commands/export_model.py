"""``seqedit export-model --run ID [--seq N] --out DIR``: a run's edited model, out of the pipeline.

Writes the model of run ID after applied batch N (default: its last) as a Hugging Face folder —
config, tokenizer, safetensors weights — that plain ``transformers`` loads
(``AutoModelForCausalLM.from_pretrained(DIR)``), plus ``seqedit.json``: the run, batch, algorithm,
model identity, edited layers, the facts applied up to N and the ledger's sha256 of every edited
layer at N. The edited layers are rebuilt from the ledger (checkpoint + deltas) and the written
files are read back and checked against those hashes before the folder is put in place.

``--format gguf`` also writes ``model-f32.gguf`` (float32, Llama-architecture models such as the
default SmolLM2), for llama.cpp and other GGUF runtimes. A non-empty DIR is refused unless
``--force`` (which replaces the model files in it and leaves other files alone).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flows.commands.common import DB_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export-model", help="write a run's edited model at any applied batch "
                                                        "(Hugging Face folder, optionally GGUF)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=int, required=True, metavar="RUN_ID", help="the run whose model to write")
    parser.add_argument("--seq", type=int, help="batch sequence number (default: the run's last applied batch)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model into (created)")
    parser.add_argument("--format", choices=("safetensors", "gguf"), default="safetensors",
                        help="safetensors: the Hugging Face folder; gguf: the folder and a float32 GGUF in it "
                             "(default: safetensors)")
    parser.add_argument("--force", action="store_true", help="replace the model files of a non-empty --out folder")
    parser.add_argument("--db", metavar="URL", help=DB_HELP)
    parser.add_argument("--json", action="store_true", help="print the provenance record (seqedit.json) as JSON")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from flows.commands.common import open_ledger
    from flows.model_export import PROVENANCE_FILE, export_model

    engine = open_ledger(args.db, read_only=True)
    folder = export_model(engine, args.run, args.seq, args.out, args.format, args.force)
    record = json.loads((folder / PROVENANCE_FILE).read_text())
    if args.json:
        print(json.dumps(record))
        return 0
    print(f"run {record['run_id']} at batch {record['seq']} ({record['algorithm']}, {record['n_facts']} facts) "
          f"-> {folder}")
    for layer, sha in record["layer_sha256"].items():
        print(f"  layer {layer:>3s} {record['parameters'][layer]}  sha256 {sha[:16]}… verified")
    for kind, names in record["files"].items():
        for name in [names] if isinstance(names, str) else names:
            print(f"  {kind:10s} {folder / name}")
    print(f"  {'provenance':10s} {folder / PROVENANCE_FILE}")
    return 0
