"""A value model for the test-time search: a copy of the policy, fine-tuned with a fresh value head to
tell whether a step prefix can still reach the target.

The policy's own value head, fitted to the dense reward of random-play traces, ranks first steps no
better than chance (held-out AUC 0.57); the test-time search needs a value that ranks the first steps
it samples (`search.screen`). This module fits one on training problems only:

1. Prefixes. For each problem, `lines` completions are sampled from the policy at `temperature` and
   cut after each of their first `depths` step delimiters: the policy's own step prefixes.
2. Label. The environment's solver (`env.reachable`, Countdown: can the target still be made from
   the numbers the steps left?): exact, no sampling noise. An environment without a solver has no
   label, and is refused.
3. Fit. A copy of the policy's language model and a fresh `ValueHead` are trained together by binary
   cross-entropy on (V + 1) / 2 (V in [-1, 1], what the search reads), AdamW, linear warm-up then
   linear decay to zero, gradient norm clipped at 1.
4. Held out. The same prefixes sampled on other training problems (`held_out`, the last ones of the
   split, disjoint from the fitted ones); the AUC of V against the label per depth
   (`value_probe.auc`: 0.5 is chance).

The result is a model folder (`Policy.save`, written whole or not at all) whose value head is this
value; `load_value_model` reads it back. The embedded tiny model ships one in its folder
(`value_model/`), made by `treedistill value-model --model tiny` (the numbers: docs/results.md).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from treedistill.engine.hf import _pad
from treedistill.errors import UsageError
from treedistill.models.value_head import ValueHead
from treedistill.rollout.sample import completion_text
from treedistill.value_probe import auc

__all__ = ["VALUE_MODEL_FOLDER", "Prefix", "ValueFitConfig", "fit_value_model", "load_value_model",
           "sample_prefixes", "value_model_folder"]

VALUE_MODEL_FOLDER = "value_model"  # a model folder's value model: MODEL/value_model/


@dataclass(frozen=True)
class ValueFitConfig:
    """problems: the first N training problems are fitted; held_out: the last N are measured (disjoint)."""

    problems: int = 8000
    held_out: int = 1200
    lines: int = 2              # completions sampled per problem
    depths: int = 2             # step prefixes kept per completion: after its 1st .. depths-th step
    temperature: float = 0.8    # the search's sampling temperature
    max_new_tokens: int = 80    # per sampled completion (the tiny model's first two steps: ~40)
    epochs: int = 2
    batch: int = 64
    lr: float = 3e-4
    warmup: int = 100           # optimizer steps of linear warm-up
    seed: int = 0

    def errors(self) -> list[str]:
        out = [f"{name} must be >= 1 (got {getattr(self, name)})"
               for name in ("problems", "held_out", "lines", "depths", "max_new_tokens", "epochs", "batch")
               if getattr(self, name) < 1]
        if not self.temperature > 0:
            out.append(f"temperature must be > 0 (got {self.temperature})")
        if not self.lr > 0:
            out.append(f"lr must be > 0 (got {self.lr})")
        if self.warmup < 0:
            out.append(f"warmup must be >= 0 (got {self.warmup})")
        return out


@dataclass(frozen=True)
class Prefix:
    """prompt + the completion's first `depth` steps (token ids), and the solver's label."""

    tokens: tuple[int, ...]
    depth: int
    reachable: bool


def sample_prefixes(engine, policy, env, problems: Sequence[dict], cfg: ValueFitConfig, seed: int,
                    chunk: int = 64) -> list[Prefix]:
    """`cfg.lines` completions per problem from `engine`, cut after each of their first `cfg.depths`
    step delimiters, labelled by `env.reachable` (the problem's prefix text)."""
    out: list[Prefix] = []
    for lo in range(0, len(problems), chunk):
        part = problems[lo:lo + chunk]
        prompts = [tuple(policy.prompt_ids(env.messages(p, compact=policy.compact_prompt))) for p in part]
        samples = engine.sample(prompts, n=cfg.lines, max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.temperature, seed=seed + lo)
        for problem, prompt, lines in zip(part, prompts, samples):
            for line in lines:
                tokens, depth = tuple(line.tokens), 0
                for t in range(len(tokens)):
                    text = completion_text(policy, tokens[:t + 1])
                    if not text.endswith(env.step_end):
                        continue
                    depth += 1
                    out.append(Prefix(prompt + tokens[:t + 1], depth, bool(env.reachable(problem, text))))
                    if depth == cfg.depths:
                        break
    return out


def _values(value_model, prefixes: Sequence[Prefix]) -> torch.Tensor:
    """V at each prefix's last token [B]: a right-padded batch through `Policy.forward`, as the HF
    engine's `value` computes it (with gradients, for the fit)."""
    ids, mask = _pad([p.tokens for p in prefixes], value_model.pad_token_id, left=False, device=value_model.device)
    _, hidden = value_model.forward(ids, mask)                                        # [B, T, H]
    return value_model.value_head(hidden[torch.arange(len(prefixes), device=hidden.device), mask.sum(-1) - 1])


def held_out_auc(value_model, prefixes: Sequence[Prefix], depths: int, batch: int = 256) -> dict:
    """{depth: {"prefixes", "reachable", "auc"}} of V against the solver's label on `prefixes`."""
    was_training = value_model.model.training
    value_model.model.eval()
    with torch.no_grad():
        values = [v for lo in range(0, len(prefixes), batch)
                  for v in _values(value_model, prefixes[lo:lo + batch]).tolist()]
    value_model.model.train(was_training)
    out = {}
    for d in range(1, depths + 1):
        idx = [i for i, p in enumerate(prefixes) if p.depth == d]
        labels = [prefixes[i].reachable for i in idx]
        out[d] = {"prefixes": len(idx), "reachable": sum(labels) / len(idx) if idx else None,
                  "auc": auc([values[i] for i in idx], labels) if idx else None}
    return out


def fit_value_model(policy, engine, env, problems: Sequence[dict], cfg: ValueFitConfig,
                    log: Callable[[str], None] = print):
    """Sample, label and fit (the module docstring) on `problems` (a training split); returns
    (the value model as a Policy, a report dict)."""
    if cfg.errors():
        raise UsageError("value model: " + "; ".join(cfg.errors()))
    if getattr(env, "reachable", None) is None:
        raise UsageError(f"a value model is fitted to the environment's solver; "
                         f"{getattr(env, 'name', type(env).__name__)} has none")
    if cfg.problems + cfg.held_out > len(problems):
        raise UsageError(f"value model: {cfg.problems} fitted + {cfg.held_out} held-out problems, but the "
                         f"training split has {len(problems)}")
    t0 = time.perf_counter()
    train = sample_prefixes(engine, policy, env, problems[:cfg.problems], cfg, seed=cfg.seed * 1_000_003 + 1)
    held = sample_prefixes(engine, policy, env, problems[-cfg.held_out:], cfg, seed=cfg.seed * 1_000_003 + 500_009)
    if len(train) < cfg.batch:
        raise UsageError(f"value model: {len(train)} prefixes sampled, fewer than one batch of {cfg.batch}")
    reach = sum(p.reachable for p in train) / len(train)
    log(f"sampled {len(train)} prefixes ({reach:.1%} reachable), {len(held)} held out, "
        f"{time.perf_counter() - t0:.0f} s")

    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(policy.model).float().train()
    head = ValueHead(policy.hidden_size).to(policy.device)
    value_model = copy.copy(policy)
    value_model.model, value_model.value_head, value_model.value_head_saved = model, head, True
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    steps = cfg.epochs * (len(train) // cfg.batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1)) * max(0.0, 1 - s / steps))
    rng = random.Random(cfg.seed)
    step, losses = 0, []
    for epoch in range(cfg.epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for lo in range(0, len(order) - cfg.batch + 1, cfg.batch):
            items = [train[k] for k in order[lo:lo + cfg.batch]]
            y = torch.tensor([float(p.reachable) for p in items], device=policy.device)
            p = ((_values(value_model, items) + 1) / 2).clamp(1e-5, 1 - 1e-5)
            loss = torch.nn.functional.binary_cross_entropy(p, y)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            schedule.step()
            step += 1
            losses.append(loss.item())
            if step % 200 == 0 or step == steps:
                log(f"step {step}/{steps} loss {sum(losses[-200:]) / len(losses[-200:]):.3f} "
                    f"{time.perf_counter() - t0:.0f} s")
        report = held_out_auc(value_model, held, cfg.depths)
        log(f"epoch {epoch + 1}: held-out AUC " + ", ".join(
            f"depth {d} {r['auc']:.3f} ({r['prefixes']} prefixes, {r['reachable']:.1%} reachable)"
            for d, r in report.items() if r["auc"] is not None))
    model.eval()
    return value_model, {
        "fit": asdict(cfg), "prefixes": len(train), "reachable": reach, "held_out_prefixes": len(held),
        "steps": step, "final_loss": sum(losses[-200:]) / max(len(losses[-200:]), 1),
        "held_out": {str(d): r for d, r in report.items()}, "seconds": time.perf_counter() - t0}


def value_model_folder(model_folder: str | Path | None) -> Path | None:
    """The value model shipped in a model folder (MODEL/value_model/), or None."""
    if model_folder is None:
        return None
    folder = Path(model_folder) / VALUE_MODEL_FOLDER
    return folder if (folder / "treedistill.json").is_file() else None


def load_value_model(folder: str | Path, policy, engine_name: str = "native"):
    """An engine over the value model at `folder`, for its `value` calls. It must share the policy's
    tokenizer (the search hands it the policy's token ids)."""
    from treedistill.engine import make_engine
    from treedistill.models.load import load_policy

    path = Path(folder)
    if not (path / "treedistill.json").is_file():
        raise UsageError(f"no value model at {path} (expected a model folder written by `treedistill value-model`)")
    value_policy = load_policy(path, value_head=True, device=policy.device)
    if not value_policy.value_head_saved:
        raise UsageError(f"{path} holds no value head")
    if value_policy.tokenizer.get_vocab() != policy.tokenizer.get_vocab():
        raise UsageError(f"the value model at {path} does not share {policy.name}'s tokenizer")
    return make_engine(value_policy, engine_name)
