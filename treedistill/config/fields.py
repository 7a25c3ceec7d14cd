"""The training configuration's fields and their checks: one frozen dataclass, `TrainConfig`.

Defaults are the reference run's settings (docs/method.md) for the reference method; the presets
(`config/files.py`) spell out every setting a method depends on.

Invalid settings raise `UsageError` when the config is built, before any model is loaded, naming the
field and the allowed values; every number must be finite and within its bound (`LIMITS`). No torch import here: `treedistill train --help` stays fast.
The loss and advantage functions read the same field names (`policy_loss`, `eps_low`, `eps_high`,
`ppo_clip`, `value_coef`, `kl_coef`, `group_size`, `gamma`, `lam`), so a TrainConfig is their `cfg`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from treedistill.datasets import resolve_path
from treedistill.envs import ENVS
from treedistill.envs.formats import DEFAULT_FORMAT, TextFormat
from treedistill.errors import UsageError, shown
from treedistill.search.contracts import TRAINING_SEARCH, SearchSettings
from treedistill.search.credit import TREE_ADVANTAGE_NORMS, TREE_ADVANTAGES

__all__ = ["LEAF_VALUES", "LIMITS", "MAX_COUNT", "MAX_NUMBER", "MAX_SEED", "MAX_TEMPERATURE", "MAX_TOKENS",
           "ForkSettings", "LoraSettings", "SearchSettings", "TextFormat", "TrainConfig"]

LR_SCHEDULES = ("constant", "linear-decay")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOG_BACKENDS = ("jsonl", "tensorboard", "wandb")
LEAF_VALUES = ("head", "solver")  # rollout/tree_search.py LEAF_VALUES (torch-free names here)


def _registries():
    """The method table and the name registries (methods, rewards, advantages, policy losses), imported
    when a config is checked, not when this module is: they import torch, which `treedistill train
    --help` does without."""
    from treedistill.algorithms.advantages import ADVANTAGES
    from treedistill.methods import METHODS, POLICY_LOSSES, REWARDS, TREE_CREDIT

    return METHODS, tuple(REWARDS), (*ADVANTAGES, TREE_CREDIT), POLICY_LOSSES


def _allowed(name: str, value, allowed) -> list[str]:
    if value in allowed:
        return []
    return [f"{name} must be one of {', '.join(map(str, allowed))} (got {shown(value)})"]


def _check(condition: bool, message: str) -> list[str]:
    return [] if condition else [message]


# Upper bounds of the numeric settings (every number must also be finite): beyond them a run hangs,
# crashes or could never finish, so they are refused with the config. A setting not listed here is
# bounded by MAX_NUMBER and by its own check in `errors()`.
MAX_COUNT = 10_000_000   # problems, samples, steps, simulations
MAX_TOKENS = 32_768      # tokens of one completion or one search step (also checked against the model's context)
MAX_SEED = 2**32 - 1     # seeds are 0..MAX_SEED (numpy's range)
MAX_TEMPERATURE = 100.0
MAX_NUMBER = 10**15      # anything else, e.g. budget_generated_tokens
LIMITS = {
    **dict.fromkeys(("train_size", "test_size", "steps", "problems_per_step", "group_size", "bon_n",
                     "warmup_steps", "lr_decay_steps", "epochs", "minibatch_size", "micro_batch_size",
                     "eval_every", "eval_problems", "final_eval_problems", "eval_k", "eval_samples_logged",
                     "checkpoint_every", "keep_checkpoints", "value_probe_prefixes", "value_probe_k",
                     "search.simulations", "search.parallel",
                     "search.problems_at_once", "search.k_children", "search.max_depth", "lora.r",
                     "fork.chains", "fork.forks", "fork.per_round"), MAX_COUNT),
    **dict.fromkeys(("max_new_tokens", "search.step_max_tokens"), MAX_TOKENS),
    **dict.fromkeys(("seed", "data_seed"), MAX_SEED),
    **dict.fromkeys(("temperature", "eval_temperature", "value_probe_temperature", "search.temperature"),
                    MAX_TEMPERATURE),
    "lr": 1.0,
    "weight_decay": 1.0,
    "budget_flops": 1e30,
}


def _limit_errors(settings, prefix: str = "") -> list[str]:
    """Every number of a settings dataclass (and of its tuples) finite and within [-bound, bound], bound
    = LIMITS or MAX_NUMBER; the seeds within 0..MAX_SEED."""
    out = []
    for f in dataclasses.fields(settings):
        name, value = prefix + f.name, getattr(settings, f.name)
        for number in value if isinstance(value, tuple) else (value,):
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                continue
            bound = LIMITS.get(name, MAX_NUMBER)
            low = 0 if bound == MAX_SEED else -bound
            if isinstance(number, float) and not math.isfinite(number):
                out.append(f"{name} must be a finite number (got {number})")
            elif number > bound:
                out.append(f"{name} must be at most {shown(bound)} (got {shown(number)})")
            elif number < low:
                out.append(f"{name} must be at least {shown(low)} (got {shown(number)})")
    return out


def _search_errors(s: SearchSettings) -> list[str]:
    """What training asks of the search beyond the settings' own checks (search/contracts.py)."""
    return _check(s.parallel <= s.simulations,
                  f"search.parallel must be in 1..search.simulations={s.simulations} (got {s.parallel})")


