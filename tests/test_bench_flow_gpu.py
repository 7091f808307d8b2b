"""bench/flow_gpu.py, the GPU check of Flow-GRPO on an SD3.5-Medium-shaped model, end to end on CPU
with test-sized parts: every phase runs through the same code and reports sane numbers."""

import json
import math

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
    assert set(printed["phase_s"]) == {"build", "sampler", "plain", "ratio_bf16", "learner", "ratio_fp32"}
    assert {"device", "versions", "settings", "model", "build", "trajectories"} <= set(printed)
    assert printed["versions"]["diffusers"] and printed["versions"]["torch"]

    assert result["sampler"]["images_per_s"] > 0 and result["plain_pipeline"]["images_per_s"] > 0
    assert result["plain_pipeline"]["images_per_s_without_lora"] > 0
    assert result["sampler_over_plain"] > 0
    learner = result["learner"]
    assert learner["samples_per_s"] > 0 and learner["num_samples"] == 2 and learner["steps_trained"] == 3
    assert learner["out_of_memory_at_train_batch"] == []
    assert result["trajectories"]["x_0_finite"]

    ratio = result["ratio_error"]
    for name in ("bf16_sampled_bf16_recomputed", "bf16_sampled_fp32_recomputed", "fp32_sampled_fp32_recomputed"):
        assert math.isfinite(ratio[name]["max"]) and 0 <= ratio[name]["mean"] <= ratio[name]["max"]
        assert len(ratio[name]["per_step_max"]) == 4
    assert ratio["fp32_sampled_fp32_recomputed"]["max"] < 1e-4
    assert ratio["verdict"].startswith(("bfloat16 forward is enough", "bfloat16 recompute noise"))
    # the time guard: with no time left, everything after the build is skipped and said so
    guarded = bench.main(["--tiny", "--device", "cpu", "--threads", "1", "--max-seconds", "0",
                          "--workdir", str(tmp_path)])
    capsys.readouterr()
    assert set(guarded["skipped"]) == {"build", "sampler", "plain", "ratio_bf16", "learner", "ratio_fp32"}
    assert guarded["ratio_error"]["verdict"] == "not measured"
