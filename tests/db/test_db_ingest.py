"""Ingestion: every supported source, every record validated, rejected ones kept with their reason.

``tests/data/malformed-facts.jsonl`` holds one record per line, each wrong in
one way (see :data:`MALFORMED`); lines 1, 8 and 13 are valid, line 8 full of
SQL metacharacters that must be stored verbatim, line 13 a duplicate of line 1
(case and whitespace differ).
"""

from __future__ import annotations

import codecs
import json
import threading
import time
import uuid

import datasets
import pandas as pd
import pytest
from sqlalchemy import func, make_url, select, text

from db.engine import make_engine, transaction
from db.errors import LedgerError
from db.history import facts_frame
from db.ingest import CHUNK_SIZE, ingest_file, ingest_records
from db.models import FactRecord
from db.readers import SourceRecord, read_records
from editing.facts import fact_from_record
from flows.cli import main
from fixtures.data import dataset_path

MALFORMED = {
    1: ("pending", None),
    2: ("rejected", "missing"),
    3: ("rejected", "subject_not_in_prompt"),
    4: ("rejected", "empty"),
    5: ("rejected", "target_equals_true"),
    6: ("rejected", "invalid_utf8"),
    7: ("rejected", "too_long"),
    8: ("pending", None),
    9: ("rejected", "malformed_json"),
    10: ("rejected", "nul_character"),
    11: ("rejected", "not_an_object"),
    12: ("rejected", "several_placeholders"),
    13: ("duplicate", None),
    14: ("rejected", "not_a_string"),
}


def _dump_facts(engine) -> list[tuple]:
    with transaction(engine) as session:
        return [tuple(row) for row in session.execute(select(FactRecord.__table__).order_by(FactRecord.id))]


def _count(engine) -> int:
    with transaction(engine) as session:
        return session.scalar(select(func.count()).select_from(FactRecord))


def test_counterfact_full_schema(database):
    summary = ingest_file(database.engine, dataset_path("counterfact-1000"))
    assert (summary.records, summary.accepted, summary.pending, summary.rejected_total) == (1000, 1000, 1000, 0)
    frame = facts_frame(database.engine, source="counterfact-1000.json")
    assert len(frame) == 1000 and set(frame["status"]) == {"pending"}
    first = json.loads((dataset_path("counterfact-1000")).read_text())[0]
    with transaction(database.engine) as session:
        stored = session.scalars(select(FactRecord).order_by(FactRecord.id).limit(1)).one().to_fact()
    assert stored == fact_from_record(first, where="record 0")
    assert len(stored.paraphrase_prompts) == 2 and len(stored.neighborhood_prompts) == 10


def test_counterfact_easyedit_schema_with_its_duplicates(database):
    summary = ingest_file(database.engine, dataset_path("counterfact-easyedit-edit"))
    assert (summary.records, summary.accepted, summary.rejected_total) == (9788, 9788, 0)
    # Three requests in this file repeat an earlier (subject, prompt, new target) with another true target.
    assert (summary.pending, summary.duplicates) == (9785, 3)
    duplicates = facts_frame(database.engine, status="duplicate")
    originals = facts_frame(database.engine).set_index("fact_id").loc[duplicates["duplicate_of"]]
    assert list(originals["subject"]) == list(duplicates["subject"])
    assert list(originals["target_new"]) == list(duplicates["target_new"])


def test_zsre_records_are_ingested_with_their_locality_answers(database):
    summary = ingest_file(database.engine, dataset_path("zsre"))
    assert (summary.records, summary.accepted, summary.rejected_total) == (1037, 1037, 0)
    first = json.loads(dataset_path("zsre").read_text())[0]
    with transaction(database.engine) as session:
        stored = session.scalars(select(FactRecord).order_by(FactRecord.id).limit(1)).one().to_fact()
    assert stored == fact_from_record(first, where="record 0")
    assert stored.neighborhood_answer == first["loc_ans"] and stored.neighborhood_prompts == (first["loc"],)


def test_reingesting_the_same_file_inserts_nothing(database):
    path = dataset_path("counterfact-1000")
    ingest_file(database.engine, path)
    before = _dump_facts(database.engine)
    again = ingest_file(database.engine, path)
    assert (again.records, again.accepted, again.unchanged, again.rejected_total) == (1000, 0, 1000, 0)
    assert _dump_facts(database.engine) == before


def test_the_same_facts_under_another_source_are_duplicates(database):
    path = dataset_path("counterfact-1000")
    ingest_file(database.engine, path)
    other = ingest_file(database.engine, path, source="copy")
    assert (other.accepted, other.pending, other.duplicates) == (1000, 0, 1000)


