"""The UI's API contract, without processes: named parameters with defaults, outputs by name,
and an example prompt already in the box."""

from __future__ import annotations

from typing import Any

from launcher.request import GenerateRequest, ModelInfo
from ui.app import OUTPUTS, build_demo

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
