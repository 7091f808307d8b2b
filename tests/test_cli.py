"""`ddpo train` from the command line: user mistakes are one line on stderr, exit status 2."""

import json
import re
import subprocess
import sys

import pytest

from cluster.cli import main


@pytest.mark.parametrize("args, message", [
    (["--set", "train.algorithm=ppo"],
     "ddpo: error: train.algorithm: must be one of ['ddpo_is', 'ddpo_sf', 'rwr'], got 'ppo'"),
    (["--set", "reward.name=aesthetic_score"],
     "ddpo: error: reward.name: unknown reward 'aesthetic_score'; choose one of"),
    (["--set", "model.pretrained=/nonexistent/sd15"],
     "ddpo: error: model.pretrained: '/nonexistent/sd15' is not a diffusers pipeline folder"),
    (["--set", "model.pretrained=no-such-org/no-such-model"],
     "ddpo: error: model.pretrained: 'no-such-org/no-such-model' is neither a local diffusers folder"),
    (["--config", "missing.yaml"], "ddpo: error: --config: no such file 'missing.yaml'"),
    (["--set", "reward.name=jpeg_compressibility", "--set", "reward.params={qualty: 50}"],
     "ddpo: error: reward.params: 'jpeg_compressibility' does not take these params"),
    (["--set", "reward.weighted=[{name: aesthetic}, {name: nope}]"],
     "ddpo: error: reward.weighted[1].name: unknown reward 'nope'; choose one of"),
])
def test_user_errors_are_one_line(args, message, capsys, tmp_path):
    assert main(["train", "--set", f"output_dir={tmp_path}", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message), err
    assert "\n" not in err


def test_empty_prompt_file(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n")
    assert main(["train", "--set", f"prompts.file={prompts}"]) == 2
    assert capsys.readouterr().err.strip() == f"ddpo: error: prompts.file: '{prompts}' holds no prompts (one per line expected)"


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--set KEY=VALUE" in out.stdout


def test_the_main_job_runs_the_embedded_default_and_raises_the_judged_accuracy(tmp_path):
    """`ddpo train` with no config (the README's main command, on Ray, as a user runs it), cut to
    15 of its 60 epochs: DDPO-IS raises the digit judge's accuracy on the embedded digits model."""
    out = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "train", "--set", f"output_dir={tmp_path}", "--set", "run_name=default",
         "--set", "num_epochs=15"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    run_dir = tmp_path / "default"
    assert f"run directory: {run_dir.resolve()}" in out.stdout
    assert "Ray dashboard: http://127.0.0.1:" in out.stdout
    # the layout the default resolved (2 + 2 on a 2-core machine), and each role's busy share
    assert "\nlayout: colocated, sampler-0 + learner-0 (" in out.stdout
    assert re.search(r"\nbusy: samplers \d+%, learners \d+%, reward actors \d+%\n", out.stdout), out.stdout
    assert "epochs: 100%" in out.stderr  # the progress bar
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 15
    for field in ["epoch", "policy_version", "reward_mean", "reward_std", "correct_mean", "approx_kl", "clipfrac",
                  "loss", "samples_per_s", "policy_lag_mean", "dropped_stale", "time_sample_s", "time_reward_s",
                  "time_train_s", "time_broadcast_s"]:
        assert field in metrics[-1]
    accuracy = [m["correct_mean"] for m in metrics]
    # 128 samples an epoch: an epoch's accuracy is within about +-0.04 of its mean (1 sigma);
    # this run goes from about 0.37 to 0.64 (lag 0 is deterministic: the same numbers each time)
    assert sum(accuracy[-3:]) / 3 > sum(accuracy[:3]) / 3 + 0.15, accuracy
    assert len(list((run_dir / "samples").glob("epoch_*.png"))) == 15
    assert len(list((run_dir / "trajectories").glob("*.parquet"))) == 15
    assert (run_dir / "checkpoints" / "epoch_0014" / "pytorch_lora_weights.safetensors").is_file()
    for picture in ["before_after.png", "curves.png"]:
        assert (run_dir / picture).stat().st_size > 1000
