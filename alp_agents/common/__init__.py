"""Small helpers every layer of alp_agents shares: JSONL files, "did you mean" hints, seeds.

Each exists once so that every file, every error message and every derived seed behaves the
same way across the trainer, evaluation and the study runner.
"""

from alp_agents.common.jsonl import append_jsonl, read_jsonl, rewrite_jsonl
from alp_agents.common.seeding import derive_seed
from alp_agents.common.suggest import did_you_mean

__all__ = ["append_jsonl", "derive_seed", "did_you_mean", "read_jsonl", "rewrite_jsonl"]
