"""A VLM as a yes/no judge: the reward is the probability that the VLM answers "yes" to a question
about the image, read from its first answer token (as VQAScore, Lin et al. 2024, arXiv
2404.01291, and verl-omni's vLLM judge).

For a question q about image x, with Y the yes tokens ("Yes", "yes", " Yes", " yes") and N the
no tokens, the first answer token's distribution p(t | x, q) gives

    P(yes) = Σ_{t∈Y} p(t) / (Σ_{t∈Y} p(t) + Σ_{t∈N} p(t))     (normalize: true, the default)
    P(yes) = Σ_{t∈Y} p(t)                                       (normalize: false)

The normalised form is the judge's answer among yes and no only: probability the model puts on
other first tokens ("The", "I") does not pull it down. Several questions are combined per image
by their product (each must hold) or mean.

The VLM is served as the prompt-alignment reward's (rewards/alignment.py): the transformers
backend runs one forward pass and takes the log-softmax of the logits at the last position over
the whole vocabulary; the vLLM backend samples one token with SamplingParams(max_tokens=1,
logprobs=k) and sees only the k most likely first tokens, so a yes or no token outside them
counts as p = 0 (k = `logprobs`, 20 by default; when neither a yes nor a no token is among
them, P(yes) = P(no) = 0).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from rewards import RewardError
from rewards.alignment import _format, load_vlm

YES_TOKENS = ("Yes", "yes", " Yes", " yes")
NO_TOKENS = ("No", "no", " No", " no")
COMBINE = ("product", "mean")


def answer_token_ids(tokenizer: Any, strings: Sequence[str], param: str) -> list[int]:
    """The token ids of those `strings` the tokenizer encodes as one known token, each id once
    (" Yes" and "Yes" are one token in some tokenizers); none is a one-line error naming
    `reward.params.<param>`."""
    ids: list[int] = []
    for text in strings:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] != tokenizer.unk_token_id and encoded[0] not in ids:
            ids.append(encoded[0])
    if not ids:
        raise RewardError(f"reward.params.{param}: none of {list(strings)} is a single token of the "
                          "model's tokenizer")
    return ids


def _logsumexp(log_probs: np.ndarray) -> np.ndarray:
    """log Σ exp over the last axis, -inf where every term is -inf."""
    top = log_probs.max(axis=-1, keepdims=True)
    shift = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.exp(log_probs - shift).sum(axis=-1)) + shift[..., 0])


def yes_no_probabilities(log_p_yes: np.ndarray, log_p_no: np.ndarray,
                         normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """(P(yes), P(no)) from log Σ p over the yes and the no tokens: each over both (normalize),
    or as they are. Neither among a vLLM top-k (both -inf): 0 and 0."""
    if not normalize:
        return np.exp(log_p_yes), np.exp(log_p_no)
    log_total = np.logaddexp(log_p_yes, log_p_no)
    answered = np.isfinite(log_total)
    safe_total = np.where(answered, log_total, 0.0)
    return (np.where(answered, np.exp(log_p_yes - safe_total), 0.0),
            np.where(answered, np.exp(log_p_no - safe_total), 0.0))


def answer_text(p_yes: float, p_no: float) -> str:
    """The likelier answer and its probability, as shown under an image: "yes 0.93"; "neither"
    when vLLM's top-k held no yes and no no token."""
    if p_yes == p_no == 0:
        return "neither"
    return f"yes {p_yes:.2f}" if p_yes >= p_no else f"no {p_no:.2f}"


def combine_probabilities(probabilities: np.ndarray, combine: str) -> np.ndarray:
    """The reward from per-question (or per-check) probabilities [B, Q]: product or mean over Q."""
    return probabilities.prod(axis=1) if combine == "product" else probabilities.mean(axis=1)


def check_combine(combine: str) -> None:
    if combine not in COMBINE:
        raise RewardError(f"reward.params.combine: must be one of {list(COMBINE)}, got '{combine}'")