def test_malformed_records_are_rejected_one_by_one(database, malformed_facts):
    summary = ingest_file(database.engine, malformed_facts)
    expected_reasons = sorted(reason for _, reason in MALFORMED.values() if reason)
    assert sorted(summary.rejected.elements()) == expected_reasons
    assert (summary.records, summary.pending, summary.duplicates) == (14, 2, 1)
    lines = malformed_facts.read_bytes().split(b"\n")
    with transaction(database.engine) as session:
        rows = {int(row.location.removeprefix("line ")): row for row in session.scalars(select(FactRecord))}
    assert set(rows) == set(MALFORMED), "every record is stored, nothing lost"
    for number, (status, reason) in MALFORMED.items():
        row = rows[number]
        assert (row.status, row.rejection_reason) == (status, reason), f"line {number}"
        assert row.source_index == number - 1
        if status == "rejected":
            assert row.raw == lines[number - 1], "the raw bytes of a rejected record are kept exactly"
    assert b"Caf\xe9" in rows[6].raw
    assert rows[13].duplicate_of == rows[1].id


def test_sql_metacharacters_are_stored_verbatim(database, malformed_facts):
    ingest_file(database.engine, malformed_facts)
    original = json.loads(malformed_facts.read_bytes().split(b"\n")[7])
    with transaction(database.engine) as session:
        stored = session.scalars(select(FactRecord).where(FactRecord.location == "line 8")).one()
        by_subject = session.scalars(select(FactRecord).where(FactRecord.subject == original["subject"])).one()
    assert by_subject.id == stored.id
    fact = stored.to_fact()
    assert fact.subject == original["subject"] == "Robert'); DROP TABLE facts;--"
    assert fact.prompt == original["prompt"]
    assert (fact.target_new, fact.target_true) == (original["target_new"], original["target_true"])
    assert list(fact.paraphrase_prompts) == original["paraphrases"]
    assert fact.relation_id == "P'1"
    assert _count(database.engine) == 14


def test_a_failed_ingest_leaves_the_database_unchanged(database):
    ingest_file(database.engine, dataset_path("counterfact-1000"))
    before = _dump_facts(database.engine)

    def records_then_crash():
        for index in range(CHUNK_SIZE * 2 + 10):
            data = {"subject": f"S{index}", "prompt": "{} is", "target_new": "a", "target_true": "b"}
            yield SourceRecord(index, f"line {index + 1}", json.dumps(data).encode(), data)
        raise OSError("disk read error in the middle of the file")

    with pytest.raises(OSError, match="disk read error"):
        ingest_records(database.engine, records_then_crash(), "crashing")
    assert _dump_facts(database.engine) == before


def test_a_file_that_is_not_json_fails_as_a_whole(database, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"subject": "A", "prompt": "{} is", ')
    with pytest.raises(ValueError, match="not valid JSON"):
        ingest_file(database.engine, path)
    assert _count(database.engine) == 0


def test_csv_with_optional_prompt_lists(database, tmp_path):
    frame = pd.DataFrame([
        {"subject": "NA", "prompt": "{} is a country in", "target_new": "Asia", "target_true": "Africa",
         "paraphrases": '["Where is NA?", "NA lies in"]', "neighborhood_prompts": ""},
        {"subject": "Paris", "prompt": "Paris is the capital of", "target_new": "Italy", "target_true": "France",
         "paraphrases": "The capital of Paris' country is", "neighborhood_prompts": '["Lyon is in"]'},
        {"subject": "Rome", "prompt": "{} is in", "target_new": "", "target_true": "Italy",
         "paraphrases": "", "neighborhood_prompts": ""},
        {"subject": "Oslo", "prompt": "{} is in", "target_new": "Chile", "target_true": "Norway",
         "paraphrases": '["unclosed', "neighborhood_prompts": ""},
    ])
    path = tmp_path / "facts.csv"
    frame.to_csv(path, index=False)
    summary = ingest_file(database.engine, path)
    assert (summary.accepted, dict(summary.rejected)) == (2, {"empty": 1, "malformed_json": 1})
    with transaction(database.engine) as session:
        first, second = [row.to_fact() for row in session.scalars(
            select(FactRecord).where(FactRecord.status == "pending").order_by(FactRecord.id))]
    assert first.subject == "NA", "'NA' is a subject, not a missing value"
    assert first.paraphrase_prompts == ("Where is NA?", "NA lies in") and first.neighborhood_prompts == ()
    assert second.prompt == "{} is the capital of"
    assert second.paraphrase_prompts == ("The capital of Paris' country is",)
    assert second.neighborhood_prompts == ("Lyon is in",)


def test_csv_with_invalid_utf8_rejects_only_that_row(database, tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"subject,prompt,target_new,target_true\n"
                     b"Caf\xe9,{} is in,London,Paris\n"
                     b"Louvre,{} is in,Rome,Paris\n")
    summary = ingest_file(database.engine, path)
    assert (summary.accepted, dict(summary.rejected)) == (1, {"invalid_utf8": 1})
    assert summary.examples[0].location == "row 1"


def test_jsonl_and_a_saved_dataset(database, tmp_path):
    records = [{"subject": f"Subject {i}", "prompt": "{} works for", "target_new": "Google",
                "target_true": "Apple", "paraphrase_prompts": [f"Subject {i} is employed by"]} for i in range(6)]
    jsonl = tmp_path / "facts.jsonl"
    jsonl.write_bytes(codecs.BOM_UTF8 + "\r\n".join(json.dumps(record) for record in records[:3]).encode() + b"\n\n")
    assert ingest_file(database.engine, jsonl).pending == 3
    saved = tmp_path / "dataset"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records[3:5]),
                          "test": datasets.Dataset.from_list(records[5:])}).save_to_disk(str(saved))
    summary = ingest_file(database.engine, saved, source="hf")
    assert (summary.records, summary.pending) == (3, 3)
    assert list(facts_frame(database.engine, source="hf")["location"]) == ["test[0]", "train[0]", "train[1]"]
    assert ingest_file(database.engine, saved, source="hf").unchanged == 3


