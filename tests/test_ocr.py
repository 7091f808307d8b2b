"""The OCR reward (Flow-GRPO's text-rendering reward): the edit distance and the reward formula by
hand on strings, then the reward on a tiny random TrOCR (a ViT encoder and a TrOCR decoder, a
character-level byte-level-BPE tokenizer) saved to a folder and loaded through the reward's own
loading code, held against that model's greedy decode computed here step by step."""

import numpy as np
import pytest
import torch
from transformers import (
    RobertaTokenizer,
    TrOCRConfig,
    TrOCRProcessor,
    ViTConfig,
    ViTImageProcessorPil,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
)

from ddpo.media import Media
from rewards import RewardError, check_reward, compute_reward, load_reward, resolve_reward
from rewards.ocr import OCRReward, edit_distance, ocr_score, target_text

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # RoBERTa's (TrOCR's) order: bos 0, pad 1, eos 2
CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") + ["Ġ"]  # Ġ: a space
VOCAB = {token: i for i, token in enumerate(SPECIALS + CHARS + ["<mask>"])}
EOS = START = VOCAB["</s>"]  # TrOCR's decoder starts from </s>
SIZE = 32  # the encoder's input size
MAX_NEW_TOKENS = 10


# ---------------------------------------------------------------------------------------------
# The formula on strings, by hand.


def test_edit_distance_by_hand():
    cases = [
        ("", "", 0), ("abc", "", 3), ("", "abc", 3), ("abc", "abc", 0),
        ("kitten", "sitting", 3),  # k->s, e->i, insert g
        ("flaw", "lawn", 2),  # delete f, insert n
        ("ab", "ba", 2),  # Levenshtein has no transposition: two substitutions
        ("openlate", "openlane", 1), ("openlate", "opnlate", 1), ("openlate", "openlates", 1),
    ]
    for a, b, distance in cases:
        assert edit_distance(a, b) == distance, (a, b)
        assert edit_distance(b, a) == distance, (b, a)


def test_reward_formula_by_hand():
    target = "OPEN LATE"  # normalised: "openlate", 8 characters
    cases = [
        ("OPEN LATE", 1.0),
        ("open late", 1.0), ("O P E N  l a t e", 1.0), ("OpenLate", 1.0),  # case and spaces do not count
        ("THE OPEN LATE BAR", 1.0),  # contained: d = 0, though d("theopenlatebar", "openlate") = 6
        ("OPEN LANE", 1 - 1 / 8), ("OPN LATE", 1 - 1 / 8), ("OPEN LATES", 1.0),  # "openlates" contains it
        ("OPE", 1 - 5 / 8),  # five insertions
        ("OPENLATR NOW", 1 - 4 / 8),  # r->e and three deletions
        ("", 0.0),  # nothing read: d = 8 = len(target)
        ("xyzxyzxyzxyzxyz", 0.0),  # d = 15 > 8, capped at len(target): 0, not negative
    ]
    for read, reward in cases:
        assert ocr_score(read, target) == pytest.approx(reward, abs=1e-12), read
    assert ocr_score("HELLO", "hi") == 0.0  # d = 4 > 2: the cap again


