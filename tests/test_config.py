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
    (["sample.ddim.eta=0"], "sample.ddim.eta: must be > 0"),
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
    (["sample.flow.sde_window=6", "sample.flow.sde_window_range=[0, 5]"],
     "sample.flow.sde_window: a window of 6 steps does not fit in sample.flow.sde_window_range [0, 5]"),
    (["sample.flow.sde_window=11", "sample.flow.sde_window_range=[0, 10]"],
     "sample.flow.sde_window: a window of 11 steps does not fit in sample.flow.sde_window_range [0, 10]"),
    (["sample.flow.sde_window=2", "sample.flow.sde_window_range=[0, 12]"],
     "sample.flow.sde_window_range: must satisfy 0 <= first < end <= sample.num_steps (10), got [0, 12]"),
    (["sample.flow.sde_window=2", "sample.flow.sde_window_range=[5, 5]"],
     "sample.flow.sde_window_range: must satisfy 0 <= first < end <= sample.num_steps (10), got [5, 5]"),
    (["sample.flow.sde_window=2", "sample.flow.sde_window_range=[0]"], "sample.flow.sde_window_range: expected [first, end), got [0]"),
    (["sample.flow.sde_window=-1"], "sample.flow.sde_window: must be >= 0"),
    (["sample.flow.sde_window=2", "sample.flow.sde_window_shift=0"], "sample.flow.sde_window_shift: must be >= 1"),
    (["sample.flow.sde_window=2", "sample.flow.sde_window_interval=0"], "sample.flow.sde_window_interval: must be >= 1"),
    (["sample.flow.sde_window_schedule=fixed"], "sample.flow.sde_window_schedule: must be one of ['random', 'sliding']"),
    (["sample.flow.sde_type=cps"], "sample.flow.sde_type: cps has no noise at the last step"),  # every step: the last too
    (["sample.flow.sde_type=cps", "sample.flow.sde_window=2", "sample.flow.sde_window_range=[5, 10]"],
     "sample.flow.sde_type: cps has no noise at the last step"),
    (["train.algorithm=rwr", "sample.flow.sde_window=2"], "sample.flow.sde_window: rwr trains on the final image x_0"),
    (NFT + ["sample.flow.sde_window=2"], "sample.flow.sde_window: diffusion_nft samples by the plain ODE"),
    (NFT + ["sample.guidance_scale=4.5"], "sample.guidance_scale: diffusion_nft is CFG-free"),
    (NFT + ["sample.flow.sde_type=cps"], "sample.flow.sde_type: diffusion_nft samples by the plain ODE, with no SDE step"),
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
    config = load_config(None, FLOW + ["sample.flow.sde_type=cps", "sample.flow.sde_window=3", "sample.flow.sde_window_range=[0, 9]"])
    assert config.sample.stored_steps == 3
    assert load_config(None, FLOW + ["sample.flow.sde_window=10", "sample.flow.sde_window_range=[0, 10]"]).sample.stored_steps == 10
    assert load_config(None, FLOW + NFT).train.algorithm == "diffusion_nft"
    # without a window the range is unused: a schedule shorter than its default [0, 5) loads
    assert load_config(None, ["sample.num_steps=3"]).sample.stored_steps == 3


@pytest.mark.parametrize("pretrained, family", [("builtin:tiny", "StableDiffusion"), ("builtin:digits", "StableDiffusion")])
def test_ddim_families_refuse_flow_settings_naming_the_field(pretrained, family):
    from ddpo.pipeline import check_family_settings

    base = [f"model.pretrained={pretrained}", "sample.num_steps=10", "sample.guidance_scale=1"]
    check_family_settings(load_config(None, base))  # DDPO's settings: accepted
    for override, field in ((["sample.flow.sde_window=2"], "sample.flow.sde_window"),
                            (["sample.flow.noise_level=0.9"], "sample.flow.noise_level"), (NFT, "train.algorithm")):
        with pytest.raises(ConfigError) as info:
            check_family_settings(load_config(None, base + override))
        message = str(info.value)
        assert message.startswith(f"{field}: ") and f"'{pretrained}' is a {family} model" in message, message
        assert "\n" not in message
    cps = load_config(None, base)
    cps.sample.flow.sde_type = "cps"  # no window (which the validation refuses for cps) to be refused first
    with pytest.raises(ConfigError, match=r"^sample\.flow\.sde_type: StableDiffusion steps with DDIM \(sample\.ddim\) "
                                          r"and reads no sample\.flow setting; remove it \(model\.pretrained '"
                                          + pretrained + "' is a StableDiffusion model\\)$"):
        check_family_settings(cps)


def test_the_flow_family_takes_windows_cps_and_nft_and_refuses_ddim_settings():
    from ddpo.pipeline import check_family_settings

    for override in (["sample.flow.sde_window=2"], ["sample.flow.sde_type=cps", "sample.flow.sde_window=2"], NFT):
        check_family_settings(load_config(None, FLOW + override))
    with pytest.raises(ConfigError, match=r"^sample\.ddim\.eta: StableDiffusion3 steps with the flow SDE "
                                          r"\(sample\.flow\) and reads no sample\.ddim setting; remove it "
                                          r"\(model\.pretrained 'builtin:digits-flow' is a StableDiffusion3 model\)$"):
        check_family_settings(load_config(None, FLOW + ["sample.ddim.eta=0.5"]))


