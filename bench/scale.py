"""Memory and time of each phase of an edit on a (large) model: C0, v*, keys and solves, and the ledger's size.

Loads ``--model`` (e.g. the random 1B Llama of ``bench/random_llama.py``), computes C0 for the edit layers on
``--texts`` texts, then edits ``--facts`` CounterFact facts in one batch, and prints, per phase, wall seconds and
peak memory (RSS on the CPU, allocated memory on CUDA), v* seconds per step, and the bytes the ledger would
store per edit (factors and keys, float32) and per checkpoint (the edited matrices).

    python bench/random_llama.py --out out/random-llama-1b
    python bench/scale.py --model out/random-llama-1b --texts 64 --facts 8 --steps 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edit_throughput import TRAIN, timed
from db.tensors import delta_to_bytes, keys_to_bytes
from editing.config import load_edit_config
from editing.distribution import get_distribution
from editing.editor import Editor
from editing.facts import fact_from_record
from editing.models import load_model
from editing.runtime import Runtime
from editing.stats import second_moments

GB = 1024 ** 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--hparams", default="smollm2-135m", help="hparams key or path (layers, v*, objective)")
    parser.add_argument("--algo", default="emmet")
    parser.add_argument("--texts", type=int, default=64, help="C0 texts (the real runs use 2,000-100,000)")
    parser.add_argument("--facts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="v* steps (timed per step)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--offset", type=int, default=2000)
    args = parser.parse_args()
    runtime = Runtime(device=args.device, **({"dtype": args.dtype} if args.dtype else {}))
    threads = runtime.apply_threads()
    device = runtime.torch_device
    (adapter, load_s, load_peak) = timed(device, lambda: load_model(args.model, device=device,
                                                                     dtype=runtime.model_dtype))
    config = load_edit_config(args.hparams, args.algo, {"stats.n_samples": args.texts, "stats.corpus": "wikitext-2-valid",
                                                        "values.steps": args.steps, "values.loss_threshold": 0.0,
                                                        "values.n_prefixes": 2, "values.prefix_tokens": 5})
    layers = list(get_distribution(config.distribution).edit_layers(config.layers))
    parameters = sum(p.numel() for p in adapter.model.parameters())
    print(f"{args.model}: {parameters / 1e9:.2f} B parameters, {runtime.model_dtype}, {device}, {threads} threads; "
          f"layers {layers}, d_in {adapter.key_dim}, d_out {adapter.hidden_dim}")
    print(f"  load        {load_s:8.1f} s  peak {load_peak / GB:6.2f} GiB")
    moments, c0_s, c0_peak = timed(device, lambda: second_moments(adapter, layers, config.stats, progress=False))
    print(f"  C0          {c0_s:8.1f} s  peak {c0_peak / GB:6.2f} GiB  ({args.texts} texts × ≤128 tokens, "
          f"{c0_s / args.texts:.2f} s per text; cached after the first run)")
    editor = Editor(adapter, config, moments, ("",) + tuple(f"Text {i}. " for i in range(2)), runtime)
    records = json.loads(Path(TRAIN).read_text())[args.offset:args.offset + args.facts]
    facts = [fact_from_record(record, args.offset + i) for i, record in enumerate(records)]
    edit, edit_s, edit_peak = timed(device, lambda: editor.apply(facts))
    steps = float(edit.v_star.steps.float().mean())
    seconds = edit.seconds
    print(f"  edit B={args.facts}  {edit_s:8.1f} s  peak {edit_peak / GB:6.2f} GiB")
    print(f"    v*        {seconds['v_star']:8.1f} s  ({steps:.1f} steps: {seconds['v_star'] / max(steps, 1):.2f} s "
          f"per step for the batch)")
    print(f"    keys      {seconds['keys']:8.1f} s")
    print(f"    solves    {seconds['solve']:8.1f} s  ({len(layers)} layers, {runtime.solve_dtype}, "
          f"{adapter.key_dim}² systems)")
    per_edit = sum(len(delta_to_bytes(update.delta)) + len(keys_to_bytes(update.keys)[0])
                   for update in edit.updates) / args.facts  # what the ledger writes for the batch, per fact
    checkpoint = sum(adapter.weight(layer).numel() * 4 for layer in layers)
    print(f"  ledger: {per_edit * 1000 / 1e6:.1f} MB per 1,000 edits (factors in the solve dtype + keys in float32), "
          f"{checkpoint / 1e6:.1f} MB per checkpoint ({len(layers)} float32 matrices)")
    print(f"  C0 / edit memory: {len(layers)} × {adapter.key_dim}² float32 = "
          f"{len(layers) * adapter.key_dim ** 2 * 4 / GB:.2f} GiB (float64 in the solves: twice that)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
