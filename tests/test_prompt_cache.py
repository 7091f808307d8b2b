"""The frozen text encoders run once per prompt and run: the prompt cache that sampling and
training share (`ModelFamily.conditioning`), its bound, and `model.offload_text_encoders`."""

from collections import Counter

import numpy as np
import pytest
import torch

from actors.sampler import sample_batch
from ddpo.config import ConfigError
from ddpo.families import NEGATIVE, PromptCache, family_of
from ddpo.pipeline import build_tiny_pipeline, load_pipeline
from ddpo.plan import epoch_plan
from ddpo.trajectory import EpochTrajectories
from learner import Learner
from tests.conftest import tiny_config
from tests.float_error import EPS
from tests.tiny_families import BUILDERS

PROMPTS = ["a cat", "a red dog riding a bike", "a horse", "a cat"]


def _counting(model) -> list[list[str]]:
    """Record the prompts of every `encode` call the model makes from now on."""
    calls, encode = [], model.encode

    def counted(prompts, with_negative):
        calls.append(list(prompts))
        return encode(prompts, with_negative)

    model.encode = counted
    return calls


def _epoch(model, config, epoch: int, version: int):
    """An epoch sampled with `model` (as a colocated worker samples) and made-up rewards."""
    batches = [sample_batch(model, config, s.batch_id, s.prompts, s.seeds, s.sde_start, version)[0]
               for s in epoch_plan(config, config.load_prompts(), epoch)]
    rewards = [np.random.default_rng([epoch, i]).normal(size=b.num_rows) for i, b in enumerate(batches)]
    return EpochTrajectories.from_batches(batches), rewards


def test_a_prompt_is_encoded_once_across_sampling_and_training(tmp_path):
    """A colocated worker's model samples and trains two epochs: each distinct prompt, and the
    empty prompt of classifier-free guidance, goes through the text encoders once, alone."""
    config = tiny_config(tmp_path)
    learner = Learner(config)
    calls = _counting(learner.model)
    for epoch in range(2):
        learner.train(*_epoch(learner.model, config, epoch, learner.policy_version))
    assert all(len(prompts) == 1 for prompts in calls)
    assert Counter(p for prompts in calls for p in prompts) == Counter(config.load_prompts() + [""])


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux", "qwenimage"])
def test_cached_rows_are_those_of_encode(name):
    """The cache's rows are the bits `encode` gives for the prompt alone (that is how it encodes
    them). Encoded beside other prompts, a row may differ in its last bits: on this CPU the
    hidden states come out the same whatever the batch, but the pooled projection (a [B, d] x
    [d, d'] matmul) sums its d products in another order for B > 1, within d * eps * the sum of
    their magnitudes (Higham, Sec. 4.2), <= d * eps * |W| |h|; the test takes d * eps * max|row| *
    4 as that bound's size (the projected vectors' entries are sums of d products of O(1) terms)."""
    pipe = (build_tiny_pipeline if name == "sd" else BUILDERS[name])()
    for module in pipe.components.values():  # as from_pretrained leaves them (the tiny T5's dropout off)
        if isinstance(module, torch.nn.Module):
            module.eval()
    model = family_of(pipe)
    with torch.no_grad():
        cond, negative = model.conditioning(PROMPTS, with_negative=True)
        batch_cond, batch_negative = model.encode(PROMPTS, with_negative=True)
        for i, prompt in enumerate(PROMPTS):
            alone, alone_negative = model.encode([prompt], with_negative=True)
            for key in alone:
                assert _unpadded_equal(cond[key][i], alone[key][0]), (name, key, prompt)
                width = batch_cond[key].shape[-1]
                assert torch.allclose(cond[key][i], batch_cond[key][i], rtol=0,
                                      atol=4 * width * EPS * float(batch_cond[key].abs().max())), (name, key)
            for key in alone_negative or {}:
                assert _unpadded_equal(negative[key][i], alone_negative[key][0]), (name, key)
    assert (negative is None) == (batch_negative is None) == (name == "flux")  # FLUX: guidance distilled


def _unpadded_equal(row: torch.Tensor, alone: torch.Tensor) -> bool:
    """`row` of a joined batch is `alone`, then the zeros that `concat` pads a shorter sequence
    with (Qwen-Image's prompts are as long as they are)."""
    if row.ndim == 0 or row.shape[0] == alone.shape[0]:
        return torch.equal(row, alone)
    return torch.equal(row[:alone.shape[0]], alone) and not row[alone.shape[0]:].any()


def test_the_cache_keeps_the_most_recently_used_prompts():
    model = family_of(build_tiny_pipeline())
    model.prompt_cache = PromptCache(2)
    calls = _counting(model)
    model.conditioning(["a cat", "a dog"], with_negative=False)
    model.conditioning(["a cat"], with_negative=False)  # a hit: "a cat" is now the most recent
    model.conditioning(["a horse"], with_negative=False)  # "a dog" leaves
    assert list(model.prompt_cache.recent) == ["a cat", "a horse"]
    model.conditioning(["a cat", "a dog"], with_negative=False)
    assert calls == [["a cat"], ["a dog"], ["a horse"], ["a dog"]]
    # size 0: nothing kept, every call encodes
    model.prompt_cache = PromptCache(0)
    calls.clear()
    for _ in range(2):
        model.conditioning(["a cat"], with_negative=True)
    assert calls == [["a cat"], [""]] * 2 and not model.prompt_cache.recent


def test_the_cache_size_is_validated():
    with pytest.raises(ConfigError, match=r"^model.prompt_cache_size: must be >= 0 \(0 = no cache\), got -1$"):
        tiny_config(**{"model.prompt_cache_size": -1})


def test_offloaded_encoders_are_not_run_again_and_change_no_number(tmp_path):
    """`model.offload_text_encoders`: at load, the run's prompts and the empty one are encoded
    and kept, and the encoders go to the CPU; sampling and training then never run them, and the
    trajectories and the trained LoRA are the same bits as without offloading (the same rows:
    each prompt encoded alone)."""
    results = []
    for offload in (False, True):
        config = tiny_config(tmp_path, **{"model.offload_text_encoders": offload})
        learner = Learner(config)
        if offload:
            assert set(learner.model.prompt_cache.kept) == {*config.load_prompts(), NEGATIVE}
            assert all(next(e.parameters()).device.type == "cpu" for e in learner.model.text_encoders().values())
        calls = _counting(learner.model)
        epoch = _epoch(learner.model, config, 0, 0)
        learner.train(*epoch)
        assert (calls == []) == offload
        results.append((epoch[0].fetch([0, 1]), learner.weights()[1]))
    (batches, lora), (batches_offloaded, lora_offloaded) = results
    assert all(a.equals(b) for a, b in zip(batches, batches_offloaded))
    assert all(torch.equal(lora[k], lora_offloaded[k]) for k in lora)


def test_offload_reports_the_weights_that_left_the_device():
    """The bytes `offload_text_encoders` returns are the encoders' weights that were on another
    device than the CPU: none on a CPU model; a prompt outside the kept set is still encoded, on
    the CPU, and cached like any other."""
    model = load_pipeline("builtin:tiny")
    assert model.offload_text_encoders(["a cat"], with_negative=True) == 0
    calls = _counting(model)
    model.conditioning(["a cat", "a dog"], with_negative=True)
    model.conditioning(["a dog"], with_negative=True)
    assert calls == [["a dog"]]
