"""`train.gradient_checkpointing`: the denoiser recomputes its activations in the backward pass,
and the update is the same."""

import numpy as np
import pytest
import torch
import torch.utils.checkpoint
from diffusers import UNet2DConditionModel

from actors.sampler import sample_batch
from ddpo.config import ConfigError
from ddpo.plan import epoch_plan
from ddpo.trajectory import EpochTrajectories
from learner import Learner
from tests.conftest import tiny_config

SETTINGS = {
    # the UNet family (SD), with the KL's reference forward (no gradients, so not checkpointed)
    "sd": {"train.kl_coef": 0.1},
    # the SD3 transformer family, with classifier-free guidance
    "sd3": {"model.pretrained": "builtin:digits-flow", "sample.height": 16, "sample.width": 16,
            "sample.guidance_scale": 2.0, "train.timesteps_per_forward": 2},
}


@pytest.mark.parametrize("family", SETTINGS)
def test_the_update_is_the_same_with_gradient_checkpointing(tmp_path, monkeypatch, family):
    """One update on the same trajectories, with and without checkpointing, gives the same LoRA,
    bit for bit: the backward pass runs the same graph, its saved activations recomputed by the
    same CPU kernels on the same inputs (the adapter does not change between the forward and
    the backward), so every gradient is the same float. (On an H200 the SD3 transformer's
    gradients were the same bits too; the UNet's differ by ~1e-4 of their norm between two runs
    without checkpointing already, GPU kernels that sum in a varying order, and by as much with
    it.) Checkpointing is on: the blocks run through torch.utils.checkpoint, which they do not
    without it."""
    checkpointed = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def counted(*args, **kwargs):
        checkpointed.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    weights, epoch = [], None
    for on in (False, True):
        config = tiny_config(tmp_path, **{**SETTINGS[family], "train.gradient_checkpointing": on})
        learner = Learner(config)
        if epoch is None:  # sampled once, with the initial weights (no gradients: nothing checkpointed)
            batches = [sample_batch(learner.model, config, s.batch_id, s.prompts, s.seeds, s.sde_start, 0)[0]
                       for s in epoch_plan(config, config.load_prompts(), 0)]
            rewards = [np.random.default_rng(i).normal(size=b.num_rows) for i, b in enumerate(batches)]
            epoch = EpochTrajectories.from_batches(batches), rewards
        assert not checkpointed
        learner.train(*epoch)
        assert bool(checkpointed) == on, family
        weights.append(learner.weights()[1])
    plain, recomputed = weights
    assert all(torch.equal(plain[k], recomputed[k]) for k in plain)
    assert any(not torch.equal(plain[k], Learner(tiny_config(tmp_path, **SETTINGS[family])).weights()[1][k])
               for k in plain)  # the update moved the LoRA


def test_a_denoiser_without_checkpointing_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(UNet2DConditionModel, "_supports_gradient_checkpointing", False)
    with pytest.raises(ConfigError, match=r"^train.gradient_checkpointing: the UNet2DConditionModel of StableDiffusion "
                                          r"does not support gradient checkpointing; set it to false$"):
        Learner(tiny_config(tmp_path, **{"train.gradient_checkpointing": True}))
