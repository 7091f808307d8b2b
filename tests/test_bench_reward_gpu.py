"""bench/reward_gpu.py, the rewards' GPU throughput check, end to end on CPU with test-sized
models: every phase builds its model, loads it through the reward's own class and scores."""

import json

from tests.conftest import load_script

PHASES = {"pickscore", "hpsv2", "image_reward", "ocr", "vlm_judge", "geneval"}


def test_every_phase_runs_on_tiny_models_and_reports(tmp_path, capsys):
    bench = load_script("bench/reward_gpu.py")
    out = tmp_path / "reward_gpu.json"
    result = bench.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--images", "4", "--batch", "2",
                         "--size", "64", "--ocr-tokens", "4", "--workdir", str(tmp_path), "--out", str(out)])
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text())
    assert result["errors"] == {} and result["skipped"] == {}
    assert set(result["phases"]) == PHASES
    for name, phase in result["phases"].items():
        assert phase["images"] == 4 and phase["images_per_s"] > 0 and phase["scores_finite"], name
        assert phase["peak_gib"] is None  # no GPU


def test_max_seconds_skips_the_phases_left(tmp_path, capsys):
    bench = load_script("bench/reward_gpu.py")
    result = bench.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--images", "2", "--batch", "2",
                         "--size", "32", "--phases", "pickscore,ocr", "--max-seconds", "0", "--workdir", str(tmp_path)])
    assert result["phases"] == {} and set(result["skipped"]) == {"pickscore", "ocr"}
