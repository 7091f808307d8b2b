"""`ddpo sample`, `ddpo eval` and `ddpo export` on runs of the flow-matching methods whose
trajectories are not Flow-GRPO's full ones: DiffusionNFT (the samplers run the ODE and store the
final latent alone, no log-probs; the learner holds a second, old-policy adapter) and
Flow-GRPO-Fast with CPS (a window of 2 stochastic steps in the ODE). Each run is a real one of
builtin:digits-flow, 2 epochs trained in this process (`cluster.inprocess`), in about 2 s."""

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cluster.cli import main
from cluster.inprocess import InProcessRun
from cluster.run_dir import make_run_dir
from cluster.workflow import LORA_FILE, sample_seed
from ddpo.config import Config, load_config
from ddpo.rollout import sample_trajectories
from ddpo.media import Media
from ddpo.pipeline import BUILTIN_FOLDERS
from ddpo.plan import sde_steps

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a handwritten digit one", "a handwritten digit seven"]
NUM = 2  # images per prompt
TINY = {"num_epochs": 2, "sample.num_steps": 4, "sample.batch_size": 4, "sample.num_batches_per_epoch": 2,
        "train.batch_size": 4, "advantage.group_size": 4, "train.learning_rate": 1e-2, "eval_images": 0,
        "cluster.num_samplers": 1, "cluster.num_learners": 1, "prompts.prompts": json.dumps(PROMPTS)}
METHODS = {  # name: (config, overrides)
    "diffusion_nft": ("digits_flow_nft.yaml", {}),
    "cps_window": ("digits_flow_cps.yaml", {"sample.flow.sde_window": 2, "sample.flow.sde_window_range": "[0,3]"}),
}


class Run(NamedTuple):
    name: str
    run_dir: Path
    config: Config


@pytest.fixture(scope="module", params=sorted(METHODS))
def run(request, tmp_path_factory):
    """A 2-epoch run of the method, its checkpoint epoch_0001 written at the end."""
    name = request.param
    path, overrides = METHODS[name]
    settings = {**TINY, **overrides, "output_dir": tmp_path_factory.mktemp(name), "run_name": name}
    config = load_config(ROOT / "configs" / path, [f"{k}={v}" for k, v in settings.items()])
    run_dir = make_run_dir(config)
    history = InProcessRun(config, run_dir).fit()
    assert [m["policy_version"] for m in history] == [1, 2]
    return Run(name, run_dir, config)


def _pngs(folder: Path) -> np.ndarray:
    """The per-image PNGs in sampling order (prompt by prompt, i within)."""
    return np.stack([np.asarray(Image.open(folder / f"{stem}_{i}.png").convert("RGB"))
                     for stem in ["a-handwritten-digit-one", "a-handwritten-digit-seven"] for i in range(NUM)])


def _diffusers_images(pipe, config: Config) -> np.ndarray:
    """The images `ddpo sample` draws, sampled from a plain diffusers pipeline behind the family
    adapter, with the run's sampler (its SDE window, if any, at the range's first step)."""
    from ddpo.families.sd3 import StableDiffusion3

    model = StableDiffusion3(pipe, max_sequence_length=1)  # digits-flow's T5 length
    prompts = [p for p in PROMPTS for _ in range(NUM)]
    seeds = [sample_seed(0, i) for _ in PROMPTS for i in range(NUM)]
    return sample_trajectories(model, prompts, seeds, config.sample,
                               sde_steps(config, config.sample.flow.sde_window_range[0])).media.images


def _base_pipeline():
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(str(BUILTIN_FOLDERS["builtin:digits-flow"]),
                                                    text_encoder_3=None, tokenizer_3=None)


def test_the_run_stores_what_its_method_samples(run):
    """The run's own trajectories: DiffusionNFT's the final latent alone and no log-probs, the
    window's its 2 stochastic steps; and a checkpoint (DiffusionNFT's with the old policy too)."""
    import pyarrow.parquet as pq

    table = pq.read_table(next((run.run_dir / "trajectories").glob("*.parquet")))
    ckpt = run.run_dir / "checkpoints" / "epoch_0001"
    state = load_file(str(ckpt / "learner_state.safetensors"))
    if run.name == "diffusion_nft":
        assert "log_probs" not in table.column_names
        assert len(table.column("timesteps")[0].as_py()) == run.config.sample.num_steps  # the schedule
        assert any(key.startswith("old.") for key in state)
    else:
        assert len(table.column("log_probs")[0].as_py()) == 2 == len(table.column("timesteps")[0].as_py())
        assert not any(key.startswith("old.") for key in state)
    assert (ckpt / LORA_FILE).is_file()


