"""Edit throughput: the batched engine against the reference's per-fact v*, with the quality of both.

For each batch size B, on the first B facts of ``--data``:

* **naive**: the reference's v* (MEMIT/UME ``compute_z``, 25 steps, the bare
  prompt and 5 prefixes of 10 tokens, whole-model passes, one fact at a time;
  ``bench/naive_reference.py``), then the same solve as the engine's;
* **engine**: ``Editor.apply`` (only the blocks above the edit layer per step,
  rewrite and KL rows batched over facts, early stopping per fact), once per
  *variant* of the v* settings: by default the model's hyperparameters
  (``hparams``) and the references' optimiser, Adam for 25 steps (``adam-25``);
  ``--variant NAME=JSON`` adds dotted overrides (``values.optimizer``, …).

Both edit the same facts from the same model state with the same objective, and
ES/PS/NS are measured after each, so the speed-up is reported next to what
it costs in quality; each variant's v* steps, final NLL and ‖δ‖/‖h‖ (how far its
targets moved, which decides how large the update is) are printed beside it. The
naive rate does not depend on B, so it is measured once, on the facts of the
largest B not above ``--naive-facts``.

    python bench/edit_throughput.py --sizes 1,16,64 --naive-facts 16
    python bench/edit_throughput.py --sizes 16 --variant 'lbfgs-8={"values.optimizer": "lbfgs", "values.steps": 8}'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

import torch

from editing.config import hparams_key_for, load_edit_config
from editing.distribution import distribute
from editing.editor import Editor
from editing.evaluation import counterfact_metrics
from editing.facts import fact_from_record
from editing.rows import build_rewrite_rows
from editing.models import load_model
from editing.runtime import Runtime
from editing.v_star import VStar
from naive_reference import naive_z, reference_prefixes

T = TypeVar("T")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact"
TRAIN = DATA / "counterfact-easyedit-train.json"
QUALITY = ("es", "ps", "ns")
ADAM_25 = {"values.optimizer": "adam", "values.lr": 0.5, "values.steps": 25, "values.nll_threshold": None}
"""The references' v* optimiser (MEMIT/UME ``compute_z``: Adam, lr 0.5, 25 steps, the loss threshold only)."""


def variant(text: str) -> tuple[str, dict]:
    """``NAME=JSON``: a named set of dotted edit overrides."""
    name, _, overrides = text.partition("=")
    try:
        parsed = json.loads(overrides)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"--variant {name}: not a JSON object ({error})") from None
    if not name or not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("--variant is NAME={JSON object of dotted overrides}")
    return name, parsed


