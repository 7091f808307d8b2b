"""After a run: `ddpo sample` and `ddpo export` on a tiny run directory made by hand (a real
checkpoint of a Learner whose LoRA was perturbed, so the LoRA changes the images)."""

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

from cluster.cli import main
from cluster.workflow import model_card, sample_seed
from ddpo.config import Config, save_config
from ddpo.rollout import sample_trajectories
from ddpo.pipeline import build_tiny_pipeline
from tests.conftest import tiny_config
from tests.float_error import U32, U64

PROMPTS = ["a red cat", "a blue dog"]
NUM = 2  # images per prompt


class Run(NamedTuple):
    run_dir: Path
    config: Config
    trained: np.ndarray  # the learner's images, all in one batch
    one_by_one: np.ndarray  # ... and one image a call
    lora: dict[str, tuple]  # LoRA layer -> its base weight W, A, B and scale s, float64


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run of a tiny pipeline saved as a folder, with the checkpoint epoch_0002 (3 epochs
    trained) of a learner whose LoRA is random, and eval.json; the learner's images and LoRA."""
    from learner import Learner

    root = tmp_path_factory.mktemp("workflow")
    build_tiny_pipeline(seed=0).save_pretrained(root / "base")
    config = tiny_config(root, **{"run_name": "tiny", "model.pretrained": str(root / "base"),
                                  "model.device": "cpu", "prompts.prompts": json.dumps(PROMPTS)})
    assert config.sample.batch_size == len(PROMPTS) * NUM  # `ddpo sample` samples them in one batch
    run_dir = root / "tiny"
    (run_dir / "checkpoints").mkdir(parents=True)
    save_config(config, run_dir / "config.yaml")
    learner = Learner(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in learner.model.denoiser.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    learner.policy_version = 3
    learner.save_checkpoint(run_dir / "checkpoints")
    (run_dir / "eval.json").write_text(json.dumps({"before": {"reward_mean": 0.25, "reward_std": 0.1},
                                                   "after": {"reward_mean": 0.75, "reward_std": 0.1}}))
    prompts = [p for p in PROMPTS for _ in range(NUM)]
    seeds = [sample_seed(0, i) for _ in PROMPTS for i in range(NUM)]
    trained = sample_trajectories(learner.model, prompts, seeds, config.sample).media.images
    one_by_one = np.concatenate([sample_trajectories(learner.model, [prompt], [seed], config.sample).media.images
                                 for prompt, seed in zip(prompts, seeds)])
    lora = {name: (module.base_layer.weight.detach().double().numpy(),
                   module.lora_A["default"].weight.detach().double().numpy(),
                   module.lora_B["default"].weight.detach().double().numpy(), module.scaling["default"])
            for name, module in learner.model.denoiser.named_modules() if "default" in getattr(module, "lora_A", {})}
    return Run(run_dir, config, trained, one_by_one, lora)


def _pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))}


def _images(folder: Path) -> np.ndarray:
    """The per-image PNGs in sampling order (prompt by prompt, i within)."""
    return np.stack([np.asarray(Image.open(folder / f"{stem}_{i}.png").convert("RGB"))
                     for stem in ["a-red-cat", "a-blue-dog"] for i in range(NUM)])


def test_sample_is_the_checkpoints_lora_and_repeats(run, tmp_path, capsys):
    run_dir, trained = run.run_dir, run.trained
    assert main(["sample", str(run_dir), "--num-per-prompt", str(NUM)]) == 0
    out = run_dir / "samples_epoch_0002"  # the default: the latest checkpoint
    printed = capsys.readouterr().out
    assert f"4 samples (checkpoint epoch_0002, 3 epochs trained): {out}; grid: {out / 'grid.png'}" in printed
    first = _pngs(out)
    assert sorted(first) == ["a-blue-dog_0.png", "a-blue-dog_1.png", "a-red-cat_0.png", "a-red-cat_1.png", "grid.png"]
    np.testing.assert_array_equal(_images(out), trained)  # the learner's own LoRA, bit for bit
    # the same command again: the same files
    assert main(["sample", str(run_dir), "--checkpoint", "epoch_0002", "--num-per-prompt", str(NUM)]) == 0
    second = _pngs(out)
    for name in first:
        np.testing.assert_array_equal(second[name], first[name], err_msg=name)
    # in batches of one: the learner's images sampled one a call, bit for bit (the same kernels on
    # the same shapes); the batch of 4 rounds otherwise
    assert main(["sample", str(run_dir), "--num-per-prompt", str(NUM), "--out", str(tmp_path / "ones"),
                 "--batch-size", "1"]) == 0
    np.testing.assert_array_equal(_images(tmp_path / "ones"), run.one_by_one)