@dataclass(frozen=True)
class LoraSettings:
    """Low-rank adapters instead of full fine-tuning (r = 0: full fine-tuning)."""

    r: int = 0                                       # adapter rank; 0 = off (train all weights)
    alpha: float = 16.0                              # adapter scale numerator (scale = alpha / r)
    target_modules: tuple[str, ...] | None = None    # module names to adapt; None = all linear layers

    def errors(self) -> list[str]:
        return [
            *_check(self.r >= 0, f"lora.r must be >= 0 (got {self.r})"),
            *_check(self.alpha > 0, f"lora.alpha must be > 0 (got {self.alpha})"),
            *_check(self.target_modules is None or len(self.target_modules) > 0,
                    "lora.target_modules must be null (all linear layers) or a non-empty list"),
        ]


@dataclass(frozen=True)
class ForkSettings:
    """Method tree-fork (`rollout/tree_fork.py`): per problem, `chains` whole chains, then `forks` more
    lines, each sampled from the parent of a step where the policy was least certain (highest mean
    token entropy), `per_round` of them chosen per round (a later round may fork a fork's steps)."""

    chains: int = 8                                  # M: whole chains sampled per problem
    forks: int = 8                                   # N: forks per problem, each finished to the end
    per_round: int = 4                               # forks chosen (and sampled together) per round

    def errors(self) -> list[str]:
        return [
            *_check(self.chains >= 1, f"fork.chains must be >= 1 (got {self.chains})"),
            *_check(self.forks >= 0, f"fork.forks must be >= 0 (got {self.forks})"),
            *_check(1 <= self.per_round <= max(1, self.forks),
                    f"fork.per_round must be in 1..{max(1, self.forks)} (fork.forks={self.forks}; got {self.per_round})"),
        ]


