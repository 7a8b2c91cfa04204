"""The study: presets x variants x swept keys x seeds on one base config, each cell an ordinary
training run; aggregated into study.md / study.json / figures. See docs/study.md.

- `grid`: what the cells are (`StudySpec`, `Cell`);
- `runner`: runs them, resumable (`run_study`);
- `aggregate`: the statistics (bootstrap intervals, envelope widths), pure;
- `report`, `figures`: study.json, study.md and the PNGs.
"""

from alp_agents.study.grid import Cell, StudySpec
from alp_agents.study.runner import run_study

__all__ = ["Cell", "StudySpec", "run_study"]
