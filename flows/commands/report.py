"""``seqedit report --run ID``: a PNG of the run's metrics over the edits and a markdown summary."""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.commands.common import DB_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="plot a run's metrics (PNG) and summarise it (markdown)",
                                   description=__doc__)
    parser.add_argument("--run", type=int, required=True, metavar="RUN_ID")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="folder for the files (default ./reports)")
    parser.add_argument("--db", metavar="URL", help=DB_HELP)
    parser.add_argument("--quiet", action="store_true", help="print only the paths, not the summary")
    parser.set_defaults(handler=handle)


def write_report(engine, run_id: int, out: Path) -> tuple[Path, Path, str]:
    """(plot path, markdown path, markdown text)."""
    from flows.reporting import markdown_summary, plot_metrics

    markdown = markdown_summary(engine, run_id)
    out.mkdir(parents=True, exist_ok=True)
    summary = out / f"run-{run_id}-summary.md"
    summary.write_text(markdown)
    plot = plot_metrics(engine, run_id, out / f"run-{run_id}-metrics.png")
    return plot, summary, markdown


def handle(args: argparse.Namespace) -> int:
    from db.engine import make_engine
    from db.migrate import require_current

    engine = make_engine(args.db)
    require_current(engine)
    plot, summary, markdown = write_report(engine, args.run, args.out)
    if not args.quiet:
        print(markdown)
    print(f"plot:    {plot}\nsummary: {summary}")
    return 0
