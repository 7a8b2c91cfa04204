"""Low precision where the hardware runs it natively, float32 where it would crawl.

bf16 is the precision of production RL (the engine samples in bf16, the trainer runs bf16
autocast over float32 master weights), and it is fast on GPUs and on CPUs with AMX or
AVX512-BF16. On other CPUs torch has no bf16 matmul kernel and falls back to a scalar path:
measured on an AVX2-only AMD EPYC (2026-11-27), a 1024x1024 matmul ran at 14.5 GFLOP/s in
float32 and 0.2 GFLOP/s in bfloat16, and the bf16 engine generated ~4 tokens/s instead of
hundreds. The ``auto`` settings pick bf16 only where it is native; otherwise the trainer runs
float32 and the engine keeps bf16-ROUNDED weights in float32 (`HFEngine`'s
``round_weights_to``), so the engine still disagrees with the trainer the way a bf16 engine's
weights do.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

__all__ = ["AUTO", "native_bf16", "resolve_autocast", "resolve_engine_precision"]

AUTO = "auto"
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume nothing
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(device: torch.device | str) -> bool:
    """True where bf16 matmuls run on dedicated hardware (CUDA with bf16, AMX, AVX512-BF16)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return any(flag in _cpu_flags() for flag in _CPU_BF16_FLAGS)
    return False


def resolve_autocast(setting: str, device: torch.device | str) -> str:
    """``model.autocast``: ``auto`` -> ``bf16`` where native, else ``none``; others unchanged."""
    if setting != AUTO:
        return setting
    return "bf16" if native_bf16(device) else "none"


def resolve_engine_precision(
    setting: str, device: torch.device | str, training: bool = True
) -> tuple[str, str | None]:
    """``(engine dtype, round_weights_to)`` for ``rollout.engine_dtype`` (or an eval dtype).

    ``auto``: ``("bfloat16", None)`` where bf16 is native; otherwise ``("float32",
    "bfloat16")`` for training (bf16-rounded weights: the mismatch stays) and ``("float32",
    None)`` for evaluation. An explicit dtype is returned as it is, without rounding.
    """
    if setting != AUTO:
        return setting, None
    if native_bf16(device):
        return "bfloat16", None
    return "float32", ("bfloat16" if training else None)
