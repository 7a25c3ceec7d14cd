"""Reference engine on Hugging Face `generate`: simple, slow, and the yardstick for the native path.

Every call re-encodes its prefixes (no KV cache survives between calls), so `prompt_tokens` counts
every prefix token of every row. Rows are left-padded; a row stops at end-of-sequence or at the
first stop string in its GENERATED text (a prefix that already ends with "</step>" does not stop the
next step at once). Finished rows keep riding in the batch (HF generate does not drop them) but are
not counted as generated tokens.

Log-probs come from generate's own per-step tensors: `scores` (after temperature / top_p: the
sampling distribution) and `logits` (raw: the policy at temperature 1). Temperature 0 is greedy: its
sampling distribution is a point mass, so `Sample.logprobs` are 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from treedistill.algorithms.losses import token_logprobs
from treedistill.engine.base import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Counters, Sample
from treedistill.errors import UsageError
from treedistill.models.load import Policy

__all__ = ["HFEngine"]

# generate keeps raw logits and processed scores of every step ([rows, steps, vocab] twice): rows are
# split into chunks that keep those under this many bytes (a 151,936-token vocabulary costs 1.2 MB a
# token a row).
_LOGIT_BUDGET_BYTES = 2 * 1024**3
# ... and whose key/value cache (every row to prefix + max_new_tokens) stays under this many bytes: a
# small model's logits are cheap, and without this bound a call for many samples (`eval --k 100000`)
# took 23 GiB, all the memory of this project's machine.
_CACHE_BUDGET_BYTES = 1024**3


def _check_prefixes(prefixes: Sequence[Sequence[int]], vocab: int, context: int, extra: int = 0) -> None:
    if len(prefixes) == 0:
        raise UsageError("no prefixes given")
    for i, p in enumerate(prefixes):
        if len(p) == 0:
            raise UsageError(f"prefix {i} is empty")
        if min(p) < 0 or max(p) >= vocab:
            raise UsageError(f"prefix {i} holds token ids outside the vocabulary [0, {vocab})")
        if len(p) + extra > context:
            raise UsageError(f"prefix {i} is {len(p)} tokens (+{extra} new), longer than the model's "
                             f"context of {context} tokens")


def _pad(rows: Sequence[Sequence[int]], pad: int, *, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, T], attention mask [B, T]), padded on the left or the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(list(r), dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def _first_stop(tokens: Sequence[int], stop: Sequence[str], decode) -> int | None:
    """Index of the token that completes the first stop string in decode(tokens), or None.

    "decode(tokens[:k+1]) contains a stop string" is monotone in k, so a binary search finds the
    first such k with O(log T) decodes.
    """
    if not stop or not any(s in decode(tokens) for s in stop):
        return None
    lo, hi = 0, len(tokens) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in decode(tokens[: mid + 1]) for s in stop):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _cache_bytes_per_token(model) -> int:
    """Bytes of keys and values one token adds to a row's cache: layers x 2 x kv heads x head dim."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    element = next(model.parameters()).element_size()
    return config.num_hidden_layers * 2 * kv_heads * head_dim * element


