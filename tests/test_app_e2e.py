"""End to end through gradio_client: the launched app with 2 CPU ranks, every modality.

One app for the module (launched once, ~1 minute on 2 cores); few steps, small sizes.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from launcher.methods import METHOD_INFO
from launcher.testing import shared_app

pytestmark = pytest.mark.slow  # starts the app or the benchmark as subprocesses

APP_ARGS = ["--ranks", "2", "--threads-per-rank", "1"]
STEPS, WARMUP = 6, 2
PROMPTS = {
    "image": "a large red circle in the center on a blue background",
    "video": "a yellow square moving left on a black background",
    "audio": "a rising low sine tone",
}
# Output tuple of /generate and /compare: preview, left (image, video, audio), right (image, video,
# audio), latency markdown, timeline plot, numbers (dict), status line.
MEDIA_INDEX = {"image": 0, "video": 1, "audio": 2}


@pytest.fixture(scope="module")
def client() -> Client:
    app = shared_app(APP_ARGS)
    return Client(app.url, verbose=False)


def run(client: Client, endpoint: str, kind: str, **overrides: object) -> tuple:
    """One call by name: the prompt, the model, and only what the test changes."""
    args = {
        "prompt": PROMPTS[kind],
        "model": f"built-in {kind}",
        "warmup_steps": WARMUP,
        "steps": STEPS,
        "guidance_scale": 3.0,
        "seed": 7,
    }
    args.update(overrides)
    return client.predict(**args, api_name=endpoint)


def media_path(value: object) -> str:
    if isinstance(value, dict):  # gr.Video gives {"video": path, "subtitles": None}
        value = value.get("video") or value.get("path")
    assert isinstance(value, str) and os.path.getsize(value) > 0, value
    return value


def numbers(result: tuple) -> dict:
    value = result[9]
    return json.loads(value) if isinstance(value, str) else value


@pytest.mark.parametrize("kind", ["image", "video", "audio"])
def test_generate_parastep(client: Client, kind: str) -> None:
    result = run(client, "/generate", kind)
    path = media_path(result[1 + MEDIA_INDEX[kind]])
    assert path.endswith({"image": ".png", "video": ".mp4", "audio": ".wav"}[kind])
    assert all(result[4 + i] is None for i in range(3)), "generate fills only the left side"
    assert result[0] is not None, "generate streams previews"
    stats = numbers(result)
    calls = stats["model_calls_per_rank"]
    assert stats["method"] == "parastep" and stats["ranks"] == 2 and len(calls) == 2
    assert max(calls) < STEPS * 2, calls  # reuse happened: fewer calls than a baseline on each rank
    assert stats["bytes_communicated"] > 0
    assert stats["ideal_speedup"] == pytest.approx(STEPS / (WARMUP + (STEPS - WARMUP + 1) // 2))
    assert "Wall time" in result[7]


@pytest.mark.parametrize("kind", ["image", "video", "audio"])
def test_compare(client: Client, kind: str) -> None:
    method = "batchstep" if kind == "audio" else "parastep"
    result = run(client, "/compare", kind, method=method)
    media_path(result[1 + MEDIA_INDEX[kind]])
    media_path(result[4 + MEDIA_INDEX[kind]])
    assert result[0] is None, "Compare measures: no previews streamed during its timed runs"
    stats = numbers(result)
    assert stats["baseline"]["method"] == "baseline" and stats["method"]["method"] == method
    assert stats["baseline"]["wall_s"] > 0 and stats["method"]["wall_s"] > 0
    assert stats["speedup"] == pytest.approx(stats["baseline"]["wall_s"] / stats["method"]["wall_s"], rel=0.02)
    assert stats["ideal_speedup"] > 1
    for side in ("baseline", "method"):  # denoising time excludes decoding, so it is the smaller
        assert 0 < stats[side]["denoise_s"] <= stats[side]["wall_s"]
    assert stats["speedup_denoise"] > 0
    psnr = stats["psnr_db"]
    assert psnr == "inf" or psnr > 5, psnr
    assert -1 <= stats["ssim"] <= 1
    panel = result[7]
    # the panel's figures are the run's own numbers, formatted
    cells = {line.split("|")[1].strip(): line.split("|")[2:4] for line in panel.splitlines() if line.startswith("| ")}
    walls = [float(c.strip().rstrip(" s")) for c in cells["Wall time (whole call)"]]
    assert walls == [round(stats[side]["wall_s"], 2) for side in ("baseline", "method")]
    assert cells["Speedup"][1].strip() == f"**{stats['speedup']:.2f}×**"
    assert cells["Ideal speedup for these settings"][1].strip() == f"{stats['ideal_speedup']:.2f}×"
    for side, cell in zip(("baseline", "method"), cells["Model calls per rank"]):
        assert cell.strip() == " · ".join(str(c) for c in stats[side]["model_calls_per_rank"])
    for side, cell in zip(("baseline", "method"), cells["Other programs' load on this machine"]):
        shown, cores = cell.strip().removesuffix(" cores"), stats[side]["other_cores"]  # numbers keep 3 decimals
        assert cores >= 0 and len(shown.split(".")[1]) == 2 and abs(float(shown) - cores) <= 0.0051
    for row in (
        "Wall time",
        "Speedup",
        "Denoising time",
        "Denoising speedup",
        "Ideal speedup",
        "Model calls per rank",
        "Bytes communicated",
        "PSNR",
        "SSIM",
    ):
        assert row in panel
    print(f"\n{kind}: {json.dumps(stats)}")


def test_image_output_is_upscaled_crisply(client: Client) -> None:
    from PIL import Image

    result = run(client, "/generate", "image", method="baseline")
    picture = np.asarray(Image.open(media_path(result[1])))
    assert min(picture.shape[:2]) >= 256
    # nearest-neighbour: every pixel is repeated, so neighbours inside a block are equal
    assert (picture[0::2] == picture[1::2]).all()


BAD_INPUTS = [
    ({"prompt": "   "}, "prompt is empty"),
    ({"prompt": "red " * 200}, "at most 400"),
    ({"steps": 0}, "Steps must be between 1 and 200"),
    ({"steps": 500}, "Steps must be between 1 and 200"),
    ({"warmup_steps": 6}, "Warm-up (6) must be smaller than steps (6)"),
    ({"warmup_steps": 0}, "ParaStep needs at least 1 warm-up step"),
    ({"method": "batchstep", "stride": 9}, "Stride (9) cannot exceed steps (6)"),
    ({"model": "no-such-model"}, "Unknown model 'no-such-model': choose one of built-in image, built-in video"),
    ({"height": 30}, "makes 32×32 only: set height to 32 and width to 32 (got 30×32)"),
    ({"guidance_scale": -1}, "Guidance must be between"),
    ({"method": "warp"}, "Unknown method 'warp': choose one of baseline, parastep, batchstep"),
    ({"seed": -3}, "Seed must be between 0 and"),
]


def test_bad_inputs_say_what_to_change_and_ranks_stay_in_step(client: Client) -> None:
    for overrides, expected in BAD_INPUTS:
        with pytest.raises(AppError) as err:
            run(client, "/generate", "image", **overrides)
        assert expected in str(err.value), (overrides, str(err.value))
    with pytest.raises(AppError, match="Compare runs the baseline against"):
        run(client, "/compare", "image", method="baseline")
    # ...and ParaStep still runs across both ranks afterwards.
    stats = numbers(run(client, "/generate", "image"))
    assert stats["ranks"] == 2 and not stats["note"]


def test_status_lists_every_rank(client: Client) -> None:
    status = client.predict(api_name="/status")
    status = json.loads(status) if isinstance(status, str) else status
    assert status["world_size"] == 2
    assert [r["state"] for r in status["ranks"]] == ["ok", "ok"]


def test_concurrent_users_queue_and_a_disconnect_leaves_ranks_in_step(client: Client) -> None:
    def args(seed: int) -> dict:
        return {
            "prompt": PROMPTS["image"],
            "model": "built-in image",
            "warmup_steps": WARMUP,
            "steps": STEPS,
            "guidance_scale": 3.0,
            "seed": seed,
        }

    abandoned = client.submit(**args(1), api_name="/compare")
    jobs = [client.submit(**args(seed), api_name="/generate") for seed in (2, 3)]
    abandoned.cancel()  # the browser goes away mid-request
    results = [job.result(timeout=180) for job in jobs]
    assert all(numbers(r)["ranks"] == 2 for r in results)
    stats = numbers(run(client, "/generate", "image"))
    assert stats["ranks"] == 2 and not stats["note"]


def test_race_runs_every_method_on_the_same_seed_against_the_baseline(client: Client) -> None:
    methods = ["baseline", "parastep", "batchstep", "asyncdiff", "cfg"]
    result = run(client, "/race", "image", methods=methods)
    gallery, table, race = result[0], result[6], result[8]
    race = json.loads(race) if isinstance(race, str) else race
    assert len(gallery) == 5
    captions = [item.get("caption", "") for item in gallery]
    for label in ("Baseline", "ParaStep (2 ranks)", "BatchStep", "AsyncDiff (2 ranks)", "CFG-parallel (2 ranks)"):
        assert any(c.startswith(label) for c in captions), (label, captions)
    got = {m["method"]["method"]: m for m in race["methods"]}
    assert list(got) == methods[1:]
    for method, m in got.items():
        calls = m["method"]["model_calls_per_rank"]
        assert m["speedup"] == pytest.approx(race["baseline"]["wall_s"] / m["method"]["wall_s"], rel=0.02)
        assert len(calls) == (1 if method == "batchstep" else 2), (method, calls)
        assert (m["method"]["bytes_communicated"] > 0) == (method != "batchstep"), method
    assert got["cfg"]["psnr_db"] == "inf" or got["cfg"]["psnr_db"] > 40  # exact up to float rounding
    assert got["cfg"]["method"]["model_calls_per_rank"] == [STEPS, STEPS]
    for method in methods:
        assert METHOD_INFO[method].trade in table
    shared = client.predict(api_name="/share")  # this session's last race, as one PNG grid
    from PIL import Image

    grid = Image.open(media_path(shared))
    assert grid.format == "PNG" and grid.width >= 5 * 192, grid.size


def test_race_refuses_a_method_that_cannot_run_naming_it(client: Client) -> None:
    with pytest.raises(AppError, match="CFG-parallel: CFG-parallel splits the guidance batch"):
        run(client, "/race", "image", methods=["parastep", "cfg"], guidance_scale=1.0)
    with pytest.raises(AppError, match="Unknown method"):
        run(client, "/race", "image", methods=["parastep", "fast"])


def test_sparsetem_on_the_video_model_alone_and_with_parastep(client: Client) -> None:
    for method in ("baseline", "parastep"):
        result = run(client, "/compare", "video", method=method, sparsetem=True)
        stats = numbers(result)
        st = stats["method"]["sparsetem"]
        assert st["parts"] == ["denoiser"] and st["layers"], st
        assert 0 < st["skipped_work"] < 1, st
        assert stats["psnr_db"] == "inf" or stats["psnr_db"] > 20, stats["psnr_db"]  # against dense
        print(
            f"\nSparseTem with {method}: skipped {st['skipped_work']:.1%}, {st['seconds']:.3f} s, "
            f"PSNR {stats['psnr_db']}"
        )
        assert stats["baseline"]["sparsetem"] is None  # compared against the dense baseline
        assert stats["method"]["ranks"] == (2 if method == "parastep" else 1)
        assert "SparseTem" in result[7] and "Skipped" in result[7]
    with pytest.raises(AppError, match="no frame-by-frame part"):
        run(client, "/compare", "image", method="parastep", sparsetem=True)
