"""The Arrow trajectory schema and its Parquet round trip."""

import numpy as np
import pyarrow as pa
import torch

from ddpo.rollout import Trajectories
from ddpo.media import Media
from ddpo.trajectory import media_of, read_parquet, to_record_batch, to_training_batch, write_parquet


def _trajectories(dtype=torch.float16):
    g = torch.Generator().manual_seed(0)
    return Trajectories(
        prompts=["a cat", "a dog"],
        seeds=[11, 12],
        latents=torch.randn(2, 4, 4, 8, 8, generator=g).to(dtype),
        log_probs=torch.randn(2, 3, generator=g),
        timesteps=torch.tensor([[901, 601, 301]] * 2),
        media=Media.from_images(np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)),
    )


def test_schema_uses_tensor_columns():
    batch = to_record_batch(_trajectories(), "e0-b1", policy_version=3)
    assert isinstance(batch.schema.field("latents").type, pa.FixedShapeTensorType)
    assert batch.schema.field("latents").type.shape == [4, 4, 8, 8]
    assert batch.schema.field("log_probs").type.value_type == pa.float32()
    assert batch.column("policy_version").to_pylist() == [3, 3]
    assert batch.column("batch_id").to_pylist() == ["e0-b1", "e0-b1"]


def test_parquet_round_trip_is_exact(tmp_path):
    traj = _trajectories()
    write_parquet(to_record_batch(traj, "e2-b0", policy_version=5), tmp_path / "t.parquet")
    table = read_parquet(tmp_path / "t.parquet")
    assert isinstance(table.schema.field("latents").type, pa.FixedShapeTensorType)
    batch = to_training_batch(table)
    assert batch.prompts == traj.prompts and batch.batch_ids == ["e2-b0", "e2-b0"]
    assert batch.latents.dtype == torch.float16
    assert torch.equal(batch.latents, traj.latents)
    assert torch.equal(batch.log_probs, traj.log_probs)
    assert torch.equal(batch.timesteps, traj.timesteps)
    assert batch.policy_versions.tolist() == [5, 5]
    assert table.column("seed").to_pylist() == [11, 12]
    np.testing.assert_array_equal(media_of(table).images, traj.media.images)
