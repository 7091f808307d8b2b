"""Text rendering: Flow-GRPO's OCR reward (Liu et al. 2025, arXiv 2505.05470, Sec. 5; its
`flow_grpo/ocr.py`, github.com/yifan123/flow_grpo). The text an OCR engine reads in the image is
held against the text the prompt asks for:

    r = 1 - min(1, d(read, target) / len(target)),

d the Levenshtein edit distance, both strings lower-cased with their spaces removed, and d = 0
when the target is contained in what is read (extra text around it is not penalised). The cap at
len(target) keeps r in [0, 1]: a page of unrelated text scores 0, no lower than nothing read.

The target is the prompt metadata's "text" (a JSON Lines prompts file, {"prompt": ..., "text":
...}) when given, else the text between the prompt's first pair of double quotes, as in
Flow-GRPO's prompts (`A neon sign that says "OPEN LATE"`).

The engine: Flow-GRPO reads with PaddleOCR (a text detector, then a recogniser for each line it
finds, the lines joined). PaddleOCR needs the PaddlePaddle framework and EasyOCR needs
torchvision, neither of which this project's environment has, so this reward reads with
transformers' TrOCR (Li et al. 2021; default `microsoft/trocr-base-printed`), a ViT encoder and a
text decoder, decoded greedily. TrOCR is a recogniser only: it reads ONE line of text from the
whole image, resized to its input size (384x384). It suits images of one sign, label or line of
text, the usual text-rendering prompt; scenes with text in several places, small or rotated,
need a detector in front of a recogniser (PaddleOCR's pipeline) to be read reliably."""

from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image
from transformers import GenerationConfig, TrOCRProcessor, VisionEncoderDecoderModel

from rewards import RewardError
from rewards.aesthetic import _check_local_or_repo_id, _reason, clip_settings

QUOTED = re.compile(r'"([^"]*)"')  # the first pair of straight double quotes, as Flow-GRPO's prompts


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest single-character insertions, deletions and substitutions
    that turn `a` into `b` (Wagner-Fischer's dynamic programme, one row at a time)."""
    previous = list(range(len(b) + 1))  # d(a[:0], b[:j]) = j
    for i, char_a in enumerate(a, 1):
        current = [i]  # d(a[:i], b[:0]) = i
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1,  # delete a[i-1]
                               current[j - 1] + 1,  # insert b[j-1]
                               previous[j - 1] + (char_a != char_b)))  # substitute, or keep a match
        previous = current
    return previous[-1]


def normalise(text: str) -> str:
    """Flow-GRPO's normalisation of both strings: spaces removed, lower-cased."""
    return text.replace(" ", "").lower()


def ocr_score(read: str, target: str) -> float:
    """r = 1 - min(1, d(read, target) / len(target)) on the normalised strings, d = 0 when the
    target is contained in what is read (flow_grpo/ocr.py `OcrScorer.__call__`). The target must
    not be empty once normalised (`target_text` makes sure)."""
    read, target = normalise(read), normalise(target)
    distance = 0 if target in read else edit_distance(read, target)
    return 1.0 - min(distance, len(target)) / len(target)


def target_text(prompt: str, metadata: dict) -> str:
    """The text the image should show: metadata["text"] when present, else the prompt's first
    double-quoted text; neither, or one that is empty once normalised, is a one-line RewardError
    naming the prompt."""
    if "text" in metadata:
        text = metadata["text"]
        if not isinstance(text, str) or not normalise(text):
            raise RewardError(f"reward 'ocr': prompt '{prompt}': its metadata \"text\" must be a non-empty "
                              f"string, got {text!r}")
        return text
    quoted = QUOTED.search(prompt)
    if quoted is None:
        raise RewardError(f"reward 'ocr': prompt '{prompt}' names no text to render: put it in double "
                          "quotes in the prompt, or give it as \"text\" in a JSON Lines prompts file")
    if not normalise(quoted.group(1)):
        raise RewardError(f"reward 'ocr': prompt '{prompt}': its quoted text to render is empty")
    return quoted.group(1)


class OCRReward:
    """r = Flow-GRPO's OCR reward of what TrOCR reads in each image against its target text, in
    [0, 1] (higher is better); info's `answer` is the text read, `target` the text asked for.

    `model` is a TrOCR VisionEncoderDecoderModel with its TrOCRProcessor (image processor and
    tokenizer) in the same folder or hub repo; each image is read greedily, at most
    `max_new_tokens` tokens (TrOCR's BPE tokens hold about 3-4 characters each)."""

    def __init__(self, model: str = "microsoft/trocr-base-printed", device: str = "auto",
                 dtype: str = "float32", batch_size: int = 32, max_new_tokens: int = 32):
        self.device, self.dtype, self.batch_size = clip_settings(device, dtype, batch_size)
        if max_new_tokens < 1:
            raise RewardError(f"reward.params.max_new_tokens: must be >= 1, got {max_new_tokens}")
        _check_local_or_repo_id(model, "model")
        try:
            # the PIL image processor, whether or not torchvision is there
            self.processor = TrOCRProcessor.from_pretrained(model, backend="pil")
            self.model = VisionEncoderDecoderModel.from_pretrained(model).to(self.device, self.dtype).eval()
        except (OSError, ValueError, TypeError) as err:
            raise RewardError(f"reward.params.model: cannot load '{model}' ({_reason(err)})") from None
        # greedy decoding, whatever beam search or n-gram bans the model's generation config holds
        # (a ban on repeated n-grams would stop it reading "NO NO NO NO"); only its special tokens are kept
        saved, config = self.model.generation_config, self.model.config
        start = (saved.decoder_start_token_id if saved.decoder_start_token_id is not None
                 else config.decoder_start_token_id)
        if start is None:
            raise RewardError(f"reward.params.model: '{model}' has no decoder_start_token_id in its config")
        self.generation_config = GenerationConfig(
            decoder_start_token_id=start, bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id,
            pad_token_id=saved.pad_token_id, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)

    def read(self, images: np.ndarray) -> list[str]:
        """The text TrOCR reads in each image (one line each), special tokens dropped."""
        texts = []
        for start in range(0, len(images), self.batch_size):
            batch = [Image.fromarray(image) for image in images[start:start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            ids = self.model.generate(pixel_values=pixels.to(self.device, self.dtype),
                                      generation_config=self.generation_config)
            texts += [text.strip() for text in self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return texts

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict]):
        if len(prompts) != len(images) or len(metadata) != len(images):
            raise RewardError(f"reward 'ocr': {len(prompts)} prompts and {len(metadata)} metadata "
                              f"for {len(images)} images")
        targets = [target_text(prompt, meta) for prompt, meta in zip(prompts, metadata)]  # before reading
        read = self.read(images)
        rewards = np.array([ocr_score(text, target) for text, target in zip(read, targets)], dtype=np.float32)
        return rewards, {"ocr": rewards.tolist(), "answer": read, "target": targets}
