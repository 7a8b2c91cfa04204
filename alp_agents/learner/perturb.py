"""Adaptive Layerwise Perturbation: seeded Gaussian noise on the residual stream of every layer.

docs/alp.md, section 1 (layerwise perturbation). At the input of each selected decoder layer ``l`` (before its pre-norm) the
hidden state becomes ``h + sigma_l * eps_l`` with ``eps_l ~ N(0, I)`` per token and channel and
``sigma_l = exp(s_l)`` a learnable scalar kept in log space. The noisy state replaces ``h`` for
both the residual branch and the norm input, so noise accumulates through the stack.

How it attaches (generic, no per-architecture patching): the decoder layers are found as the
homogeneous ``nn.ModuleList`` whose class is listed in the model's ``_no_split_modules`` (or
whose length is ``config.num_hidden_layers``, or the longest such list), and a forward pre-hook
on each selected layer rewrites its ``hidden_states`` argument. ``target="logits"`` instead puts
a forward hook on the output embedding (``model.get_output_embeddings()``): ``z + sigma * eps``.

Properties the trainer relies on (all tested):
- Off unless inside ``with pert.active(seed=...)``: generation, evaluation, reference and pi_old
  forwards are untouched (bit-identical), and so is everything after ``pert.remove()``.
- Reproducible: layer ``l`` draws from its own generator seeded with ``seed + l``, so the same
  seed gives the same noise and a gradient-checkpoint recomputation sees identical noise
  (wherever the checkpoint sits relative to the hooks). The n-th forward through a layer inside
  one ``active()`` block uses a seed derived from ``(seed, n)`` (the first uses ``seed`` itself),
  so several forwards inside one block (e.g. a micro-batch split into pieces) get independent
  noise, never the same draw twice.
- Memory-neutral: the noise is drawn in float32 into one reusable buffer and not kept for
  backward; the backward redraws it from the seed to form ``d loss / d s_l``
  (``store_noise=True`` keeps a copy instead: one draw less, more activation memory).
- Sigma lives here, not in the model: ``model.state_dict()``/``save_pretrained`` and weights
  synced to an inference engine never contain it. Use ``pert.parameters()`` for a separate
  optimiser group and ``pert.state_dict()`` for checkpoints.
- DDP: hooks sit on the inner modules, so they fire through a DDP wrapper; sigma is not a DDP
  parameter, so call ``pert.all_reduce_grads()`` after backward when running multi-process.

>>> import torch
>>> from alp_agents.models import make_tiny_model
>>> model = make_tiny_model("llama", num_layers=2)
>>> pert = LayerwisePerturbation(model, sigma_init=0.1)
>>> ids = torch.tensor([[1, 5, 7, 9]])
>>> with pert.active(seed=1234):
...     noisy = model(ids).logits
>>> clean = model(ids).logits
>>> bool((noisy != clean).any()), [round(s, 4) for s in pert.sigmas().tolist()]
(True, [0.1, 0.1])
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from alp_agents.learner import metrics as M

__all__ = [
    "LayerwisePerturbation",
    "call_seed",
    "find_decoder_layers",
    "resolvable_sigma",
    "resolve_layers",
]

_TARGETS = ("hidden", "logits")
_MAX_PENDING = 4096
_SEED_SPACE = 2**62


def resolvable_sigma(compute_dtype: torch.dtype) -> float:
    """The smallest sigma the layers' matmuls can see when they read inputs in ``compute_dtype``.

    The noise is added exactly (float32), but under autocast every matmul reads the normalised
    residual stream (entries of order 1) rounded to ``compute_dtype``: noise below half a unit
    in the last place at 1 (``2**-8`` for bfloat16) mostly vanishes in that rounding and acts as
    rounding jitter, not as a perturbation of scale sigma (measured on SmolLM2 under bf16: sigma
    1e-6 and 1e-8 change the token log-probs by 6.8e-3 and 1.7e-3, the size of the plain
    trainer/engine gap; in float32 by 2.2e-5 and 8.6e-7). Activations much larger than 1 raise
    the floor further; the trainer logs the realised effect (``perturbation/logprob_change``).

    >>> resolvable_sigma(torch.bfloat16), resolvable_sigma(torch.float16) < 1e-3
    (0.00390625, True)
    """
    return float(torch.finfo(compute_dtype).eps) / 2


def call_seed(seed: int, call: int) -> int:
    """Seed of the ``call``-th forward (0-based) inside one ``active(seed)`` block.

    Call 0 keeps ``seed``; later calls step by a large odd constant (the 64-bit golden ratio),
    which keeps them far apart from each other and from the ``seed + layer`` offsets.

    >>> call_seed(7, 0), call_seed(7, 1) != call_seed(7, 2)
    (7, True)
    """
    return (seed + call * 0x9E3779B97F4A7C15) % _SEED_SPACE


# ---------------------------------------------------------------------------------------------
# locating layers


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / accelerate / torch.compile wrappers (``.module``, ``._orig_mod``)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder layers as ``(qualified_name, module_list)``.

    Generic: candidates are ``nn.ModuleList``s of one repeated class; preferred are those whose
    class the model lists in ``_no_split_modules`` (transformers' own marker for a decoder
    layer), then those whose length equals ``config.num_hidden_layers``, then the longest.
    """
    model = _unwrap(model)
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n_layers = getattr(config, "num_hidden_layers", None)
    best: tuple[tuple[int, int, int], str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(m) for m in module}
        if len(kinds) != 1:
            continue
        kind = next(iter(kinds)).__name__
        score = (int(kind in no_split), int(len(module) == n_layers), len(module))
        if best is None or score > best[0]:
            best = (score, name, module)
    if best is None:
        raise ValueError(
            f"Could not find the decoder layers of {type(model).__name__}: no nn.ModuleList of "
            "repeated blocks. LayerwisePerturbation needs a transformers-style decoder stack."
        )
    return best[1], best[2]


