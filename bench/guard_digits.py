"""The reward-hacking guard on the digits configs: each run's eval batch every 4 epochs, scored
by the trained judge (`digit_judge`) and the held-out one (`digit_judge_2`), and the guard's
warning, if any. Writes the series as JSON (docs/guard_digits.json; tests/test_guard.py replays
them through the guard).

    python bench/guard_digits.py [--configs digits,digits_flow,digits_flow_nft] [--out docs/guard_digits.json]

Each run is `ddpo train --config configs/<name>.yaml` as shipped (60 epochs, seed 0), in a temp
folder. They took 14 min here (2 cores, shared with other jobs: 459, 280 and 91 s).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.cli import main as ddpo  # noqa: E402
from cluster.run_dir import read_metrics  # noqa: E402

KEYS = ["eval_reward_mean", "eval_correct_mean", "heldout_reward_mean", "heldout_correct_mean"]


def run(name: str, workdir: Path) -> dict:
    errors = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(errors):
        status = ddpo(["train", "--config", str(ROOT / "configs" / f"{name}.yaml"),
                       "--set", f"output_dir={workdir}", "--set", f"run_name={name}"])
    if status != 0:
        raise SystemExit(f"{name}: ddpo train exited {status}")
    run_dir = workdir / name
    evaluations = [{"epoch": m["epoch"], **{key: m[key] for key in KEYS}, "guard": m.get("heldout_guard")}
                   for m in read_metrics(run_dir) if "heldout_reward_mean" in m]
    config = json.loads(json.dumps(__import__("yaml").safe_load((run_dir / "config.yaml").read_text())))
    return {"config": f"configs/{name}.yaml", "seconds": time.perf_counter() - start,
            "learning_rate": config["train"]["learning_rate"],
            "guard": {key: config["reward"][key] for key in ("heldout_tolerance", "heldout_patience", "heldout_action")},
            "evaluations": evaluations,
            # the guard's lines, without the progress bar's redraw that shares their line
            "warnings": [line[line.index("warning: "):] for line in errors.getvalue().splitlines()
                         if "reward hacking?" in line]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="digits,digits_flow,digits_flow_nft")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "guard_digits.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        result = {name: run(name, Path(workdir)) for name in args.configs.split(",")}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, record in result.items():
        print(f"{name}: {len(record['warnings'])} warning(s) in {record['seconds']:.0f} s")
        for line in record["warnings"]:
            print(f"  {line}")
    return result


if __name__ == "__main__":
    main()
