"""The `ddpo` command line.

    ddpo train [--config FILE] [--set key=value ...] [--address ADDRESS] [--resume RUN_DIR] [--tensorboard]
    ddpo sample RUN_DIR [--checkpoint NAME | --base] [--prompt P ...] [--num-per-prompt N] [--seed S]
                [--out DIR] [--batch-size B] [--set key=value ...]
    ddpo eval RUN_DIR [--checkpoint NAME | --base] [--num-per-prompt N] [--seed S] [--out FILE.json]
              [--batch-size B] [--set key=value ...] [--address ADDRESS]
    ddpo export RUN_DIR --out DIR [--checkpoint NAME] [--merge [--device D] [--dtype T]]
    ddpo plan [--config FILE] [--set key=value ...] [--gpu-memory GB] [--json]
    ddpo serve-rewards [--config FILE] [--set key=value ...] [--name NAME] [--address ADDRESS]
    ddpo serve-rewards --stop NAME [--address ADDRESS]

ADDRESS: a Ray cluster to join, `auto` (the one running on this machine), `ray://host:port` (its
Ray Client server) or `host:port` (its head's GCS); with none, a local Ray instance starts.

With no --config, `ddpo train` runs the embedded default (configs/digits.yaml: the embedded
digits model and its judge, on CPU). Every problem the user can fix is one line on stderr and
exit status 2, before anything starts where it can be seen then: a bad flag (argparse's own
errors too), config value, device or `--address` (its form, and whether its port answers).
A stop signal (Ctrl-C, SIGTERM, SIGHUP) stops at the next safe point with a checkpoint and the
resume command, exit status 128 + the signal's number (130, 143, 129); see `GracefulStop`.

After a run (cluster/workflow.py; the model runs in this process): `ddpo sample` draws images
from a checkpoint's LoRA (the latest by default) or from the base model (`--base`) with the run's
model and sampler settings, the same images for the same command; `ddpo eval` scores them with
the run's reward (or another through --set reward...), the reward on Ray in the reward pool as
in training, and prints and writes the mean and standard error overall and per prompt; `ddpo
export` writes a checkpoint as a diffusers folder with a model card: the LoRA alone, or with
`--merge` fused into the base pipeline.

Before a launch: `ddpo plan` prints the memory each device of the config's layout will need
(ddpo/memory.py: weights, LoRA and AdamW, activations of sampling, decode and training, from
real shapes on the meta device), and whether it fits; `ddpo train` refuses, in one line, a
layout that cannot fit, before any model loads.

Scoring as a service (cluster/reward_service.py): `ddpo serve-rewards` starts the config's reward
actors on a running cluster (`auto` without --address), detached and named, and exits; every run
on the cluster with `reward.service: NAME` sends its batches there instead of starting reward
actors of its own. `--stop NAME` ends the service.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
from importlib import resources
from pathlib import Path

from cluster import QUIET_ENV
from ddpo.errors import AddressError, ConfigError, UserError

DEFAULT_CONFIG = "digits.yaml"


# `--address`: how long to wait for the cluster's port to answer before saying it cannot be
# reached (ray.init would wait 30 s for a Ray Client address, minutes for a GCS address)
CONNECT_TIMEOUT_S = 3.0

# the stop signals, by their name in messages. After one, `ddpo train` exits with 128 + the
# signal's number, as a shell reports a process the signal ended: 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP
STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}
# what whoever sends SIGTERM should allow beyond cluster.stop_grace_s: the driver's exit
STOP_MARGIN_S = 5


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with its errors (unknown flag, missing or malformed value) in one line,
    as every other user error: `ddpo train: error: ...; see ddpo train --help`, exit status 2.
    The subcommands' parsers are of the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _nonempty(value: str) -> str:
    """A flag's value that may not be empty (`--config ""` would mean the default silently)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def embedded_config(name: str = DEFAULT_CONFIG) -> Path:
    """A config shipped in the package's `configs/` (the default of `ddpo train` when no name)."""
    return Path(str(resources.files("configs").joinpath(name)))


