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
    (["train.algorithm=ppo"], "train.algorithm: must be one of ['ddpo_is', 'ddpo_sf', 'rwr', 'diffusion_nft'], got 'ppo'"),
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
    (["checkpoint_every_s=-1"], "checkpoint_every_s: must be >= 0 (0 = no checkpoints by time)"),
    (["checkpoint_every_s=.inf"], "checkpoint_every_s: expected a finite number"),
    (["cluster.stop_grace_s=0"], "cluster.stop_grace_s: must be > 0"),
    (["model.max_sequence_length=0"], "model.max_sequence_length: must be >= 1 (or null: the model's own), got 0"),
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


@pytest.mark.parametrize("override, message", [
    (["train.learning_rate=nan"], "train.learning_rate: expected a finite number, got nan"),
    (["train.clip_range=inf"], "train.clip_range: expected a finite number, got inf"),
    (["sample.guidance_scale=-inf"], "sample.guidance_scale: expected a finite number, got -inf"),
    (["reward.timeout_s=.nan"], "reward.timeout_s: expected a finite number, got nan"),
    (["train.kl_coef=1" + "0" * 400], "train.kl_coef: expected a finite number, got 1000"),  # beyond the float range
    (["cluster.sampler.resources={node: .inf}"], "cluster.sampler.resources.node: expected a finite number, got inf"),
    (["cluster.learner.num_gpus=.nan"], "cluster.learner.num_gpus: expected a finite number, got nan"),
    (["reward.weighted=[{name: aesthetic, weight: .inf}]"],
     "reward.weighted[0].weight: expected a finite number, got inf"),
    # free-form values, down their dicts and lists
    (["reward.params={quality: .inf}"], "reward.params.quality: expected a finite number, got inf"),
    (["reward.params={levels: [1, 2, .nan]}"], "reward.params.levels[2]: expected a finite number, got nan"),
    (["reward.weighted=[{name: aesthetic}, {name: pickscore, params: {head: {scale: -.inf}}}]"],
     "reward.weighted[1].params.head.scale: expected a finite number, got -inf"),
])
def test_non_finite_numbers_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_non_finite_numbers_in_a_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: .NaN\nreward:\n  params:\n    margin: -.inf\n")
    with pytest.raises(ConfigError, match=r"^train\.learning_rate: expected a finite number, got nan$"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^reward\.params\.margin: expected a finite number, got -inf$"):
        load_config(path, ["train.learning_rate=1e-3"])


def test_free_form_values_stay_as_yaml_gave_them():
    # the word `nan` in a free-form value is a string (YAML's NaN is `.nan`), not a number
    config = load_config(None, ["reward.params={label: nan, scale: 2.5, steps: [1, 2]}"])
    assert config.reward.params == {"label": "nan", "scale": 2.5, "steps": [1, 2]}


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:7", "mps"])
def test_device_forms(device):
    assert load_config(None, [f"model.device={device}"]).model.device == device


@pytest.mark.parametrize("device", ["gpu0", "gpu", "CUDA", "cuda:", "cuda:x", "cuda:0:1", "cuda:-1", "tpu", "", " cpu"])
def test_bad_devices_are_one_line_errors(device):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"model.device='{device}'"])
    assert str(info.value) == f"model.device: must be auto, cpu, cuda, cuda:N or mps, got {device!r}"


def test_reward_weights():
    config = load_config(None, ["reward.weighted=[{name: aesthetic, weight: 2}, {name: jpeg_compressibility, "
                                "weight: -0.5}]"])
    assert [(t.name, t.weight) for t in config.reward.terms()] == [("aesthetic", 2.0), ("jpeg_compressibility", -0.5)]


@pytest.mark.parametrize("override, message", [
    (["reward.weighted=[{name: aesthetic}, {name: pickscore, weight: 0}]"],
     "reward.weighted[1].weight: must be nonzero (drop the term instead)"),
    (["reward.weighted=[{name: aesthetic, weight: 0.0}]"],
     "reward.weighted[0].weight: must be nonzero (drop the term instead)"),
    (["reward.weighted=[{name: aesthetic, weight: nan}]"],
     "reward.weighted[0].weight: expected a finite number, got nan"),
    (["reward.weighted=[{name: aesthetic, weight: heavy}]"],
     "reward.weighted[0].weight: expected a number, got 'heavy'"),
    (["reward.weighted=[{name: aesthetic}, {name: ''}]"], "reward.weighted[1].name: must not be empty"),
    (["reward.weighted=[{name: ' '}]"], "reward.weighted[0].name: must not be empty"),
    (["reward.name="], "reward.name: must not be empty"),
])
def test_bad_reward_terms_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    assert str(info.value) == message


@pytest.mark.parametrize("override, message", [
    (["seed=-1"], "seed: must be in [0, 2**32), got -1"),
    ([f"seed={2**32}"], f"seed: must be in [0, 2**32), got {2**32}"),
    (["lora.alpha=0"], "lora.alpha: must be > 0"),
    (["train.adam_beta1=1"], "train.adam_beta1: must be in [0, 1)"),
    (["train.adam_beta2=-0.1"], "train.adam_beta2: must be in [0, 1)"),
    (["train.adam_weight_decay=-1e-4"], "train.adam_weight_decay: must be >= 0"),
    (["train.adam_epsilon=0"], "train.adam_epsilon: must be > 0"),
    (["cluster.address=head"], "cluster.address: must be auto, ray://host:port or host:port, got 'head'"),
    (["cluster.address=http://head:8265"],
     "cluster.address: must be auto, ray://host:port or host:port, got 'http://head:8265'"),
    (["cluster.address=ray://head:0"],
     "cluster.address: must be auto, ray://host:port or host:port, got 'ray://head:0'"),
    (["cluster.address='head:99999'"], "cluster.address: must be auto, ray://host:port or host:port, got 'head:99999'"),
])
def test_more_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    assert str(info.value) == message


