"""The HPSv2 reward on a tiny random CLIP, loaded through the reward's own loading code: as a
transformers folder (`model`), and as an open_clip state dict (`checkpoint`, converted on load onto
the CLIP config in `processor`, as the published HPS_v2.1_compressed.pt is)."""

import shutil

import numpy as np
import pytest
import torch
from transformers import CLIPModel

from rewards import RewardError, check_reward, load_reward
from tests.float_error import U32
from tests.test_pickscore import MAX_LENGTH, _score_error, save_tiny_clip

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny CLIP in `model/`; its tokenizer, image processor and config in `processor/` (as the
    LAION CLIP-H repo holds all three); the same weights as an open_clip state dict, as published
    (under "state_dict"), in `hps.pt`. Returns the folder and the model."""
    folder = tmp_path_factory.mktemp("hpsv2")
    clip, _ = save_tiny_clip(folder, config_in_processor=True)
    torch.save({"epoch": 1, "state_dict": open_clip_state(clip)}, folder / "hps.pt")
    return folder, clip


def open_clip_state(clip: CLIPModel) -> dict[str, torch.Tensor]:
    """The CLIP's weights under open_clip's names, key by key (open_clip's model.py and
    transformer.py): the inverse of the reward's conversion, written out independently."""
    weights = {key: value.detach().clone() for key, value in clip.state_dict().items()}
    state = {
        "visual.conv1.weight": weights["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": weights["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": weights["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": weights["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": weights["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": weights["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": weights["vision_model.post_layernorm.bias"],
        "visual.proj": weights["visual_projection.weight"].T.contiguous(),  # [width, embed_dim], x @ proj
        "token_embedding.weight": weights["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": weights["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": weights["text_model.final_layer_norm.weight"],
        "ln_final.bias": weights["text_model.final_layer_norm.bias"],
        "text_projection": weights["text_projection.weight"].T.contiguous(),
        "logit_scale": weights["logit_scale"],
    }
    towers = (("vision_model", "visual.transformer.resblocks", clip.config.vision_config),
              ("text_model", "transformer.resblocks", clip.config.text_config))
    for tower, block, tower_config in towers:
        for n in range(tower_config.num_hidden_layers):
            layer = f"{tower}.encoder.layers.{n}"
            for kind in ("weight", "bias"):
                # nn.MultiheadAttention's in_proj: q, k, v stacked along the output dimension
                state[f"{block}.{n}.attn.in_proj_{kind}"] = torch.cat(
                    [weights[f"{layer}.self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")])
                state[f"{block}.{n}.attn.out_proj.{kind}"] = weights[f"{layer}.self_attn.out_proj.{kind}"]
                state[f"{block}.{n}.ln_1.{kind}"] = weights[f"{layer}.layer_norm1.{kind}"]
                state[f"{block}.{n}.ln_2.{kind}"] = weights[f"{layer}.layer_norm2.{kind}"]
                state[f"{block}.{n}.mlp.c_fc.{kind}"] = weights[f"{layer}.mlp.fc1.{kind}"]
                state[f"{block}.{n}.mlp.c_proj.{kind}"] = weights[f"{layer}.mlp.fc2.{kind}"]
    return state


def _params(folder, **extra):
    return {"processor": str(folder / "processor"), "device": "cpu", **extra}


def _images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def _features(output) -> torch.Tensor:
    return output if torch.is_tensor(output) else output.pooler_output


PROMPTS = ["a photo of a cat", "a red bike", "the big blue horse riding a small dog"]


def test_score_is_the_cosine_computed_by_hand(tiny):
    folder, clip = tiny
    images = _images(3, 32, 32)
    reward = load_reward("hpsv2", _params(folder, model=str(folder / "model")))
    rewards, info = reward(images, PROMPTS, [{}] * 3)

    # the model's own features on the reward's inputs: the same float32 pass (one batch, the same
    # padding; the CPU kernels are deterministic), so the same features; the normalisation and the
    # dot product here in float64, with no logit scale
    pixels = reward.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
    tokens = reward.tokenizer(PROMPTS, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    with torch.no_grad():
        image_embed = _features(clip.get_image_features(pixel_values=pixels)).double().numpy()
        text_embed = _features(clip.get_text_features(**tokens)).double().numpy()
    cos = (image_embed * text_embed).sum(1) / np.linalg.norm(image_embed, axis=1) / np.linalg.norm(text_embed, axis=1)
    # the reward's float32 unit vectors: each component within (d/2 + 2) u (d squares summed, a
    # root, a division), which moves a cosine of unit vectors by at most 2 (d/2 + 2) u; the
    # float32 dot product of d terms, sum |a_i b_i| <= 1, by d u more
    d = clip.config.projection_dim
    error = (2 * d + 4) * U32
    assert rewards.shape == (3,) and rewards.dtype == np.float32
    assert np.all(np.abs(rewards - cos) <= error), np.abs(rewards - cos)
    assert info["hpsv2"] == rewards.tolist()  # the same float32 numbers
    assert all(abs(cos[i] - cos[j]) > 2 * error for i in range(3) for j in range(i))  # distinct pairs


def test_the_open_clip_checkpoint_loads_the_same_weights_and_scores(tiny):
    folder, clip = tiny
    from_checkpoint = load_reward("hpsv2", _params(folder, checkpoint=str(folder / "hps.pt")))
    from_model = load_reward("hpsv2", _params(folder, model=str(folder / "model")))
    loaded, original = from_checkpoint.clip.state_dict(), clip.state_dict()
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[key], original[key]) for key in original)  # renamed, split, transposed: exact
    images = _images(4, 40, 40, seed=1)  # resized by the processor
    prompts = ["a cat", "a dog riding a bike", "blue painting", "the small green horse"]
    scores, _ = from_checkpoint(images, prompts, [{}] * 4)
    assert np.array_equal(scores, from_model(images, prompts, [{}] * 4)[0])  # the same weights, the same pass
    # a bare state dict (no "state_dict" key) and a folder holding checkpoint_filename load the same
    bare = folder / "bare" / "weights.pt"
    bare.parent.mkdir(exist_ok=True)
    torch.save(open_clip_state(clip), bare)
    for params in ({"checkpoint": str(bare)}, {"checkpoint": str(bare.parent), "checkpoint_filename": "weights.pt"}):
        assert np.array_equal(load_reward("hpsv2", _params(folder, **params))(images, prompts, [{}] * 4)[0], scores)


def test_non_square_images_are_padded_to_a_square_with_black(tiny):
    """HPSv2's validation transform letterboxes (resizes the longer side, pads the shorter one,
    centred, with black) where CLIP's processor would crop."""
    folder, _ = tiny
    reward = load_reward("hpsv2", _params(folder, model=str(folder / "model")))
    tall, wide = _images(2, 45, 30, seed=2), _images(2, 30, 45, seed=3)
    padded_tall = np.zeros((2, 45, 45, 3), np.uint8)
    padded_tall[:, :, 7:37] = tall  # 15 columns of padding: 7 left, 8 right (pad // 2 first, as HPSv2)
    padded_wide = np.zeros((2, 45, 45, 3), np.uint8)
    padded_wide[:, 7:37] = wide
    prompts = ["a cat", "a red bike"]
    for image, padded in ((tall, padded_tall), (wide, padded_wide)):
        assert np.array_equal(reward(image, prompts, [{}] * 2)[0], reward(padded, prompts, [{}] * 2)[0])


def test_bad_params_are_one_line_errors(tiny, tmp_path):
    folder, clip = tiny
    model, checkpoint = str(folder / "model"), str(folder / "hps.pt")
    state = open_clip_state(clip)
    del state["visual.ln_post.weight"]
    torch.save({"state_dict": state}, tmp_path / "missing.pt")
    torch.save({"state_dict": {**open_clip_state(clip), "visual.attn_pool.query": torch.zeros(1, 32)}},
               tmp_path / "unknown.pt")
    torch.save({"state_dict": {**open_clip_state(clip), "positional_embedding": torch.zeros(77, 32)}},
               tmp_path / "shape.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    no_config = tmp_path / "no-config"
    shutil.copytree(folder / "processor", no_config)
    (no_config / "config.json").unlink()
    cases = [
        ({"model": str(tmp_path / "no-model")}, "reward.params.model: no such file or folder"),
        ({"model": str(folder / "processor")}, "reward.params.model: cannot load"),  # a config, no weights
        ({"model": model, "checkpoint": checkpoint}, "reward.params.model: give model or checkpoint, not both"),
        ({"checkpoint": str(tmp_path / "no.pt")}, "reward.params.checkpoint: no such file or folder"),
        ({"checkpoint": str(tmp_path)}, "reward.params.checkpoint_filename: no 'HPS_v2.1_compressed.pt' in"),
        ({"checkpoint": str(tmp_path / "garbage.pt")}, "reward.params.checkpoint: cannot read"),
        ({"checkpoint": str(tmp_path / "missing.pt")},
         "reward.params.checkpoint: '" + str(tmp_path / "missing.pt") + "' lacks 1 weight(s) of the CLIP in"),
        ({"checkpoint": str(tmp_path / "unknown.pt")},
         "reward.params.checkpoint: '" + str(tmp_path / "unknown.pt") + "' has 'visual.attn_pool.query'"),
        ({"checkpoint": str(tmp_path / "shape.pt")}, "reward.params.checkpoint: '" + str(tmp_path / "shape.pt")
         + "' does not fit the CLIP in"),
        ({"checkpoint": checkpoint, "processor": str(no_config)}, "reward.params.processor: no CLIP config in"),
        ({"model": model, "processor": str(tmp_path / "no-processor")},
         "reward.params.processor: no such file or folder"),
        ({"model": model, "dtype": "float8"}, "reward.params.dtype: must be one of"),
        ({"model": model, "batch_size": 0}, "reward.params.batch_size: must be >= 1"),
    ]
    for params, message in cases:
        with pytest.raises(RewardError) as info:
            load_reward("hpsv2", _params(folder, **params))
        assert str(info.value).startswith(message), str(info.value)
        assert "\n" not in str(info.value)
    assert "'vision_model.post_layernorm.weight'" in _error(folder, tmp_path / "missing.pt")
    with pytest.raises(RewardError, match=r"^reward.params: 'hpsv2' does not take these params"):
        check_reward("hpsv2", {"modle": model})


def _error(folder, checkpoint) -> str:
    with pytest.raises(RewardError) as info:
        load_reward("hpsv2", _params(folder, checkpoint=str(checkpoint)))
    return str(info.value)


def _cosine_error(clip, cosines: np.ndarray) -> np.ndarray:
    """A bound on one float32 pass's error in a cosine: tests/test_pickscore.py's bound on
    σ·cos, which is linear in σ, divided by σ."""
    sigma = clip.logit_scale.double().exp().item()
    return _score_error(clip, sigma * cosines) / sigma


def test_registry_names_and_batches(tiny):
    """`hpsv2` and its module path load the same reward; scores do not depend on the batching."""
    folder, clip = tiny
    images = _images(5, 32, 32, seed=4)
    prompts = ["a cat", "a dog riding a red bike in the painting", "horse", "an photo of the blue", "small"]
    one_batch, _ = load_reward("hpsv2", _params(folder, model=str(folder / "model"), batch_size=5))(
        images, prompts, [{}] * 5)
    in_pairs, _ = load_reward("rewards.hpsv2:HPSv2", _params(folder, model=str(folder / "model"), batch_size=2))(
        images, prompts, [{}] * 5)
    error = _cosine_error(clip, one_batch)  # each pass within it: other batch shapes and padding round otherwise
    assert np.all(np.abs(in_pairs - one_batch) <= 2 * error)
    # the pairs' scores are apart by more than that: pairs mixed up between batches would show
    assert min(abs(one_batch[i] - one_batch[j]) for i in range(5) for j in range(i)) > 2 * error.max()
