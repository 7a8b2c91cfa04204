#!/usr/bin/env python
"""Train a tool-using agent with ALP on multi-turn Python tool-integrated reasoning.

With no arguments: SmolLM2-135M-Instruct on ``alp/PythonTool-v0`` (procedural ``arith``
problems where running Python helps), ALP preset, CPU, about 4 minutes on 2 free cores. It
evaluates on held-out problems before and after training and prints the comparison.

Examples::

    python train/multi_turn.py                                   # the CPU default
    python train/multi_turn.py --preset bypass steps=20          # another correction
    python train/multi_turn.py --config train/configs/multi_turn_qwen2.5_7b_vllm.yaml
    python train/multi_turn.py --resume runs/20260101-120000-multi_turn   # continue a run
    python train/multi_turn.py --import my_envs env.id=me/Dates-v0 env.dataset=dates
                                                                 # an env registered in my_envs.py
    python train/multi_turn.py --help                            # every option

Ctrl-C saves a checkpoint; ``--resume RUN_DIR`` continues exactly where it stopped.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from alp_agents.trainer import cli_main  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "multi_turn_cpu.yaml"

if __name__ == "__main__":
    sys.exit(cli_main(None, DEFAULT_CONFIG, description=__doc__))