def ray_address(address: str | None, source: str = "--address") -> tuple[str | None, str]:
    """The Ray cluster to join and where it was named (`source`; RAY_ADDRESS, set inside
    `ray job submit`, when `address` is None), checked before any work: its form, and that
    its port answers within CONNECT_TIMEOUT_S; every problem is a one-line error naming the
    address. None: a local Ray instance, which keeps Ray's token authentication (set
    explicitly: when Ray has to choose it itself, it prints a warning)."""
    if address is None and os.environ.get("RAY_ADDRESS"):
        address, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    if address is None:
        if "RAY_AUTH_MODE" not in os.environ:
            os.environ["RAY_AUTH_MODE"] = "token"
            if "ray._raylet" in sys.modules:  # Ray read its config when imported: again, as it does
                from ray._raylet import Config  # when it sets the mode itself

                Config.initialize("")
        return None, source
    from ddpo.config import check_address

    check_address(address, source)
    _check_reachable(address, source)
    return address, source


def _check_reachable(address: str, source: str) -> None:
    """A TCP connection to the cluster's port (the Ray Client server's for ray://, else the
    GCS's as ray.init resolves it), so that a wrong address fails in seconds: ray.init waits
    30 s for a Ray Client address, and retries a GCS address for minutes."""
    import socket

    from ray._private.services import canonicalize_bootstrap_address

    if address.startswith("ray://"):
        target = address.removeprefix("ray://")
    else:
        try:  # as ray.init does: `auto` found on this machine, a loopback host made the node's IP
            target = canonicalize_bootstrap_address(address)
        except ConnectionError:
            raise AddressError(f"{source}: auto found no running Ray cluster on this machine (start one with "
                             "`ray start --head`, or give its host:port)") from None
        except ValueError as err:  # `auto` reads RAY_ADDRESS, which may hold anything
            raise AddressError(f"{source}: {address}: {err}") from None
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        if isinstance(err, ConnectionRefusedError):
            cause = "connection refused"
        elif isinstance(err, TimeoutError):
            cause = f"no answer within {CONNECT_TIMEOUT_S:g} s"
        elif isinstance(err, socket.gaierror):
            cause = f"unknown host '{host}'"
        else:
            cause = err.strerror or type(err).__name__
        where = "" if target == address.removeprefix("ray://") else f"resolved to {target}: "
        raise AddressError(f"{source}: cannot reach a Ray cluster at {address} ({where}{cause})") from None


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise ConfigError(f"--seed: must be >= 0, got {seed}")


def _prepare(args) -> tuple:
    """Load and check everything that can be checked before Ray starts, the quick checks first;
    returns the config and the Ray cluster to join (None: a local instance) with where it was named."""
    from ddpo.config import load_config
    from rewards import check_rewards

    if args.resume is not None:
        if args.config is not None:
            raise ConfigError("--resume: the run's own config.yaml is used; drop --config (use --set to change values)")
        config_path = Path(args.resume) / "config.yaml"
        if not config_path.is_file():
            raise ConfigError(f"--resume: '{args.resume}' is not a run directory (no config.yaml there)")
    else:
        config_path = args.config or embedded_config()
    config = load_config(config_path, args.set)
    if args.address is not None:
        config.cluster.address = args.address
    address, source = ray_address(config.cluster.address, "--address" if args.address else "cluster.address")
    config.load_prompts()
    from ddpo.pipeline import check_device_here, check_family_settings, check_pretrained  # torch, diffusers: seconds

    if address is None:  # a local instance: the model runs on this machine
        check_device_here(config.model.device, "model.device", "use cpu or auto, or --address a cluster with GPUs")
    check_rewards(config.reward)
    # Ray's workers (and a job's driver) may start in another directory: absolute paths
    config.model.pretrained = check_pretrained(config.model.pretrained, config.model.revision)
    check_family_settings(config)
    config.output_dir = str(Path(config.output_dir).resolve())
    _check_writable(args.resume or config.output_dir, "--resume" if args.resume else "output_dir")
    return config, address, source


