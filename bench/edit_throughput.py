"""Edit throughput: facts/second and peak memory per batch size, batched v* vs. a per-fact loop.

The batched editor shares every forward/backward pass of the v* optimisation
between the facts of a batch; the loop runs the very same code one fact at a
time. Their ratio is what batching buys. The batched v* time is the one the
edit itself records (``BatchEdit.seconds["v_star"]``), so each size runs its
optimisation once. The loop is timed once, on ``--loop-facts`` facts (its cost
is linear in the number of facts and does not depend on B), so that large batch
sizes stay affordable on a CPU.

    python bench/edit_throughput.py --sizes 1,8,32,128 --algo emmet
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
from editing.editor import Editor
from editing.facts import fact_from_record
from editing.keys_values import compute_value_targets
from editing.models import load_model

T = TypeVar("T")
COUNTERFACT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact" / "counterfact-1000.json"


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
    parser.add_argument("--algo", default="emmet", choices=("memit", "emmet"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--loop-facts", type=int, default=8, help="facts timed in the per-fact loop")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    adapter = load_model(args.model, device=args.device)
    config = load_edit_config(hparams_key_for(adapter.name), args.algo)
    records = json.loads(COUNTERFACT.read_text())
    editor = Editor.prepare(adapter, config)
    original = adapter.snapshot(list(editor.layers))
    device = adapter.device
    # The per-fact loop's rate does not depend on B: measure it once, on the first facts.
    loop_facts = [fact_from_record(r) for r in records[: args.loop_facts]]
    _, loop_seconds, loop_peak = timed(device, lambda: [compute_value_targets(
        adapter, [fact], editor.layers[-1], editor.prefixes, config.values) for fact in loop_facts])
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        facts = [fact_from_record(r) for r in records[:size]]
        adapter.restore(original)
        edit, batch_seconds, batch_peak = timed(device, lambda: editor.apply(facts))
        v_star_seconds = edit.seconds["v_star"]
        row = {
            "batch_size": size,
            "facts_per_s_edit": size / batch_seconds,
            "v_star_facts_per_s_batched": size / v_star_seconds,
            "v_star_facts_per_s_loop": len(loop_facts) / loop_seconds,
            "speedup_v_star": (size / v_star_seconds) / (len(loop_facts) / loop_seconds),
            "seconds_edit": batch_seconds,
            "seconds_solve": edit.seconds["solve"],
            "peak_mib_batched_edit": batch_peak / 2**20,
            "peak_mib_loop": loop_peak / 2**20,
        }
        rows.append(row)
        if not args.json:
            print(f"B={size:4d}  edit {row['facts_per_s_edit']:7.3f} facts/s  |  v* batched "
                  f"{row['v_star_facts_per_s_batched']:7.3f} vs loop {row['v_star_facts_per_s_loop']:7.3f} facts/s "
                  f"(x{row['speedup_v_star']:.2f})  |  peak {row['peak_mib_batched_edit']:8.0f} MiB batched, "
                  f"{row['peak_mib_loop']:8.0f} MiB loop", flush=True)
    adapter.restore(original)
    if args.json:
        print(json.dumps({"device": str(device), "algorithm": args.algo, "layers": list(editor.layers),
                          "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
