"""bench/flow_gpu.py, the GPU check of Flow-GRPO on an SD3.5-Medium-shaped model, end to end on CPU
with test-sized parts: every phase runs through the same code and reports sane numbers."""

import json
import math
from pathlib import Path

from tests.conftest import load_script


def test_every_phase_runs_on_tiny_parts_and_reports(tmp_path, capsys):
    bench = load_script("bench/flow_gpu.py")
    out = tmp_path / "flow_gpu.json"
    result = bench.main(["--tiny", "--device", "cpu", "--threads", "1", "--steps", "4", "--batches", "1",
                         "--sample-batch", "2", "--train-batch", "2", "--ratio-samples", "2", "--recompute-batch", "1",
                         "--out", str(out), "--workdir", str(tmp_path)])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["errors"] == {} and printed["skipped"] == {}
    assert set(printed["phase_s"]) == {"build", "worker_sample", "worker_train", "plan", "plain", "ratio_bf16",
                                       "ratio_fp32"}
    assert {"device", "versions", "settings", "model", "build", "trajectories"} <= set(printed)
    assert printed["versions"]["diffusers"] and printed["versions"]["torch"]

    assert result["sampler"]["images_per_s"] > 0 and result["plain_pipeline"]["images_per_s"] > 0
    assert result["plain_pipeline"]["images_per_s_without_lora"] > 0
    assert result["sampler_over_plain"] > 0
    learner = result["learner"]
    assert learner["samples_per_s"] > 0 and learner["num_samples"] == 2 and learner["steps_trained"] == 3
    assert learner["out_of_memory_at_train_batch"] == []
    # one device's sample + update: images per device-second; no MFU or peak memory on a CPU
    worker = result["worker"]
    assert worker["images_per_device_s"] == 2 / (result["sampler"]["batch_s"][0] + learner["update_s"])
    assert worker["mfu"] is None and result["sampler"]["flops"] > 0 and learner["flops"] > 0
    assert result["plan"]["plan"]["total_bytes"] > 0 and "error" not in result["plan"]  # no peak measured on a CPU
    checkpointed = result["plan_checkpointed"]
    assert checkpointed["plan"]["activation_bytes"] < result["plan"]["plan"]["activation_bytes"]
    assert checkpointed["update_s"] > 0
    assert result["trajectories"]["x_0_finite"]

    ratio = result["ratio_error"]
    for name in ("bf16_sampled_bf16_recomputed", "bf16_sampled_fp32_recomputed", "fp32_sampled_fp32_recomputed"):
        assert math.isfinite(ratio[name]["max"]) and 0 <= ratio[name]["mean"] <= ratio[name]["max"]
        assert len(ratio[name]["per_step_max"]) == 4
    assert ratio["fp32_sampled_fp32_recomputed"]["max"] < 1e-4  # the design's contract: under the paper's clip range
    # the verdict that the measured numbers call for: bfloat16 is enough under a tenth of the clip range
    bf16 = ratio["bf16_sampled_bf16_recomputed"]["max"]
    enough = bf16 < 0.1 * ratio["clip_range"]
    assert ratio["verdict"].startswith("bfloat16 forward is enough" if enough else "bfloat16 recompute noise")
    assert f"{bf16:.2e}" in ratio["verdict"]
    # the time guard: with no time left, everything after the build is skipped and said so
    guarded = bench.main(["--tiny", "--device", "cpu", "--threads", "1", "--max-seconds", "0",
                          "--workdir", str(tmp_path)])
    capsys.readouterr()
    assert set(guarded["skipped"]) == {"build", "worker_sample", "worker_train", "plan", "plain", "ratio_bf16",
                                       "ratio_fp32"}
    assert guarded["ratio_error"]["verdict"] == "not measured"


def test_the_dtype_verdict_on_hand_made_errors():
    verdict = load_script("bench/flow_gpu.py").dtype_verdict

    def errors(bf16, fp32=None):
        return {"bf16_sampled_bf16_recomputed": {"max": bf16},
                **({} if fp32 is None else {"fp32_sampled_fp32_recomputed": {"max": fp32}})}

    assert verdict(errors(9e-6, 1e-7), 1e-4).startswith("bfloat16 forward is enough: max |ratio - 1| 9.00e-06 ")
    noisy = verdict(errors(2e-5, 3e-7), 1e-4)
    assert noisy.startswith("bfloat16 recompute noise (max |ratio - 1| 2.00e-05) is under train.clip_range 0.0001 ")
    assert "float32 gives 3.00e-07" in noisy
    assert "(max |ratio - 1| 2.00e-04) is over train.clip_range" in verdict(errors(2e-4), 1e-4)
    assert verdict({}, 1e-4) == verdict(errors(float("nan")), 1e-4) == "not measured"


def test_the_memory_plan_is_within_15_percent_of_the_h200_peaks(capsys):
    """The planner of today against the peaks measured on an H200 (docs/flow_gpu_h200.json: an
    SD3.5-Medium-shaped worker, bf16, 512 px): the whole run's peak, and an update's with gradient
    checkpointing (against the plan's training side: that phase ran no decode)."""
    bench = load_script("bench/flow_gpu.py")
    replanned = bench.main(["--replan", str(Path(__file__).resolve().parents[1] / "docs" / "flow_gpu_h200.json")])
    capsys.readouterr()
    assert abs(replanned["plan"]["error"]) < 0.15, replanned["plan"]
    assert abs(replanned["plan_checkpointed"]["training_side_error"]) < 0.15, replanned["plan_checkpointed"]