class PeakMemory:
    """Peak resident memory (CPU, sampled every 10 ms) or peak allocated CUDA memory during a block."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_bytes = max(self.peak_bytes, self._rss())

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()


def timed(device: torch.device, work: Callable[[], T]) -> tuple[T, float, int]:
    """``work``'s result, its wall time and the peak memory while it ran."""
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        result = work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    return result, seconds, memory.peak_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,8,32,128")
    parser.add_argument("--algo", default="emmet", choices=("memit", "emmet", "alphaedit", "encore"))
    parser.add_argument("--data", type=Path, default=TRAIN)
    parser.add_argument("--offset", type=int, default=2000, help="first record (default: outside the tuning slice)")
    parser.add_argument("--naive-facts", type=int, default=32, help="facts the naive loop edits (largest B ≤ this)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--hparams", default=None, help="hparams file key or path (default: by the model's name)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="model dtype (default: the runtime's auto)")
    parser.add_argument("--variant", type=variant, action="append", default=[],
                        help="NAME=JSON overrides of the v* settings, measured besides hparams and adam-25")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    variants = {"hparams": {}, "adam-25": ADAM_25, **dict(args.variant)}

    runtime = Runtime(device=args.device, **({"dtype": args.dtype} if args.dtype else {}))
    threads = runtime.apply_threads()
    adapter = load_model(args.model, device=runtime.torch_device, dtype=runtime.model_dtype)
    hparams = args.hparams or hparams_key_for(adapter.name)
    config = load_edit_config(hparams, args.algo)
    sizes = [int(s) for s in args.sizes.split(",")]
    records = json.loads(args.data.read_text())[args.offset:args.offset + max(sizes)]
    all_facts = [fact_from_record(record, args.offset + i) for i, record in enumerate(records)]
    editor = Editor.prepare(adapter, config, runtime=runtime)
    editors = {name: Editor.prepare(adapter, load_edit_config(hparams, args.algo, overrides),
                                    prefixes=editor.prefixes, runtime=runtime) if overrides else editor
               for name, overrides in variants.items()}
    original = adapter.snapshot(list(editor.layers))
    device = adapter.device

    naive_size = max([size for size in sizes if size <= args.naive_facts], default=min(sizes))
    naive = naive_edit(adapter, editor, all_facts[:naive_size], device)
    adapter.restore(original)
    rows = []
    for size in sizes:
        facts = all_facts[:size]
        for name, engine in editors.items():
            adapter.restore(original)
            edit, seconds, peak = timed(device, lambda: engine.apply(facts))
            quality = counterfact_metrics(adapter, facts).metrics()
            row = {"batch_size": size, "variant": name, "values": variants[name],
                   "engine_facts_per_s": size / seconds, "engine_v_star_facts_per_s": size / edit.seconds["v_star"],
                   "naive_facts_per_s": naive["facts_per_s"], "speedup": (size / seconds) / naive["facts_per_s"],
                   "engine_steps_mean": float(edit.v_star.steps.float().mean()),
                   "engine_v_star_nll": float(edit.v_star.final_nll.mean()),
                   "engine_delta_rel_norm": relative_delta_norm(edit.v_star),
                   "engine_stop_reasons": {r: edit.v_star.stop_reasons.count(r) for r in set(edit.v_star.stop_reasons)},
                   "engine_peak_mib": peak / 2**20, **{f"engine_{k}": quality.get(k) for k in QUALITY}}
            if size == naive_size:
                row.update({f"naive_{k}": naive["quality"].get(k) for k in QUALITY})
            rows.append(row)
            if not args.json:
                both = f"  naive {_q(naive['quality'])}" if size == naive_size else ""
                print(f"B={size:4d} {name:>10s}  {row['engine_facts_per_s']:7.3f} facts/s "
                      f"(v* steps {row['engine_steps_mean']:4.1f}, NLL {row['engine_v_star_nll']:.3f}, "
                      f"|δ|/|h| {row['engine_delta_rel_norm']:.2f}) "
                      f"vs naive {naive['facts_per_s']:7.3f} facts/s: x{row['speedup']:5.1f}  |  ES/PS/NS "
                      f"{_q(quality)}{both}  peak {row['engine_peak_mib']:.0f} MiB", flush=True)
    adapter.restore(original)
    summary = {"device": str(device), "threads": threads, "algorithm": args.algo, "layers": list(editor.layers),
               "naive": {k: v for k, v in naive.items() if k != "z"}, "naive_facts": naive_size, "rows": rows}
    if args.json:
        print(json.dumps(summary))
    return 0


def naive_edit(adapter, editor: Editor, facts: list, device: torch.device) -> dict:
    """The reference's per-fact v* for ``facts``, then the engine's own solve of those targets."""
    model, tokenizer = adapter.model, adapter.tokenizer
    prefixes = reference_prefixes(model, tokenizer)
    requires_grad = [p.requires_grad for p in model.parameters()]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    block = adapter.block(editor.layers[-1])
    params = editor.config.values
    try:
        targets, seconds, _ = timed(device, lambda: torch.stack([naive_z(
            model, tokenizer, block, fact.subject, fact.prompt, fact.target_new, prefixes,
            clamp_norm_factor=params.clamp_norm_factor, kl_factor=params.kl_factor,
            weight_decay=params.weight_decay).float().cpu() for fact in facts]))
    finally:
        for parameter, flag in zip(model.parameters(), requires_grad):
            parameter.requires_grad_(flag)
    rows = build_rewrite_rows(adapter, facts, tuple(prefixes), with_targets=False)
    distribute(adapter, rows, targets, editor.layers, editor.distribution, editor.solver)
    return {"facts_per_s": len(facts) / seconds, "seconds": seconds,
            "quality": counterfact_metrics(adapter, facts).metrics()}


def relative_delta_norm(v_star: VStar) -> float:
    """Mean ‖δ_i‖ / ‖h_i‖ over the batch: how far each target was moved from the unedited residual.

    The loss's weight decay is small, so many δ write the target; this says which one an optimiser found —
    the larger it is, the larger the update that must write it and the more every other input is disturbed.
    """
    delta = v_star.delta.float()
    residual = (v_star.z - v_star.delta).float()
    return float((delta.norm(dim=-1) / residual.norm(dim=-1)).mean())


def _q(metrics: dict) -> str:
    return "/".join(f"{metrics.get(k, float('nan')):.3f}" for k in QUALITY)


if __name__ == "__main__":
    sys.exit(main())
