"""Scoring as a service: `ddpo serve-rewards` starts detached reward actors on a cluster, and two
runs that name the service in `reward.service` score on them at once (one a `ddpo train` in
another process, one a driver in this one), each with its own reward's numbers; the errors."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from actors.reward import RewardWorker
from cluster.cli import embedded_config, main
from cluster.driver import Driver
from cluster.reward_service import RewardService, RewardServiceError, check_matches, find_service, start_service
from cluster.run_dir import make_run_dir
from ddpo.config import RewardConfig, RewardTerm, load_config
from tests.conftest import SMALL_DIGITS, one_torch_thread

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2
# the small digits run, each device on one CPU of its own: two runs fit on the session's 4 CPUs.
# No held-out reward (no eval batch): the service's digits config has one, which a run without
# the guard does not ask for
RUN = {**SMALL_DIGITS, "num_epochs": EPOCHS, "cluster.sampler.num_cpus": 1, "cluster.learner.num_cpus": 1,
       "reward.heldout": "[]"}
IMAGES_PER_RUN = EPOCHS * RUN["sample.batch_size"] * RUN["sample.num_batches_per_epoch"]


def _ddpo(*args: str) -> list[str]:
    return [sys.executable, "-m", "cluster.cli", *args]


def _env() -> dict:
    """For a `ddpo` process joining the session's Ray: its node keeps the loopback IP (Ray
    would replace it with the machine's routable one and wait for a node there)."""
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _sets(settings: dict) -> list[str]:
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def _trajectories(run_dir: Path, epoch: int) -> tuple[pa.Table, np.ndarray]:
    """An epoch's recorded samples, without their rewards, and the rewards."""
    table = pq.read_table(run_dir / "trajectories" / f"epoch_{epoch:04d}.parquet")
    scored = [name for name in table.column_names if name == "reward" or name.startswith("info.")]
    return table.drop_columns(scored), table.column("reward").to_numpy()


def _recorded_rewards_are_the_runs_own(run_dir: Path, reward) -> None:
    """Each epoch's recorded rewards equal the run's reward on the recorded images."""
    worker = RewardWorker(reward)
    for epoch in range(EPOCHS):
        table, recorded = _trajectories(run_dir, epoch)
        with one_torch_thread():  # as the reward actors (no CPUs asked: one thread)
            scored = worker.score(*table.to_batches())
        np.testing.assert_allclose(np.concatenate([rewards for _, rewards, _ in scored]), recorded, rtol=1e-6)


