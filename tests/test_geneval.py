"""The GenEval-style reward: the yes/no questions each of GenEval's six tags becomes (exact strings,
from metadata in its published evaluation_metadata.jsonl format), the reward as the product (or
mean) of the checks' probabilities by hand on given log-probs and on the tiny random LLaVA of
tests/test_vlm_judge.py against that model's own logits, `correct` and `tag`, prompt files in
GenEval's format through the config's JSON Lines loader, configs/sd35_geneval.yaml, and one-line
errors."""

import json
from pathlib import Path

import numpy as np
import pytest

from ddpo.config import load_config
from ddpo.media import Media
from rewards import RewardError, check_reward, compute_reward, load_reward
from rewards.geneval import Check, GenEval, geneval_checks, objects, plural
from tests.float_error import U32, U64
from tests.test_vlm_judge import GivenLogProbs, ModelByHand, images, yes_no_llava_path  # noqa: F401

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CALL = {"batch_id": 3, "seed": 7, "policy_version": 1}  # what every reward call's metadata also has

# GenEval metadata of each published tag, and the questions it becomes ("no": an exclude check)
TAGS = {
    "single_object": (
        {"tag": "single_object", "include": [{"class": "bench", "count": 1}]},
        [("Does the image show a bench?", "yes")]),
    "two_object": (
        {"tag": "two_object", "include": [{"class": "toilet", "count": 1}, {"class": "bicycle", "count": 1}]},
        [("Does the image show a toilet?", "yes"), ("Does the image show a bicycle?", "yes")]),
    "counting": (
        {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}]},
        [("Does the image show exactly two clocks?", "yes"), ("Does the image show more than two clocks?", "no")]),
    "colors": (
        {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "pink"}]},
        [("Does the image show a car?", "yes"), ("Is the car pink?", "yes")]),
    "position": (
        {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                        {"class": "dog", "count": 1, "position": ["right of", 0]}]},
        [("Does the image show a teddy bear?", "yes"), ("Does the image show a dog?", "yes"),
         ("Is the dog right of the teddy bear?", "yes")]),
    "color_attr": (
        {"tag": "color_attr", "include": [{"class": "wine glass", "count": 1, "color": "purple"},
                                          {"class": "apple", "count": 1, "color": "black"}]},
        [("Does the image show a wine glass?", "yes"), ("Is the wine glass purple?", "yes"),
         ("Does the image show an apple?", "yes"), ("Is the apple black?", "yes")]),
}


# --- the questions ------------------------------------------------------------------------------

@pytest.mark.parametrize("tag", sorted(TAGS))
def test_questions_of_each_published_tag(tag):
    metadata, expected = TAGS[tag]
    assert geneval_checks("a prompt", {**CALL, **metadata}) == [Check(q, wanted) for q, wanted in expected]


def test_questions_beyond_the_published_combinations():
    dogs = lambda *items, exclude=(): geneval_checks("p", {"include": list(items), "exclude": list(exclude)})  # noqa: E731
    # "count" n alone is GenEval's "at least n"; with an exclude of n + 1 beside it, exactly n
    assert dogs({"class": "dog", "count": 3}) == [Check("Does the image show at least three dogs?", "yes")]
    assert dogs({"class": "dog", "count": 3}, exclude=[{"class": "dog", "count": 5}]) == [
        Check("Does the image show at least three dogs?", "yes"), Check("Does the image show more than four dogs?", "no")]
    assert dogs({"class": "dog", "count": 2, "color": "brown"}) == [
        Check("Does the image show at least two dogs?", "yes"), Check("Are the dogs brown?", "yes")]
    assert dogs({"class": "cat", "count": 1}, exclude=[{"class": "dog", "count": 1}]) == [
        Check("Does the image show a cat?", "yes"), Check("Does the image show a dog?", "no")]
    assert dogs({"class": "cat", "count": 1}, exclude=[{"class": "dog", "count": 2}])[1] == Check(
        "Does the image show more than one dog?", "no")
    assert dogs({"class": "sheep", "count": 12}) == [Check("Does the image show at least 12 sheep?", "yes")]


