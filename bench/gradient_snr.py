"""How much of DDPO's policy gradient is signal, per denoising step.

Samples one large epoch with the config's policy, scores it, and computes the on-policy gradient
of -A * log p_theta(x_{t-1} | x_t, c) on the LoRA for each denoising step j, separately on G
disjoint groups of samples. If the gradient were all signal the G group gradients would point the
same way (cosine 1); if it were all noise, their mean pairwise cosine would be about 0. Step by
step it shows where the reward's signal is, and how large each step's share of the gradient is.

    python bench/gradient_snr.py [--config configs/digits.yaml] [--groups 8] [--group-size 64]
                                 [--set key=value ...]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.reward import RewardWorker  # noqa: E402
from actors.sampler import Sampler  # noqa: E402
from ddpo.advantages import PerPromptStatTracker  # noqa: E402
from ddpo.config import load_config  # noqa: E402
from ddpo.lora import lora_parameters  # noqa: E402
from ddpo.plan import SampleBatchSpec  # noqa: E402
from ddpo.trajectory import to_training_batch  # noqa: E402
from learner import Learner  # noqa: E402


def mean_pairwise_cosine(vectors: np.ndarray) -> float:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return float(np.mean([a @ b for a, b in itertools.combinations(unit, 2)]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = load_config(args.config, args.overrides)
    learner, sampler, reward = Learner(config), Sampler(config), RewardWorker(config.reward)
    sampler.set_weights(learner.weights())

    # one large epoch: every prompt equally often, fresh seeds
    prompts = config.load_prompts()
    n = args.groups * args.group_size
    spec = SampleBatchSpec("snr", [prompts[i % len(prompts)] for i in range(n)], list(range(n)))
    start = time.perf_counter()
    full, summary = sampler.sample(spec.batch_id, spec.prompts, spec.seeds)
    ((_, rewards, info),) = reward.score(summary)
    batch = to_training_batch(pa.Table.from_batches([full]))
    # advantages normalised per prompt over the whole epoch (the stat tracker's steady state)
    advantages = PerPromptStatTracker(buffer_size=n, min_count=1).update(spec.prompts, rewards)
    advantages = torch.as_tensor(advantages, dtype=torch.float32)
    print(f"{n} samples in {time.perf_counter() - start:.1f} s; reward mean {rewards.mean():.3f}"
          + "".join(f", {k} mean {np.mean(v):.3f}" for k, v in info.items()
                    if np.asarray(v).dtype.kind in "fib"))

    cond, negative = learner._embeddings(spec.prompts, with_negative=learner.model.uses_cfg(config.sample.guidance_scale))
    params = lora_parameters(learner.model.denoiser)
    num_steps = batch.log_probs.shape[1]
    grads = np.zeros((num_steps, args.groups, sum(p.numel() for p in params)))
    for g in range(args.groups):
        idx = torch.arange(g * args.group_size, (g + 1) * args.group_size)
        for j in range(num_steps):
            log_prob = learner._log_prob(batch, idx, torch.full((len(idx), 1), j), cond, negative)[:, 0]
            loss = -(advantages[idx] * log_prob).mean()
            grads[j, g] = torch.cat([p.flatten() for p in torch.autograd.grad(loss, params)]).numpy()

    norms = np.linalg.norm(grads.mean(axis=1), axis=1)
    print(f"\nper-step LoRA gradient, {args.groups} groups of {args.group_size} samples")
    print("| step | timestep | mean pairwise cosine | norm of the mean gradient | share of the squared norm |")
    print("| --- | --- | --- | --- | --- |")
    for j in range(num_steps):
        print(f"| {j} | {int(batch.timesteps[0, j])} | {mean_pairwise_cosine(grads[j]):+.3f} | "
              f"{norms[j]:.2e} | {norms[j] ** 2 / (norms ** 2).sum():.2f} |")
    for k in sorted({num_steps // 4, num_steps // 2, num_steps}):
        print(f"| steps 0-{k - 1} summed | | {mean_pairwise_cosine(grads[:k].sum(axis=0)):+.3f} | | |")


if __name__ == "__main__":
    main()
