"""``seqedit report --run ID``: a PNG of the run's metrics over the edits and a markdown summary.

With several ``--run``, the runs are compared: their curves on shared axes (ES/PS/NS of the batch just
edited, retention, perplexity, downstream accuracy, the last edited layer's norm growth) and a table of
where each raised its first collapse alarm. ``--html`` writes one static page for an audit of a run
(verification, configuration, lineage, plots, metrics with a legend, alarms, rollbacks, timeline)."""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.commands.common import DB_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="plot a run's metrics (PNG) and summarise it (markdown)",
                                   description=__doc__)
    parser.add_argument("--run", type=int, required=True, action="append", metavar="RUN_ID",
                        help="a run to report; repeat to compare runs")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="folder for the files (default: ./reports)")
    parser.add_argument("--db", metavar="URL", help=DB_HELP)
    parser.add_argument("--quiet", action="store_true", help="print only the paths, not the summary")
    parser.add_argument("--html", action="store_true", help="write the run's audit page, run-N-audit.html, instead "
                        "(one file, no server: open it in any browser)")
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


def write_comparison(engine, run_ids: list[int], out: Path) -> tuple[Path, Path, str]:
    """(plot path, markdown path, markdown text) of runs compared."""
    from flows.reporting import comparison_markdown, plot_comparison

    markdown = comparison_markdown(engine, run_ids)
    out.mkdir(parents=True, exist_ok=True)
    name = "compare-runs-" + "-".join(map(str, run_ids))
    summary = out / f"{name}.md"
    summary.write_text(markdown)
    return plot_comparison(engine, run_ids, out / f"{name}.png"), summary, markdown


def handle(args: argparse.Namespace) -> int:
    from flows.commands.common import open_ledger

    engine = open_ledger(args.db, read_only=True)
    if args.html:
        if len(args.run) > 1:
            raise ValueError("--html is the audit page of one run: give one --run")
        from flows.audit_page import audit_page

        args.out.mkdir(parents=True, exist_ok=True)
        page = args.out / f"run-{args.run[0]}-audit.html"
        page.write_text(audit_page(engine, args.run[0]), encoding="utf-8")
        print(f"audit page: {page}")
        return 0
    if len(args.run) > 1:
        plot, summary, markdown = write_comparison(engine, args.run, args.out)
    else:
        plot, summary, markdown = write_report(engine, args.run[0], args.out)
    if not args.quiet:
        print(markdown)
    print(f"plot:    {plot}\nsummary: {summary}")
    return 0
