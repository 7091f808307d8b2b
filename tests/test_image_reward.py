"""The ImageReward reward on a tiny random BLIP (ViT 32 px / 8 px patches, 2+2 layers of width 32)
with a BERT WordPiece tokenizer built from a vocab.txt, loaded through the reward's own loading
code: a `model` folder (config.json, model.safetensors, tokenizer) and the published-format
checkpoint (ImageReward.pt keys, written here by the inverse of the reward's key mapping).

Tolerances: float32 rounds an operation by at most u = 2^-24 of its result, and a sum of n terms
by at most γ_n = n·u / (1 - n·u) of the sum of their magnitudes, in any order (Higham, "Accuracy
and Stability of Numerical Algorithms", Sec. 3.1)."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import BertConfig, BertTokenizer, BlipConfig

from rewards import RewardError, check_reward, load_reward
from rewards.image_reward import ImageReward, ImageRewardModel
from tests.conftest import random_aesthetic_head
from tests.float_error import U32

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])  # CLIP's normalisation, as ImageReward.py's _transform
STD = np.array([0.26862954, 0.26130258, 0.27577711])
SCORE_MEAN, SCORE_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py: self.mean, self.std
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # BERT's, padding id 0 as bert-base-uncased
WORDS = "a an the cat dog horse photo of painting riding bike red blue green big small on in".split()
VOCAB = {token: i for i, token in enumerate(SPECIALS + WORDS)}  # then [DEC] and [ENC], added as BLIP does
DEC, ENC = len(VOCAB), len(VOCAB) + 1
MAX_LENGTH = 35  # ImageReward.py's tokenizer max_length
SIZE = 32  # the tiny ViT's image size


def _gamma(n: int) -> float:
    """Higham's γ_n: a float32 sum of n products is within γ_n·Σ|terms| of the exact sum."""
    return n * U32 / (1 - n * U32)


def _config(intermediate_size: int = 64) -> BlipConfig:
    """A tiny BLIP, initialised with std 0.2 (BlipVisionConfig's 1e-10 would make every image alike)."""
    return BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=intermediate_size, num_hidden_layers=2,
                           num_attention_heads=2, image_size=SIZE, patch_size=8, layer_norm_eps=1e-6,
                           initializer_range=0.2),
        text_config=dict(vocab_size=len(VOCAB) + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=40, pad_token_id=0, bos_token_id=DEC,
                         sep_token_id=VOCAB["[SEP]"], is_decoder=True, initializer_range=0.2),
    )


