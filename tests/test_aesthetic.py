"""The LAION aesthetic reward on a tiny CLIP and a random head saved to a temp dir, loaded through
the reward's own loading code (registry, from_pretrained, safetensors / weights-only torch.load).

Tolerances: float32 rounds an operation by at most u = 2^-24 of its result, and a sum of n terms
by at most γ_n = n·u / (1 - n·u) of the sum of their magnitudes, in any order (Higham, "Accuracy
and Stability of Numerical Algorithms", Sec. 3.1)."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from rewards import RewardError, load_reward
from tests.conftest import random_aesthetic_head
from tests.float_error import U32

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])  # CLIP's normalisation
STD = np.array([0.26862954, 0.26130258, 0.27577711])


def _gamma(n: int) -> float:
    """Higham's γ_n: a float32 sum of n products is within γ_n·Σ|terms| of the exact sum."""
    return n * U32 / (1 - n * U32)


@pytest.fixture
def tiny(tiny_aesthetic):
    return tiny_aesthetic


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _pixels(reward, images: np.ndarray) -> torch.Tensor:
    """The reward's own preprocessing (resize, crop, normalise): float32 [B, 3, H, W]."""
    return reward.processor(images=[Image.fromarray(image) for image in images], return_tensors="pt")["pixel_values"]


