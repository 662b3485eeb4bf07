"""Torch datasets: item format, determinism, worker- and rank-independent sharding."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from trainer.data.attributes import is_heldout_combination
from trainer.data.captions import caption_attributes
from trainer.data.dataset import ClipConfig, ProductClipDataset, ProductClipStream, clip_identity

TINY = ClipConfig(num_frames=3, height=32, width=32)


def test_item_format() -> None:
    video, text, attrs = ProductClipDataset(4, seed=1, config=TINY)[2]
    assert video.shape == (3, 3, 32, 32) and video.dtype == torch.float32
    assert video.min() >= -1.0 and video.max() <= 1.0 and video.std() > 0.05
    assert isinstance(text, str) and caption_attributes(text) == attrs


def test_deterministic_and_split_aware() -> None:
    train = ProductClipDataset(6, split="train", seed=3, config=TINY)
    assert torch.equal(train[5][0], ProductClipDataset(6, split="train", seed=3, config=TINY)[5][0])
    assert clip_identity(3, "train", 5) != clip_identity(4, "train", 5)
    heldout = ProductClipDataset(6, split="heldout", seed=3, config=TINY)
    assert all(is_heldout_combination(heldout[i][2]["kind"], heldout[i][2]["colour"]) for i in range(6))


def test_stream_is_the_same_sequence_for_any_worker_count() -> None:
    reference = [ProductClipDataset(8, seed=5, config=TINY)[i][1] for i in range(8)]
    single = [text for _, text, _ in ProductClipStream(seed=5, config=TINY, num_clips=8)]
    assert single == reference
    loader = DataLoader(ProductClipStream(seed=5, config=TINY, num_clips=8), batch_size=None, num_workers=2)
    assert [text for _, text, _ in loader] == reference
    ranks = [[t for _, t, _ in ProductClipStream(seed=5, config=TINY, num_clips=8, rank=r, world_size=2)]
             for r in range(2)]
    assert ranks[0] == reference[0::2] and ranks[1] == reference[1::2]


def test_stream_batches_collate() -> None:
    loader = DataLoader(ProductClipStream(seed=0, config=TINY, num_clips=4), batch_size=2)
    video, texts, attrs = next(iter(loader))
    assert video.shape == (2, 3, 3, 32, 32) and len(texts) == 2 and len(attrs["kind"]) == 2
