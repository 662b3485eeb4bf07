"""Attribute classifier for prompt adherence and Frechet features: a small (2+1)-D CNN, multi-head.

The classifier looks at ``num_frames`` frames ``frame_stride`` apart (8 frames over 1 s at
16 fps by default), resized to ``image_size`` square, plus their temporal differences, and
predicts every attribute of :data:`trainer.data.attributes.ATTRIBUTE_KEYS` (kind, colour,
material, background, motion, camera, lighting, tint) with one linear head each. Its
penultimate vector (:meth:`AttributeClassifier.features`) is the video feature of the
FVD-like Frechet distance in :mod:`trainer.eval.frechet`.

This module holds the model, the preprocessing shared by training and evaluation, checkpoint
loading and prediction; training lives in :mod:`trainer.eval.classifier_train`, reached via
``python -m trainer.eval.classifier --train``. It must never render clips or read videos
itself, and loading never falls back to random weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from streamgen.config import from_dict
from streamgen.model.weights import load_state_strict, read_checkpoint
from trainer.data.attributes import ATTRIBUTE_KEYS, ATTRIBUTE_VALUES

CHECKPOINT_KIND = "attr_classifier"
DEFAULT_CHECKPOINT = "checkpoints/attr_classifier.safetensors"


def _default_num_classes() -> tuple[int, ...]:
    return tuple(len(ATTRIBUTE_VALUES[key]) for key in ATTRIBUTE_KEYS)


@dataclass(frozen=True)
class ClassifierConfig:
    """Input geometry and widths of :class:`AttributeClassifier`.

    ``attribute_keys`` / ``num_classes`` record the vocabulary the heads were trained on; a
    checkpoint whose vocabulary differs from :mod:`trainer.data.attributes` refuses to load.
    """

    num_frames: int = 8
    frame_stride: int = 2
    image_size: int = 64
    stem_patch: int = 4
    # 0: the stem is one non-overlapping stem_patch x stem_patch conv (linear up to its norm);
    # checkpoints written before this field existed are of this kind. > 0: a 3x3 stride-2 conv to
    # this width and a nonlinearity first, then a stem_patch / 2 patchify conv, so that a glossy
    # highlight a pixel or two wide is detected before it is averaged into its patch. Not the
    # default: no controlled run has shown it reads material better (docs/quality.md).
    stem_hidden_channels: int = 0
    stem_channels: int = 32
    stage_channels: tuple[int, ...] = (32, 64, 128)
    feature_dim: int = 256
    pooled_size: int = 4
    norm_groups: int = 8
    attribute_keys: tuple[str, ...] = ATTRIBUTE_KEYS
    num_classes: tuple[int, ...] = _default_num_classes()

    def __post_init__(self) -> None:
        for name in ("num_frames", "frame_stride", "image_size", "stem_patch", "stem_channels", "feature_dim",
                     "pooled_size", "norm_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClassifierConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.stem_hidden_channels < 0:
            raise ValueError(f"ClassifierConfig.stem_hidden_channels must be >= 0, got {self.stem_hidden_channels}")
        if self.stem_hidden_channels and (self.stem_patch % 2 or self.stem_hidden_channels % self.norm_groups):
            raise ValueError(f"ClassifierConfig with stem_hidden_channels={self.stem_hidden_channels} needs an even "
                             f"stem_patch (got {self.stem_patch}) and a width divisible by norm_groups "
                             f"{self.norm_groups}")
        if not self.stage_channels:
            raise ValueError("ClassifierConfig.stage_channels must not be empty")
        for c in (self.stem_channels, *self.stage_channels):
            if c % self.norm_groups:
                raise ValueError(f"ClassifierConfig channel width {c} is not divisible by norm_groups "
                                 f"{self.norm_groups}")
        # The stem divides the size by stem_patch, every stage after the first halves it again.
        downsample = self.stem_patch * 2 ** (len(self.stage_channels) - 1)
        if self.image_size % downsample or self.image_size // downsample < self.pooled_size:
            raise ValueError(f"ClassifierConfig.image_size {self.image_size} must be a multiple of {downsample} "
                             f"with at least pooled_size={self.pooled_size} cells left after downsampling")
        if len(self.attribute_keys) != len(self.num_classes):
            raise ValueError("ClassifierConfig.attribute_keys and num_classes differ in length")
        if any(n < 2 for n in self.num_classes):
            raise ValueError(f"ClassifierConfig.num_classes must all be >= 2, got {self.num_classes}")

    @property
    def span_frames(self) -> int:
        """Pixel frames one classifier window covers."""
        return (self.num_frames - 1) * self.frame_stride + 1

    def check_vocabulary(self) -> None:
        """Raise ``ValueError`` unless the heads match :mod:`trainer.data.attributes` exactly."""
        expected = (ATTRIBUTE_KEYS, _default_num_classes())
        if (self.attribute_keys, self.num_classes) != expected:
            raise ValueError(f"classifier heads {dict(zip(self.attribute_keys, self.num_classes, strict=True))} do "
                             f"not match the attribute vocabulary "
                             f"{dict(zip(expected[0], expected[1], strict=True))}; retrain the classifier")


class Block(nn.Module):
    """(2+1)-D residual block: a spatial 3x3 conv per frame (optionally strided), then a 3-tap temporal conv.

    Factorised instead of full 3x3x3 kernels (a third of the FLOPs), and run as 2-D convs on
    ``[B * T, C, H, W]`` in channels-last layout, which CPU kernels handle ~2x faster than ``Conv3d``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.spatial = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.norm1 = nn.GroupNorm(groups, c_out)
        self.temporal = nn.Conv2d(c_out, c_out, (3, 1), padding=(1, 0))
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.skip: nn.Module = (nn.Conv2d(c_in, c_out, 1, stride=stride)
                                if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``[B * T, C_in, H, W] -> [B * T, C_out, H / stride, W / stride]`` (frames of a clip adjacent)."""
        h = F.silu(self.norm1(self.spatial(x)))  # [B*T, C, h, w]
        bt, c, hh, ww = h.shape
        b = bt // num_frames
        h = h.reshape(b, num_frames, c, hh * ww).transpose(1, 2)  # [B, C, T, h*w]
        h = self.norm2(self.temporal(h))
        h = h.transpose(1, 2).reshape(bt, c, hh, ww)  # [B*T, C, h, w]
        return F.silu(h + self.skip(x)).contiguous(memory_format=torch.channels_last)


class AttributeClassifier(nn.Module):
    """Video ``[B, 3, T, S, S]`` in [-1, 1] -> logits per attribute; see the module docstring."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # RGB plus the difference to the previous frame: motion and camera heads get an explicit
        # temporal signal from the first layer instead of having to learn one from scratch.
        # A non-overlapping patchify stem (as in ConvNeXt): the high-resolution layers are where
        # a CPU spends its time, and colour/shape/layout survive 4x4 patches of a 64 px frame.
        # Small specular highlights do not (see ClassifierConfig.stem_hidden_channels).
        self.stem_pre: nn.Module | None = None
        self.stem_pre_norm: nn.Module | None = None
        stem_in, patch = 6, cfg.stem_patch
        if cfg.stem_hidden_channels:
            self.stem_pre = nn.Conv2d(6, cfg.stem_hidden_channels, 3, stride=2, padding=1)
            self.stem_pre_norm = nn.GroupNorm(cfg.norm_groups, cfg.stem_hidden_channels)
            stem_in, patch = cfg.stem_hidden_channels, cfg.stem_patch // 2
        self.stem = nn.Conv2d(stem_in, cfg.stem_channels, patch, stride=patch)
        self.stem_norm = nn.GroupNorm(cfg.norm_groups, cfg.stem_channels)
        blocks = []
        c_in = cfg.stem_channels
        for i, c_out in enumerate(cfg.stage_channels):
            blocks.append(Block(c_in, c_out, stride=1 if i == 0 else 2, groups=cfg.norm_groups))
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        # Keep a coarse spatial layout (pooled_size^2 cells) after averaging over time: where the
        # object sits and how the scene is laid out matters for pan direction and background.
        self.project = nn.Linear(c_in * cfg.pooled_size**2, cfg.feature_dim)
        self.feature_norm = nn.LayerNorm(cfg.feature_dim)
        self.heads = nn.ModuleDict({key: nn.Linear(cfg.feature_dim, n)
                                    for key, n in zip(cfg.attribute_keys, cfg.num_classes, strict=True)})

    def features(self, video: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, feature_dim]`` of ``video [B, 3, T, S, S]`` in [-1, 1]."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"expected video [B, 3, T, S, S], got {tuple(video.shape)}")
        b, _, t, s, _ = video.shape
        diff = torch.zeros_like(video)
        diff[:, :, 1:] = video[:, :, 1:] - video[:, :, :-1]
        x = torch.cat([video, diff], dim=1).transpose(1, 2).reshape(b * t, 6, s, s)  # [B*T, 6, S, S]
        x = x.contiguous(memory_format=torch.channels_last)
        if self.stem_pre is not None and self.stem_pre_norm is not None:
            x = F.silu(self.stem_pre_norm(self.stem_pre(x)))  # [B*T, C_hidden, S/2, S/2]
        h = F.silu(self.stem_norm(self.stem(x)))  # [B*T, C, s', s']
        for block in self.blocks:
            h = block(h, t)
        c, hh, ww = h.shape[1:]
        h = h.reshape(b, t, c, hh, ww).mean(dim=1)  # [B, C_last, h, w]
        h = F.adaptive_avg_pool2d(h, self.cfg.pooled_size)  # [B, C_last, p, p]
        return F.silu(self.feature_norm(self.project(h.flatten(1))))  # [B, feature_dim]

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits ``{key: [B, num_classes[key]]}`` for every attribute head."""
        feats = self.features(video)
        return {key: head(feats) for key, head in self.heads.items()}


# ---------------------------------------------------------------------------------------------
# Preprocessing: identical for training clips, rendered references and generated videos.


def resize_frames(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float32 ``[3, N, size, size]`` in [-1, 1].

    Area averaging when shrinking (the generated 128 px videos), bilinear when enlarging (the
    32 px test preset). Non-square frames are squashed to a square: the renderer is square.
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # [N, 3, H, W]
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        if h >= size and w >= size:
            x = F.interpolate(x, size=(size, size), mode="area")
        else:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x / 127.5 - 1.0).permute(1, 0, 2, 3).contiguous()  # [3, N, size, size]


def window_starts(num_frames: int, cfg: ClassifierConfig, hop_frames: int) -> list[int]:
    """First frame of every classifier window that fits in ``num_frames``, ``hop_frames`` apart."""
    if hop_frames < 1:
        raise ValueError(f"hop_frames must be >= 1, got {hop_frames}")
    if num_frames < cfg.span_frames:
        raise ValueError(f"the classifier needs at least {cfg.span_frames} frames "
                         f"({cfg.num_frames} frames {cfg.frame_stride} apart), got {num_frames}")
    return list(range(0, num_frames - cfg.span_frames + 1, hop_frames))


def window(resized: torch.Tensor, start: int, cfg: ClassifierConfig) -> torch.Tensor:
    """The classifier input ``[3, T, S, S]`` starting at frame ``start`` of ``resized [3, N, S, S]``."""
    end = start + cfg.span_frames
    if start < 0 or end > resized.shape[1]:
        raise ValueError(f"window [{start}, {end}) does not fit in {resized.shape[1]} frames")
    return resized[:, start:end:cfg.frame_stride]


# ---------------------------------------------------------------------------------------------
# Loading and prediction.


def load_classifier(path: str | os.PathLike[str] = DEFAULT_CHECKPOINT) -> AttributeClassifier:
    """Build the classifier from a checkpoint (fp32, eval mode); a wrong kind, config or key raises."""
    state, cfg_dict = read_checkpoint(path, CHECKPOINT_KIND)
    cfg = from_dict(ClassifierConfig, cfg_dict)
    cfg.check_vocabulary()
    model = AttributeClassifier(cfg)
    load_state_strict(model, {k: v.float() for k, v in state.items()}, what=f"checkpoint {path}")
    return model.eval()


def checkpoint_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The safetensors metadata of a classifier checkpoint (training accuracy, steps, train config)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        return dict(f.metadata() or {})


@torch.no_grad()
def predict_probs(model: AttributeClassifier, videos: torch.Tensor, batch_size: int = 32
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Class probabilities ``{key: [B, n]}`` and features ``[B, feature_dim]`` of ``videos [B, 3, T, S, S]``."""
    probs: dict[str, list[torch.Tensor]] = {key: [] for key in model.cfg.attribute_keys}
    feats = []
    for i in range(0, videos.shape[0], batch_size):
        chunk = videos[i:i + batch_size]
        f = model.features(chunk)
        feats.append(f)
        for key, head in model.heads.items():
            probs[key].append(head(f).softmax(dim=-1))
    return {key: torch.cat(v) for key, v in probs.items()}, torch.cat(feats)


def labels_from_probs(probs: dict[str, torch.Tensor]) -> list[dict[str, str]]:
    """Arg-max attribute names per video: ``[{key: value}]``."""
    num = next(iter(probs.values())).shape[0]
    out: list[dict[str, str]] = [{} for _ in range(num)]
    for key, p in probs.items():
        for i, idx in enumerate(p.argmax(dim=-1).tolist()):
            out[i][key] = ATTRIBUTE_VALUES[key][idx]
    return out


def adherence(predicted: dict[str, str], target: dict[str, str], keys: Sequence[str] | None = None) -> dict[str, bool]:
    """Per attribute: did the classifier see what the prompt asked for? (``keys``: default all of ``target``)."""
    keys = list(target) if keys is None else list(keys)
    return {key: predicted[key] == target[key] for key in keys}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.eval.classifier",
                                     description="Train or evaluate the attribute classifier on rendered clips.")
    parser.add_argument("--train", action="store_true", help="train on the train split, then evaluate on heldout")
    parser.add_argument("--evaluate", action="store_true", help="evaluate --out on heldout clips (no training)")
    parser.add_argument("--out", default=DEFAULT_CHECKPOINT, help=f"checkpoint path (default {DEFAULT_CHECKPOINT})")
    parser.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    parser.add_argument("--train-clips", type=int, default=None, help="override the number of rendered train clips")
    parser.add_argument("--heldout-clips", type=int, default=None, help="override the number of heldout clips")
    parser.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget for the step loop")
    parser.add_argument("--log-dir", default="runs/attr_classifier", help="metrics.jsonl goes here")
    parser.add_argument("--device", default=None, help="training device, cpu (default) or cuda")
    parser.add_argument("--render-workers", type=int, default=None, help="processes that render the clips")
    parser.add_argument("--stem-hidden-channels", type=int, default=None,
                        help="width of the 3x3 layer before the patchify stem (0: none; see ClassifierConfig)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.train == args.evaluate:
        print("give exactly one of --train or --evaluate")
        return 2
    # Imported here: training pulls in the renderer, which plain evaluation never needs.
    from trainer.eval import classifier_train

    overrides: dict[str, object] = {
        "num_steps": args.steps, "num_train_clips": args.train_clips, "num_heldout_clips": args.heldout_clips,
        "max_minutes": args.max_minutes, "device": args.device, "num_render_workers": args.render_workers}
    if args.stem_hidden_channels is not None:
        overrides["model"] = {"stem_hidden_channels": args.stem_hidden_channels}
    cfg = classifier_train.train_config({k: v for k, v in overrides.items() if v is not None})
    if args.train:
        classifier_train.train(cfg, args.out, args.log_dir)
    else:
        model = load_classifier(args.out)
        # Render at the checkpoint's own input geometry, whatever the current defaults are.
        cfg = dataclasses.replace(cfg, model=model.cfg)
        print(classifier_train.format_accuracy(classifier_train.heldout_accuracy(model, cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