def _check_writable(folder: str, field: str) -> None:
    """The run writes in `folder`: made if missing, and a file written there and removed."""
    import tempfile

    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise ConfigError(f"{field}: cannot write to '{folder}' ({err.strerror or err})") from None


def _say(line: str, file=None) -> None:
    """Print a line of the stop path: a terminal gone (SIGHUP) is no reason to fail there."""
    try:
        print(line, file=file or sys.stderr, flush=True)
    except OSError:
        pass


def _exit_now(status: int) -> None:
    """End the process at once, what was printed flushed first (os._exit leaves buffers)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


class GracefulStop:
    """The one path of every stop signal: Ctrl-C (SIGINT), SIGTERM (`kill`, `timeout`, `docker
    stop`, systemd, Kubernetes, `ray job stop`) and SIGHUP (the terminal gone).

    The first sets `requested`: the driver stops at its next safe point (`Driver.fit`), and
    `ddpo train` writes the checkpoint, prints the resume command and exits with 128 + the
    signal's number. A second signal (exit status: its own), or `grace_s` (cluster.stop_grace_s)
    running out, ends the process at once: the checkpoints written so far are whole (written
    aside, then renamed), and the one line printed names the one to go on from.

    The handlers set a flag or end the process, nothing in between: an exception raised at an
    arbitrary point can land in a finalizer, where Python ignores it, or halfway through a
    write. Ending at once is `os._exit`, from the handler or from a timer thread (the main
    thread may be waiting on Ray): no shutdown that waits on Ray, and none of the C++ crash
    lines of the handler Ray's core worker installs."""

    def __init__(self, run_dir: Path, grace_s: float, local_ray: bool = False):
        self.run_dir, self.grace_s, self.local_ray = run_dir, grace_s, local_ray
        self.requested = threading.Event()
        self.signum: int | None = None  # the first stop signal
        self._ending = threading.Lock()
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str:
        return STOP_SIGNALS[self.signum]

    @property
    def exit_status(self) -> int:
        return 128 + self.signum

    def install(self) -> None:
        """After ray.init, which installs a SIGTERM handler of its own (and its core worker one
        that prints a stack and aborts); in the main thread, where Python runs signal handlers."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:
            self.end_now(f"{STOP_SIGNALS[signum]} again", signum)
        self.signum = signum
        self.requested.set()
        _say(f"\n{self.name}: stopping at the next safe point, with a checkpoint ({self.name} again, or "
             f"cluster.stop_grace_s = {self.grace_s:g} s from now, stops at once)")
        timer = threading.Timer(self.grace_s, self.end_now, [f"cluster.stop_grace_s = {self.grace_s:g} s ran out"])
        timer.daemon = True
        timer.start()

    def end_now(self, reason: str, signum: int | None = None) -> None:
        """Print where the run can go on from, and end the process: exit status 128 + the number
        of the signal that ends it (`signum`, else the first)."""
        from cluster.run_dir import resume_checkpoint

        self._ending.acquire()  # once: a second caller waits here for the first one's exit
        checkpoint = resume_checkpoint(self.run_dir)
        where = (f"go on from {checkpoint} with: ddpo train --resume {self.run_dir}" if checkpoint
                 else "no checkpoint was written (see checkpoint_every_s)")
        _say(f"\nddpo: stopped at once ({reason}); {where}")
        if self.local_ray:
            _kill_grandchildren()
        _exit_now(128 + (signum or self.signum))


def _kill_grandchildren() -> None:
    """SIGKILL the processes this one's children started: in local mode, the raylet's workers
    and agents, which would outlive the run's Ray instance a while (the agents wait on its GCS,
    gone). The children themselves (GCS, raylet, dashboard) end with this process (Ray's fate
    sharing); killed before it, the raylet would end it first. psutil comes with Ray."""
    import psutil

    for child in psutil.Process().children():
        try:
            grandchildren = child.children(recursive=True)
        except psutil.Error:  # ended meanwhile
            continue
        for process in grandchildren:
            try:
                process.kill()
            except psutil.Error:
                pass


def job_stop_wait_note(grace_s: float) -> str | None:
    """Inside a Ray job, `ray job stop` sends SIGTERM, then SIGKILL RAY_JOB_STOP_WAIT_TIME_S
    (an integer, 3 by default) seconds later: read by the job's supervisor, whose environment
    the job's driver inherits. A line for the user when that is shorter than the time
    cluster.stop_grace_s gives a stop to reach its checkpoint; else None."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # set by Ray for a job's entrypoint only
        return None
    try:
        wait = float(os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", "3"))
    except ValueError:
        return None
    needed = math.ceil(grace_s) + STOP_MARGIN_S
    if wait >= needed:
        return None
    env = json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(needed)}})
    return (f"note: `ray job stop` kills this job {wait:g} s after its SIGTERM (RAY_JOB_STOP_WAIT_TIME_S), "
            f"within cluster.stop_grace_s = {grace_s:g} s: a stop may not reach its checkpoint; submit with "
            f"--runtime-env-json '{env}'")


