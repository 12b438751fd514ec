"""Vocabularies of the built-in demo models and the prompt parser.

A prompt is parsed into one integer per attribute slot: ``0`` means "not specified"
(the null token learned through attribute dropout), ``k >= 1`` is the k-th value of
the slot. Words outside the vocabulary are ignored with an :class:`UnknownWordWarning`.

Example:
    >>> parse_prompt("image", "a large red circle in the center on a blue background")
    {'color': 'red', 'shape': 'circle', 'position': 'center', 'size': 'large', 'background': 'blue'}
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import numpy as np

KINDS = ("image", "video", "audio")

FOREGROUND_COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
BACKGROUND_COLORS = ("black", "white", "gray", "blue")
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("center", "top left", "top right", "bottom left", "bottom right")
SIZES = ("small", "large")
DIRECTIONS = ("right", "left", "up", "down")
PITCHES = ("low", "middle", "high")
TIMBRES = ("sine", "square")
PATTERNS = ("steady", "rising", "falling", "pulsing")

# RGB in [0, 1]; shared by the renderer and the checker.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.75, 0.2),
    "blue": (0.15, 0.25, 0.9),
    "yellow": (0.95, 0.9, 0.1),
    "purple": (0.6, 0.15, 0.75),
    "orange": (1.0, 0.55, 0.05),
    "black": (0.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "gray": (0.5, 0.5, 0.5),
}

_SYNONYMS = {
    "centre": "center",
    "grey": "gray",
    "violet": "purple",
    "circles": "circle",
    "squares": "square",
    "triangles": "triangle",
    "big": "large",
    "tiny": "small",
    "upward": "up",
    "upwards": "up",
    "downward": "down",
    "downwards": "down",
    "rightward": "right",
    "rightwards": "right",
    "leftward": "left",
    "leftwards": "left",
    "mid": "middle",
    "medium": "middle",
    "ascending": "rising",
    "descending": "falling",
    "pulsating": "pulsing",
    "pulse": "pulsing",
    "pulsed": "pulsing",
    "constant": "steady",
}
_STOP_WORDS = {
    "a",
    "an",
    "the",
    "in",
    "at",
    "on",
    "of",
    "with",
    "and",
    "over",
    "to",
    "is",
    "background",
    "moving",
    "moves",
    "tone",
    "tones",
    "sound",
    "note",
    "wave",
    "shape",
    "corner",
    "pitched",
    "pitch",
    "",
}


class UnknownWordWarning(UserWarning):
    """A prompt word the built-in model does not know; it is ignored."""


@dataclass(frozen=True)
class Slot:
    """One attribute of a prompt: its name and its values (value k is token k + 1)."""

    name: str
    values: tuple[str, ...]


SLOTS: dict[str, tuple[Slot, ...]] = {
    "image": (
        Slot("color", FOREGROUND_COLORS),
        Slot("shape", SHAPES),
        Slot("position", POSITIONS),
        Slot("size", SIZES),
        Slot("background", BACKGROUND_COLORS),
    ),
    "video": (
        Slot("color", FOREGROUND_COLORS),
        Slot("shape", SHAPES),
        Slot("direction", DIRECTIONS),
        Slot("background", BACKGROUND_COLORS),
    ),
    "audio": (
        Slot("pitch", PITCHES),
        Slot("timbre", TIMBRES),
        Slot("pattern", PATTERNS),
    ),
}


def check_kind(kind: str) -> str:
    """Return ``kind`` or raise ValueError naming the valid kinds."""
    if kind not in KINDS:
        raise ValueError(f"Unknown demo model kind {kind!r}; valid kinds are {', '.join(KINDS)}.")
    return kind


def attribute_sizes(kind: str) -> tuple[int, ...]:
    """Number of tokens per slot, null token included."""
    return tuple(len(s.values) + 1 for s in SLOTS[check_kind(kind)])


def _words(kind: str, prompt: str) -> list[str]:
    words = [_SYNONYMS.get(w, w) for w in re.findall(r"[a-z]+", prompt.lower())]
    if kind == "image":
        words = ["center" if w == "middle" else w for w in words]
    return words


def parse_prompt(kind: str, prompt: str | None, warn: bool = True) -> dict[str, str]:
    """Parse ``prompt`` into ``{slot: value}`` for the slots it specifies.

    Unknown words are ignored with an :class:`UnknownWordWarning`; the first value given
    for a slot wins.
    """
    slots = {s.name: s for s in SLOTS[check_kind(kind)]}
    words = _words(kind, prompt or "")
    found: dict[str, str] = {}
    unknown: list[str] = []

    def put(slot: str, value: str) -> None:
        if slot in found and found[slot] != value:
            if warn:
                warnings.warn(
                    f"Prompt gives two values for {slot} ({found[slot]!r} and {value!r}); using {found[slot]!r}.",
                    UnknownWordWarning,
                    stacklevel=3,
                )
            return
        found.setdefault(slot, value)

    i = 0
    while i < len(words):
        w = words[i]
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if "position" in slots and w in ("top", "bottom") and nxt in ("left", "right"):
            put("position", f"{w} {nxt}")
            i += 2
            continue
        if "background" in slots and w in PALETTE and nxt == "background":
            if w in BACKGROUND_COLORS:
                put("background", w)
            else:
                unknown.append(f"{w} background")
            i += 2
            continue
        slot = next((s for s in slots.values() if s.name != "background" and w in s.values), None)
        if slot is not None:
            put(slot.name, w)
        elif w not in _STOP_WORDS:
            unknown.append(w)
        i += 1
    if unknown and warn:
        warnings.warn(
            f"Ignoring words the built-in {kind} model does not know: {', '.join(unknown)}. "
            f"Known: {describe_vocabulary(kind)}",
            UnknownWordWarning,
            stacklevel=2,
        )
    return found


def describe_vocabulary(kind: str) -> str:
    """One line listing the vocabulary of ``kind``, for messages and the UI."""
    return "; ".join(f"{s.name}: {', '.join(s.values)}" for s in SLOTS[check_kind(kind)])


def encode_attributes(kind: str, attributes: dict[str, str]) -> list[int]:
    """Token ids (0 = unspecified) for a ``{slot: value}`` dict."""
    return [(s.values.index(attributes[s.name]) + 1) if s.name in attributes else 0 for s in SLOTS[check_kind(kind)]]


def encode_prompt(kind: str, prompt: str | None, warn: bool = True) -> list[int]:
    """Token ids for ``prompt``; see :func:`parse_prompt`."""
    return encode_attributes(kind, parse_prompt(kind, prompt, warn=warn))


def _sentence(words: list[str]) -> str:
    if words[0] == "a" and len(words) > 1 and words[1][0] in "aeiou":
        words[0] = "an"
    return " ".join(words)


def format_prompt(kind: str, attributes: dict[str, str]) -> str:
    """The canonical English prompt for a (possibly partial) attribute dict."""
    a = attributes
    if kind == "image":
        words = ["a"]
        words += [a[k] for k in ("size", "color") if k in a]
        words.append(a.get("shape", "shape"))
        if "position" in a:
            words.append("in the center" if a["position"] == "center" else f"at the {a['position']}")
        if "background" in a:
            words.append(f"on a {a['background']} background")
        return _sentence(words)
    if kind == "video":
        words = ["a"]
        if "color" in a:
            words.append(a["color"])
        words.append(a.get("shape", "shape"))
        if "direction" in a:
            words.append(f"moving {a['direction']}")
        if "background" in a:
            words.append(f"on a {a['background']} background")
        return _sentence(words)
    check_kind(kind)
    words = [a[k] for k in ("pattern", "pitch", "timbre") if k in a]
    return _sentence(["a", *words, "tone"])


def sample_attributes(kind: str, rng: np.random.Generator) -> dict[str, str]:
    """A uniformly random full attribute dict (foreground colour differs from background)."""
    while True:
        attrs = {s.name: s.values[rng.integers(len(s.values))] for s in SLOTS[check_kind(kind)]}
        if attrs.get("color") is None or attrs["color"] != attrs.get("background"):
            return attrs


def random_prompts(kind: str, n: int, seed: int = 1234) -> list[str]:
    """``n`` random fully specified prompts; a seed other than the training seed gives a held-out draw.

    Example:
        >>> random_prompts("audio", 2, seed=0)  # doctest: +SKIP
        ['a falling high square tone', 'a steady low sine tone']
    """
    rng = np.random.default_rng(seed + 7919 * KINDS.index(check_kind(kind)))
    return [format_prompt(kind, sample_attributes(kind, rng)) for _ in range(n)]
