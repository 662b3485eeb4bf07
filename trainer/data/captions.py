"""Captions for rendered clips: ``spec -> text`` and back.

One fixed template, so a caption is a deterministic function of the spec and every
attribute has exactly one phrase; :func:`parse_caption` inverts it, which lets the
evaluation suite score prompt adherence against the attributes a prompt asked for
(:func:`trainer.data.attributes.attribute_dict`). Nuisance details (start angle, size) are
never captioned. This module must not import the renderer or torch.

Example: ``"a glossy red bottle turning slowly on a white table, camera zooming in, soft lighting"``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from trainer.data.attributes import (
    COLOURS,
    KINDS,
    LIGHTINGS,
    MATERIALS,
    ClipSpec,
    attribute_dict,
)

MOTION_PHRASES: dict[str, str] = {"still": "standing still", "slow": "turning slowly", "fast": "spinning fast"}
BACKGROUND_PHRASES: dict[str, str] = {
    "white_table": "on a white table",
    "wooden_table": "on a wooden table",
    "dark_studio": "in a dark studio",
    "blue_gradient": "against a blue gradient",
    "kitchen_counter": "on a kitchen counter",
}
CAMERA_PHRASES: dict[str, str] = {
    "static": "static camera",
    "zoom_in": "camera zooming in",
    "zoom_out": "camera zooming out",
    "pan_left": "camera panning left",
    "pan_right": "camera panning right",
}
# A neutral tint is not mentioned; warm and cool qualify the lighting word.
TINT_WORDS: dict[str, str] = {"neutral": "", "warm": "warm ", "cool": "cool "}


def caption(spec: ClipSpec) -> str:
    """The caption of ``spec`` (deterministic, lower case, no trailing period)."""
    return _template(spec, f"{spec.colour} ", spec.kind)


def _template(spec: ClipSpec, colour: str, kind: str) -> str:
    return (
        f"a {spec.material} {colour}{kind} {MOTION_PHRASES[spec.motion]} "
        f"{BACKGROUND_PHRASES[spec.background]}, {CAMERA_PHRASES[spec.camera]}, "
        f"{spec.lighting} {TINT_WORDS[spec.tint]}lighting"
    )


# Attributes a training caption may leave out (``partial_caption``), and the word a missing kind becomes.
PARTIAL_ATTRIBUTES: tuple[str, ...] = ("colour", "kind")
UNNAMED_KIND = "object"


def partial_caption(spec: ClipSpec, without: str) -> str:
    """:func:`caption` with one attribute left out, for training only (``parse_caption`` refuses it):
    ``without="colour"`` drops the colour word ("a glossy bottle ..."), ``"kind"`` names the product only as
    an object ("a glossy red object ..."), so a model trained on both learns each word's effect on its own
    instead of only the (kind, colour) pairs it saw."""
    if without not in PARTIAL_ATTRIBUTES:
        raise ValueError(f"without must be one of {list(PARTIAL_ATTRIBUTES)}, got {without!r}")
    return _template(spec, "" if without == "colour" else f"{spec.colour} ",
                     UNNAMED_KIND if without == "kind" else spec.kind)


def _alternation(words: Iterable[str]) -> str:
    # Longest first, so "zoom_in"-style prefixes never shadow a longer phrase.
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_CAPTION_RE = re.compile(
    rf"^a (?P<material>{_alternation(MATERIALS)}) (?P<colour>{_alternation(COLOURS)}) "
    rf"(?P<kind>{_alternation(KINDS)}) (?P<motion>{_alternation(MOTION_PHRASES.values())}) "
    rf"(?P<background>{_alternation(BACKGROUND_PHRASES.values())}), "
    rf"(?P<camera>{_alternation(CAMERA_PHRASES.values())}), "
    rf"(?P<lighting>{_alternation(LIGHTINGS)}) (?:(?P<tint>warm|cool) )?lighting$"
)


def parse_caption(text: str) -> ClipSpec:
    """Invert :func:`caption`. Raises ``ValueError`` on text the template cannot produce."""
    match = _CAPTION_RE.match(text.strip().lower())
    if match is None:
        raise ValueError(f"not a product-clip caption: {text!r}")
    inverse = {
        "motion": {v: k for k, v in MOTION_PHRASES.items()},
        "background": {v: k for k, v in BACKGROUND_PHRASES.items()},
        "camera": {v: k for k, v in CAMERA_PHRASES.items()},
    }
    return ClipSpec(
        kind=match["kind"],
        colour=match["colour"],
        material=match["material"],
        background=inverse["background"][match["background"]],
        motion=inverse["motion"][match["motion"]],
        camera=inverse["camera"][match["camera"]],
        lighting=match["lighting"],
        tint=match["tint"] or "neutral",
    )


def caption_attributes(text: str) -> dict[str, str]:
    """Attribute dict (same keys as :func:`attribute_dict`) of a caption."""
    return attribute_dict(parse_caption(text))
