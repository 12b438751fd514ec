"""Placeholder until the share branch lands (same API)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ShareEntry:
    label: str
    wall_s: float
    media: np.ndarray
    note: str = ""


def export_race(
    entries: Sequence[ShareEntry], modality: str, out_dir: Path, *, fps: int = 8, sample_rate: int | None = None
) -> Path:
    raise NotImplementedError
