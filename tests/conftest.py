import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402

from ddpo.config import load_config  # noqa: E402


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
        **({"output_dir": str(tmp_path)} if tmp_path is not None else {}),
        **overrides,
    }
    return load_config(None, [f"{k}={v}" for k, v in settings.items()])


@pytest.fixture
def config(tmp_path):
    return tiny_config(tmp_path)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (dashboard off, loopback only)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, namespace="ddpo-tests", log_to_driver=False,
             _node_ip_address="127.0.0.1", _system_config={"metrics_report_interval_ms": 500})
    yield ray
    ray.shutdown()