class YesNoJudge:
    """The VLM and its yes/no tokens: `probabilities(images, questions)` asks each image its
    question (one request per pair) and returns (P(yes), P(no)) per pair, as the module docstring."""

    def __init__(self, model: str, backend: str, prompt_template: str, yes_tokens: Sequence[str],
                 no_tokens: Sequence[str], normalize: bool, logprobs: int, batch_size: int, device: str,
                 dtype: str, gpu_memory_utilization: float, max_model_len: int | None,
                 limit_mm_per_prompt: dict[str, int] | None, tensor_parallel_size: int,
                 vllm_engine_args: dict[str, Any] | None):
        _format("prompt_template", prompt_template, question="")
        if not isinstance(logprobs, int) or logprobs < 1:
            raise RewardError(f"reward.params.logprobs: must be a whole number >= 1, got {logprobs!r}")
        self.prompt_template, self.normalize, self.logprobs = prompt_template, bool(normalize), logprobs
        # vLLM refuses more log-probs than the engine's max_logprobs (20 unless set)
        engine_args = {"max_logprobs": max(logprobs, 20), **(vllm_engine_args or {})}
        self.backend = load_vlm("model", model, backend, batch_size, device, dtype, gpu_memory_utilization,
                                max_model_len, limit_mm_per_prompt, tensor_parallel_size, engine_args)
        self.yes_ids = answer_token_ids(self.backend.tokenizer, yes_tokens, "yes_tokens")
        self.no_ids = answer_token_ids(self.backend.tokenizer, no_tokens, "no_tokens")
        # vLLM's top-k fails (and kills its engine) for k beyond the vocabulary
        self.logprobs = min(logprobs, len(self.backend.tokenizer))
        shared = set(self.yes_ids) & set(self.no_ids)
        if shared:
            raise RewardError(f"reward.params.no_tokens: {self.backend.tokenizer.convert_ids_to_tokens(sorted(shared))} "
                              "are yes tokens too")

    def probabilities(self, images: list[Image.Image], questions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        prompts = [self.prompt_template.format(question=question) for question in questions]
        log_probs = self.backend.first_token_log_probs(images, prompts, self.yes_ids + self.no_ids, self.logprobs)
        yes = len(self.yes_ids)
        return yes_no_probabilities(_logsumexp(log_probs[:, :yes]), _logsumexp(log_probs[:, yes:]), self.normalize)


def template_fields(template: str, param: str) -> set[str]:
    """The named fields of a question template ({prompt}, {color}, {include[0][class]} -> include);
    a malformed template or a positional field ({}) is a one-line error naming the param."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise RewardError(f"reward.params.{param}: {template!r} is not a template ({err})") from None
    roots = {name.split(".", 1)[0].split("[", 1)[0] for name in names}
    if "" in roots or any(root.isdigit() for root in roots):
        raise RewardError(f"reward.params.{param}: {template!r} has a positional field; name each field "
                          "({prompt} or a metadata field)")
    return roots


def format_question(template: str, prompt: str, metadata: dict[str, Any], param: str = "question") -> str:
    """A question template filled with {prompt} and the prompt's metadata fields; a field the
    metadata does not have is a one-line error naming it, the question and the prompt."""
    fields = {**metadata, "prompt": prompt}
    missing = sorted(template_fields(template, param) - fields.keys())
    if missing:
        raise RewardError(f"reward.params.{param}: {template!r} needs the metadata field '{missing[0]}', which "
                          f"prompt '{prompt}' does not have (its fields: {sorted(fields)})")
    try:
        return template.format_map(fields)
    except (KeyError, IndexError, AttributeError, TypeError, ValueError) as err:
        raise RewardError(f"reward.params.{param}: {template!r} cannot be filled from the metadata of prompt "
                          f"'{prompt}' ({type(err).__name__}: {err})") from None


class VLMJudge:
    """r = P(yes) of the VLM's answer to `question` about each image (several questions: their
    product or mean, `combine`); info holds each question's P(yes) (`p_yes`, or `p_yes_<i>` for
    the i-th of several) and the `answer` ("yes 0.93", one per question, "; " between).

    A question is a template filled with {prompt} and the prompt's metadata fields (from a JSON
    Lines prompts file; every call also has batch_id, seed and policy_version), e.g. "Does this
    image show {count} {object}?". `prompt_template` wraps it for the VLM ({question}; the
    default is LLaVA-1.5's, set the model's own for others); `yes_tokens`/`no_tokens` are the
    first-token strings that count as each answer (those the tokenizer encodes as one token).
    `device` and `dtype` are for the transformers backend; vLLM places itself and takes
    `vllm_engine_args` as they are. With vLLM only the `logprobs` most likely first tokens have
    log-probs (it also sets the engine's max_logprobs): a yes or no token outside them counts as
    p = 0, and an answer with neither among them as P(yes) = 0.
    """

    def __init__(self, model: str = "llava-hf/llava-1.5-7b-hf", backend: str = "transformers",
                 question: str | Sequence[str] = 'Does this figure show "{prompt}"? Please answer yes or no.',
                 combine: str = "product", prompt_template: str = "USER: <image>\n{question} ASSISTANT:",
                 yes_tokens: Sequence[str] = YES_TOKENS, no_tokens: Sequence[str] = NO_TOKENS,
                 normalize: bool = True, logprobs: int = 20, batch_size: int = 16, device: str = "auto",
                 dtype: str = "auto", gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 limit_mm_per_prompt: dict[str, int] | None = None, tensor_parallel_size: int = 1,
                 vllm_engine_args: dict[str, Any] | None = None):
        self.questions = [question] if isinstance(question, str) else list(question)
        if not self.questions or not all(isinstance(q, str) and q.strip() for q in self.questions):
            raise RewardError(f"reward.params.question: a question, or a list of them, each a non-empty string; "
                              f"got {question!r}")
        for template in self.questions:
            template_fields(template, "question")
        check_combine(combine)
        self.combine = combine
        self.judge = YesNoJudge(model, backend, prompt_template, yes_tokens, no_tokens, normalize, logprobs,
                                batch_size, device, dtype, gpu_memory_utilization, max_model_len,
                                limit_mm_per_prompt, tensor_parallel_size, vllm_engine_args)

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict]) -> tuple[np.ndarray, dict]:
        count = len(self.questions)
        questions = [format_question(template, prompt, fields)  # image-major: image i's questions together
                     for prompt, fields in zip(prompts, metadata) for template in self.questions]
        pil_images = [Image.fromarray(image) for image in images for _ in range(count)]
        p_yes, p_no = (p.reshape(len(images), count) for p in self.judge.probabilities(pil_images, questions))
        rewards = combine_probabilities(p_yes, self.combine)
        info: dict[str, list] = {"answer": ["; ".join(answer_text(y, n) for y, n in zip(row_yes, row_no))
                                            for row_yes, row_no in zip(p_yes, p_no)]}
        names = ["p_yes"] if count == 1 else [f"p_yes_{i}" for i in range(count)]
        info.update({name: p_yes[:, i].tolist() for i, name in enumerate(names)})
        return rewards, info
