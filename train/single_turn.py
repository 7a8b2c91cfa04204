#!/usr/bin/env python
"""Train with ALP on single-turn math (``alp/Math-v0``): the same learner, one step per episode.

With no arguments: SmolLM2-135M-Instruct on procedural ``arith`` problems answered in
``\\boxed{}`` without a tool, ALP preset with the single-turn release settings (sigma_0 = 0.02,
k3 KL 0.001 to the reference), CPU, about 10 minutes on 2 cores; held-out score before and after
is printed at the end.

Examples::

    python train/single_turn.py
    python train/single_turn.py --preset grpo
    python train/single_turn.py env.dataset=gsm8k env.eval_split=test rollout.max_tokens=256
    python train/single_turn.py --resume runs/20260101-120000-single_turn
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from alp_agents.trainer import cli_main  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "single_turn_cpu.yaml"

if __name__ == "__main__":
    sys.exit(cli_main(None, DEFAULT_CONFIG, description=__doc__))
