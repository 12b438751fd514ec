"""Rank 0's backend: validation, the request queue, and the one coordinator thread.

The UI only calls :meth:`Backend.submit` and reads the job's events. The coordinator
thread is the only thread that touches torch.distributed or runs a pipeline, so a browser
that goes away never interrupts a collective half-way: its job simply runs to the end and
the result is dropped.

Example::

    job = backend.submit(GenerateRequest(model="built-in image", prompt="a red fox"), compare=True)
    for event in job.stream():
        ...  # Progress events, then one CompareOutput
"""

from __future__ import annotations

import logging
import math
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import parastep
from launcher.control import ControlChannel
from launcher.models import LoadedModel, call_pipeline, denoiser_of, extract_media, preview_of
from launcher.peer import new_parastep_group
from launcher.protocol import (
    METHOD_LABELS,
    METHODS,
    CompareOutput,
    GenerateRequest,
    InputError,
    ModelInfo,
    PeerRun,
    Progress,
    Regroup,
    RunError,
    RunOutput,
    Shutdown,
)
from launcher.topology import Topology

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 400
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MAX_QUEUE = 32
PROGRESS_EVERY_S = 0.1
PREVIEW_EVERY_S = 0.3
MAX_SIDE = 2048
MAX_FRAMES = 256
MAX_DURATION_S = 60.0


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
        self.heartbeat_stale_s = heartbeat_stale_s
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=MAX_QUEUE)
        self._group: Any = None
        self._members: tuple[int, ...] = ()
        self._gen = 0
        self._group_dirty = True
        self._run_id = 0
        self._busy = False
        self._last_beat = {r: (0, time.monotonic()) for r in self.peers}
        self._stop = threading.Event()
        self._coordinator = threading.Thread(target=self._serve, name="parastep-coordinator", daemon=True)

    # ---- lifecycle ----------------------------------------------------------------
    @property
    def peers(self) -> list[int]:
        return list(range(1, self.topo.world_size))

    def start(self, ready_timeout_s: float = 900.0) -> None:
        """Wait for every peer to load its models, build the first ParaStep group, start serving."""
        deadline = time.monotonic() + ready_timeout_s
        for rank in self.peers:
            while not self.channel.is_ready(rank):
                problem = self.topo.child_problem(rank)
                if problem:
                    raise RuntimeError(f"{problem} while loading models; see its log above")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rank {rank} did not become ready within {ready_timeout_s:.0f} s")
                time.sleep(0.1)
        self._last_beat = {r: (self.channel.beats(r), time.monotonic()) for r in self.peers}
        if self.peers:
            threading.Thread(target=self._watch_heartbeats, name="parastep-heartbeats", daemon=True).start()
        self._coordinator.start()
        if self.peers:
            self._jobs.put(None)  # wakes the coordinator to build the group before the first user

    def close(self) -> None:
        self._stop.set()
        try:
            self._jobs.put_nowait(None)
        except queue.Full:
            pass
        if self.channel is not None and self.peers:
            self.channel.post(Shutdown())
        self._coordinator.join(timeout=5)
        self.topo.stop_children()

    # ---- what the UI reads --------------------------------------------------------
    def model_infos(self) -> dict[str, ModelInfo]:
        return {name: m.info for name, m in self.models.items()}

    def status(self) -> dict[str, Any]:
        ranks = [{"rank": 0, "where": f"{socket.gethostname()}:{os.getpid()}", "state": "busy" if self._busy else "ok"}]
        for rank in self.peers:
            problem = self._peer_problem(rank)
            if problem is None and self.channel.processed(rank) < self.channel.posted - 1:
                problem = "busy with an earlier request"
            ranks.append({"rank": rank, "where": self.channel.where(rank), "state": problem or "ok"})
        return {
            "world_size": self.topo.world_size,
            "backend": self.topo.backend,
            "device": str(self.topo.device),
            "parastep_group": list(self._members),
            "queued": self._jobs.qsize(),
            "ranks": ranks,
        }

    # ---- validation ---------------------------------------------------------------
    def validate(self, req: GenerateRequest, compare: bool = False) -> GenerateRequest:
        """Check everything before anything runs, so a bad request never reaches a peer."""
        if req.model not in self.models:
            raise InputError(f"Unknown model {req.model!r}. Choose one of: {', '.join(self.models)}.")
        info = self.models[req.model].info
        prompt = (req.prompt or "").strip()
        if not prompt:
            raise InputError("The prompt is empty: type what you want to generate.")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InputError(f"The prompt is {len(prompt)} characters long: shorten it to at most {MAX_PROMPT_CHARS}.")
        negative = (req.negative_prompt or "").strip()
        if len(negative) > MAX_PROMPT_CHARS:
            raise InputError(
                f"The negative prompt is {len(negative)} characters long: shorten it to at most {MAX_PROMPT_CHARS}."
            )
        method = str(req.method).strip().lower()
        if method not in METHODS:
            raise InputError(f"Unknown method {req.method!r}: choose baseline, parastep or batchstep.")
        if compare and method == "baseline":
            raise InputError("Compare runs the baseline against ParaStep or BatchStep: pick one of those as method.")
        steps = _as_int("Steps", req.steps)
        if not 1 <= steps <= MAX_STEPS:
            raise InputError(f"Steps must be between 1 and {MAX_STEPS} (got {steps}).")
        warmup = _as_int("Warm-up", req.warmup_steps)
        stride = _as_int("Stride", req.stride)
        if method != "baseline":
            if warmup < 0:
                raise InputError(f"Warm-up must be 0 or more (got {warmup}).")
            if warmup >= steps:
                raise InputError(
                    f"Warm-up ({warmup}) must be smaller than steps ({steps}): lower warm-up or raise steps."
                )
        if method == "parastep" and warmup < 1:
            raise InputError("ParaStep needs at least 1 warm-up step: peers reuse the prediction cached during warm-up.")
        if method == "batchstep":
            if stride < 2:
                raise InputError(f"Stride must be at least 2 (got {stride}); stride 1 is the baseline.")
            if stride > steps:
                raise InputError(f"Stride ({stride}) cannot exceed steps ({steps}): lower stride or raise steps.")
        guidance = _as_float("Guidance", req.guidance_scale)
        if not 0.0 <= guidance <= MAX_GUIDANCE:
            raise InputError(f"Guidance must be between 0 and {MAX_GUIDANCE:g} (got {guidance:g}).")
        seed = _as_int("Seed", req.seed)
        if not 0 <= seed < 2**32:
            raise InputError(f"Seed must be between 0 and {2**32 - 1} (got {seed}).")
        height = width = frames = duration = None
        if info.modality in ("image", "video"):
            height = _as_int("Height", req.height if req.height is not None else info.default_height)
            width = _as_int("Width", req.width if req.width is not None else info.default_width)
            if info.fixed_size and (height, width) != (info.default_height, info.default_width):
                raise InputError(
                    f"{req.model} makes {info.default_height}×{info.default_width} only: set height to "
                    f"{info.default_height} and width to {info.default_width} (got {height}×{width})."
                )
            for name, side in (("Height", height), ("Width", width)):
                m = info.size_multiple
                if not m <= side <= MAX_SIDE:
                    raise InputError(f"{name} must be between {m} and {MAX_SIDE} (got {side}).")
                if side % m:
                    lower, upper = side // m * m, (side // m + 1) * m
                    raise InputError(
                        f"{name} {side} is not a multiple of {m}, which {req.model} needs: "
                        f"use {lower or upper} or {upper}."
                    )
        if info.modality == "video":
            frames = _as_int("Frames", req.num_frames if req.num_frames is not None else info.default_frames)
            if info.fixed_size and frames != info.default_frames:
                raise InputError(f"{req.model} makes {info.default_frames} frames only: set frames to "
                                 f"{info.default_frames} (got {frames}).")  # fmt: skip
            if not 1 <= frames <= MAX_FRAMES:
                raise InputError(f"Frames must be between 1 and {MAX_FRAMES} (got {frames}).")
        if info.modality == "audio":
            duration = _as_float("Duration", req.duration_s if req.duration_s is not None else info.default_duration_s)
            if info.fixed_size and abs(duration - (info.default_duration_s or 0)) > 1e-6:
                raise InputError(f"{req.model} makes {info.default_duration_s:g} s clips only: set duration to "
                                 f"{info.default_duration_s:g} (got {duration:g}).")  # fmt: skip
            if not 0 < duration <= MAX_DURATION_S:
                raise InputError(f"Duration must be more than 0 and at most {MAX_DURATION_S:g} s (got {duration:g}).")
        if method == "parastep" and self.topo.world_size < 2:
            raise InputError(
                "ParaStep needs at least 2 ranks and this app runs 1: start it with --ranks 2 (CPU) or on 2+ GPUs."
            )
        # The engine's own config checks, on rank 0, before any peer sees the request.
        try:
            if method == "parastep":
                parastep.ParaStepConfig(warmup_steps=warmup, degree=self.topo.world_size, timeout_s=self.peer_timeout_s)
            elif method == "batchstep":
                parastep.BatchStepConfig(stride=stride, warmup_steps=warmup)
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        return replace(
            req,
            prompt=prompt,
            negative_prompt=negative,
            method=method,
            steps=steps,
            warmup_steps=warmup,
            stride=stride,
            guidance_scale=guidance,
            seed=seed,
            height=height,
            width=width,
            num_frames=frames,
            duration_s=duration,
        )

    # ---- submission ---------------------------------------------------------------
    def submit(self, req: GenerateRequest, compare: bool = False) -> Job:
        """Validate (raises InputError) and queue; the job's events say when it starts."""
        req = self.validate(req, compare)
        job = Job(req, compare, self.models[req.model].prompt_warnings(req.prompt))
        ahead = self._jobs.qsize() + (1 if self._busy else 0)
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise RunError(f"{MAX_QUEUE} requests are already waiting: try again in a minute.") from None
        if ahead:
            job.events.put(Progress(f"waiting for {ahead} request(s) ahead", 0, job.request.steps))
        return job

    # ---- the coordinator thread -----------------------------------------------------
    def _serve(self) -> None:
        while not self._stop.is_set():
            job = self._jobs.get()
            if job is None:
                if self.peers and not self._stop.is_set():
                    try:
                        self._ensure_group()
                    except RunError as exc:
                        log.warning("%s", exc)
                continue
            if job.cancelled.is_set():
                continue
            self._busy = True
            try:
                job.events.put(self._run_job(job))
            except (InputError, RunError) as exc:
                job.events.put(exc)
            except Exception as exc:  # noqa: BLE001 - any failure goes back to the user
                log.exception("request failed")
                job.events.put(RunError(f"{type(exc).__name__}: {exc}"))
            finally:
                self._busy = False

    def _run_job(self, job: Job) -> RunOutput | CompareOutput:
        req = job.request
        if not job.compare:
            return self._run(job, req.method)
        base = self._run(job, "baseline")
        fast = self._run(job, req.method)
        from parastep import metrics

        return CompareOutput(
            baseline=base,
            method=fast,
            speedup=base.wall_s / fast.wall_s if fast.wall_s > 0 else float("nan"),
            speedup_denoise=base.denoise_s / fast.denoise_s if base.denoise_s and fast.denoise_s else None,
            psnr=float(metrics.psnr(base.media, fast.media)),
            ssim=float(metrics.ssim(base.media, fast.media)),
        )

    def _run(self, job: Job, method: str) -> RunOutput:
        req = job.request
        model = self.models[req.model]
        label = METHOD_LABELS[method]
        last = {"progress": 0.0, "preview": 0.0}

        def on_step(step: int, latents: Any) -> None:
            # Throttled: every event costs the UI thread (and the GIL this process shares with
            # it) some work, which would otherwise inflate the wall times being measured.
            if job.cancelled.is_set():
                return  # nobody is watching; the run itself goes on so that no rank is left waiting
            done, now = step + 1, time.monotonic()
            final = done == req.steps
            if not final and now - last["progress"] < PROGRESS_EVERY_S:
                return
            want_preview = final or now - last["preview"] >= PREVIEW_EVERY_S
            last["progress"] = now
            if want_preview:
                last["preview"] = now
            job.events.put(Progress(label, done, req.steps, preview_of(model, latents) if want_preview else None))

        job.events.put(Progress(label, 0, req.steps))
        timing: dict[str, float] = {}
        note = ""
        if method == "baseline":
            out, seconds, stats = self._run_baseline(model, req, on_step, timing)
            ideal = 1.0
        elif method == "batchstep":
            handle = parastep.apply(model.pipe, parastep.BatchStepConfig(stride=req.stride, warmup_steps=req.warmup_steps))
            try:
                out, seconds = call_pipeline(model, req, latent_only=False, on_step=on_step, timing=timing)
                stats = [handle.last_stats.to_dict()]
            finally:
                handle.remove()
            ideal = parastep.ideal_speedup(req.steps, req.warmup_steps, req.stride)
        else:
            out, seconds, stats, note = self._run_parastep(model, req, on_step, timing)
            ideal = parastep.ideal_speedup(req.steps, req.warmup_steps, len(stats))
        media = extract_media(out, model.info.modality)
        info = model.info
        return RunOutput(method, info.modality, media, info.sample_rate, seconds, stats, ideal, note, fps=info.fps,
                         denoise_s=timing.get("denoise_s"))  # fmt: skip

    def _run_baseline(
        self, model: LoadedModel, req: GenerateRequest, on_step: Any, timing: dict[str, float]
    ) -> tuple[Any, float, list[dict]]:
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
        stats = {
            "method": "baseline", "rank": 0, "world_size": 1, "degree": 1, "steps": req.steps,
            "warmup_steps": req.steps, "model_calls": calls, "bytes_sent": 0, "bytes_received": 0,
            "wall_s": seconds, "records": [],
        }  # fmt: skip
        return out, seconds, [stats]

    def _run_parastep(
        self, model: LoadedModel, req: GenerateRequest, on_step: Any, timing: dict[str, float]
    ) -> tuple[Any, float, list[dict], str]:
        members, excluded = self._ensure_group()
        run_id = self._run_id = self._run_id + 1
        self.channel.post(PeerRun(run_id, self._gen, members, req, self.peer_timeout_s))
        handle = None
        try:
            config = parastep.ParaStepConfig(
                warmup_steps=req.warmup_steps, degree=len(members), timeout_s=self.peer_timeout_s
            )
            handle = parastep.apply(model.pipe, config, group=self._group)
            out, seconds = call_pipeline(model, req, latent_only=False, on_step=on_step, timing=timing)
            stats0 = handle.last_stats.to_dict()
        except Exception as exc:
            self._group_dirty = True
            raise RunError(self._explain(exc, members)) from exc
        finally:
            if handle is not None:
                handle.remove()
        stats = [stats0]
        deadline = time.monotonic() + self.peer_timeout_s
        for rank in members[1:]:
            while (rep := self.channel.try_report(run_id, rank)) is None:
                if self._peer_problem(rank) or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            if rep is not None and rep.ok and rep.stats:
                stats.append(rep.stats)
            else:
                self._group_dirty = True
                excluded.append(rep.error if rep is not None else (self._peer_problem(rank) or f"rank {rank} did not report"))
        self.channel.prune([r for r in self.peers if not self.topo.child_problem(r)])
        note = ""
        if excluded:
            note = f"ParaStep ran on {len(members)} of {self.topo.world_size} ranks: " + "; ".join(excluded) + "."
        return out, seconds, stats, note

    # ---- health and the ParaStep group ----------------------------------------------
    def _ensure_group(self) -> tuple[tuple[int, ...], list[str]]:
        """The healthy ranks, in a ParaStep group; rebuilt after any failure. Raises RunError."""
        healthy, problems = [], []
        for rank in self.peers:
            problem = self._peer_problem(rank) or self._lagging(rank)
            (problems if problem else healthy).append(problem or rank)
        if not healthy:
            raise RunError(
                "ParaStep has no peer rank to run with: "
                + "; ".join(problems)
                + ". Baseline and BatchStep still work on rank 0; restart the app to bring ParaStep back."
            )
        members = (0, *healthy)
        if members != self._members or self._group_dirty:
            self._gen += 1
            self.channel.post(Regroup(self._gen, members, self.peer_timeout_s))
            try:
                self._group = new_parastep_group(self.topo, members, self.peer_timeout_s)
            except Exception as exc:
                raise RunError(f"Could not build the ParaStep group of ranks {list(members)}: {exc}") from exc
            self._members, self._group_dirty = members, False
            log.info("ParaStep group %d: ranks %s", self._gen, list(members))
        return members, problems

    def _lagging(self, rank: int) -> str | None:
        """A peer still busy with an earlier message (e.g. stuck in a timed-out run)."""
        deadline = time.monotonic() + 2.0
        while self.channel.processed(rank) < self.channel.posted - 1:
            if time.monotonic() > deadline:
                return f"rank {rank} is still busy with an earlier request"
            time.sleep(0.02)
        return None

    def _peer_problem(self, rank: int) -> str | None:
        problem = self.topo.child_problem(rank)
        if problem:
            return problem
        _, since = self._last_beat[rank]
        silent = time.monotonic() - since
        if silent > self.heartbeat_stale_s:
            return f"rank {rank} stopped answering (no heartbeat for {silent:.0f} s)"
        return None

    def _watch_heartbeats(self) -> None:
        while not self._stop.is_set():
            for rank in self.peers:
                try:
                    count = self.channel.beats(rank)
                except Exception:  # noqa: BLE001 - the store is ours; only at shutdown
                    return
                if count != self._last_beat[rank][0]:
                    self._last_beat[rank] = (count, time.monotonic())
            time.sleep(0.5)

    def _explain(self, exc: Exception, members: tuple[int, ...]) -> str:
        """Turn a failed ParaStep run into a message that names the rank and what still works."""
        problems: list[str] = []
        engine_refused = isinstance(exc, parastep.ParaStepError) and not isinstance(exc, parastep.CommError)
        deadline = time.monotonic() + (0.0 if engine_refused else 3.0)  # a killed process needs a moment
        while True:
            problems = [p for r in members[1:] if (p := self._peer_problem(r))]
            if problems or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if not problems and not isinstance(exc, parastep.CommError):
            return f"ParaStep cannot run this request: {type(exc).__name__}: {exc}"
        cause = "; ".join(problems) if problems else str(exc)
        return (
            f"ParaStep failed: {cause}. Baseline and BatchStep still work on rank 0; "
            "ParaStep will use the ranks that are left."
        )


def _as_int(name: str, value: Any) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a whole number (got {value!r}).") from None
    if not math.isfinite(number) or number != int(number):
        raise InputError(f"{name} must be a whole number (got {value!r}).")
    return int(number)


def _as_float(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number (got {value!r}).") from None
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number (got {value!r}).")
    return number

