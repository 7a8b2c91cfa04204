"""The checkpoint module's files: exports, training checkpoints, listing, pruning, refusal of
non-finite tensors. Independent of the trainer: a tiny model, an optimiser and a scheduler
built here, packed into a `TrainerState` by hand."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from alp_agents.models import make_tiny_model
from alp_agents.trainer import checkpoint as ckpt
from alp_agents.trainer.checkpoint import TrainerState


@pytest.fixture
def model():
    return make_tiny_model(vocab_size=64, hidden_size=32, num_layers=2, seed=1)


def _optimiser(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()  # so the optimiser has state (exp_avg, exp_avg_sq, step)
    scheduler.step()
    return opt, scheduler


def _state(opt, scheduler, **overrides) -> TrainerState:
    fields = dict(
        step=7,
        sampler={"epoch": 1, "position": 3},
        rng=ckpt.rng_state(),
        optimizer=opt.state_dict(),
        scheduler=None if scheduler is None else scheduler.state_dict(),
        perturbation={"log_sigma": torch.full((2,), math.log(1e-3))},
    )
    fields.update(overrides)
    return TrainerState(**fields)


def _save(path, model, **overrides):
    opt, scheduler = _optimiser(model)
    state = _state(opt, scheduler, **overrides)
    return ckpt.save_training_checkpoint(path, state, model=model, tokenizer=None), opt, scheduler


def _assert_same_weights(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_export_loads_with_from_pretrained_and_has_no_perturbation(tmp_path, model):
    state = model.state_dict()
    state["model.layers.0.alp_perturb.log_sigma"] = torch.zeros(3)  # as a perturbation adds
    path = ckpt.save_export(model, None, tmp_path / "final", state_dict=state)
    assert path == tmp_path / "final" and not (tmp_path / "final.tmp").exists()
    loaded = AutoModelForCausalLM.from_pretrained(path)
    loaded_state = loaded.state_dict()
    assert not any("alp_perturb" in k for k in loaded_state)
    _assert_same_weights(
        {k: v for k, v in loaded_state.items() if k in model.state_dict()}, model.state_dict()
    )


def test_training_checkpoint_round_trips(tmp_path, model):
    path = ckpt.checkpoint_path(tmp_path, 7)
    assert path == tmp_path / ckpt.CHECKPOINT_DIRNAME / "step_000007"
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(9)
    written, opt, scheduler = _save(path, model)
    assert written == path and (path / "trainer_state.json").exists()

    state = ckpt.load_training_checkpoint(path)
    assert ckpt.checkpoint_model_dir(path) == path / "model"
    assert (state.step, state.sampler) == (7, {"epoch": 1, "position": 3})
    torch.testing.assert_close(state.perturbation["log_sigma"], torch.full((2,), math.log(1e-3)))
    assert state.scheduler == scheduler.state_dict()
    assert state.rng_per_rank is None
    saved_opt = state.optimizer
    assert saved_opt["param_groups"] == opt.state_dict()["param_groups"]
    for pid, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            torch.testing.assert_close(saved_opt["state"][pid][k], v, rtol=0, atol=0)
    restored = AutoModelForCausalLM.from_pretrained(ckpt.checkpoint_model_dir(path))
    _assert_same_weights(restored.state_dict(), model.state_dict())

    # the RNG state restores every generator to where it was captured
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    ckpt.set_rng_state(state.rng)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_per_rank_rng_is_kept_when_given(tmp_path, model):
    path = ckpt.checkpoint_path(tmp_path, 1)
    per_rank = [ckpt.rng_state(), ckpt.rng_state()]
    _save(path, model, rng_per_rank=per_rank)
    loaded = ckpt.load_training_checkpoint(path).rng_per_rank
    assert len(loaded) == 2
    assert torch.equal(loaded[1]["torch"], per_rank[1]["torch"])


def test_list_latest_and_prune_keep_the_newest(tmp_path, model):
    assert ckpt.list_checkpoints(tmp_path) == []
    assert ckpt.latest_checkpoint(tmp_path) is None
    for step in (10, 2, 30, 20):
        _save(ckpt.checkpoint_path(tmp_path, step), model)
    # an interrupted write (no trainer_state.json) and a stray folder are not checkpoints
    (tmp_path / ckpt.CHECKPOINT_DIRNAME / "step_000040.tmp" / "model").mkdir(parents=True)
    (tmp_path / ckpt.CHECKPOINT_DIRNAME / "step_000050").mkdir()
    (tmp_path / ckpt.CHECKPOINT_DIRNAME / "notes").mkdir()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 10, 20, 30]
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.checkpoint_path(tmp_path, 30)

    ckpt.prune_checkpoints(tmp_path, keep_last=0)  # keeps all
    assert len(ckpt.list_checkpoints(tmp_path)) == 4
    ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [20, 30]
    assert not ckpt.checkpoint_path(tmp_path, 10).exists()
    ckpt.prune_checkpoints(tmp_path, keep_last=5)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [20, 30]


def test_loading_a_folder_that_is_not_a_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        ckpt.load_training_checkpoint(tmp_path)


def test_non_finite_weights_are_never_written(tmp_path, model):
    name = next(k for k, v in model.state_dict().items() if v.is_floating_point())
    with torch.no_grad():
        model.state_dict()[name].view(-1)[0] = float("nan")
    with pytest.raises(ckpt.NonFiniteCheckpointError, match=repr(name)):
        ckpt.save_export(model, None, tmp_path / "final")
    assert not (tmp_path / "final").exists() and not (tmp_path / "final.tmp").exists()
    path = ckpt.checkpoint_path(tmp_path, 1)
    state = _state(torch.optim.SGD(model.parameters(), lr=0.1), None, perturbation=None)
    with pytest.raises(ckpt.NonFiniteCheckpointError, match="not finite"):
        ckpt.save_training_checkpoint(path, state, model=model, tokenizer=None)
    assert ckpt.list_checkpoints(tmp_path) == [] and not path.exists()


@pytest.mark.parametrize("where", ["perturbation", "optimizer"])
def test_non_finite_perturbation_or_optimiser_state_is_refused(tmp_path, model, where):
    opt, scheduler = _optimiser(model)
    perturbation = {"log_sigma": torch.zeros(2)}
    if where == "perturbation":
        perturbation["log_sigma"][1] = float("inf")
    else:
        next(iter(opt.state.values()))["exp_avg"].view(-1)[0] = float("nan")
    state = _state(opt, scheduler, step=3, perturbation=perturbation)
    with pytest.raises(ckpt.NonFiniteCheckpointError, match=where):
        ckpt.save_training_checkpoint(
            ckpt.checkpoint_path(tmp_path, 3), state, model=model, tokenizer=None
        )
    assert ckpt.latest_checkpoint(tmp_path) is None
