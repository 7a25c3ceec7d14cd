"""`treedistill score`: score completions from a JSONL file, one JSON line out per record."""

from __future__ import annotations

import json
import sys

HELP = "score completions in a JSONL file (Countdown: numbers, target, completion; GSM8K: answer, completion)"


def add_arguments(parser) -> None:
    from treedistill.envs import ENVS

    parser.add_argument("--data", required=True, help="JSONL file of records to score")
    parser.add_argument("--env", default="countdown", choices=sorted(ENVS), help="environment (default countdown)")
    parser.add_argument("--require-all-numbers", action="store_true",
                        help="Countdown strict mode: every input number used exactly once")
    parser.add_argument("--integer-intermediates", action="store_true",
                        help="Countdown strict mode: every intermediate result a positive integer")


def _countdown_problem(record: dict) -> dict:
    from treedistill.envs.countdown import validate_problem

    return validate_problem(record)


def _gsm8k_problem(record: dict) -> dict:
    from treedistill.envs.gsm8k import final_answer, parse_number

    answer = record.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or parse_number(final_answer(answer)) is None:
        raise ValueError(f'"answer" must be a number or a solution ending in "#### NUMBER", got {answer!r}')
    return {"question": record.get("question", ""), "answer": answer}


# How each environment turns a record into its problem dict (raising ValueError on a bad record).
PROBLEM_OF = {"countdown": _countdown_problem, "gsm8k": _gsm8k_problem}


def run(args) -> None:
    from treedistill.envs import get_env
    from treedistill.jsonl import read_records

    options = {name: True for name in ("require_all_numbers", "integer_intermediates") if getattr(args, name)}
    env = get_env(args.env, **options)
    # Validate the whole file first, so a bad line stops the run before any output.
    def item(record: dict) -> tuple[dict, str]:
        problem = PROBLEM_OF.get(args.env, dict)(record)
        if not isinstance(record.get("completion"), str):
            raise ValueError('"completion" must be a string')
        return problem, record["completion"]

    items = read_records(args.data, item)
    dense = sparse = 0.0
    for problem, completion in items:
        score = env.score(problem, completion)
        dense += score.dense
        sparse += score.sparse
        print(json.dumps({"dense": score.dense, "sparse": score.sparse, "reason": score.reason}))
    if items:
        print(f"scored {len(items)} records: mean dense {dense / len(items):.4f}, "
              f"mean sparse {sparse / len(items):.4f}", file=sys.stderr)
    return None
