"""The actor-learner system on Ray (one shared local instance for the session)."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch

from cluster.driver import Driver
from cluster.inprocess import InProcessRun
from cluster.loop import STAGES
from cluster.run_dir import make_run_dir
from tests.conftest import kill_once_recorded, one_torch_thread, ray_processes, run_metrics, tiny_config
from tests.float_error import U32


def _run(config):
    driver = Driver(config, make_run_dir(config))
    try:
        history = driver.fit()
        weights = ray.get(driver.learners[0].weights.remote())
    finally:
        driver.shutdown()
    return history, weights


UNDISTURBED = {"num_epochs": 3, "checkpoint_every": 1, "cluster.num_samplers": 2}
# the epoch metrics a lag-0 run must reproduce exactly
EXACT = ["reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "grad_norm"]


@pytest.fixture(scope="module")
def undisturbed(ray_session, tmp_path_factory):
    """A lag-0 run of the tiny config (2 samplers) that nothing disturbs: its history, final
    (version, weights) and directory; the node's metrics endpoint (what Prometheus scrapes) read
    every 0.5 s while it ran; its placement group; and each sampler's (version, weights) after
    it sampled once more with the final version."""
    import threading
    import urllib.request

    from ray.util.placement_group import placement_group_table

    port = ray.nodes()[0]["MetricsExportPort"]
    scraped, done = [], threading.Event()

    def scrape():
        while not done.is_set():
            scraped.append(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
            done.wait(0.5)

    config = tiny_config(tmp_path_factory.mktemp("undisturbed"), run_name="undisturbed", **UNDISTURBED)
    driver = Driver(config, make_run_dir(config))
    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        placement = {"table": placement_group_table(driver.placement.group), "threads": driver.placement.threads,
                     "num_cpus": {name: driver.placement.options(name)["num_cpus"] for name in driver.named_actors},
                     "found_by_name": [ray.get_actor(name) is not None for name in driver.named_actors]}
        history = driver.fit()
        weights = ray.get(driver.learners[0].weights.remote())
        # one more batch per sampler: each loads the final version before it
        ray.get([task.summary_ref for task in driver.submit_sampling(config.num_epochs)])
        sampler_weights = ray.get([sampler.weights.remote() for sampler in driver.samplers])
    finally:
        done.set()
        scraper.join()
        driver.shutdown()
    return SimpleNamespace(history=history, weights=weights, run_dir=Path(config.output_dir) / "undisturbed",
                           scraped=scraped, placement=placement, sampler_weights=sampler_weights)


def test_actors_run_in_their_bundles_and_every_sampler_gets_the_learners_lora(undisturbed):
    placement = undisturbed.placement
    assert placement["table"]["state"] == "CREATED"
    # colocated (lag 0): sampler 0 and learner rank 0 are one actor on a core, worker-0, with one
    # model; sampler-1 has a core and a model of its own, and gets the LoRA broadcast
    assert list(placement["table"]["bundles"].values()) == [{"CPU": 1.0}] * 2  # worker-0, sampler-1
    assert placement["num_cpus"] == {"worker-0": 1.0, "sampler-1": 1.0, "reward-0": 0.0}
    assert placement["threads"] == {"worker-0": 1, "sampler-1": 1, "reward-0": 1}
    assert all(placement["found_by_name"])
    version, learner_state = undisturbed.weights
    assert version == 3
    for sampler_version, sampler_state in undisturbed.sampler_weights:
        assert sampler_version == 3
        assert learner_state.keys() == sampler_state.keys()
        for key in learner_state:
            assert torch.equal(learner_state[key], sampler_state[key])


def test_lag0_run_equals_the_inprocess_composition(ray_session, tmp_path, undisturbed):
    """The Ray run equals the same classes composed in this process, bit for bit (a second Ray
    run equal to the first: test_actors_killed_mid_run_are_restarted_and_nothing_is_lost)."""
    history_a, (version_a, weights_a), run_dir = undisturbed.history, undisturbed.weights, undisturbed.run_dir
    with one_torch_thread():  # as the actors (num_cpus 1)
        config = tiny_config(tmp_path, run_name="inprocess", **UNDISTURBED)
        run = InProcessRun(config, make_run_dir(config))
        history_c, learner = run.fit(), run.learner
    version_c, weights_c = learner.weights()
    assert version_a == version_c == 3
    for a, c in zip(history_a, history_c, strict=True):
        assert [a[k] for k in EXACT] == [c[k] for k in EXACT]
        for m in (a, c):  # the one loop's stages, each timed (tests/test_loop.py: their order)
            times = [m[f"time_{stage}_s"] for stage in STAGES]
            assert min(times) >= 0 and sum(times) <= m["time_epoch_s"] + 1e-6
        assert c["time_checkpoint_s"] > 0 and a["time_checkpoint_s"] > 0  # checkpoint_every 1
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_c[key])
    assert len(run_metrics(run_dir)) == 3
    assert (run_dir / "samples" / "epoch_0002.png").is_file()
    assert (run_dir / "checkpoints" / "epoch_0002" / "pytorch_lora_weights.safetensors").is_file()


@pytest.fixture(scope="module")
def lag1_judged(ray_session, tmp_path_factory):
    """A lag-1 run of 3 epochs scored by a stand-in judge that answers, with a before/after
    evaluation of 8 images: its history, final version and directory."""
    tmp_path = tmp_path_factory.mktemp("lag1")
    config = tiny_config(tmp_path, **{"num_epochs": 3, "cluster.max_policy_lag": 1, "run_name": "judged",
                                      "reward.name": "tests.test_rewards:brightness_judge",
                                      "reward.params": "{threshold: 0.4}", "eval_images": 8})
    history, (version, _) = _run(config)
    return SimpleNamespace(history=history, version=version, run_dir=tmp_path / "judged")


def test_lag1_pipelines_with_versions_one_behind(lag1_judged):
    history = lag1_judged.history
    assert lag1_judged.version == 3
    assert [m["policy_lag_mean"] for m in history] == [0.0, 1.0, 1.0]
    assert all(m["dropped_stale"] == 0 and m["num_samples"] == 8 for m in history)
    assert history[1]["importance_weight_mean"] < 1.0
    assert np.isfinite([m["loss"] for m in history]).all()


def test_a_broken_reward_stops_the_run_with_a_named_one_line_error(ray_session, tmp_path):
    from cluster.cli import _user_error

    config = tiny_config(tmp_path, **{"reward.name": "tests.test_rewards:_nan_reward", "num_epochs": 1})
    with pytest.raises(Exception) as info:
        _run(config)
    error = _user_error(info.value)
    assert str(error) == "reward 'tests.test_rewards:_nan_reward' returned NaN or infinite rewards"


def test_a_reward_that_fails_to_load_is_its_own_one_line_error(ray_session, tmp_path):
    from cluster.cli import _user_error

    config = tiny_config(tmp_path, **{"reward.name": "tests.test_rewards:FailingToLoadReward"})
    with pytest.raises(Exception) as info:
        Driver(config, make_run_dir(config))
    assert str(_user_error(info.value)) == "reward.params.path: no file '/no/such/head.safetensors'"
    assert ray.util.placement_group_table() and all(  # the driver cleaned up after itself
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


def test_a_run_records_the_rewards_answers_and_a_before_after_grid(lag1_judged):
    history, run_dir = lag1_judged.history, lag1_judged.run_dir
    table = pq.read_table(run_dir / "trajectories" / "epoch_0001.parquet")
    assert set(table.column("info.answer").to_pylist()) <= {"bright", "dark"}
    assert history[1]["correct_mean"] == np.mean(table.column("info.correct").to_numpy())
    evals = json.loads((run_dir / "eval.json").read_text())
    assert set(evals) == {"before", "after"} and "correct_mean" in evals["after"]
    before = pq.read_table(run_dir / "samples" / "eval_before.parquet")
    after = pq.read_table(run_dir / "samples" / "eval_after.parquet")
    assert before.column("seed").to_pylist() == after.column("seed").to_pylist()  # the same noise
    assert before.column("eval_policy_version")[0].as_py() == 0
    assert after.column("eval_policy_version")[0].as_py() == lag1_judged.version
    assert (run_dir / "before_after.png").is_file()


def test_the_papers_model_rewards_score_a_run_through_the_pool(ray_session, tmp_path, llava_path, bert_path,
                                                             tiny_aesthetic):
    """Prompt alignment (tiny LLaVA + tiny BERT, transformers backend) plus a little aesthetic
    score (tiny CLIP + random head), summed with weights, on two reward actors."""
    aesthetic_dir = tiny_aesthetic[0]
    alignment = {"vlm": llava_path, "bertscore_model": bert_path, "bertscore_layer": 1, "device": "cpu",
                 "max_new_tokens": 4, "question": "what is this ?"}
    aesthetic = {"clip_model": str(aesthetic_dir / "clip"), "head": str(aesthetic_dir / "head.safetensors"),
                 "device": "cpu"}
    config = tiny_config(tmp_path, **{
        "num_epochs": 1, "run_name": "vlm", "cluster.num_reward_actors": 2,
        "reward.weighted": json.dumps([{"name": "prompt_alignment", "weight": 1.0, "params": alignment},
                                       {"name": "aesthetic", "weight": 0.1, "params": aesthetic}])})
    history, _ = _run(config)
    table = pq.read_table(tmp_path / "vlm" / "trajectories" / "epoch_0000.parquet")
    recall = np.array(table.column("info.prompt_alignment").to_pylist())
    score = np.array(table.column("info.aesthetic").to_pylist())
    # the sum in float32, as RewardWorker adds it: 0.1 rounded, its product and the sum rounded once
    # each, so within 3 u of the terms' magnitudes
    difference = np.abs(table.column("reward").to_numpy() - (recall + 0.1 * score))
    assert np.all(difference <= 3 * U32 * (np.abs(recall) + 0.1 * np.abs(score)))
    assert all(isinstance(a, str) for a in table.column("info.prompt_alignment.answer").to_pylist())
    assert history[0]["num_samples"] == 8 and np.isfinite(history[0]["loss"])


def test_asking_for_more_than_the_cluster_has_fails_at_once(ray_session, tmp_path):
    from cluster.placement import Placement, PlacementError

    config = tiny_config(tmp_path, **{"cluster.num_samplers": 2, "cluster.sampler.num_gpus": 0.5})
    with pytest.raises(PlacementError) as info:
        Placement(config)
    assert str(info.value) == ("cluster: the actors ask for 1 GPU in all (2 samplers, 1 learners, 1 reward actors) "
                               "but the Ray cluster has 0; lower cluster.*.num_gpus or the actor counts")
    config = tiny_config(tmp_path, **{"cluster.num_samplers": 8, "cluster.layout": "separate"})
    with pytest.raises(PlacementError, match="^cluster: the actors ask for 9 CPU in all"):
        Placement(config)
    config = tiny_config(tmp_path, **{"cluster.sampler.resources": "{sampler_node: 1}"})
    with pytest.raises(PlacementError, match=r"^cluster: the actors ask for 1 sampler_node .* lower "
                                             r"cluster\.\*\.resources\.sampler_node"):
        Placement(config)


def test_bundles_that_fit_in_total_but_not_on_one_node_fail_within_the_timeout(ray_session, tmp_path):
    """4 CPUs exist on the one node, but STRICT_SPREAD wants a node per bundle."""
    import time

    from cluster.placement import Placement, PlacementError

    config = tiny_config(tmp_path, **{"cluster.placement_strategy": "STRICT_SPREAD", "cluster.layout": "separate",
                                      "cluster.placement_timeout_s": 2})
    start = time.monotonic()
    with pytest.raises(PlacementError, match=r"^cluster: the actors' bundles \(\[\{'CPU': 1\.0\}, "
                                             r"\{'CPU': 1\.0\}\], strategy STRICT_SPREAD\) could not be placed "
                                             r"within cluster\.placement_timeout_s=2s on nodes with"):
        Placement(config)
    assert time.monotonic() - start < 10


def test_the_nodes_metrics_endpoint_shows_the_run_while_it_runs(undisturbed):
    """Prometheus scrapes each node's metrics endpoint; the ddpo metrics are there mid-run."""
    text = "\n".join(undisturbed.scraped)
    for name in ["ray_ddpo_reward_mean", "ray_ddpo_policy_version", "ray_ddpo_samples_total",
                 "ray_ddpo_approx_kl", "ray_ddpo_weight_sync_seconds", "ray_ddpo_queue_depth",
                 "ray_ddpo_busy_fraction"]:
        assert name in text, name
    for actor, role in [("sampler-1", "sampler"), ("reward-0", "reward"), ("worker-0", "sampler"),
                        ("worker-0", "learner")]:
        assert re.search(rf'ray_ddpo_busy_seconds_total{{[^}}]*actor="{actor}"[^}}]*role="{role}"', text), actor
        assert re.search(rf'ray_ddpo_idle_ratio{{[^}}]*actor="{actor}"', text), actor
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = undisturbed.run_dir
    assert (run_dir / "curves.png").is_file()
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward_mean")] == [0, 1, 2]
    assert len(events.Images("samples")) == 3


