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
    assert (s.num_steps, s.eta, s.guidance_scale, s.height, s.width) == (50, 1.0, 5.0, 512, 512)
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
