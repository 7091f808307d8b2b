import contextlib
import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# idle OpenMP threads sleep instead of spinning: the suite's processes (pytest, Ray's actors, the
# `ddpo train` it starts, which inherit this) share 2 cores, and spinning threads that wait for a
# descheduled sibling slow each other down (the whole suite: 846 s -> 748 s on this machine)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    BertTokenizerFast,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from ddpo.config import load_config  # noqa: E402


def load_script(relative_path: str):
    """A script of the repository (scripts/, bench/) imported as a module, to test its parts."""
    path = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(tmp_path=None, **overrides):
    """A test-sized config: the embedded tiny model, few steps, small batches."""
    settings = {
        "num_epochs": 2,
        "sample.num_steps": 4,
        "sample.batch_size": 4,
        "sample.num_batches_per_epoch": 2,
        "train.batch_size": 4,
        "train.learning_rate": 3e-3,
        "train.clip_range": 1e-2,
        "advantage.buffer_size": 8,
        "advantage.min_count": 4,
        "eval_images": 0,  # no before/after evaluation: the tests that check it ask for it
        # one core per device (colocated: sampler-i and learner-i share it), one torch thread
        "cluster.sampler.num_cpus": 1,
        "cluster.learner.num_cpus": 1,
        **({"output_dir": str(tmp_path)} if tmp_path is not None else {}),
        **overrides,
    }
    return load_config(None, [f"{k}={v}" for k, v in settings.items()])


def ray_processes(title: str) -> list:
    """The live processes titled `title` (`ray::SamplerActor`, ...) of the Ray instance this
    process is connected to: Ray's workers are its raylet's children. Another Ray instance's
    processes on the machine (a parallel test worker's, a `ddpo train` run's) are not among them."""
    import psutil
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    found = []
    for proc in psutil.Process(raylet).children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith(title):
                found.append(proc)
        except psutil.Error:  # it ended meanwhile
            pass
    return found


@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread in this process, as in an actor of one CPU: the same kernels, the
    same float sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def kill_leftovers(procs: list, timeout: float = 5.0) -> None:
    """Give `procs` (psutil processes asked to stop) `timeout` seconds to end, then kill the rest."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for leftover in alive:
        try:
            leftover.kill()
        except psutil.Error:  # it ended meanwhile
            pass
    psutil.wait_procs(alive, timeout=timeout)


@contextlib.contextmanager
def kill_once_recorded(metrics_path: Path, epochs_recorded: int, kill):
    """While the block runs, a thread calls `kill()` once `metrics_path` holds `epochs_recorded`
    lines, and again every 20 ms while it returns False (nothing found to kill yet). Yields an
    event set once a call did not return False."""
    import threading
    import time

    killed, stop = threading.Event(), threading.Event()

    def kill_after_the_epochs():
        while not stop.is_set() and not (metrics_path.exists()
                                         and len(metrics_path.read_text().splitlines()) >= epochs_recorded):
            time.sleep(0.02)
        while not stop.is_set() and not killed.is_set():
            if kill() is False:
                time.sleep(0.02)
            else:
                killed.set()

    killer = threading.Thread(target=kill_after_the_epochs)
    killer.start()
    try:
        yield killed
    finally:
        stop.set()
        killer.join()


def fit_until_an_actor_dies(driver, metrics_path, epochs_recorded: int, kill) -> str:
    """Run `driver.fit()` while `kill()` is called once `metrics_path` holds `epochs_recorded`
    lines; the run must end in the actor's death. Shuts the driver down and returns its
    one-line message about the lost actor."""
    import ray

    try:
        with kill_once_recorded(metrics_path, epochs_recorded, kill), \
                pytest.raises(ray.exceptions.RayActorError) as info:
            driver.fit()
        return driver.lost_actor_message(info.value)
    finally:
        driver.shutdown()


# the embedded default, small; one sampler and one learner, one torch thread each: the same
# numbers in a `ddpo train` process (local, or a job on a cluster) and in this one, whatever the
# cores and the layout
SMALL_DIGITS_EPOCHS = 6
SMALL_DIGITS = {"num_epochs": SMALL_DIGITS_EPOCHS, "sample.num_steps": 4, "sample.batch_size": 4,
                "sample.num_batches_per_epoch": 2, "train.batch_size": 4, "eval_images": 0, "cluster.num_samplers": 1,
                "cluster.num_learners": 1, "cluster.sampler.num_threads": 1, "cluster.learner.num_threads": 1}


@pytest.fixture(scope="session")
def uninterrupted_digits(tmp_path_factory):
    """The SMALL_DIGITS run that nothing stopped: its run directory. The same classes composed in
    this process, with one torch thread as the actors have: a lag-0 Ray run equals it bit for bit
    (tests/test_system.py), without the actors' start."""
    from cluster.cli import embedded_config
    from cluster.inprocess import InProcessRun
    from cluster.run_dir import make_run_dir

    root = tmp_path_factory.mktemp("uninterrupted")
    config = load_config(embedded_config(), [f"{k}={v}" for k, v in
                                             {**SMALL_DIGITS, "output_dir": root, "run_name": "full"}.items()])
    with one_torch_thread():
        InProcessRun(config, make_run_dir(config)).fit()
    return root / "full"


