"""LayerwisePerturbation on real (tiny, randomly initialised) transformers models."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from alp_agents.learner.logprobs import token_logprobs
from alp_agents.learner.perturb import LayerwisePerturbation, find_decoder_layers
from alp_agents.models import make_tiny_model, set_activation_checkpointing

ARCHS = ["llama", "qwen2", "mistral", "gemma", "gpt2", "gpt_neox"]
VOCAB = 512  # small vocabulary keeps these tests fast; the code path is the same


def tiny(arch="llama", layers=3, dtype=torch.float32):
    return make_tiny_model(arch, num_layers=layers, vocab_size=VOCAB, dtype=dtype)


def batch(b=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding on row 1
    return ids, mask


def capture_inputs(layers):
    """Pre-hooks recording each layer's hidden-state input; returns (store, handles)."""
    store, handles = {}, []
    for i, layer in enumerate(layers):
        handles.append(
            layer.register_forward_pre_hook(
                lambda mod, args, i=i: store.__setitem__(i, args[0].detach().clone())
            )
        )
    return store, handles


def grads_of(model, pert, ids, mask, seed=11):
    model.zero_grad(set_to_none=True)
    pert.log_sigma.grad = None
    with pert.active(seed=seed):
        lp = token_logprobs(model, ids, mask)
    (lp[:, 1:] * mask[:, 1:]).sum().backward()
    return lp.detach(), pert.log_sigma.grad.clone(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("arch", ARCHS)
def test_perturbation_on_architecture(arch):
    model = tiny(arch)
    ids, mask = batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    pert = LayerwisePerturbation(model, sigma_init=0.05)
    assert len(pert.layers) == 3
    with torch.no_grad():
        inactive = model(ids, attention_mask=mask).logits
        with pert.active(seed=5):
            noisy = model(ids, attention_mask=mask).logits
            second_call = model(ids, attention_mask=mask).logits
        with pert.active(seed=5):
            noisy_again = model(ids, attention_mask=mask).logits
        with pert.active(seed=6):
            other = model(ids, attention_mask=mask).logits
    assert torch.equal(before, inactive)  # bit-identical when off
    assert not torch.allclose(noisy, before, atol=1e-4)  # changes outputs when on
    assert torch.equal(noisy, noisy_again)  # same seed -> same noise
    assert not torch.equal(noisy, second_call)  # a second forward in one block: fresh noise
    assert not torch.equal(noisy, other)
    # gradients reach every s_l and are identical with HF gradient checkpointing
    model.train()
    lp, g_sigma, g_model = grads_of(model, pert, ids, mask)
    assert torch.all(g_sigma != 0) and torch.isfinite(g_sigma).all()
    set_activation_checkpointing(model, True)
    lp_ckpt, g_sigma_ckpt, g_model_ckpt = grads_of(model, pert, ids, mask)
    assert torch.equal(lp, lp_ckpt)
    assert torch.equal(g_sigma, g_sigma_ckpt)
    assert all(torch.equal(a, b) for a, b in zip(g_model, g_model_ckpt, strict=True))
    pert.remove()
    set_activation_checkpointing(model, False)
    model.eval()
    with torch.no_grad():
        after = model(ids, attention_mask=mask).logits
    assert torch.equal(before, after)


def test_noise_is_sigma_times_seeded_normal_at_each_layer_input():
    """h~_l - h_l == sigma_l * N(0, I) drawn from a generator seeded with seed + l."""
    model = tiny("llama", layers=3)
    _, stack = find_decoder_layers(model)
    clean, h1 = capture_inputs(stack)  # registered first: sees h
    pert = LayerwisePerturbation(model, sigma_init=[0.1, 0.2, 0.3])
    noisy, h2 = capture_inputs(stack)  # registered after: sees h~
    ids, mask = batch()
    with torch.no_grad(), pert.active(seed=1000):
        model(ids, attention_mask=mask)
    for layer, sigma in enumerate([0.1, 0.2, 0.3]):
        g = torch.Generator().manual_seed(1000 + layer)
        eps = torch.empty(clean[layer].shape).normal_(generator=g)
        assert torch.allclose(noisy[layer] - clean[layer], sigma * eps, atol=1e-5)
    for h in h1 + h2:
        h.remove()


def test_sigma_gradient_matches_finite_differences():
    model = tiny("qwen2", layers=2, dtype=torch.float64)
    pert = LayerwisePerturbation(model, sigma_init=[0.3, 0.1])
    ids, mask = batch()

    def loss_at(log_sigma):
        with torch.no_grad():
            pert.log_sigma.copy_(log_sigma)
        with pert.active(seed=3):
            return token_logprobs(model, ids, mask)[:, 1:].sum()

    base = pert.log_sigma.detach().clone()
    loss_at(base).backward()
    analytic = pert.log_sigma.grad.clone()
    h = 1e-3
    for i in range(2):
        step = torch.zeros(2)
        step[i] = h
        with torch.no_grad():
            numeric = (loss_at(base + step) - loss_at(base - step)) / (2 * h)
        assert float(analytic[i]) == pytest.approx(float(numeric), rel=1e-3)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_wrapping_the_hooks_replays_same_noise(reentrant):
    """Checkpoint wrappers that put the pre-hook INSIDE the recomputed region (older
    transformers, FSDP activation-checkpointing wrappers) must see identical noise."""
    model = tiny("llama", layers=3)
    model.train()
    pert = LayerwisePerturbation(model, sigma_init=0.05)
    ids, mask = batch()
    ref = grads_of(model, pert, ids, mask)
    layers = model.model.layers
    originals = [layer.__call__ for layer in layers]

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, hidden, *args, **kwargs):
            return checkpoint(
                lambda h: self.inner(h, *args, **kwargs), hidden, use_reentrant=reentrant
            )

    model.model.layers = torch.nn.ModuleList(Wrapped(layer) for layer in layers)
    got = grads_of(model, pert, ids, mask)
    model.model.layers = layers
    assert originals  # the inner layers (and their hooks) were reused, not copied
    assert torch.equal(ref[0], got[0])
    assert torch.allclose(ref[1], got[1], rtol=1e-5, atol=1e-7)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ref[2], got[2], strict=True))
    # after the backward nothing is pending: an unperturbed replay stays unperturbed
    assert not pert._pending


