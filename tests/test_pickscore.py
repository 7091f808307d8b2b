"""The PickScore reward on a tiny random CLIP, with a word-level tokenizer and a CLIP image
processor saved beside it, loaded through the reward's own loading code (registry,
from_pretrained of model, tokenizer and image processor)."""

import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

from rewards import RewardError, load_reward
from tests.float_error import U32

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])  # CLIP's normalisation
STD = np.array([0.26862954, 0.26130258, 0.27577711])
SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<pad>", "<unk>"]  # bos 0, eos 1 (not 2: legacy pooling), pad 2
WORDS = "a an the cat dog horse photo of painting riding bike red blue green big small on in".split()
VOCAB = {token: i for i, token in enumerate(SPECIALS + WORDS)}
MAX_LENGTH = 16  # the tokenizer's max length and the text position table


def _tower_depth(tower, tokens: int) -> int:
    """Σ n over the reductions of one pass of a CLIP tower's layers: per layer two LayerNorms,
    q/k/v, the attention output and fc1 over the width d, fc2 over the intermediate width, the
    scores over the head dim, softmax's sum and its weighted sum over the tokens, and 8 for the
    elementwise steps (residuals, activation, exp, scaling)."""
    d = tower.hidden_size
    return tower.num_hidden_layers * (5 * d + tower.intermediate_size + d // tower.num_attention_heads + 2 * tokens + 8)


def _score_error(clip, scores: np.ndarray) -> np.ndarray:
    """A bound on one float32 pass's error in a score s = σ·cos(image, text), from the CLIP's
    widths and depth. Each reduction of n terms rounds by at most n·u of its terms (Higham), and
    with every block's input LayerNorm-ed the terms stay on the scale of the values, so an
    embedding is within ε = Σn·u (relative) of the exact one, the sum along its tower's depth
    (`_tower_depth`; the vision tower's patch convolution over 3·p² and two outer LayerNorms, the
    text tower's embedding sum and final LayerNorm, each tower's projection over d); its unit
    vector, normalised in float32 (d squares, a root, a division), within 2ε + (d/2 + 2)·u. A
    cosine of unit vectors moves by at most the sum of their errors, and by d·u for the float32
    dot product; σ = exp(logit scale) and the product round by 2u (exp: 1 ulp) and u of s."""
    vision, text, d = clip.config.vision_config, clip.config.text_config, clip.config.projection_dim
    patches = (vision.image_size // vision.patch_size) ** 2
    vision_error = (3 * vision.patch_size**2 + 3 * vision.hidden_size + _tower_depth(vision, patches + 1)) * U32
    text_error = (1 + 2 * text.hidden_size + _tower_depth(text, text.max_position_embeddings)) * U32
    unit_errors = 2 * vision_error + 2 * text_error + 2 * (d / 2 + 2) * U32
    sigma = clip.logit_scale.double().exp().item()
    return sigma * (unit_errors + d * U32) + 3 * U32 * np.abs(scores)


def save_tiny_clip(folder, config_in_processor: bool = False) -> tuple[CLIPModel, PreTrainedTokenizerFast]:
    """A tiny CLIP (logit scale 100, as trained CLIPs have) saved in `folder/model`, its tokenizer
    and image processor in `folder/processor` (with its config too, `config_in_processor`, as the
    LAION CLIP-H repo holds all three); returns the model and the tokenizer."""
    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|startoftext|>",
                                        eos_token="<|endoftext|>", pad_token="<pad>", unk_token="<unk>",
                                        model_max_length=MAX_LENGTH)
    tokenizer.save_pretrained(folder / "processor")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "processor")
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=len(VOCAB), max_position_embeddings=MAX_LENGTH, bos_token_id=0,
                         eos_token_id=1, pad_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16, logit_scale_init_value=math.log(100.0),
    )
    if config_in_processor:
        config.save_pretrained(folder / "processor")
    torch.manual_seed(0)
    clip = CLIPModel(config).eval()
    clip.save_pretrained(folder / "model")
    return clip, tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny CLIP (PickScore_v1 ships no tokenizer or image processor: they are in
    `processor/`); returns the folder, model, tokenizer."""
    folder = tmp_path_factory.mktemp("pickscore")
    return folder, *save_tiny_clip(folder)


def _params(folder, **extra):
    return {"model": str(folder / "model"), "processor": str(folder / "processor"), "device": "cpu", **extra}


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _features(output) -> torch.Tensor:
    return output if torch.is_tensor(output) else output.pooler_output


def test_score_is_the_scaled_cosine_computed_by_hand(tiny):
    folder, clip, _ = tiny
    prompts = ["a photo of a cat", "a red bike", "the big blue horse riding a small dog"]
    images = _images(3, 32)  # already the crop size: preprocessing is (x / 255 - mean) / std
    reward = load_reward("pickscore", _params(folder))
    rewards, info = reward(images, prompts, [{}] * 3)

    pixels = reward.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
    hand_pixels = ((images / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2)
    # float32 rounds x/255 and the mean, their difference, std and the quotient: 4 u of (x/255 + mean) / std
    pixel_error = 4 * U32 * ((images / 255.0 + MEAN) / STD).transpose(0, 3, 1, 2)
    assert np.all(np.abs(pixels.double().numpy() - hand_pixels) <= pixel_error)
    with torch.no_grad():
        image_embed = _features(clip.get_image_features(pixel_values=pixels)).double().numpy()
        text_embed = np.concatenate([  # one prompt at a time, ids by hand: no padding
            _features(clip.get_text_features(input_ids=torch.tensor([[0, *(VOCAB[w] for w in p.split()), 1]])))
            .double().numpy() for p in prompts])
    cos = (image_embed * text_embed).sum(1) / np.linalg.norm(image_embed, axis=1) / np.linalg.norm(text_embed, axis=1)
    scores = clip.logit_scale.double().exp().item() * cos
    error = _score_error(clip, scores)
    assert rewards.shape == (3,) and rewards.dtype == np.float32
    assert np.all(np.abs(rewards - scores) <= 2 * error)  # the reward's pass and these features' pass
    assert info["pickscore"] == rewards.tolist()  # the same float32 numbers
    # different pairs, different scores: apart by more than both scores' errors
    assert all(abs(scores[i] - scores[j]) > error[i] + error[j] for i in range(3) for j in range(i))


def test_score_depends_on_image_and_prompt_as_clip_logits_do(tiny):
    folder, clip, tokenizer = tiny
    prompts = ["a cat", "a dog riding a bike", "blue painting", "the small green horse"]
    images = _images(4, 40, seed=1)
    reward = load_reward("pickscore", _params(folder))
    rewards, _ = reward(images, prompts, [{}] * 4)
    swapped, _ = reward(images, prompts[1:] + prompts[:1], [{}] * 4)

    pixels = reward.image_processor(images=list(images), return_tensors="pt")["pixel_values"]  # resize + crop
    with torch.no_grad():  # CLIP's own forward: logits_per_image[i, j] for image i, prompt j
        logits = clip(pixel_values=pixels, return_loss=False,
                      **tokenizer(prompts, padding=True, return_tensors="pt")).logits_per_image.numpy()
    diagonal, rotated = np.diag(logits), logits[np.arange(4), (np.arange(4) + 1) % 4]
    # each the reward's pass against CLIP's own: two float32 passes, each within `_score_error`
    assert np.all(np.abs(rewards - diagonal) <= 2 * _score_error(clip, diagonal))
    assert np.all(np.abs(swapped - rotated) <= 2 * _score_error(clip, rotated))
    # another prompt, another score, for every image: apart by more than both scores' errors
    assert np.all(np.abs(swapped - rewards) > _score_error(clip, swapped) + _score_error(clip, rewards))
    other_images, _ = reward(images[::-1].copy(), prompts, [{}] * 4)
    assert np.all(np.abs(other_images - rewards) > _score_error(clip, other_images) + _score_error(clip, rewards))


def test_batch_size_does_not_change_scores(tiny):
    folder, clip, _ = tiny
    images = _images(5, 48, seed=3)  # resized and cropped by the processor
    prompts = ["a cat", "a dog riding a red bike in the painting", "horse", "an photo of the blue", "small"]
    one_batch, _ = load_reward("pickscore", _params(folder, batch_size=5))(images, prompts, [{}] * 5)
    one_by_one, _ = load_reward("pickscore", _params(folder, batch_size=1))(images, prompts, [{}] * 5)
    in_pairs, _ = load_reward("pickscore", _params(folder, batch_size=2))(images, prompts, [{}] * 5)
    error = _score_error(clip, one_batch)  # each pass within it; padding changes nothing more
    assert np.all(np.abs(one_by_one - one_batch) <= 2 * error)
    assert np.all(np.abs(in_pairs - one_batch) <= 2 * error)
    # the pairs' scores are apart by more than that: pairs mixed up between batches would show
    assert min(abs(one_batch[i] - one_batch[j]) for i in range(5) for j in range(i)) > 2 * error.max()


def test_long_prompts_are_truncated_to_the_max_length(tiny):
    folder, clip, _ = tiny
    reward = load_reward("pickscore", _params(folder))
    long = " ".join(WORDS * 2)  # 38 words, past the 16 positions
    kept = " ".join(WORDS[:MAX_LENGTH - 2])  # what fits beside the start and end tokens
    end = " ".join((WORDS * 2)[2 - MAX_LENGTH:])  # what truncating the other side would keep
    images = np.repeat(_images(1, 32, seed=4), 3, axis=0)
    rewards, _ = reward(images, [long, kept, end], [{}] * 3)
    error = _score_error(clip, rewards)
    assert abs(rewards[0] - rewards[1]) <= 2 * error[0]  # the same ids in two rows of a pass, each within `error`
    assert abs(rewards[2] - rewards[1]) > error[2] + error[1]  # other words: apart by more than both errors


def test_bad_params_are_one_line_errors(tiny, tmp_path):
    folder, _, _ = tiny
    model, processor = str(folder / "model"), str(folder / "processor")
    cases = [
        ({"model": str(tmp_path / "no-model")}, "reward.params.model: no such file or folder"),
        ({"model": "no-such-org/no-such-pickscore"}, "reward.params.model: cannot load 'no-such-org/"),
        ({"model": processor}, f"reward.params.model: cannot load '{processor}'"),  # no config.json
        ({"processor": str(tmp_path / "no-processor")}, "reward.params.processor: no such file or folder"),
        ({"processor": str(tmp_path)}, f"reward.params.processor: cannot load '{tmp_path}'"),
        ({"dtype": "float8"}, "reward.params.dtype: must be one of"),
        ({"batch_size": 0}, "reward.params.batch_size: must be >= 1"),
    ]
    for params, message in cases:
        with pytest.raises(RewardError) as info:
            load_reward("pickscore", {"model": model, "processor": processor, "device": "cpu", **params})
        assert str(info.value).startswith(message), str(info.value)
        assert "\n" not in str(info.value)
