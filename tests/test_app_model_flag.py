"""`--model <local path>`: a real diffusers pipeline (a tiny StableDiffusionPipeline saved to
disk, with a tokenizer) loaded on every rank with local_files_only, served like a built-in."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from launcher.testing import AppProcess


def save_tiny_sd(root: Path) -> Path:
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from tests.tiny_pipelines import build

    pipe, _ = build("sd", seed=0)
    chars = list(bytes_to_unicode().values())  # byte-level BPE with no merges: one token per byte
    vocab = {tok: i for i, tok in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"])}
    pipe.register_modules(tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16))
    pipe.save_pretrained(root / "tiny-sd")
    return root / "tiny-sd"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    path = save_tiny_sd(tmp_path_factory.mktemp("models"))
    args = ["--ranks", "2", "--threads-per-rank", "1", "--builtins", "none", "--model", str(path),
            "--peer-timeout", str(PEER_TIMEOUT_S)]  # fmt: skip
    with AppProcess(args) as app:
        yield Client(app.url, verbose=False), str(path)


PEER_TIMEOUT_S = 8


def request(model: str, method: str, **size: int) -> tuple:
    height, width = size.get("height", 32), size.get("width", 32)
    return (model, "a red fox", "blurry", method, 1, 2, 4, 5.0, 3, height, width, None, None)


def test_local_diffusers_pipeline_with_parastep_and_size_check(served: tuple[Client, str]) -> None:
    client, model = served
    # Idle for well over the peers' collective time-out first: idle peers wait on the store,
    # never in a collective, so nothing can time out.
    time.sleep(2.5 * PEER_TIMEOUT_S)
    out = client.predict(*request(model, "parastep"), api_name="/compare")
    numbers = out[9]
    assert Path(out[1]).stat().st_size > 0 and Path(out[4]).stat().st_size > 0
    assert numbers["method"]["ranks"] == 2 and numbers["method"]["bytes_communicated"] > 0
    assert numbers["baseline"]["model_calls_per_rank"] == [4]
    assert max(numbers["method"]["model_calls_per_rank"]) < 4
    with pytest.raises(AppError, match=r"Height 33 is not a multiple of 2, which .* needs: use 32 or 34"):
        client.predict(*request(model, "parastep", height=33), api_name="/generate")