def test_sample_draws_the_checkpoints_images_and_the_base_differs(run, tmp_path, capsys):
    run_dir = run.run_dir
    assert main(["sample", str(run_dir), "--num-per-prompt", str(NUM)]) == 0
    out = run_dir / "samples_epoch_0001"
    assert f"4 samples (checkpoint epoch_0001, 2 epochs trained): {out}" in capsys.readouterr().out
    trained = _pngs(out)
    assert trained.shape == (4, 16, 16, 3) and (out / "grid.png").is_file()
    assert trained.std() > 20  # ink on paper
    # the same command again: the same images (the ODE, or the window's noise from the seeds)
    assert main(["sample", str(run_dir), "--num-per-prompt", str(NUM), "--out", str(tmp_path / "again")]) == 0
    np.testing.assert_array_equal(_pngs(tmp_path / "again"), trained)
    # the base model: other images, the base pipeline's own
    assert main(["sample", str(run_dir), "--base", "--num-per-prompt", str(NUM)]) == 0
    base = _pngs(run_dir / "samples_base")
    assert not np.array_equal(base, trained)
    np.testing.assert_array_equal(base, _diffusers_images(_base_pipeline(), run.config))


def test_eval_scores_the_checkpoint_with_the_runs_reward_on_ray(run, ray_session, capsys):
    from rewards import compute_reward, load_reward

    run_dir = run.run_dir
    assert main(["eval", str(run_dir), "--num-per-prompt", str(NUM)]) == 0
    path = run_dir / "eval_epoch_0001.json"
    report = json.loads(path.read_text())
    assert (report["checkpoint"], report["epochs_trained"], report["reward"]) == ("epoch_0001", 2, "digit_judge")
    assert report["n"] == len(PROMPTS) * NUM and list(report["per_prompt"]) == PROMPTS
    assert all(row["n"] == NUM for row in report["per_prompt"].values())
    assert 0 <= report["correct_mean"] <= 1
    # the figures are the judge's on the images `ddpo sample` draws
    main(["sample", str(run_dir), "--num-per-prompt", str(NUM)])
    images = _pngs(run_dir / "samples_epoch_0001")
    rewards, _ = compute_reward("digit_judge", load_reward("digit_judge"), Media.from_images(images),
                                [p for p in PROMPTS for _ in range(NUM)], [{}] * len(images))
    rewards = np.asarray(rewards, dtype=np.float64)
    assert report["reward_mean"] == pytest.approx(rewards.mean(), abs=1e-6)
    for k, prompt in enumerate(PROMPTS):
        assert report["per_prompt"][prompt]["reward_mean"] == pytest.approx(rewards[k * NUM:(k + 1) * NUM].mean(),
                                                                            abs=1e-6)
    assert str(path) in capsys.readouterr().out


def test_export_lora_loads_into_the_sd3_pipeline_and_samples_the_runs_images(run, tmp_path, capsys):
    run_dir = run.run_dir
    out = tmp_path / "lora"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"exported the LoRA of epoch_0001 (2 epochs trained) to {out}")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", LORA_FILE]
    # the trained adapter alone: DiffusionNFT's old policy stays in the learner's state
    exported = load_file(str(out / LORA_FILE))
    assert not any(".old." in key for key in exported)
    if run.name == "diffusion_nft":
        state = load_file(str(run_dir / "checkpoints" / "epoch_0001" / "learner_state.safetensors"))
        old = {key.removeprefix("old."): value for key, value in state.items() if key.startswith("old.")}
        assert {f"transformer.{key}" for key in old} == set(exported)
        # the old policy trails the trained one (an EMA of it): the export is the trained one
        assert not all(torch.equal(value, exported[f"transformer.{key}"]) for key, value in old.items())

    main(["sample", str(run_dir), "--num-per-prompt", str(NUM)])
    trained = _pngs(run_dir / "samples_epoch_0001")
    pipe = _base_pipeline()
    base_images = _diffusers_images(pipe, run.config)
    pipe.load_lora_weights(str(out))
    # the learner's LoRA through diffusers' own loader: `ddpo sample`'s images, bit for bit
    np.testing.assert_array_equal(_diffusers_images(pipe, run.config), trained)
    assert not np.array_equal(base_images, trained)
    # and diffusers' own sampler (the ODE) draws other images with the LoRA than without
    kwargs = dict(num_inference_steps=4, guidance_scale=1.0, height=16, width=16, max_sequence_length=1,
                  output_type="np")
    with_lora = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.unload_lora_weights()
    without = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(with_lora - without).max() > 1 / 255

    card = (out / "README.md").read_text()
    for text in [f"`train.algorithm: {run.config.train.algorithm}`", "**Epochs trained**: 2",
                 "text_encoder_3=None, tokenizer_3=None", "pipe(prompt, max_sequence_length=1)"]:
        assert text in card, text
    sampler = ("the deterministic flow ODE (Euler)" if run.name == "diffusion_nft" else
               "a window of 2 stochastic `cps` steps (noise level 0.7) within steps [0, 3)")
    assert sampler in card
