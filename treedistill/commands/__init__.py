"""Subcommands of the `treedistill` CLI; see `treedistill/cli.py` for the contract."""

import argparse
from collections.abc import Iterable


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_counts(args, names: Iterable[str]) -> None:
    """Refuse any of `args.<name>` below 1 or above its bound, as the config bounds its sizes
    (`config.LIMITS`): MAX_TOKENS for a number of tokens (`*_tokens`), else MAX_COUNT (None: not
    given, accepted)."""
    from treedistill.config import MAX_COUNT, MAX_TOKENS
    from treedistill.errors import UsageError, shown

    for name in names:
        value = getattr(args, name)
        bound = MAX_TOKENS if name.endswith("_tokens") else MAX_COUNT
        if value is not None and value < 1:
            raise UsageError(f"{_flag(name)} must be >= 1, got {shown(value)}")
        if value is not None and value > bound:
            raise UsageError(f"{_flag(name)} must be at most {bound:,}, got {shown(value)}")


def check_non_negative(args, names: Iterable[str]) -> None:
    """Refuse any of `args.<name>` below 0 or NaN (None: not given, accepted)."""
    from treedistill.errors import UsageError

    for name in names:
        value = getattr(args, name)
        if value is not None and not value >= 0:
            raise UsageError(f"{_flag(name)} must be >= 0, got {value}")


def check_choice(args, name: str, choices: Iterable[str]) -> None:
    """Refuse `args.<name>` outside `choices`, listing them (None: not given, accepted)."""
    from treedistill.errors import UsageError

    value, choices = getattr(args, name), list(choices)
    if value is not None and value not in choices:
        raise UsageError(f"unknown {_flag(name)} {value!r}: choose one of {', '.join(choices)}")


# ---- search flags: each defaults to None and takes its value from a named search setting
# (search/contracts.py: TRAINING_SEARCH, TEST_TIME_SEARCH, INSPECT_SEARCH), the one home of the defaults


def add_tree_arguments(parser, base) -> None:
    """The search tree's budget and selection: --simulations, --parallel, --select, --c-puct, --max-depth."""
    parser.add_argument("--simulations", type=int, default=None,
                        help=f"simulations per problem (default {base.simulations})")
    parser.add_argument("--parallel", type=int, default=None, help=f"descents per round, W (default {base.parallel})")
    parser.add_argument("--select", default=None, help=f"selection rule: puct | uct | gumbel (default {base.select})")
    parser.add_argument("--c-puct", type=float, default=None, help=f"exploration constant (default {base.c_puct:g})")
    parser.add_argument("--max-depth", type=int, default=None,
                        help=f"steps from the root at most (default {base.max_depth})")


def add_expansion_arguments(parser, base, *, temperature: str = "--temperature") -> None:
    """How a node is expanded: --k-children, the step temperature (flag `temperature`), --step-max-tokens."""
    parser.add_argument("--k-children", type=int, default=None,
                        help=f"sampled steps per expanded node (default {base.k_children})")
    parser.add_argument(temperature, type=float, default=None,
                        help=f"step sampling temperature (default {base.temperature:g})")
    parser.add_argument("--step-max-tokens", type=int, default=None,
                        help=f"tokens per step at most (default {base.step_max_tokens})")


def add_widening_arguments(parser, base) -> None:
    """When nodes get steps: progressive widening (--widen-c, --widen-alpha) and --defer-expansion."""
    parser.add_argument("--widen-c", type=float, default=None,
                        help="progressive widening: a node gets K more steps while its samples are fewer than "
                             f"C * N^alpha (default {base.widen_c:g}; 0: each node expanded once, as the reference)")
    parser.add_argument("--widen-alpha", type=float, default=None,
                        help=f"progressive widening exponent (default {base.widen_alpha:g})")
    parser.add_argument("--defer-expansion", action=argparse.BooleanOptionalAction, default=None,
                        help="a new leaf is only valued (its rollout); its steps are sampled when a later descent "
                             "comes back to it, so a leaf no descent comes back to costs no steps (default "
                             f"{'on' if base.defer_expansion else 'off'})")


def add_pick_argument(parser, base) -> None:
    """`--pick best|visits`: which path a test-time search answers with (SearchSettings.pick)."""
    parser.add_argument("--pick", default=None, choices=["best", "visits"],
                        help="the answer: best (the terminal node of highest value, as best-of-N picks) or visits "
                             f"(the most-visited path, the training target); default {base.pick}")