@dataclass(frozen=True)
class TrainConfig:
    """Everything `treedistill train` needs; every field has a default (the reference run's)."""

    # what to train
    method: str = "mcts"                       # mcts | mcts-tree | tree-fork | bon | grpo | cispo | ppo
    model: str = "qwen2.5-1.5b-instruct"       # model preset name or local path (see models/load.py)
    env: str = "countdown"                     # countdown | gsm8k
    env_format: TextFormat = DEFAULT_FORMAT    # completions' step delimiter and answer format (envs/formats.py): step tags | line | blank, answer tag | hash | boxed | last_number (gsm8k)
    # data
    train_path: str | None = None              # JSONL of training problems; None = generate train_size
    test_path: str | None = None               # JSONL of test problems; None = generate test_size
    train_size: int = 20000                    # problems generated when train_path is None
    test_size: int = 820                       # problems generated when test_path is None
    data_seed: int = 42                        # seed of generated problems; 42 = the shipped splits (treedistill/data)
    # rollout
    steps: int = 2048                          # optimizer batches (training steps) to run
    problems_per_step: int = 32                # training problems drawn per step
    group_size: int = 16                       # samples per problem for grpo | cispo | ppo
    bon_n: int = 64                            # samples per problem for bon (the best is kept)
    search: SearchSettings = TRAINING_SEARCH   # tree search (method mcts); search/contracts.py
    temperature: float = 1.0                   # sampling temperature of grpo | cispo | ppo | bon rollouts
    reward: str = "dense"                      # reward trained on (and searched with): dense (the reference) | sparse (0/1)
    search_reward: str | None = None           # mcts, mcts-tree: reward the search scores terminal nodes with (dense | sparse); None = reward
    leaf_value: str = "head"                   # mcts, mcts-tree: a search leaf's value, head | solver (diagnostic: Countdown's exact reachability, 1 / 0; sparse search reward)
    fork: ForkSettings = field(default_factory=ForkSettings)  # tree-fork: chains, forks, forks per round
    tree_advantage: str = "local"              # mcts-tree, tree-fork: a step's credit, local V^(s')-V^(s) | local+global (+ V^(s')-V^(root)); search/credit.py
    tree_advantage_norm: str = "none"          # mcts-tree, tree-fork: none | std (a rollout batch's step advantages divided by their std)
    max_new_tokens: int = 512                  # completion length limit (rollouts and evaluation)
    # optimiser
    lr: float = 5e-6                           # AdamW peak learning rate
    lr_schedule: str = "linear-decay"          # constant | linear-decay (to 0 at the end of the run's horizon)
    warmup_steps: int = 0                      # runs without a budget: linear warm-up from 0 over this many steps
    lr_decay_steps: int | None = None          # runs without a budget: step at which linear-decay reaches 0; None = steps
    warmup_fraction: float = 0.0               # runs with a budget: linear warm-up over this fraction of it
    weight_decay: float = 0.0                  # AdamW decoupled weight decay
    grad_clip: float = 0.1                     # max global grad norm; 0 = no clipping
    epochs: int = 1                            # passes over each step's batch
    minibatch_size: int = 0                    # trajectories per optimizer update (a batch it does not divide ends with a smaller one); 0 = the whole batch
    micro_batch_size: int = 0                  # trajectories per forward/backward; 0 = the whole minibatch
    pack_rows: bool = False                    # learn a micro-batch's rows as one token trie (shared prefixes computed once; algorithms/packing.py)
    # loss
    policy_loss: str = "cispo"                 # cispo | ppo (PPO-clip)
    eps_low: float | None = None               # CISPO weight floor 1 - eps_low; None = no floor (reference)
    eps_high: float = 4.0                      # CISPO weight cap 1 + eps_high (4.0 = the reference's 5.0)
    ppo_clip: float = 0.2                      # PPO-clip range [1 - ppo_clip, 1 + ppo_clip]
    value_coef: float = 1.0                    # c_v, weight of the value MSE; 0 = no value head
    fresh_value_head: bool = False             # start from a new (seeded) value head, not the model's saved one
    kl_coef: float = 0.05                      # beta, weight of the k3 KL to the frozen initial policy
    advantage: str = "reward_minus_value"      # group | reward_minus_value | gae | tree (a tree method's own credit)
    gamma: float = 1.0                         # GAE discount
    lam: float = 1.0                           # GAE lambda
    # evaluation (mean@k, sparse reward, no search)
    eval_every: int = 50                       # evaluate every this many steps (and at the end); 0 = end only
    eval_at_tokens: tuple[int, ...] = ()       # also evaluate after the step that passes each of these generated-token counts
    eval_at_flops: tuple[float, ...] = ()      # also evaluate after the step that passes each of these rollout + learning FLOPs
    eval_before_rl: bool = True                # evaluate the initial model at step 0 (compare evaluates it once for all runs)
    eval_problems: int = 0                     # test problems evaluated; 0 = all of the test split
    final_eval_problems: int | None = None     # test problems of the run's last evaluation; None = eval_problems
    eval_k: int = 16                           # samples per test problem
    eval_temperature: float = 0.2              # evaluation sampling temperature
    eval_samples_logged: int = 4               # trajectories written to samples.jsonl per evaluation
    # value quality at every evaluation (methods with a value head; value_probe.py): V(prefix) against the
    # mean training reward of value_probe_k policy completions from it, on step prefixes of test problems
    value_probe_prefixes: int = 48             # step prefixes (one per test problem); 0 = off
    value_probe_k: int = 6                     # policy completions per prefix (48 x 6: tiny presets' eval time +~20-25%)
    value_probe_temperature: float = 0.8       # temperature of the prefixes' lines and of the completions (the search's)
    # run
    checkpoint_every: int = 50                 # checkpoint every this many steps (and at the end); 0 = end only
    keep_checkpoints: int = 2                  # complete checkpoints kept (the newest ones)
    seed: int = 0                              # seed of sampling, shuffling and initialisation
    budget_generated_tokens: int | None = None  # stop once this many tokens were generated in rollouts
    budget_flops: float | None = None          # stop once rollout + learning FLOPs reach this
    device: str = "auto"                       # auto (cuda if present) | cpu | cuda | cuda:N
    dtype: str = "auto"                        # auto (bfloat16 on cuda, float32 on cpu) | float32 | bfloat16 | float16
    lora: LoraSettings = field(default_factory=LoraSettings)  # low-rank adapters (r = 0: off)
    log_backends: tuple[str, ...] = ("jsonl",)  # jsonl (always written) | tensorboard | wandb
    wandb_project: str = "treedistill"         # wandb project when the wandb backend is on

    def __post_init__(self):
        problems = self.errors()
        if problems:
            raise UsageError("invalid config: " + "; ".join(problems))
        # derived sizes, computed once here and asserted
        assert self.rows_per_problem is None or self.minibatch_rows % self.micro_batch_rows == 0

    # ---- derived sizes ----
    @property
    def method_spec(self):
        """The method's row of the method table (`methods.METHODS`)."""
        return _registries()[0][self.method]

    @property
    def samples_per_problem(self) -> int:
        """Trajectories one problem yields: 1 for mcts and bon (one extracted or best sample) and for
        mcts-tree (one tree, whose rows vary: `rows_per_problem`), group_size for the sampling methods."""
        return self.method_spec.samples(self)

    @property
    def rows_per_problem(self) -> int | None:
        """Learner rows one problem yields: samples_per_problem, or None where they vary (mcts-tree: one
        row per step on its tree's finished lines). With None, minibatch_size counts problems (trees) and
        micro_batch_size rows."""
        return None if self.method_spec.rows_vary else self.samples_per_problem

    @property
    def env_options(self) -> dict:
        """Keyword options of the environment: `get_env(cfg.env, **cfg.env_options)`."""
        return {"step": self.env_format.step, "answer": self.env_format.answer}

    @property
    def trajectories_per_step(self) -> int:
        return self.problems_per_step * self.samples_per_problem

    @property
    def minibatch_rows(self) -> int:
        """Rows per optimizer update: minibatch_size (at most the batch), else the whole batch."""
        return min(self.minibatch_size, self.trajectories_per_step) if self.minibatch_size else self.trajectories_per_step

    @property
    def minibatch_problems(self) -> int:
        """Problems (whole groups of rows) per optimizer update."""
        return self.minibatch_rows // self.samples_per_problem

    @property
    def micro_batch_rows(self) -> int:
        return self.micro_batch_size or self.minibatch_rows

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per training step."""
        return self.epochs * -(-self.trajectories_per_step // self.minibatch_rows)

    @property
    def decay_steps(self) -> int:
        return self.lr_decay_steps or self.steps

    @property
    def final_eval_count(self) -> int:
        """Test problems of the run's last evaluation (0 = all): final_eval_problems, else eval_problems."""
        return self.eval_problems if self.final_eval_problems is None else self.final_eval_problems

    @property
    def uses_value_head(self) -> bool:
        """A value head is built, trained and read only where its loss has a weight (value_coef > 0):
        the methods whose advantage reads it require that; a tree method may do without."""
        return self.value_coef > 0

    @property
    def has_budget(self) -> bool:
        """Whether a compute budget (generated tokens or FLOPs) ends the run: its schedule is then in
        fractions of that budget, not in steps."""
        return self.budget_generated_tokens is not None or self.budget_flops is not None

    def lr_multiplier(self, step: int, progress: float | None = None) -> float:
        """Learning-rate factor of 0-based training `step`, a pure function of it (and, with a budget,
        of the compute spent), so a resumed run needs no scheduler state.

        Runs with a budget (`progress` = the fraction of the budget spent at this update, see
        runs.budget_progress): linear warm-up over the first warmup_fraction of the budget, then 1
        (constant) or a linear decay to 0 at the budget. Every method then spends the same share of its
        compute at each learning rate, however much one of its steps costs: an MCTS step costs ~8 GRPO
        steps of generated tokens, so a warm-up counted in steps would take half of its updates and
        a tenth of GRPO's. Step-limited runs (progress None): linear warm-up to 1 over warmup_steps,
        then 1 or a linear decay from 1 at the end of warm-up to 0 at decay_steps (as transformers'
        get_linear_schedule_with_warmup)."""
        if progress is not None:
            progress = min(1.0, max(0.0, progress))
            if progress < self.warmup_fraction:
                return progress / self.warmup_fraction
            if self.lr_schedule == "constant":
                return 1.0
            return max(0.0, (1.0 - progress) / (1.0 - self.warmup_fraction))
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return 1.0
        return max(0.0, (self.decay_steps - step) / max(1, self.decay_steps - self.warmup_steps))

    def derived(self) -> dict:
        """The derived sizes, for logs and the resolved config."""
        return {"samples_per_problem": self.samples_per_problem,
                "trajectories_per_step": self.trajectories_per_step,
                "minibatch_rows": self.minibatch_rows, "micro_batch_rows": self.micro_batch_rows,
                "updates_per_step": self.updates_per_step, "decay_steps": self.decay_steps,
                "uses_value_head": self.uses_value_head}

    # ---- validation ----
    def errors(self) -> list[str]:
        limits = [*_limit_errors(self), *_limit_errors(self.search, "search."), *_limit_errors(self.lora, "lora."),
                  *_limit_errors(self.fork, "fork.")]
        if limits:
            return limits  # the checks below assume finite numbers of sane sizes
        methods, rewards, advantages, policy_losses = _registries()
        from treedistill.methods import VALUE_BASELINES as value_baselines  # imported with the registries
        problems = [
            *_allowed("method", self.method, tuple(methods)),
            *_allowed("env", self.env, tuple(ENVS)),
            *_check(bool(self.model.strip()), "model must name a model preset or a local path (got '')"),
            *_check(not _looks_like_path(self.model) or _exists(self.model),
                    f"model: no such path {shown(self.model)}"),
        ]
        if problems:
            return problems  # the checks below read the method's row of the table
        problems += self.env_format.errors(ENVS[self.env].answer_formats)
        for name in ("train_path", "test_path"):
            path = getattr(self, name)
            problems += _check(path is None or resolve_path(path).is_file(),
                               f"{name}: no such file {path!r} (null = generate the split)")
        for name in ("train_size", "test_size", "steps", "problems_per_step", "bon_n", "max_new_tokens",
                     "epochs", "eval_k", "keep_checkpoints", "value_probe_k"):
            problems += _check(getattr(self, name) >= 1, f"{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("warmup_steps", "minibatch_size", "micro_batch_size", "eval_every", "eval_problems",
                     "eval_samples_logged", "checkpoint_every", "weight_decay", "grad_clip", "value_coef",
                     "kl_coef", "eval_temperature", "value_probe_prefixes"):
            problems += _check(getattr(self, name) >= 0, f"{name} must be >= 0 (got {getattr(self, name)})")
        problems += _check(0 <= self.warmup_fraction < 1,
                           f"warmup_fraction must be in [0, 1) (got {self.warmup_fraction})")
        problems += _check(all(point >= 1 for point in self.eval_at_tokens),
                           f"eval_at_tokens must hold generated-token counts >= 1 (got {shown(list(self.eval_at_tokens))})")
        problems += _check(all(point > 0 for point in self.eval_at_flops),
                           f"eval_at_flops must hold FLOP counts > 0 (got {shown(list(self.eval_at_flops))})")
        problems += _check(self.final_eval_problems is None or self.final_eval_problems >= 0,
                           f"final_eval_problems must be null or >= 0 (got {self.final_eval_problems})")
        for name in ("budget_generated_tokens", "budget_flops", "lr_decay_steps"):
            value = getattr(self, name)
            problems += _check(value is None or value > 0, f"{name} must be null or > 0 (got {value})")
        problems += [
            *_check(self.lr > 0, f"lr must be > 0 (got {self.lr})"),
            *_check(self.trajectories_per_step <= MAX_COUNT,
                    f"problems_per_step x samples per problem must be at most {MAX_COUNT} "
                    f"(got {self.trajectories_per_step})"),
            *_allowed("lr_schedule", self.lr_schedule, LR_SCHEDULES),
            *_allowed("reward", self.reward, rewards),
            *_allowed("search_reward", self.search_reward, (None, *rewards)),
            *_allowed("tree_advantage", self.tree_advantage, TREE_ADVANTAGES),
            *_allowed("tree_advantage_norm", self.tree_advantage_norm, TREE_ADVANTAGE_NORMS),
            *_check(self.value_probe_temperature > 0,
                    f"value_probe_temperature must be > 0 (got {self.value_probe_temperature})"),
            *_check(self.temperature > 0, f"temperature must be > 0 (got {self.temperature})"),
            *_allowed("policy_loss", self.policy_loss, policy_losses),
            *_check(self.eps_low is None or 0 < self.eps_low <= 1,
                    f"eps_low must be null (no floor) or in (0, 1] (got {self.eps_low})"),
            *_check(self.eps_high > 0, f"eps_high must be > 0 (got {self.eps_high})"),
            *_check(0 < self.ppo_clip < 1, f"ppo_clip must be in (0, 1) (got {self.ppo_clip})"),
            *_allowed("advantage", self.advantage, advantages),
            *_check(0 < self.gamma <= 1, f"gamma must be in (0, 1] (got {self.gamma})"),
            *_check(0 <= self.lam <= 1, f"lam must be in [0, 1] (got {self.lam})"),
            *_check(self.device in ("auto", "cpu", "cuda") or
                    (self.device.startswith("cuda:") and self.device[5:].isdigit()),
                    f"device must be one of auto, cpu, cuda, cuda:N (got {self.device!r})"),
            *_allowed("dtype", self.dtype, DTYPES),
            *[message for backend in self.log_backends for message in
              _allowed("log_backends entry", backend, LOG_BACKENDS)],
            *_search_errors(self.search),
            *self.lora.errors(),
            *self.fork.errors(),
            *_allowed("leaf_value", self.leaf_value, LEAF_VALUES),
        ]
        spec = methods[self.method]
        for name, allowed in (("advantage", spec.advantages_allowed), ("policy_loss", spec.policy_losses)):
            if getattr(self, name) not in allowed:
                problems.append(f"method {self.method} needs {name} in {', '.join(allowed)} "
                                f"(got {shown(getattr(self, name))})")
        if self.leaf_value == "solver":
            problems += _check(spec.searches, f"leaf_value=solver values search leaves: method {self.method} "
                                              "does not search")
            problems += _check(hasattr(ENVS[self.env], "reachable"),
                               f"leaf_value=solver needs an environment with a solver (countdown); {self.env} has none")
            problems += _check((self.search_reward or self.reward) == "sparse",
                               "leaf_value=solver is on the sparse reward's scale (1 reachable, 0 not): it needs "
                               f"the search to score with the sparse reward (got {self.search_reward or self.reward})")
        if spec.min_group:
            problems += _check(self.group_size >= spec.min_group,
                               f"group_size must be >= {spec.min_group} for method {self.method} (got {self.group_size})")
        if self.advantage == "group":
            problems += _check(self.value_coef == 0,
                               f"value_coef must be 0 with advantage=group: no value head (got {self.value_coef})")
        elif self.advantage in value_baselines:
            problems += _check(self.value_coef > 0,
                               f"value_coef must be > 0 with advantage={self.advantage}: its baseline is "
                               f"the value head, which must learn (got {self.value_coef})")
        if spec.searches and self.value_coef == 0 and self.leaf_value == "head":
            problems += _check(self.search.rollout_lambda == 1,
                               f"method {self.method} with value_coef 0 has no value head, so its search must "
                               f"value every leaf by a rollout (or leaf_value=solver): search.rollout_lambda must be 1 "
                               f"(got {self.search.rollout_lambda})")
        if problems:
            return problems
        # batch arithmetic, once the sizes themselves are valid
        if spec.samples(self) > 1 and self.minibatch_rows % self.samples_per_problem:
            problems.append(f"minibatch_size={self.minibatch_rows} is not divisible by "
                            f"group_size={self.group_size}: a minibatch must hold whole groups")
        if self.rows_per_problem is None:
            problems += _check(self.micro_batch_size >= 1,
                               f"method {self.method} needs micro_batch_size >= 1: rows per forward/backward "
                               "(a tree yields a varying number of rows; minibatch_size counts trees)")
        elif self.micro_batch_size and self.minibatch_rows % self.micro_batch_size:
            problems.append(f"micro_batch_size={self.micro_batch_size} must divide "
                            f"minibatch_size={self.minibatch_rows}")
        return problems


def _exists(path: str) -> bool:
    """Whether a path exists; False for one the system cannot even look up (a name too long)."""
    try:
        return Path(path).expanduser().exists()
    except OSError:
        return False


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith((".yaml", ".json", ".safetensors"))
