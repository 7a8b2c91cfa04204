"""The typed trainer state and the checkpoint files: what is saved is what is loaded."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from alp_agents.models import make_tiny_model
from alp_agents.trainer import checkpoint as ckpt
from alp_agents.trainer.checkpoint import TrainerState
from alp_agents.trainer.problems import ProblemSampler


def a_state(with_ranks: bool = True) -> TrainerState:
    """A state as a run 2 steps in would have it (a sampler moved on, a used optimiser)."""
    sampler = ProblemSampler(10, seed=3)
    sampler.take(7)
    sampler.take(7)
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5)
    param.grad = torch.tensor([0.1, -0.2, 0.3])
    opt.step()
    sched.step()
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    rng = ckpt.rng_state()
    return TrainerState(
        step=2,
        sampler=sampler.state_dict(),
        rng=rng,
        optimizer=opt.state_dict(),
        scheduler=sched.state_dict(),
        perturbation={"log_sigma": torch.tensor([-4.0, -3.5])},
        rng_per_rank=[rng, ckpt.rng_state()] if with_ranks else None,
        nonfinite_in_row=1,
        skipped_updates=4,
        signal_flat_steps=2,
        eval_history=[{"step": 0, "label": "before", "avg@k": 0.25}],
    )


def assert_same(a, b) -> None:
    """Equal, with tensors and numpy arrays compared by value, at any nesting."""
    if torch.is_tensor(a):
        assert torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("with_ranks", [True, False])
def test_state_round_trips_every_field(tmp_path, with_ranks):
    state = a_state(with_ranks)
    state.save(tmp_path)
    back = TrainerState.load(tmp_path)
    for name in state.__dataclass_fields__:
        assert_same(getattr(state, name), getattr(back, name))
    assert (tmp_path / "rng_per_rank.pt").exists() == with_ranks


def test_loaded_rng_and_sampler_continue_where_the_saved_ones_were(tmp_path):
    state = a_state()
    expected_draw = torch.rand(3)  # what the RNGs give right after the state was taken
    sampler = ProblemSampler(10, seed=3)
    sampler.load_state_dict(state.sampler)
    expected_problems = sampler.take(5)
    state.save(tmp_path)

    back = TrainerState.load(tmp_path)
    torch.manual_seed(999)  # move the RNG elsewhere
    ckpt.set_rng_state(back.rng_for_rank(0, 1))
    assert torch.equal(torch.rand(3), expected_draw)
    resumed = ProblemSampler(10, seed=3)
    resumed.load_state_dict(back.sampler)
    assert resumed.take(5) == expected_problems
    assert back.sampler == {"epoch": 1, "position": 4}


def test_rng_for_rank_falls_back_to_rank_0_on_another_world_size():
    state = a_state()
    assert state.rng_for_rank(1, 2) is state.rng_per_rank[1]
    assert state.rng_for_rank(1, 4) is state.rng
    alone = a_state(with_ranks=False)  # saved without gathering (Ctrl-C under DDP)
    assert alone.rng_for_rank(1, 2) is alone.rng


def test_checkpoint_saves_config_once_and_loads_the_state(tmp_path):
    from alp_agents.configs.train import TrainConfig

    cfg = TrainConfig()
    cfg.steps = 17
    model = make_tiny_model("llama")
    path = ckpt.save_training_checkpoint(
        ckpt.checkpoint_path(tmp_path, 2), a_state(), model=model, tokenizer=None, config=cfg
    )
    scalars = json.loads((path / ckpt.STATE_FILE).read_text())
    assert "config" not in scalars  # the config is config.yaml only
    assert "steps: 17" in (path / "config.yaml").read_text()
    assert set(scalars) == {
        "step",
        "sampler",
        "nonfinite_in_row",
        "skipped_updates",
        "signal_flat_steps",
        "eval_history",
    }
    back = ckpt.load_training_checkpoint(path)
    assert back.step == 2 and back.skipped_updates == 4 and back.signal_flat_steps == 2
    assert ckpt.checkpoint_model_dir(path).joinpath("config.json").exists()
    assert ckpt.list_checkpoints(tmp_path) == [(2, path)]


def test_a_non_finite_optimiser_moment_is_never_written(tmp_path):
    state = a_state()
    next(iter(state.optimizer["state"].values()))["exp_avg"][0] = float("nan")
    with pytest.raises(ckpt.NonFiniteCheckpointError, match="optimizer"):
        ckpt.save_training_checkpoint(
            tmp_path / "c", state, model=make_tiny_model("llama"), tokenizer=None
        )
    assert not (tmp_path / "c").exists()


def test_not_a_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        ckpt.load_training_checkpoint(tmp_path)


def test_a_checkpoint_written_before_the_typed_state_still_loads(tmp_path):
    """Checkpoints of the previous layout kept the config in trainer_state.json as well and had
    no skipped-update count: the same files, so they load (unknown keys ignored, defaults)."""
    state = a_state()
    state.save(tmp_path)
    old = {
        "step": 2,
        "sampler": state.sampler,
        "nonfinite_in_row": 0,
        "eval_history": [],
        "config": {"steps": 8, "seed": 0},
    }
    (tmp_path / ckpt.STATE_FILE).write_text(json.dumps(old))
    back = ckpt.load_training_checkpoint(tmp_path)
    assert back.step == 2 and back.skipped_updates == 0 and back.sampler == state.sampler
    assert_same(back.optimizer, state.optimizer)
