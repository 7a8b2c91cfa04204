"""Cost of ALP's layerwise perturbation in one training update, ALP on vs off, same run.

One update = forward (token_logprobs) + policy_loss + backward + fused AdamW step, on the
default model (SmolLM2-135M, 30 layers) under bf16 autocast with float32 master weights. ALP
on = ``alp`` preset with `LayerwisePerturbation` active over all layers (learnable sigma in its
own optimiser group); ALP off = ``bypass`` preset (same loss, no perturbation). The two are
interleaved on the same batch so machine noise hits both alike; medians are reported.

Targets (issue 6): time ratio <= 1.10 and peak-memory ratio <= 1.10. Also printed: achieved
training tokens/s against the bf16 matmul throughput measured in the same run, and the cost of
drawing the noise itself with several methods.

Run:  .venv/bin/python bench/alp_overhead.py [--batch 16 --length 256 --repeats 5]
(tcmalloc, if installed, helps every number: LD_PRELOAD=libtcmalloc_minimal.so.4)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from alp_agents.learner.logprobs import token_logprobs
from alp_agents.learner.objectives import PolicyLossConfig, policy_loss
from alp_agents.learner.perturb import LayerwisePerturbation
from alp_agents.models import load_model

SETTINGS = ("off", "on", "on_store")


def child_peak_rss(args: argparse.Namespace, variant: str) -> int:
    """Peak RSS (bytes) of a fresh process that runs two updates of one variant.

    A fresh process per variant: in one process, memory freed by one variant stays mapped and
    would blur the comparison.
    """
    cmd = [sys.executable, __file__, "--child", variant, "--batch", str(args.batch)]
    cmd += ["--length", str(args.length), "--sigma", str(args.sigma), "--device", "cpu"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss"]


class CudaPeak:
    """Peak allocated CUDA memory in a block."""

    def __enter__(self) -> CudaPeak:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ceiling_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device runs it natively, else float32: the precision training runs in
    there (`alp_agents.models.precision`); an emulated bf16 matmul would take minutes here."""
    from alp_agents.models.precision import native_bf16

    return torch.bfloat16 if native_bf16(device) else torch.float32