def test_two_runs_score_on_one_service(ray_session, tmp_path):
    address = ray._private.worker._global_node.address
    # the service, started by the command as a user starts it: its actors outlive the command
    started = subprocess.run(_ddpo("serve-rewards", "--address", address, "--name", "shared",
                                   "--set", "cluster.num_reward_actors=2"),
                             capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert started.returncode == 0, started.stderr[-3000:]
    assert started.stdout.splitlines()[-1] == (
        "reward service 'shared': 2 reward actors scoring digit_judge; runs on this cluster use it with "
        "--set reward.service=shared; stop it with: ddpo serve-rewards --stop shared")
    try:
        service = find_service("shared")
        assert service.names == ["reward-service-shared-0", "reward-service-shared-1"]
        # run b: `ddpo train` in a process of its own; run a: a driver in this one, meanwhile
        other = subprocess.Popen(
            _ddpo("train", "--address", address,
                  *_sets({**RUN, "reward.service": "shared", "output_dir": tmp_path, "run_name": "b", "seed": 1})),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO)
        try:
            config = load_config(embedded_config(), [f"{k}={v}" for k, v in
                                                     {**RUN, "reward.service": "shared", "output_dir": tmp_path,
                                                      "run_name": "a"}.items()])
            driver = Driver(config, make_run_dir(config))
            try:
                # no reward actor of its own, none placed: its pool sends to the service's actors
                assert [name for name in driver.named_actors if name.startswith("reward-")] == service.names
                assert driver.placement.devices.num_devices == len(driver.placement.devices.bundles) == 1
                history = driver.fit()
            finally:
                driver.shutdown()
            output, _ = other.communicate(timeout=120)
        finally:
            other.kill()
        assert other.returncode == 0, output[-3000:]
        assert [m["epoch"] for m in history] == list(range(EPOCHS))
        # the service lives on after both runs, and scored every image of both, and nothing else
        described = service.describe()
        assert sum(d["images_scored"] for d in described) == 2 * IMAGES_PER_RUN
        for run in ["a", "b"]:
            _recorded_rewards_are_the_runs_own(tmp_path / run, config.reward)
        assert not np.array_equal(*(_trajectories(tmp_path / run, 0)[1] for run in ["a", "b"]))  # two seeds

        # `ddpo eval`'s scoring goes to the service too (its `_score_on_ray`)
        from cluster.workflow import _score_on_ray

        table, recorded = _trajectories(tmp_path / "a", 1)
        rescored = _score_on_ray(config, table.to_batches(), address=None)
        np.testing.assert_allclose(rescored.column("reward").to_numpy(), recorded, rtol=1e-6)
        assert sum(d["images_scored"] for d in service.describe()) == 2 * IMAGES_PER_RUN + table.num_rows
    finally:
        assert main(["serve-rewards", "--stop", "shared"]) == 0
    with pytest.raises(RewardServiceError):
        find_service("shared")


def test_a_run_needs_a_running_service_that_scores_its_reward(ray_session, tmp_path, capsys):
    config = load_config(embedded_config(), [f"{k}={v}" for k, v in
                                             {**RUN, "reward.service": "nowhere", "output_dir": tmp_path}.items()])
    with pytest.raises(RewardServiceError, match=r"^reward.service: no reward service 'nowhere' on this cluster; "
                                                 r"start one with `ddpo serve-rewards --config \.\.\. --name nowhere`$"):
        Driver(config, tmp_path)

    jpeg = load_config(None, ["reward.name=jpeg_compressibility"])
    start_service(jpeg, "jpeg")
    try:
        # the name is taken: from the function, and from the command (one line, exit status 2)
        with pytest.raises(RewardServiceError, match="a reward service 'jpeg' is running on this cluster already"):
            start_service(jpeg, "jpeg")
        capsys.readouterr()
        assert main(["serve-rewards", "--name", "jpeg", "--set", "reward.name=jpeg_compressibility"]) == 2
        assert capsys.readouterr().err == (
            "ddpo: error: --name: a reward service 'jpeg' is running on this cluster already; stop it with "
            "`ddpo serve-rewards --stop jpeg`, or choose another --name\n")
        # a run whose reward is not the service's: one line naming both, before anything starts
        config.reward.service = "jpeg"
        with pytest.raises(RewardServiceError, match=r"^reward.service: the service 'jpeg' scores jpeg_compressibility "
                                                     r"but the run's reward is digit_judge; "):
            Driver(config, tmp_path)
        assert not list(tmp_path.iterdir())
    finally:
        assert main(["serve-rewards", "--stop", "jpeg"]) == 0
    assert capsys.readouterr().out == "reward service 'jpeg' stopped (1 reward actor)\n"
    assert main(["serve-rewards", "--stop", "jpeg"]) == 2
    assert capsys.readouterr().err == ("ddpo: error: --stop: no reward service 'jpeg' on this cluster; start one "
                                       "with `ddpo serve-rewards --config ... --name jpeg`\n")


def test_a_reward_that_fails_to_load_is_one_line_and_leaves_no_actor(ray_session, capsys):
    assert main(["serve-rewards", "--name", "broken", "--set", "reward.name=tests.test_rewards:FailingToLoadReward",
                 "--set", "cluster.num_reward_actors=2"]) == 2
    assert capsys.readouterr().err == "ddpo: error: reward.params.path: no file '/no/such/head.safetensors'\n"
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if "broken" in a["name"]]  # names free


def test_the_check_names_the_difference():
    def mix(*weights):
        return [RewardTerm("digit_judge", weights[0]), RewardTerm("jpeg_compressibility", weights[1])]

    served = RewardConfig(weighted=mix(0.5, 0.5), heldout=[RewardTerm("digit_judge_2")])
    service = RewardService("mix", [], [], served, {})
    check_matches(service, served)
    with pytest.raises(RewardServiceError, match=r"^reward.service: the service 'mix' scores 0.5 \* digit_judge \+ "
                                                 r"0.5 \* jpeg_compressibility but the run's reward is 0.7 \* "
                                                 r"digit_judge \+ 0.3 \* jpeg_compressibility; "):
        check_matches(service, RewardConfig(weighted=mix(0.7, 0.3)))
    with pytest.raises(RewardServiceError, match=r"but the run's reward is digit_judge \{'digit': 3\}; "):
        check_matches(RewardService("one", [], [], RewardConfig("digit_judge"), {}),
                      RewardConfig("digit_judge", {"digit": 3}))
    # held-out terms: the run's must be the service's; a run without them may use it
    check_matches(service, RewardConfig(weighted=mix(0.5, 0.5)))
    with pytest.raises(RewardServiceError, match=r"^reward.heldout: the service 'mix' scores the held-out reward "
                                                 r"digit_judge_2 but the run's is aesthetic; "):
        check_matches(service, RewardConfig(weighted=mix(0.5, 0.5), heldout=[RewardTerm("aesthetic")]))
    # an image reward on clips: the service's reduction of the frames is the run's
    with pytest.raises(RewardServiceError, match=r"^reward.frame_reduction: the service 'mix' reduces a clip's "
                                                 r"frames by their mean but the run's is min; "):
        check_matches(service, RewardConfig(weighted=mix(0.5, 0.5), frame_reduction="min"))
