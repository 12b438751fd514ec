"""Rank 0's backend: the request queue and the one coordinator thread.

The UI only calls :meth:`Backend.submit` and reads the job's events. The coordinator thread
is the only thread that touches torch.distributed or runs a pipeline, so a browser that goes
away never interrupts a collective half-way: its job simply runs to the end and the result is
dropped. Requests are validated by :mod:`launcher.request` before they are queued; the
ParaStep group and the peers' health are :mod:`launcher.group`'s.

Example::

    job = backend.submit(GenerateRequest(model="built-in image", prompt="a red fox"), compare=True)
    for event in job.stream():
        ...  # Progress events, then one CompareOutput
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import parastep
from launcher import quality
from launcher.control import ControlChannel
from launcher.group import PeerGroup
from launcher.models import LoadedModel, call_pipeline, denoiser_of, extract_media, preview_of
from launcher.protocol import CompareOutput, PeerRun, Progress, RunError, RunOutput, Shutdown
from launcher.request import METHOD_LABELS, GenerateRequest, InputError, ModelInfo
from launcher.topology import Topology

log = logging.getLogger(__name__)

MAX_QUEUE = 32
PROGRESS_EVERY_S = 0.1
PREVIEW_EVERY_S = 0.3


class Job:
    """One queued request; the UI iterates :meth:`stream`."""

    def __init__(self, request: GenerateRequest, compare: bool, warnings: list[str] | None = None) -> None:
        self.request = request
        self.compare = compare
        self.warnings = warnings or []  # things the user may want to know (e.g. ignored prompt words)
        self.events: queue.Queue[Any] = queue.Queue()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """The client went away: skip the job if not started; if running, drop its result."""
        self.cancelled.set()

    def stream(self) -> Iterator[Progress | RunOutput | CompareOutput]:
        while True:
            event = self.events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, (RunOutput, CompareOutput)):
                return


class Backend:
    def __init__(
        self,
        topo: Topology,
        channel: ControlChannel | None,
        models: dict[str, LoadedModel],
        *,
        peer_timeout_s: float = 30.0,
        heartbeat_stale_s: float = 10.0,
    ) -> None:
        self.topo = topo
        self.channel = channel
        self.models = models
        self.peer_timeout_s = peer_timeout_s
        self.group = PeerGroup(topo, channel, peer_timeout_s, heartbeat_stale_s) if channel is not None else None
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=MAX_QUEUE)
        self._run_id = 0
        self._busy = False
        self._stop = threading.Event()
        self._coordinator = threading.Thread(target=self._serve, name="parastep-coordinator", daemon=True)

    # ---- lifecycle ----------------------------------------------------------------
    def start(self, ready_timeout_s: float = 900.0) -> None:
        """Wait for every peer to load its models, build the first ParaStep group, start serving."""
        if self.group is not None:
            self.group.wait_ready(ready_timeout_s)
        self._coordinator.start()
        if self.group is not None and self.group.peers:
            self._jobs.put(None)  # wakes the coordinator to build the group before the first user

    def close(self) -> None:
        self._stop.set()
        try:
            self._jobs.put_nowait(None)
        except queue.Full:
            pass
        if self.group is not None:
            self.group.stop()
            if self.group.peers:
                self.group.channel.post(Shutdown())
        self._coordinator.join(timeout=5)
        self.topo.stop_children()

    # ---- what the UI reads --------------------------------------------------------
    def model_infos(self) -> dict[str, ModelInfo]:
        return {name: m.info for name, m in self.models.items()}

    def status(self) -> dict[str, Any]:
        ranks: list[dict[str, str | int]] = [
            {"rank": 0, "where": f"{socket.gethostname()}:{os.getpid()}", "state": "busy" if self._busy else "ok"}
        ]
        if self.group is not None:
            ranks += self.group.rank_states()
        group = self.group
        return {
            "world_generation": group.gen if group else 0,
            "events": group.events if group else [],
            "world_size": self.topo.world_size,
            "backend": self.topo.backend,
            "device": str(self.topo.device),
            "parastep_world": list(group.members) if group else [],
            "queued": self._jobs.qsize(),
            "ranks": ranks,
        }

    # ---- submission ---------------------------------------------------------------
    def validate(self, req: GenerateRequest, compare: bool = False) -> GenerateRequest:
        """``req`` checked against the loaded models and this app's ranks (raises InputError)."""
        return req.validated(self.model_infos(), self.topo.world_size, compare)

    def submit(self, req: GenerateRequest, compare: bool = False) -> Job:
        """Validate (raises InputError) and queue; the job's events say when it starts."""
        req = self.validate(req, compare)
        job = Job(req, compare, self.models[req.model].prompt_warnings(req.prompt) + req.quality_warnings())
        ahead = self._jobs.qsize() + (1 if self._busy else 0)
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise RunError(f"{MAX_QUEUE} requests are already waiting: try again in a minute.") from None
        if ahead:
            job.events.put(Progress(f"waiting for {ahead} request(s) ahead", 0, req.steps or 0))
        return job

    # ---- the coordinator thread -----------------------------------------------------
    def _serve(self) -> None:
        self.topo.bind_device()  # CUDA's current device is per thread
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=1.0)
            except queue.Empty:
                job = None
            if job is None:
                self._keep_world()
                continue
            if job.cancelled.is_set():
                continue
            self._busy = True
            try:
                job.events.put(self._run_job(job))
            except (InputError, RunError) as exc:
                job.events.put(exc)
            except Exception as exc:  # any failure goes back to the user
                log.exception("request failed")
                job.events.put(RunError(f"{type(exc).__name__}: {exc}"))
            finally:
                self._busy = False

    def _keep_world(self) -> None:
        """Between requests: respawn dead peers and rebuild the world when its members changed,
        so that ParaStep is ready before the next request needs it."""
        group = self.group
        if group is None or not group.peers or self._stop.is_set():
            return
        group.heal()
        if group.members and (group.dirty or tuple([0, *group.healthy()]) != group.members):
            try:
                group.ensure()
            except RunError as exc:
                log.info("%s", exc)
        group.rest()

    def _run_job(self, job: Job) -> RunOutput | CompareOutput:
        req = job.request
        if req.method == "parastep" and self.group is not None:
            self.group.ensure()  # a request that needs a missing peer fails before any work
        if not job.compare:
            return self._run(job, req.method)
        base = self._run(job, "baseline")
        fast = self._run(job, req.method)
        return CompareOutput(
            baseline=base,
            method=fast,
            speedup=base.wall_s / fast.wall_s if fast.wall_s > 0 else float("nan"),
            speedup_denoise=base.denoise_s / fast.denoise_s if base.denoise_s and fast.denoise_s else None,
            psnr=quality.psnr(base.media, fast.media),
            ssim=quality.ssim(base.media, fast.media),
        )

    def _run(self, job: Job, method: str) -> RunOutput:
        req = job.request
        steps = req.steps or 0
        model = self.models[req.model]
        label = METHOD_LABELS[method]
        last = {"progress": 0.0, "preview": 0.0}

        def on_step(step: int, latents: Any) -> None:
            # Throttled: every event costs the UI thread (and the GIL this process shares with
            # it) some work, which would otherwise inflate the wall times being measured.
            if job.cancelled.is_set():
                return  # nobody is watching; the run itself goes on so that no rank is left waiting
            done, now = step + 1, time.monotonic()
            final = done == steps
            if not final and now - last["progress"] < PROGRESS_EVERY_S:
                return
            want_preview = final or now - last["preview"] >= PREVIEW_EVERY_S
            last["progress"] = now
            if want_preview:
                last["preview"] = now
            job.events.put(Progress(label, done, steps, preview_of(model, latents) if want_preview else None))

        job.events.put(Progress(label, 0, steps))
        timing: dict[str, float] = {}
        note = ""
        if method == "baseline":
            out, seconds, stats = self._run_baseline(model, req, on_step, timing)
            ideal = 1.0
        elif method == "batchstep":
            config = parastep.BatchStepConfig(stride=req.stride, warmup_steps=req.warmup_steps)
            out, seconds, stats = self._run_local(model, req, config, on_step, timing)
            ideal = parastep.ideal_speedup(steps, req.warmup_steps, req.stride)
        else:
            out, seconds, stats, note = self._run_parastep(model, req, on_step, timing)
            ideal = parastep.ideal_speedup(steps, req.warmup_steps, len(stats))
        info = model.info
        return RunOutput(
            method,
            info.modality,
            extract_media(out, info.modality),
            info.sample_rate,
            seconds,
            stats,
            ideal,
            note,
            fps=info.fps,
            denoise_s=timing.get("denoise_s"),
        )

    def _run_local(
        self, model: LoadedModel, req: GenerateRequest, config: Any, on_step: Callable, timing: dict[str, float]
    ) -> tuple[Any, float, list[parastep.RunStats]]:
        handle = parastep.apply(model.pipe, config)
        try:
            out, seconds = call_pipeline(model, req, latent_only=False, on_step=on_step, timing=timing)
            return out, seconds, [handle.last_stats]
        finally:
            handle.remove()

    def _run_baseline(
        self, model: LoadedModel, req: GenerateRequest, on_step: Callable, timing: dict[str, float]
    ) -> tuple[Any, float, list[parastep.RunStats]]:
        calls = 0

        def count(*_: Any) -> None:
            nonlocal calls
            calls += 1

        denoiser = denoiser_of(model.pipe)
        hook = denoiser.register_forward_pre_hook(count) if denoiser is not None else None
        try:
            out, seconds = call_pipeline(model, req, latent_only=False, on_step=on_step, timing=timing)
        finally:
            if hook is not None:
                hook.remove()
        steps = req.steps or 0
        stats = parastep.RunStats("baseline", steps=steps, warmup_steps=steps, model_calls=calls, wall_s=seconds)
        return out, seconds, [stats]

    def _run_parastep(
        self, model: LoadedModel, req: GenerateRequest, on_step: Callable, timing: dict[str, float]
    ) -> tuple[Any, float, list[parastep.RunStats], str]:
        group = self.group
        if group is None:
            raise RunError("ParaStep needs peer ranks and this app runs none.")
        members, excluded = group.ensure()
        run_id = self._run_id = self._run_id + 1
        group.channel.post(PeerRun(run_id, group.gen, members, req, self.peer_timeout_s))
        handle = None
        try:
            config = parastep.ParaStepConfig(warmup_steps=req.warmup_steps, timeout_s=self.peer_timeout_s)
            handle = parastep.apply(model.pipe, config)  # over the generation's world
            out, seconds = call_pipeline(model, req, latent_only=False, on_step=on_step, timing=timing)
            stats0 = handle.last_stats
        except Exception as exc:
            message = group.explain(exc, members)
            group.abandon(run_id, members)
            raise RunError(message) from exc
        finally:
            if handle is not None:
                handle.remove()
        peer_stats, failed = group.collect_reports(run_id, members)
        excluded += failed
        note = ""
        if excluded:
            note = f"ParaStep ran on {len(members)} of {self.topo.world_size} ranks: " + "; ".join(excluded) + "."
        return out, seconds, [stats0, *peer_stats], note
