"""Model families behind one seam: SD 1.x, SDXL, SD3, FLUX, Qwen-Image and Wan (video), each tiny,
saved to a temp dir and loaded through from_pretrained; each samples as its own diffusers pipeline does,
recomputes its stored log-probs, round-trips its LoRA through `load_lora_weights`, and trains
through Ray."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpo.config import DDIMConfig, FlowConfig, SampleConfig
from ddpo.rollout import sample_trajectories, step_log_prob
from ddpo.families import concat
from ddpo.lora import attach_lora, lora_parameters, save_lora
from ddpo.pipeline import ModelLoadError, build_tiny_pipeline, load_pipeline
from tests.tiny_families import BUILDERS

FAMILIES = {"sd": ("StableDiffusion", build_tiny_pipeline), "sdxl": ("StableDiffusionXL", BUILDERS["sdxl"]),
            "sd3": ("StableDiffusion3", BUILDERS["sd3"]), "flux": ("Flux", BUILDERS["flux"]),
            "qwenimage": ("QwenImage", BUILDERS["qwenimage"]), "wan": ("Wan", BUILDERS["wan"])}
SAMPLE = SampleConfig(num_steps=3, guidance_scale=3.0, height=32, width=32)
FRAMES = {"wan": 5}  # the video family's clips: 3 latent frames of the tiny VAE (2x in time)


def sample_of(name: str, **changes) -> SampleConfig:
    """The tests' sampling settings for a family: a video family's clips have FRAMES[name] frames."""
    return SampleConfig(**{**SAMPLE.__dict__, "num_frames": FRAMES.get(name, 1), **changes})
PROMPTS, SEEDS = ["a cat", "a red dog"], [5, 6]


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    for name, (_, build) in FAMILIES.items():
        build().save_pretrained(root / name)
    return {name: str(root / name) for name in FAMILIES}


@pytest.mark.parametrize("name", FAMILIES)
def test_the_family_comes_from_model_index_and_samples_as_its_pipeline(folders, name):
    """With (almost) no step noise our sampler is the pipeline's own deterministic sampler: the
    same prompts, guidance, initial noise, schedule and decoding give the same images."""
    model = load_pipeline(folders[name])
    assert type(model).__name__ == FAMILIES[name][0]
    quiet = sample_of(name, ddim=DDIMConfig(eta=1e-6), flow=FlowConfig(noise_level=1e-6))
    trajectories = sample_trajectories(model, PROMPTS, SEEDS, quiet)
    extra = {"eta": 0.0} if name in ("sd", "sdxl") else {"num_frames": FRAMES[name]} if name in FRAMES else {}
    if name == "qwenimage":  # true CFG: the negative prompt's pass, rescaled to the conditional norm
        guidance = {"true_cfg_scale": SAMPLE.guidance_scale, "negative_prompt": model.negative_prompt}
    else:
        guidance = {"guidance_scale": SAMPLE.guidance_scale}

    def pipe(output_type: str):
        out = model.pipe(PROMPTS, num_inference_steps=SAMPLE.num_steps, height=32, width=32, output_type=output_type,
                         generator=[torch.Generator().manual_seed(s) for s in SEEDS], **guidance, **extra)
        return out.frames if name in FRAMES else out.images

    # our uint8 rounding (0.5/255) and float32 differences between the two samplers, far below 1/255
    ours = trajectories.media.frames if name in FRAMES else trajectories.media.images
    assert trajectories.media.medium == model.medium and ours.shape[1:2] == (FRAMES.get(name, 32),)
    assert np.abs(ours.astype(np.float64) / 255 - pipe("np")).max() <= 1.5 / 255
    if name == "wan":  # the latents themselves, [B, C, f, h, w], as the pipeline's
        torch.testing.assert_close(trajectories.latents[:, -1], pipe("latent"), rtol=0, atol=1e-4)
    if name == "qwenimage":
        # the tiny video VAE all but hides its latents (guidance or none moves the images by about
        # 1/255): x_0 itself agrees, to the step noise left (noise_level 1e-6) and float32 rounding
        x0 = model.pipe._unpack_latents(pipe("latent"), 32, 32, model.pipe.vae_scale_factor)[:, :, 0]
        torch.testing.assert_close(trajectories.latents[:, -1], x0, rtol=0, atol=1e-4)


def test_an_unsupported_pipeline_is_one_line(tmp_path, folders):
    index = json.loads((Path(folders["sd"]) / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(ModelLoadError, match=r"^model.pretrained: '.*': 'KandinskyPipeline' pipelines are not "
                                             r"supported; the model families are \[.*'FluxPipeline'"):
        load_pipeline(str(tmp_path))


def test_a_scheduler_the_ddim_step_cannot_follow_is_refused_at_load(tmp_path, folders):
    """Dynamic thresholding (a pixel-space method) is refused when the pipeline loads, in one line."""
    shutil.copytree(folders["sd"], tmp_path / "sd")
    config = tmp_path / "sd" / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "thresholding": True}))
    with pytest.raises(ModelLoadError, match=r"^model.pretrained: '.*': scheduler thresholding: true is not "
                                             r"supported: [^\n]*$"):
        load_pipeline(str(tmp_path / "sd"))


def test_the_t5_sequence_length_is_the_configs(folders):
    """`model.max_sequence_length`: the T5 tokens of an SD3 prompt (zeros without T5, after its 77
    CLIP tokens) or a FLUX one, the pipeline's default when unset; refused in one line by a family
    that has none."""
    for name, default, clip_tokens in (("sd3", 256, 77), ("flux", 512, 0)):
        assert load_pipeline(folders[name]).max_sequence_length == default
        model = load_pipeline(folders[name], max_sequence_length=5)
        cond, _ = model.encode(PROMPTS, with_negative=False)
        assert model.max_sequence_length == 5 and cond["prompt_embeds"].shape[1] == clip_tokens + 5, name
    with pytest.raises(ModelLoadError, match=r"^model.max_sequence_length: '.*' is a StableDiffusionPipeline, "
                                             r"which has no T5 sequence length [^\n]*$"):
        load_pipeline(folders["sd"], max_sequence_length=5)


@pytest.mark.parametrize("name", FAMILIES)
def test_stored_and_recomputed_log_probs_agree(folders, name):
    """|ratio - 1| < 1e-4 for every step of every sample, all steps rescored in one batch."""
    model, sample = load_pipeline(folders[name]), sample_of(name)
    traj = sample_trajectories(model, PROMPTS, SEEDS, sample)
    n, steps = len(PROMPTS), sample.num_steps
    cond, negative = model.encode(PROMPTS * steps, with_negative=model.uses_cfg(sample.guidance_scale))
    model.set_timesteps(steps, sample.height, sample.width)
    flat = lambda x: x.transpose(0, 1).reshape(n * steps, *x.shape[2:])  # noqa: E731  [B, T, ...] -> [T*B, ...]
    with torch.no_grad():
        step = step_log_prob(model, flat(traj.latents[:, :-1]), flat(traj.latents[:, 1:]), flat(traj.timesteps),
                             cond, negative, sample)
    ratio = torch.exp(step.log_prob - flat(traj.log_probs))
    assert (ratio - 1).abs().max() < 1e-4  # the design's contract: under the paper's clip range 1e-4


def test_the_clip_length_and_size_follow_the_wan_models_own_configs(folders):
    """Wan's rules from its components' configs, before it loads: frames k * (the VAE's temporal
    scale) + 1 (the tiny VAE's 2), sizes a multiple of its spatial scale x patch (2 x 2); an image
    family refuses frames. The published UniPC scheduler is swapped for the Euler flow-matching
    one with its shift."""
    from ddpo.config import ConfigError, load_config
    from ddpo.pipeline import check_family_settings

    wan = [f"model.pretrained={folders['wan']}", "sample.height=32", "sample.width=32"]
    check_family_settings(load_config(None, wan + ["sample.num_frames=5"]))
    for override, message in ((["sample.num_frames=6"], r"sample\.num_frames: must be 2k \+ 1 for Wan .*got 6"),
                              (["sample.num_frames=5", "sample.width=34"], r"sample\.width: must be a multiple of 4 "),
                              ([f"model.pretrained={folders['sd']}", "sample.num_frames=5"],
                               r"sample\.num_frames: StableDiffusion makes images \(one frame\)")):
        with pytest.raises(ConfigError, match=rf"^{message}[^\n]*model\.pretrained '[^\n]*$"):
            check_family_settings(load_config(None, wan + override))
    scheduler = load_pipeline(folders["wan"]).scheduler
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and scheduler.config.shift == 3.0


def test_concat_pads_unequal_sequences_with_zeros():
    """Joining conditionings pads sequences with a mask (and their masks) with zeros to the
    longest; equal lengths join exactly as torch.cat; unequal ones without a mask are refused."""
    g = torch.Generator().manual_seed(0)
    short = {"prompt_embeds": torch.randn(2, 3, 4, generator=g),
             "prompt_embeds_mask": torch.ones(2, 3, dtype=torch.long), "pooled": torch.randn(2, 5, generator=g)}
    long = {"prompt_embeds": torch.randn(1, 5, 4, generator=g),
            "prompt_embeds_mask": torch.ones(1, 5, dtype=torch.long), "pooled": torch.randn(1, 5, generator=g)}
    masks = {"prompt_embeds": "prompt_embeds_mask"}
    joined = concat([short, long], masks)
    assert joined["prompt_embeds"].shape == (3, 5, 4)
    assert torch.equal(joined["prompt_embeds"][:2, :3], short["prompt_embeds"])
    assert torch.equal(joined["prompt_embeds"][:2, 3:], torch.zeros(2, 2, 4))
    assert torch.equal(joined["prompt_embeds"][2:], long["prompt_embeds"])
    assert joined["prompt_embeds_mask"].tolist() == [[1, 1, 1, 0, 0]] * 2 + [[1] * 5]
    assert torch.equal(joined["pooled"], torch.cat([short["pooled"], long["pooled"]]))
    same = concat([short, short])
    assert all(torch.equal(same[k], torch.cat([short[k], short[k]])) for k in short)
    assert concat([None, None]) is None
    with pytest.raises(ValueError, match=r"^conditioning 'prompt_embeds': shapes .* differ and no attention mask"):
        concat([short, long])  # zeros there would be attended to
    unmasked = [{"prompt_embeds": short["prompt_embeds"]}, {"prompt_embeds": long["prompt_embeds"]}]
    with pytest.raises(ValueError, match=r"its attention mask 'prompt_embeds_mask' is not in the conditioning"):
        concat(unmasked, masks)


def test_qwenimage_padding_is_never_attended(folders):
    """Qwen-Image's embeddings are as long as their batch's longest prompt: prompts encoded apart
    (the learner's chunks) and joined by `concat`, padding and all, predict with true CFG what
    each predicts alone, unpadded (float32 rounding of attention over different lengths)."""
    model = load_pipeline(folders["qwenimage"])
    prompts = ["a cat", "a small red dog riding a bike", "horse"]
    encoded = [model.encode([prompt], with_negative=True) for prompt in prompts]
    cond, negative = model.concat([e[0] for e in encoded]), model.concat([e[1] for e in encoded])
    # each prompt's tokens and the template's 5 after it, then the mask's zeros
    assert cond["prompt_embeds_mask"].sum(dim=1).tolist() == [7, 12, 6]
    timesteps = model.set_timesteps(3, 32, 32)
    latents = torch.randn(3, *model.latent_shape(32, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        joined = model.predict(latents, timesteps[1], cond, negative, 3.0)
        alone = torch.cat([model.predict(latents[i:i + 1], timesteps[1], *encoded[i], 3.0) for i in range(3)])
    torch.testing.assert_close(joined, alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_the_saved_lora_loads_with_the_pipelines_load_lora_weights(folders, name, tmp_path):
    """save -> a plain pipeline from from_pretrained -> load_lora_weights -> identical images."""
    trained = load_pipeline(folders[name])
    attach_lora(trained.denoiser, rank=4, alpha=8, target_modules=trained.default_lora_targets, seed=0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in lora_parameters(trained.denoiser):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    save_lora(trained, tmp_path)

    fresh, sample = load_pipeline(folders[name]), sample_of(name)
    plain = sample_trajectories(fresh, PROMPTS, SEEDS, sample).media.frames
    fresh.pipe.load_lora_weights(str(tmp_path))
    expected = sample_trajectories(trained, PROMPTS, SEEDS, sample).media.frames
    assert not np.array_equal(plain, expected)  # the LoRA changes the samples...
    np.testing.assert_array_equal(sample_trajectories(fresh, PROMPTS, SEEDS, sample).media.frames, expected)  # ...exactly
    # and the learner reads it back for --resume
    assert trained.read_lora(tmp_path).keys() == {k.replace(".default", "") for k, _ in
                                                  trained.denoiser.named_parameters() if "lora_" in k}


# FLUX with a window of 2 CPS steps in a 3-step ODE schedule, Qwen-Image with a window of 2
# Flow-GRPO SDE steps (its published recipe's kind of window), Wan's clips with one CPS step of 3,
# SD3 with the SDE throughout
WINDOW = {"flux": {"sample.num_steps": 3, "sample.flow.sde_window": 2, "sample.flow.sde_type": "cps",
                   "sample.flow.sde_window_range": "[0,2]"},
          "qwenimage": {"sample.num_steps": 3, "sample.flow.sde_window": 2, "sample.flow.sde_window_range": "[0,2]"},
          "wan": {"sample.num_frames": 5, "sample.num_steps": 3, "sample.flow.sde_window": 1,
                  "sample.flow.sde_type": "cps", "sample.flow.sde_window_range": "[0,2]"}}


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux", "qwenimage", "wan"])
def test_one_update_through_ray(ray_session, folders, name, tmp_path):
    from cluster.driver import Driver
    from cluster.run_dir import make_run_dir
    from tests.conftest import tiny_config

    config = tiny_config(tmp_path, **{"model.pretrained": folders[name], "num_epochs": 1, "sample.num_steps": 2,
                                      "advantage.mode": "group", "advantage.group_size": 4,
                                      "train.kl_coef": 0.04, "cluster.num_samplers": 1, "cluster.num_learners": 1,
                                      **WINDOW.get(name, {})})
    run_dir = make_run_dir(config)
    driver = Driver(config, run_dir)
    try:
        (metrics,) = driver.fit()
    finally:
        driver.shutdown()
    assert metrics["policy_version"] == 1 and metrics["num_samples"] == 8 and np.isfinite(metrics["loss"])
    if name == "wan":  # `ddpo export`: the run's LoRA loads into a plain WanPipeline and changes its clips
        from diffusers import WanPipeline

        from cluster.workflow import export_run, sample_run

        # `ddpo sample`: an MP4 per clip and the animated grid
        result = sample_run(run_dir, prompts=["a cat"], num_per_prompt=1, out=tmp_path / "samples", progress=False)
        assert [p.suffix for p in result.samples] == [".mp4"] and (tmp_path / "samples" / "grid.gif").is_file()
        export_run(run_dir, tmp_path / "export")
        assert "text-to-video" in (tmp_path / "export" / "README.md").read_text()
        pipe = WanPipeline.from_pretrained(folders[name])

        def clip():
            return pipe("a cat", num_frames=5, height=32, width=32, num_inference_steps=2, output_type="np",
                        generator=torch.Generator().manual_seed(0)).frames

        base = clip()
        pipe.load_lora_weights(str(tmp_path / "export"))
        assert clip().shape == base.shape == (1, 5, 32, 32, 3) and not np.array_equal(clip(), base)
    # two minibatches of 4, an optimizer step after each: the second is scored by a policy that has
    # left the reference (the adapter disabled), so the KL to it is positive
    assert metrics["kl_ref"] > 0
    if name != "sdxl":  # the stored log-probs (the window's, for FLUX, Qwen-Image), recomputed before the first step
        assert metrics["logprob_mismatch_max"] <= 1e-4


def test_diffusion_nft_through_ray_a_version_behind(ray_session, folders, tmp_path):
    """DiffusionNFT with the sampler one version ahead (separate devices): the second update
    trains on samples of the old policy one version before the learner's."""
    from cluster.driver import Driver
    from cluster.run_dir import make_run_dir
    from tests.conftest import tiny_config

    config = tiny_config(tmp_path, **{"model.pretrained": folders["sd3"], "train.algorithm": "diffusion_nft",
                                      "sample.guidance_scale": 1.0, "cluster.max_policy_lag": 1,
                                      "advantage.mode": "group", "advantage.group_size": 4,
                                      "cluster.num_samplers": 1, "cluster.num_learners": 1})
    driver = Driver(config, make_run_dir(config))
    try:
        history = driver.fit()
    finally:
        driver.shutdown()
    assert [m["policy_version"] for m in history] == [1, 2]
    assert all(m["num_samples"] == 8 and np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in history)
    assert [m["policy_lag_mean"] for m in history] == [0.0, 1.0]
    assert [m["nft_decay"] for m in history] == [0.002, 0.004]  # 2 optimizer steps an epoch
