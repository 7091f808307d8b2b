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

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])  # CLIP's normalisation
STD = np.array([0.26862954, 0.26130258, 0.27577711])
SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<pad>", "<unk>"]  # bos 0, eos 1 (not 2: legacy pooling), pad 2
WORDS = "a an the cat dog horse photo of painting riding bike red blue green big small on in".split()
VOCAB = {token: i for i, token in enumerate(SPECIALS + WORDS)}
MAX_LENGTH = 16  # the tokenizer's max length and the text position table


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny CLIP (logit scale 100, as trained CLIPs have) in `model/`, its tokenizer and image
    processor in `processor/` (PickScore_v1 ships neither); returns the folder, model, tokenizer."""
    folder = tmp_path_factory.mktemp("pickscore")
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
    torch.manual_seed(0)
    clip = CLIPModel(config).eval()
    clip.save_pretrained(folder / "model")
    return folder, clip, tokenizer


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
    rewards, info = load_reward("pickscore", _params(folder))(images, prompts, [{}] * 3)

    pixels = torch.tensor(((images / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2), dtype=torch.float32)
    with torch.no_grad():
        image_embed = _features(clip.get_image_features(pixel_values=pixels)).double().numpy()
        text_embed = np.concatenate([  # one prompt at a time, ids by hand: no padding
            _features(clip.get_text_features(input_ids=torch.tensor([[0, *(VOCAB[w] for w in p.split()), 1]])))
            .double().numpy() for p in prompts])
    cos = (image_embed * text_embed).sum(1) / np.linalg.norm(image_embed, axis=1) / np.linalg.norm(text_embed, axis=1)
    assert rewards.shape == (3,) and rewards.dtype == np.float32
    np.testing.assert_allclose(rewards, 100.0 * cos, rtol=1e-5, atol=1e-4)
    assert info["pickscore"] == pytest.approx(rewards.tolist())
    assert not np.allclose(rewards, rewards[0], atol=1e-2)


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
    np.testing.assert_allclose(rewards, np.diag(logits), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(swapped, logits[np.arange(4), (np.arange(4) + 1) % 4], rtol=1e-5, atol=1e-4)
    assert np.abs(swapped - rewards).min() > 1e-3  # another prompt, another score, for every image
    other_images, _ = reward(images[::-1].copy(), prompts, [{}] * 4)
    assert np.abs(other_images - rewards).min() > 1e-3


def test_batch_size_does_not_change_scores(tiny):
    folder, _, _ = tiny
    images = _images(5, 48, seed=3)  # resized and cropped by the processor
    prompts = ["a cat", "a dog riding a red bike in the painting", "horse", "an photo of the blue", "small"]
    one_batch, _ = load_reward("pickscore", _params(folder, batch_size=5))(images, prompts, [{}] * 5)
    one_by_one, _ = load_reward("pickscore", _params(folder, batch_size=1))(images, prompts, [{}] * 5)
    in_pairs, _ = load_reward("pickscore", _params(folder, batch_size=2))(images, prompts, [{}] * 5)
    np.testing.assert_allclose(one_by_one, one_batch, rtol=1e-5, atol=1e-4)  # padding changes nothing
    np.testing.assert_allclose(in_pairs, one_batch, rtol=1e-5, atol=1e-4)


def test_long_prompts_are_truncated_to_the_max_length(tiny):
    folder, _, _ = tiny
    reward = load_reward("pickscore", _params(folder))
    long = " ".join(WORDS * 2)  # 38 words, past the 16 positions
    kept = " ".join(WORDS[:MAX_LENGTH - 2])  # what fits beside the start and end tokens
    images = np.repeat(_images(1, 32, seed=4), 2, axis=0)
    rewards, _ = reward(images, [long, kept], [{}] * 2)
    np.testing.assert_allclose(rewards[0], rewards[1], rtol=1e-5, atol=1e-4)


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
