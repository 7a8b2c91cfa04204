"""The learner: everything between a batch of trajectories and a gradient.

``advantages`` (GRPO group baselines), ``logprobs`` (teacher-forced token log-probs, shared
prompt prefixes), ``perturb`` (the layerwise perturbation and its learnable sigma),
``objectives`` (`policy_loss`: ALP and every baseline as one configurable objective),
``batching`` (mini- and micro-batches), ``metrics`` (ratio, mismatch and weight statistics),
``update`` (`PolicyUpdate`: pi_old, then K mini-batch optimiser steps on one rollout batch).
"""
