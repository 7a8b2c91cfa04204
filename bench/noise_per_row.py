#!/usr/bin/env python
"""What independent noise per row costs ALP's ratio-numerator forward (docs/alp.md).

The trainer packs a prompt group's rows under one shared prompt; under a hidden-state
perturbation every row must get its own noise, so the numerator forward runs each row whole.
This times forward + backward of the perturbed log-probs both ways, interleaved, on SmolLM2
(float32, the precision of CPUs without native bf16) and prints the ratio.

    python bench/noise_per_row.py [--rows 4 --prompt 160 --continuation 96 --repeats 3]
"""

import argparse
import time

import torch

import alp_agents
from alp_agents.learner.logprobs import token_logprobs
from alp_agents.learner.perturb import LayerwisePerturbation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--prompt", type=int, default=160)
    p.add_argument("--continuation", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.manual_seed(0)
    model = alp_agents.load_model()
    model.train()
    pert = LayerwisePerturbation(model, sigma_init=0.02)
    ids = torch.randint(100, 40000, (a.rows, a.prompt + a.continuation))
    ids[:, : a.prompt] = ids[0, : a.prompt]  # one prompt group
    mask = torch.ones_like(ids)
    start = torch.full((a.rows,), a.prompt)

    def run(share: bool) -> float:
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        with pert.active(seed=1):
            lp = token_logprobs(model, ids, mask, score_from=start, share_prefixes=share)
            lp[:, a.prompt :].sum().backward()
        return time.perf_counter() - t

    for share in (True, False):
        run(share)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(a.repeats):
        for share in (True, False):
            times[share].append(run(share))
    packed, per_row = min(times[True]), min(times[False])
    print(
        f"packed (one shared prompt, shared noise): {packed:.2f} s; per row (independent noise): "
        f"{per_row:.2f} s; ratio {per_row / packed:.2f}x  ({a.rows} rows, prompt {a.prompt}, "
        f"continuation {a.continuation}, {torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main()
