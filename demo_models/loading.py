"""Offline loading of the built-in demo pipelines from ``assets/<kind>``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from .models import AttributeUNet
from .pipelines import PIPELINE_CLASSES
from .vocab import check_kind

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"


def load_pipeline(
    kind: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    path: str | Path | None = None,
) -> DiffusionPipeline:
    """Load the built-in ``kind`` ("image", "video" or "audio") pipeline from local files only.

    Example:
        >>> pipe = load_pipeline("audio")  # doctest: +SKIP
        >>> pipe("a rising high sine tone").audios.shape  # doctest: +SKIP
        (1, 16000)
    """
    check_kind(kind)
    root = Path(path) if path is not None else ASSETS_DIR / kind
    if not (root / "unet" / "config.json").is_file():
        raise FileNotFoundError(
            f"No trained {kind} model at {root}; train it with `python -m demo_models.train {kind}`."
        )
    unet = AttributeUNet.from_pretrained(root / "unet", local_files_only=True)
    scheduler = DDIMScheduler.from_pretrained(root / "scheduler", local_files_only=True)
    pipe = PIPELINE_CLASSES[kind](unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    logger.info("loaded built-in %s model from %s", kind, root)
    return pipe
