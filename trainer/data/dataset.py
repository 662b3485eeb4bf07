"""Torch datasets of rendered product clips: ``(video [3, N, H, W] in [-1, 1], caption, attributes)``.

Clip ``i`` of a dataset is a pure function of ``(seed, split, i)``: its spec and its render
seed are derived from a :class:`numpy.random.SeedSequence` keyed on those three, never
from global RNG state. So the map-style :class:`ProductClipDataset` is reproducible under
any sampler, and the iterable :class:`ProductClipStream` yields exactly the same clips
whatever the number of DataLoader workers or processes: worker ``k`` of ``K`` (across all
ranks) takes indices ``k, k + K, k + 2K, ...``. Rendering happens on the fly in workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from trainer.data.attributes import SPLITS, ClipSpec, attribute_dict, sample_clip_spec
from trainer.data.captions import caption
from trainer.data.renderer import RenderedClip, render_clip

Item = tuple[torch.Tensor, str, dict[str, str]]
# Keys the per-clip SeedSequence so that train and heldout clips with the same index differ.
_SPLIT_KEYS: dict[str, int] = {"train": 0x7A11, "heldout": 0x4E1D}


@dataclass(frozen=True)
class ClipConfig:
    """Geometry of the clips a dataset renders."""

    num_frames: int = 33
    height: int = 128
    width: int = 128
    fps: float = 16.0

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"ClipConfig.num_frames must be >= 1, got {self.num_frames}")
        if self.height < 8 or self.width < 8:
            raise ValueError(f"ClipConfig height/width must be >= 8, got {self.height}x{self.width}")
        if not self.fps > 0:
            raise ValueError(f"ClipConfig.fps must be > 0, got {self.fps}")


def clip_identity(seed: int, split: str, index: int) -> tuple[ClipSpec, int]:
    """``(spec, render_seed)`` of clip ``index`` in ``split`` of the dataset seeded ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if index < 0:
        raise ValueError(f"clip index must be >= 0, got {index}")
    spec_state, render_state = np.random.SeedSequence([int(seed), _SPLIT_KEYS[split], int(index)]).generate_state(2)
    return sample_clip_spec(int(spec_state), split=split), int(render_state)


def video_tensor(clip: RenderedClip) -> torch.Tensor:
    """uint8 frames ``[N, H, W, 3]`` -> float32 ``[3, N, H, W]`` in [-1, 1]."""
    frames = torch.from_numpy(clip.frames).permute(3, 0, 1, 2)
    return frames.float().div_(127.5).sub_(1.0)


def render_dataset_clip(seed: int, split: str, index: int, config: ClipConfig) -> tuple[ClipSpec, RenderedClip]:
    """Clip ``index`` of ``split`` of the dataset seeded ``seed``: its spec and its rendering."""
    spec, render_seed = clip_identity(seed, split, index)
    return spec, render_clip(spec, config.num_frames, height=config.height, width=config.width, fps=config.fps,
                             seed=render_seed)


def render_item(seed: int, split: str, index: int, config: ClipConfig) -> Item:
    spec, clip = render_dataset_clip(seed, split, index, config)
    return video_tensor(clip), caption(spec), attribute_dict(spec)


def render_item_with_mask(seed: int, split: str, index: int, config: ClipConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip ``index`` of ``split``: video ``[3, N, H, W]`` in [-1, 1] and its object mask ``[N, H, W]`` (0/1)."""
    clip = render_dataset_clip(seed, split, index, config)[1]
    return video_tensor(clip), torch.from_numpy(clip.mask).float()


class ProductClipDataset(Dataset[Item]):
    """Map-style: ``num_clips`` fixed clips of ``split``; use for evaluation sets."""

    def __init__(self, num_clips: int, split: str = "train", seed: int = 0, config: ClipConfig | None = None) -> None:
        if num_clips < 1:
            raise ValueError(f"num_clips must be >= 1, got {num_clips}")
        clip_identity(seed, split, 0)  # validates split early
        self.num_clips, self.split, self.seed = num_clips, split, seed
        self.config = config or ClipConfig()

    def __len__(self) -> int:
        return self.num_clips

    def __getitem__(self, index: int) -> Item:
        if not 0 <= index < self.num_clips:
            raise IndexError(f"clip index {index} out of range [0, {self.num_clips})")
        return render_item(self.seed, self.split, index, self.config)


class ProductClipStream(IterableDataset[Item]):
    """Iterable: clips ``0, 1, 2, ...`` of ``split`` (``num_clips=None``: forever), sharded.

    ``rank`` / ``world_size`` shard across processes (DDP); DataLoader workers shard further
    inside a process. The union over all shards is the same sequence as one process with no
    workers, so changing the worker count never changes what the model sees.
    """

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        config: ClipConfig | None = None,
        num_clips: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_clips is not None and num_clips < 1:
            raise ValueError(f"num_clips must be >= 1 or None, got {num_clips}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        clip_identity(seed, split, 0)
        self.split, self.seed, self.num_clips = split, seed, num_clips
        self.config = config or ClipConfig()
        self.rank, self.world_size = rank, world_size

    def shard(self) -> tuple[int, int]:
        """``(first index, stride)`` of the calling worker."""
        info = get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.rank * num_workers + worker_id, self.world_size * num_workers

    def __iter__(self) -> Iterator[Item]:
        index, stride = self.shard()
        while self.num_clips is None or index < self.num_clips:
            yield render_item(self.seed, self.split, index, self.config)
            index += stride