@pytest.mark.parametrize("address", ["auto", "ray://head-node:10001", "10.0.0.5:6379", "ray://[fd00::2]:10001",
                                     "head.example.com:6379"])
def test_address_forms(address):
    assert load_config(None, [f"cluster.address='{address}'"]).cluster.address == address


# -- SDE windows, CPS and DiffusionNFT -------------------------------------------------------------

FLOW = ["model.pretrained=builtin:digits-flow", "sample.num_steps=10", "sample.guidance_scale=1"]
NFT = ["train.algorithm=diffusion_nft"]


@pytest.mark.parametrize("override, message", [
    (["sample.sde_window=6", "sample.sde_window_range=[0, 5]"],
     "sample.sde_window: a window of 6 steps does not fit in sample.sde_window_range [0, 5]"),
    (["sample.sde_window=11", "sample.sde_window_range=[0, 10]"],
     "sample.sde_window: a window of 11 steps does not fit in sample.sde_window_range [0, 10]"),
    (["sample.sde_window=2", "sample.sde_window_range=[0, 12]"],
     "sample.sde_window_range: must satisfy 0 <= first < end <= sample.num_steps (10), got [0, 12]"),
    (["sample.sde_window=2", "sample.sde_window_range=[5, 5]"],
     "sample.sde_window_range: must satisfy 0 <= first < end <= sample.num_steps (10), got [5, 5]"),
    (["sample.sde_window=2", "sample.sde_window_range=[0]"], "sample.sde_window_range: expected [first, end), got [0]"),
    (["sample.sde_window=-1"], "sample.sde_window: must be >= 0"),
    (["sample.sde_window=2", "sample.sde_window_shift=0"], "sample.sde_window_shift: must be >= 1"),
    (["sample.sde_window=2", "sample.sde_window_interval=0"], "sample.sde_window_interval: must be >= 1"),
    (["sample.sde_window_schedule=fixed"], "sample.sde_window_schedule: must be one of ['random', 'sliding']"),
    (["sample.sde_type=cps"], "sample.sde_type: cps has no noise at the last step"),  # every step: the last too
    (["sample.sde_type=cps", "sample.sde_window=2", "sample.sde_window_range=[5, 10]"],
     "sample.sde_type: cps has no noise at the last step"),
    (["train.algorithm=rwr", "sample.sde_window=2"], "sample.sde_window: rwr trains on the final image x_0"),
    (NFT + ["sample.sde_window=2"], "sample.sde_window: diffusion_nft samples by the plain ODE"),
    (NFT + ["sample.guidance_scale=4.5"], "sample.guidance_scale: diffusion_nft is CFG-free"),
    (NFT + ["sample.sde_type=cps"], "sample.sde_type: diffusion_nft samples by the plain ODE, with no SDE step"),
    (NFT + ["train.nft_beta=0"], "train.nft_beta: must be > 0"),
    (NFT + ["train.nft_decay_rate=-0.1"], "train.nft_decay_rate: must be >= 0"),
    (NFT + ["train.nft_decay_max=1"], "train.nft_decay_max: must be in [0, 1)"),
])
def test_bad_windows_and_step_types_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, FLOW + override)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_windows_and_nft_that_fit_load():
    config = load_config(None, FLOW + ["sample.sde_type=cps", "sample.sde_window=3", "sample.sde_window_range=[0, 9]"])
    assert config.sample.stored_steps == 3
    assert load_config(None, FLOW + ["sample.sde_window=10", "sample.sde_window_range=[0, 10]"]).sample.stored_steps == 10
    assert load_config(None, FLOW + NFT).train.algorithm == "diffusion_nft"
    # without a window the range is unused: a schedule shorter than its default [0, 5) loads
    assert load_config(None, ["sample.num_steps=3"]).sample.stored_steps == 3


@pytest.mark.parametrize("pretrained, family", [("builtin:tiny", "StableDiffusion"), ("builtin:digits", "StableDiffusion")])
def test_ddim_families_refuse_flow_settings_naming_the_field(pretrained, family):
    from ddpo.pipeline import check_family_settings

    base = [f"model.pretrained={pretrained}", "sample.num_steps=10", "sample.guidance_scale=1"]
    check_family_settings(load_config(None, base))  # DDPO's settings: accepted
    for override, field in ((["sample.sde_window=2"], "sample.sde_window"), (NFT, "train.algorithm")):
        with pytest.raises(ConfigError) as info:
            check_family_settings(load_config(None, base + override))
        message = str(info.value)
        assert message.startswith(f"{field}: ") and f"'{pretrained}' is a {family} model" in message, message
        assert "\n" not in message
    cps = load_config(None, base)
    cps.sample.sde_type = "cps"  # no window (which the validation refuses for cps) to be refused first
    with pytest.raises(ConfigError, match=r"^sample\.sde_type: cps is a flow-matching step; StableDiffusion steps "
                                          r"with DDIM .*'" + pretrained + "' is a StableDiffusion model\\)$"):
        check_family_settings(cps)


def test_the_flow_family_takes_windows_cps_and_nft():
    from ddpo.pipeline import check_family_settings

    for override in (["sample.sde_window=2"], ["sample.sde_type=cps", "sample.sde_window=2"], NFT):
        check_family_settings(load_config(None, FLOW + override))