def add_leaf_arguments(parser, base) -> None:
    """`--rollout-lambda` and `--merge` (SearchSettings.rollout_lambda / merge)."""
    parser.add_argument("--rollout-lambda", type=float, default=None,
                        help="leaf value (1 - lambda) * value head + lambda * z, z the checked outcome of ONE "
                             "policy rollout from the leaf, whose finished line is also an answer candidate "
                             f"(0: the value head only, no rollout; 1: rollouts only; default {base.rollout_lambda:g})")
    parser.add_argument("--merge", default=None, choices=["tokens", "canonical"],
                        help="sibling steps merged when their tokens are identical (tokens) or their canonical "
                             "form is (canonical: the environment's canonical_step, e.g. 4*5=20 == 5*4=20); "
                             f"default {base.merge}")


def add_diversity_arguments(parser, base) -> None:
    """`--subtrees`, `--repeat-penalty`, `--screen` and `--screen-top` (SearchSettings.subtrees /
    repeat_penalty / screen / screen_top),
    and the value model the screening reads: test-time options that spread a problem's search over more
    distinct answers, and over first steps the value ranks high."""
    parser.add_argument("--subtrees", type=int, default=None,
                        help="independent trees per problem, searched in lock-step, the simulations split among "
                             f"them, the answer picked across them (DVTS; default {base.subtrees})")
    parser.add_argument("--repeat-penalty", type=float, default=None,
                        help="value subtracted from what a finished line backs up when its answer is one the "
                             f"problem's trees already found (0: off; default {base.repeat_penalty:g})")
    parser.add_argument("--screen", type=int, default=None,
                        help="first steps sampled per problem at once and ranked by the value model; the subtrees "
                             "start from the best of them, no rollout from the bare prompt (0: off; default "
                             f"{base.screen}, off where the model has no value model)")
    parser.add_argument("--screen-top", type=int, default=None,
                        help="how many of the best screened first steps are dealt round the subtrees, subtree s "
                             f"starting from the (s mod N + 1)-th best (0: one per subtree; default {base.screen_top})")
    parser.add_argument("--value-model", default=None,
                        help="value model folder that ranks the screened first steps (`treedistill value-model`; "
                             "default: the model folder's value_model/, as the embedded model ships one; none: "
                             "no value model)")


def screened_search(args, cfg, policy, engine_name: str = "native"):
    """`cfg` with its screening resolved against the value model (--value-model, else the model folder's
    value_model/): (cfg, the value model's engine or None, a note). Without a value model the default
    screening is turned off (the note says so); an explicit --screen N > 0 is refused."""
    import dataclasses

    from treedistill.errors import UsageError
    from treedistill.value_model import load_value_model, value_model_folder

    choice = getattr(args, "value_model", None)
    folder = None if choice == "none" else choice or value_model_folder(policy.folder)
    if cfg.screen == 0:
        return cfg, None, ""
    if folder is None:
        if getattr(args, "screen", None):
            raise UsageError(f"--screen {args.screen} ranks first steps by a value model, and {policy.name} has "
                             "none: give --value-model (written by `treedistill value-model`)")
        return dataclasses.replace(cfg, screen=0), None, f"no value model for {policy.name}: first steps not screened"
    return cfg, load_value_model(folder, policy, engine_name), f"first steps screened by the value model {folder}"


def search_settings(args, base, *, flags: dict | None = None, **fields):
    """`base` (a named search setting) with the search flags `args` holds that were given (`--c-puct` ->
    c_puct, ...) and `fields` (which win over a flag of the same name; None: base's value). The settings' own checks refuse a bad value, named as its flag (`flags`:
    {field: flag} where a flag is not named after its field)."""
    import dataclasses
    import re

    from treedistill.errors import UsageError
    from treedistill.search.contracts import SearchSettings

    names = [f.name for f in dataclasses.fields(SearchSettings)]
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    for name, value in fields.items():  # a field given here wins over the flag of its name; None: base's
        if value is None:
            given.pop(name, None)
        else:
            given[name] = value
    flag_of = {**{name: _flag(name) for name in names}, **(flags or {})}
    try:
        return dataclasses.replace(base, **given)
    except UsageError as err:
        message = str(err).removeprefix("invalid search settings: ")
        raise UsageError(re.sub(r"search\.(\w+)", lambda m: flag_of.get(m.group(1), m.group(0)), message)) from None


def add_format_arguments(parser) -> None:
    """`--step` and `--answer`: the text format of completions (envs/formats.py), the environment's options."""
    from treedistill.envs.formats import ANSWER_FORMATS, STEP_ENDS

    parser.add_argument("--step", default="tags", choices=list(STEP_ENDS),
                        help="step delimiter: tags (<step>...</step>), line (one step per line) or blank (a blank "
                             "line between steps); default tags")
    parser.add_argument("--answer", default="tag", choices=list(ANSWER_FORMATS),
                        help="answer format (gsm8k): tag (<answer>N</answer>), hash (#### N), boxed (\\boxed{N}) or "
                             "last_number (the completion's last number, lm-eval-harness's flexible extract); "
                             "countdown: tag only; default tag")