def train(args) -> int:
    config, address, source = _prepare(args)
    check_memory(config, address)
    import ray

    from cluster.driver import ActorLost, Driver
    from cluster.metrics import bottleneck_hint, busy_summary, stages_line, usage_line
    from cluster.remote import connect_ray
    from cluster.run_dir import make_run_dir, resume_checkpoint, start_tensorboard

    if args.resume is None:
        run_dir, checkpoint = make_run_dir(config), None
    else:
        run_dir, checkpoint = Path(args.resume), resume_checkpoint(Path(args.resume))
        if checkpoint is None:
            raise ConfigError(f"--resume: '{run_dir}' has no checkpoint to resume from")
    stop = GracefulStop(run_dir, config.cluster.stop_grace_s, local_ray=address is None)
    # with no address, a local single-node instance: every socket on loopback (cluster/local.py).
    # Ray's processes block SIGINT, so that a Ctrl-C in a terminal, which signals the whole
    # foreground process group, reaches the driver alone. They inherit the signal mask of the
    # thread that starts them: with SIGTERM and SIGHUP blocked too, a signal to the process group
    # (`timeout`, systemd, a terminal closed) is the driver's alone to handle, while the run's Ray
    # instance goes on to the checkpoint. That instance ends with the driver: Ray's fate sharing
    # (SIGKILL), or ray.shutdown (SIGKILL after a second's grace)
    held = ({signal.SIGTERM, signal.SIGHUP} if address is None and threading.current_thread() is threading.main_thread()
            else set())
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        # a namespace of the run's own: runs on one cluster name their actors alike (worker-0, ...);
        # Ray's own INFO lines left out: the dashboard's URL is printed below
        context = connect_ray(address, source, namespace=f"ddpo-{run_dir.name}", dashboard=True,
                              logging_level=logging.WARNING)
        stop.install()  # after ray.init's own handlers, before the signals held meanwhile arrive
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
    dashboard = context.dashboard_url
    token = " (token: run `ray get-auth-token`)" if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else ""
    print(f"run directory: {run_dir.resolve()}")
    print(f"Ray dashboard: http://{dashboard}{token}" if dashboard else "Ray dashboard: not running")
    if args.tensorboard:
        print(f"TensorBoard: {start_tensorboard(run_dir / 'tensorboard')} (live curves of this run)", flush=True)
    else:
        print("TensorBoard: not served; add --tensorboard for the live curves of this run")
    note = job_stop_wait_note(config.cluster.stop_grace_s)
    if note:
        print(note)
    driver = None
    try:
        driver = Driver(config, run_dir, stop_requested=stop.requested)
        print(f"layout: {driver.config.cluster.layout}, {driver.placement.describe()}")
        start_epoch = 0
        if checkpoint is not None:
            start_epoch = driver.resume(checkpoint)
            print(f"resuming from {checkpoint} at epoch {start_epoch}")
        history = driver.fit(start_epoch)
        if stop.requested.is_set() and not driver.completed:
            return _stopped(stop, driver, run_dir)
        if driver.guard_stop is not None:
            saved = driver.save_checkpoint()
            _say(f"stopped by the reward-hacking guard after epoch {driver.policy_version - 1} (checkpoint {saved}); "
                 f"the best held-out weights: ddpo export {run_dir} --checkpoint best --out DIR", sys.stdout)
    except ray.exceptions.RayActorError as err:
        if driver is None:
            raise
        raise ActorLost(driver.lost_actor_message(err)) from None
    finally:
        if driver is not None:
            driver.shutdown()
        ray.shutdown()
        stop.uninstall()
    if history:
        first, last = history[0], history[-1]
        print(f"reward_mean: epoch {first['epoch']} {first['reward_mean']:.4f}, "
              f"epoch {last['epoch']} {last['reward_mean']:.4f}")
        busy = busy_summary(history)
        print(f"busy: samplers {busy['sampler']:.0%}, learners {busy['learner']:.0%}, "
              f"reward actors {busy['reward']:.0%}")
        print(stages_line(history))
        print(usage_line(history))
        hint = bottleneck_hint(busy, driver.config.cluster.layout, driver.config.cluster.max_policy_lag)
        if hint:
            print(f"bottleneck: {hint}")
    if (run_dir / "eval.json").exists():  # the fixed eval batch, before and after training
        evals = json.loads((run_dir / "eval.json").read_text())
        changes = ", ".join(f"{key} {evals['before'][key]:.4f} -> {evals['after'][key]:.4f}"
                            for key in evals["after"] if not key.endswith("reward_std"))
        print(f"eval batch: {changes} ({run_dir / 'before_after.png'})")
    print(f"metrics: {run_dir / 'metrics.jsonl'}; LoRA: {run_dir / 'checkpoints'}")
    return 0


