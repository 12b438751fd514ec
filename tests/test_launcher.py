"""Launcher pieces without processes: the control channel and request validation."""

from __future__ import annotations

import pytest
import torch
from torch.distributed import HashStore

from launcher.backend import Backend
from launcher.control import ControlChannel
from launcher.models import LoadedModel
from launcher.protocol import GenerateRequest, InputError, ModelInfo, PeerReport, PeerRun, Regroup
from launcher.topology import Topology


def test_control_channel_delivers_in_order_reports_once_and_prunes() -> None:
    store = HashStore()
    leader, peer = ControlChannel(store, 0, 2), ControlChannel(store, 1, 2)
    req = GenerateRequest(model="m", prompt="p")
    leader.post(Regroup(1, (0, 1), 5.0))
    leader.post(PeerRun(1, 1, (0, 1), req, 5.0))
    assert peer.next_message() == (0, Regroup(1, (0, 1), 5.0))
    index, msg = peer.next_message()
    assert index == 1 and msg.request == req
    peer.report(PeerReport(1, 1, True, stats={"model_calls": 3}))
    peer.mark_processed(1)
    assert leader.try_report(1, 1).stats == {"model_calls": 3}
    assert leader.try_report(1, 1) is None  # read once
    leader.prune([1])
    assert not store.check(["parastep-ctl/msg/0"]) and not store.check(["parastep-ctl/msg/1"])
    peer.mark_ready()
    assert leader.is_ready(1) and ":" in leader.where(1)


def _backend(world_size: int = 2) -> Backend:
    topo = Topology(0, world_size, 0, "gloo", torch.device("cpu"), torchrun=False)
    image = ModelInfo(name="img", modality="image", default_height=32, default_width=32, fixed_size=True)
    free = ModelInfo(name="sd", modality="image", default_height=64, default_width=64, size_multiple=8)
    video = ModelInfo(name="vid", modality="video", default_height=32, default_width=32, default_frames=8,
                      fixed_size=True)  # fmt: skip
    audio = ModelInfo(name="aud", modality="audio", default_duration_s=1.0, fixed_size=True)
    models = {m.name: LoadedModel(None, m) for m in (image, free, video, audio)}
    return Backend(topo, None, models)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompt": ""}, "The prompt is empty"),
        ({"prompt": "x" * 401}, "The prompt is 401 characters long: shorten it to at most 400."),
        ({"steps": 0}, "Steps must be between 1 and 200 (got 0)."),
        ({"steps": 2.5}, "Steps must be a whole number"),
        ({"warmup_steps": 10}, "Warm-up (10) must be smaller than steps (10)"),
        ({"warmup_steps": -1}, "Warm-up must be 0 or more"),
        ({"method": "batchstep", "stride": 11}, "Stride (11) cannot exceed steps (10)"),
        ({"method": "batchstep", "stride": 1}, "Stride must be at least 2"),
        ({"model": "nope"}, "Unknown model 'nope'. Choose one of: img, sd, vid, aud."),
        ({"model": "sd", "height": 60}, "Height 60 is not a multiple of 8, which sd needs: use 56 or 64."),
        ({"height": 64}, "img makes 32×32 only"),
        ({"model": "vid", "num_frames": 9}, "vid makes 8 frames only"),
        ({"model": "aud", "duration_s": 2.0}, "aud makes 1 s clips only"),
        ({"guidance_scale": float("nan")}, "Guidance must be a finite number"),
        ({"seed": 2**32}, "Seed must be between 0 and 4294967295"),
    ],
)
def test_bad_requests_say_what_to_change(change: dict, message: str) -> None:
    req = GenerateRequest(**{"model": "img", "prompt": "a red circle", "steps": 10, "warmup_steps": 2, **change})
    with pytest.raises(InputError) as err:
        _backend().validate(req)
    assert message in str(err.value)


def test_valid_request_is_normalised_and_parastep_needs_two_ranks() -> None:
    req = GenerateRequest(model="sd", prompt="  a fox ", method="ParaStep", steps=10.0, seed=3.0)
    ok = _backend().validate(req)
    assert (ok.prompt, ok.method, ok.steps, ok.height, ok.width) == ("a fox", "parastep", 10, 64, 64)
    with pytest.raises(InputError, match="ParaStep needs at least 2 ranks"):
        _backend(world_size=1).validate(req)
    with pytest.raises(InputError, match="Compare runs the baseline against ParaStep or BatchStep"):
        _backend().validate(GenerateRequest(model="sd", prompt="a fox", method="baseline"), compare=True)
