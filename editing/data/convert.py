"""Hub rows → a dataset's file form: one writer per layout the readers know.

A hub copy is converted once, when it is downloaded (:mod:`editing.data.hub`),
into exactly the file a mirror would hold, so every reader downstream has one
input format whatever the dataset's origin. Each converter takes the rows (plain
dicts, as ``datasets`` yields them) and returns the file's bytes.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Mapping

Rows = Iterable[Mapping[str, Any]]

NLI_LABELS = ("entailment", "not_entailment")
"""GLUE RTE's class names in label order: the mirror's NLI file spells the label out."""


def text_lines(rows: Rows) -> bytes:
    """WikiText: one row per line of the raw text (the hub's rows keep their trailing newline)."""
    return "".join(row["text"] if row["text"].endswith("\n") else row["text"] + "\n" for row in rows).encode()


def wikipedia_leads(rows: Rows) -> bytes:
    """Wikipedia articles → JSON lines ``{"title", "extract"}``, the extract being the article's first
    paragraph (its lead, as the mirror's REST-API summaries are)."""
    lines = []
    for row in rows:
        lead = row["text"].strip().split("\n\n", 1)[0].strip()
        if lead:
            lines.append(json.dumps({"title": row["title"], "extract": lead}, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode()


def records(rows: Rows) -> bytes:
    """The rows as a JSON list, fields unchanged (the GLUE and MMLU files keep the hub's schema)."""
    return _json_list(dict(row) for row in rows)


def nli(rows: Rows) -> bytes:
    """GLUE RTE rows → the NLI file's records: ``index`` as text and the label by name."""
    return _json_list({"index": str(row["idx"]), "sentence1": row["sentence1"], "sentence2": row["sentence2"],
                       "label": NLI_LABELS[row["label"]]} for row in rows)


def counterfact(rows: Rows) -> bytes:
    """CounterFact rows (the ROME schema, split into train and test on the hub) in ``case_id`` order,
    the order of the canonical file."""
    return _json_list(sorted((dict(row) for row in rows), key=lambda row: row["case_id"]))


def _json_list(items: Iterable[Mapping[str, Any]]) -> bytes:
    return json.dumps(list(items), ensure_ascii=False).encode()


CONVERTERS: dict[str, Callable[[Rows], bytes]] = {
    "text_lines": text_lines, "wikipedia_leads": wikipedia_leads, "records": records, "nli": nli,
    "counterfact": counterfact, "mmlu": records,
}
"""Converter name (``convert`` in the catalog) → converter. ``json_file`` (a raw file already in its
file form) needs none."""