def _stopped(stop: GracefulStop, driver, run_dir: Path) -> int:
    """After a stop signal, at the driver's safe point: the checkpoint, the resume command."""
    if driver.policy_version == 0:
        _say(f"stopped by {stop.name} before the first update: no checkpoint to go on from", sys.stdout)
        return stop.exit_status
    _say(f"{stop.name}: at a safe point after epoch {driver.policy_version - 1}; writing its checkpoint")
    saved = driver.save_checkpoint()
    _say(f"stopped by {stop.name}: checkpoint {saved}; go on with: ddpo train --resume {run_dir}", sys.stdout)
    return stop.exit_status


def _device_memory(config, gpu_memory_gb: float | None, local: bool) -> int | None:
    """A device's memory in bytes: --gpu-memory, else cluster.device_memory_gb, else (`local`:
    the model runs on this machine) this machine's GPU when the model runs on one; else None."""
    from ddpo.memory import GIB, local_device_memory

    if gpu_memory_gb is not None:
        if not (gpu_memory_gb > 0 and math.isfinite(gpu_memory_gb)):
            raise ConfigError(f"--gpu-memory: must be a number > 0 (GiB), got {gpu_memory_gb:g}")
        return int(gpu_memory_gb * GIB)
    if config.cluster.device_memory_gb is not None:
        return int(config.cluster.device_memory_gb * GIB)
    if local and config.model.device != "cpu":
        return local_device_memory()
    return None


def _planned_layout(config, local: bool):
    """The config with the `auto` counts and layout of `cluster` resolved for this machine, as a
    local Ray instance would see it (its CPUs and GPUs); unresolved for a remote cluster."""
    if not local:
        return config
    import torch

    from cluster.placement import resolve_layout

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return resolve_layout(config, {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)})