@pytest.mark.parametrize("pretrained, multiple", [("builtin:tiny", 8), ("builtin:digits", 8), ("builtin:digits-flow", 2)])
def test_the_image_size_is_a_multiple_of_the_familys(pretrained, multiple):
    """The family's size rule from the model's own configs, before it loads: SD's pipeline's 8;
    SD3's VAE scale x patch size (digits-flow: a 2x VAE and 1x1 patches, 2)."""
    from ddpo.pipeline import check_family_settings

    base = [f"model.pretrained={pretrained}", "sample.guidance_scale=1"]
    check_family_settings(load_config(None, base + [f"sample.height={2 * multiple}", f"sample.width={3 * multiple}"]))
    with pytest.raises(ConfigError, match=rf"^sample\.width: must be a multiple of {multiple} for \w+ \(.*\), "
                                          rf"got {multiple + 1} \(model\.pretrained '{pretrained}' is a \w+ model\)$"):
        check_family_settings(load_config(None, base + [f"sample.width={multiple + 1}"]))
    with pytest.raises(ConfigError, match=r"^sample\.height/sample\.width: must be positive"):
        load_config(None, base + ["sample.height=0"])


@pytest.mark.parametrize("repo, multiple", [("stable-diffusion-v1-5--stable-diffusion-v1-5", 8),
                                            ("stabilityai--stable-diffusion-xl-base-1.0", 8),
                                            ("stabilityai--stable-diffusion-3.5-medium", 16),
                                            ("black-forest-labs--FLUX.1-dev", 16), ("Qwen--Qwen-Image", 16)])
def test_the_published_models_size_rules(repo, multiple):
    """On the published models' configs (shipped in ddpo/assets/model_configs), each family's rule
    is its pipeline's check: SD and SDXL height % 8; SD3 the VAE's 8 x patch_size 2; FLUX and
    Qwen-Image the VAE's 8 x 2 for their 2x2 packing."""
    from ddpo.families import family_named
    from ddpo.memory import MODEL_CONFIGS
    from ddpo.pipeline import component_config, model_index

    folder = str(MODEL_CONFIGS / repo)
    family = family_named(model_index(folder)["_class_name"])
    assert family.size_multiple(lambda name: component_config(folder, name)) == multiple


# -- keys of the last release, read for one more ---------------------------------------------------

OLD_AND_NEW = [("sample.eta=0.5", "sample.ddim.eta", 0.5), ("sample.noise_level=0.9", "sample.flow.noise_level", 0.9),
               ("sample.sde_type=cps", "sample.flow.sde_type", "cps"), ("sample.sde_window=2", "sample.flow.sde_window", 2),
               ("sample.sde_window_schedule=sliding", "sample.flow.sde_window_schedule", "sliding"),
               ("sample.sde_window_range=[1, 9]", "sample.flow.sde_window_range", [1, 9]),
               ("sample.sde_window_shift=2", "sample.flow.sde_window_shift", 2),
               ("sample.sde_window_interval=3", "sample.flow.sde_window_interval", 3)]


def _value(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize("old, new, value", OLD_AND_NEW, ids=[old.split("=")[0] for old, _, _ in OLD_AND_NEW])
def test_an_old_key_in_set_is_read_with_one_warning_naming_the_new(old, new, value):
    window = ["sample.flow.sde_window=2"] if old.startswith("sample.sde_type") else []  # cps needs a window
    with pytest.warns(FutureWarning) as warned:
        config = load_config(None, ["sample.num_steps=10", *window, old])
    assert _value(config, new) == value
    assert [str(w.message) for w in warned] == [
        f"{old.split('=')[0]} is deprecated: use {new} (the old key goes in the next release; found in --set)"]


def test_old_keys_in_a_file_and_a_resumed_runs_config_are_read(tmp_path):
    """A config file of the last release (a resumed run's config.yaml too: it is loaded the same
    way) loads as its new-key twin, one warning a moved key."""
    old = tmp_path / "old.yaml"
    old.write_text("sample:\n  num_steps: 10\n  eta: 0.5\n  noise_level: 0.9\n  sde_window: 2\n"
                   "  sde_window_range: [1, 9]\n")
    new = tmp_path / "new.yaml"
    new.write_text("sample:\n  num_steps: 10\n  ddim:\n    eta: 0.5\n  flow:\n    noise_level: 0.9\n"
                   "    sde_window: 2\n    sde_window_range: [1, 9]\n")
    with pytest.warns(FutureWarning) as warned:
        config = load_config(old)
    assert config == load_config(new)
    assert sorted(str(w.message).split(" is deprecated")[0] for w in warned) == [
        "sample.eta", "sample.noise_level", "sample.sde_window", "sample.sde_window_range"]
    assert all(f"found in '{old}'" in str(w.message) for w in warned)
    # --set overrides the file whichever of the two names each uses
    with pytest.warns(FutureWarning):
        assert load_config(old, ["sample.ddim.eta=0.25"]).sample.ddim.eta == 0.25
        assert load_config(new, ["sample.eta=0.25"]).sample.ddim.eta == 0.25


def test_an_old_and_a_new_key_of_one_setting_together_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["sample.eta=0.5", "sample.ddim.eta=0.5"])
    assert str(info.value) == ("sample.eta: the old name of sample.ddim.eta, which --set sets too; "
                               "keep sample.ddim.eta alone")
    both = tmp_path / "both.yaml"
    both.write_text("sample:\n  noise_level: 0.9\n  flow:\n    noise_level: 0.8\n")
    with pytest.raises(ConfigError, match=r"^sample\.noise_level: the old name of sample\.flow\.noise_level, which "
                                          r"'.*both\.yaml' sets too; keep sample\.flow\.noise_level alone$"):
        load_config(both)


def test_the_shipped_configs_use_the_new_keys():
    import warnings

    from cluster.cli import embedded_config

    for path in sorted(embedded_config().parent.glob("*.yaml")):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            load_config(path)
