"""The reward-hacking guard (`ddpo.guard`) on hand-made evaluations, and prompt files that carry
metadata to the rewards (JSON Lines)."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from actors.reward import RewardWorker
from ddpo.config import ConfigError, RewardConfig, RewardTerm, load_config
from ddpo.guard import Evaluation, HackingGuard
from ddpo.media import Media
from ddpo.trajectory import media_column


def batch(batch_id, images, prompts=None):
    prompts = prompts or ["p"] * len(images)
    return pa.RecordBatch.from_pydict({
        "batch_id": [batch_id] * len(images), "prompt": prompts, "seed": list(range(len(images))),
        "policy_version": [0] * len(images)}).append_column(*media_column(Media.from_images(images)))


def _run(guard, series):
    """Feed (trained, heldout) pairs as epochs 0, 1, ...; returns the epochs it was best and fired."""
    best, fired = [], []
    for epoch, (trained, heldout) in enumerate(series):
        is_best, fires = guard.observe(Evaluation(epoch, trained, heldout))
        best += [epoch] if is_best else []
        fired += [epoch] if fires else []
    return best, fired


def test_the_guard_fires_after_patience_evaluations_of_rising_trained_and_falling_heldout():
    series = [(0.3, 0.50), (0.5, 0.70), (0.6, 0.68), (0.7, 0.60), (0.8, 0.55), (0.9, 0.50), (0.95, 0.45)]
    best, fired = _run(HackingGuard(tolerance=0.05, patience=2), series)
    assert best == [0, 1]
    # epoch 2 is within the tolerance (0.68 > 0.70 - 0.05); 3 and 4 are the two in a row
    assert fired == [4]


def test_the_guard_stays_quiet_when_both_rise_or_both_fall():
    rising = [(0.1 * i, 0.1 * i) for i in range(8)]
    assert _run(HackingGuard(0.05, 2), rising)[1] == []
    collapse = [(0.5, 0.5), (0.4, 0.3), (0.3, 0.2), (0.2, 0.1)]  # both fall: a bad run, not hacking
    assert _run(HackingGuard(0.05, 2), collapse)[1] == []


def test_a_broken_streak_starts_again_and_fires_once_per_streak():
    series = [(0.5, 0.8), (0.6, 0.7), (0.4, 0.7), (0.6, 0.7), (0.7, 0.6), (0.8, 0.5), (0.9, 0.4)]
    # epoch 1 starts a streak, 2 breaks it (the trained reward fell), 3 and 4 make two in a row
    assert _run(HackingGuard(0.05, 2), series)[1] == [4]


def test_the_warning_names_the_epoch_and_both_trends():
    guard = HackingGuard(0.05, 1)
    guard.observe(Evaluation(11, 0.62, 0.91))
    hacked = Evaluation(17, 0.81, 0.74)
    assert guard.observe(hacked) == (False, True)
    line = guard.warning(hacked, "digit_judge_2")
    assert line == ("warning: epoch 17: reward hacking? the trained reward rose 0.620 -> 0.810 while the held-out "
                    "digit_judge_2 fell 0.910 -> 0.740 since epoch 11 (1 evaluation in a row)")


def test_heldout_config_is_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("reward: {name: digit_judge, heldout: [{name: jpeg_compressibility}]}\n")
    config = load_config(path, ["eval_every=2"])
    assert config.reward.heldout == [RewardTerm("jpeg_compressibility")]
    with pytest.raises(ConfigError, match="reward.heldout_action"):
        load_config(path, ["eval_every=2", "reward.heldout_action=undo"])
    with pytest.raises(ConfigError, match="reward.heldout_patience: must be >= 1"):
        load_config(path, ["reward.heldout_patience=0"])


def test_the_worker_scores_the_heldout_reward_apart_from_the_trained_one():
    reward = RewardConfig(name="jpeg_compressibility", heldout=[RewardTerm("jpeg_incompressibility", 2.0)])
    worker = RewardWorker(reward)
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    ((_, trained, _),) = worker.score(batch("a", images))
    ((_, heldout, _),) = worker.score(batch("a", images), heldout=True)
    np.testing.assert_allclose(heldout, -2.0 * trained, rtol=1e-6)  # incompressibility = -compressibility


def test_jsonl_prompts_carry_their_metadata_to_the_reward(tmp_path):
    lines = [{"tag": "counting", "include": [{"class": "dog", "count": 2}], "prompt": "a photo of two dogs"},
             {"prompt": "a sign that says \"OPEN\"", "text": "OPEN"},
             {"prompt": "a photo of two dogs", "tag": "counting", "include": [{"class": "dog", "count": 2}]}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    (tmp_path / "c.yaml").write_text("prompts: {file: p.jsonl}\n")
    config = load_config(tmp_path / "c.yaml")
    assert config.load_prompts() == ["a photo of two dogs", "a sign that says \"OPEN\"", "a photo of two dogs"]
    metadata = config.load_prompt_metadata()
    assert metadata == {"a photo of two dogs": {"tag": "counting", "include": [{"class": "dog", "count": 2}]},
                        "a sign that says \"OPEN\"": {"text": "OPEN"}}

    seen = []

    def spy(images, prompts, metadata):
        seen.extend(metadata)
        return np.zeros(len(images)), {}

    worker = RewardWorker(RewardConfig())
    worker.terms["trained"] = [("spy", 1.0, spy)]
    worker.score(batch("b", np.zeros((2, 8, 8, 3), np.uint8), ["a sign that says \"OPEN\"", "a cat"]),
                 prompt_metadata=metadata)
    assert seen[0]["text"] == "OPEN" and seen[0]["batch_id"] == "b"
    assert set(seen[1]) == {"batch_id", "seed", "policy_version"}  # a prompt without metadata


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "a"\n', "p.jsonl:1 is not JSON"),
    ('{"text": "a"}\n', 'p.jsonl:1 has no "prompt" string'),
    ('{"prompt": "a", "t": 1}\n{"prompt": "a", "t": 2}\n', "p.jsonl:2 repeats the prompt 'a' with other metadata"),
    ("\n\n", "holds no prompts"),
])
def test_a_malformed_jsonl_prompt_file_is_one_line_naming_the_line(tmp_path, text, message):
    (tmp_path / "p.jsonl").write_text(text)
    (tmp_path / "c.yaml").write_text("prompts: {file: p.jsonl}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "c.yaml").load_prompts()


# -- the guard in a run, on Ray -----------------------------------------------------------------


def policy_version_reward(images, prompts, metadata):
    """The version of the weights that sampled each image: it rises every epoch. As the trained
    reward, with its negative as the held-out one, every evaluation after the first looks like
    hacking, whatever the model learns."""
    return np.array([m["policy_version"] for m in metadata], np.float64), {}


def _guarded_config(tmp_path, action: str, num_epochs: int = 3):
    from tests.conftest import tiny_config

    name = "tests.test_guard:policy_version_reward"
    return tiny_config(tmp_path, run_name=action, num_epochs=num_epochs, eval_images=4, eval_every=1,
                       **{"reward.name": name, "reward.heldout": f"[{{name: '{name}', weight: -1.0}}]",
                          "reward.heldout_action": action, "reward.heldout_tolerance": 0.5,
                          "reward.heldout_patience": 1})


def _guarded_run(tmp_path, action: str, num_epochs: int = 3):
    import ray

    from cluster.driver import Driver
    from cluster.run_dir import make_run_dir, read_metrics

    config = _guarded_config(tmp_path, action, num_epochs)
    run_dir = make_run_dir(config)
    driver = Driver(config, run_dir)
    try:
        history = driver.fit()
        lr = ray.get(driver.learners[0].__ray_call__.remote(lambda learner: learner.optimizer.param_groups[0]["lr"]))
    finally:
        driver.shutdown()
    guard_lines = [json.loads(line) for line in (run_dir / "guard.jsonl").read_text().splitlines()]
    return driver, history, read_metrics(run_dir), guard_lines, lr, run_dir


def test_rollback_goes_back_to_the_best_at_half_the_learning_rate_then_stops(ray_session, tmp_path, capfd):
    """`warn` differs from it only in the action taken after the same line (the rule and the line
    are tested above)."""
    from cluster.loop import MAX_ROLLBACKS

    driver, history, metrics, guard_lines, lr, run_dir = _guarded_run(tmp_path, "rollback")
    # epoch 1 fires every time: rolled back to epoch 0's weights MAX_ROLLBACKS times, then stopped
    assert [(g["epoch"], g["action"], g["best"]["epoch"]) for g in guard_lines] == (
        [(1, "rollback", 0)] * MAX_ROLLBACKS + [(1, "stop", 0)])
    assert lr == 3e-3 / 2**MAX_ROLLBACKS
    assert [m["epoch"] for m in metrics] == [0, 1] and metrics[1]["heldout_guard"] == "stop"
    # the eval batch of epoch e is sampled with version e + 1: trained e + 1, held-out -(e + 1)
    assert [(m["eval_reward_mean"], m["heldout_reward_mean"]) for m in metrics] == [(1, -1), (2, -2)]
    assert [m["epoch"] for m in history] == [0, 1]
    assert driver.guard_stop is not None and not driver.completed
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best", "epoch_0000"]
    best = json.loads((run_dir / "checkpoints" / "best" / "learner_state.json").read_text())
    assert best["policy_version"] == 1
    printed = [line for line in capfd.readouterr().err.splitlines() if "reward hacking?" in line]
    assert len(printed) == MAX_ROLLBACKS + 1
    assert printed[0].endswith("rolling back to it at half the learning rate")
    assert "warning: epoch 1: reward hacking? the trained reward rose 1.000 -> 2.000 while the held-out " \
           "tests.test_guard:policy_version_reward fell -1.000 -> -2.000 since epoch 0" in printed[-1]
    assert printed[-1].endswith("the run stops here")


def test_the_in_process_run_evaluates_and_rolls_back_as_the_ray_run(tmp_path, capfd):
    """InProcessRun runs the same loop (cluster.loop): its eval batch every epoch, by both
    rewards, and the guard's rollbacks, then its stop, as in the Ray run above."""
    from cluster.inprocess import InProcessRun
    from cluster.loop import MAX_ROLLBACKS
    from cluster.run_dir import make_run_dir, read_metrics

    config = _guarded_config(tmp_path, "rollback")
    run = InProcessRun(config, make_run_dir(config))
    history = run.fit()
    run_dir = tmp_path / "rollback"
    guard_lines = [json.loads(line) for line in (run_dir / "guard.jsonl").read_text().splitlines()]
    assert [(g["epoch"], g["action"], g["best"]["epoch"]) for g in guard_lines] == (
        [(1, "rollback", 0)] * MAX_ROLLBACKS + [(1, "stop", 0)])
    assert run.learner.optimizer.param_groups[0]["lr"] == 3e-3 / 2**MAX_ROLLBACKS
    metrics = read_metrics(run_dir)
    assert [(m["epoch"], m["eval_reward_mean"], m["heldout_reward_mean"]) for m in metrics] == [(0, 1, -1), (1, 2, -2)]
    assert metrics[1]["heldout_guard"] == "stop" and all(m["time_eval_s"] > 0 for m in metrics)
    assert [m["epoch"] for m in history] == [0, 1] and run.guard_stop is not None and not run.completed
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best", "epoch_0000"]
    assert len([line for line in capfd.readouterr().err.splitlines() if "reward hacking?" in line]) == MAX_ROLLBACKS + 1


