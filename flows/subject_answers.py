"""What the model at each run's latest point answers now, for the facts of a subject timeline.

``seqedit history --subject X --now`` adds, to every row of :func:`db.history.subject_timeline` that a run
took, the probabilities the model of that run's last applied batch gives the fact's new and old target on its
rewrite prompt (``exp`` of the mean per-token NLL, CounterFact's convention) and its greedy answer. Each run's
model is rebuilt from the ledger (:func:`db.replay.weights_at`, verified) and loaded once.
"""

from __future__ import annotations

import math

import pandas as pd
from sqlalchemy import Engine

ANSWER_TOKENS = 8
"""Greedy tokens generated per prompt: enough for a CounterFact object."""


def answers_now(engine: Engine, timeline: pd.DataFrame) -> pd.DataFrame:
    """``timeline`` with ``now_seq``, ``p_new_now``, ``p_true_now`` and ``answer_now`` per row of a run."""
    from db.models import FactRecord
    from db.replay import last_applied_seq, weights_at
    from db.runs import get_run
    from editing.evaluation.counterfact import counterfact_metrics
    from editing.evaluation.generation import greedy_generate
    from flows.model_export import run_model
    from sqlalchemy.orm import Session

    frame = timeline.copy()
    for column in ("now_seq", "p_new_now", "p_true_now", "answer_now"):
        frame[column] = pd.NA
    for run_id in frame["run_id"].dropna().unique():
        rows = frame.index[frame["run_id"] == run_id]
        ids = [int(fact_id) for fact_id in frame.loc[rows, "fact_id"]]
        with Session(engine) as session:
            facts = {row.id: row.to_fact() for row in session.query(FactRecord).filter(FactRecord.id.in_(ids))}
        seq = last_applied_seq(engine, int(run_id))
        with run_model(get_run(engine, int(run_id)), weights_at(engine, int(run_id), seq)) as adapter:
            ordered = [facts[fact_id] for fact_id in ids]
            scores = counterfact_metrics(adapter, ordered, with_neighborhood=False).facts
            answers = greedy_generate(adapter, [fact.rewrite_prompt for fact in ordered],
                                      max_new_tokens=ANSWER_TOKENS, with_prompt=False)
        for index, result, answer in zip(rows, scores, answers):
            frame.at[index, "now_seq"] = seq
            frame.at[index, "p_new_now"] = math.exp(-result.rewrite.nll_new[0])
            frame.at[index, "p_true_now"] = math.exp(-result.rewrite.nll_true[0])
            frame.at[index, "answer_now"] = answer.strip()
    return frame