def test_plurals_and_articles_of_cocos_classes():
    cases = {"person": "people", "knife": "knives", "computer mouse": "computer mice", "bus": "buses",
             "sandwich": "sandwiches", "toothbrush": "toothbrushes", "wine glass": "wine glasses", "sheep": "sheep",
             "skis": "skis", "scissors": "scissors", "hot dog": "hot dogs", "giraffe": "giraffes",
             "teddy bear": "teddy bears", "tv": "tvs", "cell phone": "cell phones", "butterfly": "butterflies"}
    assert {name: plural(name) for name in cases} == cases
    assert [objects(1, name) for name in ["apple", "orange", "umbrella", "bench", "elephant"]] == [
        "an apple", "an orange", "an umbrella", "a bench", "an elephant"]
    assert objects(4, "person") == "four people"


# --- the reward by hand on given log-probs --------------------------------------------------------

@pytest.fixture(scope="module")
def geneval(yes_no_llava_path):  # noqa: F811
    return GenEval(model=yes_no_llava_path, device="cpu", batch_size=1)


def given(p_yes: float) -> list[float]:
    """log-probs of (Yes, yes, No, no) with P(yes) = p_yes among them: all on Yes and No."""
    return [np.log(p_yes), -np.inf, np.log1p(-p_yes), -np.inf]


def test_reward_is_the_product_of_the_checks_probabilities(geneval, monkeypatch):
    counting, position = TAGS["counting"][0], TAGS["position"][0]
    table = {"Does the image show exactly two clocks?": given(0.9),
             "Does the image show more than two clocks?": given(0.3),  # an exclude check: p = P(no) = 0.7
             "Does the image show a teddy bear?": given(0.8), "Does the image show a dog?": given(0.6),
             "Is the dog right of the teddy bear?": given(0.4)}
    monkeypatch.setattr(geneval.judge, "backend", GivenLogProbs(table))
    metadata = [{**CALL, **counting}, {**CALL, **position}, {**CALL, **counting}]
    rewards, info = compute_reward("geneval", geneval, Media.from_images(images()), ["two clocks", "dog right of bear", "two clocks"],
                                   metadata)
    # float64 throughout: each p within a few u64 of its value (log and exp), products of <= 3 terms
    expected = np.array([0.9 * 0.7, 0.8 * 0.6 * 0.4, 0.9 * 0.7])
    np.testing.assert_allclose(rewards, expected, rtol=2 * U32)  # compute_reward casts to float32: one rounding each side
    np.testing.assert_allclose(info["check_p"][1], [0.8, 0.6, 0.4], rtol=16 * U64)
    np.testing.assert_allclose(info["check_p"][0], [0.9, 0.7], rtol=16 * U64)
    assert info["correct"] == [True, False, True]  # the dog is not right of the bear: 0.4 <= 0.5
    assert info["checks_passed"] == [1.0, 2 / 3, 1.0]
    assert info["tag"] == ["counting", "position", "counting"]
    assert info["answer"] == ["2/2 checks", "2/3 checks", "2/2 checks"]
    # GenEval-style accuracy: the mean of `correct`, and per tag
    assert np.mean(info["correct"]) == 2 / 3
    assert {tag: np.mean([c for c, t in zip(info["correct"], info["tag"]) if t == tag])
            for tag in set(info["tag"])} == {"counting": 1.0, "position": 0.0}

    monkeypatch.setattr(geneval, "combine", "mean")  # partial credit
    rewards, _ = geneval(images(), ["two clocks", "dog right of bear", "two clocks"], metadata)
    np.testing.assert_allclose(rewards, [(0.9 + 0.7) / 2, (0.8 + 0.6 + 0.4) / 3, (0.9 + 0.7) / 2], rtol=16 * U64)

    monkeypatch.setattr(geneval.judge, "normalize", False)  # raw P: an exclude check reads the no tokens' p
    table["Does the image show more than two clocks?"] = [np.log(0.2), -np.inf, np.log(0.5), -np.inf]
    rewards, info = geneval(images(1), ["two clocks"], metadata[:1])
    np.testing.assert_allclose(info["check_p"][0], [0.9, 0.5], rtol=16 * U64)


# --- the reward on the tiny VLM against its own logits ----------------------------------------------