def test_sample_base_differs_and_prompts_and_seed_choose_the_images(run, tmp_path):
    run_dir, config, trained = run.run_dir, run.config, run.trained
    assert main(["sample", str(run_dir), "--base", "--num-per-prompt", str(NUM)]) == 0
    base = _images(run_dir / "samples_base")
    # the LoRA changes the images: both sides are matched bit for bit (here and in the test above),
    # so any difference is the LoRA's
    assert not np.array_equal(base, trained)
    base_model = build_tiny_pipeline(seed=0)
    from ddpo.families import family_of

    prompts = [p for p in PROMPTS for _ in range(NUM)]
    seeds = [sample_seed(0, i) for _ in PROMPTS for i in range(NUM)]
    expected = sample_trajectories(family_of(base_model), prompts, seeds, config.sample).media.images
    np.testing.assert_array_equal(base, expected)
    # one prompt of the list on its own (its batch padded to the full size): the same images as
    # in the list, bit for bit; another seed: others
    assert main(["sample", str(run_dir), "--prompt", "a blue dog", "--num-per-prompt", "1",
                 "--out", str(tmp_path / "dog")]) == 0
    np.testing.assert_array_equal(_pngs(tmp_path / "dog")["a-blue-dog_0.png"], trained[NUM])
    assert main(["sample", str(run_dir), "--prompt", "a blue dog", "--num-per-prompt", "1", "--seed", "1",
                 "--out", str(tmp_path / "dog1")]) == 0
    assert not np.array_equal(_pngs(tmp_path / "dog1")["a-blue-dog_0.png"], trained[NUM])
    grid = Image.open(tmp_path / "dog1" / "grid.png")
    assert grid.size == (128, 16 + 128 + 36)  # one captioned cell under a title


def test_eval_scores_the_checkpoints_images_with_the_runs_reward_on_ray(run, ray_session, tmp_path, capsys):
    from rewards.jpeg import jpeg_size_kb

    run_dir, trained = run.run_dir, run.trained
    assert main(["eval", str(run_dir), "--num-per-prompt", str(NUM)]) == 0
    report = json.loads((run_dir / "eval_epoch_0002.json").read_text())
    # the images `ddpo sample` draws with the same seeds, scored by the run's reward: -JPEG kB
    rewards = -np.array([jpeg_size_kb(image) for image in trained], dtype=np.float32).astype(np.float64)
    assert report["checkpoint"] == "epoch_0002" and report["epochs_trained"] == 3
    assert report["reward"] == "jpeg_compressibility" and report["n"] == len(trained)
    # a few float32 values of one size sum exactly in float64 (24-bit significands), in any order:
    # the means are exact, and so are their printed digits below
    assert report["reward_mean"] == rewards.mean() and report["jpeg_kb_mean"] == -rewards.mean()
    assert report["reward_stderr"] == pytest.approx(_stderr(rewards), **_stderr_tolerance(rewards))
    assert list(report["per_prompt"]) == PROMPTS
    for k, prompt in enumerate(PROMPTS):
        mine = rewards[k * NUM:(k + 1) * NUM]
        row = report["per_prompt"][prompt]
        assert row["n"] == NUM and row["reward_mean"] == mine.mean()
        assert row["reward_stderr"] == pytest.approx(_stderr(mine), **_stderr_tolerance(mine))
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"  a red cat   {rewards[:NUM].mean():.4f} ± ")
    assert printed[-1].startswith(f"checkpoint epoch_0002 (3 epochs trained), reward jpeg_compressibility: "
                                  f"{rewards.mean():.4f} ± {report['reward_stderr']:.4f} (mean ± standard error, n=4")
    assert printed[-1].endswith(str(run_dir / "eval_epoch_0002.json"))
    # the base model, another reward through --set, a file of one's own
    out = tmp_path / "base.json"
    assert main(["eval", str(run_dir), "--base", "--num-per-prompt", str(NUM), "--out", str(out),
                 "--set", "reward.name=jpeg_incompressibility"]) == 0
    base = json.loads(out.read_text())
    assert base["checkpoint"] is None and base["reward"] == "jpeg_incompressibility"
    # the means are exact (above): other images' sizes give another mean
    assert base["reward_mean"] > 0 and base["reward_mean"] != -report["reward_mean"]
    # a held-out reward (the guard's) is scored beside the trained one: x2 is exact in float32
    out = tmp_path / "heldout.json"
    assert main(["eval", str(run_dir), "--num-per-prompt", str(NUM), "--out", str(out),
                 "--set", "reward.heldout=[{name: jpeg_incompressibility, weight: 2.0}]"]) == 0
    heldout = json.loads(out.read_text())
    assert heldout["reward_mean"] == report["reward_mean"] and heldout["heldout_reward_mean"] == -2 * rewards.mean()


