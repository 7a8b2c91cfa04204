"""HFEngine: batched sampling with a KV cache on any transformers causal LM (the CPU default).

The engine keeps ITS OWN copy of the weights in its own dtype (bfloat16 by default), so the
trainer (fp32 master weights) and the engine really disagree a little, as in production RL;
`update_weights` copies the trainer's current weights in. Perturbation parameters and hooks never
reach the engine: the copy is rebuilt from ``model.config`` and ``model.state_dict()``.

The decode loop is our own rather than ``model.generate`` because it needs three things generate
does not give together: exact per-token log-probs of the temperature-scaled distribution before
top-p/top-k (see `alp_agents.rollout.engines.base` for the convention), stop strings matched on the new
text with the cut on token ids, and finished rows DROPPED from the batch (their KV-cache rows are
removed), so a ragged batch does not keep spending compute on padding. Identical prompts (the
``group_size`` copies of a GRPO prompt) are prefilled once and their cache rows copied. A stop
string that ``SamplingParams.stop_condition`` rejects does not end the row: it goes on sampling
in the same call with its KV cache (``stats["deferred_stops"]`` counts those).

Example::

    >>> import torch
    >>> from alp_agents.models import load_tokenizer, make_tiny_model
    >>> tok = load_tokenizer()                                            # doctest: +SKIP
    >>> engine = HFEngine(make_tiny_model(), tok, dtype=torch.float32)    # doctest: +SKIP
    >>> prompt = tok.encode("<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n")
    ...                                                                   # doctest: +SKIP
    >>> [s] = engine.generate([prompt], SamplingParams(max_tokens=5, seed=0))   # doctest: +SKIP
    >>> len(s.token_ids), s.finish_reason                                 # doctest: +SKIP
    (5, 'length')
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from alp_agents.models import cache_argument, make_lm_head_input_contiguous
from alp_agents.rollout.engines.base import (
    Sample,
    SamplingParams,
    completed_stop,
    per_request,
    stop_cut,
    stop_window,
)

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype (try 'bfloat16' or 'float32')")
    return value


def _strip_wrapper_prefix(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _empty_init() -> contextlib.AbstractContextManager[Any]:
    """Skip random initialisation of a model whose weights are loaded right after."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        return contextlib.nullcontext()
    return no_init_weights()


def sample_next(
    logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; return ``(tokens, logprobs)`` per the engine convention.

    ``logits`` is ``(B, V)``; the log-prob is ``log_softmax(logits / T)`` of the sampled token,
    before top-k/top-p, in float32. Top-k/top-p only shape the distribution sampled from.
    """
    logits = logits.float()
    if sampling.temperature == 0:
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = logprobs.argmax(dim=-1)
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    scaled = logits / sampling.temperature
    logprobs = torch.log_softmax(scaled, dim=-1)
    if sampling.top_k or sampling.top_p < 1.0:
        filtered = _truncate(scaled, sampling.top_k, sampling.top_p)
        probs = torch.softmax(filtered, dim=-1)
    else:
        probs = logprobs.exp()
    tokens = sample_from(probs, generator)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``(B, V)`` non-negative weights, by inverting the CDF.

    One uniform draw per row and a float64 cumulative sum: on a 49k vocabulary this is ~10x
    cheaper than the exponential race ``argmax(p / E)`` (which draws V exponentials per row) and
    far cheaper than ``torch.multinomial`` on CPU. A zero-weight index is never returned (its CDF
    step is empty).

    >>> sample_from(torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])).tolist()[0]
    1
    """
    cdf = probs.to(torch.float64).cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, generator=generator, device=probs.device)
    tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    return tokens.clamp_(max=probs.shape[-1] - 1)


