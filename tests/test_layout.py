"""Layouts without Ray: `auto` resolved for a machine, the bundles of each layout, the
bottleneck line, and the config errors of the learner group."""

import pytest

from cluster.cli import embedded_config
from cluster.metrics import bottleneck_hint
from cluster.placement import Devices, resolve_layout
from ddpo.config import ConfigError, load_config


def _digits(*overrides):
    return load_config(embedded_config("digits.yaml"), list(overrides))


@pytest.mark.parametrize("cpus, samplers, learners", [(1, 1, 1), (2, 2, 2), (8, 2, 4), (64, 2, 4)])
def test_the_default_uses_the_machines_cores(cpus, samplers, learners):
    """One sampler and one learner rank per core, colocated: one worker per device, which
    samples and trains; no more samplers than the epoch's 2 sample batches (the devices beyond
    hold a learner rank alone), at most 4 devices for a CPU model."""
    c = resolve_layout(_digits(), {"CPU": float(cpus)}).cluster
    assert (c.num_samplers, c.num_learners, c.layout) == (samplers, learners, "colocated")
    devices = Devices.of(c)
    workers = [f"worker-{i}" for i in range(samplers)]
    assert devices.members == [[name] for name in workers + [f"learner-{i}" for i in range(samplers, learners)]
                               ] + [["reward-0"]]
    assert len(devices.bundles) == devices.num_devices == learners
    assert devices.totals()["CPU"] <= cpus
    share = cpus / learners  # the cores shared by the devices
    assert devices.bundles[0] == devices.asks["worker-0"] == {"CPU": share}  # the whole device, one actor
    assert devices.asks[f"learner-{learners - 1}" if learners > samplers else workers[-1]] == {"CPU": share}
    assert devices.threads["worker-0"] == max(1, int(share))


def test_separate_layout_time_shares_the_cores():
    """Lag 1 on 2 cores: 2 samplers + 2 learners on devices of their own, half a core each, one
    torch thread each; nothing was lowered by hand."""
    c = resolve_layout(_digits("cluster.max_policy_lag=1"), {"CPU": 2.0}).cluster
    devices = Devices.of(c)
    assert c.layout == "separate"
    assert devices.members[:4] == [["learner-0"], ["learner-1"], ["sampler-0"], ["sampler-1"]]
    assert devices.bundles == [{"CPU": 0.5}] * 4
    assert set(devices.threads.values()) == {1}


def test_explicit_values_are_kept_and_gpus_make_the_devices():
    config = _digits("cluster.num_samplers=3", "cluster.num_learners=1", "cluster.sampler.num_cpus=1.5",
                     "cluster.learner.num_threads=3")
    c = resolve_layout(config, {"CPU": 64.0}).cluster
    devices = Devices.of(c)
    assert (c.num_samplers, c.num_learners, c.sampler.num_cpus) == (3, 1, 1.5)
    assert devices.members[:3] == [["worker-0"], ["sampler-1"], ["sampler-2"]]
    # 64 / 3 rounded down to the 4 decimals Ray keeps; 213333 / 1e4 rounds as the literal does
    assert devices.bundles[0]["CPU"] == 21.3333 and devices.threads["worker-0"] == 3
    # a GPU model: one device per GPU, 1 CPU per actor; a GPU reward actor takes its GPU first
    gpu = resolve_layout(_digits("model.device=cuda", "cluster.reward.num_gpus=1"), {"CPU": 96.0, "GPU": 8.0})
    assert (gpu.cluster.num_samplers, gpu.cluster.num_learners) == (2, 7)
    assert gpu.cluster.learner.num_cpus == 1.0


def test_learner_group_config_errors():
    with pytest.raises(ConfigError, match=r"^cluster\.num_learners: 64 learners cannot split a minibatch of "
                                          r"train\.batch_size=32 samples; use at most 32$"):
        _digits("cluster.num_learners=64")
    with pytest.raises(ConfigError, match=r"^cluster\.num_learners: expected an integer, got 'many'; or must be one of "):
        _digits("cluster.num_learners=many")
    with pytest.raises(ConfigError, match=r"^cluster\.layout: must be one of \['auto', 'colocated', 'separate'\]"):
        _digits("cluster.layout=mixed")
    with pytest.raises(ConfigError, match=r"^cluster\.learner\.num_threads: must be >= 1 or auto$"):
        _digits("cluster.learner.num_threads=0")


def test_the_bottleneck_line_names_the_count_to_raise():
    assert bottleneck_hint({"sampler": 0.95, "learner": 0.3, "reward": 0.05}, "separate", 1) == (
        "learners idle 70% of the time; samplers are busy 95%: raise cluster.num_samplers")
    assert bottleneck_hint({"sampler": 0.2, "learner": 0.9, "reward": 0.05}, "separate", 0) == (
        "samplers idle 80% of the time; learners are busy 90%: raise cluster.num_learners (at max_policy_lag 0 "
        "samplers and learners take turns: cluster.layout colocated keeps both busy)")
    assert bottleneck_hint({"sampler": 0.3, "learner": 0.65, "reward": 0.05}, "colocated", 0) is None
    assert bottleneck_hint({"sampler": 0.1, "learner": 0.2, "reward": 0.9}, "colocated", 0) == (
        "the devices idle 70% of the time waiting for rewards (reward actors busy 90%): raise cluster.num_reward_actors")
    assert bottleneck_hint({"sampler": 0.8, "learner": 0.7, "reward": 0.01}, "separate", 1) is None
