"""The learner: advantages, then DDPO-IS / DDPO-SF / RWR updates of the UNet's LoRA.

A plain class (no Ray): `cluster/` wraps it as the `learner` actor. One call of `train()` is one
update (the paper's "iteration"): it consumes an epoch's trajectories and their rewards, runs
`num_inner_epochs` passes over them, and bumps `policy_version`.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_unet_state_dict_to_peft
from safetensors.torch import load_file, save_file

from ddpo.advantages import PerPromptStatTracker, batch_advantages, clip_advantages
from ddpo.config import Config, TrainConfig
from ddpo.diffusion import encode_prompts, predict_noise, step_log_prob
from ddpo.lora import LoraState, get_lora_state, load_lora_state, lora_parameters, save_lora
from ddpo.losses import ddpo_is_loss, ddpo_sf_loss, importance_weight, rwr_loss, rwr_weights
from ddpo.pipeline import load_policy
from ddpo.trajectory import TrainingBatch, to_training_batch


def _num_train_steps(train: TrainConfig, num_steps: int) -> int:
    return max(1, int(num_steps * train.timestep_fraction))


class Learner:
    def __init__(self, config: Config):
        self.config = config
        self.pipe = load_policy(config)
        self.pipe.scheduler.set_timesteps(config.sample.num_steps, device=self.pipe.unet.device)
        t = config.train
        self.optimizer = torch.optim.AdamW(
            lora_parameters(self.pipe.unet), lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.adam_weight_decay, eps=t.adam_epsilon,
        )
        a = config.advantage
        self.stat_tracker = PerPromptStatTracker(a.buffer_size, a.min_count)
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        self.policy_version = 0
        self.trained_batch_ids: set[str] = set()

    # -- weights ------------------------------------------------------------------------------

    def weights(self) -> tuple[int, LoraState]:
        """(policy_version, LoRA state): what gets broadcast to the samplers."""
        return self.policy_version, get_lora_state(self.pipe.unet)

    # -- one update ---------------------------------------------------------------------------

    def train(self, batches: list[pa.RecordBatch], rewards: list[np.ndarray]) -> dict[str, float]:
        """One update on sample batches (Arrow) and their rewards; returns its diagnostics and the
        new `policy_version`. A batch whose id was trained on before (a retried task delivered
        twice) is skipped and counted; with nothing left to train on, the version stays."""
        fresh = [(b, r) for b, r in zip(batches, rewards) if b.column("batch_id")[0].as_py()
                 not in self.trained_batch_ids]
        duplicates = len(batches) - len(fresh)
        if not fresh:
            return {"duplicate_batches": duplicates, "num_samples": 0, "policy_version": self.policy_version}
        batch = to_training_batch(pa.Table.from_batches([b for b, _ in fresh]))
        reward = np.concatenate([np.asarray(r, dtype=np.float64) for _, r in fresh])

        # advantages: per-prompt normalised rewards, clipped
        if self.config.advantage.per_prompt_stat_tracking:
            advantages = self.stat_tracker.update(batch.prompts, reward)
        else:
            advantages = batch_advantages(reward)
        advantages = torch.as_tensor(
            clip_advantages(advantages, self.config.train.adv_clip_max), dtype=torch.float32
        )

        policy_lag = (self.policy_version - batch.policy_versions).float()
        if self.config.train.algorithm == "rwr":
            diagnostics = self._train_rwr(batch, advantages)
        else:
            diagnostics = self._train_policy_gradient(batch, advantages)

        self.policy_version += 1
        self.trained_batch_ids.update(batch.batch_ids)
        return {
            **diagnostics,
            "num_samples": len(batch),
            "duplicate_batches": duplicates,
            "policy_version": self.policy_version,
            "policy_lag_mean": float(policy_lag.mean()),
            "advantage_abs_mean": float(advantages.abs().mean()),
        }

    def _embeddings(self, prompts: list[str], with_negative: bool):
        """Text embeddings of all prompts, computed once per update (the text encoder is frozen)."""
        chunks = [prompts[i:i + self.config.train.batch_size]
                  for i in range(0, len(prompts), self.config.train.batch_size)]
        with torch.no_grad():
            encoded = [encode_prompts(self.pipe, chunk, with_negative) for chunk in chunks]
        prompt_embeds = torch.cat([e[0] for e in encoded])
        negative = torch.cat([e[1] for e in encoded]) if with_negative else None
        return prompt_embeds, negative

    def _log_prob(self, batch: TrainingBatch, idx, step, prompt_embeds, negative):
        """log p_theta(x_{t-1} | x_t, c) for samples `idx` at their step indices `step`."""
        device = self.pipe.unet.device
        s = self.config.sample
        return step_log_prob(
            self.pipe,
            batch.latents[idx, step].to(device),
            batch.latents[idx, step + 1].to(device),
            batch.timesteps[idx, step].to(device),
            prompt_embeds[idx],
            None if negative is None else negative[idx],
            s.guidance_scale, s.eta, s.log_prob_reduction,
        ).cpu()

    def _schedule(self, num_samples: int, num_steps: int):
        """Per inner epoch: a sample order and, per sample, the order of its steps. Training
        takes each sample's first `num_train_steps` of that order: any of them (`random`), or
        only the earliest steps, in shuffled order (`earliest`)."""
        t = self.config.train
        order = (torch.randperm(num_samples, generator=self.generator) if t.shuffle_samples
                 else torch.arange(num_samples))
        # the steps a sample may train on come first, then the others
        pool = num_steps if t.timestep_selection == "random" else _num_train_steps(t, num_steps)
        if t.shuffle_timesteps:
            steps = torch.stack([torch.cat([torch.randperm(pool, generator=self.generator),
                                            torch.arange(pool, num_steps)])
                                 for _ in range(num_samples)])
        else:
            steps = torch.arange(num_steps).expand(num_samples, num_steps)
        return order, steps

    def _minibatches(self, batch: TrainingBatch):
        """Yield (sample indices, their step orders, whether an optimizer step follows). An
        optimizer step follows every `gradient_accumulation_steps` minibatches and the last one
        of each inner epoch (dropped stale batches can leave a short epoch)."""
        t = self.config.train
        num_samples, num_steps = batch.log_probs.shape
        starts = range(0, num_samples, t.batch_size)
        for _ in range(t.num_inner_epochs):
            order, steps = self._schedule(num_samples, num_steps)
            for k, start in enumerate(starts):
                idx = order[start:start + t.batch_size]
                step_after = (k + 1) % t.gradient_accumulation_steps == 0 or k == len(starts) - 1
                yield idx, steps[idx], step_after

    def _optimizer_step(self) -> float:
        params = lora_parameters(self.pipe.unet)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.train.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def _train_policy_gradient(self, batch: TrainingBatch, advantages: torch.Tensor) -> dict[str, float]:
        t, s = self.config.train, self.config.sample
        num_samples, num_steps = batch.log_probs.shape
        num_train_steps = _num_train_steps(t, num_steps)
        prompt_embeds, negative = self._embeddings(batch.prompts, with_negative=t.cfg and s.guidance_scale > 1)

        # the proximal policy: the learner's weights at the start of this update. For batches
        # sampled with these very weights (lag 0) the stored log-probs are exactly that.
        log_prob_behaviour = batch.log_probs
        log_prob_prox = log_prob_behaviour.clone()
        stale = torch.nonzero(batch.policy_versions != self.policy_version).flatten()
        proximal_start = time.perf_counter()
        with torch.no_grad():
            for start in range(0, len(stale), t.batch_size):
                idx = stale[start:start + t.batch_size]
                for j in range(num_steps):
                    step = torch.full((len(idx),), j)
                    log_prob_prox[idx, j] = self._log_prob(batch, idx, step, prompt_embeds, negative)
        weight = importance_weight(log_prob_prox, log_prob_behaviour, t.importance_weight_cap)

        stats = defaultdict(list, time_proximal_s=[time.perf_counter() - proximal_start])
        scale = 1.0 / (num_train_steps * t.gradient_accumulation_steps)
        for idx, steps, step_after in self._minibatches(batch):
            for j in range(num_train_steps):
                step = steps[:, j]
                log_prob = self._log_prob(batch, idx, step, prompt_embeds, negative)
                if t.algorithm == "ddpo_is":
                    loss, diag = ddpo_is_loss(log_prob, log_prob_prox[idx, step], advantages[idx],
                                              weight[idx, step], t.clip_range)
                else:
                    loss, diag = ddpo_sf_loss(log_prob, advantages[idx], weight[idx, step])
                (loss * scale).backward()
                stats["loss"].append(loss.item())
                for name, value in diag.items():
                    stats[name].append(float(value))
            if step_after:
                stats["grad_norm"].append(self._optimizer_step())
        stats["importance_weight_mean"] = [float(weight.mean())]
        return {name: float(np.mean(values)) for name, values in stats.items()}

    def _train_rwr(self, batch: TrainingBatch, advantages: torch.Tensor) -> dict[str, float]:
        """Reward-weighted regression on the final samples x_0: the ordinary denoising loss at the
        trajectory's timesteps, each sample weighted by exp(A / beta) or a top-k 0/1 weight."""
        t = self.config.train
        device = self.pipe.unet.device
        scheduler = self.pipe.scheduler
        num_samples, num_steps = batch.log_probs.shape
        num_train_steps = _num_train_steps(t, num_steps)
        weights = rwr_weights(advantages, beta=t.rwr_beta, top_fraction=t.rwr_top_fraction if t.rwr_sparse else None)
        prompt_embeds, _ = self._embeddings(batch.prompts, with_negative=False)
        x0 = batch.latents[:, -1].float()

        stats = defaultdict(list)
        scale = 1.0 / (num_train_steps * t.gradient_accumulation_steps)
        for idx, steps, step_after in self._minibatches(batch):
            for j in range(num_train_steps):
                timestep = batch.timesteps[idx, steps[:, j]]
                noise = torch.randn(x0[idx].shape, generator=self.generator)
                noisy = scheduler.add_noise(x0[idx], noise, timestep)
                target = noise if scheduler.config.prediction_type == "epsilon" else \
                    scheduler.get_velocity(x0[idx], noise, timestep)
                noise_pred = predict_noise(self.pipe.unet, noisy.to(device), timestep.to(device),
                                           prompt_embeds[idx], None, 1.0)
                loss, _ = rwr_loss(noise_pred.cpu(), target, weights[idx])
                (loss * scale).backward()
                stats["loss"].append(loss.item())
            if step_after:
                stats["grad_norm"].append(self._optimizer_step())
        # RWR has no ratio: it neither clips nor measures a KL to the sampling policy
        return {"approx_kl": float("nan"), "clipfrac": float("nan"),
                **{name: float(np.mean(values)) for name, values in stats.items()}}

    # -- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self, root: str | Path) -> Path | None:
        """Write `root/epoch_NNNN/` for the last epoch trained (N = policy_version - 1): the LoRA
        in the diffusers format, plus optimizer, stat tracker, RNG and version, as safetensors
        and JSON (no pickle). Returns the directory; None before the first update."""
        if self.policy_version == 0:
            return None
        directory = Path(root) / f"epoch_{self.policy_version - 1:04d}"
        directory.mkdir(parents=True, exist_ok=True)
        save_lora(self.pipe.unet, directory)
        optimizer = self.optimizer.state_dict()
        tensors = {"generator_state": self.generator.get_state()}
        for index, state in optimizer["state"].items():
            for key, value in state.items():
                tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).clone()
        save_file(tensors, str(directory / "learner_state.safetensors"))
        (directory / "learner_state.json").write_text(json.dumps({
            "policy_version": self.policy_version,
            "optimizer_param_groups": optimizer["param_groups"],
            "stat_tracker": self.stat_tracker.state_dict(),
            "trained_batch_ids": sorted(self.trained_batch_ids),
        }))
        return directory

    def load_checkpoint(self, directory: str | Path) -> int:
        """Restore everything `save_checkpoint` wrote, so that training goes on exactly as if it
        had never stopped; returns the policy version (the number of epochs trained)."""
        directory = Path(directory)
        state, _ = StableDiffusionPipeline.lora_state_dict(str(directory))
        unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
        load_lora_state(self.pipe.unet, convert_unet_state_dict_to_peft(unet_state))
        tensors = load_file(str(directory / "learner_state.safetensors"))
        meta = json.loads((directory / "learner_state.json").read_text())
        self.generator.set_state(tensors.pop("generator_state"))
        optimizer_state: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
        for key, value in tensors.items():
            _, index, name = key.split(".", 2)
            optimizer_state[int(index)][name] = value
        self.optimizer.load_state_dict({"state": dict(optimizer_state),
                                        "param_groups": meta["optimizer_param_groups"]})
        self.stat_tracker.load_state_dict(meta["stat_tracker"])
        self.policy_version = meta["policy_version"]
        self.trained_batch_ids = set(meta["trained_batch_ids"])
        return self.policy_version