def test_store_noise_gives_the_same_gradients():
    model = tiny("gpt2", layers=2)
    model.train()
    ids, mask = batch()
    redraw = LayerwisePerturbation(model, sigma_init=0.05)
    ref = grads_of(model, redraw, ids, mask)
    redraw.remove()
    stored = LayerwisePerturbation(model, sigma_init=0.05, store_noise=True)
    got = grads_of(model, stored, ids, mask)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    assert all(torch.equal(a, b) for a, b in zip(ref[2], got[2], strict=True))


def test_layer_range_only_touches_selected_layers():
    model = tiny("llama", layers=4)
    _, stack = find_decoder_layers(model)
    clean, h1 = capture_inputs(stack)
    pert = LayerwisePerturbation(model, sigma_init=0.1, layers="2:4")
    noisy, h2 = capture_inputs(stack)
    assert pert.layers == [2, 3] and pert.sigmas().shape == (2,)
    ids, mask = batch()
    with torch.no_grad(), pert.active(seed=1):
        model(ids, attention_mask=mask)
    assert torch.equal(clean[0], noisy[0]) and torch.equal(clean[1], noisy[1])
    assert not torch.equal(clean[2], noisy[2]) and not torch.equal(clean[3], noisy[3])
    assert LayerwisePerturbation(tiny("llama", layers=4), layers=range(0, 1)).layers == [0]
    with pytest.raises(ValueError, match="out of range"):
        LayerwisePerturbation(model, layers=[7])
    with pytest.raises(ValueError, match="start:end"):
        LayerwisePerturbation(model, layers="early")
    for h in h1 + h2:
        h.remove()


def test_logits_target():
    model = tiny("llama", layers=2)
    ids, mask = batch()
    with torch.no_grad():
        clean = model(ids, attention_mask=mask).logits
    pert = LayerwisePerturbation(model, sigma_init=0.5, target="logits")
    with torch.no_grad(), pert.active(seed=9):
        noisy = model(ids, attention_mask=mask).logits
    g = torch.Generator().manual_seed(9 + 2)  # seed offset: one past the last layer
    eps = torch.empty(clean.shape).normal_(generator=g)
    assert noisy.dtype == torch.float32
    assert torch.allclose(noisy - clean, 0.5 * eps, atol=1e-5)
    with pert.active(seed=9):
        lp = token_logprobs(model, ids, mask)
    lp[:, 1:].sum().backward()
    assert pert.log_sigma.grad.shape == (1,) and pert.log_sigma.grad.item() != 0


def test_sigma_never_leaks_into_model_weights(tmp_path):
    model = tiny("llama", layers=2)
    keys = set(model.state_dict())
    n_params = len(list(model.parameters()))
    pert = LayerwisePerturbation(model, sigma_init=0.02)
    assert set(model.state_dict()) == keys
    assert len(list(model.parameters())) == n_params
    assert all(p is not pert.log_sigma for p in model.parameters())
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model.safetensors"))
    assert not any("sigma" in k for k in saved)
    # its own state round-trips
    state = pert.state_dict()
    other = LayerwisePerturbation(tiny("llama", layers=2), sigma_init=1.0)
    other.load_state_dict(state)
    assert torch.allclose(other.sigmas(), torch.tensor([0.02, 0.02]))
    with pytest.raises(ValueError, match="layers"):
        LayerwisePerturbation(tiny("llama", layers=2), layers=[0]).load_state_dict(state)
    assert list(pert.parameters()) == [pert.log_sigma]
    assert list(LayerwisePerturbation(model, learnable=False).parameters()) == []