def _truncate(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside the top-k and outside the smallest nucleus of mass >= top_p."""
    if top_k and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass BEFORE it already reaches top_p (the top token always stays).
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


class HFEngine:
    """Batched KV-cache sampling with transformers on the engine's own copy of the weights.

    Args:
        model: a loaded transformers causal LM (the trainer's; it is copied, never shared) or a
            name/path for `alp_agents.models.load_model`.
        tokenizer: decodes new tokens for stop strings and gives the EOS id; loaded from the
            name when ``model`` is a name and this is None.
        dtype: the engine copy's dtype (bfloat16 by default: a real train/inference mismatch).
        max_batch_size: prompts per forward batch (longer lists run in chunks, longest first).
        device: where the copy lives ("cpu" or "cuda").
        attn_implementation: transformers attention backend for the copy ("sdpa").
        round_weights_to: store the weights rounded to this dtype (e.g. ``"bfloat16"``) while
            computing in ``dtype``: the weight-precision half of a bf16 engine's mismatch at fp32
            speed, for CPUs without native bf16 matmuls (AVX2-only: there bf16 runs ~100x slower
            than fp32, see docs/rollout.md). None: weights exactly as given.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        dtype: torch.dtype | str = torch.bfloat16,
        max_batch_size: int = 64,
        device: str | torch.device = "cpu",
        attn_implementation: str = "sdpa",
        round_weights_to: torch.dtype | str | None = None,
    ) -> None:
        self.dtype = _as_dtype(dtype)
        self.round_weights_to = None if round_weights_to is None else _as_dtype(round_weights_to)
        self.device = torch.device(device)
        self.max_batch_size = int(max_batch_size)
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if isinstance(model, str | os.PathLike):
            from alp_agents.models import load_model, load_tokenizer

            name = os.fspath(model)
            if tokenizer is None:
                tokenizer = load_tokenizer(name)
            self.model = load_model(
                name, dtype=self.dtype, device=self.device, attn_implementation=attn_implementation
            )
            if self.round_weights_to is not None:
                self._load(self.model, self.model.state_dict(), self.round_weights_to)
        else:
            self.model = self._copy_of(model, attn_implementation)
        self.model.requires_grad_(False)
        make_lm_head_input_contiguous(self.model)  # prefill with logits_to_keep=1, see there
        self.tokenizer = tokenizer
        self.eos_token_ids = self._eos_ids(self.model, tokenizer)
        self._cache_kwarg = cache_argument(self.model)
        self.stats = {
            "generate_calls": 0,
            "generated_tokens": 0,
            "forward_rows": 0,
            "deferred_stops": 0,  # stop strings a stop_condition rejected (row kept going)
        }

    # ------------------------------------------------------------------ weights
    def _copy_of(self, model: torch.nn.Module, attn_implementation: str) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        config = model.config.__class__.from_dict(model.config.to_dict())
        config._attn_implementation = attn_implementation
        with _empty_init():
            copy = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        copy.to(self.device).eval()
        if getattr(model, "generation_config", None) is not None:
            copy.generation_config = model.generation_config
        self._load(copy, model.state_dict(), self.round_weights_to)
        return copy

    def update_weights(self, model_or_state_dict: torch.nn.Module | Mapping[str, Any]) -> None:
        """Copy the trainer's weights into the engine's copy (cast to the engine dtype).

        Accepts a model or a state dict; DDP/``torch.compile``/FSDP key prefixes are stripped.
        Perturbation parameters are not in ``model.state_dict()`` and so never reach the engine.
        Every parameter of the engine must be covered, else nothing is silently left stale.
        """
        state = (
            model_or_state_dict.state_dict()
            if isinstance(model_or_state_dict, torch.nn.Module)
            else model_or_state_dict
        )
        self._load(self.model, state, self.round_weights_to)

    @staticmethod
    @torch.no_grad()
    def _load(
        target: torch.nn.Module, state: Mapping[str, Any], round_to: torch.dtype | None = None
    ) -> None:
        source = {_strip_wrapper_prefix(k): v for k, v in state.items()}
        own = target.state_dict()
        missing = [k for k in own if k not in source]
        if missing:
            raise KeyError(
                f"update_weights: {len(missing)} engine weight(s) missing from the source state "
                f"dict, e.g. {missing[:3]}; is it the same architecture?"
            )
        for key, tensor in own.items():
            value = source[key]
            if tuple(value.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"update_weights: {key} has shape {tuple(value.shape)}, "
                    f"engine expects {tuple(tensor.shape)}"
                )
            value = value.detach()
            if round_to is not None and value.is_floating_point():
                value = value.to(round_to)
            tensor.copy_(value)

    @staticmethod
    def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
        ids: set[int] = set()
        gen = getattr(model, "generation_config", None)
        for value in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, Sequence):
                ids.update(int(v) for v in value)
        return ids

    # ------------------------------------------------------------------ sampling
    def generate(
        self, prompts: list[list[int]], sampling: SamplingParams | Sequence[SamplingParams]
    ) -> list[Sample]:
        """Sample a continuation for every prompt (token ids in, token ids out).

        ``sampling`` is one `SamplingParams` for all prompts or one per prompt; per-prompt lists
        may differ only in ``max_tokens``, ``stop``, ``stop_token_ids`` and ``stop_condition``
        (the agent loop gives each episode the budget it has left and its env's completion rule).
        """
        if not prompts:
            return []
        per_prompt = self._per_prompt(sampling, len(prompts))
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty")
        if any(p.stop for p in per_prompt) and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: HFEngine(model, tokenizer)")
        generator = None
        if per_prompt[0].seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(per_prompt[0].seed)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: list[Sample | None] = [None] * len(prompts)
        self.stats["generate_calls"] += 1
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start : start + self.max_batch_size]
            samples = self._generate_batch(
                [prompts[i] for i in chunk], [per_prompt[i] for i in chunk], generator
            )
            for i, sample in zip(chunk, samples, strict=True):
                results[i] = sample
        return results  # type: ignore[return-value]

    @staticmethod
    def _per_prompt(
        sampling: SamplingParams | Sequence[SamplingParams], n: int
    ) -> list[SamplingParams]:
        per_prompt = per_request(sampling, n)
        first = per_prompt[0]
        for i, p in enumerate(per_prompt):
            for name in ("temperature", "top_p", "top_k", "seed"):
                if getattr(p, name) != getattr(first, name):
                    raise ValueError(
                        f"SamplingParams[{i}].{name}={getattr(p, name)!r} differs from "
                        f"SamplingParams[0].{name}={getattr(first, name)!r}; only max_tokens, "
                        "stop, stop_token_ids and stop_condition may vary per prompt"
                    )
        return per_prompt

    @torch.inference_mode()
    def _generate_batch(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        generator: torch.Generator | None,
    ) -> list[Sample]:
        from transformers import DynamicCache

        rows = len(prompts)
        # Identical prompts (a GRPO group) are prefilled once; their cache rows are copied.
        distinct: dict[tuple[int, ...], int] = {}
        prompt_of_row = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        unique = [list(p) for p in distinct]
        width = max(len(p) for p in unique)
        input_ids = torch.zeros((len(unique), width), dtype=torch.long)
        attention = torch.zeros((len(unique), width), dtype=torch.long)
        for r, prompt in enumerate(unique):  # left padding: new tokens line up on the right
            input_ids[r, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention[r, width - len(prompt) :] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        stop_ids = [self.eos_token_ids | set(p.stop_token_ids) for p in params]
        windows = [stop_window(p.stop) for p in params]
        max_new = [p.max_tokens for p in params]

        new_ids: list[list[int]] = [[] for _ in range(rows)]
        new_lps: list[list[float]] = [[] for _ in range(rows)]
        deferred = [False] * rows  # a stop string of this row was deferred (stop_condition)
        done: list[Sample | None] = [None] * rows
        live = list(range(rows))  # original row of each batch row
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(input_ids, attention, positions, cache)
        self.stats["forward_rows"] += len(unique)
        if len(unique) < rows:
            index = torch.tensor(prompt_of_row, dtype=torch.long, device=self.device)
            cache.batch_select_indices(index)
            attention, positions, logits = attention[index], positions[index], logits[index]
        step_pos = positions
        sampling = params[0]
        while True:
            tokens, logprobs = sample_next(logits, sampling, generator)
            tokens_list, lps_list = tokens.tolist(), logprobs.tolist()
            keep = []
            for b, r in enumerate(live):
                tok = tokens_list[b]
                new_ids[r].append(tok)
                new_lps[r].append(lps_list[b])
                finished = self._finished(
                    new_ids[r], tok, stop_ids[r], params[r], windows[r], deferred, r
                )
                if finished is None and len(new_ids[r]) >= max_new[r]:
                    finished = ("length", None)
                if finished is None:
                    keep.append(b)
                else:
                    reason, stop = finished
                    done[r] = Sample(new_ids[r], new_lps[r], reason, stop)
                    self.stats["generated_tokens"] += len(new_ids[r])
            if not keep:
                break
            if len(keep) < len(live):
                index = torch.tensor(keep, dtype=torch.long, device=self.device)
                cache.batch_select_indices(index)
                attention, step_pos, tokens = attention[index], step_pos[index], tokens[index]
                live = [live[b] for b in keep]
            attention = torch.cat([attention, attention.new_ones((len(live), 1))], dim=-1)
            step_pos = step_pos[:, -1:] + 1
            logits = self._forward(tokens[:, None], attention, step_pos, cache)
            self.stats["forward_rows"] += len(live)
        return done  # type: ignore[return-value]

    def _forward(
        self, ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """Extend ``cache`` by ``ids``; the ``(B, V)`` logits of the last position."""
        out = self.model(
            input_ids=ids,
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kwarg: cache},
        )
        return out.logits[:, -1, :]

    def _finished(
        self,
        ids: list[int],
        token: int,
        stop_ids: set[int],
        params: SamplingParams,
        window: int,
        deferred: list[bool],
        row: int,
    ) -> tuple[str, str | None] | None:
        if token in stop_ids:
            return ("eos", None)
        if params.stop:
            tail = ids[-window:]
            text = self.tokenizer.decode(tail, skip_special_tokens=False)
            if any(s in text for s in params.stop):
                if not deferred[row]:
                    # Checked after every token and no stop was passed over, so the newest token
                    # completed the stop string: the cut is right here, on token ids; `stop_cut`
                    # names the stop that came first.
                    stop = stop_cut(tail, self._decode, params.stop)[1]
                else:  # a deferred stop may still be in the window: only a new one counts
                    stop = completed_stop(tail, self._decode, params.stop, text)
                if stop is not None:
                    if params.stop_condition is None or params.stop_condition(list(ids)):
                        return ("stop", stop)
                    deferred[row] = True  # not the end (e.g. a bare fence): keep sampling
                    self.stats["deferred_stops"] += 1
        return None

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)
