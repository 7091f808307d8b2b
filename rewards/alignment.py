"""Prompt-image alignment (DDPO, Sec. 6.3): a LLaVA-style VLM describes each image, and the
reward is the BERTScore recall of its answer against the prompt.

As in the paper's reward server, the answer is the candidate and "The image contains {prompt}"
the reference, so recall averages, over the reference's tokens, how well each is matched by some
token of the answer: it rises when the description covers what the prompt asked for, and extra
detail in the answer does not lower it (that is what precision would measure).

Two backends ask the VLM the same prompt and return its raw text, parsed the same way: the
transformers one (`generate`, greedy) and an offline vLLM engine (one batched `generate`, greedy).
They also give the log-probs of an answer's first token, which the yes/no judges read
(rewards/vlm_judge.py, rewards/geneval.py).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import threading
from collections.abc import Iterator, Sequence
from importlib.util import find_spec
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from rewards import RewardError, RewardProcessDead
from rewards.bertscore import BERTScorer

BACKENDS = ("transformers", "vllm")


def parse_answer(text: str, stop: list[str]) -> str:
    """The VLM's answer: the generated text stripped, cut at the first stop string, stripped."""
    text = text.strip()
    for stop_string in stop:
        text = text.split(stop_string, 1)[0]
    return text.strip()


@contextlib.contextmanager
def _loading(param: str, path: str) -> Iterator[None]:
    """A model that cannot be loaded is one line naming the reward param to fix."""
    try:
        yield
    except OSError as err:
        if path.startswith(("/", ".", "~")) and not os.path.exists(os.path.expanduser(path)):
            reason = "no such folder"
        else:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RewardError(f"reward.params.{param}: cannot load '{path}' ({reason})") from None


class TransformersBackend:
    """The VLM through transformers: AutoProcessor + AutoModelForImageTextToText, batches padded on
    the left, so that every row's last token is at the last position."""

    def __init__(self, model: str, batch_size: int, device: str, dtype: str):
        self.processor = AutoProcessor.from_pretrained(model)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues each row's end
        self.tokenizer = self.processor.tokenizer
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).to(device).eval()
        self.batch_size = batch_size

    def _batches(self, images: list[Image.Image], prompts: list[str]) -> Iterator[Any]:
        for start in range(0, len(images), self.batch_size):
            end = start + self.batch_size
            yield self.processor(images=images[start:end], text=prompts[start:end], padding=True,
                                 return_tensors="pt").to(self.model.device, dtype=self.model.dtype)

    @torch.inference_mode()
    def answer(self, images: list[Image.Image], prompts: list[str], max_new_tokens: int) -> list[str]:
        """Each prompt's answer, greedy, at most `max_new_tokens` tokens."""
        answers = []
        for inputs in self._batches(images, prompts):
            output = self.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
            new_tokens = output[:, inputs["input_ids"].shape[1]:]
            answers += self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return answers

    @torch.inference_mode()
    def first_token_log_probs(self, images: list[Image.Image], prompts: list[str], token_ids: list[int],
                              top_k: int) -> np.ndarray:
        """log p(token | image, prompt) of the answer's first token, for each of `token_ids`
        [len(prompts), len(token_ids)], float64: one forward pass, the log-softmax of the logits
        at the last position over the whole vocabulary (`top_k` is the vLLM backend's limit; here
        every token has its log-prob)."""
        rows = []
        for inputs in self._batches(images, prompts):
            logits = self.model(**inputs, logits_to_keep=1).logits[:, -1]  # [batch, vocab]
            rows.append(logits.double().log_softmax(dim=-1)[:, token_ids].cpu())
        return torch.cat(rows).numpy()