def run_metrics(run_dir: Path) -> list[dict]:
    from cluster.run_dir import read_metrics

    return read_metrics(run_dir)


def assert_the_same_run(run_dir: Path, reference: Path) -> None:
    """The same final LoRA bit for bit, and every epoch's metrics once, the same."""
    from safetensors.torch import load_file

    final = f"epoch_{SMALL_DIGITS_EPOCHS - 1:04d}"
    a, b = (load_file(str(d / "checkpoints" / final / "pytorch_lora_weights.safetensors")) for d in (run_dir, reference))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    expected = {m["epoch"]: m for m in run_metrics(reference)}
    got = run_metrics(run_dir)
    assert [m["epoch"] for m in got] == list(range(SMALL_DIGITS_EPOCHS))
    for m in got:
        for key in ["reward_mean", "loss", "approx_kl", "clipfrac", "policy_version"]:
            assert m[key] == expected[m["epoch"]][key], (m["epoch"], key)


@pytest.fixture
def config(tmp_path):
    return tiny_config(tmp_path)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (dashboard off, loopback only)."""
    import ray

    from cluster.local import start_local_ray

    start_local_ray(num_cpus=4, include_dashboard=False, namespace="ddpo-tests", log_to_driver=False,
                    _system_config={"metrics_report_interval_ms": 500})
    yield ray
    ray.shutdown()


# --- tiny reward models, saved to a temp dir once per session and loaded through from_pretrained

WORDS = ("a an the of in on with and is are image contains cat dog bear fish red blue green photo "
         "painting riding bike playing chess washing dishes what going this answer concisely "
         "user assistant : ? . ,").split()


@pytest.fixture(scope="session")
def bert_path(tmp_path_factory):
    """A tiny BERT with a locally built WordPiece vocabulary (lower-cased)."""
    path = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, model_max_length=64)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def save_tiny_llava(path: Path, words: list[str]) -> str:
    """A tiny random LLaVA saved to `path`: CLIP vision tower on 32x32 images (16 patches), Llama text
    model with head_dim 64 (vLLM's CPU attention needs at least 64), a WordLevel tokenizer over
    `words` (split at spaces) with `<image>`."""
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece()  # words joined by spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>", model_max_length=128,
                                        extra_special_tokens={"image_token": "<image>"})
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    config = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=16,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def llava_path(tmp_path_factory):
    """The tiny LLaVA over WORDS, capitalised too."""
    words = list(dict.fromkeys(WORDS + [w.capitalize() for w in WORDS] + ["USER", "ASSISTANT"]))
    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"), words)



AESTHETIC_PROJECTION_DIM = 12


def random_aesthetic_head(embed_dim: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A state dict with the published predictor's keys and shapes, on `embed_dim` inputs."""
    widths = [embed_dim, 1024, 128, 64, 16, 1]
    head = {}
    for index, (n_in, n_out) in zip([0, 2, 4, 6, 7], zip(widths, widths[1:])):
        head[f"layers.{index}.weight"] = torch.randn(n_out, n_in, generator=generator) / n_in ** 0.5
        head[f"layers.{index}.bias"] = torch.randn(n_out, generator=generator) * 0.1
    return head


@pytest.fixture(scope="session")
def tiny_aesthetic(tmp_path_factory):
    """A tiny CLIP (with its image processor) and a random aesthetic head (safetensors and .pth)."""
    folder = tmp_path_factory.mktemp("aesthetic")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=AESTHETIC_PROJECTION_DIM,
    )
    clip = CLIPModel(config).eval()
    clip.save_pretrained(folder / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "clip")
    head = random_aesthetic_head(AESTHETIC_PROJECTION_DIM, torch.Generator().manual_seed(1))
    save_file(head, folder / "head.safetensors")
    torch.save(head, folder / "sac+logos+ava1-l14-linearMSE.pth")
    return folder, clip, head


# The modules that take longest, longest first: `make test` runs the modules on two pytest-xdist
# workers (--dist loadscope), each module on one worker, in this order; the many short ones fill in
# at the end.
SLOW_MODULES = ["test_system.py", "test_job.py", "test_main_job.py", "test_learner_group.py", "test_resume.py",
                "test_families.py", "test_alignment.py", "test_learner.py", "test_workflow.py"]


def pytest_collection_modifyitems(items):
    def rank(item):
        return SLOW_MODULES.index(item.path.name) if item.path.name in SLOW_MODULES else len(SLOW_MODULES)

    items.sort(key=rank)  # stable: each module's tests keep their order
