"""The embedded digits model (`builtin:digits`) and its judges (`digit_judge`, `digit_judge_2`)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ddpo.config import DDIMConfig, FlowConfig, SampleConfig
from ddpo.rollout import sample_trajectories
from ddpo.pipeline import (
    BUILTIN_FOLDERS, BUILTIN_MAX_SEQUENCE_LENGTH, ModelLoadError, check_pretrained, load_pipeline,
)
from ddpo.media import Media
from rewards import RewardError, compute_reward, load_reward
from rewards.digits import (
    DIGIT_WORDS, JUDGE_2_DIR, JUDGE_DIR, DigitJudge, DigitJudge2, DigitNeighbours, judge_input, load_heldout,
    prompted_digit, render_digits,
)
from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def judge():
    return DigitJudge()


@pytest.fixture(scope="module")
def judge_2():
    return DigitJudge2()


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
    sample = SampleConfig(num_steps=4, guidance_scale=3.0, height=16, width=16, ddim=DDIMConfig(eta=1.0))
    images = sample_trajectories(pipe, ["a handwritten digit three", ""], [0, 1], sample).media.images
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
    sample = SampleConfig(num_steps=4, guidance_scale=1.0, height=16, width=16, flow=FlowConfig(noise_level=0.7))
    traj = sample_trajectories(model, ["a handwritten digit three", "a handwritten digit seven"], [0, 1], sample)
    assert traj.timesteps.dtype == torch.float32 and traj.latents.shape == (2, 5, 4, 8, 8)
    assert traj.media.images.std() > 20  # ink on paper


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
        rewards, info = compute_reward("digit_judge", judge, Media.from_images(images),
                                       ["the number 7 written by hand", "a handwritten digit two"], [{}, {}])
        assert rewards[0] > 0.9 and rewards[1] < 0.05
        assert info == {"answer": ["7", "7"], "correct": [1.0, 0.0]}
    with pytest.raises(RewardError) as error:
        compute_reward("digit_judge", judge, Media.from_images(images[:1]), ["a cat"], [{}])
    assert str(error.value) == "reward 'digit_judge': the prompt 'a cat' names no digit (zero..nine or 0..9)"


def near_ties(probs: torch.Tensor) -> int:
    """Predictions whose top two probabilities lie within 1e-4 of each other: only these could
    flip on another CPU's float32 kernels (their rounding is far below 1e-4)."""
    top_two = probs.sort(dim=-1).values[:, -2:]
    return int((top_two[:, 1] - top_two[:, 0] < 1e-4).sum())


def test_the_second_judge_is_another_model_above_95_percent_on_the_same_held_out_split(judge, judge_2, heldout):
    """digit_judge_2: the training split's digits as nearest neighbours, with a "none" answer
    (0.964 on the held-out digits when fitted). 1-NN on these digits scores about 0.98 and the
    "none" beyond the 99th percentile of the training digits' own distances costs about 1%, so a
    floor of 0.95 fails a broken judge and no honest refit."""
    test_x, test_y, config = heldout
    config_2 = judge_2.config
    assert isinstance(judge_2.model, DigitNeighbours) and config_2["architecture"] == "nearest_neighbour"
    assert (config_2["split_seed"], config_2["test_fraction"]) == (config["seed"], config["test_fraction"])
    assert config_2["num_prototypes"] + len(test_y) == 1797  # the training split: all of the digits but these
    images = render_digits(test_x, config_2["image_size"])
    probs_1, probs_2 = judge.probabilities(images), judge_2.probabilities(images)
    answer_1, answer_2 = probs_1.argmax(dim=-1).numpy(), probs_2.argmax(dim=-1).numpy()
    accuracy = float((answer_2 == test_y).mean())
    assert accuracy > 0.95
    # the figures scripts/train_digits.py recorded, up to the near ties that could flip
    assert abs(accuracy - config_2["heldout_accuracy"]) * len(test_y) <= near_ties(probs_2) + 1e-9
    agree = float((answer_1 == answer_2).mean())
    assert abs(agree - config_2["agreement_with_digit_judge"]["heldout"]) * len(test_y) <= (
        near_ties(probs_1) + near_ties(probs_2) + 1e-9)


