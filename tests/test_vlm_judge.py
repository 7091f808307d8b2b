"""The VLM yes/no judge: P(yes) on a tiny random LLaVA (built here with Yes/yes/No/no in its
vocabulary, saved to a temp dir and loaded through from_pretrained as the real ones are) held
against the softmax of that model's own last-position logits, computed here; the arithmetic of
normalising and combining questions on log-probs given by hand; templating with metadata; vLLM's
top-k log-probs; one-line errors.

vLLM is not started here: an engine takes about a minute on CPU (tests/test_alignment.py starts
one for the shared backend); its part of the judge, reading the top-k, is checked on vLLM's
output shape."""

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from ddpo.media import Media
from rewards import RewardError, check_reward, compute_reward, load_reward
from rewards.alignment import top_log_probs
from rewards.vlm_judge import VLMJudge, answer_text, format_question, yes_no_probabilities
from tests.conftest import save_tiny_llava
from tests.float_error import U32, U64

TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
WORDS = ("Yes yes No no Does does this the image figure show a an two three more than exactly at least "
         "dog dogs cat cats car cars red blue photo of is are left right above below please answer or "
         "in color ? . , : \"").split()
PROMPTS = ["a photo of a dog", "a red car", "two cats"]
METADATA = [{"batch_id": 0, "seed": 1, "policy_version": 2, "color": "blue"},
            {"batch_id": 0, "seed": 2, "policy_version": 2, "color": "red"},
            {"batch_id": 0, "seed": 3, "policy_version": 2, "color": "red"}]


def images(n=3):
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def yes_no_llava_path(tmp_path_factory):
    """conftest's tiny LLaVA, its vocabulary with Yes/yes/No/no (words split at spaces, so " Yes"
    is "Yes")."""
    return save_tiny_llava(tmp_path_factory.mktemp("yes_no_llava"), [*WORDS, "USER", "ASSISTANT"])


def judge_params(path, **overrides):
    return {"model": path, "device": "cpu", "batch_size": 1, **overrides}


class ModelByHand:
    """The saved model and its processor, loaded here: P(yes) from its own logits, in float64."""

    def __init__(self, path):
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        self.yes = self.processor.tokenizer.convert_tokens_to_ids(["Yes", "yes"])
        self.no = self.processor.tokenizer.convert_tokens_to_ids(["No", "no"])

    @torch.no_grad()
    def logits(self, image: np.ndarray, question: str) -> torch.Tensor:
        """The logits at the last position of one unpadded request, float32 [vocab]; lm_head on that
        position alone (logits_to_keep=1), as the reward asks, so the same float32 numbers."""
        inputs = self.processor(images=[Image.fromarray(image)], text=[TEMPLATE.format(question=question)],
                                return_tensors="pt")
        return self.model(**inputs, logits_to_keep=1).logits[0, -1]

    def p_yes_no(self, image, question, normalize=True) -> tuple[float, float, float]:
        """(P(yes), P(no), the error bound of the reward's value): p = softmax of the float32 logits
        in float64, the yes tokens' p summed (each id once: " Yes" is "Yes" here), over yes + no."""
        logits = self.logits(image, question).double()
        p = torch.softmax(logits, dim=0)
        yes, no = float(p[self.yes].sum()), float(p[self.no].sum())
        # the reward takes the float64 log-softmax of the same float32 logits z: log Σ exp(z - max z)
        # over V terms within (V + 1)·u64 (the sum's roundings, the log's), the subtraction within
        # u64·|log p| <= u64·(max z - min z + log V); exp adds u64 (relative), the sum over the two
        # yes (or no) tokens u64: each sum within δ; the ratio within 2δ + u64. Doubled: this
        # softmax's own roundings are no more
        vocab = len(logits)
        log_p_max = float(logits.max() - logits.min()) + np.log(vocab)
        delta = (vocab + 1 + log_p_max + 2) * U64
        if normalize:
            return yes / (yes + no), no / (yes + no), 2 * (2 * delta + U64)
        return yes, no, 2 * delta


@pytest.fixture(scope="module")
def by_hand(yes_no_llava_path):
    return ModelByHand(yes_no_llava_path)


# --- P(yes) against the model's own logits ------------------------------------------------------

