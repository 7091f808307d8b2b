"""The LAION aesthetic reward on a tiny CLIP and a random head saved to a temp dir, loaded through
the reward's own loading code (registry, from_pretrained, safetensors / weights-only torch.load)."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rewards import RewardError, load_reward
from tests.conftest import random_aesthetic_head

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])  # CLIP's normalisation
STD = np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.fixture
def tiny(tiny_aesthetic):
    return tiny_aesthetic


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


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

    pixels = ((images / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2)
    with torch.no_grad():
        features = clip.get_image_features(pixel_values=torch.tensor(pixels, dtype=torch.float32))
    embed = (features if torch.is_tensor(features) else features.pooler_output).numpy().astype(np.float64)
    x = embed / np.linalg.norm(embed, axis=1, keepdims=True)
    for index in (0, 2, 4, 6, 7):  # linear layers only; dropout is off at inference
        x = x @ head[f"layers.{index}.weight"].double().numpy().T + head[f"layers.{index}.bias"].double().numpy()
    assert rewards.shape == (3,) and rewards.dtype == np.float32
    np.testing.assert_allclose(rewards, x[:, 0], rtol=1e-5, atol=1e-6)
    assert info["aesthetic"] == pytest.approx(rewards.tolist())
    assert not np.allclose(rewards, rewards[0])  # different images, different scores


def test_batch_size_does_not_change_scores(tiny):
    folder, _, _ = tiny
    images = _images(5, 48, seed=3)  # resized and cropped by the processor
    params = {"clip_model": str(folder / "clip"), "head": str(folder / "head.safetensors"), "device": "cpu"}
    one_batch, _ = load_reward("aesthetic", {**params, "batch_size": 5})(images, ["p"] * 5, [{}] * 5)
    in_pairs, _ = load_reward("aesthetic", {**params, "batch_size": 2})(images, ["p"] * 5, [{}] * 5)
    np.testing.assert_allclose(in_pairs, one_batch, rtol=1e-5, atol=1e-6)


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