def _stderr(values: np.ndarray) -> float:
    return values.std(ddof=1) / np.sqrt(len(values))


def _stderr_tolerance(values: np.ndarray) -> dict[str, float]:
    """s / √n from n float64 values, twice (the report's and this test's), each within
    ((n + 3)/2 + 3)·u of it: the deviations and their squares (no cancellation), the n-term sum,
    the division, the roots; the mean's own error, n·u of mean|r|, moves the deviations."""
    n = len(values)
    return {"rel": (n + 9) * U64, "abs": 2 * n * U64 * np.abs(values).mean()}


def _sample_pipeline(pipe, config) -> np.ndarray:
    from ddpo.families import family_of

    model = family_of(pipe)
    prompts = [p for p in PROMPTS for _ in range(NUM)]
    seeds = [sample_seed(0, i) for _ in PROMPTS for i in range(NUM)]
    return sample_trajectories(model, prompts, seeds, config.sample).media.images


def test_export_lora_loads_into_the_base_with_diffusers(run, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    run_dir, config, trained = run.run_dir, run.config, run.trained
    out = tmp_path / "lora"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"exported the LoRA of epoch_0002 (3 epochs trained) to {out}")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "pytorch_lora_weights.safetensors"]
    pipe = StableDiffusionPipeline.from_pretrained(config.model.pretrained)
    pipe.load_lora_weights(str(out))
    np.testing.assert_array_equal(_sample_pipeline(pipe, config), trained)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\ntags:\n- lora\n- ddpo\n")
    for text in [f"**Base model**: `{config.model.pretrained}`", "**Reward**: `jpeg_compressibility`",
                 "**Epochs trained**: 3", "`train.algorithm: ddpo_is`", "| reward_mean | 0.2500 | 0.7500 |",
                 f'pipe = StableDiffusionPipeline.from_pretrained("{config.model.pretrained}", dtype=torch.float32)',
                 f'pipe.load_lora_weights("{out.resolve()}")', "```yaml\nrun_name: tiny\n"]:
        assert text in card, text


