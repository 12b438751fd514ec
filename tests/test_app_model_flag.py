"""`--model <local path>`: a real diffusers pipeline (a tiny StableDiffusionPipeline saved to
disk, with a tokenizer) loaded on every rank with local_files_only, served like a built-in."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from launcher.testing import AppProcess
from tests.tiny_pipelines import save_tiny_sd

pytestmark = pytest.mark.slow  # starts the app or the benchmark as subprocesses


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    path = save_tiny_sd(tmp_path_factory.mktemp("models"))
    args = [
        "--ranks",
        "2",
        "--threads-per-rank",
        "1",
        "--builtins",
        "none",
        "--model",
        str(path),
        "--peer-timeout",
        str(PEER_TIMEOUT_S),
    ]
    with AppProcess(args) as app:
        yield Client(app.url, verbose=False), str(path)


PEER_TIMEOUT_S = 8


def request(model: str, method: str, height: int = 32) -> dict:
    return dict(
        prompt="a red fox",
        model=model,
        negative_prompt="blurry",
        method=method,
        warmup_steps=1,
        steps=4,
        guidance_scale=5.0,
        seed=3,
        height=height,
        width=32,
    )


def test_local_diffusers_pipeline_with_parastep_and_size_check(served: tuple[Client, str]) -> None:
    client, model = served
    # Idle for well over the peers' collective time-out first: idle peers wait on the store,
    # never in a collective, so nothing can time out.
    time.sleep(2.5 * PEER_TIMEOUT_S)
    out = client.predict(**request(model, "parastep"), api_name="/compare")
    numbers = out[9]
    assert Path(out[1]).stat().st_size > 0 and Path(out[4]).stat().st_size > 0
    assert numbers["method"]["ranks"] == 2 and numbers["method"]["bytes_communicated"] > 0
    assert numbers["baseline"]["model_calls_per_rank"] == [4]
    assert max(numbers["method"]["model_calls_per_rank"]) < 4
    with pytest.raises(AppError, match=r"Height 33 is not a multiple of 2, which .* needs: use 32 or 34"):
        client.predict(**request(model, "parastep", height=33), api_name="/generate")
