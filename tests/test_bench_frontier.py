"""The pure parts of bench/frontier.py: when a run first reaches the target, the table, and its
refusals. (The runs themselves are the README's Benchmark; every config they run is loaded by
tests/test_configs.py.)"""

import pytest

from tests.conftest import load_script

frontier = load_script("bench/frontier.py")


def test_the_target_is_the_first_trailing_mean_of_three_epochs_at_0_9():
    # trailing means 0.8, 0.867, 0.85, 0.85, then 0.94: two epochs at 0.95 alone do not count
    assert frontier.first_reached([0.5, 0.95, 0.95, 0.7, 0.9, 0.95, 0.97]) == 6
    assert frontier.first_reached([0.875, 0.875, 1.0]) == 2  # from the third epoch on
    assert frontier.first_reached([1.0, 1.0]) is None  # three epochs at least
    assert frontier.first_reached([0.875, 0.875, 0.875]) is None


def _result(method, seed, reached, wall_s, last=0.95):
    return {"method": method, "seed": seed, "reached_epoch": reached, "epochs": (reached or 0) + 1,
            "images_sampled": 128 * ((reached or 0) + 1), "sampler_s": wall_s / 2, "learner_s": wall_s / 4,
            "wall_s": wall_s, "epoch_s": 2.0, "last_mean": last, "eval_after": 1.0}


def test_the_table_compares_wall_time_with_flow_grpos_and_leaves_out_runs_that_never_reached():
    results = [_result("Flow-GRPO", 0, 29, 60.0), _result("Flow-GRPO", 1, 39, 80.0),
               _result("DiffusionNFT", 0, 9, 14.0), _result("DiffusionNFT", 1, None, 120.0, last=0.8)]
    table = frontier.table(results).splitlines()
    assert len(table) == 4 and table[0].startswith("| method | reached 0.9 |")
    grpo, nft = table[2].split(" | "), table[3].split(" | ")
    assert grpo[1:3] == ["2/2", "35.0 ± 5.0"] and grpo[8] == "1.00"
    # the run that never reached counts in `reached` and in the last epochs' mean, not in the times
    assert nft[1:3] == ["1/2", "10.0"] and nft[6] == "14" and nft[8] == "0.20" and nft[9] == "0.875 ± 0.075"


def test_an_unknown_method_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        frontier.main(["--methods", "Flow-GRPO", "PPO"])
    assert info.value.code == 2
    assert "--methods: unknown ['PPO']; the methods are ['Flow-GRPO'," in capsys.readouterr().err
