"""The embedded digits model (`builtin:digits`) and its judge (`digit_judge`)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ddpo.config import SampleConfig
from ddpo.diffusion import sample_trajectories
from ddpo.pipeline import (
    BUILTIN_FOLDERS, BUILTIN_MAX_SEQUENCE_LENGTH, ModelLoadError, check_pretrained, load_pipeline,
)
from rewards import RewardError, compute_reward, load_reward
from rewards.digits import JUDGE_DIR, DigitJudge, load_heldout, prompted_digit, render_digits
from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def judge():
    return DigitJudge()


@pytest.fixture(scope="module")
def heldout():
    """The judge's held-out digits (never trained on by the judge or the model)."""
    config = json.loads((JUDGE_DIR / "config.json").read_text())
    test_x, test_y = load_heldout()
    assert len(test_y) == math.ceil(1797 * config["test_fraction"]) and set(test_y) == set(range(10))  # as sklearn splits
    assert test_x.shape == (len(test_y), 64) and test_x.max() == 16  # scikit-learn's 8x8 digits, 0..16
    return test_x, test_y, config


def test_the_embedded_model_loads_through_from_pretrained_and_samples_offline():
    assert check_pretrained("builtin:digits") == "builtin:digits"
    pipe = load_pipeline("builtin:digits")
    assert pipe.pipe.name_or_path == str(BUILTIN_FOLDERS["builtin:digits"])  # from_pretrained's folder
    assert pipe.denoiser.dtype == torch.float32
    sample = SampleConfig(num_steps=4, guidance_scale=3.0, eta=1.0, height=16, width=16)
    images = sample_trajectories(pipe, ["a handwritten digit three", ""], [0, 1], sample).images
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert images.std() > 20  # ink on paper, not a flat or noise image
    with pytest.raises(ModelLoadError, match=r"^model.pretrained: unknown 'builtin:digit'; the builtin models are"):
        check_pretrained("builtin:digit")


def test_the_embedded_flow_model_is_an_sd3_pipeline_that_loads_and_samples_offline():
    model = load_pipeline("builtin:digits-flow")
    assert type(model.pipe).__name__ == "StableDiffusion3Pipeline" and model.pipe.text_encoder_3 is None
    # the short context it was trained with (scripts/train_digits.py's flow settings): its
    # tokenizers' CLIP tokens and one zero "T5 token", not the pipeline's 77 + 256
    trained = yaml.safe_load((ROOT / "ddpo" / "assets" / "train_digits.yaml").read_text())["flow"]
    assert model.max_sequence_length == BUILTIN_MAX_SEQUENCE_LENGTH["builtin:digits-flow"] == trained["max_sequence_length"]
    assert model.pipe.tokenizer_max_length == model.pipe.tokenizer_2.model_max_length == trained["tokenizer_max_length"]
    cond, _ = model.encode(["the number 7 written by hand"], with_negative=False)
    assert cond["prompt_embeds"].shape[1] == trained["tokenizer_max_length"] + trained["max_sequence_length"]
    sample = SampleConfig(num_steps=4, guidance_scale=1.0, noise_level=0.7, height=16, width=16)
    traj = sample_trajectories(model, ["a handwritten digit three", "a handwritten digit seven"], [0, 1], sample)
    assert traj.timesteps.dtype == torch.float32 and traj.latents.shape == (2, 5, 4, 8, 8)
    assert traj.images.std() > 20  # ink on paper