@pytest.mark.parametrize("normalize", [True, False])
def test_p_yes_is_the_softmax_of_the_models_own_logits(yes_no_llava_path, by_hand, normalize):
    questions = ['Does this figure show "{prompt}"? Please answer yes or no.', "Is the {prompt} {color}?"]
    judge = VLMJudge(**judge_params(yes_no_llava_path, question=questions, normalize=normalize))
    batch = images()
    rewards, info = judge(batch, PROMPTS, METADATA)
    expected, errors = np.zeros((3, 2)), np.zeros((3, 2))
    for i, (image, prompt, fields) in enumerate(zip(batch, PROMPTS, METADATA)):
        for q, template in enumerate(questions):
            question = template.format(prompt=prompt, **fields)
            expected[i, q], _, errors[i, q] = by_hand.p_yes_no(image, question, normalize)
            assert info[f"p_yes_{q}"][i] == pytest.approx(expected[i, q], rel=errors[i, q], abs=0)
    # the reward is their product: relative errors add, and the product's rounding (u64) on each side
    np.testing.assert_array_less(np.abs(rewards - expected.prod(axis=1)),
                                 (errors.sum(axis=1) + 2 * U64) * expected.prod(axis=1) + 1e-300)
    # the questions and the images apart, far beyond the tolerance: each row reads its own logits
    assert np.abs(np.diff(expected, axis=0)).min() > 1e3 * errors.max()
    assert np.abs(expected[:, 0] - expected[:, 1]).min() > 1e3 * errors.max()


def padding_error(by_hand: ModelByHand, requests: int) -> float:
    """A bound on how far P(yes) of one request may move between two float32 forward passes that
    differ only in padding (left padding: the masked keys' exact zeros in the softmax sums, matrices
    of other shapes blocked otherwise, rotary angles shifted with the positions): the same terms
    summed in other orders. As tests/test_alignment.py argues for BERT, a hidden state is within
    ε = Σ n·u (relative) of the exact one, n over the widths summed: per layer of either tower
    q/k/v, the attention output, fc1 and two norms over its width d, fc2 over the intermediate
    width, the scores over the head dim, the softmax's sum and weighted sum over the tokens, 8 for
    the elementwise steps; the patch embedding and the projector's two layers. A logit z_t = h·W_t
    of the final (RMS-normed) h, ‖h‖ <= √d·max|γ|, then moves by at most 2(ε + d·u)·‖h‖·‖W_t‖
    (both passes; Cauchy-Schwarz, the dot's own d roundings), and P(yes) = σ(log Σ_Y p - log Σ_N p)
    by at most that: each log Σ moves by at most 2·max|Δz|, and σ' <= 1/4."""
    text, vision = by_hand.model.config.text_config, by_hand.model.config.vision_config

    def tower(c, tokens):
        width = c.hidden_size
        return c.num_hidden_layers * (5 * width + c.intermediate_size + width // c.num_attention_heads
                                      + 2 * tokens + 8)

    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    epsilon = (3 * vision.patch_size ** 2 + tower(vision, patches) + vision.hidden_size + text.hidden_size
               + tower(text, requests)) * U32
    d = text.hidden_size
    h_norm = np.sqrt(d) * float(by_hand.model.model.language_model.norm.weight.detach().abs().max())
    w_norm = float(by_hand.model.lm_head.weight.detach().norm(dim=1).max())
    return 2 * (epsilon + d * U32) * h_norm * w_norm


def test_a_batch_pads_its_rows_and_reads_each_rows_last_token(yes_no_llava_path, by_hand):
    """Questions of different lengths in one padded batch (left padding: each row's last token at the
    last position) give each image its own P(yes): the unpadded ones, up to float32 rounding."""
    questions = ["Is this a {prompt}?", "Does the image show a dog with a red car and two cats in the photo?"]
    batch = images()
    one = VLMJudge(**judge_params(yes_no_llava_path, question=questions, batch_size=1))
    six = VLMJudge(**judge_params(yes_no_llava_path, question=questions, batch_size=6))
    rewards_one, info_one = one(batch, PROMPTS, METADATA)
    rewards_six, info_six = six(batch, PROMPTS, METADATA)
    longest = max(len(by_hand.processor(images=[Image.fromarray(batch[0])], text=[TEMPLATE.format(question=q)])
                      ["input_ids"][0]) for q in [questions[1]] + [questions[0].format(prompt=p) for p in PROMPTS])
    bound = padding_error(by_hand, longest)
    for q in range(2):
        np.testing.assert_array_less(np.abs(np.array(info_one[f"p_yes_{q}"]) - info_six[f"p_yes_{q}"]), bound)
    np.testing.assert_array_less(np.abs(rewards_one - rewards_six), 2 * bound)  # P ≤ 1: a product's errors add
    # the rows are not mixed up: each image's padded P(yes) is its own unpadded one, no other's
    expected = [by_hand.p_yes_no(image, questions[0].format(prompt=prompt))[0] for image, prompt in zip(batch, PROMPTS)]
    for i, p in enumerate(info_six["p_yes_0"]):
        assert [abs(p - other) < bound for other in expected] == [j == i for j in range(3)]