def test_every_epoch_records_the_fields_throughput_and_the_actors_memory(undisturbed):
    """images / (epoch wall x the 2 devices), the actors' resident memory summed (3 processes: a
    worker, a sampler, a reward actor), and no MFU on a CPU (no peak to divide by)."""
    for m in undisturbed.history:
        assert m["images_per_device_s"] == 8 / (m["time_epoch_s"] * 2)
        assert 3 * 100 * 2**20 < m["actors_rss_bytes"] < 3 * 4 * 2**30
        assert m["actors_gpu_peak_bytes"] == 0 and m["mfu"] is None
    assert "ray_ddpo_images_per_device_s" in "\n".join(undisturbed.scraped)


def test_actors_killed_mid_run_are_restarted_and_nothing_is_lost(ray_session, tmp_path, undisturbed):
    """SIGKILL, from outside, a sampler and the worker (sampler 0 and the learner) once epoch 0 is
    recorded and a reward actor once epoch 1 is. Ray restarts the sampler and the reward actor,
    and the tasks they had in flight run again; the driver starts the worker again from epoch 0's
    checkpoint and redoes epoch 1. The run ends as if nothing had happened, with one metrics line
    per epoch."""
    config = tiny_config(tmp_path, run_name="killed", **UNDISTURBED)
    metrics_path = tmp_path / "killed" / "metrics.jsonl"

    def killer(title):
        def kill():
            found = ray_processes(title)[:1]
            for proc in found:
                proc.kill()
            return bool(found)
        return kill

    with kill_once_recorded(metrics_path, 1, killer("ray::SamplerActor")) as sampler, \
            kill_once_recorded(metrics_path, 1, killer("ray::WorkerActor")) as learner, \
            kill_once_recorded(metrics_path, 2, killer("ray::RewardActor")) as reward:
        history, (version, weights) = _run(config)
    assert sampler.is_set() and learner.is_set() and reward.is_set()
    assert [m["num_samples"] for m in history] == [8, 8, 8]
    assert all(m["duplicate_batches"] == 0 and m["dropped_stale"] == 0 for m in history)
    assert [m["epoch"] for m in run_metrics(tmp_path / "killed")] == [0, 1, 2]
    assert history[-1]["learner_restarts"] == 1
    reference_history, (reference_version, reference_weights) = undisturbed.history, undisturbed.weights
    assert version == reference_version == 3
    for m, reference in zip(history, reference_history, strict=True):
        assert [m[k] for k in EXACT] == [reference[k] for k in EXACT]
    for key in weights:
        assert torch.equal(weights[key], reference_weights[key])


