#!/usr/bin/env python
"""Compare ALP and the baselines on equal terms: a grid of ordinary training runs, aggregated.

Examples::

    python train/study.py --presets alp,bypass --seeds 0,1,2 --output runs/study
    python train/study.py --config train/configs/study_offpolicy_cpu.yaml --presets alp,bypass \\
        --seeds 0 steps=2 --output runs/study-smoke
    python train/study.py --report runs/study        # rebuild study.md / study.json / PNGs
    python train/study.py --help

Each cell is a `train/multi_turn.py` run under DIR/cells/; rerunning the same command skips the
finished cells and resumes an interrupted one. See docs/study.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from alp_agents.study.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