def test_autocast_bf16_and_bf16_weights():
    model = tiny("llama", layers=2)
    model.train()
    pert = LayerwisePerturbation(model, sigma_init=1e-6)
    ids, mask = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp_clean = token_logprobs(model, ids, mask)
        with pert.active(seed=2):
            lp = token_logprobs(model, ids, mask)
    assert lp.dtype == torch.float32
    # float32 weights under autocast: the residual stream is float32, so even sigma = 1e-6
    # reaches the activations (the release's bf16 noise would mostly round away)
    assert not torch.equal(lp, lp_clean)
    lp[:, 1:].sum().backward()
    assert torch.isfinite(pert.log_sigma.grad).all() and torch.all(pert.log_sigma.grad != 0)
    assert pert.realised_sigmas() == {}  # nothing was rounded
    # bf16 weights: the sum is rounded to bf16 and the realised noise is reported
    model16 = tiny("llama", layers=2, dtype=torch.bfloat16)
    pert16 = LayerwisePerturbation(model16, sigma_init=1e-6)
    with torch.no_grad(), pert16.active(seed=2):
        model16(ids)
    realised = pert16.realised_sigmas()
    assert set(realised) == {0, 1} and all(v < 1e-4 for v in realised.values())
    assert "sigma_realised/layer_00" in pert16.metrics()


def test_misuse_errors():
    model = tiny("llama", layers=2)
    pert = LayerwisePerturbation(model)
    with pert.active(seed=1), pytest.raises(RuntimeError, match="nested"), pert.active(seed=2):
        pass
    with pytest.raises(ValueError, match="seed"), pert.active(seed=-1):
        pass
    with pytest.raises(ValueError, match="target"):
        LayerwisePerturbation(model, target="weights")
    with pytest.raises(ValueError, match="sigma_init"):
        LayerwisePerturbation(model, sigma_init=[0.1])
    with pytest.raises(ValueError, match="decoder layers"):
        LayerwisePerturbation(torch.nn.Linear(2, 2))
    pert.remove()
    pert.remove()  # idempotent
    with pytest.raises(RuntimeError, match="removed"), pert.active(seed=1):
        pass
    m = pert.metrics()
    assert m["sigma/mean"] == pytest.approx(0.02) and m["sigma/grad_norm"] == 0.0


@pytest.mark.timeout(120)
def test_hooks_fire_through_ddp_wrapper(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    # a file store: no TCP port to race for with other processes on the machine
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model = tiny("llama", layers=2)
        model.train()
        ddp = DDP(model)
        pert = LayerwisePerturbation(ddp, sigma_init=0.05)
        ids, mask = batch()
        with torch.no_grad():
            clean = ddp(input_ids=ids, attention_mask=mask).logits
        with pert.active(seed=4):
            lp = token_logprobs(ddp, ids, mask)
        assert not torch.allclose(lp, token_logprobs(ddp, ids, mask).detach())
        lp[:, 1:].sum().backward()
        grad = pert.log_sigma.grad.clone()
        pert.all_reduce_grads()  # world size 1: the average is the gradient itself
        assert torch.equal(grad, pert.log_sigma.grad)
        assert clean.shape == (2, 12, VOCAB)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_real_smollm2_multi_turn_sigma():
    """The default model: 30 layers found, sigma_0 = 1e-6 (multi-turn release) still reaches
    the log-probs under bf16 autocast, sigma gets a gradient, and removal restores the model."""
    from alp_agents.models import load_model

    model = load_model()  # a private copy; the session fixture must not get hooks
    model.train()
    ids = torch.randint(3, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        clean = token_logprobs(model, ids)
    pert = LayerwisePerturbation(model, sigma_init=1e-6)
    assert pert.stack_name == "model.layers" and pert.layers == list(range(30))
    with torch.autocast("cpu", dtype=torch.bfloat16), pert.active(seed=123):
        lp = token_logprobs(model, ids)
    assert not torch.equal(lp.detach(), clean)
    lp[:, 1:].sum().backward()
    assert torch.isfinite(pert.log_sigma.grad).all() and (pert.log_sigma.grad != 0).all()
    pert.remove()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(token_logprobs(model, ids), clean)
