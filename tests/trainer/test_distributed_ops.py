"""The distributed operations on one process (the multi-process runs are test_distributed.py):
each is its plain single-process counterpart, and the world checks refuse uneven shards."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from alp_agents.configs.train import TrainConfig, TrainConfigError
from alp_agents.trainer.distributed import DistributedOps, check_world


@pytest.fixture(scope="module")
def ops() -> DistributedOps:
    from accelerate import Accelerator

    # The trainer's own choice of device: accelerate keeps one state per process, and a test
    # worker that ran a trainer on a GPU refuses a second state on the CPU.
    return DistributedOps(Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no"))


def test_one_process_has_rank_0_and_no_collective(ops):
    assert (ops.rank, ops.world, ops.is_main, ops.is_fsdp) == (0, 1, True, False)
    assert ops.fewest_over_ranks(7) == 7
    assert ops.gather_objects({"a": 1}) is None
    assert ops.broadcast_object("x") == "x"


def test_state_dicts_are_the_plain_ones(ops):
    model = torch.nn.Linear(3, 2)
    full = ops.full_state_dict(model, all_ranks=True)
    assert full.keys() == model.state_dict().keys()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = ops.full_optimizer_state(opt)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    ops.load_optimizer_state(fresh, state)
    for a, b in zip(opt.state.values(), fresh.state.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"])


def test_clip_grad_norm_returns_the_norm_before_clipping(ops):
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    assert ops.clip_grad_norm([p], 1.0) == pytest.approx(5.0)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    p.grad = torch.tensor([3.0, 4.0])
    assert ops.clip_grad_norm([p], float("inf")) == pytest.approx(5.0)
    assert p.grad.tolist() == [3.0, 4.0]


@pytest.mark.parametrize(
    ("world", "prompts", "mini_batches", "error"),
    [
        (1, 3, 1, None),
        (2, 4, 2, None),
        (2, 3, 1, "multiple of the number of processes"),
        (2, 2, 4, "per process"),
    ],
)
def test_check_world(world, prompts, mini_batches, error):
    cfg = TrainConfig()
    cfg.rollout.prompts_per_step, cfg.rollout.group_size = prompts, 2
    cfg.algorithm.mini_batches = mini_batches
    accelerator = SimpleNamespace(num_processes=world, distributed_type=None)
    if error is None:
        check_world(cfg.rollout, cfg.algorithm, accelerator, print)
    else:
        with pytest.raises(TrainConfigError, match=error):
            check_world(cfg.rollout, cfg.algorithm, accelerator, print)
