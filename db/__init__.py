"""The ledger: facts, runs, batches, weight deltas, checkpoints, evaluations and metrics in SQL.

One job per module; import from the module (this package imports nothing, so
that ``seqedit init`` or Alembic do not pay for torch and pandas):

* :mod:`db.engine` — ``make_engine``, ``transaction``, ``session_factory``, ``in_schema``: URL → engine
  (SQLite default, PostgreSQL);
* :mod:`db.migrate` — ``upgrade``, ``downgrade``, ``require_current``: the Alembic migrations, from code;
* :mod:`db.models` — the tables and status enums;
* :mod:`db.readers`, :mod:`db.ingest` — ``ingest_file``: files and datasets → validated facts;
* :mod:`db.runs` — ``create_run``, ``get_run``, ``set_run_status``;
* :mod:`db.locks`, :mod:`db.ledger` — ``acquire_writer`` → ``RunWriter``: claim, commit, fail, roll back;
* :mod:`db.replay` — ``weights_at``, ``last_applied_seq``: bit-identical weights at any applied batch,
  verified by sha256;
* :mod:`db.evaluations` — ``record_evaluation`` (metrics and the alarms they raised, together);
* :mod:`db.history` — ``batches_frame``, ``metrics_frame``, ``edits_for_subject``, ... as DataFrames;
* :mod:`db.tensors` — tensors ↔ safetensors bytes;
* :mod:`db.errors` — the exceptions.
"""
