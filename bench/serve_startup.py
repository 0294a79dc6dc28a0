"""Start-up of one scheduled bulk update: a new process per flow run against the serving process itself.

Creates a run (one batch of ``--facts`` facts) on ``--model``, then times an update that finds nothing new to
edit — what remains is the start-up: (a) in a new process (``seqedit run --resume``, as Prefect's runner
starts one per flow run: imports, model load, C0 from the cache, the run's state restored from the ledger and
verified); (b) in this process, the model already loaded (``seqedit serve``'s default, :mod:`flows.resident`).

    python bench/serve_startup.py                                   # SmolLM2
    python bench/serve_startup.py --model out/random-llama-1b --hparams smollm2-135m --set stats.n_samples=64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from db.engine import make_engine
from db.ingest import ingest_file
from db.migrate import upgrade
from editing.data import resolve
from flows.commands.common import parse_override
from flows.pipeline import sequential_edit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--hparams", default=None)
    parser.add_argument("--set", dest="edit_set", type=parse_override, action="append", default=[],
                        metavar="KEY=VALUE")
    parser.add_argument("--facts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="serve-startup-"))
    url = f"sqlite:///{folder / 'ledger.db'}"
    upgrade(url)
    records = json.loads(resolve("counterfact-sample").path.read_text())[: args.facts]
    (folder / "facts.json").write_text(json.dumps(records))
    ingest_file(make_engine(url), folder / "facts.json", source="bench")
    overrides = dict(args.edit_set)
    settings = {"algorithm": "memit", "batch_size": args.facts, "eval_every": 0, "health_checks": False,
                "fact_source": "bench", "runtime": {"device": "cpu"}, "edit_overrides": overrides,
                **({"model": args.model} if args.model else {}), **({"hparams": args.hparams} if args.hparams else {})}
    started = time.perf_counter()
    run_id = sequential_edit(settings=settings, db_url=url)["run_id"]
    print(f"run {run_id} created and its first batch edited in {time.perf_counter() - started:.1f} s "
          "(first load, C0 computed or read)")
    command = [sys.executable, "-m", "flows.cli", "run", "--resume", str(run_id), "--db", url]
    for repeat in range(args.repeats):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode not in (0, 1):  # 1: nothing to edit, which is the point here
            raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr[-2000:]}")
        print(f"  new process per update   {time.perf_counter() - started:6.1f} s")
        started = time.perf_counter()
        sequential_edit(run_id=run_id, db_url=url)
        print(f"  in the serving process   {time.perf_counter() - started:6.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