def _clip_relative_error(config) -> float:
    """A bound on the relative error (2-norm) of the embedding of a float32 pass of a CLIP vision
    tower, from its widths and depth: each reduction of n terms rounds by at most n·u of its terms,
    and with every block's input LayerNorm-ed the terms stay on the scale of the values, so the
    errors add up to Σn·u along the depth: the patch convolution (3·p² terms); per layer two
    LayerNorms, q/k/v, the attention output and fc1 over the width d, fc2 over the intermediate
    width, the scores over the head dim, softmax's sum and its weighted sum over the tokens, and 8
    for the elementwise steps (residuals, activation, exp, scaling); the outer LayerNorms and the
    projection over d."""
    c = config.vision_config
    tokens = (c.image_size // c.patch_size) ** 2 + 1
    layer = 5 * c.hidden_size + c.intermediate_size + c.hidden_size // c.num_attention_heads + 2 * tokens + 8
    return (3 * c.patch_size**2 + c.num_hidden_layers * layer + 3 * c.hidden_size) * U32


def _unit_embedding_error(clip) -> float:
    """A bound on ‖x̂ - x‖ between the reward's float32 unit embedding and the unit vector x of
    another pass's features, in float64: each pass's features are within ε = `_clip_relative_error`
    of the exact ones (relative), which moves their unit vectors by at most 2ε each; the float32
    normalisation (a sum of d squares, a square root, a division) adds (d/2 + 2)·u."""
    d = clip.config.projection_dim
    return 4 * _clip_relative_error(clip.config) + (_gamma(d) / 2 + 2 * U32)


def _head_scores_and_error(head: dict, x: np.ndarray, input_error: float) -> tuple[np.ndarray, np.ndarray]:
    """The head's score of each row of x [B, d] in float64, and a bound on the float32 head's
    error there, for an input within `input_error` (2-norm) of x. The head is affine, so the
    float32 score is off by p_0·(x̂ - x) + Σ_l p_l·δ_l: δ_l is layer l's rounding, at most
    γ_{n_l+1}·(|W_l||x_l| + |b_l|) for its n_l inputs and the bias, and p_l = W_L⋯W_{l+1} carries it
    to the score exactly (p_0 = W_L⋯W_1); to first order in u."""
    layers = [(head[f"layers.{i}.weight"].double().numpy(), head[f"layers.{i}.bias"].double().numpy())
              for i in (0, 2, 4, 6, 7)]  # linear layers only; dropout is off at inference
    to_score = [np.ones((1, 1))]  # p_L = 1, then p_{L-1}, ..., p_0
    for weight, _ in reversed(layers):
        to_score.append(to_score[-1] @ weight)
    to_score.reverse()
    error = np.full(len(x), np.linalg.norm(to_score[0]) * input_error)
    for (weight, bias), p in zip(layers, to_score[1:]):
        error += (_gamma(weight.shape[1] + 1) * (np.abs(x) @ np.abs(weight).T + np.abs(bias))) @ np.abs(p[0])
        x = x @ weight.T + bias
    return x[:, 0], error


def _unit(features) -> np.ndarray:
    embed = (features if torch.is_tensor(features) else features.pooler_output).double().numpy()
    return embed / np.linalg.norm(embed, axis=1, keepdims=True)


@pytest.mark.parametrize("head_format", ["safetensors", "pth"])
def test_score_equals_hand_computation(tiny, head_format):
    folder, clip, head = tiny
    params = {"clip_model": str(folder / "clip"), "device": "cpu"}
    if head_format == "safetensors":
        params["head"] = str(folder / "head.safetensors")
    else:  # a folder, and the published file name
        params.update(head=str(folder), head_filename="sac+logos+ava1-l14-linearMSE.pth")
    reward = load_reward("aesthetic", params)

    images = _images(3, 32)  # already the crop size: preprocessing is (x / 255 - mean) / std
    rewards, info = reward(images, ["a cat"] * 3, [{}] * 3)

    pixels = _pixels(reward, images)
    hand_pixels = ((images / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2)
    # float32 rounds x/255 and the mean, their difference, std and the quotient: 4 u of (x/255 + mean) / std
    pixel_error = 4 * U32 * ((images / 255.0 + MEAN) / STD).transpose(0, 3, 1, 2)
    assert np.all(np.abs(pixels.double().numpy() - hand_pixels) <= pixel_error)
    with torch.no_grad():
        x = _unit(clip.get_image_features(pixel_values=pixels))
    scores, error = _head_scores_and_error(head, x, _unit_embedding_error(clip))
    assert rewards.shape == (3,) and rewards.dtype == np.float32
    assert np.all(np.abs(rewards - scores) <= error)  # the head's roundings carried to the score, and the CLIP's
    assert info["aesthetic"] == rewards.tolist()  # the same float32 numbers
    # different images, different scores: apart by more than both scores' errors
    assert min(abs(scores[i] - scores[j]) - error[i] - error[j] for i in range(3) for j in range(i)) > 0


def test_batch_size_does_not_change_scores(tiny):
    folder, clip, head = tiny
    images = _images(5, 48, seed=0)  # resized and cropped by the processor
    params = {"clip_model": str(folder / "clip"), "head": str(folder / "head.safetensors"), "device": "cpu"}
    one_batch, _ = load_reward("aesthetic", {**params, "batch_size": 5})(images, ["p"] * 5, [{}] * 5)
    reward = load_reward("aesthetic", {**params, "batch_size": 2})
    in_pairs, _ = reward(images, ["p"] * 5, [{}] * 5)
    with torch.no_grad():
        x = _unit(clip.get_image_features(pixel_values=_pixels(reward, images)))
    _, error = _head_scores_and_error(head, x, _unit_embedding_error(clip))
    assert np.all(np.abs(in_pairs - one_batch) <= 2 * error)  # two float32 passes, each within `error`
    # the images' scores are apart by more than that: images mixed up between batches would show
    assert min(abs(one_batch[i] - one_batch[j]) for i in range(5) for j in range(i)) > 2 * error.max()


def test_missing_or_wrong_weights_are_one_line_errors(tiny, tmp_path):
    folder, _, _ = tiny
    clip, head = str(folder / "clip"), str(folder / "head.safetensors")
    wide_head = tmp_path / "wide.safetensors"  # a head for 768-dim embeddings (ViT-L/14)
    save_file(random_aesthetic_head(768, torch.Generator().manual_seed(2)), wide_head)
    pickled = tmp_path / "pickled.pth"  # a whole module, which only a full unpickle could load
    torch.save(torch.nn.Linear(2, 2), pickled)
    cases = [
        ({"clip_model": str(tmp_path / "no-clip"), "head": head}, "reward.params.clip_model: no such file or folder"),
        ({"clip_model": "no-such-org/no-such-clip", "head": head}, "reward.params.clip_model: cannot load"),
        ({"clip_model": clip, "head": str(tmp_path / "missing.pth")}, "reward.params.head: no such file or folder"),
        ({"clip_model": clip, "head": "no-such-org/no-such-head"}, "reward.params.head: no local 'no-such-org/"),
        ({"clip_model": clip, "head": str(tmp_path)}, "reward.params.head_filename: no 'aesthetic-model.pth'"),
        ({"clip_model": clip, "head": str(wide_head)}, f"reward.params.head: '{wide_head}' is not an aesthetic head"),
        ({"clip_model": clip, "head": str(pickled)}, "reward.params.head: cannot read"),
        ({"clip_model": clip, "head": head, "dtype": "float8"}, "reward.params.dtype: must be one of"),
    ]
    for params, message in cases:
        with pytest.raises(RewardError) as info:
            load_reward("aesthetic", {"device": "cpu", **params})
        assert str(info.value).startswith(message), str(info.value)
        assert "\n" not in str(info.value)
    with pytest.raises(RewardError, match="size mismatch for layers.0.weight"):
        load_reward("aesthetic", {"clip_model": clip, "head": str(wide_head), "device": "cpu"})
