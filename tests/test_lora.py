"""LoRA: attach, extract and load in place, and the diffusers format that load_lora_weights reads."""

import numpy as np
import torch

from ddpo.config import DDIMConfig, SampleConfig
from ddpo.rollout import sample_trajectories
from ddpo.families import family_of
from ddpo.lora import attach_lora, get_lora_state, load_lora_state, lora_parameters, save_lora
from ddpo.pipeline import build_tiny_pipeline, load_pipeline

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
SAMPLE = SampleConfig(num_steps=4, guidance_scale=5.0, height=32, width=32, ddim=DDIMConfig(eta=1.0))


def _tiny():
    return family_of(build_tiny_pipeline())


def _perturb(unet, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def test_lora_starts_as_the_identity_and_trains_only_the_adapter():
    pipe = _tiny()
    before = sample_trajectories(pipe, ["a cat"], [0], SAMPLE).media.images
    attach_lora(pipe.denoiser, rank=4, alpha=4, target_modules=TARGETS, seed=0)
    np.testing.assert_array_equal(sample_trajectories(pipe, ["a cat"], [0], SAMPLE).media.images, before)
    trainable = [n for n, p in pipe.denoiser.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in lora_parameters(pipe.denoiser))


def test_load_state_in_place_reproduces_the_weights():
    source, target = _tiny(), _tiny()
    for pipe in (source, target):
        attach_lora(pipe.denoiser, rank=4, alpha=4, target_modules=TARGETS, seed=0)
    _perturb(source.denoiser, 1)
    params_before = [id(p) for p in lora_parameters(target.denoiser)]
    load_lora_state(target.denoiser, get_lora_state(source.denoiser))
    assert [id(p) for p in lora_parameters(target.denoiser)] == params_before  # in place
    for key, value in get_lora_state(source.denoiser).items():
        assert torch.equal(get_lora_state(target.denoiser)[key], value)


def test_saved_lora_loads_with_diffusers_load_lora_weights(tmp_path):
    """save -> StableDiffusionPipeline.load_lora_weights -> identical images."""
    trained = _tiny()
    trained.pipe.save_pretrained(tmp_path / "base")
    attach_lora(trained.denoiser, rank=4, alpha=8, target_modules=TARGETS, seed=0)
    _perturb(trained.denoiser, 2)
    save_lora(trained, tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    fresh = load_pipeline(str(tmp_path / "base"))  # the real from_pretrained path
    plain = sample_trajectories(fresh, ["a cat", "a dog"], [3, 4], SAMPLE).media.images
    fresh.pipe.load_lora_weights(str(tmp_path / "lora"))
    expected = sample_trajectories(trained, ["a cat", "a dog"], [3, 4], SAMPLE).media.images
    loaded = sample_trajectories(fresh, ["a cat", "a dog"], [3, 4], SAMPLE).media.images
    assert not np.array_equal(plain, expected)  # the LoRA changes the images...
    np.testing.assert_array_equal(loaded, expected)  # ...and loads back exactly
