"""The pure parts of bench/chaos.py: the summary of the kills and metrics, the LoRA comparison."""

import torch
from safetensors.torch import save_file

from tests.conftest import load_script

chaos = load_script("bench/chaos.py")


def _line(epoch, learner_restarts=0, num_samples=128, duplicate_batches=0, dropped_stale=0):
    return {"epoch": epoch, "learner_restarts": learner_restarts, "num_samples": num_samples,
            "duplicate_batches": duplicate_batches, "dropped_stale": dropped_stale}


def test_the_summary_counts_kills_per_role_recoveries_and_samples():
    kills = [
        {"actor": "sampler-0", "pid": 11, "at_s": 3.0, "recover_s": 4.0},
        {"actor": "sampler-1", "pid": 12, "at_s": 9.0, "recover_s": 6.0},
        {"actor": "sampler-0", "pid": 21, "at_s": 15.0, "recover_s": 5.0},
        {"actor": "learner-1", "pid": 13, "at_s": 20.0, "recover_s": 7.5},
        {"actor": "reward-0", "pid": 14, "at_s": 30.0, "recover_s": None},
    ]
    metrics = [_line(0), _line(1, duplicate_batches=1), _line(2, learner_restarts=1, num_samples=64, dropped_stale=1)]
    summary = chaos.summarize(kills, metrics, num_epochs=3, samples_per_epoch=128)
    assert summary == {
        "per_kill": [{k: kill[k] for k in ("actor", "at_s", "recover_s")} for kill in kills],
        "kills": 5,
        "kills_per_role": {"sampler": 3, "worker": 0, "reward": 1, "learner": 1},
        "unrecovered": 1,
        "recover_s": {"sampler": {"median": 5.0, "max": 6.0}, "worker": None, "reward": None,
                      "learner": {"median": 7.5, "max": 7.5}},
        "learner_group_restarts": 1,
        "samples_planned": 384,
        "samples_trained": 320,
        "duplicate_batches": 1,
        "dropped_stale": 1,
        "one_metrics_line_per_epoch": True,
    }


def test_the_summary_sees_a_missing_or_repeated_epoch():
    summarize = chaos.summarize
    assert not summarize([], [_line(0), _line(2)], num_epochs=3, samples_per_epoch=8)["one_metrics_line_per_epoch"]
    assert not summarize([], [_line(0), _line(1), _line(1), _line(2)], 3, 8)["one_metrics_line_per_epoch"]
    assert not summarize([], [_line(0), _line(1)], 3, 8)["one_metrics_line_per_epoch"]
    empty = summarize([], [], 3, 8)
    assert (empty["kills"], empty["learner_group_restarts"], empty["samples_trained"]) == (0, 0, 0)


def test_the_lora_comparison_is_bit_for_bit(tmp_path):
    tensors = {"a.lora_A.weight": torch.randn(4, 8), "a.lora_B.weight": torch.zeros(8, 4)}
    save_file(tensors, str(tmp_path / "one.safetensors"))
    save_file({k: v.clone() for k, v in tensors.items()}, str(tmp_path / "same.safetensors"))
    nudged = {**tensors, "a.lora_A.weight": tensors["a.lora_A.weight"].clone()}
    nudged["a.lora_A.weight"][0, 0] = torch.nextafter(nudged["a.lora_A.weight"][0, 0], torch.tensor(1e9))
    save_file(nudged, str(tmp_path / "nudged.safetensors"))
    save_file({"a.lora_A.weight": tensors["a.lora_A.weight"]}, str(tmp_path / "fewer.safetensors"))
    assert chaos.lora_equal(tmp_path / "one.safetensors", tmp_path / "same.safetensors")
    assert not chaos.lora_equal(tmp_path / "one.safetensors", tmp_path / "nudged.safetensors")
    assert not chaos.lora_equal(tmp_path / "one.safetensors", tmp_path / "fewer.safetensors")
