"""Launcher pieces without processes: the control channel, request validation, quality metrics."""

from __future__ import annotations

import os

import psutil
import pytest
import torch
from torch.distributed import HashStore

from launcher.backend import Backend
from launcher.control import ControlChannel
from launcher.models import LoadedModel
from launcher.protocol import PeerReport, PeerRun, Regroup, Shutdown
from launcher.request import GenerateRequest, InputError, ModelInfo
from launcher.topology import Topology
from parastep import RunStats, StepRecord

TOKEN = b"a shared secret"


def test_control_channel_delivers_in_order_reports_once_and_prunes() -> None:
    store = HashStore()
    leader, peer = ControlChannel(store, 0, TOKEN), ControlChannel(store, 1, TOKEN)
    req = GenerateRequest(model="m", prompt="p")
    leader.post(Regroup(1, (0, 1), 5.0))
    leader.post(PeerRun(1, 1, (0, 1), req, 5.0))
    assert peer.next_message() == (0, Regroup(1, (0, 1), 5.0))
    index, msg = peer.next_message()
    assert index == 1 and isinstance(msg, PeerRun) and msg.request == req
    stats = RunStats("parastep", rank=1, model_calls=3, records=(StepRecord(0, 999.0, "computed", 0.01),))
    peer.report(PeerReport(1, 1, True, stats=stats))
    peer.mark_processed(1)
    report = leader.wait_report(1, 1, timeout_s=1.0)
    assert report is not None and report.stats == stats  # typed again on arrival, read by attribute
    assert leader.wait_report(1, 1, timeout_s=0.05) is None  # read once
    assert store.check(["parastep-ctl/msg/0"])
    leader.prune([1])
    assert not store.check(["parastep-ctl/msg/0"]) and not store.check(["parastep-ctl/msg/1"])
    peer.mark_ready()
    assert leader.is_ready(1) and ":" in leader.where(1)


def test_forged_or_unsigned_control_messages_are_rejected_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    store = HashStore()
    leader, peer = ControlChannel(store, 0, TOKEN), ControlChannel(store, 1, TOKEN)
    forger = ControlChannel(store, 0, b"not the token")
    forger.post(Shutdown())  # signed with the wrong key
    store.set("parastep-ctl/msg/1", '{"type": "Shutdown"}')  # not signed at all
    store.set("parastep-ctl/msg/2", leader._seal("parastep-ctl/msg/2", '{"type": "Shutdown"}'))  # MAC of another key
    leader._next_post = 3
    leader.post(Regroup(1, (0, 1), 5.0))
    with caplog.at_level("ERROR"):
        assert [peer.next_message() for _ in range(4)] == [
            (0, None),
            (1, None),
            (2, None),
            (3, Regroup(1, (0, 1), 5.0)),
        ]
    assert caplog.text.count("rejected control message") == 3 and "MAC does not verify" in caplog.text
    key = "parastep-ctl/report/7/1"  # a forged report is no report
    forger.report(PeerReport(1, 7, True))
    assert leader.wait_report(7, 1, timeout_s=0.05) is None and not store.check([key])


def _backend(world_size: int = 2) -> Backend:
    topo = Topology(0, world_size, 0, "gloo", torch.device("cpu"), False, HashStore(), TOKEN, True)
    image = ModelInfo(name="img", modality="image", default_height=32, default_width=32, fixed_size=True)
    free = ModelInfo(name="sd", modality="image", default_height=64, default_width=64, size_multiple=8)
    video = ModelInfo(
        name="vid", modality="video", default_height=32, default_width=32, default_frames=8, fixed_size=True
    )
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
        ({"warmup_steps": -1}, "Warm-up must be between 0 and 200 (got -1)."),
        ({"method": "batchstep", "stride": 11}, "Stride (11) cannot exceed steps (10)"),
        ({"method": "batchstep", "stride": 1}, "Stride must be at least 2"),
        ({"model": "nope"}, "Unknown model 'nope': choose one of img, sd, vid, aud."),
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
    with pytest.raises(
        InputError, match="Compare runs the baseline against another method: pick ParaStep, BatchStep, AsyncDiff or CFG"
    ):
        _backend().validate(GenerateRequest(model="sd", prompt="a fox", method="baseline"), compare=True)


def test_quality_metrics() -> None:
    from launcher.quality import psnr, ssim

    a = torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(0)).numpy()
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0)
    noisy = (a + 0.01).clip(0, 1)
    assert 30 < psnr(a, noisy) < 50 and 0.5 < ssim(a, noisy) < 1.0
    wave = torch.linspace(-1, 1, 1000).sin().numpy()
    assert psnr(wave, wave * 0.9) < psnr(wave, wave * 0.99)
    with pytest.raises(ValueError, match="shape"):
        psnr(a, a[:8])