# --- the arithmetic on given log-probs ------------------------------------------------------------

class GivenLogProbs:
    """A backend whose first-token log-probs are given by hand, per prompt: {question: (yes, Yes,
    no, No) log-probs}; it records the prompts it was asked."""

    def __init__(self, table):
        self.table, self.prompts = table, []

    def first_token_log_probs(self, images, prompts, token_ids, top_k):
        self.prompts += prompts
        return np.array([self.table[prompt.removeprefix("USER: <image>\n").removesuffix(" ASSISTANT:")]
                         for prompt in prompts], dtype=np.float64)


@pytest.fixture(scope="module")
def judge(yes_no_llava_path):
    return VLMJudge(**judge_params(yes_no_llava_path, question=["Is it a {prompt}?", "Is it {color}?"]))


def test_normalising_and_combining_by_hand(judge, monkeypatch):
    ln = np.log
    table = {  # log p of (Yes, yes, No, No-variant) as the judge's ids: its yes ids, then its no ids
        "Is it a a photo of a dog?": [ln(0.5), ln(0.1), ln(0.2), ln(0.1)],  # P(yes) = 0.6 / 0.9
        "Is it blue?": [ln(0.05), -np.inf, ln(0.15), -np.inf],  # P(yes) = 0.05 / 0.2 = 0.25
        "Is it a a red car?": [-np.inf, -np.inf, ln(0.3), ln(0.3)],  # P(yes) = 0
        "Is it red?": [ln(0.3), ln(0.3), -np.inf, -np.inf],  # 1
        "Is it a two cats?": [-np.inf] * 4,  # vLLM's top-k held neither: P(yes) = P(no) = 0
    }
    monkeypatch.setattr(judge.judge, "backend", GivenLogProbs(table))
    assert len(judge.judge.yes_ids) == len(judge.judge.no_ids) == 2  # "Yes"/" Yes" and "yes"/" yes": one id each
    rewards, info = judge(images(), PROMPTS, METADATA)
    np.testing.assert_allclose(info["p_yes_0"], [0.6 / 0.9, 0.0, 0.0], rtol=8 * U64)
    np.testing.assert_allclose(info["p_yes_1"], [0.25, 1.0, 1.0], rtol=8 * U64)  # two cats, "red": the 4th row
    np.testing.assert_allclose(rewards, [0.6 / 0.9 * 0.25, 0.0, 0.0], rtol=8 * U64)
    assert info["answer"] == ["yes 0.67; no 0.75", "no 1.00; yes 1.00", "neither; yes 1.00"]

    monkeypatch.setattr(judge, "combine", "mean")
    rewards, _ = judge(images(), PROMPTS, METADATA)
    np.testing.assert_allclose(rewards, [(0.6 / 0.9 + 0.25) / 2, 0.5, 0.5], rtol=8 * U64)

    monkeypatch.setattr(judge.judge, "normalize", False)  # the raw P(yes): the yes tokens' p summed
    rewards, info = judge(images(), PROMPTS, METADATA)
    np.testing.assert_allclose(info["p_yes_0"], [0.6, 0.0, 0.0], rtol=8 * U64)
    np.testing.assert_allclose(info["p_yes_1"], [0.05, 0.6, 0.6], rtol=8 * U64)
    np.testing.assert_allclose(rewards, [(0.6 + 0.05) / 2, 0.3, 0.3], rtol=8 * U64)


def test_yes_no_probabilities():
    log_yes, log_no = np.log([0.3, 1e-30, 0.2]), np.log([0.1, 0.5, 1e-30])
    p_yes, p_no = yes_no_probabilities(log_yes, log_no, normalize=True)
    # exp(log p_yes - log(p_yes + p_no)): the logs' roundings, u64·|log| each, and four more
    rtol = 2 * (2 * np.abs(np.log(1e-30)) + 4) * U64
    np.testing.assert_allclose(p_yes, [0.75, 2e-30, 1.0], rtol=rtol)
    np.testing.assert_allclose(p_yes + p_no, 1.0, rtol=rtol)
    p_yes, p_no = yes_no_probabilities(np.array([-np.inf]), np.array([-np.inf]), normalize=True)
    assert (p_yes[0], p_no[0]) == (0.0, 0.0)
    assert answer_text(0.93, 0.07) == "yes 0.93" and answer_text(0.2, 0.8) == "no 0.80"