class HFEngine:
    """Engine over a Policy with HF generate. opts: max_rows caps the rows of one generate call."""

    def __init__(self, policy: Policy, *, max_rows: int | None = None):
        if max_rows is not None and max_rows < 1:
            raise UsageError(f"max_rows must be >= 1, got {max_rows}")
        self.policy = policy
        self.max_rows = max_rows
        self.counters = Counters()
        self._vocab = int(policy.model.config.vocab_size)
        self._cache_bytes_per_token = _cache_bytes_per_token(policy.model)

    def clear_cache(self) -> None:
        """Nothing to clear: no key/value survives a call."""

    # -- sampling -------------------------------------------------------------------------------
    def sample(
        self,
        prefixes: Sequence[Sequence[int]],
        n: int = 1,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[list[Sample]]:
        if n < 1:
            raise UsageError(f"n (samples per prefix) must be >= 1, got {n}")
        if not temperature >= 0:
            raise UsageError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {top_p}")
        if max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if isinstance(stop, str):
            stop = (stop,)
        if any(not s for s in stop):
            raise UsageError("stop strings must be non-empty")
        _check_prefixes(prefixes, self._vocab, self.policy.context_length, extra=1)
        rows = [list(p) for p in prefixes for _ in range(n)]
        longest = max(len(p) for p in prefixes) + max_new_tokens
        chunk = self.max_rows or max(1, min(_LOGIT_BUDGET_BYTES // (8 * self._vocab * max_new_tokens),
                                            _CACHE_BUDGET_BYTES // (self._cache_bytes_per_token * longest)))
        device = self.policy.device
        samples: list[Sample] = []
        rng_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(rows), chunk):
                samples += self._generate(rows[start:start + chunk], max_new_tokens=max_new_tokens,
                                          temperature=temperature, top_p=top_p, stop=tuple(stop))
        return [samples[i * n:(i + 1) * n] for i in range(len(prefixes))]

    @torch.no_grad()
    def _generate(self, rows: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                  stop: tuple[str, ...]) -> list[Sample]:
        from transformers import GenerationConfig, StoppingCriteriaList

        policy = self.policy
        eos = policy.eos_token_ids
        ids, mask = _pad(rows, policy.pad_token_id, left=True, device=policy.device)  # [R, P]
        greedy = temperature == 0
        # A config built from scratch, every warper named: the checkpoint's generation_config (e.g.
        # Qwen's top_k=20, repetition_penalty=1.05) and transformers' global defaults (top_k=50 for
        # unset values) must not change the distribution we report log-probs for.
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=not greedy,
            temperature=None if greedy else float(temperature), top_p=None if greedy else float(top_p),
            top_k=None if greedy else 0, min_p=None, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=eos,
            pad_token_id=policy.pad_token_id, output_scores=True, output_logits=True,
            return_dict_in_generate=True,
        )
        criteria = StoppingCriteriaList([_StopStrings(stop, ids.shape[1], policy.decode)] if stop else [])
        out = policy.model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                    stopping_criteria=criteria)
        new = out.sequences[:, ids.shape[1]:]                                       # [R, G]
        raw = torch.stack([self._picked(lg, new[:, t]) for t, lg in enumerate(out.logits)], 1)   # [R, G]
        if greedy:
            sampled = torch.zeros_like(raw)                                         # [R, G]
        else:
            sampled = torch.stack([self._picked(sc, new[:, t]) for t, sc in enumerate(out.scores)], 1)
        self.counters.forward_calls += len(out.logits)
        self.counters.prompt_tokens += sum(len(r) for r in rows)
        eos_set = set(eos)
        result = []
        for r in range(len(rows)):
            toks = new[r].tolist()
            end, finish = len(toks), FINISH_LENGTH
            first_eos = next((t for t, tok in enumerate(toks) if tok in eos_set), None)
            first_stop = _first_stop(toks if first_eos is None else toks[:first_eos], stop, policy.decode)
            if first_stop is not None:
                end, finish = first_stop + 1, FINISH_STOP
            elif first_eos is not None:
                end, finish = first_eos + 1, FINISH_EOS
            self.counters.generated_tokens += end
            result.append(Sample(tokens=tuple(toks[:end]), logprobs=tuple(sampled[r, :end].tolist()),
                                 policy_logprobs=tuple(raw[r, :end].tolist()), finish=finish))
        return result

    @staticmethod
    def _picked(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log_softmax(logits)[tokens]: logits [R, V], tokens [R] -> [R] (float32)."""
        logits = logits.float()                                                     # [R, V]
        return logits.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)

    # -- scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def value(self, prefixes: Sequence[Sequence[int]]) -> list[float]:
        policy = self.policy
        if policy.value_head is None:
            raise UsageError(f"{policy.name} was loaded without a value head (value_head=False)")
        _check_prefixes(prefixes, self._vocab, policy.context_length)
        ids, mask = _pad(prefixes, policy.pad_token_id, left=False, device=policy.device)  # [B, T]
        _, hidden = policy.forward(ids, mask)                                        # [B, T, H]
        last = mask.sum(-1) - 1                                                      # [B]
        h = hidden[torch.arange(len(prefixes), device=hidden.device), last]          # [B, H]
        self.counters.forward_calls += 1
        self.counters.scored_tokens += int(mask.sum())
        self.counters.values += len(prefixes)
        return policy.value_head(h).float().tolist()

    @torch.no_grad()
    def logprobs(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        policy = self.policy
        if len(starts) != len(sequences):
            raise UsageError(f"{len(sequences)} sequences but {len(starts)} starts")
        _check_prefixes(sequences, self._vocab, policy.context_length)
        for i, (s, st) in enumerate(zip(sequences, starts)):
            if not 1 <= st <= len(s):
                raise UsageError(f"starts[{i}] = {st} must be in [1, {len(s)}] (a token needs a context)")
        ids, mask = _pad(sequences, policy.pad_token_id, left=False, device=policy.device)  # [B, T]
        logits, _ = policy.forward(ids, mask)                                        # [B, T, V]
        lp = token_logprobs(logits, ids)                                             # [B, T]
        self.counters.forward_calls += 1
        self.counters.scored_tokens += int(mask.sum())
        return [lp[i, st:len(s)].tolist() for i, (s, st) in enumerate(zip(sequences, starts))]


class _StopStrings:
    """StoppingCriteria: per row, True once the row's generated tail contains a stop string.

    Only the last `window` generated tokens are decoded (a stop string of k bytes spans at most k
    tokens), so the check costs the same at every step.
    """

    def __init__(self, stop: tuple[str, ...], prompt_len: int, decode):
        self.stop = stop
        self.prompt_len = prompt_len
        self.decode = decode
        self.window = max(len(s.encode("utf-8")) for s in stop)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        start = max(self.prompt_len, input_ids.shape[1] - self.window)
        tails = input_ids[:, start:].tolist()
        done = [any(s in self.decode(t) for s in self.stop) for t in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)        # [R]
