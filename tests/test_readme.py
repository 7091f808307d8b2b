"""The reward examples of docs/rewards.md (once the README's) run as written."""

import re
import sys
from pathlib import Path

import numpy as np
import yaml

from ddpo.config import load_config
from ddpo.media import Media
from rewards import compute_reward, load_reward

DOC = (Path(__file__).resolve().parent.parent / "docs" / "rewards.md").read_text()


def _block(language: str, first_line: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", DOC, re.S)
    (block,) = [b for b in blocks if b.startswith(first_line)]
    return block


def test_the_user_reward_example_runs(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(_block("python", "# my_rewards.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    commands = [line.split("ddpo train ", 1)[1] for line in _block("bash", "ddpo train --set reward.name=my_rewards")
                .splitlines()]
    images = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (40, 200)])
    for command in commands:
        overrides = [s.strip("'") for s in re.findall(r"--set ('[^']*'|\S+)", command)]
        reward = load_config(None, overrides).reward
        fn = load_reward(reward.name, reward.params)
        rewards, _ = compute_reward(reward.name, fn, Media.from_images(images), ["a", "b"], [{}, {}])
        assert rewards.shape == (2,) and rewards[1] > rewards[0]  # the brighter / redder image
    sys.modules.pop("my_rewards", None)


def test_the_weighted_reward_example_is_a_valid_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(_block("yaml", "reward:\n  weighted:"))
    terms = load_config(path).reward.terms()
    assert [(t.name, t.weight) for t in terms] == [("aesthetic", 1.0), ("jpeg_compressibility", 0.05)]
    assert yaml.safe_load(path.read_text())["reward"]["weighted"][0]["params"]["clip_model"]