def test_the_panel_flags_a_result_far_from_its_baseline() -> None:
    import numpy as np

    from launcher.protocol import CompareOutput, RunOutput
    from ui import panel

    def run(method: str) -> RunOutput:
        return RunOutput(method, "image", np.zeros((4, 4, 3)), None, 1.0, [RunStats(method, steps=4)], 1.5)

    for psnr, flagged in ((9.99, True), (35.0, False)):
        result = CompareOutput(run("baseline"), run("batchstep"), 1.2, None, psnr, 0.5)
        assert ("below 20 dB" in panel.compare_markdown(result)) is flagged
        assert panel.compare_numbers(result)["below_quality_floor"] is flagged


def test_the_panel_says_when_other_programs_slowed_a_parallel_run() -> None:
    import numpy as np

    from launcher.protocol import CompareOutput, RunOutput
    from ui import panel

    def run(method: str, ranks: int, other_cores: float, wall_s: float = 1.0) -> RunOutput:
        stats = [RunStats(method, rank=r, steps=4) for r in range(ranks)]
        return RunOutput(method, "image", np.zeros((4, 4, 3)), None, wall_s, stats, 1.5, other_cores=other_cores)

    for method, ranks, other, wall_s, said in (
        ("parastep", 2, 0.31, 1.0, True),
        ("parastep", 2, 0.05, 1.0, False),
        ("batchstep", 1, 0.9, 1.0, False),  # one rank: it feels another program no more than the baseline
        ("parastep", 2, 0.15, 0.2, False),  # a 0.2 s run: a few 10 ms ticks make 0.15 of a core
        ("parastep", 2, 0.31, 0.2, True),
    ):
        result = CompareOutput(run("baseline", 1, 0.02), run(method, ranks, other, wall_s), 1.2, None, 30.0, 0.9)
        text = panel.compare_markdown(result)
        assert (f"Other programs kept {other:.2f} of a core busy" in text) is said, text
        assert f"| Other programs' load on this machine | 0.02 cores | {other:.2f} cores |" in text
        assert panel.compare_numbers(result)["method"]["other_cores"] == other
        assert ("Other programs kept" in panel.run_markdown(result.method)) is said


def test_other_load_counts_other_programs_and_not_this_one_or_its_children() -> None:
    import resource
    import subprocess
    import sys
    import time

    from launcher.hostload import OtherLoad

    burn = "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"

    def detached(code: str) -> psutil.Process:  # a program its shell leaves behind: not ours
        cmd = f"{sys.executable} -c '{code}' > /dev/null 2>&1 & echo $!"
        return psutil.Process(int(subprocess.run(["sh", "-c", cmd], capture_output=True, text=True).stdout))

    def children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    # Each figure is compared with what the burner itself got, as seen from a process tree it is
    # not in: the machine may be busy with something else all along (a burner then gets less).
    stranger = detached("import time; time.sleep(5)")
    start, spent = time.monotonic(), children_cpu()
    mine, strangers = OtherLoad(), OtherLoad(stranger)
    subprocess.run([sys.executable, "-c", burn], check=True)  # ours, exited and waited for by the end
    child = (children_cpu() - spent) / (time.monotonic() - start)
    assert child > 0.3 and strangers.cores() - mine.cores() > 0.8 * child

    burner = detached(burn)
    start, spent = time.monotonic(), sum(burner.cpu_times()[:2])
    mine, its = OtherLoad(), OtherLoad(burner)  # as torchrun's agent's tree is ours under torchrun
    time.sleep(1.2)
    got = (sum(burner.cpu_times()[:2]) - spent) / (time.monotonic() - start)
    assert got > 0.3 and mine.cores() - its.cores() > 0.8 * got


def test_under_torchrun_the_local_ranks_are_not_other_programs() -> None:
    assert _backend().own_tree is None  # spawned peers are this process's children
    topo = Topology(0, 2, 0, "gloo", torch.device("cpu"), True, HashStore(), TOKEN, True)
    own = Backend(topo, None, {}).own_tree
    assert own is not None and own.pid == os.getppid()  # torchrun's agent, the local ranks' parent


@pytest.mark.parametrize("field", ["steps", "guidance_scale", "seed", "duration_s"])
def test_numbers_too_large_for_a_float_are_refused_with_the_field_named(field: str) -> None:
    req = GenerateRequest(**{"model": "aud", "prompt": "a tone", field: 10**400})
    with pytest.raises(InputError, match=r"must be (between|more than) .* \(got 1000"):
        _backend().validate(req)