def test_the_guard_on_the_digits_runs_fires_on_flow_grpo_and_diffusion_nft_and_not_on_ddpo():
    """docs/guard_digits.json: the shipped digits configs' eval batches every 4 epochs, as
    `python bench/guard_digits.py` recorded them (60 epochs each, seed 0). Replayed through the
    guard they give the warnings the runs printed: none for configs/digits.yaml (DDPO: the
    held-out judge rises with the trained one), and one for Flow-GRPO and DiffusionNFT, whose
    digit_judge climbs to about 0.95 while the held-out judge falls: blobs that the CNN reads as
    digits and the nearest-neighbour judge as none."""
    recorded = json.loads((Path(__file__).resolve().parents[1] / "docs" / "guard_digits.json").read_text())
    fired = {}
    for name, record in recorded.items():
        guard = HackingGuard(record["guard"]["heldout_tolerance"], record["guard"]["heldout_patience"])
        lines = []
        for e in record["evaluations"]:
            evaluation = Evaluation(e["epoch"], e["eval_reward_mean"], e["heldout_reward_mean"])
            if guard.observe(evaluation)[1]:
                lines.append(guard.warning(evaluation, "digit_judge_2"))
        assert [line.split("; best held-out")[0] for line in record["warnings"]] == lines
        assert [e["epoch"] for e in record["evaluations"] if e["guard"]] == [
            int(line.removeprefix("warning: epoch ").split(":")[0]) for line in lines]
        fired[name] = len(lines)
    assert fired["digits"] == 0 and fired["digits_flow"] >= 1 and fired["digits_flow_nft"] >= 1
