"""Every shipped config loads and validates; the Stable Diffusion ones carry the paper's numbers
and prompt sets, and lay their actors out on the 8 GPUs their headers promise."""

from pathlib import Path

import pytest

from ddpo.config import load_config
from rewards import check_reward
from tests.conftest import load_script

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ACTIVITIES = ["washing the dishes", "riding a bike", "playing chess"]
PAPER = {  # config: (reward, prompt file, number of prompts)
    "sd15_compressibility.yaml": ("jpeg_compressibility", "imagenet_animals.txt", 398),
    "sd15_incompressibility.yaml": ("jpeg_incompressibility", "imagenet_animals.txt", 398),
    "sd15_aesthetic.yaml": ("aesthetic", "simple_animals.txt", 45),
    "sd15_alignment.yaml": ("prompt_alignment", "animal_activities.txt", 135),
}


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_config_loads(path):
    config = load_config(path)
    if config.prompts.file is not None:
        assert Path(config.prompts.file).is_absolute()  # resolved against the config's folder
        assert config.load_prompts()


@pytest.mark.parametrize("name", sorted(PAPER))
def test_sd15_configs_carry_the_papers_numbers(name):
    config = load_config(CONFIGS / name)
    s, t, a, c = config.sample, config.train, config.advantage, config.cluster
    assert config.model.pretrained in ("runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert config.model.dtype == "bfloat16"
    assert config.lora.rank == 4
    assert (s.num_steps, s.ddim.eta, s.guidance_scale, s.height, s.width) == (50, 1.0, 5.0, 512, 512)
    assert s.log_prob_reduction == "mean"
    assert config.samples_per_epoch == 256
    samples_per_step = t.batch_size * t.gradient_accumulation_steps
    assert (samples_per_step, config.samples_per_epoch // samples_per_step) == (64, 4)  # 4 optimizer steps
    assert (t.algorithm, t.num_inner_epochs, t.timestep_fraction, t.cfg) == ("ddpo_is", 1, 1.0, True)
    assert (t.learning_rate, t.clip_range, t.adv_clip_max, t.max_grad_norm) == (3e-4, 1e-4, 5.0, 1.0)
    assert (a.mode, a.buffer_size, a.min_count) == ("per_prompt_buffer", 32, 16)
    assert c.max_policy_lag == 0
    assert (c.layout, c.num_learners) == ("colocated", c.num_samplers)  # tests/test_cluster_examples.py: the GPUs

    reward, prompt_file, count = PAPER[name]
    assert config.reward.name == reward
    path = Path(config.prompts.file)
    assert path.name == prompt_file
    prompts = _lines(path)
    assert len(prompts) == len(set(prompts)) == count


@pytest.mark.parametrize("name", sorted(PAPER))
def test_sd15_reward_params_fit_their_reward(name):
    config = load_config(CONFIGS / name)
    if config.reward.name == "prompt_alignment":
        pytest.importorskip("rewards.alignment")  # strict as soon as the alignment reward exists
    check_reward(config.reward.name, config.reward.params)  # no model loads


# the flow-matching recipes (their headers cite the public code): what defines each method. The
# LoRA on the public code's modules: `attn.*` leaves out SD3.5-Medium's second self-attention attn2
ATTN = [f"attn.{name}" for name in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                     "to_add_out")]
FLUX_LORA = ATTN + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]  # scripts/train_flux.py
FLOW_RECIPES = {
    "sd35_pickscore.yaml": {  # yifan123/flow_grpo config/grpo.py pickscore_sd3, scripts/train_sd3.py
        "model.pretrained": "stabilityai/stable-diffusion-3.5-medium", "sample.num_steps": 10,
        "sample.guidance_scale": 4.5, "train.cfg": True, "sample.flow.sde_window": 0, "sample.flow.sde_type": "flow_grpo",
        "sample.flow.noise_level": 0.7, "train.algorithm": "ddpo_is", "train.clip_range": 1e-4, "train.kl_coef": 0.01,
        "train.timestep_fraction": 0.99, "advantage.group_size": 24, "advantage.global_std": True,
        "lora.rank": 32, "lora.alpha": 64.0, "lora.target_modules": ATTN, "model.max_sequence_length": 128,
        "optimizer_steps": 2},
    "flux_pickscore.yaml": {  # yifan123/flow_grpo config/grpo.py pickscore_flux, scripts/train_flux.py
        "model.pretrained": "black-forest-labs/FLUX.1-dev", "sample.num_steps": 6, "sample.guidance_scale": 3.5,
        "sample.flow.sde_window": 0, "sample.flow.sde_type": "flow_grpo", "sample.flow.noise_level": 0.9,
        "train.algorithm": "ddpo_is", "train.clip_range": 1e-4, "train.kl_coef": 0.0, "train.timestep_fraction": 0.99,
        "advantage.group_size": 24, "advantage.global_std": True, "lora.rank": 64, "lora.alpha": 128.0,
        "lora.target_modules": FLUX_LORA, "model.max_sequence_length": 128, "optimizer_steps": 2},
    "sd35_nft_pickscore.yaml": {  # NVlabs/DiffusionNFT config/nft.py sd3_pickscore
        "model.pretrained": "stabilityai/stable-diffusion-3.5-medium", "sample.num_steps": 10,
        "sample.guidance_scale": 1.0, "sample.flow.sde_window": 0, "train.algorithm": "diffusion_nft",
        "train.nft_beta": 1.0, "train.nft_decay_rate": 0.001, "train.nft_decay_max": 0.5,
        "train.nft_adaptive_weight": True, "train.kl_coef": 1e-4, "train.timestep_fraction": 0.99,
        "advantage.group_size": 24, "advantage.global_std": True, "lora.rank": 32, "lora.alpha": 64.0,
        "lora.target_modules": ATTN, "model.max_sequence_length": 128, "optimizer_steps": 1},
    "sd35_fast_cps_pickscore.yaml": {  # yifan123/flow_grpo config/grpo.py pickscore_sd3_fast_nocfg
        "model.pretrained": "stabilityai/stable-diffusion-3.5-medium", "sample.num_steps": 10,
        "sample.guidance_scale": 1.0, "train.cfg": False, "sample.flow.sde_window": 3, "sample.flow.sde_window_range": [0, 5],
        "sample.flow.sde_window_schedule": "random", "sample.flow.sde_type": "cps", "sample.flow.noise_level": 0.8,
        "train.algorithm": "ddpo_is", "train.clip_range": 1e-5, "train.kl_coef": 0.0, "train.timestep_fraction": 1.0,
        "advantage.group_size": 18, "advantage.global_std": True, "lora.rank": 32, "lora.alpha": 64.0,
        "lora.target_modules": ATTN, "model.max_sequence_length": 128, "optimizer_steps": 2},
    "flux_fast_pickscore.yaml": {  # yifan123/flow_grpo config/grpo.py pickscore_flux_fast
        "model.pretrained": "black-forest-labs/FLUX.1-dev", "sample.num_steps": 6, "sample.guidance_scale": 3.5,
        "sample.flow.sde_window": 3, "sample.flow.sde_window_range": [0, 3], "sample.flow.sde_type": "cps",
        "sample.flow.noise_level": 0.8, "train.algorithm": "ddpo_is", "train.clip_range": 1e-5, "train.kl_coef": 0.0,
        "train.timestep_fraction": 1.0, "advantage.group_size": 24, "advantage.global_std": False,
        "lora.rank": 64, "lora.alpha": 128.0, "model.max_sequence_length": 128, "optimizer_steps": 2,
        "lora.target_modules": FLUX_LORA},
}