def test_target_is_the_metadata_text_or_the_first_quoted_text():
    assert target_text('A neon sign that says "OPEN LATE"', {}) == "OPEN LATE"
    assert target_text('A sign that says "FIRST" above "SECOND"', {}) == "FIRST"
    assert target_text('A sign that says "OPEN LATE"', {"text": "CLOSED", "seed": 3}) == "CLOSED"  # metadata wins
    assert target_text("a storefront sign", {"text": "Bakery 24/7"}) == "Bakery 24/7"
    bad = [
        ("a cat on a mat", {}, "reward 'ocr': prompt 'a cat on a mat' names no text to render"),
        ('a sign that says "OPEN', {}, "reward 'ocr': prompt 'a sign that says \"OPEN' names no text"),  # no pair
        ('a sign that says " "', {}, "reward 'ocr': prompt 'a sign that says \" \"': its quoted text"),
        ('a sign that says "OPEN"', {"text": ""}, "reward 'ocr': prompt 'a sign that says \"OPEN\"': its metadata"),
        ("a sign", {"text": 7}, "reward 'ocr': prompt 'a sign': its metadata \"text\" must be a non-empty string"),
    ]
    for prompt, metadata, message in bad:
        with pytest.raises(RewardError) as info:
            target_text(prompt, metadata)
        assert str(info.value).startswith(message), str(info.value)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# A tiny TrOCR.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random TrOCR with its processor in one folder, as the hub's TrOCRs ship. Random
    weights read random text, so three changes make it read on: the output projection is untied
    from the embeddings and drawn N(0, 1) (logits of a few units, far apart, instead of ~0.02),
    the special tokens' rows are zero (logit 0: never end before max_new_tokens, and read
    characters rather than specials), and the cross-attention outputs are 30x larger, so that
    what it reads depends on the image. Returns the folder, the model and the tokenizer."""
    folder = tmp_path_factory.mktemp("trocr")
    tokenizer = RobertaTokenizer(vocab=VOCAB, merges=[])  # byte-level BPE, one token a character
    encoder = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        image_size=SIZE, patch_size=8)
    decoder = TrOCRConfig(vocab_size=len(VOCAB), d_model=32, decoder_layers=2, decoder_attention_heads=2,
                          decoder_ffn_dim=64, max_position_embeddings=64, tie_word_embeddings=False,
                          bos_token_id=VOCAB["<s>"], pad_token_id=VOCAB["<pad>"], eos_token_id=EOS,
                          decoder_start_token_id=START)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = START, VOCAB["<pad>"], EOS
    config.tie_word_embeddings = False
    torch.manual_seed(3)  # with seed 3, the six test images' reads differ from their first characters on
    model = VisionEncoderDecoderModel(config).eval()
    with torch.no_grad():
        projection = model.decoder.output_projection.weight
        projection.normal_(0.0, 1.0)
        projection[[VOCAB[token] for token in SPECIALS + ["<mask>"]]] = 0.0
        for layer in model.decoder.model.decoder.layers:
            layer.encoder_attn.out_proj.weight.mul_(30.0)
    model.save_pretrained(folder)
    TrOCRProcessor(image_processor=ViTImageProcessorPil(size={"height": SIZE, "width": SIZE}),
                   tokenizer=tokenizer).save_pretrained(folder)
    return folder, model, tokenizer


def _params(folder, **extra):
    return {"model": str(folder), "device": "cpu", "max_new_tokens": MAX_NEW_TOKENS, **extra}


def _images() -> np.ndarray:
    """Six images of the encoder's size (the processor's resize leaves them as they are), each
    read differently by the tiny model: black, white, red, blue, top half white, left half green."""
    images = np.zeros((6, SIZE, SIZE, 3), dtype=np.uint8)
    images[1] = 255
    images[2, ..., 0] = 255
    images[3, ..., 2] = 255
    images[4, :SIZE // 2] = 255
    images[5, :, :SIZE // 2, 1] = 255
    return images


@torch.no_grad()
def _greedy_read(model, tokenizer, image: np.ndarray) -> tuple[str, float]:
    """TrOCR's greedy decode of one image by hand: ViT's preprocessing ((x / 255 - 0.5) / 0.5),
    then from </s> the argmax token of the full forward pass at each step, until </s> or
    MAX_NEW_TOKENS tokens. Returns the text and the smallest gap between a step's two largest
    logits."""
    pixels = torch.tensor((image / 255.0 - 0.5) / 0.5, dtype=torch.float32).permute(2, 0, 1)[None]
    ids, gaps = [START], []
    for _ in range(MAX_NEW_TOKENS):
        logits = model(pixel_values=pixels, decoder_input_ids=torch.tensor([ids])).logits[0, -1]
        top = logits.topk(2)
        gaps.append((top.values[0] - top.values[1]).item())
        ids.append(top.indices[0].item())
        if ids[-1] == EOS:
            break
    return tokenizer.decode(ids, skip_special_tokens=True).strip(), min(gaps)


def test_reward_is_the_formula_on_the_models_greedy_decode(tiny):
    folder, model, tokenizer = tiny
    images = _images()
    reads, gaps = zip(*(_greedy_read(model, tokenizer, image) for image in images))
    # The reward's decode differs from this one only by float32 rounding (its processor's
    # float32 pixels, a batch, cached attention): with logits of a few units from sums of at most
    # 64 terms through four layers, that moves a logit by well under 1e-3 (Higham: n u per sum,
    # u = 6e-8), so a step whose top two logits are 1e-2 apart picks the same token both ways.
    assert min(gaps) > 1e-2
    assert len(set(reads)) == len(reads)  # each image read differently: batches mixed up would show
    assert all(reads)

    # targets: what is read (metadata), a part of it (quoted: contained), one character changed,
    # one character more, its first seven characters and two it cannot read (d = 3), and only two
    # it cannot read (d = 10 > 2, capped: 0)
    changed = ("x" if reads[2][0].lower() != "x" else "y") + reads[2][1:]
    targets = [reads[0], reads[1][2:6], changed, reads[3] + "Q", reads[4][:7] + "#%", "#%"]
    prompts = [f'A sign that says "{target}"' for target in targets]
    prompts[0] = "a storefront sign"  # its target only in the metadata
    metadata = [{"batch_id": "e0-b0", "seed": i, "policy_version": 0} for i in range(6)]
    metadata[0]["text"] = targets[0]
    expected = [ocr_score(read, target) for read, target in zip(reads, targets)]
    assert expected[:2] == [1.0, 1.0] and expected[2] == 1 - 1 / len(changed.replace(" ", ""))
    assert expected[4] == 1 - 3 / 9 and expected[5] == 0.0

    for batch_size in (4, 1):  # a batch of 4 and one of 2; one image at a time
        reward = load_reward("ocr", _params(folder, batch_size=batch_size))
        rewards, info = compute_reward("ocr", reward, Media.from_images(images), prompts, metadata)
        assert rewards.dtype == np.float32
        assert rewards.tolist() == np.array(expected, dtype=np.float32).tolist()
        assert info["answer"] == list(reads)
        assert info["target"] == targets
        assert info["ocr"] == rewards.tolist()


def test_metadata_text_overrides_the_quoted_text(tiny):
    folder, model, tokenizer = tiny
    images = _images()[:2]
    reads = [_greedy_read(model, tokenizer, image)[0] for image in images]
    reward = load_reward("ocr", _params(folder))
    prompts = [f'A sign that says "{reads[1]}"', f'A sign that says "{reads[0]}"']  # each the other's text
    from_quotes, _ = reward(images, prompts, [{}, {}])
    from_metadata, info = reward(images, prompts, [{"text": reads[0]}, {"text": reads[1]}])
    expected = [ocr_score(reads[0], reads[1]), ocr_score(reads[1], reads[0])]
    assert from_quotes.tolist() == np.array(expected, dtype=np.float32).tolist()
    assert from_quotes.max() < 1.0
    assert from_metadata.tolist() == [1.0, 1.0] and info["target"] == reads


def test_errors_are_one_line_and_name_the_param_or_prompt(tiny, tmp_path):
    folder, _, _ = tiny
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ({"model": str(tmp_path / "no-trocr")}, "reward.params.model: no such file or folder"),
        ({"model": str(empty)}, f"reward.params.model: cannot load '{empty}'"),
        ({"model": "no-such-org/no-such-trocr"}, "reward.params.model: cannot load 'no-such-org/no-such-trocr'"),
        ({"dtype": "float8"}, "reward.params.dtype: must be one of"),
        ({"batch_size": 0}, "reward.params.batch_size: must be >= 1"),
        ({"max_new_tokens": 0}, "reward.params.max_new_tokens: must be >= 1"),
        ({"beams": 4}, "reward.params: 'ocr' does not take these params"),
    ]
    for params, message in cases:
        with pytest.raises(RewardError) as info:
            load_reward("ocr", _params(folder, **params))
        assert str(info.value).startswith(message), str(info.value)
        assert "\n" not in str(info.value)

    reward = load_reward("ocr", _params(folder))
    images = _images()[:2]
    for prompts, metadata, message in [
        (['a sign that says "OPEN"', "a photo of a cat"], [{}, {}],
         "reward 'ocr': prompt 'a photo of a cat' names no text to render"),
        (['a sign that says "OPEN"'], [{}], "reward 'ocr': 1 prompts and 1 metadata for 2 images"),
    ]:
        with pytest.raises(RewardError) as info:
            compute_reward("ocr", reward, Media.from_images(images), prompts, metadata)  # passed on as it is, named
        assert str(info.value).startswith(message), str(info.value)
        assert "\n" not in str(info.value)


def test_registry_names_the_class():
    assert resolve_reward("ocr") is OCRReward
    assert check_reward("ocr", {"model": "microsoft/trocr-base-printed", "max_new_tokens": 16}) is OCRReward
