"""The trajectory schema in Arrow: one row per sample, tensors as fixed-shape tensor columns.

A sampler returns its batch as a `pyarrow.RecordBatch`; Ray moves it through the object store
without copying, the learner turns it back into torch tensors, and the driver writes rows to
Parquet (`trajectories/`). The samples travel as their files' bytes (`ddpo.media`: PNG for
an image, animated WebP for a video), prompts as text.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ddpo.media import Media

if TYPE_CHECKING:  # the reward actors read trajectories without importing diffusers
    from ddpo.rollout import Trajectories

LATENTS = "latents"
MEDIA = "media"  # the samples' files; the field's metadata names the medium and a video's fps


def media_column(media: Media) -> tuple[pa.Field, pa.Array]:
    """The samples as one binary column, with what `media_of` needs to read them back."""
    kind = {"medium": media.medium, "fps": json.dumps(media.fps)}
    return pa.field(MEDIA, pa.binary(), metadata=kind), pa.array(media.encode(), pa.binary())


def media_of(table: pa.Table | pa.RecordBatch) -> Media:
    """The decoded samples of a table with a media column (or the `image_png` column of run
    directories written before media had one)."""
    if MEDIA not in table.column_names:
        return Media.decode(table.column("image_png").to_pylist())
    kind = table.schema.field(MEDIA).metadata or {}
    return Media.decode(table.column(MEDIA).to_pylist(), kind.get(b"medium", b"image").decode(),
                        json.loads(kind.get(b"fps", b"null")))


def _tensor_column(array: np.ndarray) -> pa.ExtensionArray:
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(array))


def _to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.to_numpy_ndarray()


def to_record_batch(trajectories: Trajectories, batch_id: str, policy_version: int) -> pa.RecordBatch:
    """Trajectories -> Arrow, every row tagged with its sample batch id and policy version.
    Trajectories without stochastic steps (DiffusionNFT's) have no `log_probs` column."""
    n = len(trajectories.prompts)
    latents = trajectories.latents
    if latents.dtype == torch.bfloat16:  # numpy has no bfloat16
        latents = latents.float()
    log_probs = ({} if trajectories.log_probs is None
                 else {"log_probs": _tensor_column(trajectories.log_probs.numpy().astype(np.float32))})
    columns = {
        "batch_id": pa.array([batch_id] * n, pa.string()),
        "prompt": pa.array(trajectories.prompts, pa.string()),
        "seed": pa.array(trajectories.seeds, pa.int64()),
        "policy_version": pa.array([policy_version] * n, pa.int64()),
        "timesteps": _tensor_column(trajectories.timesteps.numpy()),
        **log_probs,
        LATENTS: _tensor_column(latents.numpy()),
    }
    media_field, media = media_column(trajectories.media)
    fields = [pa.field(name, column.type) for name, column in columns.items()]
    return pa.RecordBatch.from_arrays([*columns.values(), media], schema=pa.schema([*fields, media_field]))


@dataclass
class TrainingBatch:
    """What the learner needs from trajectories, as torch tensors."""

    batch_ids: list[str]
    prompts: list[str]
    policy_versions: torch.Tensor  # [B] int64
    latents: torch.Tensor  # [B, S+1, C, h, w]: the stochastic steps' (S = 0: x_0 alone)
    log_probs: torch.Tensor | None  # [B, S]; None without stochastic steps
    timesteps: torch.Tensor  # [B, S]; with S = 0, the sampling schedule

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class EpochTrajectories:
    """An epoch's sample batches as the learner receives them: every batch's id, policy version
    and prompts (small: every learner rank gets them all), and `fetch(indices)`, which returns
    the full trajectories of the batches at those indices (a rank fetches only the batches
    that hold its samples; on Ray, straight from the object store)."""

    batch_ids: list[str]
    policy_versions: list[int]
    prompts: list[list[str]]
    fetch: Callable[[list[int]], list[pa.RecordBatch]] | None = None  # set where the trajectories are

    @classmethod
    def describe(cls, batches: list[pa.RecordBatch]) -> EpochTrajectories:
        """Ids, versions and prompts of sample batches (with or without latents); no fetch."""
        return cls(batch_ids=[b.column("batch_id")[0].as_py() for b in batches],
                   policy_versions=[b.column("policy_version")[0].as_py() for b in batches],
                   prompts=[b.column("prompt").to_pylist() for b in batches])

    @classmethod
    def from_batches(cls, batches: list[pa.RecordBatch]) -> EpochTrajectories:
        """Trajectories already in memory (one process, tests)."""
        epoch = cls.describe(batches)
        epoch.fetch = lambda indices: [batches[i] for i in indices]
        return epoch


def to_training_batch(table: pa.Table | pa.RecordBatch) -> TrainingBatch:
    return TrainingBatch(
        batch_ids=table.column("batch_id").to_pylist(),
        prompts=table.column("prompt").to_pylist(),
        policy_versions=torch.tensor(table.column("policy_version").to_pylist(), dtype=torch.int64),
        latents=torch.from_numpy(_to_numpy(table.column(LATENTS)).copy()),
        log_probs=(torch.from_numpy(_to_numpy(table.column("log_probs")).copy())
                   if "log_probs" in table.column_names else None),
        timesteps=torch.from_numpy(_to_numpy(table.column("timesteps")).copy()),
    )


def write_parquet(table: pa.Table | pa.RecordBatch, path: str | Path) -> None:
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    pq.write_table(table, str(path))


def read_parquet(path: str | Path) -> pa.Table:
    return pq.read_table(str(path))