class VLLMBackend:
    """The VLM served by an offline vLLM engine (its engine core runs in a child process)."""

    def __init__(self, model: str, dtype: str, gpu_memory_utilization: float, max_model_len: int | None,
                 limit_mm_per_prompt: dict[str, int], tensor_parallel_size: int, engine_args: dict[str, Any]):
        try:
            import pydantic
            import vllm
            from vllm.v1.engine.exceptions import EngineDeadError
        except ImportError:
            raise RewardError("reward.params.backend: vllm is not installed; on GPU machines "
                              "`pip install 'ddpo-ray[vllm]'`, on CPU see the README") from None
        self.engine_dead_error, self.sampling_params = EngineDeadError, vllm.SamplingParams
        children = set(multiprocessing.active_children())
        try:
            self.llm = vllm.LLM(model=model, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                                max_model_len=max_model_len, limit_mm_per_prompt=limit_mm_per_prompt,
                                tensor_parallel_size=tensor_parallel_size, **engine_args)
        except pydantic.ValidationError as err:  # vLLM checks its engine config with pydantic
            hint = ("; without torchvision, vLLM's own LLaVA-style modules cannot load: set "
                    "vllm_engine_args: {model_impl: transformers}" if find_spec("torchvision") is None else "")
            raise RewardError(f"reward.params: vLLM cannot start an engine for '{model}' "
                              f"({err.errors()[0]['msg']}){hint}") from None
        self.engine_processes = [p for p in multiprocessing.active_children() if p not in children]
        self.tokenizer = self.llm.get_tokenizer()

    def answer(self, images: list[Image.Image], prompts: list[str], max_new_tokens: int) -> list[str]:
        """Each prompt's answer, greedy, at most `max_new_tokens` tokens."""
        outputs = self._generate(images, prompts, self.sampling_params(temperature=0.0, max_tokens=max_new_tokens))
        return [output.outputs[0].text for output in outputs]

    def first_token_log_probs(self, images: list[Image.Image], prompts: list[str], token_ids: list[int],
                              top_k: int) -> np.ndarray:
        """log p(token | image, prompt) of the answer's first token, for each of `token_ids`
        [len(prompts), len(token_ids)], float64: vLLM returns the `top_k` most likely first tokens'
        log-probs (its raw log-softmax), and a token not among them is -inf here (p = 0)."""
        outputs = self._generate(images, prompts, self.sampling_params(temperature=0.0, max_tokens=1, logprobs=top_k))
        return np.array([top_log_probs(output.outputs[0].logprobs[0], token_ids) for output in outputs],
                        dtype=np.float64).reshape(len(prompts), len(token_ids))

    def _generate(self, images: list[Image.Image], prompts: list[str], sampling_params: Any) -> list[Any]:
        requests = [{"prompt": prompt, "multi_modal_data": {"image": image}}
                    for image, prompt in zip(images, prompts)]
        outcome: dict[str, Any] = {}

        def generate():
            try:
                outcome["outputs"] = self.llm.generate(requests, sampling_params, use_tqdm=False)
            except Exception as err:
                outcome["error"] = err

        # vLLM raises EngineDeadError when it notices a dead engine before a request, but waits
        # forever on an engine killed mid-request (SIGKILL, the OOM killer): so generate in a
        # thread and watch the engine's processes meanwhile
        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(timeout=1.0)
            if thread.is_alive() and not all(process.is_alive() for process in self.engine_processes):
                raise RewardProcessDead("the vLLM engine serving the reward's VLM died mid-request")
        error = outcome.get("error")
        if isinstance(error, self.engine_dead_error):
            raise RewardProcessDead("the vLLM engine serving the reward's VLM died") from error
        if error is not None:
            raise error
        return outcome["outputs"]


def top_log_probs(position_log_probs: dict[int, Any], token_ids: list[int]) -> list[float]:
    """The log-probs of `token_ids` among vLLM's top-k of one position ({token id: Logprob}); a
    token not among them is -inf."""
    return [position_log_probs[token_id].logprob if token_id in position_log_probs else -math.inf
            for token_id in token_ids]