def matmul_gflops(device: torch.device, n: int = 2048, reps: int = 10) -> float:
    """Measured matmul throughput in `ceiling_dtype` (the machine's practical ceiling), GFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=ceiling_dtype(device))
    b = torch.randn(n, n, device=device, dtype=ceiling_dtype(device))
    for _ in range(3):
        a @ b
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def noise_methods(shape: tuple[int, ...], layers: int, device: torch.device) -> dict[str, float]:
    """Seconds to draw ``layers`` float32 N(0,1) tensors of ``shape``, by method."""
    gen = torch.Generator(device=device)
    buf = torch.empty(shape, device=device)

    def fresh() -> None:
        for layer in range(layers):
            gen.manual_seed(layer)
            torch.randn(shape, generator=gen, device=device)

    def reused() -> None:
        for layer in range(layers):
            gen.manual_seed(layer)
            buf.normal_(generator=gen)

    def bf16_fresh() -> None:  # NOT allowed by the spec (noise must be fp32); reference only
        for layer in range(layers):
            gen.manual_seed(layer)
            torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)

    out = {}
    for name, fn in {
        "randn, new tensor per layer": fresh,
        "normal_ into one reused buffer (used)": reused,
        "randn bf16 (not spec-compliant)": bf16_fresh,
    }.items():
        fn()
        sync(device)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def make_update(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    alp: bool,
    pert: LayerwisePerturbation,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> Callable[[int], None]:
    cfg = PolicyLossConfig.preset("alp" if alp else "bypass")

    def update(step: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        ctx = pert.active(seed=step) if alp else _null()
        with torch.autocast(device.type, dtype=torch.bfloat16), ctx:
            lp = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
        loss, _ = policy_loss(lp, batch["infer"], batch["adv"], batch["mask"], cfg)
        loss.backward()
        optimizer.step()
        sync(device)

    return update


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def setup(args: argparse.Namespace, device: torch.device):
    """Model, batch, perturbation, fused AdamW and the two update closures."""
    model = load_model(device=device)
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.length), generator=g)
    batch = {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids, device=device),
        "mask": torch.ones(args.batch, args.length, device=device),
        "adv": torch.randn(args.batch, generator=g).to(device),
    }
    batch["mask"][:, 0] = 0
    # inference log-probs = the model's own, so the ratios are realistic (near 1, unclipped)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        batch["infer"] = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
    pert = LayerwisePerturbation(model, sigma_init=args.sigma)
    pert_store = LayerwisePerturbation(model, sigma_init=args.sigma, store_noise=True)
    sigmas = list(pert.parameters()) + list(pert_store.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": list(model.parameters()), "weight_decay": 0.01},
            {"params": sigmas, "lr": 1e-2, "weight_decay": 0.0},
        ],
        lr=1e-6,
        fused=True,
    )
    updates = {
        "off": make_update(model, batch, False, pert, optimizer, device),
        "on": make_update(model, batch, True, pert, optimizer, device),
        "on_store": make_update(model, batch, True, pert_store, optimizer, device),
    }
    return model, updates


def run_child(args: argparse.Namespace) -> None:
    _, updates = setup(args, torch.device("cpu"))
    for step in range(2):
        updates[args.child](step)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"peak_rss": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="timed updates per setting")
    ap.add_argument("--sigma", type=float, default=0.02)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        run_child(args)
        return
    device = torch.device(args.device)

    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch}x{args.length}")
    ceiling = matmul_gflops(device)
    kind = str(ceiling_dtype(device)).removeprefix("torch.")
    print(f"{kind} matmul throughput (2048^3): {ceiling:,.0f} GFLOP/s", flush=True)

    model, updates = setup(args, device)
    n_params = sum(p.numel() for p in model.parameters())
    n_layers = model.config.num_hidden_layers
    hidden = model.config.hidden_size
    for name in SETTINGS * 2:  # warm-up: allocator, optimiser state, kernels
        updates[name](0)
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    peaks: dict[str, int] = dict.fromkeys(SETTINGS, 0)
    for rep in range(args.repeats):
        for name in SETTINGS if rep % 2 == 0 else SETTINGS[::-1]:
            if device.type == "cuda":
                with CudaPeak() as mem:
                    t0 = time.perf_counter()
                    updates[name](rep + 1)
                    times[name].append(time.perf_counter() - t0)
                peaks[name] = max(peaks[name], mem.peak)
            else:
                t0 = time.perf_counter()
                updates[name](rep + 1)
                times[name].append(time.perf_counter() - t0)
        done = ", ".join(f"{name} {times[name][-1]:.2f} s" for name in SETTINGS)
        print(f"  repeat {rep + 1}/{args.repeats}: {done}", flush=True)
    del model, updates
    if device.type == "cpu":
        print("  peak memory: one fresh process per setting ...", flush=True)
        peaks = {name: child_peak_rss(args, name) for name in SETTINGS}

    tokens = args.batch * args.length
    med = {k: statistics.median(v) for k, v in times.items()}
    what = "peak RSS" if device.type == "cpu" else "peak allocated"
    print()
    print(
        f"| setting | update s (median of {args.repeats}) | tokens/s | GFLOP/s (6N/token) "
        f"| % of {kind} matmul | {what} MiB |"
    )
    print("|---|---|---|---|---|---|")
    labels = {
        "off": "ALP off (bypass)",
        "on": f"ALP on ({n_layers} layers, noise redrawn in backward: default)",
        "on_store": f"ALP on ({n_layers} layers, store_noise=True)",
    }
    for name, label in labels.items():
        tps = tokens / med[name]
        gf = 6 * n_params * tps / 1e9
        print(
            f"| {label} | {med[name]:.3f} | {tps:,.0f} | {gf:,.0f} | {100 * gf / ceiling:.1f}% "
            f"| {peaks[name] / 2**20:,.0f} |"
        )
    print()
    verdict = {True: "PASS", False: "FAIL"}
    for name in ("on", "on_store"):
        t, m = med[name] / med["off"], peaks[name] / peaks["off"]
        print(
            f"{name} / off: time ratio {t:.3f} ({verdict[t <= 1.10]} at <= 1.10), "
            f"peak-memory ratio {m:.3f} ({verdict[m <= 1.10]} at <= 1.10)"
        )

    shape = (args.batch, args.length, hidden)
    samples = n_layers * tokens * hidden
    print()
    print(f"drawing the noise: {n_layers} layers x {shape} float32 = {samples / 1e6:.0f} M samples")
    for name, secs in noise_methods(shape, n_layers, device).items():
        print(
            f"  {name:40s} {secs * 1e3:8.1f} ms  {samples / secs / 1e6:6.0f} M samples/s  "
            f"({100 * secs / med['off']:.1f}% of an update)"
        )
    print("ALP draws it twice per update: forward, and again in backward for d loss / d sigma.")


if __name__ == "__main__":
    main()
