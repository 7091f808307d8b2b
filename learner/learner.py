"""The learner: advantages, then DDPO-IS / DDPO-SF / RWR / DiffusionNFT updates of the denoiser's LoRA.

A plain class (no Ray): `cluster/` wraps it as the actors `learner-<rank>`. One call of
`train()` is one update (the paper's "iteration"): it consumes an epoch's trajectories and their
rewards, runs `num_inner_epochs` passes over them, and bumps `policy_version`.

One logical learner may span `world_size` ranks (a torch.distributed group: gloo on CPU, NCCL on
GPU). Every rank gets all rewards and prompts and computes the same advantages and the same
minibatch plan; each trains on its slice of every minibatch, weighted by the slice's share of
the minibatch, and the LoRA gradients are summed across ranks once per optimizer step. So every
rank takes the same optimizer steps, and the numbers do not depend on `world_size`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ddpo.advantages import PerPromptStatTracker, batch_advantages, clip_advantages, group_advantages
from ddpo.config import Config, TrainConfig
from ddpo.rollout import step_log_prob
from ddpo.families import take
from ddpo.lora import (
    LoraState, active_adapter, add_adapter_copy, get_lora_state, load_lora_state, lora_parameters, reference_policy,
    save_lora,
)
from ddpo.losses import (
    ddpo_is_loss, ddpo_sf_loss, diffusion_nft_loss, importance_weight, kl_to_reference, nft_optimality, rwr_loss,
    rwr_weights,
)
from ddpo.pipeline import load_policy
from ddpo.trajectory import EpochTrajectories, TrainingBatch, to_training_batch


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


OLD = "old"  # DiffusionNFT's old-policy adapter


def _num_train_steps(train: TrainConfig, num_steps: int) -> int:
    return max(1, int(num_steps * train.timestep_fraction))


class Learner:
    def __init__(self, config: Config, rank: int = 0, world_size: int = 1):
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.model = load_policy(config)
        s = config.sample
        self.model.set_timesteps(s.num_steps, s.height, s.width)
        t = config.train
        if t.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.optimizer = torch.optim.AdamW(
            lora_parameters(self.model.denoiser), lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.adam_weight_decay, eps=t.adam_epsilon,
        )
        a = config.advantage
        self.stat_tracker = PerPromptStatTracker(a.buffer_size, a.min_count)
        self.generator = torch.Generator().manual_seed(config.seed + 1)  # the same on every rank
        self.policy_version = 0
        self.trained_batch_ids: set[str] = set()
        self.optimizer_steps = 0
        # DiffusionNFT's old policy v_old: a second adapter on the same base model, which samples
        self.old_policy = add_adapter_copy(self.model.denoiser, OLD) if t.algorithm == "diffusion_nft" else None
        # the steps each trajectory holds that training picks from: the stochastic ones
        # (DDPO, Flow-GRPO, an SDE window's), or, for DiffusionNFT, the whole sampling schedule
        self.num_steps = s.num_steps if self.old_policy is not None else s.stored_steps

    def join_group(self, init_method: str, hostname: str) -> None:
        """Join the learner group's process group (`world_size` > 1): NCCL on GPU, gloo on CPU
        with its sockets on `hostname` (in Ray, this node's address)."""
        device = self.model.device
        if device.type == "cuda":
            dist.init_process_group("nccl", init_method=init_method, rank=self.rank,
                                    world_size=self.world_size, device_id=device)
        else:
            options = dist.ProcessGroupGloo._Options()
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=hostname)]
            dist.init_process_group("gloo", init_method=init_method, rank=self.rank,
                                    world_size=self.world_size, pg_options=options)

    def _all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """The sum (or `op`) over ranks, in place (nothing to do on one rank)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=op)
        return tensor

    # -- weights ------------------------------------------------------------------------------

    def weights(self) -> tuple[int, LoraState]:
        """(policy_version, LoRA state): what gets broadcast to the samplers, the policy that
        samples (DiffusionNFT: the old policy)."""
        return self.policy_version, get_lora_state(self.model.denoiser, OLD if self.old_policy else "default")

    # -- one update ---------------------------------------------------------------------------

    def train(self, epoch: EpochTrajectories, rewards: list[np.ndarray]) -> dict[str, float]:
        """One update on an epoch's sample batches and their rewards (one array per batch);
        returns its diagnostics and the new `policy_version`. A batch whose id was trained on
        before (a retried task delivered twice) is skipped and counted; with nothing left to
        train on, the version stays."""
        fresh = [i for i, batch_id in enumerate(epoch.batch_ids) if batch_id not in self.trained_batch_ids]
        duplicates = len(epoch.batch_ids) - len(fresh)
        if not fresh:
            return {"duplicate_batches": duplicates, "num_samples": 0, "policy_version": self.policy_version}
        prompts = [prompt for i in fresh for prompt in epoch.prompts[i]]
        reward = np.concatenate([np.asarray(rewards[i], dtype=np.float64) for i in fresh])
        versions = torch.tensor([epoch.policy_versions[i] for i in fresh for _ in epoch.prompts[i]])

        # advantages: normalised rewards, clipped (every rank: all rewards)
        a = self.config.advantage
        if a.mode == "per_prompt_buffer":
            advantages = self.stat_tracker.update(prompts, reward)
        elif a.mode == "group":
            advantages = group_advantages(prompts, reward, a.global_std)
        else:
            advantages = batch_advantages(reward)
        advantages = torch.as_tensor(
            clip_advantages(advantages, self.config.train.adv_clip_max), dtype=torch.float32
        )

        # the minibatch plan (the same on every rank), then this rank's samples of it
        plan = self._minibatches(len(prompts), self.num_steps)
        rows = sorted({int(i) for idx, _, _ in plan for i in self._my_slice(idx)})
        batch = self._fetch_rows(epoch, fresh, rows)
        local = torch.full((len(prompts),), -1, dtype=torch.long)
        local[rows] = torch.arange(len(rows))

        if self.config.train.algorithm == "rwr":
            diagnostics = self._train_rwr(batch, local, advantages, plan)
        elif self.old_policy is not None:
            diagnostics = self._train_nft(batch, local, advantages, plan)
        else:
            diagnostics = self._train_policy_gradient(batch, local, advantages, plan)

        self.policy_version += 1
        self.trained_batch_ids.update(epoch.batch_ids[i] for i in fresh)
        return {
            **diagnostics,
            "num_samples": len(prompts),
            "duplicate_batches": duplicates,
            "policy_version": self.policy_version,
            "policy_lag_mean": float((self.policy_version - 1 - versions).float().mean()),
            "advantage_abs_mean": float(advantages.abs().mean()),
        }

    def _my_slice(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's part of a minibatch (contiguous, sizes differing by at most one)."""
        return torch.tensor_split(idx, self.world_size)[self.rank]

    @staticmethod
    def _fetch_rows(epoch: EpochTrajectories, fresh: list[int], rows: list[int]) -> TrainingBatch:
        """The trajectories of the samples `rows` (indices into the fresh batches' samples),
        fetching only the batches that hold them."""
        starts = np.cumsum([0] + [len(epoch.prompts[i]) for i in fresh])
        owner = np.searchsorted(starts, rows, side="right") - 1  # position in `fresh` of each row
        needed = sorted(set(owner.tolist()))
        fetched = dict(zip(needed, epoch.fetch([fresh[j] for j in needed])))
        offsets = np.cumsum([0] + [fetched[j].num_rows for j in needed])
        position = {j: offset for j, offset in zip(needed, offsets)}
        take = [position[j] + row - starts[j] for j, row in zip(owner.tolist(), rows)]
        table = pa.Table.from_batches([fetched[j] for j in needed]).take(take)
        return to_training_batch(table)

    def _embeddings(self, prompts: list[str], with_negative: bool):
        """The conditioning of all prompts, (prompts', the empty prompt's or None): the text
        encoders are frozen, so each prompt's rows come from the model's prompt cache, where the
        sampling of the same model (a colocated worker) or an earlier update left them."""
        return self.model.conditioning(prompts, with_negative)

    def _log_prob(self, batch: TrainingBatch, idx, steps, cond, negative, kl: bool = False):
        """log p_theta(x_{t-1} | x_t, c) for samples `idx` [m] at their step indices `steps`
        [m, n], as [m, n]: the n steps of all m samples go through the denoiser as one batch.
        With `kl`, also the KL of each step to the reference policy's, [m, n]."""
        device = self.model.device
        s = self.config.sample
        m, n = steps.shape
        rows, cols = idx[:, None].expand(m, n).reshape(-1), steps.reshape(-1)
        transition = (batch.latents[rows, cols].to(device), batch.latents[rows, cols + 1].to(device),
                      batch.timesteps[rows, cols].to(device), take(cond, rows), take(negative, rows), s)
        step = step_log_prob(self.model, *transition)
        if not kl:
            return step.log_prob.cpu().reshape(m, n)
        with torch.no_grad(), reference_policy(self.model.denoiser):
            reference = step_log_prob(self.model, *transition)
        kl_ref = kl_to_reference(step.mean, reference.mean, step.std, s.log_prob_reduction)
        return step.log_prob.cpu().reshape(m, n), kl_ref.cpu().reshape(m, n)

    def _step_chunks(self, num_steps: int) -> list[slice]:
        """Groups of `train.timesteps_per_forward` step positions, in order."""
        size = self.config.train.timesteps_per_forward
        return [slice(j, min(j + size, num_steps)) for j in range(0, num_steps, size)]

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

    def _minibatches(self, num_samples: int, num_steps: int) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
        """The update's plan: (sample indices, their step orders, whether an optimizer step
        follows) per minibatch. An optimizer step follows every `gradient_accumulation_steps`
        minibatches and the last one of each inner epoch (dropped stale batches can leave a
        short epoch)."""
        t = self.config.train
        starts = range(0, num_samples, t.batch_size)
        plan = []
        for _ in range(t.num_inner_epochs):
            order, steps = self._schedule(num_samples, num_steps)
            for k, start in enumerate(starts):
                idx = order[start:start + t.batch_size]
                step_after = (k + 1) % t.gradient_accumulation_steps == 0 or k == len(starts) - 1
                plan.append((idx, steps[idx], step_after))
        return plan

    def _optimizer_step(self) -> float:
        params = lora_parameters(self.model.denoiser)
        if self.world_size > 1:  # one all-reduce of all LoRA gradients: the whole minibatch's
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
            flat = self._all_reduce(torch.cat([g.reshape(-1) for g in grads]))
            for param, grad in zip(params, flat.split([g.numel() for g in grads])):
                param.grad = grad.view_as(param)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.train.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        return float(grad_norm)

    def _summarise(self, sums: dict[str, float], num_terms: int, grad_norms: list[float]) -> dict[str, float]:
        """Means over the update's (minibatch, step) terms of the ranks' weighted sums."""
        names = sorted(sums)
        totals = self._all_reduce(torch.tensor([sums[name] for name in names], dtype=torch.float64))
        return {**{name: float(total) / num_terms for name, total in zip(names, totals)},
                "grad_norm": float(np.mean(grad_norms))}

    def _train_policy_gradient(self, batch: TrainingBatch, local: torch.Tensor, advantages: torch.Tensor,
                               plan) -> dict[str, float]:
        t, s = self.config.train, self.config.sample
        num_steps = self.num_steps
        num_train_steps = _num_train_steps(t, num_steps)
        cond, negative = self._embeddings(batch.prompts, with_negative=t.cfg and self.model.uses_cfg(s.guidance_scale))

        # the proximal policy: the learner's weights at the start of this update. For batches
        # sampled with these very weights (lag 0) the stored log-probs are exactly that.
        log_prob_behaviour = batch.log_probs
        log_prob_prox = log_prob_behaviour.clone()
        stale = torch.nonzero(batch.policy_versions != self.policy_version).flatten()
        proximal_start = time.perf_counter()
        with torch.no_grad():
            for start in range(0, len(stale), t.batch_size):
                idx = stale[start:start + t.batch_size]
                for chunk in self._step_chunks(num_steps):
                    steps = torch.arange(num_steps)[chunk].expand(len(idx), -1)
                    log_prob_prox[idx, chunk] = self._log_prob(batch, idx, steps, cond, negative)
        weight = importance_weight(log_prob_prox, log_prob_behaviour, t.importance_weight_cap)
        time_proximal = time.perf_counter() - proximal_start

        # the same names on every rank: a rank with no samples in a minibatch adds zeros
        with_kl = t.kl_coef > 0
        names = (["loss", "importance_weight_mean"] + (["approx_kl", "clipfrac"] if t.algorithm == "ddpo_is" else [])
                 + (["kl_ref"] if with_kl else []))
        sums, grad_norms = dict.fromkeys(names, 0.0), []
        scale = 1.0 / (num_train_steps * t.gradient_accumulation_steps)
        # rollout/train fidelity: max |ratio - 1| over the first minibatch, before any update
        mismatch = torch.zeros(1, dtype=torch.float64)
        for k, (idx_global, steps_global, step_after) in enumerate(plan):
            mine = self._my_slice(torch.arange(len(idx_global)))
            share = len(mine) / len(idx_global)  # this rank's part of the minibatch's mean
            idx, adv = local[idx_global[mine]], advantages[idx_global[mine]]
            for chunk in self._step_chunks(num_train_steps) if len(mine) else []:
                steps = steps_global[mine, chunk]
                n = steps.shape[1]
                log_prob = self._log_prob(batch, idx, steps, cond, negative, kl=with_kl)
                if with_kl:
                    log_prob, kl_ref = log_prob
                if k == 0:
                    ratio = torch.exp(log_prob.detach().double() - log_prob_prox[idx[:, None], steps].double())
                    mismatch = torch.maximum(mismatch, (ratio - 1).abs().max().reshape(1))
                terms = (adv[:, None].expand_as(steps), weight[idx[:, None], steps])
                if t.algorithm == "ddpo_is":
                    loss, diag = ddpo_is_loss(log_prob, log_prob_prox[idx[:, None], steps], terms[0],
                                              terms[1], t.clip_range)
                else:
                    loss, diag = ddpo_sf_loss(log_prob, *terms)
                if with_kl:  # L + beta * KL(p_theta || p_ref)
                    loss = loss + t.kl_coef * kl_ref.mean()
                    diag["kl_ref"] = kl_ref.detach().mean()
                # the mean over the n steps' terms counts n times: as n separate steps would
                (loss * (n * share * scale)).backward()
                for name, value in {"loss": loss, "importance_weight_mean": terms[1].mean(), **diag}.items():
                    sums[name] += value.item() * n * share
            if step_after:
                grad_norms.append(self._optimizer_step())
        return {**self._summarise(sums, len(plan) * num_train_steps, grad_norms),
                "logprob_mismatch_max": float(self._all_reduce(mismatch, dist.ReduceOp.MAX)),
                "time_proximal_s": time_proximal}

    def _forward_process(self, batch: TrainingBatch, x0: torch.Tensor, idx: torch.Tensor, idx_global: torch.Tensor,
                         mine: torch.Tensor, steps: torch.Tensor):
        """The stored x_0 of this rank's samples `idx` put back on the forward process at their
        planned step indices `steps` [m, n] (of the stored timesteps), with fresh noise: (rows [m*n],
        timesteps, x_t, the denoiser's target), on the model's device. The noise of the whole
        minibatch `idx_global` is drawn, step by step, on every rank, so every rank makes the same
        draws; a rank with no samples in the minibatch gets None."""
        n = steps.shape[1]
        noise = torch.stack([torch.randn((len(idx_global), *x0.shape[1:]), generator=self.generator)[mine]
                             for _ in range(n)], dim=1)  # [m, n, ...]
        if not len(mine):
            return None
        device = self.model.device
        rows = idx[:, None].expand(len(idx), n).reshape(-1)
        timestep = batch.timesteps[rows, steps.reshape(-1)].to(device)
        x_t, target = self.model.noised(x0[rows].to(device), noise.reshape(-1, *x0.shape[1:]).to(device), timestep)
        return rows, timestep, x_t, target

    def _train_rwr(self, batch: TrainingBatch, local: torch.Tensor, advantages: torch.Tensor,
                   plan) -> dict[str, float]:
        """Reward-weighted regression on the final samples x_0: the ordinary denoising loss at the
        trajectory's timesteps, each sample weighted by exp(A / beta) or a top-k 0/1 weight."""
        t = self.config.train
        num_train_steps = _num_train_steps(t, self.num_steps)
        weights = rwr_weights(advantages, beta=t.rwr_beta, top_fraction=t.rwr_top_fraction if t.rwr_sparse else None)
        cond, _ = self._embeddings(batch.prompts, with_negative=False)
        x0 = batch.latents[:, -1].float()

        sums, grad_norms = {"loss": 0.0}, []
        scale = 1.0 / (num_train_steps * t.gradient_accumulation_steps)
        for idx_global, steps_global, step_after in plan:
            mine = self._my_slice(torch.arange(len(idx_global)))
            share = len(mine) / len(idx_global)
            idx = local[idx_global[mine]]
            for chunk in self._step_chunks(num_train_steps):
                steps = steps_global[mine, chunk]
                noised = self._forward_process(batch, x0, idx, idx_global, mine, steps)
                if noised is None:
                    continue
                rows, timestep, noisy, target = noised
                n = steps.shape[1]
                prediction = self.model.predict(noisy, timestep, take(cond, rows), None,
                                                self.config.sample.guidance_scale)
                loss, _ = rwr_loss(prediction.float().cpu(), target.cpu(), weights[idx_global[mine]].repeat_interleave(n))
                (loss * (n * share * scale)).backward()
                sums["loss"] += loss.item() * n * share
            if step_after:
                grad_norms.append(self._optimizer_step())
        # RWR has no ratio: it neither clips nor measures a KL to the sampling policy
        return {"approx_kl": float("nan"), "clipfrac": float("nan"),
                **self._summarise(sums, len(plan) * num_train_steps, grad_norms)}

    def _train_nft(self, batch: TrainingBatch, local: torch.Tensor, advantages: torch.Tensor,
                   plan) -> dict[str, float]:
        """DiffusionNFT on the final samples x_0: at each of a sample's planned schedule timesteps,
        fresh noise puts x_t on the forward process, and v_theta is pulled toward the implicit
        positive policy for rewarded samples (r near 1) and away for the others (r near 0), both
        relative to the old policy v_old (ddpo.losses.diffusion_nft_loss). Then v_old moves
        toward v_theta (`_update_old_policy`)."""
        t, s = self.config.train, self.config.sample
        device = self.model.device
        num_train_steps = _num_train_steps(t, self.num_steps)
        r = nft_optimality(advantages, t.adv_clip_max)
        cond, _ = self._embeddings(batch.prompts, with_negative=False)
        x0 = batch.latents[:, -1].float()
        denoiser, with_kl = self.model.denoiser, t.kl_coef > 0

        def predict(x, timestep, rows):
            return self.model.predict(x, timestep, take(cond, rows), None, s.guidance_scale).float()

        names = ["loss", "nft_positive_loss", "nft_negative_loss", "nft_old_deviation"] + (["kl_ref"] if with_kl else [])
        sums, grad_norms = dict.fromkeys(names, 0.0), []
        scale = 1.0 / (num_train_steps * t.gradient_accumulation_steps)
        for idx_global, steps_global, step_after in plan:
            mine = self._my_slice(torch.arange(len(idx_global)))
            share = len(mine) / len(idx_global)
            idx = local[idx_global[mine]]
            for chunk in self._step_chunks(num_train_steps):
                steps = steps_global[mine, chunk]
                noised = self._forward_process(batch, x0, idx, idx_global, mine, steps)
                if noised is None:
                    continue
                rows, timestep, x_t, v_target = noised
                n = steps.shape[1]
                with torch.no_grad(), active_adapter(denoiser, OLD):
                    v_old = predict(x_t, timestep, rows)
                v_theta = predict(x_t, timestep, rows)
                sigma = (timestep.float() / self.model.scheduler.config.num_train_timesteps).reshape(
                    -1, *[1] * (x_t.ndim - 1))
                loss, diag = diffusion_nft_loss(v_theta, v_old, v_target.float(), sigma,
                                                r[idx_global[mine]].repeat_interleave(n).to(device), t.nft_beta,
                                                t.adv_clip_max, t.nft_adaptive_weight)
                if with_kl:  # L + beta_KL ||v_theta - v_ref||^2, as the public code
                    with torch.no_grad(), reference_policy(denoiser):
                        v_ref = predict(x_t, timestep, rows)
                    kl_ref = ((v_theta - v_ref) ** 2).mean()
                    loss = loss + t.kl_coef * kl_ref
                    diag["kl_ref"] = kl_ref.detach()
                (loss * (n * share * scale)).backward()
                for name, value in {"loss": loss, **diag}.items():
                    sums[name] += value.item() * n * share
            if step_after:
                grad_norms.append(self._optimizer_step())
        decay = self._update_old_policy()
        return {**self._summarise(sums, len(plan) * num_train_steps, grad_norms), "nft_decay": decay}

    @torch.no_grad()
    def _update_old_policy(self) -> float:
        """v_old <- d v_old + (1 - d) v_theta, d = min(nft_decay_rate * optimizer steps so far,
        nft_decay_max) (DiffusionNFT's EMA of the old policy); returns d."""
        t = self.config.train
        decay = min(t.nft_decay_rate * self.optimizer_steps, t.nft_decay_max)
        for old, trained in zip(self.old_policy, lora_parameters(self.model.denoiser)):
            old.mul_(decay).add_(trained.detach(), alpha=1 - decay)
        return decay

    # -- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self, root: str | Path) -> Path | None:
        """Write `root/epoch_NNNN/` for the last epoch trained (N = policy_version - 1): the LoRA
        in the diffusers format, plus optimizer, stat tracker, RNG and version, as safetensors
        and JSON (no pickle). Returns the directory; None before the first update.

        Atomic: it is written as `root/.epoch_NNNN.partial/`, synced, then renamed, so a
        checkpoint that exists is whole. A write that fails (a full disk) removes the partial
        folder and raises an OSError; the checkpoints before it stay as they were. A checkpoint of this
        version that exists already holds this very state (only `train` changes it): it stays."""
        if self.policy_version == 0:
            return None
        root = Path(root)
        directory = root / f"epoch_{self.policy_version - 1:04d}"
        if (directory / "learner_state.json").exists():
            return directory
        partial = root / f".{directory.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # a leftover of a write that failed
        try:
            partial.mkdir(parents=True)
            self._write_state(partial)
            for path in partial.iterdir():  # on disk before the rename makes it a checkpoint
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            shutil.rmtree(directory, ignore_errors=True)  # not a checkpoint: no learner_state.json
            os.replace(partial, directory)
        except BaseException as err:
            shutil.rmtree(partial, ignore_errors=True)
            if isinstance(err, Exception) and not isinstance(err, OSError):  # safetensors' own, say
                raise OSError(f"{directory}: {err}") from err
            raise
        _fsync_dir(root)
        return directory

    def _write_state(self, directory: Path) -> None:
        save_lora(self.model, directory)
        optimizer = self.optimizer.state_dict()
        tensors = {"generator_state": self.generator.get_state()}
        if self.old_policy is not None:
            tensors.update({f"{OLD}.{key}": value for key, value in get_lora_state(self.model.denoiser, OLD).items()})
        for index, state in optimizer["state"].items():
            for key, value in state.items():
                tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).clone()
        save_file(tensors, str(directory / "learner_state.safetensors"))
        (directory / "learner_state.json").write_text(json.dumps({
            "policy_version": self.policy_version,
            "optimizer_steps": self.optimizer_steps,
            "optimizer_param_groups": optimizer["param_groups"],
            "stat_tracker": self.stat_tracker.state_dict(),
            "trained_batch_ids": sorted(self.trained_batch_ids),
        }))

    def roll_back(self, directory: str | Path, lr_factor: float) -> int:
        """Go back to a checkpoint (the reward-hacking guard's best) and go on with the learning
        rate now times `lr_factor` (kept in later checkpoints; a second rollback halves the
        halved rate); returns its policy version."""
        rates = [group["lr"] * lr_factor for group in self.optimizer.param_groups]
        version = self.load_checkpoint(directory)
        for group, rate in zip(self.optimizer.param_groups, rates):
            group["lr"] = rate
        return version

    def load_checkpoint(self, directory: str | Path) -> int:
        """Restore everything `save_checkpoint` wrote, so that training goes on exactly as if it
        had never stopped; returns the policy version (the number of epochs trained)."""
        directory = Path(directory)
        load_lora_state(self.model.denoiser, self.model.read_lora(directory))
        tensors = load_file(str(directory / "learner_state.safetensors"))
        meta = json.loads((directory / "learner_state.json").read_text())
        self.generator.set_state(tensors.pop("generator_state"))
        old = {key.removeprefix(f"{OLD}."): tensors.pop(key) for key in list(tensors) if key.startswith(f"{OLD}.")}
        if self.old_policy is not None:
            load_lora_state(self.model.denoiser, old, OLD)
        optimizer_state: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
        for key, value in tensors.items():
            _, index, name = key.split(".", 2)
            optimizer_state[int(index)][name] = value
        self.optimizer.load_state_dict({"state": dict(optimizer_state),
                                        "param_groups": meta["optimizer_param_groups"]})
        self.stat_tracker.load_state_dict(meta["stat_tracker"])
        self.policy_version = meta["policy_version"]
        self.optimizer_steps = meta.get("optimizer_steps", 0)  # checkpoints before DiffusionNFT: unused
        self.trained_batch_ids = set(meta["trained_batch_ids"])
        return self.policy_version