def test_vllm_top_k_log_probs():
    # vLLM's output for one position: {token id: Logprob(logprob, rank, decoded_token)}, the top k
    # and the sampled token; a yes or no token outside them is -inf (p = 0)
    top = {7: SimpleNamespace(logprob=-0.1, rank=1), 3: SimpleNamespace(logprob=-2.5, rank=2)}
    assert top_log_probs(top, [3, 9, 7]) == [-2.5, -np.inf, -0.1]


# --- templating ---------------------------------------------------------------------------------

def test_questions_are_filled_from_the_prompt_and_its_metadata(judge, monkeypatch):
    table = {question: [0.0, -np.inf, -np.inf, -np.inf] for question in
             ["Is it a a photo of a dog?", "Is it blue?", "Is it a a red car?", "Is it red?", "Is it a two cats?"]}
    backend = GivenLogProbs(table)
    monkeypatch.setattr(judge.judge, "backend", backend)
    judge(images(), PROMPTS, METADATA)
    assert backend.prompts == [  # image-major: each image's questions together, in the order given
        "USER: <image>\nIs it a a photo of a dog? ASSISTANT:", "USER: <image>\nIs it blue? ASSISTANT:",
        "USER: <image>\nIs it a a red car? ASSISTANT:", "USER: <image>\nIs it red? ASSISTANT:",
        "USER: <image>\nIs it a two cats? ASSISTANT:", "USER: <image>\nIs it red? ASSISTANT:"]
    fields = {"include": [{"class": "dog", "count": 2}], "seed": 4}
    assert format_question("{include[0][class]} {seed} {prompt!r}", "p", fields) == "dog 4 'p'"


def test_a_missing_metadata_field_is_one_line_naming_it(judge):
    metadata = [*METADATA[:2], {"batch_id": 0, "seed": 3, "policy_version": 2}]
    with pytest.raises(RewardError, match=r"^reward.params.question: 'Is it \{color\}\?' needs the metadata field "
                                          r"'color', which prompt 'two cats' does not have \(its fields: "
                                          r"\['batch_id', 'policy_version', 'prompt', 'seed'\]\)$"):
        judge(images(), PROMPTS, metadata)


# --- end to end and errors ----------------------------------------------------------------------

def test_registered_and_end_to_end(yes_no_llava_path, by_hand):
    params = judge_params(yes_no_llava_path, batch_size=2)
    check_reward("vlm_judge", params)
    reward = load_reward("vlm_judge", params)
    rewards, info = compute_reward("vlm_judge", reward, Media.from_images(images()), PROMPTS, METADATA)
    assert set(info) == {"answer", "p_yes"} and np.array_equal(rewards, np.array(info["p_yes"], dtype=np.float32))
    for answer, p in zip(info["answer"], info["p_yes"]):
        assert answer == (f"yes {p:.2f}" if p >= 0.5 else f"no {1 - p:.2f}")


def test_one_line_errors(yes_no_llava_path, monkeypatch):
    cases = [
        ({"model": "/no/such/vlm"}, r"^reward.params.model: cannot load '/no/such/vlm' \(no such folder\)$"),
        ({"backend": "sglang"}, r"^reward.params.backend: must be one of \['transformers', 'vllm'\], got 'sglang'$"),
        ({"combine": "min"}, r"^reward.params.combine: must be one of \['product', 'mean'\], got 'min'$"),
        ({"question": []}, r"^reward.params.question: a question, or a list of them, each a non-empty string"),
        ({"question": "Is it {}?"}, r"^reward.params.question: 'Is it \{\}\?' has a positional field"),
        ({"question": "Is it {prompt?"}, r"^reward.params.question: 'Is it \{prompt\?' is not a template"),
        ({"prompt_template": "USER: {image} {question}"}, r"^reward.params.prompt_template: "),
        ({"yes_tokens": ["Maybe so", "Sure"]},  # two words; not in the vocabulary (<unk>)
         r"^reward.params.yes_tokens: none of \['Maybe so', 'Sure'\] is a single token of the model's tokenizer$"),
        ({"no_tokens": ["no", "yes"]}, r"^reward.params.no_tokens: \['yes'\] are yes tokens too$"),
        ({"logprobs": 0}, r"^reward.params.logprobs: must be a whole number >= 1, got 0$"),
    ]
    for overrides, message in cases:
        with pytest.raises(RewardError, match=message) as info:
            VLMJudge(**judge_params(yes_no_llava_path, **overrides))
        assert "\n" not in str(info.value)
    with pytest.raises(RewardError, match=r"^reward.params: 'vlm_judge' does not take these params"):
        check_reward("vlm_judge", {"vlm": yes_no_llava_path})
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if vllm were not installed
    with pytest.raises(RewardError, match=r"^reward.params.backend: vllm is not installed"):
        VLMJudge(**judge_params(yes_no_llava_path, backend="vllm"))
