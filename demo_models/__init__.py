"""Built-in offline demo models: coloured shapes (image), moving shapes (video), synth tones (audio).

Example:
    >>> from demo_models import load_pipeline, check
    >>> pipe = load_pipeline("image")  # doctest: +SKIP
    >>> out = pipe("a large red circle in the center on a blue background")  # doctest: +SKIP
    >>> check("image", "a large red circle in the center on a blue background", out.images[0])  # doctest: +SKIP
    {'color': True, 'shape': True, 'position': True, 'size': True, 'background': True}
"""

from __future__ import annotations

from .loading import ASSETS_DIR, load_pipeline
from .vocab import KINDS, UnknownWordWarning, describe_vocabulary, parse_prompt, random_prompts

__all__ = [
    "ASSETS_DIR",
    "KINDS",
    "UnknownWordWarning",
    "check",
    "describe_vocabulary",
    "load_pipeline",
    "parse_prompt",
    "random_prompts",
]


def check(kind: str, prompt: str, output):
    """Per-attribute adherence of one generated sample to ``prompt``; see :mod:`demo_models.checkers`."""
    from .checkers import check as _check

    return _check(kind, prompt, output)
