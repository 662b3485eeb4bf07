"""The attribute vocabulary of rendered product clips, spec sampling and the held-out split.

A :class:`ClipSpec` is the *semantic* description of a clip: what product, which colour,
which background, how things move, how it is lit. Everything a caption says comes from
the spec and nothing else; nuisance variation (start angle, exact size, label design) comes
from the render seed. This module is pure Python + numpy and must never import torch or
draw pixels, so evaluation code can reason about attributes without the renderer.

Held-out split: a fixed set of (kind, colour) pairs never appears in ``split="train"`` and
is the only thing ``split="heldout"`` produces, so we can measure compositional
generalisation ("a purple bottle" when the model has seen purple things and bottles, but
never a purple bottle).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS: tuple[str, ...] = ("bottle", "mug", "box", "can", "shoe", "jar")

# Linear-ish sRGB albedo in [0, 255]. Chosen far enough apart that the mean shaded object
# colour still maps back to the right name (tested in tests/trainer/data).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 32, 38),
    "orange": (240, 125, 25),
    "yellow": (240, 205, 40),
    "green": (45, 155, 65),
    "teal": (25, 150, 155),
    "blue": (35, 75, 195),
    "purple": (125, 55, 170),
    "pink": (240, 125, 175),
    "white": (238, 238, 232),
    "black": (34, 34, 38),
}
MATERIALS: tuple[str, ...] = ("matte", "glossy")
BACKGROUNDS: tuple[str, ...] = ("white_table", "wooden_table", "dark_studio", "blue_gradient", "kitchen_counter")
# Turntable speed names; the angular speeds live in the renderer's scene module.
MOTIONS: tuple[str, ...] = ("still", "slow", "fast")
CAMERAS: tuple[str, ...] = ("static", "zoom_in", "zoom_out", "pan_left", "pan_right")
LIGHTINGS: tuple[str, ...] = ("soft", "bright", "dim")
TINTS: tuple[str, ...] = ("neutral", "warm", "cool")
SPLITS: tuple[str, ...] = ("train", "heldout")

# One held-out colour per kind, and every held-out colour is seen with the other five
# kinds in training, so each held-out clip is a new *combination* of seen attributes.
HELDOUT_COMBINATIONS: frozenset[tuple[str, str]] = frozenset({
    ("bottle", "purple"),
    ("mug", "yellow"),
    ("box", "teal"),
    ("can", "pink"),
    ("shoe", "orange"),
    ("jar", "blue"),
})

# Keys of :func:`attribute_dict`; the evaluation suite trains one classifier head per key.
ATTRIBUTE_KEYS: tuple[str, ...] = ("kind", "colour", "material", "background", "motion", "camera", "lighting", "tint")
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "kind": KINDS,
    "colour": tuple(COLOURS),
    "material": MATERIALS,
    "background": BACKGROUNDS,
    "motion": MOTIONS,
    "camera": CAMERAS,
    "lighting": LIGHTINGS,
    "tint": TINTS,
}


def _check_choice(field_name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"ClipSpec.{field_name} must be one of {list(choices)}, got {value!r}")


@dataclass(frozen=True)
class ClipSpec:
    """What a clip shows. Validated on construction; an unknown attribute value is an error."""

    kind: str
    colour: str
    material: str = "matte"
    background: str = "white_table"
    motion: str = "slow"
    camera: str = "static"
    lighting: str = "soft"
    tint: str = "neutral"

    def __post_init__(self) -> None:
        for key in ATTRIBUTE_KEYS:
            _check_choice(key, getattr(self, key), ATTRIBUTE_VALUES[key])

    @property
    def colour_rgb(self) -> tuple[int, int, int]:
        """Albedo of the named colour, ``(r, g, b)`` in [0, 255]."""
        return COLOURS[self.colour]

    @property
    def is_heldout(self) -> bool:
        return is_heldout_combination(self.kind, self.colour)


def is_heldout_combination(kind: str, colour: str) -> bool:
    """True if ``(kind, colour)`` is reserved for the held-out split."""
    return (kind, colour) in HELDOUT_COMBINATIONS


def attribute_dict(spec: ClipSpec) -> dict[str, str]:
    """``spec -> {key: value}`` for every key in :data:`ATTRIBUTE_KEYS` (the evaluation labels)."""
    return {key: getattr(spec, key) for key in ATTRIBUTE_KEYS}


def attribute_index(spec: ClipSpec) -> dict[str, int]:
    """Class indices per attribute (position in :data:`ATTRIBUTE_VALUES`), for classifier targets."""
    return {key: ATTRIBUTE_VALUES[key].index(getattr(spec, key)) for key in ATTRIBUTE_KEYS}


def _as_generator(rng_or_seed: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    if isinstance(rng_or_seed, (int, np.integer)) and not isinstance(rng_or_seed, bool):
        return np.random.default_rng(int(rng_or_seed))
    raise TypeError(f"expected a numpy Generator or an int seed, got {type(rng_or_seed).__name__}")


def _pick(rng: np.random.Generator, choices: tuple[str, ...] | list[str]) -> str:
    return choices[int(rng.integers(len(choices)))]


# Sampling weights: a little more turning than standing still and a static camera as often as
# any single camera move, because turning is what makes the clip a video at all.
_MOTION_PROBS = np.array([0.2, 0.45, 0.35])
_CAMERA_PROBS = np.array([0.32, 0.17, 0.17, 0.17, 0.17])
_TINT_PROBS = np.array([0.5, 0.25, 0.25])


def sample_clip_spec(rng_or_seed: np.random.Generator | int, split: str = "train") -> ClipSpec:
    """Draw a :class:`ClipSpec` for ``split`` ("train" or "heldout").

    Train never yields a pair in :data:`HELDOUT_COMBINATIONS`; heldout always does (uniform
    over the pairs). All other attributes are drawn the same way in both splits. The same
    int seed always gives the same spec.
    """
    _check_choice("split", split, SPLITS)
    rng = _as_generator(rng_or_seed)
    if split == "heldout":
        pairs = sorted(HELDOUT_COMBINATIONS)
        kind, colour = pairs[int(rng.integers(len(pairs)))]
    else:
        kind = _pick(rng, KINDS)
        # Sample the colour among the ones allowed for this kind (not rejection sampling), so
        # one draw consumes a fixed number of random numbers whatever the outcome.
        allowed = [c for c in COLOURS if not is_heldout_combination(kind, c)]
        colour = _pick(rng, allowed)
    return ClipSpec(
        kind=kind,
        colour=colour,
        material=_pick(rng, MATERIALS),
        background=_pick(rng, BACKGROUNDS),
        motion=MOTIONS[int(rng.choice(len(MOTIONS), p=_MOTION_PROBS))],
        camera=CAMERAS[int(rng.choice(len(CAMERAS), p=_CAMERA_PROBS))],
        lighting=_pick(rng, LIGHTINGS),
        tint=TINTS[int(rng.choice(len(TINTS), p=_TINT_PROBS))],
    )