def resolve_layers(layers: Any, n_layers: int) -> list[int]:
    """Normalise a layer selection to sorted absolute indices in ``[0, n_layers)``.

    Accepts ``None`` (all), a ``range`` or ``slice`` (``[start, end)``), a ``"start:end"``
    string (handy in YAML), an int, or an explicit list of indices (negative ones count from
    the end).

    >>> resolve_layers("0:6", 28), resolve_layers(range(23, 28), 28), resolve_layers([-1], 4)
    ([0, 1, 2, 3, 4, 5], [23, 24, 25, 26, 27], [3])
    """
    all_layers = list(range(n_layers))
    if layers is None:
        return all_layers
    if isinstance(layers, str):
        try:
            parts = [int(p) if p.strip() else None for p in layers.split(":")]
            if len(parts) != 2:
                raise ValueError
        except ValueError:
            raise ValueError(f"layers={layers!r}: expected 'start:end', e.g. '0:6'") from None
        layers = slice(*parts)
    if isinstance(layers, slice):
        chosen = all_layers[layers]
    elif isinstance(layers, range):
        chosen = list(layers)
    elif isinstance(layers, int):
        chosen = [layers]
    else:
        chosen = list(layers)
    out = []
    for i in chosen:
        if not isinstance(i, int) or not -n_layers <= i < n_layers:
            raise ValueError(f"layers: index {i!r} is out of range for a {n_layers}-layer model")
        out.append(i % n_layers)
    if not out:
        raise ValueError(f"layers={layers!r} selects no layer of a {n_layers}-layer model")
    if len(set(out)) != len(out):
        raise ValueError(f"layers={layers!r} selects a layer twice")
    return sorted(out)


def _inside_backward() -> bool:
    """True while the autograd engine runs a backward (where checkpoint recomputation happens)."""
    return torch._C._current_graph_task_id() != -1


# ---------------------------------------------------------------------------------------------
# the noise op


