"""What the trainer does differently on several processes (DDP, FSDP2), in one place.

The loop and the update call these operations the same way on one process and on many; each
one says what it does across ranks. A new distributed backend means changing this module,
not the class that holds the objective.

* `check_world`: refuse a configuration whose shards would leave the ranks' collectives out
  of step (before any model is loaded);
* `DistributedOps`: backward and ``no_sync`` (the accelerator's), the smallest count over
  ranks, the full (gathered) model and optimiser state for engine sync and checkpoints, and
  gradient clipping that also works on FSDP's sharded gradients.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from alp_agents.configs.train import TrainConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from alp_agents.configs.train import AlgorithmConfig, RolloutConfig


def check_world(
    rollout: RolloutConfig,
    algorithm: AlgorithmConfig,
    accelerator: Any,
    say: Callable[[str], None],
) -> None:
    """Refuse shards that differ across processes; warn where FSDP was asked for but not run.

    Uneven shards give the ranks different numbers of forwards (under FSDP each one is a
    collective) or, short of trajectories, of mini-batch all-reduces: the processes would
    then wait for each other forever. ``accelerator`` needs ``num_processes`` and
    ``distributed_type`` (and ``is_fsdp2`` under FSDP).
    """
    from accelerate.utils import DistributedType

    world = accelerator.num_processes
    if world > 1 and rollout.prompts_per_step % world:
        raise TrainConfigError(
            f"rollout.prompts_per_step={rollout.prompts_per_step} must be a multiple of the "
            f"number of processes ({world}): each process rolls out the same number of them"
        )
    if world > 1 and rollout.async_steps:
        raise TrainConfigError(
            f"rollout.async_steps={rollout.async_steps} runs on one process only: the batches "
            "rolled out ahead are per-rank state that checkpoints do not gather yet; use "
            "rollout.async_steps=0 under accelerate launch"
        )
    per_process = rollout.prompts_per_step // world * rollout.group_size
    if world > 1 and algorithm.mini_batches > per_process:
        raise TrainConfigError(
            f"algorithm.mini_batches={algorithm.mini_batches}: more mini-batches than "
            f"trajectories per process ({rollout.prompts_per_step // world} x "
            f"{rollout.group_size})"
        )
    kind = accelerator.distributed_type
    asked = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if asked and kind != DistributedType.FSDP:
        # accelerate only turns FSDP on over GPU-like devices; CPU processes get plain DDP.
        say(
            f"WARNING: accelerate was asked for FSDP but runs {kind.value} (it does not "
            "shard models over CPU processes): every process holds the full model and the "
            "gradients are all-reduced as with DDP."
        )
    if kind == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise RuntimeError(
            "ALPTrainer supports FSDP2 only (fsdp_version: 2 in the accelerate config): under "
            "FSDP1 the optimiser's sigma group, gradient clipping and the full state dict "
            "for checkpoints and engine sync are not handled."
        )


class DistributedOps:
    """The accelerator's view of this run: rank, world, and the collectives the trainer uses.

    On one process every method is its plain single-process counterpart (no collective).
    """

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_fsdp(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model inside its DDP/FSDP wrapper (the object the engine and exports read)."""
        return self.accelerator.unwrap_model(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def no_sync(self, model: torch.nn.Module, skip: bool) -> contextlib.AbstractContextManager:
        """Gradient accumulation without the all-reduce while ``skip`` (not the last micro-batch)."""
        return self.accelerator.no_sync(model) if skip else contextlib.nullcontext()

    def fewest_over_ranks(self, count: int) -> int:
        """The smallest ``count`` on any process (``count`` itself when alone): a collective."""
        if self.world == 1:
            return count
        tensor = torch.tensor([count], device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
        return int(tensor.item())

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (None when alone)."""
        if self.world == 1:
            return None
        from accelerate.utils import gather_object

        return gather_object([obj])

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (``obj`` itself when alone)."""
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def full_state_dict(self, model: torch.nn.Module, all_ranks: bool) -> dict[str, torch.Tensor]:
        """The model's full (unsharded) state dict, without the perturbation.

        Under FSDP the shards are gathered (a collective: every process must call this); with
        ``all_ranks=False`` only the main process receives the tensors (accelerate's
        ``get_state_dict``, offloaded to CPU) and the others get ``{}``. Otherwise it is the
        unwrapped model's own ``state_dict()``.
        """
        if not self.is_fsdp:
            return self.unwrap(model).state_dict()
        if not all_ranks:
            return self.accelerator.get_state_dict(model)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` with FSDP-sharded moments gathered into full tensors
        (a collective under FSDP), so a checkpoint resumes on any number of processes."""
        state = optimizer.state_dict()
        if not self.is_fsdp:
            return state
        from torch.distributed.tensor import DTensor

        # state_dict() shares the live per-parameter dicts: build new ones, never mutate them.
        state["state"] = {
            pid: {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v for k, v in s.items()}
            for pid, s in state["state"].items()
        }
        return state

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a full optimiser state; under FSDP each rank then keeps its own shard."""
        optimizer.load_state_dict(state)
        if not self.is_fsdp:
            return
        from torch.distributed.tensor import DTensor, distribute_tensor

        for group in optimizer.param_groups:
            for p in group["params"]:
                if not isinstance(p, DTensor):
                    continue
                moments = optimizer.state.get(p, {})
                for k, v in list(moments.items()):
                    if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                        moments[k] = distribute_tensor(
                            v.to(p.device), p.device_mesh, p.placements, src_data_rank=None
                        )

    def clip_grad_norm(self, params: Sequence[torch.nn.Parameter], max_norm: float) -> float:
        """Clip the gradients of ``params`` to ``max_norm`` in total; their norm before clipping.

        Under FSDP the model's gradients are sharded DTensors and sigma's is a plain tensor,
        which torch cannot stack into one norm: each norm is taken (the sharded one over all
        ranks) and combined here.
        """
        if not self.is_fsdp:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        sharded = [g for g in grads if isinstance(g, DTensor)]
        plain = [g for g in grads if not isinstance(g, DTensor)]
        norms = []
        if sharded:
            norms.append(torch.nn.utils.get_total_norm(sharded).full_tensor())
        if plain:
            norms.append(torch.nn.utils.get_total_norm(plain))
        if not norms:
            return 0.0
        total = torch.linalg.vector_norm(torch.stack([n.float().cpu() for n in norms]))
        coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        for g in grads:
            g.mul_(coef)
        return float(total)