def test_the_embedded_models_load_in_plain_diffusers_with_no_dtype_on_cpu():
    """As a user calls it: `<Pipeline>.from_pretrained(folder)`, no dtype argument; the weights
    are stored in float32, so every part loads in one dtype and the pipeline samples."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    for cls, name, absent in [(StableDiffusionPipeline, "builtin:digits", {}),
                              (StableDiffusion3Pipeline, "builtin:digits-flow",
                               {"text_encoder_3": None, "tokenizer_3": None})]:
        pipe = cls.from_pretrained(str(BUILTIN_FOLDERS[name]), **absent)
        parts = [pipe.vae, pipe.text_encoder, getattr(pipe, "unet", None) or pipe.transformer]
        assert {part.dtype for part in parts} == {torch.float32}, name
        extra = {"max_sequence_length": 1} if name == "builtin:digits-flow" else {}  # its trained length
        images = pipe("a handwritten digit three", num_inference_steps=2, height=16, width=16, output_type="np",
                      generator=torch.Generator().manual_seed(0), **extra).images
        assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all(), name


def test_the_embedded_model_follows_its_prompt_only_weakly():
    """The issue's contract for the base model: the judge agrees with the prompt on roughly
    30-60% of its samples (32.5% when trained), measured as scripts/train_digits.py does."""
    result = load_script("scripts/train_digits.py").judged_accuracy(BUILTIN_FOLDERS["builtin:digits"], JUDGE_DIR,
                                    ROOT / "configs" / "digits.yaml", samples_per_prompt=20)
    assert 0.25 < result["accuracy"] < 0.6, result
    assert min(result["per_prompt"].values()) >= 0.1, result  # no prompted digit below chance


def test_the_embedded_flow_model_follows_its_prompt_about_half_the_time():
    """The flow model's base accuracy, measured as scripts/train_digits.py does (0.495 when
    trained; 0.29 if sampled with the pipeline's default 256 zero "T5 tokens" it was not
    trained with)."""
    result = load_script("scripts/train_digits.py").judged_flow_accuracy(
        BUILTIN_FOLDERS["builtin:digits-flow"], JUDGE_DIR, ROOT / "configs" / "digits.yaml", samples_per_prompt=20,
        max_sequence_length=BUILTIN_MAX_SEQUENCE_LENGTH["builtin:digits-flow"])
    assert 0.35 < result["accuracy"] < 0.65, result
    assert min(result["per_prompt"].values()) >= 0.1, result  # no prompted digit below chance


def test_the_judge_is_above_95_percent_on_its_held_out_split(judge, heldout):
    test_x, test_y, config = heldout
    probs = judge.probabilities(render_digits(test_x, config["image_size"]))
    accuracy = float((probs.argmax(dim=-1).numpy() == test_y).mean())
    assert accuracy > 0.95
    # the accuracy scripts/train_digits.py recorded, to the digit: only a prediction whose top two
    # probabilities lie within float32 rounding (1e-4, far above it) of each other could flip
    # on another CPU's kernels, and the test counts those
    top_two = probs.sort(dim=-1).values[:, -2:]
    near_ties = int((top_two[:, 1] - top_two[:, 0] < 1e-4).sum())
    assert abs(accuracy - config["heldout_accuracy"]) * len(test_y) <= near_ties + 1e-9


def test_the_judge_rewards_the_prompted_digit(heldout):
    test_x, test_y, _ = heldout
    seven = test_x[np.flatnonzero(test_y == 7)[0]]
    judge = load_reward("digit_judge")
    for size in (16, 40):  # any image size
        images = render_digits(np.stack([seven, seven]), size)
        rewards, info = compute_reward("digit_judge", judge, images,
                                       ["the number 7 written by hand", "a handwritten digit two"], [{}, {}])
        assert rewards[0] > 0.9 and rewards[1] < 0.05
        assert info == {"answer": ["7", "7"], "correct": [1.0, 0.0]}
    with pytest.raises(RewardError) as error:
        compute_reward("digit_judge", judge, images[:1], ["a cat"], [{}])
    assert str(error.value) == "reward 'digit_judge': the prompt 'a cat' names no digit (zero..nine or 0..9)"


def test_prompts_name_their_digit_in_words_or_numerals():
    assert prompted_digit("a handwritten digit Seven") == 7
    assert prompted_digit("the number 0 written by hand") == 0
    assert prompted_digit("one") == 1
    with pytest.raises(RewardError, match="names several digits"):
        prompted_digit("a 3 or a four")
    with pytest.raises(RewardError, match="names no digit"):
        prompted_digit("someone wrote 42")