def check_memory(config, address: str | None) -> None:
    """Before Ray starts and any model loads: the memory plan of the run's layout (ddpo/memory.py),
    a layout that cannot fit refused in one line (MemoryPlanError) with the knobs to turn. Nothing
    is planned, and nothing refused, when the device memory is unknown."""
    memory = _device_memory(config, None, local=address is None)
    if memory is None:
        return
    from ddpo.memory import MemoryPlanError, PlanUnavailable, plan_memory

    try:
        plan = plan_memory(_planned_layout(config, address is None), memory)
    except PlanUnavailable as err:
        print(f"memory plan: skipped ({err})")
        return
    refusal = plan.refusal()
    if refusal:
        raise MemoryPlanError(refusal)


def plan(args) -> int:
    """`ddpo plan`: the memory each device of the config's layout will need, before any launch."""
    from ddpo.config import load_config
    from ddpo.memory import describe, plan_memory

    config = load_config(args.config or embedded_config(), args.set)
    local = config.cluster.address is None
    memory = _device_memory(config, args.gpu_memory, local)
    result = plan_memory(_planned_layout(config, local), memory)
    print(json.dumps(result.to_json(), indent=2) if args.json else describe(result))
    return 0


def sample(args) -> int:
    _check_seed(args.seed)
    from cluster.workflow import sample_run

    result = sample_run(args.run_dir, checkpoint=args.checkpoint, base=args.base, prompts=args.prompt,
                        num_per_prompt=args.num_per_prompt, seed=args.seed, out=args.out, overrides=args.set,
                        batch_size=args.batch_size)
    source = (f"checkpoint {result.checkpoint.name}, {result.epochs} epochs trained" if result.checkpoint
              else "the base model, no LoRA")
    print(f"{len(result.samples)} samples ({source}): {result.out}; grid: {result.grid}")
    return 0


def evaluate(args) -> int:
    _check_seed(args.seed)
    address, source = ray_address(args.address)  # before the images are sampled
    from cluster.workflow import eval_run

    result = eval_run(args.run_dir, checkpoint=args.checkpoint, base=args.base, num_per_prompt=args.num_per_prompt,
                      seed=args.seed, out=args.out, overrides=args.set, batch_size=args.batch_size,
                      address=address, address_source=source)
    report = result.report
    source = (f"checkpoint {report['checkpoint']} ({report['epochs_trained']} epochs trained)"
              if result.checkpoint else "the base model (no LoRA)")
    width = max(len(prompt) for prompt in report["per_prompt"])
    for prompt, row in report["per_prompt"].items():
        print(f"  {prompt:<{width}}  {row['reward_mean']:.4f} ± {row['reward_stderr']:.4f}  (n={row['n']})")
    extras = "".join(f", {key} {value:.4f}" for key, value in report.items() if key.endswith("_mean")
                     and key != "reward_mean")
    print(f"{source}, reward {report['reward']}: {report['reward_mean']:.4f} ± {report['reward_stderr']:.4f} "
          f"(mean ± standard error, n={report['n']}, --seed {report['seed']}){extras}; {result.out}")
    return 0


def export(args) -> int:
    from cluster.workflow import export_run

    if not args.merge and (args.device is not None or args.dtype is not None):
        raise ConfigError("--device/--dtype: only with --merge (the LoRA alone is copied as it is)")
    result = export_run(args.run_dir, args.out, checkpoint=args.checkpoint, merge=args.merge,
                        device=args.device or "cpu", dtype=args.dtype or "float32")
    name = f"{result.checkpoint.name} ({result.epochs} epochs trained)"
    what = f"{name} fused into the base pipeline" if result.merged else f"the LoRA of {name}"
    print(f"exported {what} to {result.out} (model card: {result.out / 'README.md'})")
    return 0