def test_the_second_judge_rewards_its_softmax_over_class_distances_at_the_prompted_digit(heldout):
    """r = p_judge2(prompted digit | x_0) by hand from the shipped prototypes: the 16x16 image's
    ink averaged over 2x2 blocks (the area resize to 8x8), the squared distance to the nearest
    prototype of each digit, and the "none" distance, negated over the temperature, softmax."""
    from safetensors.numpy import load_file

    test_x, test_y, _ = heldout
    reward = load_reward("digit_judge_2")
    assert type(reward) is DigitJudge2
    blob = np.full((1, 16, 16, 3), 255, np.uint8)
    blob[0, 5:11, 3:13] = 0  # a dark bar, like the "four" of a hacked run: no digit
    images = np.concatenate([render_digits(test_x[:8], 16), blob])
    prompted = [int(d) if i % 2 else (int(d) + 3) % 10 for i, d in enumerate(test_y[:8])] + [4]  # right, wrong
    prompts = [f"a handwritten digit {DIGIT_WORDS[d]}" for d in prompted]
    rewards, info = compute_reward("digit_judge_2", reward, Media.from_images(images), prompts, [{}] * len(prompts))

    shipped = {k: v.astype(np.float64) for k, v in load_file(str(JUDGE_2_DIR / "model.safetensors")).items()}
    ink = 1.0 - images.astype(np.float64).mean(axis=-1) / 255.0
    x = ink.reshape(-1, 8, 2, 8, 2).mean(axis=(2, 4)).reshape(-1, 64)
    squared = ((x[:, None, :] - shipped["prototypes"][None]) ** 2).sum(-1)
    distances = np.stack([squared[:, shipped["labels"] == c].min(axis=1) for c in range(10)], axis=1)
    logits = -np.concatenate([distances, np.full((len(x), 1), shipped["reject_distance"])], axis=1)
    logits /= shipped["temperature"]
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    # float32 distances of 64 terms in [0, 1], over a temperature of 0.15: far below 1e-5
    np.testing.assert_allclose(rewards, probs[np.arange(len(prompted)), prompted], atol=1e-5)
    answer = probs.argmax(axis=-1)
    assert info == {"answer": [str(a) if a < 10 else "none" for a in answer],
                    "correct": [float(a == d) for a, d in zip(answer, prompted)]}
    assert info["answer"][-1] == "none" and rewards[-1] < 0.05  # the bar: a four to the CNN?
    assert rewards[1:8:2].mean() > 0.8 and rewards[0:8:2].mean() < 0.1  # the true digits, then others
    with pytest.raises(RewardError) as error:
        compute_reward("digit_judge_2", reward, Media.from_images(images[:1]), ["a cat"], [{}])
    assert str(error.value) == "reward 'digit_judge_2': the prompt 'a cat' names no digit (zero..nine or 0..9)"


def test_the_second_judge_fit_follows_its_definition():
    """scripts/train_digits.py's judge 2 (`--only judge2`) on random ink: the prototypes are the
    training images' ink; the "none" distance is the reject quantile of their leave-one-out
    nearest distances; the temperature, of the grid, the least leave-one-out log loss; twice
    the same."""
    script = load_script("scripts/train_digits.py")
    settings = yaml.safe_load((ROOT / "ddpo" / "assets" / "train_digits.yaml").read_text())["judge_2"]
    rng = np.random.default_rng(0)
    images, labels = render_digits(rng.integers(0, 17, (60, 64)), 16), np.arange(60) % 10
    judge, _ = script.fit_second_judge(settings, images, labels, images[:8], labels[:8])
    again, _ = script.fit_second_judge(settings, images, labels, images[:8], labels[:8])
    assert all(torch.equal(a, b) for a, b in zip(judge.state_dict().values(), again.state_dict().values()))
    ink = judge_input(images).flatten(1).double()
    assert torch.equal(judge.prototypes, judge_input(images).flatten(1))
    squared = ((ink[:, None] - ink[None]) ** 2).sum(-1)
    squared.fill_diagonal_(float("inf"))
    nearest = squared.min(dim=1).values
    # the quantile, up to the float32 rounding of distances of 64 terms in [0, 1]
    assert abs(float(judge.reject_distance) - float(torch.quantile(nearest, settings["reject_quantile"]))) < 1e-5
    distances = torch.stack([squared[:, torch.as_tensor(labels) == c].min(dim=1).values for c in range(10)], dim=1)

    def log_loss(t):
        logits = -torch.cat([distances, torch.full((60, 1), float(judge.reject_distance), dtype=torch.float64)], 1) / t
        return float(-torch.log_softmax(logits, 1)[torch.arange(60), torch.as_tensor(labels)].mean())

    losses = {t: log_loss(t) for t in settings["temperatures"]}
    assert math.isclose(float(judge.temperature), min(losses, key=losses.get), rel_tol=1e-6)


def test_prompts_name_their_digit_in_words_or_numerals():
    assert prompted_digit("a handwritten digit Seven") == 7
    assert prompted_digit("the number 0 written by hand") == 0
    assert prompted_digit("one") == 1
    with pytest.raises(RewardError, match="names several digits"):
        prompted_digit("a 3 or a four")
    with pytest.raises(RewardError, match="names no digit"):
        prompted_digit("someone wrote 42")