def _published_state(model: ImageRewardModel) -> dict[str, torch.Tensor]:
    """The model's weights under the published ImageReward.pt names (BLIP's vit.py and med.py,
    ImageReward.py's mlp), with the keys the file holds that the reward does not use."""
    vision_renames = [  # BlipVisionModel name -> BLIP vit.py name, under `blip.visual_encoder.`
        ("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
        ("embeddings.patch_embedding.", "patch_embed.proj."), ("encoder.layers.", "blocks."),
        (".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2."), (".self_attn.qkv.", ".attn.qkv."),
        (".self_attn.projection.", ".attn.proj."), ("post_layernorm.", "norm."),
    ]
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("vision_model."):
            key = key.removeprefix("vision_model.")
            for new, old in vision_renames:
                key = key.replace(new, old)
            key = "blip.visual_encoder." + key
        elif key.startswith("text_encoder."):  # med.py's BertModel names are BlipTextModel's
            key = "blip." + key
        state[key] = value.clone()
    text = model.config.text_config
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(text.max_position_embeddings)[None]
    state["blip.vision_proj.weight"] = torch.randn(8, model.config.vision_config.hidden_size)  # BLIP's ITC projections
    state["blip.text_proj.weight"] = torch.randn(8, text.hidden_size)
    return state


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny ImageReward model with a random head (gain about 1 a layer), written as a `model`
    folder (`model/`), as a published-format `ImageReward.pt` with its BlipConfig (`config/`) and
    the plain BERT tokenizer (`bert/`); returns the folder and the model."""
    folder = tmp_path_factory.mktemp("image_reward")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    bert = BertTokenizer(str(folder / "vocab.txt"), model_max_length=512)
    bert.save_pretrained(folder / "bert")
    torch.manual_seed(0)
    model = ImageRewardModel(_config()).eval()
    model.mlp.load_state_dict(random_aesthetic_head(32, torch.Generator().manual_seed(1)))

    model.config.save_pretrained(folder / "model")
    save_file(model.state_dict(), folder / "model" / "model.safetensors")
    blip_tokenizer = BertTokenizer(str(folder / "vocab.txt"), model_max_length=512)
    blip_tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    blip_tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    blip_tokenizer.save_pretrained(folder / "model")

    model.config.save_pretrained(folder / "config")
    torch.save(_published_state(model), folder / "ImageReward.pt")
    return folder, model


def _model_params(folder, **extra):
    return {"model": str(folder / "model"), "device": "cpu", **extra}


def _checkpoint_params(folder, **extra):
    return {"checkpoint": str(folder / "ImageReward.pt"), "config": str(folder / "config"),
            "tokenizer": str(folder / "bert"), "device": "cpu", **extra}


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _ids(prompt: str) -> list[int]:
    """[CLS] words [SEP], padded with [PAD] to 35: bert-base-uncased's tokens, the first left as
    [CLS] (the published score does not swap in [ENC])."""
    ids = [VOCAB["[CLS]"], *(VOCAB[word] for word in prompt.split()), VOCAB["[SEP]"]]
    return ids + [VOCAB["[PAD]"]] * (MAX_LENGTH - len(ids))


def _head(model: ImageRewardModel) -> list[tuple[np.ndarray, np.ndarray]]:
    """The head's linear layers (weight, bias) in float64; its dropouts are off at inference."""
    state = model.mlp.state_dict()
    return [(state[f"layers.{i}.weight"].double().numpy(), state[f"layers.{i}.bias"].double().numpy())
            for i in (0, 2, 4, 6, 7)]


def _scores_and_head_error(model, h: np.ndarray, h_error: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """r = (mlp(h) - mean) / std in float64 for each row of h [B, d], and a bound on the float32
    reward's error there, for an h within `h_error` [B] (2-norm) of these rows. The head is affine,
    so its float32 output is off by p_0·(ĥ - h) + Σ_l p_l·δ_l: δ_l is layer l's rounding, at most
    γ_{n_l+1}·(|W_l||x_l| + |b_l|) for its n_l inputs and the bias, and p_l = W_L⋯W_{l+1} carries
    it to the output exactly (p_0 = W_L⋯W_1); the standardisation rounds twice (2u of r)."""
    layers = _head(model)
    to_output = [np.ones((1, 1))]  # p_L = 1, then p_{L-1}, ..., p_0
    for weight, _ in reversed(layers):
        to_output.append(to_output[-1] @ weight)
    to_output.reverse()
    error = np.linalg.norm(to_output[0]) * h_error
    x = h
    for (weight, bias), p in zip(layers, to_output[1:]):
        error = error + (_gamma(weight.shape[1] + 1) * (np.abs(x) @ np.abs(weight).T + np.abs(bias))) @ np.abs(p[0])
        x = x @ weight.T + bias
    scores = (x[:, 0] - SCORE_MEAN) / SCORE_STD
    return scores, error / SCORE_STD + 2 * U32 * np.abs(scores)


def _tower_relative_error(config: BlipConfig) -> float:
    """A bound on the relative error (2-norm) of h_[CLS] from one float32 pass of the BLIP: each
    reduction of n terms rounds by at most n·u of its terms, and with the layers' sums LayerNorm-ed
    the terms stay on the scale of the values, so the errors add up to Σn·u along the depth.
    The ViT: the patch convolution (3·p² terms), its final LayerNorm over d_v, and per layer two
    LayerNorms, q/k/v, the attention output and fc1 over d_v, fc2 over the intermediate width,
    the scores over the head dim, softmax's sum and its weighted sum over the T_v tokens, and 8
    elementwise steps. The text encoder: the embedding sum and its LayerNorm over d, and per layer
    three LayerNorms, q/k/v and the two attention outputs, the cross-attention query and the
    intermediate layer over d, the cross-attention keys/values over d_v, the output layer over its
    intermediate width, two score sets over the head dim, softmax's sums and weighted sums over
    the 35 prompt and T_v image tokens, and 12 elementwise steps; the image tokens' error enters
    through the cross-attention keys and values, twice."""
    v, t = config.vision_config, config.text_config
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    vision = (3 * v.patch_size**2 + v.hidden_size + v.num_hidden_layers * (
        5 * v.hidden_size + v.intermediate_size + v.hidden_size // v.num_attention_heads + 2 * tokens + 8))
    text = 2 * t.hidden_size + t.num_hidden_layers * (
        8 * t.hidden_size + v.hidden_size + t.intermediate_size + 2 * (t.hidden_size // t.num_attention_heads)
        + 2 * MAX_LENGTH + 2 * tokens + 12)
    return (text + 2 * vision) * U32


def _cls_states(model, pixels: torch.Tensor, prompts: list[str]) -> np.ndarray:
    """h_[CLS] step by step from the modules, in float32: the ViT's tokens after its final
    LayerNorm, then the text encoder on the hand-made ids, bidirectional, cross-attending to all
    image tokens (an all-ones mask)."""
    ids = torch.tensor([_ids(prompt) for prompt in prompts])
    with torch.no_grad():
        image_embeds = model.vision_model(pixel_values=pixels).last_hidden_state
        text = model.text_encoder(input_ids=ids, attention_mask=(ids != VOCAB["[PAD]"]).long(), is_decoder=False,
                                  encoder_hidden_states=image_embeds,
                                  encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long))
    return text.last_hidden_state[:, 0].double().numpy()


def _score_error(model, pixels: torch.Tensor, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The scores, in float64 from one float32 pass's h_[CLS], and a bound on any float32 pass's
    error: the towers' (`_tower_relative_error` of ‖h‖) carried through the head, and the head's."""
    h = _cls_states(model, pixels, prompts)
    h_error = _tower_relative_error(model.config) * np.linalg.norm(h, axis=1)
    return _scores_and_head_error(model, h, h_error)


def test_score_equals_hand_computation(tiny):
    folder, model = tiny
    prompts = ["a photo of a cat", "a red bike", "the big blue horse riding a small dog"]
    images = _images(3, SIZE)  # already the crop size: preprocessing is (x / 255 - mean) / std
    reward = load_reward("image_reward", _model_params(folder))
    rewards, info = reward(images, prompts, [{}] * 3)

    pixels = reward.image_processor(images=[Image.fromarray(image) for image in images],
                                    return_tensors="pt")["pixel_values"]
    hand_pixels = ((images / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2)
    # float32 rounds x/255 and the mean, their difference, std and the quotient: 4 u of (x/255 + mean) / std
    pixel_error = 4 * U32 * ((images / 255.0 + MEAN) / STD).transpose(0, 3, 1, 2)
    assert np.all(np.abs(pixels.double().numpy() - hand_pixels) <= pixel_error)
    tokens = reward.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH)
    assert tokens["input_ids"] == [_ids(prompt) for prompt in prompts]  # [CLS] first, padded to 35

    # the same float32 towers on the same inputs: the same h_[CLS]; the head and the
    # standardisation by hand in float64, against which the reward's float32 head is within `error`
    h = _cls_states(model, pixels, prompts)
    scores, error = _scores_and_head_error(model, h, np.zeros(len(h)))
    assert rewards.shape == (3,) and rewards.dtype == np.float32
    assert np.all(np.abs(rewards - scores) <= error), (rewards - scores, error)
    assert info["image_reward"] == rewards.tolist()  # the same float32 numbers
    # different pairs, different scores: apart by more than any float32 pass's error
    _, pass_error = _score_error(model, pixels, prompts)
    assert all(abs(scores[i] - scores[j]) > pass_error[i] + pass_error[j] for i in range(3) for j in range(i))


def test_score_depends_on_image_and_every_prompt_word(tiny):
    folder, model = tiny
    reward = load_reward("image_reward", _model_params(folder))
    images = _images(4, SIZE, seed=1)
    pixels = torch.tensor(((images / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2), dtype=torch.float32)
    # "a red cat" and "a red dog" differ only after [CLS]: a causal text encoder would score them alike
    prompts = ["a red cat", "a red dog", "a red cat", "a red cat"]
    other_images = images[[0, 0, 3, 2]]
    rewards, _ = reward(images[[0, 0, 2, 3]], prompts, [{}] * 4)
    swapped, _ = reward(other_images, prompts, [{}] * 4)
    scores, error = _score_error(model, pixels[[0, 0, 2, 3]], prompts)
    other_scores, other_error = _score_error(model, pixels[[0, 0, 3, 2]], prompts)
    assert np.all(np.abs(rewards - scores) <= 2 * error)  # two float32 passes, each within `error`
    assert np.all(np.abs(swapped - other_scores) <= 2 * other_error)
    assert abs(rewards[0] - rewards[1]) > 2 * (error[0] + error[1])  # the last word counts
    assert np.all(np.abs(swapped[2:] - rewards[2:]) > 2 * (error[2:] + other_error[2:]))  # so does the image


def test_images_are_resized_and_cropped_as_imagereward(tiny):
    """ImageReward.py's _transform: Resize(224, bicubic) on the PIL image, CenterCrop(224); for a
    square image, a bicubic PIL resize to the crop size."""
    folder, _ = tiny
    reward = load_reward("image_reward", _model_params(folder))
    images = _images(2, 48, seed=2)
    pixels = reward.image_processor(images=[Image.fromarray(image) for image in images],
                                    return_tensors="pt")["pixel_values"]
    resized = np.stack([np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.BICUBIC)) for image in images])
    hand_pixels = ((resized / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2)
    pixel_error = 4 * U32 * ((resized / 255.0 + MEAN) / STD).transpose(0, 3, 1, 2)
    assert np.all(np.abs(pixels.double().numpy() - hand_pixels) <= pixel_error)


def test_batch_size_does_not_change_scores(tiny):
    folder, model = tiny
    images = _images(5, 48, seed=5)  # resized and cropped by the processor
    prompts = ["a cat", "a dog riding a red bike in the painting", "horse", "an photo of the blue", "small"]
    one_batch, _ = load_reward("image_reward", _model_params(folder, batch_size=5))(images, prompts, [{}] * 5)
    reward = load_reward("image_reward", _model_params(folder, batch_size=1))
    one_by_one, _ = reward(images, prompts, [{}] * 5)
    in_pairs, _ = load_reward("image_reward", _model_params(folder, batch_size=2))(images, prompts, [{}] * 5)
    pixels = reward.image_processor(images=[Image.fromarray(image) for image in images],
                                    return_tensors="pt")["pixel_values"]
    _, error = _score_error(model, pixels, prompts)  # each pass within it
    assert np.all(np.abs(one_by_one - one_batch) <= 2 * error)
    assert np.all(np.abs(in_pairs - one_batch) <= 2 * error)
    # the pairs' scores are apart by more than that: pairs mixed up between batches would show
    assert min(abs(one_batch[i] - one_batch[j]) for i in range(5) for j in range(i)) > 2 * error.max()


def test_long_prompts_are_truncated_to_35_tokens(tiny):
    folder, model = tiny
    reward = load_reward("image_reward", _model_params(folder))
    long = " ".join(WORDS * 3)  # 54 words, past the 33 that fit beside [CLS] and [SEP]
    kept = " ".join((WORDS * 3)[:MAX_LENGTH - 2])
    end = " ".join((WORDS * 3)[2 - MAX_LENGTH:])  # what truncating the other side would keep
    images = np.repeat(_images(1, SIZE, seed=4), 3, axis=0)
    rewards, _ = reward(images, [long, kept, end], [{}] * 3)
    pixels = torch.tensor(((images / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2), dtype=torch.float32)
    _, error = _score_error(model, pixels, [kept, kept, end])
    assert abs(rewards[0] - rewards[1]) <= 2 * error[0]  # the same ids in two rows of a pass
    assert abs(rewards[2] - rewards[1]) > 2 * (error[2] + error[1])  # other words: apart by more


def test_published_checkpoint_gives_the_same_scores(tiny, tmp_path):
    folder, _ = tiny
    images = _images(4, 40, seed=5)
    prompts = ["a cat", "the green horse on a bike", "painting of a dog", "big small red blue"]
    from_folder, _ = load_reward("image_reward", _model_params(folder))(images, prompts, [{}] * 4)
    reward = load_reward("image_reward", _checkpoint_params(folder))
    assert isinstance(reward, ImageReward)
    assert reward.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [DEC, ENC]  # as BLIP's init_tokenizer
    from_checkpoint, _ = reward(images, prompts, [{}] * 4)
    # the same weights, ids and float32 operations in the same shapes: the same numbers
    np.testing.assert_array_equal(from_checkpoint, from_folder)
    # a folder holding ImageReward.pt, as the hub repo does
    from_dir, _ = load_reward("image_reward", _checkpoint_params(folder, checkpoint=str(folder)))(
        images, prompts, [{}] * 4)
    np.testing.assert_array_equal(from_dir, from_folder)
    # converted once, saved as a `model` folder, loaded back
    reward.save_pretrained(tmp_path / "converted")
    again, _ = load_reward("image_reward", _model_params(tmp_path, model=str(tmp_path / "converted")))(
        images, prompts, [{}] * 4)
    np.testing.assert_array_equal(again, from_folder)


def test_bad_params_are_one_line_errors(tiny, tmp_path):
    folder, model = tiny
    published = _published_state(model)
    no_norm = tmp_path / "no_norm.pt"  # a checkpoint missing the ViT's final LayerNorm
    torch.save({k: v for k, v in published.items() if k != "blip.visual_encoder.norm.weight"}, no_norm)
    wide = tmp_path / "wide"  # the config of another model: fc1 of 96, not 64
    _config(intermediate_size=96).save_pretrained(wide)
    pickled = tmp_path / "pickled.pt"  # a whole module, which only a full unpickle could load
    torch.save(torch.nn.Linear(2, 2), pickled)
    big_vocab = tmp_path / "big_vocab"  # more tokens than the text encoder's embedding table
    (tmp_path / "vocab.txt").write_text("\n".join([*VOCAB, *(f"word{i}" for i in range(10))]) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(big_vocab)
    bert_config = tmp_path / "bert_config.json"  # a config of another model type
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).to_json_file(
        bert_config)
    checkpoint = _checkpoint_params(folder)
    cases = [
        (_model_params(folder, model=str(tmp_path / "no-model")), "reward.params.model: no such file or folder"),
        (_model_params(folder, model="no-such-org/no-such-imagereward"),
         "reward.params.model: cannot load 'no-such-org/"),
        (_model_params(folder, model=str(folder / "bert")),
         f"reward.params.model: cannot load '{folder / 'bert'}' (no config.json)"),
        (_model_params(folder, model=str(folder / "config")), "reward.params.model: cannot load '"),  # no weights
        ({**checkpoint, "checkpoint": str(tmp_path / "missing.pt")},
         "reward.params.checkpoint: no such file or folder"),
        ({**checkpoint, "checkpoint": "no-such-org/no-such-imagereward"},
         "reward.params.checkpoint: no local 'no-such-org/"),
        ({**checkpoint, "checkpoint": str(tmp_path)}, "reward.params.checkpoint: no 'ImageReward.pt' in"),
        ({**checkpoint, "checkpoint": str(no_norm)},
         f"reward.params.checkpoint: '{no_norm}' does not fit this ImageReward model "
         "(missing 'vision_model.post_layernorm.weight'"),
        ({**checkpoint, "config": str(wide)}, "reward.params.checkpoint: '"),  # size mismatch, below
        ({**checkpoint, "checkpoint": str(pickled)}, "reward.params.checkpoint: cannot read"),
        ({**checkpoint, "config": str(tmp_path / "no-config")}, "reward.params.config: no such file or folder"),
        ({**checkpoint, "config": str(folder / "bert")}, "reward.params.config: cannot load"),  # no config.json
        ({**checkpoint, "config": str(bert_config)}, f"reward.params.config: '{bert_config}' is not a BLIP config"),
        ({**checkpoint, "tokenizer": str(tmp_path / "no-tokenizer")}, "reward.params.tokenizer: no such file"),
        (_model_params(folder, tokenizer=str(big_vocab)), f"reward.params.tokenizer: {len(VOCAB) + 10} tokens, more"),
        (_model_params(folder, checkpoint=str(folder / "ImageReward.pt")), "reward.params.checkpoint: give"),
        (_model_params(folder, config=str(folder / "config")), "reward.params.config: only with"),
        (_model_params(folder, dtype="float8"), "reward.params.dtype: must be one of"),
        (_model_params(folder, batch_size=0), "reward.params.batch_size: must be >= 1"),
        (_model_params(folder, head="x"), "reward.params: 'image_reward' does not take these params"),
    ]
    for params, message in cases:
        with pytest.raises(RewardError) as info:
            load_reward("image_reward", params)
        assert str(info.value).startswith(message), str(info.value)
        assert "\n" not in str(info.value)
    with pytest.raises(RewardError, match=r"size mismatch for vision_model\.encoder\.layers\.0\.mlp\.fc1\.weight"):
        load_reward("image_reward", {**checkpoint, "config": str(wide)})


def test_registry_names_the_class(tiny):
    folder, _ = tiny
    assert check_reward("image_reward", _model_params(folder)) is ImageReward  # checked, nothing loaded
    reward = load_reward("image_reward", _model_params(folder))
    rewards, info = reward(_images(2, SIZE), ["a cat", "a dog"], [{}, {}])
    assert rewards.shape == (2,) and list(info) == ["image_reward"]
    with pytest.raises(RewardError, match="reward 'image_reward': 1 prompts for 2 images"):
        reward(_images(2, SIZE), ["a cat"], [{}, {}])
