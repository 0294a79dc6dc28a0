"""The fact record: the one contract shared by the editor, the ledger and the CLI.

A *fact* is a requested rewrite: in ``prompt.format(subject)`` the model should
continue with ``target_new`` instead of ``target_true``. Records arrive in two
public schemas (the full ROME/MEMIT CounterFact schema and EasyEdit's reduced
one), in MEND's zsRE schema and as flat rows (CSV/JSONL); :func:`fact_from_record` turns any of them
into one validated :class:`Fact` or raises :class:`FactValidationError` naming
the record and the field, so that bad input is rejected before anything is
edited or stored.

This module is plain data (no torch) so that ``db/`` may import it without
depending on the editing internals.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

MAX_TEXT_CHARS = 2048
"""Longest accepted prompt/subject/target. CounterFact's longest prompt is ~300
characters; anything near a megabyte is a corrupt record, not a fact."""

PLACEHOLDER = "{}"


class FactValidationError(ValueError):
    """A record that cannot become a :class:`Fact`.

    ``record`` identifies the record in its source (case id, line or index),
    ``field`` the offending field and ``reason`` a short machine-friendly code
    (``missing``, ``empty``, ``subject_not_in_prompt``, ...) so the ledger can
    count rejections by reason.
    """

    def __init__(self, record: str, field: str, reason: str, detail: str) -> None:
        self.record = record
        self.field = field
        self.reason = reason
        self.detail = detail
        super().__init__(f"record {record}: field '{field}': {detail}")


@dataclass(frozen=True)
class Fact:
    """One validated edit request; ``prompt`` is a template with exactly one ``{}``."""

    subject: str
    prompt: str
    target_new: str
    target_true: str
    relation_id: str | None = None
    case_id: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    neighborhood_answer: str | None = None
    """What the neighbourhood prompts should still be answered with: zsRE's ``loc_ans``, EasyEdit's
    ``locality_ground_truth``; None means ``target_true`` (CounterFact's neighbours share the true object)."""

    @property
    def locality_target(self) -> str:
        """The answer the neighbourhood prompts are scored against."""
        return self.neighborhood_answer if self.neighborhood_answer is not None else self.target_true

    @property
    def rewrite_prompt(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace(PLACEHOLDER, self.subject, 1)

    @property
    def subject_span(self) -> tuple[int, int]:
        """Character span ``[start, end)`` of the subject inside :attr:`rewrite_prompt`."""
        start = self.prompt.index(PLACEHOLDER)
        return start, start + len(self.subject)

    def identity_key(self) -> str:
        """Hash of (subject, prompt template, target_new), normalised.

        Two requests with the same key ask for the same change; the ledger uses
        it to detect duplicates. Case and whitespace are ignored because they do
        not change what the model is asked to learn.
        """
        parts = (_normalise(self.subject), _normalise(self.prompt), _normalise(self.target_new))
        return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("paraphrase_prompts", "neighborhood_prompts", "generation_prompts"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Fact":
        """Inverse of :meth:`to_dict` (already-validated data, e.g. from the ledger)."""
        return cls(
            subject=data["subject"],
            prompt=data["prompt"],
            target_new=data["target_new"],
            target_true=data["target_true"],
            relation_id=data.get("relation_id"),
            case_id=data.get("case_id"),
            paraphrase_prompts=tuple(data.get("paraphrase_prompts") or ()),
            neighborhood_prompts=tuple(data.get("neighborhood_prompts") or ()),
            generation_prompts=tuple(data.get("generation_prompts") or ()),
            neighborhood_answer=data.get("neighborhood_answer"),
        )


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def fact_from_record(record: Mapping[str, Any], where: str | int | None = None) -> Fact:
    """Validate one record of any supported schema and return a :class:`Fact`.

    ``where`` names the record in its source (line number, index) when it has no
    ``case_id`` of its own; errors carry both.
    """
    if not isinstance(record, Mapping):
        raise FactValidationError(_label(None, where), "<record>", "not_an_object",
                                  f"expected a JSON object, got {type(record).__name__}")
    label = _label(record.get("case_id"), where)
    if isinstance(record.get("requested_rewrite"), Mapping):
        fields = _from_full_schema(record)
    elif "ground_truth" in record:
        fields = _from_reduced_schema(record, label)
    elif "src" in record and "alt" in record:
        fields = _from_zsre_schema(record, label)
    else:
        fields = _from_flat_schema(record, label)
    return _validated(fields, label)


def _label(case_id: Any, where: str | int | None) -> str:
    parts = []
    if case_id is not None and not _is_missing(case_id):
        parts.append(f"case_id={case_id}")
    if where is not None:
        parts.append(f"at {where}")
    return " ".join(parts) or "<unknown>"


def _is_missing(value: Any) -> bool:
    """True for None and NaN (how pandas marks an empty CSV cell)."""
    return value is None or (isinstance(value, float) and value != value)


def _target(value: Any) -> Any:
    """CounterFact nests targets as ``{"str": ..., "id": ...}``; accept both forms."""
    if isinstance(value, Mapping):
        return value.get("str")
    return value


def _from_full_schema(record: Mapping[str, Any]) -> dict[str, Any]:
    rewrite = record["requested_rewrite"]
    return {
        "subject": rewrite.get("subject"),
        "prompt": rewrite.get("prompt"),
        "target_new": _target(rewrite.get("target_new")),
        "target_true": _target(rewrite.get("target_true")),
        "relation_id": rewrite.get("relation_id"),
        "case_id": record.get("case_id"),
        "paraphrase_prompts": record.get("paraphrase_prompts"),
        "neighborhood_prompts": record.get("neighborhood_prompts"),
        "generation_prompts": record.get("generation_prompts"),
    }


def _template_from_filled(subject: Any, prompt: Any, label: str) -> Any:
    """Turn a prompt with the subject written out into a template with ``{}``.

    Values of the wrong type pass through unchanged so that the field checks in
    :func:`_validated` report them with the right reason.
    """
    if not (isinstance(subject, str) and isinstance(prompt, str) and subject.strip()):
        return prompt
    if subject not in prompt:
        raise FactValidationError(label, "subject", "subject_not_in_prompt",
                                  f"subject {subject!r} does not occur in prompt {prompt!r}")
    return prompt.replace(subject, PLACEHOLDER, 1)


def _from_reduced_schema(record: Mapping[str, Any], label: str) -> dict[str, Any]:
    """EasyEdit's schema: the prompt has the subject already filled in."""
    subject = record.get("subject")
    return {
        "subject": subject,
        "prompt": _template_from_filled(subject, record.get("prompt"), label),
        "target_new": _target(record.get("target_new")),
        "target_true": _target(record.get("ground_truth")),
        "relation_id": record.get("relation_id"),
        "case_id": record.get("case_id"),
        "paraphrase_prompts": record.get("rephrase_prompt"),
        "neighborhood_prompts": record.get("locality_prompt"),
        "generation_prompts": record.get("generation_prompts"),
        "neighborhood_answer": record.get("locality_ground_truth"),
    }


def _from_zsre_schema(record: Mapping[str, Any], label: str) -> dict[str, Any]:
    """MEND's zsRE schema (``src`` question, ``alt`` new answer, ``answers``, ``rephrase``, ``loc``/``loc_ans``).

    zsRE has no counterfactual "true" target; ``target_true`` is its first ground-truth answer (or the
    base model's ``pred``) that differs from ``alt``, so the probability comparisons (ES, PS) stay
    defined. zsRE's own metrics are the token accuracies, which read only ``alt`` and ``loc_ans``."""
    subject, new = record.get("subject"), record.get("alt")
    answers = record.get("answers") if isinstance(record.get("answers"), list) else []
    candidates = [a for a in [*answers, record.get("pred")] if isinstance(a, str) and a.strip()]
    true = next((a for a in candidates if not isinstance(new, str) or _normalise(a) != _normalise(new)),
                candidates[0] if candidates else None)
    return {
        "subject": subject,
        "prompt": _template_from_filled(subject, record.get("src"), label),
        "target_new": new,
        "target_true": true,
        "relation_id": record.get("relation_id"),
        "case_id": record.get("case_id"),
        "paraphrase_prompts": record.get("rephrase"),
        "neighborhood_prompts": record.get("loc"),
        "neighborhood_answer": record.get("loc_ans"),
    }


def _from_flat_schema(record: Mapping[str, Any], label: str) -> dict[str, Any]:
    """Flat rows (CSV, JSONL): ``prompt`` may be a template or have the subject filled in."""
    subject, prompt = record.get("subject"), record.get("prompt")
    if not (isinstance(prompt, str) and PLACEHOLDER in prompt):
        prompt = _template_from_filled(subject, prompt, label)
    return {
        "subject": subject,
        "prompt": prompt,
        "target_new": _target(record.get("target_new")),
        "target_true": _target(record.get("target_true")),
        "relation_id": record.get("relation_id"),
        "case_id": record.get("case_id"),
        "paraphrase_prompts": record.get("paraphrase_prompts", record.get("paraphrases")),
        "neighborhood_prompts": record.get("neighborhood_prompts", record.get("neighbourhood_prompts")),
        "generation_prompts": record.get("generation_prompts"),
    }


def _check_text(value: Any, field_name: str, label: str) -> str:
    if _is_missing(value):
        raise FactValidationError(label, field_name, "missing", "is missing")
    if not isinstance(value, str):
        raise FactValidationError(label, field_name, "not_a_string",
                                  f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise FactValidationError(label, field_name, "empty", "is empty")
    if len(value) > MAX_TEXT_CHARS:
        raise FactValidationError(label, field_name, "too_long",
                                  f"is {len(value)} characters long (limit {MAX_TEXT_CHARS})")
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):
        raise FactValidationError(label, field_name, "invalid_utf8",
                                  "contains bytes that are not valid UTF-8")
    if "\x00" in value:
        raise FactValidationError(label, field_name, "nul_character", "contains a NUL character")
    return value


def _check_prompt_list(value: Any, field_name: str, label: str) -> tuple[str, ...]:
    if _is_missing(value):
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Iterable) or isinstance(value, Mapping):
        raise FactValidationError(label, field_name, "not_a_list",
                                  f"must be a list of strings, got {type(value).__name__}")
    return tuple(_check_text(item, f"{field_name}[{i}]", label) for i, item in enumerate(value))


def _validated(fields: dict[str, Any], label: str) -> Fact:
    subject = _check_text(fields["subject"], "subject", label).strip()
    prompt = _check_text(fields["prompt"], "prompt", label).strip()
    target_new = _check_text(fields["target_new"], "target_new", label).strip()
    target_true = _check_text(fields["target_true"], "target_true", label).strip()
    count = prompt.count(PLACEHOLDER)
    if count == 0:
        raise FactValidationError(label, "prompt", "no_placeholder",
                                  f"prompt template {prompt!r} has no '{{}}' for the subject")
    if count > 1:
        raise FactValidationError(label, "prompt", "several_placeholders",
                                  f"prompt template {prompt!r} has {count} '{{}}' placeholders, expected one")
    if _normalise(target_new) == _normalise(target_true):
        raise FactValidationError(label, "target_new", "target_equals_true",
                                  f"target_new {target_new!r} equals target_true: nothing to edit")
    relation = fields.get("relation_id")
    case_id = fields.get("case_id")
    return Fact(
        subject=subject,
        prompt=prompt,
        target_new=target_new,
        target_true=target_true,
        relation_id=None if _is_missing(relation) else str(relation),
        case_id=None if _is_missing(case_id) else str(case_id),
        paraphrase_prompts=_check_prompt_list(fields.get("paraphrase_prompts"), "paraphrase_prompts", label),
        neighborhood_prompts=_check_prompt_list(fields.get("neighborhood_prompts"), "neighborhood_prompts", label),
        generation_prompts=_check_prompt_list(fields.get("generation_prompts"), "generation_prompts", label),
        neighborhood_answer=(None if _is_missing(fields.get("neighborhood_answer")) else
                             _check_text(fields["neighborhood_answer"], "neighborhood_answer", label).strip()),
    )
