"""Evaluation throughput: CounterFact scoring, batched (seqedit) against one prompt at a time.

Both compute the mean per-token NLL of ``target_new`` and ``target_true`` after
every rewrite, paraphrase and neighbourhood prompt of ``--facts`` facts:

* **one at a time**: for each (prompt, target) pair, one forward pass of the
  whole model over prompt + target with the full-vocabulary softmax at every
  position — how a straightforward evaluation loop scores;
* **seqedit**: :func:`editing.evaluation.counterfact_metrics` — every pair in
  padded batches, identical inputs sharing a row, the vocabulary projection
  only where a target token is scored.

The two must agree (ES/PS/NS equal, NLLs to float tolerance); the bench prints
facts/s for each and the ratio. Generation entropy (greedy, batched, with the KV
cache) is timed the same way against one prompt at a time.

    python bench/eval_throughput.py --facts 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from editing.evaluation import counterfact_metrics, greedy_generate
from editing.evaluation.counterfact import PROMPT_KINDS, prompts_of
from editing.facts import fact_from_record
from editing.models import load_model
from editing.runtime import Runtime

TRAIN = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact"
         / "counterfact-easyedit-train.json")
PROBES = ("The city of", "My favourite food is", "The history of science", "In the morning, I")


@torch.no_grad()
def one_at_a_time(adapter, facts) -> list[float]:
    """Mean target NLL of every (prompt, target) pair, each from its own full forward pass."""
    tokenizer, model = adapter.tokenizer, adapter.model
    nll = []
    for fact in facts:
        for kind in PROMPT_KINDS:
            for prompt in prompts_of(fact, kind):
                for target in (fact.target_new, fact.target_true):
                    prompt_ids = tokenizer(prompt)["input_ids"]
                    target_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
                    ids = torch.tensor([prompt_ids + target_ids], device=adapter.device)
                    log_probs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
                    scored = [-log_probs[len(prompt_ids) - 1 + t, token] for t, token in enumerate(target_ids)]
                    nll.append(float(torch.stack(scored).mean()))
    return nll


@torch.no_grad()
def generate_one_at_a_time(adapter, prompts, max_new_tokens: int) -> list[str]:
    texts = []
    for prompt in prompts:
        ids = adapter.tokenizer(prompt, return_tensors="pt").to(adapter.device)
        out = adapter.model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens,
                                     min_new_tokens=max_new_tokens, pad_token_id=adapter.tokenizer.pad_token_id)
        texts.append(adapter.tokenizer.decode(out[0], skip_special_tokens=True))
    return texts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", type=int, default=64)
    parser.add_argument("--data", type=Path, default=TRAIN)
    parser.add_argument("--offset", type=int, default=2000)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    runtime = Runtime(device=args.device)
    threads = runtime.apply_threads()
    adapter = load_model(args.model, device=runtime.torch_device, dtype=runtime.model_dtype)
    records = json.loads(args.data.read_text())[args.offset:args.offset + args.facts]
    facts = [fact_from_record(record, args.offset + i) for i, record in enumerate(records)]
    n_pairs = 2 * sum(len(prompts_of(fact, kind)) for fact in facts for kind in PROMPT_KINDS)

    started = time.perf_counter()
    batched = counterfact_metrics(adapter, facts)
    batched_seconds = time.perf_counter() - started
    started = time.perf_counter()
    single = one_at_a_time(adapter, facts)
    single_seconds = time.perf_counter() - started
    batched_nll = [value for result in batched.facts for kind in PROMPT_KINDS
                   for pair in zip(getattr(result, kind).nll_new, getattr(result, kind).nll_true) for value in pair]
    max_difference = max(abs(a - b) for a, b in zip(batched_nll, single))

    prompts = list(PROBES) * 4
    started = time.perf_counter()
    greedy_generate(adapter, prompts, args.max_new_tokens)
    generation_batched = time.perf_counter() - started
    started = time.perf_counter()
    generate_one_at_a_time(adapter, prompts, args.max_new_tokens)
    generation_single = time.perf_counter() - started

    summary = {"device": str(adapter.device), "threads": threads, "facts": len(facts), "pairs": n_pairs,
               "counterfact": {"batched_facts_per_s": len(facts) / batched_seconds,
                               "one_at_a_time_facts_per_s": len(facts) / single_seconds,
                               "ratio": single_seconds / batched_seconds, "max_nll_difference": max_difference,
                               "es_ps_ns": [batched.es, batched.ps, batched.ns]},
               "generation": {"prompts": len(prompts), "batched_s": generation_batched,
                              "one_at_a_time_s": generation_single, "ratio": generation_single / generation_batched}}
    if args.json:
        print(json.dumps(summary))
    else:
        cf = summary["counterfact"]
        print(f"CounterFact, {len(facts)} facts ({n_pairs} prompt/target pairs): "
              f"batched {cf['batched_facts_per_s']:.2f} "
              f"facts/s, one at a time {cf['one_at_a_time_facts_per_s']:.2f} facts/s: x{cf['ratio']:.1f} "
              f"(largest NLL difference {max_difference:.1e})")
        gen = summary["generation"]
        print(f"generation, {len(prompts)} prompts × {args.max_new_tokens} tokens: batched {generation_batched:.1f} s, "
              f"one at a time {generation_single:.1f} s: x{gen['ratio']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