def test_a_checkpoint_write_that_fails_mid_run_ends_it_in_one_line(ray_session, tmp_path):
    """Once epoch 0 is recorded, the learner's process may write no file past 1 kB (RLIMIT_FSIZE:
    its writes fail with EFBIG, as they would with ENOSPC on a full disk). The run stops at epoch
    1's checkpoint with one line, and epoch 0's checkpoint stays whole."""
    import psutil

    from cluster.loop import WriteFailed
    from cluster.run_dir import latest_checkpoint
    from learner import Learner

    config = tiny_config(tmp_path, **{"num_epochs": 3, "checkpoint_every": 1, "run_name": "full"})
    run_dir = tmp_path / "full"
    driver = Driver(config, make_run_dir(config))
    pid = ray.get(driver.learners[0].__ray_call__.remote(lambda self: __import__("os").getpid()))

    def fill_the_disk():
        psutil.Process(pid).rlimit(psutil.RLIMIT_FSIZE, (1024, 1024))

    with kill_once_recorded(run_dir / "metrics.jsonl", 1, fill_the_disk), pytest.raises(WriteFailed) as info:
        try:
            driver.fit()
        finally:
            driver.shutdown()
    message = str(info.value)
    assert "\n" not in message and "File too large" in message, message
    assert message.startswith(f"writing the checkpoint failed ({run_dir / 'checkpoints' / 'epoch_0001'}: "), message
    assert message.endswith(f"; the run stopped; go on from {run_dir / 'checkpoints' / 'epoch_0000'} with: "
                            f"ddpo train --resume {run_dir}"), message
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch_0000"]
    assert latest_checkpoint(run_dir).name == "epoch_0000"
    assert Learner(config).load_checkpoint(run_dir / "checkpoints" / "epoch_0000") == 1
    assert [m["epoch"] for m in run_metrics(run_dir)] == [0]


