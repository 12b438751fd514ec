"""The UI's API contract, without processes: named parameters with defaults, outputs by name,
and an example prompt already in the box."""

from __future__ import annotations

from typing import Any

import numpy as np

from launcher.methods import METHOD_INFO
from launcher.protocol import CompareOutput, RaceOutput, RunOutput
from launcher.quality import psnr
from launcher.request import GenerateRequest, ModelInfo
from parastep import RunStats
from ui import panel
from ui.app import OUTPUTS, RACE_OUTPUTS, build_demo

IMAGE = ModelInfo(
    name="built-in image",
    modality="image",
    default_height=32,
    default_width=32,
    fixed_size=True,
    examples=("a large red circle in the center on a blue background", "a small green square"),
)
AUDIO = ModelInfo(name="built-in audio", modality="audio", default_duration_s=1.0, examples=("a rising low sine tone",))


class StubBackend:
    def model_infos(self) -> dict[str, ModelInfo]:
        return {IMAGE.name: IMAGE, AUDIO.name: AUDIO}

    def status(self) -> dict[str, Any]:
        return {"world_size": 2, "backend": "gloo", "device": "cpu", "ranks": []}

    def submit(self, req: GenerateRequest, compare: bool = False) -> Any:
        raise NotImplementedError


def test_generate_and_compare_take_named_parameters_with_defaults_but_the_prompt() -> None:
    info = build_demo(StubBackend()).get_api_info()["named_endpoints"]
    request_fields = list(GenerateRequest.__dataclass_fields__)
    for endpoint in ("/generate", "/compare"):
        params = info[endpoint]["parameters"]
        assert [p["parameter_name"] for p in params] == ["prompt", *(f for f in request_fields if f != "prompt")]
        defaults = {p["parameter_name"]: p["parameter_default"] for p in params if p["parameter_has_default"]}
        assert set(defaults) >= set(request_fields) - {"prompt"}
        # what the model decides is left to the model: an API client of the audio model gets its own
        for name in ("steps", "guidance_scale", "height", "width", "num_frames", "duration_s"):
            assert defaults[name] is None, name
        assert defaults["model"] == IMAGE.name and defaults["method"] == "parastep"
        assert len(info[endpoint]["returns"]) == len(OUTPUTS) == 11


def test_the_prompt_box_opens_with_the_first_models_example() -> None:
    demo = build_demo(StubBackend())
    prompt = next(c for c in demo.config["components"] if c["props"].get("elem_id") == "prompt")
    assert prompt["props"]["value"] == IMAGE.examples[0]


def test_race_takes_the_request_with_a_list_of_methods_and_returns_its_outputs_by_name() -> None:
    info = build_demo(StubBackend()).get_api_info()["named_endpoints"]
    params = info["/race"]["parameters"]
    request_fields = [f for f in GenerateRequest.__dataclass_fields__ if f not in ("prompt", "method")]
    names = [p["parameter_name"] for p in params]
    assert names == ["prompt", "model", "negative_prompt", "methods", *request_fields[2:]]
    assert len(info["/race"]["returns"]) == len(RACE_OUTPUTS) == 10  # the race kept for /share is no output
    assert "/share" in info


def _run(method: str, wall_s: float, media: np.ndarray, ranks: int = 1, sent: int = 0) -> RunOutput:
    stats = [RunStats(method, rank=r, steps=4, warmup_steps=1, model_calls=4, bytes_sent=sent) for r in range(ranks)]
    return RunOutput(method, "image", media, None, wall_s, stats, ideal_speedup=1.0 if ranks == 1 else 1.6)


def test_the_race_table_has_a_row_and_a_trade_off_line_per_method_and_flags_low_quality() -> None:
    base_media = np.zeros((8, 8, 3), np.float32)
    base = _run("baseline", 2.0, base_media)
    fast = _run("parastep", 1.0, base_media + 0.001, ranks=2, sent=2048)
    bad = _run("asyncdiff", 1.6, 1 - base_media, ranks=2, sent=10**6)
    results = [_compare(base, fast), _compare(base, bad)]
    text = panel.race_markdown(RaceOutput(base, results, baseline_picked=True), METHOD_INFO)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "Method" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["Baseline", "ParaStep (2 ranks)", "AsyncDiff (2 ranks)"]
    assert "**2.00×**" in rows[1] and "**1.25×**" in rows[2] and "4.0 KiB" in rows[1]  # both ranks sent 2 KiB
    assert "⚠️" in rows[2] and "⚠️" not in rows[1]  # 0 dB against the baseline, below the floor
    for method in ("baseline", "parastep", "asyncdiff"):
        assert METHOD_INFO[method].trade in text
    hidden = panel.race_markdown(RaceOutput(base, results, baseline_picked=False), METHOD_INFO)
    assert "| Baseline |" not in hidden and "ran first as the reference" in hidden


def _compare(base: RunOutput, fast: RunOutput) -> CompareOutput:
    return CompareOutput(base, fast, base.wall_s / fast.wall_s, None, psnr(base.media, fast.media), 1.0)