def serve_rewards(args) -> int:
    """`ddpo serve-rewards`: start a reward service on a running cluster (or stop one)."""
    from ddpo.config import load_config

    config = None
    if args.stop is not None:
        if args.config is not None or args.set or args.name is not None:
            raise ConfigError("--stop: takes only the service's name (and --address); drop --config, --set, --name")
        configured = None
    else:
        from rewards import check_rewards

        config = load_config(args.config or embedded_config(), args.set)
        check_rewards(config.reward)
        configured = config.cluster.address
    import ray

    from cluster.remote import connect_ray
    from cluster.reward_service import DEFAULT_NAME, start_service, stop_service

    started = not ray.is_initialized()  # connected already: a caller in this process (tests)
    if started:
        if args.address is not None:
            address, source = args.address, "--address"
        elif configured is not None:
            address, source = configured, "cluster.address"
        elif os.environ.get("RAY_ADDRESS"):
            address, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
        else:  # a service serves the runs of a cluster: never a local instance of its own
            address, source = "auto", "--address (default auto: a service runs on a cluster)"
        ray_address(address, source)
        connect_ray(address, source, namespace="ddpo", log_to_driver=False, logging_level=logging.WARNING)
    try:
        if args.stop is not None:
            count = stop_service(args.stop)
            print(f"reward service '{args.stop}' stopped ({count} reward actor{'s' if count > 1 else ''})")
            return 0
        name = args.name or config.reward.service or DEFAULT_NAME
        service = start_service(config, name)
        count = len(service.actors)
        print(f"reward service '{name}': {count} reward actor{'s' if count > 1 else ''} scoring "
              f"{config.reward.label}; runs on this cluster use it with --set reward.service={name}; "
              f"stop it with: ddpo serve-rewards --stop {name}")
        return 0
    finally:
        if started:
            ray.shutdown()


