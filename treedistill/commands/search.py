"""`treedistill search`: search one Countdown problem at test time and show the tree."""

from __future__ import annotations

import sys
import time

from treedistill.commands import (
    add_expansion_arguments,
    add_leaf_arguments,
    add_pick_argument,
    add_tree_arguments,
    add_widening_arguments,
    check_choice,
    check_counts,
    search_settings,
)
from treedistill.search.contracts import INSPECT_SEARCH

HELP = "search one Countdown problem with MCTS: answer, principal variation, tree summary (--html view)"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="tiny",
                        help="preset name, model folder or hub id (default: tiny, the embedded model)")
    parser.add_argument("--numbers", type=int, nargs="+", required=True, help="the input numbers, e.g. 3 7 9 12")
    parser.add_argument("--target", type=int, required=True, help="the target, e.g. 24")
    add_tree_arguments(parser, INSPECT_SEARCH)
    add_expansion_arguments(parser, INSPECT_SEARCH)
    parser.add_argument("--max-new-tokens", type=int, default=512,
                        help="tokens per completion at most (default 512)")
    parser.add_argument("--terminal", default="reward",
                        help="value of terminal nodes: reward (the environment's dense reward, as in "
                             "training) | value (the value head: the search never sees the target) | legal "
                             "(the value head, -1 without a legal answer: never sees the target either)")
    add_pick_argument(parser, INSPECT_SEARCH)
    add_leaf_arguments(parser, INSPECT_SEARCH)
    add_widening_arguments(parser, INSPECT_SEARCH)
    parser.add_argument("--engine", default="native", help="generation backend: native | hf | vllm (default native; vllm: the treedistill[vllm] extra)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples and of the search (default 0)")
    parser.add_argument("--html", default=None, metavar="FILE", help="write the tree as one self-contained HTML page")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line last")


def check_arguments(args) -> None:
    """Refuse bad values before anything is loaded."""
    from treedistill.engine import BACKENDS, check_available
    from treedistill.envs.countdown import validate_problem
    from treedistill.errors import UsageError
    from treedistill.rollout.tree_search import TERMINAL_VALUES

    try:
        validate_problem({"numbers": args.numbers, "target": args.target})
    except ValueError as err:
        raise UsageError(str(err)) from None
    check_counts(args, ("simulations", "parallel", "max_depth", "k_children", "step_max_tokens", "max_new_tokens"))
    search_settings(args, INSPECT_SEARCH)
    check_choice(args, "terminal", TERMINAL_VALUES)
    check_choice(args, "engine", BACKENDS)
    if args.engine:
        check_available(args.engine)


# How the summary names each terminal-value rule (rollout.tree_search.TERMINAL_VALUES).
TERMINAL_TEXT = {"reward": "environment reward", "value": "value head",
                 "legal": "value head (-1 without a legal answer)"}


def _fmt(x) -> str:
    return "-" if x is None else f"{x:+.3f}"


class SearchProgress:
    """The search's progress on stderr (`metrics.Progress`: a tqdm bar on a terminal, else a line),
    simulations done of the total, updated every EVERY_S seconds at most: a log gets no line for the
    usual search of a second or two, and one every few seconds for a long one."""

    EVERY_S = 2.0

    def __init__(self, total: int):
        from treedistill.metrics import Progress

        self.bar, self.shown_at = Progress(total, desc="search simulations"), time.monotonic()

    def __call__(self, done: int) -> None:
        """Called by the search after every round."""
        now = time.monotonic()
        if now - self.shown_at >= self.EVERY_S:
            self.shown_at = now
            self.bar.update(done - self.bar.count)

    def close(self) -> None:
        self.bar.close()


