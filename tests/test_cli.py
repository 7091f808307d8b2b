"""`ddpo train` from the command line: user mistakes are one line on stderr, exit status 2."""

import os
import re
import socket
import subprocess
import sys
import time

import pytest

from cluster.cli import main


@pytest.mark.parametrize("args, message", [
    (["--set", "train.algorithm=ppo"],
     "ddpo: error: train.algorithm: must be one of ['ddpo_is', 'ddpo_sf', 'rwr', 'diffusion_nft'], got 'ppo'"),
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


@pytest.mark.parametrize("args, message", [
    (["train", "--foo"], "ddpo train: error: unrecognized arguments: --foo; see ddpo train --help"),
    (["train", "--config"], "ddpo train: error: argument --config: expected one argument; see ddpo train --help"),
    (["train", "--config="], "ddpo train: error: argument --config: must not be empty; see ddpo train --help"),
    (["train", "--resume", ""], "ddpo train: error: argument --resume: must not be empty; see ddpo train --help"),
    (["train", "extra"], "ddpo train: error: unrecognized arguments: extra; see ddpo train --help"),
    (["sample"], "ddpo sample: error: the following arguments are required: RUN_DIR; see ddpo sample --help"),
    (["sample", "runs/x", "--num-per-prompt", "x"],
     "ddpo sample: error: argument --num-per-prompt: invalid int value: 'x'; see ddpo sample --help"),
    (["sample", "runs/x", "--seed", "1.5"],
     "ddpo sample: error: argument --seed: invalid int value: '1.5'; see ddpo sample --help"),
    (["sample", "runs/x", "--batch-size"],
     "ddpo sample: error: argument --batch-size: expected one argument; see ddpo sample --help"),
    (["sample", "runs/x", "--bass"], "ddpo sample: error: unrecognized arguments: --bass; see ddpo sample --help"),
    (["eval"], "ddpo eval: error: the following arguments are required: RUN_DIR; see ddpo eval --help"),
    (["eval", "runs/x", "--seed"], "ddpo eval: error: argument --seed: expected one argument; see ddpo eval --help"),
    (["eval", "runs/x", "--num-per-prompt", "ten"],
     "ddpo eval: error: argument --num-per-prompt: invalid int value: 'ten'; see ddpo eval --help"),
    (["eval", "runs/x", "--address", ""],
     "ddpo eval: error: argument --address: must not be empty; see ddpo eval --help"),
    (["export", "runs/x"], "ddpo export: error: the following arguments are required: --out; see ddpo export --help"),
    (["export", "runs/x", "--out", "o", "--dtype", "float8"],
     "ddpo export: error: argument --dtype: invalid choice: 'float8' (choose from 'float32', 'float16', 'bfloat16'); "
     "see ddpo export --help"),
    (["export", "runs/x", "--out", "o", "--merge", "--device", ""],
     "ddpo export: error: argument --device: must not be empty; see ddpo export --help"),
    (["trian"],
     "ddpo: error: argument command: invalid choice: 'trian' (choose from 'train', 'plan', 'sample', 'eval', 'export', "
     "'serve-rewards'); see ddpo --help"),
    ([], "ddpo: error: the following arguments are required: command; see ddpo --help"),
])
def test_argparse_errors_are_one_line(args, message, capsys):
    assert main(args) == 2
    out = capsys.readouterr()
    assert out.err == message + "\n" and out.out == ""


@pytest.mark.parametrize("command", ["train", "sample", "eval", "export"])
def test_help_still_works(command, capsys):
    assert main([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: ddpo {command} ")


@pytest.mark.parametrize("args, message", [
    (["sample", "{run}", "--seed", "-1"], "ddpo: error: --seed: must be >= 0, got -1"),
    (["eval", "{run}", "--seed", "-3"], "ddpo: error: --seed: must be >= 0, got -3"),
    (["export", "{run}", "--out", "{root}/x", "--merge", "--device", "gpu0"],
     "ddpo: error: --device: must be auto, cpu, cuda, cuda:N or mps, got 'gpu0'"),
    (["export", "{run}", "--out", "{root}/x", "--merge", "--device", "cuda"],
     "ddpo: error: --device: 'cuda' but this machine has no CUDA device (use cpu)"),
    (["sample", "{run}", "--set", "model.device=cuda:1"],
     "ddpo: error: model.device: 'cuda:1' but this machine has no CUDA device (use --set model.device=cpu or auto)"),
    (["eval", "{run}", "--set", "model.device=tpu"],
     "ddpo: error: model.device: must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
])
def test_flag_values_are_one_line_errors(args, message, capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine with a GPU
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  device: cpu\n")
    assert main([a.format(run=run, root=tmp_path) for a in args]) == 2
    assert capsys.readouterr().err == message + "\n"
    assert not (tmp_path / "x").exists()


def test_a_cuda_device_in_local_mode_is_one_line(capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["train", "--set", f"output_dir={tmp_path}", "--set", "model.device=cuda"]) == 2
    assert capsys.readouterr().err == ("ddpo: error: model.device: 'cuda' but this machine has no CUDA device (use cpu "
                                       "or auto, or --address a cluster with GPUs)\n")
    assert list(tmp_path.iterdir()) == []  # no run directory


def _refused_port() -> tuple[socket.socket, int]:
    """A port of this machine that nothing listens on (bound, not listening: refused)."""
    sock = socket.socket()
    sock.bind(("", 0))
    return sock, sock.getsockname()[1]


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("address", ["foo", "http://127.0.0.1:8265", "ray://head", "head:0", "ray://head:99999",
                                     "127.0.0.1"])
def test_address_of_a_bad_form_is_one_line(command, address, capsys, tmp_path):
    args = ["train", "--set", f"output_dir={tmp_path}"] if command == "train" else ["eval", str(tmp_path / "no-run")]
    assert main([*args, "--address", address]) == 2
    assert capsys.readouterr().err == (f"ddpo: error: --address: must be auto, ray://host:port or host:port, "
                                       f"got {address!r}\n")


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("scheme", ["ray://", ""])
def test_an_unreachable_address_is_one_line_within_seconds(command, scheme, capsys, tmp_path, monkeypatch):
    """No local cluster starts, and the answer does not wait for Ray's own timeouts (30 s for
    ray://, minutes for a GCS address)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    sock, port = _refused_port()
    address = f"{scheme}127.0.0.1:{port}"
    args = ["train", "--set", f"output_dir={tmp_path}"] if command == "train" else ["eval", str(tmp_path / "no-run")]
    start = time.monotonic()
    with sock:
        assert main([*args, "--address", address]) == 2
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err
    # a GCS address is tried where ray.init tries it: a loopback host as the node's IP
    assert re.fullmatch(rf"ddpo: error: --address: cannot reach a Ray cluster at {re.escape(address)} "
                        rf"\((resolved to [0-9a-f.:\[\]]+:{port}: )?connection refused\)\n", err), err
    assert list(tmp_path.iterdir()) == []  # no run directory


@pytest.mark.parametrize("variable, address, message", [
    ("RAY_ADDRESS", "ray://127.0.0.1:{port}", "RAY_ADDRESS: cannot reach a Ray cluster at ray://127.0.0.1:{port} "
                                              "(connection refused)"),
    ("RAY_ADDRESS", "http://127.0.0.1:8265", "RAY_ADDRESS: must be auto, ray://host:port or host:port, "
                                             "got 'http://127.0.0.1:8265'"),
    (None, "ray://127.0.0.1:{port}", "cluster.address: cannot reach a Ray cluster at ray://127.0.0.1:{port} "
                                     "(connection refused)"),
])
def test_the_address_from_the_config_or_the_environment_is_checked_too(variable, address, message, capsys, tmp_path,
                                                                       monkeypatch):
    sock, port = _refused_port()
    args = ["train", "--set", f"output_dir={tmp_path}"]
    if variable is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        args += ["--set", f"cluster.address={address.format(port=port)}"]
    else:
        monkeypatch.setenv(variable, address.format(port=port))
    with sock:
        assert main(args) == 2
    assert capsys.readouterr().err == f"ddpo: error: {message.format(port=port)}\n"


def test_a_port_with_no_answer_is_one_line(capsys, tmp_path, monkeypatch):
    def no_answer(address, timeout):
        assert timeout <= 5
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", no_answer)
    assert main(["train", "--set", f"output_dir={tmp_path}", "--address", "ray://10.1.2.3:10001"]) == 2
    assert capsys.readouterr().err == ("ddpo: error: --address: cannot reach a Ray cluster at ray://10.1.2.3:10001 "
                                       "(no answer within 3 s)\n")


@pytest.mark.parametrize("preset, mode, token", [(None, "token", True), ("disabled", "disabled", False)])
def test_a_local_run_keeps_token_auth_set_explicitly(preset, mode, token):
    """Ray warns when it turns token authentication on by itself (RAY_AUTH_MODE unset): a local
    run sets it first, also when Ray is already imported (Ray reads its config at import)."""
    code = ("import os, ray; from ray._raylet import AuthenticationMode, get_authentication_mode; "
            "from cluster.cli import ray_address; "
            "print(ray_address(None), os.environ['RAY_AUTH_MODE'], "
            "get_authentication_mode() == AuthenticationMode.TOKEN)")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    if preset is not None:
        env["RAY_AUTH_MODE"] = preset
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == f"(None, '--address') {mode} {token}", out.stderr[-2000:]


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--set KEY=VALUE" in out.stdout


def test_an_output_dir_that_cannot_be_written_is_one_line(capsys, tmp_path):
    (tmp_path / "a-file").write_text("")
    assert main(["train", "--set", f"output_dir={tmp_path / 'a-file' / 'runs'}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"ddpo: error: output_dir: cannot write to '{tmp_path / 'a-file' / 'runs'}' (Not a directory)")
