"""The order in which training problems are drawn: seeded, epoch-based, checkpointable."""

from __future__ import annotations

import torch

from alp_agents.common import derive_seed


class ProblemSampler:
    """Seeded, epoch-based sampler over problem indices whose position is checkpointable.

    Each epoch is a fresh permutation seeded by ``derive_seed("problems", seed, epoch)``;
    ``state_dict`` is just ``(epoch, position)``, so resuming continues with exactly the next
    problems.

    >>> s = ProblemSampler(5, seed=0)
    >>> first = s.take(3) + s.take(2)
    >>> sorted(first), s.state_dict()
    ([0, 1, 2, 3, 4], {'epoch': 1, 'position': 0})
    """

    def __init__(self, num_items: int, seed: int) -> None:
        if num_items < 1:
            raise ValueError("ProblemSampler needs at least one problem")
        self.num_items, self.seed = num_items, seed
        self.epoch, self.position = 0, 0

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(derive_seed("problems", self.seed, self.epoch))
        return torch.randperm(self.num_items, generator=g).tolist()

    def take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            order = self._order()
            chunk = order[self.position : self.position + n - len(out)]
            out.extend(chunk)
            self.position += len(chunk)
            if self.position >= self.num_items:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
