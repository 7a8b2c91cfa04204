"""alp_agents.models.precision: bf16 only where the hardware runs it natively."""

from __future__ import annotations

from pathlib import Path

import torch

from alp_agents.models.precision import native_bf16, resolve_autocast, resolve_engine_precision


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_native_bf16_follows_the_cpu_flags_of_this_machine():
    expected = bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())
    assert native_bf16("cpu") is expected
    assert native_bf16(torch.device("meta")) is False


def test_auto_settings_resolve_to_bf16_only_where_native():
    native = native_bf16("cpu")
    assert resolve_autocast("auto", "cpu") == ("bf16" if native else "none")
    assert resolve_engine_precision("auto", "cpu") == (
        ("bfloat16", None) if native else ("float32", "bfloat16")
    )
    assert resolve_engine_precision("auto", "cpu", training=False) == (
        ("bfloat16", None) if native else ("float32", None)
    )


def test_explicit_settings_pass_through():
    assert resolve_autocast("bf16", "cpu") == "bf16"
    assert resolve_autocast("none", "cpu") == "none"
    assert resolve_engine_precision("float32", "cpu") == ("float32", None)
    assert resolve_engine_precision("bfloat16", "cpu") == ("bfloat16", None)
