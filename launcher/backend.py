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
from dataclasses import replace
from typing import Any

import psutil

import parastep
from launcher import quality
from launcher.control import ControlChannel
from launcher.group import PeerGroup, run_group
from launcher.hostload import OtherLoad
from launcher.methods import METHOD_INFO, configs, ideal_speedup, run_ranks
from launcher.models import LoadedModel, call_pipeline, denoiser_of, extract_media, preview_of
from launcher.protocol import CompareOutput, PeerRun, Progress, RaceOutput, RunError, RunOutput, Shutdown
from launcher.request import METHOD_LABELS, METHODS, GenerateRequest, InputError, ModelInfo
from launcher.topology import Topology

log = logging.getLogger(__name__)

MAX_QUEUE = 32
PROGRESS_EVERY_S = 0.1
PREVIEW_EVERY_S = 0.3


class Job:
    """One queued request; the UI iterates :meth:`stream`."""

    def __init__(
        self,
        request: GenerateRequest,
        compare: bool,
        warnings: list[str] | None = None,
        race: tuple[str, ...] = (),
    ) -> None:
        self.request = request
        self.compare = compare
        self.race = race  # the methods of a race, in order (empty: not a race)
        self.warnings = warnings or []  # things the user may want to know (e.g. ignored prompt words)
        self.events: queue.Queue[Any] = queue.Queue()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """The client went away: skip the job if not started; if running, drop its result."""
        self.cancelled.set()

    def stream(self) -> Iterator[Progress | RunOutput | CompareOutput | RaceOutput]:
        while True:
            event = self.events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, (RunOutput, CompareOutput, RaceOutput)):
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
        preview_every_s: float = PREVIEW_EVERY_S,
    ) -> None:
        self.topo = topo
        # what the panel does not count as other programs: our process tree (torchrun's agent's)
        self.own_tree = psutil.Process().parent() if topo.torchrun else None
        self.preview_every_s = preview_every_s  # 0: no previews
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
        return self._queue(Job(req, compare, self.models[req.model].prompt_warnings(req.prompt)))

    def submit_race(self, req: GenerateRequest, methods: Any) -> Job:
        """Queue a race of ``methods`` (names from :data:`~launcher.request.METHODS`) on one request;
        every method's rules are checked first (raises InputError naming the method)."""
        if isinstance(methods, str) or not isinstance(methods, (list, tuple)) or not methods:
            raise InputError(f"Methods must be a list of some of {', '.join(METHODS)} (got {methods!r}).")
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise InputError(f"Unknown method(s) {unknown!r}: choose from {', '.join(METHODS)}.")
        picked = tuple(m for m in METHODS if m in methods)  # one order for every race: baseline first
        warnings: list[str] = []
        checked = None
        for method in picked:
            try:
                checked = self.validate(replace(req, method=method))
            except InputError as exc:
                raise InputError(f"{METHOD_LABELS[method]}: {exc}") from None
        assert checked is not None
        if "baseline" not in picked:
            warnings.append("The baseline ran too, first: speedup and PSNR/SSIM are measured against it.")
        warnings = self.models[checked.model].prompt_warnings(checked.prompt) + warnings
        return self._queue(Job(checked, True, warnings, race=picked))

    def _queue(self, job: Job) -> Job:
        req = job.request
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

    def _run_job(self, job: Job) -> RunOutput | CompareOutput | RaceOutput:
        req = job.request
        methods = job.race or (req.method,)
        if self.group is not None and any(METHOD_INFO[m].distributed for m in methods):
            self.group.ensure()  # a request that needs a missing peer fails before any work
        if not job.compare:
            return self._run(job, req.method, req.sparsetem)
        base = self._run(job, "baseline", False)
        if not job.race:
            return _compared(base, self._run(job, req.method, req.sparsetem))
        results = [_compared(base, self._run(job, m, req.sparsetem)) for m in methods if m != "baseline"]
        return RaceOutput(base, results, baseline_picked="baseline" in methods)

    def _run(self, job: Job, method: str, sparsetem: bool) -> RunOutput:
        req = replace(job.request, method=method, sparsetem=sparsetem)
        steps = req.steps or 0
        model = self.models[req.model]
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
            # Compare and Race are measurements: a preview is encoded and streamed by the UI thread
            # on rank 0's core, which slowed the timed runs by up to 3x (measured: launcher.bench --app).
            every = 0.0 if job.compare else self.preview_every_s
            want_preview = every > 0 and (final or now - last["preview"] >= every)
            last["progress"] = now
            if want_preview:
                last["preview"] = now
            job.events.put(Progress(label, done, steps, preview_of(model, latents) if want_preview else None))

        label = ("SparseTem + " if sparsetem else "") + METHOD_LABELS[method]
        job.events.put(Progress(label, 0, steps))
        timing: dict[str, float] = {}
        note, sparse = "", None
        load = OtherLoad(self.own_tree)
        if method == "baseline" and not sparsetem:
            out, seconds, stats = self._run_baseline(model, req, on_step, timing)
        elif METHOD_INFO[method].distributed:
            out, seconds, stats, note, sparse = self._run_distributed(model, req, on_step, timing)
        else:
            out, seconds, stats, sparse = self._run_local(model, req, on_step, timing)
        info = model.info
        return RunOutput(
            method,
            info.modality,
            extract_media(out, info.modality),
            info.sample_rate,
            seconds,
            stats,
            ideal_speedup(req, method, len(stats)),
            note,
            fps=info.fps,
            denoise_s=timing.get("denoise_s"),
            sparsetem=sparse,
            other_cores=load.cores(),
        )

    def _run_local(
        self, model: LoadedModel, req: GenerateRequest, on_step: Callable, timing: dict[str, float]
    ) -> tuple[Any, float, list[parastep.RunStats], parastep.SparseTemStats | None]:
        handle = parastep.apply(model.pipe, configs(req, req.method, 1, self.peer_timeout_s))
        try:
            out, seconds = call_pipeline(model, req, latent_only=False, on_step=on_step, timing=timing)
            return out, seconds, [handle.last_stats], _sparsetem_stats(handle, req)
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

    def _run_distributed(
        self, model: LoadedModel, req: GenerateRequest, on_step: Callable, timing: dict[str, float]
    ) -> tuple[Any, float, list[parastep.RunStats], str, parastep.SparseTemStats | None]:
        group, label = self.group, METHOD_LABELS[req.method]
        if group is None:
            raise RunError(f"{label} needs peer ranks and this app runs none.")
        members, excluded = group.ensure()
        ranks = run_ranks(req.method, len(members))
        if ranks > len(members):
            raise RunError(f"{label} needs {ranks} ranks and only {len(members)} can take part: " + "; ".join(excluded))
        members = members[:ranks]
        run_id = self._run_id = self._run_id + 1
        group.channel.post(PeerRun(run_id, group.gen, members, req, self.peer_timeout_s, req.method))
        handle = None
        try:
            chain = configs(req, req.method, ranks, self.peer_timeout_s)
            handle = parastep.apply(model.pipe, chain, group=run_group(ranks))  # over the generation's world
            out, seconds = call_pipeline(model, req, latent_only=False, on_step=on_step, timing=timing)
            stats0, sparse = handle.last_stats, _sparsetem_stats(handle, req)
        except Exception as exc:
            message = group.explain(exc, members, label)
            group.abandon(run_id, members)
            raise RunError(message) from exc
        finally:
            if handle is not None:
                handle.remove()
        peer_stats, failed = group.collect_reports(run_id, members)
        excluded += failed
        note = ""
        if excluded:
            note = f"{label} ran on {len(members)} of {self.topo.world_size} ranks: " + "; ".join(excluded) + "."
        return out, seconds, [stats0, *peer_stats], note, sparse


def _sparsetem_stats(handle: parastep.Handle, req: GenerateRequest) -> parastep.SparseTemStats | None:
    return parastep.SparseTemStats.of(handle) if req.sparsetem else None


def _compared(base: RunOutput, fast: RunOutput) -> CompareOutput:
    return CompareOutput(
        baseline=base,
        method=fast,
        speedup=base.wall_s / fast.wall_s if fast.wall_s > 0 else float("nan"),
        speedup_denoise=base.denoise_s / fast.denoise_s if base.denoise_s and fast.denoise_s else None,
        psnr=quality.psnr(base.media, fast.media),
        ssim=quality.ssim(base.media, fast.media),
    )