class _NoiseSource:
    """Draws ``N(0, 1)`` float32 noise for (seed, layer) into a reused per-device buffer."""

    def __init__(self) -> None:
        self._generators: dict[tuple[str, int], torch.Generator] = {}
        self._buffers: dict[torch.device, torch.Tensor] = {}

    def draw(
        self, seed: int, layer_id: int, shape: torch.Size, device: torch.device
    ) -> torch.Tensor:
        key = (str(device), layer_id)
        gen = self._generators.get(key)
        if gen is None:
            gen = self._generators[key] = torch.Generator(device=device)
        gen.manual_seed(seed + layer_id)
        numel = math.prod(shape)
        buf = self._buffers.get(device)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[device] = torch.empty(numel, dtype=torch.float32, device=device)
        return buf[:numel].view(shape).normal_(generator=gen)

    def release(self) -> None:
        self._buffers.clear()


class _AddSeededNoise(torch.autograd.Function):
    """``y = h + exp(s) * eps(seed)`` computed in float32.

    For ``d/ds`` the backward redraws eps from the seed (default) or, with ``store``, reads a
    float32 copy kept from the forward (one draw less, one hidden-state tensor more per layer).
    """

    @staticmethod
    def forward(ctx, h, log_sigma, source, seed, layer_id, out_dtype, on_backward, store):  # type: ignore[override]
        eps = source.draw(seed, layer_id, h.shape, h.device)
        sigma = log_sigma.detach().exp()
        ctx.source, ctx.seed, ctx.layer_id, ctx.in_dtype = source, seed, layer_id, h.dtype
        ctx.on_backward = on_backward
        ctx.stored = store and log_sigma.requires_grad
        if ctx.stored:
            ctx.save_for_backward(sigma, eps.clone())
        else:
            ctx.save_for_backward(sigma)
        compute = torch.promote_types(h.dtype, torch.float32)  # float32, or float64 models
        return torch.add(h.to(compute), eps.mul_(sigma).to(compute)).to(out_dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        sigma, *kept = ctx.saved_tensors
        ctx.on_backward()
        grad_h = grad.to(ctx.in_dtype) if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            eps = (
                kept[0]
                if kept
                else ctx.source.draw(ctx.seed, ctx.layer_id, grad.shape, grad.device)
            )
            compute = torch.promote_types(grad.dtype, torch.float32)
            g = grad.to(compute).reshape(-1)
            grad_s = (torch.dot(g, eps.reshape(-1).to(compute)) * sigma).reshape(()).to(sigma.dtype)
        return grad_h, grad_s, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# the public object


class LayerwisePerturbation:
    """Learnable per-layer Gaussian perturbation of a decoder-only model (ALP).

    Args:
        model: any transformers decoder-only causal LM (a DDP/accelerate wrapper is fine).
        sigma_init: initial sigma (``s_l = ln sigma_init``), one float or one per selected layer.
            Reference values: 0.02 (single-turn release), 1e-6 (multi-turn release).
        learnable: if False sigma is fixed and ``parameters()`` is empty.
        layers: which decoder layers get noise (see `resolve_layers`): None = all, ``"0:6"``,
            ``range(12, 18)``, ``[0, 5]``. Ignored for ``target="logits"``.
        target: ``"hidden"`` (the paper's method) or ``"logits"`` (the logits-only ablation:
            ``z + sigma * eps`` on the LM head output, returned in float32).
        store_noise: keep each layer's float32 noise for backward instead of redrawing it from
            the seed (saves one draw per layer per update, costs 4 bytes per hidden unit per
            token per layer of activation memory; see docs/alp.md for measurements).

    Noise is added in float32. If the model itself runs in bf16 the sum is rounded back to bf16
    (a tiny sigma then changes almost nothing; ``realised_sigmas()`` reports what was applied).
    Under ``torch.autocast`` with float32 weights the residual stream is float32 and the noise
    is exact.
    """

    def __init__(
        self,
        model: nn.Module,
        sigma_init: float | Sequence[float] = 0.02,
        learnable: bool = True,
        layers: Any = None,
        target: str = "hidden",
        store_noise: bool = False,
    ) -> None:
        if target not in _TARGETS:
            raise ValueError(f"target={target!r}: choose one of {', '.join(_TARGETS)}")
        inner = _unwrap(model)
        self.target = target
        self.learnable = learnable
        self.store_noise = store_noise
        self.stack_name, stack = find_decoder_layers(inner)
        self.num_model_layers = len(stack)
        if target == "hidden":
            self.layers = resolve_layers(layers, self.num_model_layers)
            modules = [stack[i] for i in self.layers]
        else:
            head = (
                inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
            )
            if head is None:
                raise ValueError(f"{type(inner).__name__} has no output embedding (LM head)")
            self.layers = [self.num_model_layers]  # its seed offset: one past the last layer
            modules = [head]
        inits = (
            [float(sigma_init)] * len(self.layers)
            if isinstance(sigma_init, (int, float))
            else [float(s) for s in sigma_init]
        )
        if len(inits) != len(self.layers) or any(not s > 0 for s in inits):
            raise ValueError(
                f"sigma_init must be one positive float or {len(self.layers)} positive floats, "
                f"got {sigma_init!r}"
            )
        device = next(inner.parameters()).device
        self.log_sigma = nn.Parameter(
            torch.tensor([math.log(s) for s in inits], dtype=torch.float32, device=device),
            requires_grad=learnable,
        )
        self._source = _NoiseSource()
        self._seed: int | None = None
        self._calls: dict[int, int] = {}  # forwards per selected layer in the active block
        self._pending: OrderedDict[tuple, int] = OrderedDict()
        self._realised: dict[int, torch.Tensor] = {}
        self._handles = []
        for idx, module in enumerate(modules):
            if target == "hidden":
                hook = self._make_pre_hook(idx)
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                self._handles.append(module.register_forward_hook(self._make_post_hook(idx)))

    # -- switching on and off ------------------------------------------------------------------
    @contextmanager
    def active(self, seed: int) -> Iterator[LayerwisePerturbation]:
        """Perturb every forward inside the block with noise derived from ``seed``.

        Use one seed per micro-batch (e.g. ``step * 1_000_003 + rank * 1_009 + micro``); the
        backward may run inside or after the block.
        """
        if not self._handles:
            raise RuntimeError("this LayerwisePerturbation was removed")
        if self._seed is not None:
            raise RuntimeError("LayerwisePerturbation.active() is already on (nested use)")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**62:
            raise ValueError(f"seed must be an int in [0, 2**62), got {seed!r}")
        self._seed = seed
        self._calls.clear()
        self._realised.clear()
        try:
            yield self
        finally:
            self._seed = None

    @property
    def is_active(self) -> bool:
        return self._seed is not None

    def remove(self) -> None:
        """Detach all hooks; the model behaves exactly as before. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()
        self._source.release()

    # -- hooks -----------------------------------------------------------------------------------
    def _seed_for(self, h: torch.Tensor, idx: int) -> tuple[int | None, tuple]:
        """Seed to use for this call (None: leave ``h`` alone) and the input's identity key.

        During a backward, an input remembered from ``active()`` (its storage, shape and stride)
        is a gradient-checkpoint recomputation replaying the layer: it gets the seed it had.
        Otherwise, inside ``active()``: the seed of this layer's n-th forward in the block
        (`call_seed`), remembered until the noise op's backward has run. Outside: nothing.
        """
        key = (idx, h.data_ptr(), tuple(h.shape), tuple(h.stride()), h.device)
        if self._pending and _inside_backward():
            replay = self._pending.get(key)
            if replay is not None:
                return replay, key
        if self._seed is None:
            return None, key
        call = self._calls.get(idx, 0)
        self._calls[idx] = call + 1
        seed = call_seed(self._seed, call)
        if torch.is_grad_enabled() or h.requires_grad:
            self._pending[key] = seed
            while len(self._pending) > _MAX_PENDING:
                self._pending.popitem(last=False)
        return seed, key

    def _apply(
        self, h: torch.Tensor, idx: int, seed: int, key: tuple, out_dtype: torch.dtype
    ) -> torch.Tensor:
        layer_id = self.layers[idx]
        out = _AddSeededNoise.apply(
            h,
            self.log_sigma[idx],
            self._source,
            seed,
            layer_id,
            out_dtype,
            lambda: self._pending.pop(key, None),
            self.store_noise,
        )
        if out_dtype in (torch.float16, torch.bfloat16) and self._seed is not None:
            with torch.no_grad():
                self._realised[layer_id] = (out.float() - h.float()).pow(2).mean().sqrt()
        return out

    def _make_pre_hook(self, idx: int):
        def hook(module, args, kwargs):
            if args:
                h, where = args[0], "args"
            elif "hidden_states" in kwargs:
                h, where = kwargs["hidden_states"], "kwargs"
            else:
                return None
            if not isinstance(h, torch.Tensor) or not h.is_floating_point():
                return None
            seed, key = self._seed_for(h, idx)
            if seed is None:
                return None
            noisy = self._apply(h, idx, seed, key, h.dtype)
            if where == "args":
                return (noisy, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": noisy}

        return hook

    def _make_post_hook(self, idx: int):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor):
                return None
            seed, key = self._seed_for(output, idx)
            if seed is None:
                return None
            return self._apply(output, idx, seed, key, torch.float32)

        return hook

    # -- parameters, state, metrics ------------------------------------------------------------
    def parameters(self) -> Iterator[nn.Parameter]:
        """The learnable log-sigmas (empty if ``learnable=False``), for their own optimiser group."""
        if self.log_sigma.requires_grad:
            yield self.log_sigma

    def sigmas(self) -> torch.Tensor:
        """Current ``sigma_l = exp(s_l)`` per selected layer (detached, float32)."""
        return self.log_sigma.detach().exp()

    def realised_sigmas(self) -> dict[int, float]:
        """RMS of the noise actually applied per layer in the last active forward, measured
        only where the result was rounded to a lower precision than float32."""
        return {k: float(v) for k, v in self._realised.items()}

    def metrics(self) -> dict[str, float]:
        """``sigma/layer_XX``, ``sigma/mean|min|max``, ``sigma/grad_norm`` (log-sigma gradient)."""
        stats = M.sigma_stats(self.log_sigma, self.layers)
        for layer, value in self._realised.items():
            stats[f"sigma_realised/layer_{layer:02d}"] = value
        return M.to_floats(stats)

    def state_dict(self) -> dict[str, Any]:
        return {
            "log_sigma": self.log_sigma.detach().cpu().clone(),
            "layers": list(self.layers),
            "target": self.target,
            "learnable": self.learnable,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("target") != self.target or list(state.get("layers", ())) != self.layers:
            raise ValueError(
                f"perturbation state is for target={state.get('target')!r} "
                f"layers={state.get('layers')}, this one has target={self.target!r} "
                f"layers={self.layers}"
            )
        with torch.no_grad():
            self.log_sigma.copy_(state["log_sigma"].to(self.log_sigma.device))

    def to(self, device: torch.device | str) -> LayerwisePerturbation:
        """Move sigma (in place: optimiser references stay valid)."""
        self.log_sigma.data = self.log_sigma.data.to(device)
        if self.log_sigma.grad is not None:
            self.log_sigma.grad = self.log_sigma.grad.to(device)
        return self

    def all_reduce_grads(self) -> None:
        """Average sigma's gradient over processes (DDP does not see it). No-op single-process."""
        dist = torch.distributed
        if not self.log_sigma.requires_grad or not dist.is_available() or not dist.is_initialized():
            return
        if self.log_sigma.grad is None:  # this rank had no noisy forward: it still takes part
            self.log_sigma.grad = torch.zeros_like(self.log_sigma)
        grad = self.log_sigma.grad
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        grad.div_(dist.get_world_size())

    def __repr__(self) -> str:
        sig = self.sigmas()
        return (
            f"LayerwisePerturbation(target={self.target!r}, layers={self.layers}, "
            f"sigma=[{float(sig.min()):.3g}, {float(sig.max()):.3g}], learnable={self.learnable})"
        )