def test_read_records_refuses_unknown_formats(tmp_path):
    path = tmp_path / "facts.xml"
    path.write_text("<facts/>")
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_records(path)
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "missing.json")


def test_ingest_command_prints_a_json_summary(database, malformed_facts, capsys):
    assert main(["ingest", str(malformed_facts), "--source", "bad", "--db", database.url, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["source"], summary["accepted"], summary["duplicates"], summary["rejected"]) == ("bad", 3, 1, 11)
    assert summary["rejected_by_reason"]["too_long"] == 1
    assert main(["ingest", str(malformed_facts), "--source", "bad", "--db", database.url]) == 0
    assert "unchanged       14" in capsys.readouterr().out


def test_ingest_command_requires_an_initialised_database(empty_database_url, malformed_facts, capsys):
    assert main(["ingest", str(malformed_facts), "--db", empty_database_url]) == 2
    assert "seqedit init" in capsys.readouterr().err




def _records(count: int, location: str = "line") -> list[SourceRecord]:
    facts = [{"subject": f"S{i}", "prompt": "{} is", "target_new": "a", "target_true": "b"} for i in range(count)]
    return [SourceRecord(i, f"{location} {i + 1}", json.dumps(data).encode(), data) for i, data in enumerate(facts)]


def _wait_until_blocked(engine, application_name: str) -> None:
    deadline = time.monotonic() + 30
    query = text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name AND wait_event_type = 'Lock'")
    while True:
        with engine.connect() as connection:
            if connection.scalar(query, {"name": application_name}):
                return
        assert time.monotonic() < deadline, f"{application_name} never waited for a lock"
        time.sleep(0.05)


def test_concurrent_ingests_of_the_same_facts(database):
    """SQLite serialises them (the second finds duplicates); on PostgreSQL the second stops, storing nothing."""
    first_stored, first_may_commit = threading.Event(), threading.Event()

    def first_source():
        yield from _records(CHUNK_SIZE)  # one full chunk, stored when the next record is asked for
        first_stored.set()
        first_may_commit.wait(timeout=60)

    first = threading.Thread(target=ingest_records, args=(database.engine, first_source(), "first"))
    first.start()
    assert first_stored.wait(timeout=60)
    second_name = f"second_ingest_{uuid.uuid4().hex[:8]}"
    second_url = make_url(database.url)
    if database.backend == "postgresql":
        second_url = second_url.update_query_dict({"application_name": second_name})
    second_engine = make_engine(second_url)
    outcome = {}

    def second_ingest():
        try:
            outcome["summary"] = ingest_records(second_engine, _records(5, "row"), "second")
        except LedgerError as error:
            outcome["error"] = error

    second = threading.Thread(target=second_ingest)
    second.start()
    if database.backend == "postgresql":
        _wait_until_blocked(database.engine, second_name)
    first_may_commit.set()
    first.join(timeout=60)
    second.join(timeout=60)
    second_engine.dispose()
    if database.backend == "postgresql":
        assert "concurrent ingest" in str(outcome["error"])
        assert set(facts_frame(database.engine)["source"]) == {"first"}
    else:
        assert (outcome["summary"].pending, outcome["summary"].duplicates) == (0, 5)
    assert _count(database.engine) == CHUNK_SIZE + (0 if database.backend == "postgresql" else 5)