def test_reward_on_a_tiny_vlm_by_hand(yes_no_llava_path, geneval):  # noqa: F811
    by_hand = ModelByHand(yes_no_llava_path)
    tags = ["counting", "position", "colors"]
    metadata = [{**CALL, **TAGS[tag][0]} for tag in tags]
    batch = images()
    rewards, info = geneval(batch, tags, metadata)
    for i, tag in enumerate(tags):
        p, errors = [], []
        for question, wanted in TAGS[tag][1]:
            p_yes, p_no, error = by_hand.p_yes_no(batch[i], question)
            p.append(p_yes if wanted == "yes" else p_no)
            errors.append(error)
        np.testing.assert_array_less(np.abs(np.array(info["check_p"][i]) - p), np.array(errors) * p)
        # the product: relative errors add, and a rounding per factor
        assert abs(rewards[i] - np.prod(p)) <= (sum(errors) + len(p) * U64) * np.prod(p)
        assert info["correct"][i] == all(value > 0.5 for value in p)


# --- prompt files in GenEval's format -------------------------------------------------------------

def test_genevals_format_loads_as_a_prompts_file(tmp_path):
    lines = [{**metadata, "prompt": f"prompt of {tag}"} for tag, (metadata, _) in TAGS.items()]
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = load_config(None, [f"prompts.file={path}"])
    metadata = config.load_prompt_metadata()
    assert config.load_prompts() == [line["prompt"] for line in lines]
    for tag, (fields, questions) in TAGS.items():
        assert metadata[f"prompt of {tag}"] == fields  # the line's fields but "prompt", as they are
        assert [(c.question, c.wanted) for c in geneval_checks(f"prompt of {tag}", {**CALL, **fields})] == questions


def test_the_example_prompts_and_the_config():
    config = load_config(CONFIGS / "sd35_geneval.yaml")
    assert Path(config.prompts.file).name == "geneval_example.jsonl"
    metadata = config.load_prompt_metadata()
    assert len(metadata) == len(config.load_prompts()) == 12
    assert sorted(fields["tag"] for fields in metadata.values()) == sorted(2 * list(TAGS))  # two of each tag
    for prompt, fields in metadata.items():
        assert geneval_checks(prompt, {**CALL, **fields})
    assert (config.reward.name, config.train.kl_coef, config.advantage.group_size) == ("geneval", 0.04, 24)
    check_reward(config.reward.name, config.reward.params)  # no model loads


# --- errors -------------------------------------------------------------------------------------

def test_one_line_errors(yes_no_llava_path, geneval):  # noqa: F811
    cases = [
        (CALL, r"^reward 'geneval': prompt 'a cat' has no GenEval metadata: its metadata has no \"include\" "),
        ({**CALL, "include": []}, r"^reward 'geneval': prompt 'a cat' has no GenEval metadata: its metadata has "
                                  r"\"include\" \[\], not a non-empty list"),
        ({"include": [{"count": 1}]}, r"^reward 'geneval': prompt 'a cat': its metadata \"include\"\[0\] must be "
                                      r"an object with a \"class\" string"),
        ({"include": [{"class": "cat", "count": 0}]}, r"\"include\"\[0\] must have a \"count\" >= 1, got 0$"),
        ({"include": [{"class": "cat", "color": 3}]}, r"\"include\"\[0\] must have a \"color\" string, got 3$"),
        ({"include": [{"class": "cat"}], "exclude": {"class": "dog"}}, r"its metadata \"exclude\" must be a list"),
        ({"include": [{"class": "cat", "position": ["left of", 0]}]},
         r"^reward 'geneval': prompt 'a cat': its metadata \"include\"\[0\] has \"position\" \['left of', 0\]; "
         r"expected \[relation, index of another include item\]$"),
    ]
    for metadata, message in cases:
        with pytest.raises(RewardError, match=message) as info:
            geneval(images(1), ["a cat"], [metadata])
        assert "\n" not in str(info.value)
    with pytest.raises(RewardError, match=r"^reward.params.combine: must be one of \['product', 'mean'\], got 'all'$"):
        GenEval(model=yes_no_llava_path, device="cpu", combine="all")
    with pytest.raises(RewardError, match=r"^reward.params.model: cannot load '/no/such/vlm' \(no such folder\)$"):
        load_reward("geneval", {"model": "/no/such/vlm"})
    with pytest.raises(RewardError, match=r"^reward.params: 'geneval' does not take these params"):
        check_reward("geneval", {"question": "Is it a cat?"})