def test_the_learner_group_restarts_until_its_limit_then_the_error_ends_the_run(tmp_path):
    """The bookkeeping of `Driver.recover_learners`, without Ray: a rank that dies while the
    group restarts takes another restart; past cluster.learner_max_restarts, or when no learner
    died (a reward's error, say), the error goes on to end the run in one line."""
    driver = Driver.__new__(Driver)  # only the state recover_learners and the message use
    driver.config = tiny_config(tmp_path, **{"cluster.learner_max_restarts": 2})
    driver.run_dir, driver.learner_restarts = tmp_path, 0
    driver.learners, driver.samplers, driver.reward_actors = [], [], []
    driver.learner_names, driver.plain_samplers, driver.reward_service = ["learner-0"], {}, None
    dead, restarts = ["learner-0"], []

    def restart(names):
        restarts.append(list(names))
        if len(restarts) == 1:  # the new rank dies before the group is up
            raise ray.exceptions.RayActorError()
        return 4  # the epoch to redo from

    driver.dead_learners, driver._restart_learners = lambda: list(dead), restart
    assert driver.recover_learners(ray.exceptions.RayActorError()) == 4
    assert driver.learner_restarts == 2 and restarts == [["learner-0"], ["learner-0"]]
    error = ray.exceptions.RayActorError()
    with pytest.raises(ray.exceptions.RayActorError) as info:  # the limit is spent
        driver.recover_learners(error)
    assert info.value is error and driver.learner_restarts == 2
    assert driver.lost_actor_message(error) == ("the actor 'learner-0' died and the learner group had its 2 "
                                                "restarts (cluster.learner_max_restarts); no checkpoint was "
                                                "written yet (see checkpoint_every)")
    dead.clear()
    driver.learner_restarts = 0
    with pytest.raises(ray.exceptions.RayActorError):  # no learner died: not the learner's to mend
        driver.recover_learners(error)
    assert driver.learner_restarts == 0


def test_a_record_write_that_fails_mid_run_ends_it_in_one_line(ray_session, tmp_path, monkeypatch):
    """The driver's own writes (Parquet, grids, metrics.jsonl) failing on a full disk end the run
    in one line too."""
    import errno

    from cluster.loop import WriteFailed
    from cluster.run_dir import RunRecorder

    def disk_full(self, epoch, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.run_dir / "metrics.jsonl"))

    monkeypatch.setattr(RunRecorder, "record_epoch", disk_full)
    config = tiny_config(tmp_path, **{"num_epochs": 1, "run_name": "full"})
    driver = Driver(config, make_run_dir(config))
    with pytest.raises(WriteFailed) as info:
        try:
            driver.fit()
        finally:
            driver.shutdown()
    assert str(info.value) == (f"writing the run directory failed ([Errno 28] No space left on device: "
                               f"'{tmp_path / 'full' / 'metrics.jsonl'}'); the run stopped; go on from "
                               f"{tmp_path / 'full' / 'checkpoints' / 'epoch_0000'} with: ddpo train --resume "
                               f"{tmp_path / 'full'}")