@pytest.mark.parametrize("name", sorted(FLOW_RECIPES))
def test_flow_configs_carry_the_published_recipes(name):
    from cluster.placement import Devices, resolve_layout

    config = load_config(CONFIGS / name)
    t = config.train
    steps = config.samples_per_epoch * t.num_inner_epochs // (t.batch_size * t.gradient_accumulation_steps)
    got = {key: steps if key == "optimizer_steps" else _field(config, key) for key in FLOW_RECIPES[name]}
    assert got == FLOW_RECIPES[name]
    assert (config.model.dtype, config.sample.height, config.sample.width) == ("bfloat16", 512, 512)
    assert (config.samples_per_epoch, config.advantage.mode) == (1152, "group")
    assert (t.learning_rate, t.adv_clip_max) == (3e-4, 5.0)
    assert config.load_prompts()
    # colocated on 8 GPUs: a worker (a sampler and a learner rank, one model) on each, the reward in
    # what is left
    devices = Devices.of(resolve_layout(config, {"CPU": 96.0, "GPU": 8.0}).cluster)
    workers = [names for names in devices.members if not names[0].startswith("reward")]
    assert workers == [[f"worker-{i}"] for i in range(8)] and devices.totals()["GPU"] <= 8


def _field(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def test_prompt_sets():
    imagenet = _lines(CONFIGS / "prompts" / "imagenet_animals.txt")  # ImageNet-1k classes 0-397
    assert (imagenet[0], imagenet[1], imagenet[-1]) == ("tench", "goldfish", "pufferfish")
    animals = _lines(CONFIGS / "prompts" / "simple_animals.txt")
    expected = [f"{'an' if animal[0] in 'aeiou' else 'a'} {animal} {activity}"
                for animal in animals for activity in ACTIVITIES]
    assert _lines(CONFIGS / "prompts" / "animal_activities.txt") == expected
    assert "an ant playing chess" in expected and "a cat riding a bike" in expected


def test_the_method_comparison_changes_only_what_defines_each_method():
    """bench/compare_methods.py: every method loads from the default config; DDPO-SF takes one
    optimizer step per epoch of samples; nothing else differs from the shared config."""
    bench = load_script("bench/compare_methods.py")
    shared = load_config(bench.CONFIG)
    variants = {name: load_config(bench.CONFIG, overrides) for name, overrides in bench.methods(shared).items()}
    assert list(variants) == ["DDPO-IS", "DDPO-SF", "RWR", "DDPO-IS, lag 1"]
    sf = variants["DDPO-SF"].train
    assert sf.batch_size * sf.gradient_accumulation_steps * sf.num_inner_epochs == shared.samples_per_epoch
    assert variants["DDPO-IS, lag 1"].cluster.max_policy_lag == 1
    for name, config in variants.items():
        assert config.samples_per_epoch == shared.samples_per_epoch and config.num_epochs == shared.num_epochs
        assert config.train.learning_rate == shared.train.learning_rate, name


def test_the_qwenimage_config_carries_the_published_recipe():
    """yifan123/flow_grpo config/grpo.py pickscore_qwenimage, scripts/train_qwenimage.py: 32 groups
    of 16 an epoch, 2 optimizer steps, a window of 2 SDE steps; the LoRA is the family default."""
    from ddpo.families import family_named

    config = load_config(CONFIGS / "qwenimage_pickscore.yaml")
    s, t, a = config.sample, config.train, config.advantage
    assert config.model.pretrained == "Qwen/Qwen-Image"
    assert (s.num_steps, s.guidance_scale, s.flow.noise_level, s.height, s.width) == (10, 4.0, 1.2, 512, 512)
    assert (s.flow.sde_type, s.flow.sde_window, s.flow.sde_window_range) == ("flow_grpo", 2, [0, 5])
    assert (config.samples_per_epoch, a.mode, a.group_size, a.global_std) == (512, "group", 16, True)
    assert config.samples_per_epoch // (t.batch_size * t.gradient_accumulation_steps) == 2
    assert (t.algorithm, t.learning_rate, t.clip_range, t.kl_coef, t.cfg, t.timestep_fraction) == (
        "ddpo_is", 3e-4, 1e-4, 0.0, True, 1.0)
    assert (config.lora.rank, config.lora.alpha) == (64, 128.0)
    family = family_named("QwenImagePipeline")
    assert [name.removeprefix("attn.") for name in config.lora.target_modules] == family.default_lora_targets