def run(args) -> dict:
    check_arguments(args)
    from pathlib import Path

    from treedistill.engine import make_engine
    from treedistill.envs import get_env
    from treedistill.models.load import load_policy
    from treedistill.rollout import search_problems
    from treedistill.search import ROOT, tree_to_html

    env = get_env("countdown")
    problem = {"numbers": list(args.numbers), "target": args.target}
    policy = load_policy(args.model, device=args.device, value_head=True)
    engine = make_engine(policy, args.engine)
    cfg = search_settings(args, INSPECT_SEARCH)
    progress = SearchProgress(cfg.simulations)
    try:
        out = search_problems(engine, policy, env, [problem], search=cfg, max_new_tokens=args.max_new_tokens,
                              seed=args.seed, terminal_value=args.terminal, on_round=progress)[0]
    finally:
        progress.close()
    tree, ex, batch = out.tree, out.extraction, out.batch

    pv = []
    for node, target in zip(ex.nodes[1:], ex.targets[:-1]):
        pos = target.children.index(node)
        pv.append({"step": policy.decode(tree.tokens[node]), "tokens": len(tree.tokens[node]),
                   "N": tree.visits[node], "Q": tree.q(node), "P": tree.prior[node],
                   "visit_share": target.visit_probs[pos], "terminal": tree.terminal[node],
                   "terminal_value": tree.reward(node)})
    completion = policy.decode(out.trajectory.completion_ids[ex.search_end:]) if not ex.complete else ""
    summary = {
        "nodes": len(tree), "depth": tree.stats.max_depth, "simulations": tree.stats.simulations,
        "root_value": tree.q(ROOT), "root_value_head": tree.value[ROOT],
        "generated_tokens": out.generated_tokens, "collisions": tree.stats.collisions,
        "widenings": tree.stats.widenings,
        "rollouts": tree.stats.rollout_requests, "rollout_tokens": tree.stats.rollout_tokens,
        "finished_answers": out.trajectory.stats["finished_answers"],
        "distinct_answers": out.trajectory.stats["distinct_answers"],
        "tokens_per_answer": (out.generated_tokens / out.trajectory.stats["finished_answers"]
                              if out.trajectory.stats["finished_answers"] else None),
        "rounds": batch.rounds, "wall_s": batch.wall_s, "search_s": batch.search_s,
        "bookkeeping_s": batch.bookkeeping_s, "bookkeeping_share": batch.bookkeeping_share,
        "engine": batch.engine,
    }

    print(f"problem  {problem['numbers']} -> {problem['target']}   model {args.model}, {cfg.select}, "
          f"{cfg.simulations} simulations, W={cfg.parallel}, K={cfg.k_children}, T={cfg.temperature:g}, "
          f"terminal nodes valued by the {TERMINAL_TEXT[args.terminal]}")
    print(f"answer   {out.score.answer if out.score.answer is not None else '(none)'}   "
          f"reward {out.score.dense:+.3f} dense, {out.score.sparse:.0f} sparse ({out.score.reason})")
    print("principal variation (N visits, Q mean value, P prior):")
    for i, s in enumerate(pv, 1):
        mark = f"  terminal, valued {_fmt(s['terminal_value'])}" if s["terminal"] else ""
        print(f"  {i:2d}. N={s['N']:<5d} Q={_fmt(s['Q'])} P={s['P']:.3f}  {s['step']!r}{mark}")
    if completion:
        how = ("finished by the rollout of its last node" if out.trajectory.stats["finished_by_rollout"]
               else "completed by the policy (the search stopped before a terminal node)")
        print(f"  {how}: {completion!r}")
    print(f"tree     {summary['nodes']} nodes, depth {summary['depth']}, {summary['simulations']} simulations, "
          f"root value {_fmt(summary['root_value'])} ("
          + ("value head" if cfg.rollout_lambda == 0 else f"leaf value with rollout, lambda={cfg.rollout_lambda:g}")
          + f" {_fmt(summary['root_value_head'])}), "
          f"{summary['collisions']} collisions in {summary['rounds']} rounds, {summary['widenings']} widenings")
    print(f"compute  {summary['generated_tokens']} generated tokens, {batch.engine.get('forward_calls', 0)} forward "
          f"calls, wall {batch.wall_s:.2f} s, bookkeeping {100 * batch.bookkeeping_share:.1f}% of the search")
    per_answer = summary["tokens_per_answer"]
    print(f"answers  {summary['finished_answers']} finished lines with an answer ({summary['distinct_answers']} "
          f"distinct), " + (f"{per_answer:.0f} generated tokens per finished answer" if per_answer else "none")
          + (f"; {summary['rollouts']} rollouts, {summary['rollout_tokens']} tokens" if summary["rollouts"] else ""))

    if args.html:
        title = f"{problem['numbers']} -> {problem['target']}: {cfg.select}, {cfg.simulations} simulations"
        page = tree_to_html(tree, policy.decode, title, pv=list(ex.nodes))
        path = Path(args.html)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(page, encoding="utf-8")
        except OSError as err:
            from treedistill.errors import UsageError

            raise UsageError(f"cannot write {path}: {err}") from None
        print(f"html     {path}", file=sys.stderr if args.json else sys.stdout)

    return {
        "model": args.model, "problem": problem, "select": cfg.select, "simulations": cfg.simulations,
        "parallel": cfg.parallel, "terminal": args.terminal, "k": cfg.k_children, "temperature": cfg.temperature,
        "widen_c": cfg.widen_c, "widen_alpha": cfg.widen_alpha, "seed": args.seed,
        "rollout_lambda": cfg.rollout_lambda, "merge": cfg.merge,
        "answer": out.score.answer, "reward": out.score.dense, "sparse": out.score.sparse,
        "reason": out.score.reason, "completion": out.text, "search_complete": ex.complete,
        "search_tokens": out.trajectory.search_tokens, "principal_variation": pv,
        "policy_completion": completion, "tree": summary, "html": args.html,
    }

