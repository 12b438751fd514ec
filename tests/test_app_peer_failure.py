"""A peer that dies or stops answering: a clear error naming the rank in bounded time, and
the app keeps serving (baseline, BatchStep, and ParaStep on the ranks that are left)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from launcher.testing import AppProcess

pytestmark = pytest.mark.slow  # starts the app or the benchmark as subprocesses

PEER_TIMEOUT_S = 20
APP_ARGS = ["--ranks", "3", "--threads-per-rank", "1", "--builtins", "image", "--peer-timeout", str(PEER_TIMEOUT_S)]
PROMPT = "a large red circle in the center on a blue background"


@pytest.fixture(scope="module")
def app():
    with AppProcess(APP_ARGS) as app:
        yield app


def request(method: str = "parastep", steps: int = 6) -> dict:
    return dict(
        prompt=PROMPT, model="built-in image", method=method, warmup_steps=2, steps=steps, guidance_scale=3.0, seed=1
    )


def status(client: Client) -> dict:
    value = client.predict(api_name="/status")
    return json.loads(value) if isinstance(value, str) else value


def wait_ranks_ok(client: Client, ranks: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = {r["rank"]: r["state"] for r in status(client)["ranks"]}
        if all(states[r] == "ok" for r in ranks):
            return
        time.sleep(1)
    raise AssertionError(f"ranks {ranks} not ok after {timeout_s} s: {states}")


def test_peer_killed_mid_run_then_stopped(app: AppProcess) -> None:
    client = Client(app.url, verbose=False)
    assert status(client)["world_size"] == 3
    rank1, rank2 = app.peer_pids()  # spawned in rank order

    # 1. Rank 2 is killed in the middle of a ParaStep run: once it streams its first preview.
    job = client.submit(**request(steps=200), api_name="/generate")
    deadline = time.monotonic() + 60
    while not job.outputs() and not job.done() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.outputs() and not job.done(), "the run must be in progress when rank 2 is killed"
    os.kill(rank2, signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(AppError) as err:
        job.result(timeout=90)
    elapsed = time.monotonic() - killed
    message = str(err.value)
    print(f"\nkilled mid-run -> error after {elapsed:.1f} s: {message}")
    assert elapsed < 60 and "rank 2" in message, message

    # 2. The UI is still up; ParaStep goes on with the ranks that are left.
    wait_ranks_ok(client, [1], timeout_s=PEER_TIMEOUT_S + 15)
    numbers = client.predict(**request(), api_name="/generate")[9]
    assert numbers["ranks"] == 2 and "rank 2 was killed by SIGKILL" in numbers["note"], numbers

    # 3. Rank 1 stops answering (SIGSTOP) while idle; the next ParaStep request fails in bounded time.
    os.kill(rank1, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(AppError) as err:
            client.predict(**request(), api_name="/generate")
        elapsed = time.monotonic() - started
        message = str(err.value)
        print(f"stopped peer -> error after {elapsed:.1f} s: {message}")
        assert elapsed < 60 and "rank 1" in message, message

        # 4. Baseline and BatchStep on rank 0 keep working; ParaStep says why it cannot run.
        for method in ("baseline", "batchstep"):
            numbers = client.predict(**request(method), api_name="/generate")[9]
            assert numbers["method"] == method and numbers["wall_s"] > 0
        started = time.monotonic()
        with pytest.raises(AppError, match="no peer rank to run with") as err:
            client.predict(**request(), api_name="/generate")
        assert time.monotonic() - started < 30
        assert "rank 1" in str(err.value) and "rank 2" in str(err.value)
    finally:
        os.kill(rank1, signal.SIGCONT)
