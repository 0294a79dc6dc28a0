"""How large each arm's update is: ‖ΔW‖ / ‖W0‖ per edit layer for the first batch of every independent arm.

A study's ledger keeps each arm's scores and memorization, not the update itself. This bench replays the first
batch of each independent arm of a study on the unedited model, with the ``z`` the study kept (so nothing is
optimised again), prints per edit layer ``‖ΔW‖_F / ‖W0‖_F`` and the memorization, and undoes the edit. It shows
why EMMET declines at large batches where its constraints become ill-conditioned: ``D = K_Eᵀ C⁻¹ K_E`` has small
eigenvalues once B nears the key dimension (1,536 on SmolLM2), and ``ΔW = R D⁻¹ K_Eᵀ C⁻¹`` grows with ``1/√σ``.

    python bench/update_norms.py --db sqlite:///out/xl/ledger.db --study unified-cpu-xl
"""

from __future__ import annotations

import argparse

import torch

from db.engine import make_engine
from db.studies import find_study, source_facts, study_arms
from flows.studies.independent import ArmEditor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="the study's ledger")
    parser.add_argument("--study", required=True)
    parser.add_argument("--arms", default=None, help="comma-separated arm names (default: every independent arm)")
    args = parser.parse_args()
    engine = make_engine(args.db)
    study_id, _, source = find_study(engine, args.study)
    wanted = None if args.arms is None else set(args.arms.split(","))
    facts = source_facts(engine, source)
    print("| arm | B | layer | ‖ΔW‖/‖W0‖ | memorization |\n|---|---|---|---|---|")
    for arm in study_arms(engine, study_id):
        if arm.mode != "independent" or (wanted is not None and arm.name not in wanted):
            continue
        prepared = ArmEditor.prepare(engine, arm)
        adapter, editor, reuse = prepared.session.adapter, prepared.editor, prepared.reuse
        layers = list(editor.layers)
        batch = facts[:prepared.settings.batch_size]
        ids, batch_facts = [fact_id for fact_id, _ in batch], [fact for _, fact in batch]
        original = {layer: torch.linalg.norm(adapter.weight(layer).double()).item() for layer in layers}
        before = adapter.snapshot(layers)
        try:
            edit = editor.apply(batch_facts, v_star=lambda chosen: reuse.for_batch(chosen, ids)[0])
        finally:
            adapter.restore(before)
        for update in edit.updates:
            print(f"| {arm.name} | {prepared.settings.batch_size} | {update.layer} | "
                  f"{update.delta.norm() / original[update.layer]:.4f} | {update.memorization:.3f} |", flush=True)


if __name__ == "__main__":
    main()
