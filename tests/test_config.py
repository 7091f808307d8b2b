"""Config loading, overrides and validation: each mistake is one line naming the field."""

import pytest

from ddpo.config import ConfigError, load_config
from cluster.cli import embedded_config


def test_defaults_and_overrides():
    config = load_config(None, ["train.learning_rate=1e-3", "sample.num_steps=7", "train.algorithm=rwr",
                                "lora.target_modules=[to_q, to_v]"])
    assert config.train.learning_rate == 1e-3
    assert config.sample.num_steps == 7
    assert config.train.algorithm == "rwr"
    assert config.lora.target_modules == ["to_q", "to_v"]


def test_embedded_default_config_loads():
    config = load_config(embedded_config())
    assert config.model.pretrained == "builtin:digits"
    assert config.reward.name == "digit_judge"


def test_yaml_file_then_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 3e-4\n  clip_range: 1.0e-4\nnum_epochs: 3\n")
    config = load_config(path, ["num_epochs=5"])
    assert config.train.learning_rate == 3e-4 and config.num_epochs == 5


@pytest.mark.parametrize("override, message", [
    (["train.learning_rat=1"], "train.learning_rat: unknown config key (did you mean 'train.learning_rate'?)"),
    (["train.algorithm=ppo"], "train.algorithm: must be one of ['ddpo_is', 'ddpo_sf', 'rwr'], got 'ppo'"),
    (["sample.num_steps=ten"], "sample.num_steps: expected an integer, got 'ten'"),
    (["sample.eta=0"], "sample.eta: must be > 0"),
    (["train.timestep_fraction=1.5"], "train.timestep_fraction: must be in (0, 1]"),
    (["train.batch_size=5"], "train.batch_size: must divide the samples per epoch"),
    (["prompts.prompts=[]"], "prompts.prompts: the prompt list is empty"),
    (["advantage.min_count=100"], "advantage.min_count: must be between 1 and advantage.buffer_size"),
    (["sample"], "--set sample: expected key=value"),
    (["reward.weighted=[{weight: 2}]"], "reward.weighted[0].name: required"),
    (["reward.weighted=[{name: aesthetic, wieght: 2}]"], "reward.weighted[0].wieght: unknown config key"),
    (["reward.timeout_s=0"], "reward.timeout_s: must be > 0"),
    (["reward.max_batch_images=0"], "reward.max_batch_images: must be >= 1"),
    (["eval_images=-1"], "eval_images: must be >= 0"),
])
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="^--config: no such file"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML line"):
        load_config(broken)
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    config = load_config(None, [f"prompts.file={empty}"])
    with pytest.raises(ConfigError, match="^prompts.file: .* holds no prompts"):
        config.load_prompts()