def _add_run_arguments(p: argparse.ArgumentParser, base: bool) -> None:
    """RUN_DIR and --checkpoint (and --base) of the commands that work on a run's checkpoint."""
    p.add_argument("run_dir", type=_nonempty, metavar="RUN_DIR", help="the run directory (runs/<run_name>)")
    p.add_argument("--checkpoint", type=_nonempty, metavar="NAME", help="e.g. epoch_0007 (default: the latest)")
    if base:
        p.add_argument("--base", action="store_true", help="the base model, without the LoRA")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="ddpo", description="DDPO fine-tuning of diffusion models on Ray")
    commands = parser.add_subparsers(dest="command", required=True)  # parsers of the same class
    p = commands.add_parser("train", help="train a LoRA with DDPO")
    p.add_argument("--config", type=_nonempty, help=f"YAML config (default: the embedded configs/{DEFAULT_CONFIG})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.learning_rate=1e-3 (repeatable)")
    p.add_argument("--address", type=_nonempty,
                   help="Ray cluster to join: auto, ray://host:10001 or host:6379 (default: start a local one)")
    p.add_argument("--resume", type=_nonempty, metavar="RUN_DIR",
                   help="go on with the run in RUN_DIR from its latest checkpoint (its config.yaml, plus any --set)")
    p.add_argument("--tensorboard", action="store_true",
                   help="serve TensorBoard for the run on 127.0.0.1 while it runs, and print its URL")
    p.set_defaults(func=train, parser=p)

    p = commands.add_parser("plan", help="the GPU memory each device of a config's layout will need, before launch")
    p.add_argument("--config", type=_nonempty, help=f"YAML config (default: the embedded configs/{DEFAULT_CONFIG})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.gradient_checkpointing=true (repeatable)")
    p.add_argument("--gpu-memory", type=float, metavar="GB",
                   help="a device's memory in GiB (default: cluster.device_memory_gb, else this machine's GPU, "
                        "else unknown)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=plan, parser=p)

    p = commands.add_parser("sample", help="sample images from a run's checkpoint (or its base model)")
    _add_run_arguments(p, base=True)
    p.add_argument("--prompt", action="append", metavar="P",
                   help="a prompt (repeatable; default: the run's prompts)")
    p.add_argument("--num-per-prompt", type=int, default=4, metavar="N", help="images per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="image i of every prompt gets noise seed 2**61 + S * 2**20 + i (default 0)")
    p.add_argument("--out", type=_nonempty, metavar="DIR",
                   help="default: RUN_DIR/samples_<checkpoint> (samples_base with --base)")
    p.add_argument("--batch-size", type=int, metavar="B", help="images per sampling call (default: sample.batch_size)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the run's config, e.g. --set sample.num_steps=50 (repeatable)")
    p.set_defaults(func=sample, parser=p)

    p = commands.add_parser("eval", help="score a run's checkpoint (or its base model) with the run's reward")
    _add_run_arguments(p, base=True)
    p.add_argument("--num-per-prompt", type=int, default=50, metavar="N",
                   help="images per prompt of the run (default 50, as the DDPO paper evaluates)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="image i of every prompt gets the noise `ddpo sample --seed S` gives it (default 0)")
    p.add_argument("--out", type=_nonempty, metavar="FILE.json",
                   help="default: RUN_DIR/eval_<checkpoint>.json (eval_base.json with --base)")
    p.add_argument("--batch-size", type=int, metavar="B", help="images per sampling call (default: sample.batch_size)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the run's config, e.g. --set reward.name=aesthetic (repeatable)")
    p.add_argument("--address", type=_nonempty,
                   help="Ray cluster for the reward actors: auto, ray://host:10001 or host:6379 (default: a local one)")
    p.set_defaults(func=evaluate, parser=p)

    p = commands.add_parser("export", help="write a checkpoint as a diffusers folder with a model card")
    _add_run_arguments(p, base=False)
    p.add_argument("--out", type=_nonempty, required=True, metavar="DIR", help="a new (or empty) folder")
    p.add_argument("--merge", action="store_true",
                   help="fuse the LoRA into the base pipeline and save it whole (default: the LoRA alone)")
    p.add_argument("--device", type=_nonempty, help="with --merge: where to fuse (default cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="with --merge: the saved weights' dtype (default float32: it loads with no dtype argument)")
    p.set_defaults(func=export, parser=p)

    p = commands.add_parser("serve-rewards", help="start a reward service on a running cluster, for its runs to share")
    p.add_argument("--config", type=_nonempty,
                   help=f"YAML config: its reward and cluster.reward, num_reward_actors, max_restarts "
                        f"(default: the embedded configs/{DEFAULT_CONFIG})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set cluster.num_reward_actors=2 (repeatable)")
    p.add_argument("--name", type=_nonempty, help="the service's name (default: reward.service, else 'rewards')")
    p.add_argument("--address", type=_nonempty,
                   help="Ray cluster to start it on: auto, ray://host:10001 or host:6379 (default: auto)")
    p.add_argument("--stop", type=_nonempty, metavar="NAME", help="stop the reward service NAME")
    p.set_defaults(func=serve_rewards, parser=p)
    return parser


def _user_error(err: BaseException) -> UserError | None:
    """The user-fixable error behind `err`, also when it arrives wrapped by Ray."""
    seen = err
    while seen is not None:
        wrapped = getattr(seen, "cause", None)  # Ray's task errors carry the original as .cause
        if isinstance(wrapped, BaseException) and wrapped is not seen:
            seen = wrapped
        elif isinstance(seen, UserError):
            return seen
        else:
            seen = seen.__cause__
    return None


def main(argv: list[str] | None = None) -> int:
    for name, value in QUIET_ENV.items():  # before the commands import the libraries
        os.environ.setdefault(name, value)
    try:
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:  # reported by the command's parser, as its other errors are
            args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exit:  # --help (0), or an error argparse printed (2)
        return exit.code
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("ddpo: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"ddpo: error: {user_error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