def load_vlm(param: str, model: str, backend: str, batch_size: int, device: str, dtype: str,
             gpu_memory_utilization: float, max_model_len: int | None, limit_mm_per_prompt: dict[str, int] | None,
             tensor_parallel_size: int, engine_args: dict[str, Any] | None) -> TransformersBackend | VLLMBackend:
    """The VLM `model` through `backend` ("transformers" on `device`, "vllm" where vLLM places it);
    a model that cannot be loaded is one line naming `reward.params.<param>`."""
    if backend not in BACKENDS:
        raise RewardError(f"reward.params.backend: must be one of {list(BACKENDS)}, got '{backend}'")
    with _loading(param, model):
        AutoConfig.from_pretrained(model)  # fails fast, before a vLLM engine starts
        if backend == "transformers":
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            if dtype == "auto" and device == "cpu":
                dtype = "float32"  # half precision is slow or missing on CPU
            return TransformersBackend(model, batch_size, device, dtype)
        return VLLMBackend(model, dtype, gpu_memory_utilization, max_model_len,
                           dict(limit_mm_per_prompt or {"image": 1}), tensor_parallel_size, dict(engine_args or {}))


class PromptAlignment:
    """r = BERTScore recall of the VLM's answer against `reference_template`; info holds the
    answers and BERTScore's precision and F1.

    The defaults are the paper's: LLaVA-1.5 asked "Answer concisely: what is going on in this
    image?" (its answer cut at the first of `stop`, at most `max_new_tokens`), scored with
    microsoft/deberta-xlarge-mnli at layer 40 (bert_score's layer for it; None = the last, set
    it with another encoder) against "The image contains {prompt}". `device` and `dtype` are
    for the transformers VLM and the BERTScore encoder (which always runs in float32); vLLM
    places itself, and `vllm_engine_args` go to `vllm.LLM` as they are (e.g. {"model_impl":
    "transformers", "enforce_eager": true}, which serves LLaVA where torchvision is missing).
    """

    def __init__(self, vlm: str = "llava-hf/llava-1.5-7b-hf", backend: str = "transformers",
                 question: str = "Answer concisely: what is going on in this image?",
                 prompt_template: str = "USER: <image>\n{question} ASSISTANT:",
                 reference_template: str = "The image contains {prompt}",
                 stop: Sequence[str] = ("\n", "USER:"),
                 bertscore_model: str = "microsoft/deberta-xlarge-mnli", bertscore_layer: int | None = 40,
                 max_new_tokens: int = 64, batch_size: int = 16, device: str = "auto", dtype: str = "auto",
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 limit_mm_per_prompt: dict[str, int] | None = None, tensor_parallel_size: int = 1,
                 vllm_engine_args: dict[str, Any] | None = None):
        if backend not in BACKENDS:
            raise RewardError(f"reward.params.backend: must be one of {list(BACKENDS)}, got '{backend}'")
        self.vlm_prompt = _format("prompt_template", prompt_template, question=question)
        _format("reference_template", reference_template, prompt="")
        self.reference_template, self.stop = reference_template, list(stop)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"

        # the encoder first: a typo there should not wait for a VLM to load
        with _loading("bertscore_model", bertscore_model):
            self.scorer = BERTScorer(bertscore_model, bertscore_layer, device, batch_size)
        if not 0 <= self.scorer.layer <= self.scorer.num_layers:
            raise RewardError(f"reward.params.bertscore_layer: '{bertscore_model}' has layers "
                              f"0..{self.scorer.num_layers}, got {bertscore_layer}")

        self.max_new_tokens = max_new_tokens
        self.backend = load_vlm("vlm", vlm, backend, batch_size, device, dtype, gpu_memory_utilization,
                                max_model_len, limit_mm_per_prompt, tensor_parallel_size, vllm_engine_args)

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict]) -> tuple[np.ndarray, dict]:
        pil_images = [Image.fromarray(image) for image in images]
        texts = self.backend.answer(pil_images, [self.vlm_prompt] * len(pil_images), self.max_new_tokens)
        answers = [parse_answer(text, self.stop) for text in texts]
        references = [self.reference_template.format(prompt=prompt) for prompt in prompts]
        precision, recall, f1 = self.scorer.score(answers, references)
        return recall, {"answer": answers, "bertscore_precision": precision.tolist(),
                        "bertscore_f1": f1.tolist()}


def _format(param: str, template: str, **fields: str) -> str:
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as err:
        raise RewardError(f"reward.params.{param}: '{template}' is not a template with only "
                          f"{', '.join('{' + name + '}' for name in fields)} ({err!r})") from None