def test_export_merged_loads_as_a_plain_pipeline(run, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "merged"
    assert main(["export", str(run.run_dir), "--out", str(out), "--merge"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(out))  # no dtype argument: saved in float32
    base = StableDiffusionPipeline.from_pretrained(run.config.model.pretrained)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32
    merged, base_weights = ({f"{name}.{key}": value for name in ("unet", "text_encoder", "vae")
                             for key, value in getattr(p, name).state_dict().items()} for p in (pipe, base))
    assert not any("lora" in key for key in merged)  # fused, not an adapter
    for name, (weight, lora_a, lora_b, scale) in run.lora.items():
        fused, n = merged.pop(f"unet.{name}.weight").double().numpy(), lora_a.shape[0] + 2
        # float32 W + s·B A: the rank-r sums, the scaling and the sum, within γ_{r+2} of |W| + s|B||A|
        bound = n * U32 / (1 - n * U32) * (np.abs(weight) + scale * np.abs(lora_b) @ np.abs(lora_a))
        assert np.all(np.abs(fused - (weight + scale * lora_b @ lora_a)) <= bound), name
    for key, value in merged.items():  # the rest is the base's, saved and loaded in float32: bit for bit
        assert torch.equal(value, base_weights[key]), key
    # it samples the LoRA's images, not the base's: nearer the learner's than the base pipeline's
    merged_images = _sample_pipeline(pipe, run.config).astype(int)
    base_images = _sample_pipeline(base, run.config).astype(int)
    assert np.abs(merged_images - run.trained).mean() < np.abs(merged_images - base_images).mean()
    card = (out / "README.md").read_text()
    assert "fused into its weights (float32)" in card and "- lora\n" not in card
    assert f'pipe = StableDiffusionPipeline.from_pretrained("{out.resolve()}")' in card


def test_model_card_names_a_builtin_base():
    config = tiny_config(None, **{"model.pretrained": "builtin:digits", "reward.name": "digit_judge"})
    card = model_card(config, "seed: 0\n", "epoch_0009", 10, None, False, Path("/x/out"), "StableDiffusionPipeline", [])
    assert "`builtin:digits`: the diffusers folder embedded in ddpo-ray, `ddpo/assets/digits`" in card
    assert "base_model" not in card.split("---")[1]  # not a hub id
    tiny = model_card(tiny_config(None), "seed: 0\n", "epoch_0000", 1, None, False, Path("/x/out"),
                      "StableDiffusionPipeline", [])
    assert "pipe = build_tiny_pipeline(seed=0)" in tiny
    hub = model_card(tiny_config(None, **{"model.pretrained": "org/sd", "model.dtype": "bfloat16"}), "seed: 0\n",
                     "epoch_0000", 1, None, False, Path("/x/out"), "StableDiffusionPipeline", [])
    assert "\nbase_model: org/sd\n" in hub.split("---")[1]
    assert 'StableDiffusionPipeline.from_pretrained("org/sd", dtype=torch.bfloat16)' in hub


@pytest.mark.parametrize("args, message", [
    (["sample", "{root}"], "'{root}' is not a run directory (no config.yaml there)"),
    (["export", "{root}", "--out", "{root}/x"], "'{root}' is not a run directory (no config.yaml there)"),
    (["sample", "{empty}"], "'{empty}' has no checkpoint (no checkpoints/epoch_NNNN/pytorch_lora_weights"
                            ".safetensors); --base uses the base model"),
    (["export", "{empty}", "--out", "{root}/x"], "'{empty}' has no checkpoint"),
    (["sample", "{run}", "--checkpoint", "epoch_0099"],
     "--checkpoint: no checkpoint 'epoch_0099' in '{run}/checkpoints' (there: epoch_0002)"),
    (["export", "{run}", "--checkpoint", "epoch_7", "--out", "{root}/x"],
     "--checkpoint: no checkpoint 'epoch_7' in '{run}/checkpoints' (there: epoch_0002)"),
    (["sample", "{run}", "--base", "--checkpoint", "epoch_0002"],
     "--base uses the base model without the LoRA; drop --checkpoint"),
    (["eval", "{run}", "--base", "--checkpoint", "epoch_0002"],
     "--base uses the base model without the LoRA; drop --checkpoint"),
    (["eval", "{empty}"], "'{empty}' has no checkpoint"),
    (["eval", "{run}", "--num-per-prompt", "-1"], "--num-per-prompt: must be >= 1, got -1"),
    (["eval", "{run}", "--out", "{run}"], "--out: '{run}' is a folder; name a .json file"),
    (["eval", "{run}", "--out", "{root}/x/eval.json"], "--out: the folder '{root}/x' does not exist"),
    (["eval", "{run}", "--set", "reward.name=no_such_reward"], "reward.name: unknown reward 'no_such_reward'"),
    (["sample", "{run}", "--num-per-prompt", "0"], "--num-per-prompt: must be >= 1, got 0"),
    (["sample", "{run}", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    (["export", "{run}", "--out", "{run}"], "--out: '{run}' exists and is not empty; name a new folder"),
    (["export", "{run}", "--out", "{root}/x", "--dtype", "float16"], "--device/--dtype: only with --merge"),
    (["sample", "{run}", "--set", "sample.num_steps=0"], "sample.num_steps: must be >= 1"),
])
def test_user_errors_are_one_line(run, tmp_path, capsys, args, message):
    run_dir = run[0]
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    names = {"root": tmp_path, "empty": empty, "run": run_dir}
    assert main([a.format(**names) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpo: error: " + message.format(**names)), err
    assert "\n" not in err
    assert not (tmp_path / "x").exists()
