"""``seqedit data list|fetch|verify``: the datasets seqedit reads and where each one comes from.

A dataset resolves from the mirror folder (``--data-dir`` or ``$SEQEDIT_DATA``), then the data bundled in the
package, then its pinned Hugging Face hub copy, downloaded once into ``$SEQEDIT_CACHE/data`` (``fetch``
downloads ahead of time, for offline use later). ``verify`` checks every local copy against the sha256 the
catalog pins (``editing/data/catalog.yaml``; a hub download against the hash recorded when it was fetched).
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="list, fetch and verify the datasets seqedit reads",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="each dataset: where it resolves now, records, size, licence, sha256")
    listing.add_argument("--json", action="store_true", help="print the table as JSON records")
    fetch = actions.add_parser("fetch", help="download hub copies into the cache (for offline use later)")
    fetch.add_argument("names", nargs="+", metavar="NAME", help="dataset names, or 'all' for every hub copy")
    verify = actions.add_parser("verify", help="check every local copy against its pinned sha256")
    verify.add_argument("names", nargs="*", metavar="NAME", help="datasets to check (default: all)")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    return {"list": _list, "fetch": _fetch, "verify": _verify}[args.action](args)


def _list(args: argparse.Namespace) -> int:
    from editing.data import catalog
    from editing.data.inventory import availability

    rows = []
    for spec in catalog().values():
        found = availability(spec)
        if found.origin is None:
            resolves = "not here (hub: data fetch)" if spec.hub else "not here (mirror only)"
        else:
            resolves = found.origin if found.scope == "all" else f"{found.origin} ({found.scope})"
        rows.append({"dataset": spec.name, "kind": spec.kind, "resolves": resolves,
                     "records": found.records, "bytes": found.size, "licence": spec.licence,
                     "sha256": found.sha256, "path": str(found.path) if found.path else None,
                     "hub": spec.hub.describe() if spec.hub else None})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'dataset':27s} {'kind':10s} {'resolves':32s} {'records':>8s} {'size':>9s} {'sha256':16s} licence")
    for row in rows:
        size = f"{row['bytes'] / 1e6:.2f} MB" if row["bytes"] is not None else "-"
        records = f"{row['records']:,d}" if row["records"] is not None else "-"
        print(f"{row['dataset']:27s} {row['kind']:10s} {row['resolves']:32s} {records:>8s} {size:>9s} "
              f"{(row['sha256'] or '-')[:16]:16s} {row['licence']}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from editing.data import catalog, dataset_spec
    from editing.data.hub import fetch
    from editing.data.inventory import count_records
    from editing.models.loading import file_sha256

    names = [spec.name for spec in catalog().values() if spec.hub] if args.names == ["all"] else args.names
    for name in names:
        spec = dataset_spec(name)
        if spec.hub is None:
            raise LookupError(f"dataset {name!r} has no hub copy; it comes only from a mirror folder")
        path = fetch(spec)
        print(f"{name}: {count_records(spec, path):,d} records from {spec.hub.describe()} -> {path} "
              f"(sha256 {file_sha256(path)[:16]})", flush=True)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from editing.data import catalog, dataset_spec
    from editing.data.inventory import local_copies

    specs = [dataset_spec(name) for name in args.names] if args.names else list(catalog().values())
    failed = 0
    for spec in specs:
        copies = local_copies(spec)
        if not copies:
            print(f"{spec.name:27s} -        no local copy")
        for check in copies:
            verdict = {True: "ok", False: "MISMATCH", None: "unpinned"}[check.ok]
            failed += check.ok is False
            detail = "" if check.ok else f" (sha256 {check.actual[:16]}, pinned {(check.expected or '-')[:16]})"
            print(f"{spec.name:27s} {check.origin:8s} {verdict}{detail}  {check.path}")
    if failed:
        print(f"{failed} local cop{'y does' if failed == 1 else 'ies do'} not match the catalog", flush=True)
        return 1
    return 0
