"""Benchmark and quality harness: one command, one table.

    python -m launcher.bench                       # built-in image, video and audio models
    python -m launcher.bench --models image --steps 50 --warmup 5 --seeds 3 --model <diffusers id>
    python -m launcher.bench --models image --guidance 3 --link 10gbit 1gbit 100mbit   # two nodes, a slow link

For each model, in one session of P ranks (one model replica each): one rank per GPU on
NCCL (rank r on cuda:r) when the machine has two GPUs or more, else CPU ranks on gloo with the
cores split between them (``--device`` chooses; the table's backend column says which),
interleaved seed by seed so drift hits every method alike: the baseline on one rank, the
baseline in one process using all cores, ParaStep with degree 1, ParaStep on P ranks, and
BatchStep with each stride on one rank, AsyncDiff with 2 stages (and stride 2 where there are 3
ranks) and CFG-parallel (at a guidance > 1; pass --guidance where a model's own is 1), each on
ranks 0..n-1 (a group of their own when the session has more); then back-to-back pairs of the
baseline and ParaStep degree 1 measure the hooks' cost. A stress session (fewer steps, more ranks than cores; on
GPUs at most one rank per GPU) reports where the methods' quality differs. Prints a table,
writes JSON and a PNG plot.

``--link RATE ...`` runs instead, per rate, two CPU ranks as two nodes (:mod:`launcher.link`:
network namespaces joined by a veth pair, tbf-limited to RATE each way) started by torchrun's
multi-node rendezvous: the baseline, ParaStep-2, AsyncDiff-2 and CFG-parallel, one table per
rate, and the bytes the link carried. Needs root (CAP_NET_ADMIN).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import parastep
from launcher.hostload import steal_share
from launcher.methods import SPARSETEM_ERROR_TARGET
from launcher.models import LoadedModel, call_pipeline, extract_media, load_models
from launcher.quality import psnr, ssim
from launcher.request import GenerateRequest
from launcher.topology import core_share, free_port, limit_blas
from parastep.registry import spec_for

log = logging.getLogger("launcher.bench")


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # baseline | parastep | batchstep | asyncdiff | cfg
    parallelism: int = 1  # degree or stride (AsyncDiff: its stride, with 2 stages)
    all_cores: bool = False  # rank 0 alone with every core (peers wait)
    busy: bool = False  # every rank runs its own baseline at once: one rank's speed when all compute
    sparsetem: bool = False  # SparseTem inside each rank's call (models with a frame-by-frame part only)

    @property
    def on_all_ranks(self) -> bool:
        return (self.kind == "parastep" and self.parallelism > 1) or self.busy

    @property
    def group_ranks(self) -> int:
        """Ranks 0..n-1 that run it on a group of their own (0: none): AsyncDiff's 2 stages + stride - 1, CFG's 2."""
        return {"asyncdiff": 1 + self.parallelism, "cfg": 2}.get(self.kind, 0)

    def runs_on(self, rank: int) -> bool:
        return rank == 0 or self.on_all_ranks or rank < self.group_ranks


@dataclass(frozen=True)
class Session:
    label: str
    ranks: int
    steps: int
    warmup: int
    seeds: tuple[int, ...]
    methods: tuple[Method, ...]
    builtins: tuple[str, ...]
    extra: tuple[str, ...]
    threads: int
    all_cores: int
    hook_pairs: int = 0  # alternating baseline / degree-1 runs on rank 0: the hooks' cost
    device: str = "cpu"  # "cuda": rank r on cuda:r, NCCL; "cpu": gloo
    guidance: float | None = None  # None: each model's own

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"


@dataclass
class Run:
    session: str
    model: str
    method: str
    seed: int
    wall_s: float
    calls: list[int]
    bytes: int
    records: list[dict] = field(default_factory=list)
    media: Any = None  # rank 0's decoded output, for quality against the baseline
    psnr: float = float("nan")
    ssim: float = float("nan")
    skipped_work: float | None = None  # SparseTem: the fraction of its layers' multiply-adds skipped


def _config(method: Method, warmup: int) -> Any:
    config = _method_config(method, warmup)
    if not method.sparsetem:
        return config
    return [parastep.SparseTemConfig(error_target=SPARSETEM_ERROR_TARGET), *([config] if config else [])]


def _method_config(method: Method, warmup: int) -> Any:
    if method.kind == "parastep":
        return parastep.ParaStepConfig(warmup_steps=warmup, degree=method.parallelism)
    if method.kind == "batchstep":
        return parastep.BatchStepConfig(stride=method.parallelism, warmup_steps=warmup)
    if method.kind == "asyncdiff":
        return parastep.AsyncDiffConfig(stages=2, stride=method.parallelism, warmup_steps=warmup)
    if method.kind == "cfg":
        return parastep.CFGParallelConfig()
    return None


def contestants(ranks: int) -> tuple[Method, ...]:
    """AsyncDiff with 2 stages (stride 2 too where there are 3 ranks) and CFG-parallel."""
    strides = [1, 2] if ranks >= 3 else [1]
    return (
        *(Method("asyncdiff-2" + ("-stride-2" if s == 2 else ""), "asyncdiff", s) for s in strides),
        Method("cfg-parallel", "cfg"),
    )


def request_for(
    name: str, model: LoadedModel, steps: int, warmup: int, seed: int, guidance: float | None = None
) -> GenerateRequest:
    """The request the benchmark measures: the model's first example prompt and its defaults
    (``guidance``: another guidance scale)."""
    info = model.info
    return GenerateRequest(
        model=name,
        prompt=info.examples[0] if info.examples else "a red circle",
        steps=steps,
        warmup_steps=warmup,
        guidance_scale=info.default_guidance if guidance is None else guidance,
        seed=seed,
        height=info.default_height,
        width=info.default_width,
        num_frames=info.default_frames,
        duration_s=info.default_duration_s,
    )


def _worker(rank: int, session: Session, port: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _serve(rank, session, queue.put)


def _serve(rank: int, session: Session, emit: Callable[[tuple[str, Any]], None]) -> None:
    """One rank of a session (its process group from the environment's MASTER_ADDR/PORT): every
    model, seed and method; rank 0 emits ``("run", Run)``, ``("hooks", ...)``, and every rank
    ``("done", rank)`` or ``("error", text)``."""
    cores = (os.sched_getaffinity(0), core_share(rank, session.ranks))  # (all, this rank's), as the app pins
    if cores[1]:
        os.sched_setaffinity(0, cores[1])
    torch.set_num_threads(session.threads)
    limit_blas(session.threads)
    logging.basicConfig(level=logging.WARNING)
    try:
        device = torch.device(session.device, rank) if session.device == "cuda" else torch.device("cpu")
        if device.type == "cuda":  # one GPU per rank, bound before NCCL sees it (no duplicate GPU)
            torch.cuda.set_device(device)
            dist.init_process_group(
                "nccl", rank=rank, world_size=session.ranks, timeout=timedelta(minutes=30), device_id=device
            )
        else:
            dist.init_process_group("gloo", rank=rank, world_size=session.ranks, timeout=timedelta(minutes=30))
        # a method on fewer ranks than the session's gets ranks 0..n-1 as a group; every rank creates each
        sizes = sorted({m.group_ranks for m in session.methods if 1 < m.group_ranks < session.ranks})
        groups = {n: dist.new_group(list(range(n))) for n in sizes}
        models = load_models(list(session.builtins), list(session.extra), device)
        for name, model in models.items():
            warm = replace(request_for(name, model, session.steps, session.warmup, 0, session.guidance), steps=2)
            call_pipeline(model, warm, latent_only=rank > 0)  # first-call costs stay out of the table
            for seed in session.seeds:
                req = request_for(name, model, session.steps, session.warmup, seed, session.guidance)
                for method in session.methods:
                    dist.barrier()
                    if not method.runs_on(rank):
                        continue
                    if method.kind == "cfg" and not (req.guidance_scale or 0) > 1:
                        if rank == 0 and seed == session.seeds[0]:
                            emit(
                                (
                                    "note",
                                    f"{name}: no {method.name} row: guidance {req.guidance_scale} has no "
                                    "guidance batch; pass --guidance 3 (any value > 1) for one",
                                )
                            )
                        continue
                    if method.sparsetem and not model.info.sparsetem_parts:
                        continue  # SparseTem rows are for models with a frame-by-frame part
                    run = _run_one(rank, session, name, model, req, method, cores, groups.get(method.group_ranks))
                    if rank == 0:
                        emit(("run", run))
            if rank == 0 and session.hook_pairs:
                emit(("hooks", (name, _hook_cost(session, name, model))))
            dist.barrier()
        dist.barrier()
        emit(("done", rank))
    except BaseException as exc:  # report, never leave the parent waiting
        emit(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))
        raise
    finally:
        gc.collect()  # the strategies' last references to the group sit in cycles: free them while it lives
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_one(
    rank: int,
    session: Session,
    name: str,
    model: LoadedModel,
    req: GenerateRequest,
    method: Method,
    cores: tuple[set[int], set[int]],
    group: Any = None,
) -> Run | None:
    config = _config(method, session.warmup)
    handle = parastep.apply(model.pipe, config, group) if config else None
    if method.all_cores:
        os.sched_setaffinity(0, cores[0])
        torch.set_num_threads(session.all_cores)
    try:
        out, seconds = call_pipeline(model, req, latent_only=rank > 0)
    finally:
        torch.set_num_threads(session.threads)
        if method.all_cores and cores[1]:
            os.sched_setaffinity(0, cores[1])
        if handle:
            handle.remove()
    stats = handle.last_stats if handle else None
    skipped = parastep.SparseTemStats.of(handle).skipped_work if handle and method.sparsetem else None
    calls: list[int] = [stats.model_calls] if stats else [req.steps or 0]
    sent = stats.bytes_sent if stats else 0
    if method.on_all_ranks and not method.busy:  # gather every rank's calls and bytes on rank 0
        gathered: list[Any] = [None] * session.ranks
        dist.all_gather_object(gathered, (calls[0], sent))
        calls, sent = [c for c, _ in gathered], sum(b for _, b in gathered)
    elif method.group_ranks:  # the same over the method's own ranks
        gathered = [None] * method.group_ranks
        dist.all_gather_object(gathered, (calls[0], sent), group=group)
        calls, sent = [c for c, _ in gathered], sum(b for _, b in gathered)
    if rank > 0:
        return None
    run = Run(
        session.label,
        name,
        method.name,
        req.seed,
        seconds,
        calls,
        sent,
        [asdict(r) for r in stats.records] if stats else [],
    )
    run.media = extract_media(out, model.info.modality)
    run.skipped_work = skipped
    return run


def _latent_seconds(model: LoadedModel, req: GenerateRequest, config: Any = None) -> float:
    handle = parastep.apply(model.pipe, config) if config else None
    cuda = model.pipe.device.type == "cuda"
    try:
        if not cuda:
            return call_pipeline(model, req, latent_only=True)[1]
        torch.cuda.synchronize()  # latents only: nothing else waits for the device
        start = time.perf_counter()
        call_pipeline(model, req, latent_only=True)
        torch.cuda.synchronize()
        return time.perf_counter() - start
    finally:
        if handle:
            handle.remove()


def _pairs(model: LoadedModel, req: GenerateRequest, n: int) -> list[tuple[float, float]]:
    """``n`` back-to-back (baseline, ParaStep degree 1) timings, order alternating so drift cancels."""
    hooked = parastep.ParaStepConfig(degree=1)
    out = []
    for i in range(n):
        if i % 2:
            base, hook = _latent_seconds(model, req), _latent_seconds(model, req, hooked)
        else:
            hook, base = _latent_seconds(model, req, hooked), _latent_seconds(model, req)
        out.append((base, hook))
    return out


def _hook_cost(session: Session, name: str, model: LoadedModel) -> dict[str, Any]:
    """The hooks' cost with nothing to parallelise, two ways (latents only, no decoding):

    - ``median_pct``: ParaStep degree 1 against the baseline, ``hook_pairs`` back-to-back pairs;
      honest but as noisy as the machine;
    - ``us_per_step``: the same pairs with the denoiser's output cached (a null denoiser), where
      a step costs only the pipeline, the scheduler and the hooks, so microseconds show;
      ``pct_of_step`` relates them to the real baseline's step time.
    """
    req = request_for(name, model, session.steps, session.warmup, 0, session.guidance)
    real = _pairs(model, req, session.hook_pairs)
    ratios = [h / b for b, h in real]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    denoiser = getattr(model.pipe, spec_for(model.pipe).denoiser)
    forward, own = denoiser.forward, denoiser.__dict__.get("forward")
    cached: list[Any] = []

    def null_forward(*args: Any, **kwargs: Any) -> Any:
        if not cached:
            cached.append(forward(*args, **kwargs))
        return cached[0]

    denoiser.forward = null_forward
    try:
        null = _pairs(model, req, session.hook_pairs)
    finally:
        if own is None:
            del denoiser.forward
        else:
            denoiser.forward = own
    us = 1e6 * statistics.median(h - b for b, h in null) / session.steps
    step_us = 1e6 * statistics.median(b for b, _ in real) / session.steps
    return dict(
        pairs=len(ratios),
        median_pct=100 * (statistics.median(ratios) - 1),
        q1_pct=100 * (q[0] - 1),
        q3_pct=100 * (q[2] - 1),
        us_per_step=us,
        step_ms=step_us / 1000,
        pct_of_step=100 * us / step_us,
    )


def run_session(session: Session) -> tuple[list[Run], dict[str, dict]]:
    """Every run of the session on rank 0, and each model's hook cost (when measured)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, session, port, queue)) for r in range(session.ranks)]
    for p in procs:
        p.start()
    runs: list[Run] = []
    session_hooks: dict[str, dict] = {}
    done = 0
    total = len(session.seeds) * len(session.methods) * (len(session.builtins) + len(session.extra))
    try:
        while done < session.ranks:
            kind, value = queue.get(timeout=1800)
            if kind == "error":
                raise RuntimeError(value)
            if kind == "done":
                done += 1
                continue
            if kind == "note":
                print(f"[{session.label}] {value}", file=sys.stderr, flush=True)
                continue
            if kind == "hooks":
                session_hooks[value[0]] = value[1]
                print(
                    f"[{session.label}] {value[0]} hook cost: {value[1]['median_pct']:+.2f} %, "
                    f"{value[1]['us_per_step']:.0f} us per step",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            runs.append(value)
            print(
                f"[{session.label} {len(runs)}/{total}] {value.model} {value.method} seed {value.seed}: "
                f"{value.wall_s:.2f}s",
                file=sys.stderr,
                flush=True,
            )
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    _score(runs)
    return runs, session_hooks


def _score(runs: list[Run]) -> None:
    """Each run's quality against the one-rank baseline of the same model and seed."""
    for run in runs:
        ref = next(r for r in runs if r.model == run.model and r.seed == run.seed and r.method == "baseline-1rank")
        run.psnr, run.ssim = psnr(ref.media, run.media), ssim(ref.media, run.media)


LINK_PORT = 29400  # the rendezvous port on node 0 (a namespace of its own: nothing else listens there)


def link_rank(session_path: Path, out_path: Path) -> NoReturn:
    """One rank of a ``--link`` session, as torchrun starts it on either node: its rank from
    torchrun's RANK, its process group on torchrun's store; rank 0 writes what it measured to
    ``out_path`` (:func:`_write_events`: JSON and arrays, nothing pickled)."""
    raw = json.loads(session_path.read_text())
    session = Session(
        **{
            **raw,
            "seeds": tuple(raw["seeds"]),
            "builtins": tuple(raw["builtins"]),
            "extra": tuple(raw["extra"]),
            "methods": tuple(Method(**m) for m in raw["methods"]),
        }
    )
    rank = int(os.environ["RANK"])
    events: list[tuple[str, Any]] = []
    try:
        _serve(rank, session, events.append)
    finally:
        if rank == 0:
            _write_events(events, out_path)
    # Done and written: leave without the interpreter's teardown. Node 1's rank aborted in it now and
    # then after the last barrier (SIGABRT, "terminate called without an active exception", inside
    # torch), and node 0's torchrun then waited out its 300 s exit barrier before failing the run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _write_events(events: list[tuple[str, Any]], path: Path) -> None:
    """Rank 0's events as one ``.npz``: the runs' media as arrays, everything else as JSON."""
    arrays: dict[str, np.ndarray] = {}
    plain = []
    for kind, value in events:
        if isinstance(value, Run):
            key = f"media{len(arrays)}"
            arrays[key] = np.asarray(value.media)
            value = {**asdict(replace(value, media=None)), "media": key}
        plain.append((kind, value))
    with path.open("wb") as f:
        np.savez(f, events=np.array(json.dumps(plain, default=str)), allow_pickle=False, **arrays)


def _read_events(path: Path) -> list[tuple[str, Any]]:
    """What :func:`_write_events` wrote (no pickle: ``allow_pickle=False``)."""
    with np.load(path, allow_pickle=False) as data:
        events = []
        for kind, value in json.loads(str(data["events"])):
            if kind == "run":
                value = Run(**{**value, "media": data[value["media"]]})
            events.append((kind, value))
    return events


def _wait_nodes(procs: list[subprocess.Popen], timeout_s: float, grace_s: float = 15.0) -> None:
    """Until every node's torchrun has exited, or one failed and the others had ``grace_s`` to
    follow (a node left running would wait out torchrun's 300 s exit barrier for the failed one);
    the caller's clean-up stops what is still running. TimeoutError after ``timeout_s``."""
    deadline, failed = time.monotonic() + timeout_s, None
    while None in (codes := [p.poll() for p in procs]):
        now = time.monotonic()
        failed = failed or (now if any(codes) else None)
        if failed is not None and now > failed + grace_s:
            return
        if now > deadline:
            raise TimeoutError(f"the two nodes did not finish within {timeout_s:.0f} s")
        time.sleep(0.1)


def _link_session(session: Session, rate: str, workdir: Path) -> tuple[list[Run], list[int]]:
    """``session`` on two nodes joined by a link of ``rate``: one torchrun per node, multi-node
    rendezvous. Returns rank 0's runs and the bytes each node sent over the link in all."""
    from launcher import link

    session_path, out_path = workdir / "session.json", workdir / f"runs-{rate}.npz"
    session_path.write_text(json.dumps(asdict(session)))
    out_path.unlink(missing_ok=True)
    procs: list[subprocess.Popen] = []
    logs = [workdir / f"node{n}-{rate}.log" for n in range(2)]
    with link.two_nodes(rate) as net:
        try:
            for node, addr in enumerate(link.ADDRESSES):
                env = dict(os.environ, GLOO_SOCKET_IFNAME=link.INTERFACE, OMP_NUM_THREADS=str(session.threads))
                env["PARASTEP_SHM_DISABLE"] = "1"  # the two "nodes" share /dev/shm: keep every message on the link
                env["PYTHONFAULTHANDLER"] = "1"  # a rank that crashes prints where, into its node's log
                env["PYTHONPATH"] = os.pathsep.join(
                    [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")]
                )
                cmd = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nnodes=2",
                    "--nproc-per-node=1",
                    "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={link.ADDRESSES[0]}:{LINK_PORT}",
                    f"--rdzv-id=bench-{os.getpid()}",
                    f"--local-addr={addr}",
                    f"--rdzv-conf=is_host={int(node == 0)}",  # node 0 holds the store (its hostname resolves elsewhere)
                    "--max-restarts=0",
                    "-m",
                    "launcher.bench",
                    "--link-rank",
                    str(session_path),
                    str(out_path),
                ]
                with logs[node].open("w") as log_file:
                    procs.append(
                        subprocess.Popen(
                            net.exec(node, cmd),
                            env=env,
                            stdout=log_file,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    )
            _wait_nodes(procs, timeout_s=3600)
            carried = [net.sent_bytes(0), net.sent_bytes(1)]
        finally:
            for proc in procs:  # torchrun and its worker share the session this process gave them
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
    events = _read_events(out_path) if out_path.exists() else []
    errors = [v for k, v in events if k == "error"]
    for note in (v for k, v in events if k == "note"):
        print(f"[{session.label}] {note}", file=sys.stderr, flush=True)
    if errors or any(p.returncode for p in procs) or not events:
        tails = "\n".join(f"--- {path} ---\n{path.read_text()[-2000:]}" for path in logs)
        raise RuntimeError(f"link {rate}: the ranks failed: {'; '.join(errors) or 'no result'}\n{tails}")
    runs = [v for k, v in events if k == "run"]
    _score(runs)
    return runs, carried


def _computed_step_s(runs: list[Run], method: str, warmup: int) -> list[float]:
    return [
        r["seconds"] for run in runs if run.method == method for r in run.records[warmup:] if r["action"] == "computed"
    ]


def _ideal(method: Method, session: Session, runs: list[Run]) -> float:
    if method.kind == "baseline":
        return 1.0
    if method.kind == "parastep":
        return parastep.ideal_speedup(session.steps, session.warmup, method.parallelism)
    if method.kind == "asyncdiff":  # every step after warm-up costs 1/(stages*stride) of one, stages balanced
        return session.steps / (session.warmup + (session.steps - session.warmup) / (2 * method.parallelism))
    if method.kind == "cfg":  # every step costs a half batch, taken as half the time
        return 2.0
    # BatchStep: T*t(1) / (W*t(1) + blocks*t(S)), t(S) the measured step holding a batched call of S
    # (-> S*t(1)/t(S), the batching limit, for long runs); t(1) from the degree-1 run's steps
    t1 = _computed_step_s(runs, "parastep-1", session.warmup)
    ts = _computed_step_s(runs, method.name, session.warmup)
    if not t1 or not ts:
        return float("nan")
    t1_med = statistics.median(t1)
    blocks = -(-(session.steps - session.warmup) // method.parallelism)
    return session.steps * t1_med / (session.warmup * t1_med + blocks * statistics.median(ts))


def summarise(session: Session, runs: list[Run]) -> list[dict]:
    rows = []
    models = list(dict.fromkeys(r.model for r in runs))
    for model in models:
        mine = [r for r in runs if r.model == model]
        base1 = statistics.median(r.wall_s for r in mine if r.method == "baseline-1rank")
        base_all = [r.wall_s for r in mine if r.method == "baseline-allcores"]
        busy = [r.wall_s for r in mine if r.method == "baseline-busy"]
        for method in session.methods:
            rs = [r for r in mine if r.method == method.name]
            if not rs:
                continue
            walls = [r.wall_s for r in rs]
            med = statistics.median(walls)
            ideal = _ideal(method, session, mine)
            finite = [r.psnr for r in rs if r.psnr != float("inf")]
            rows.append(
                dict(
                    session=session.label,
                    model=model,
                    method=method.name,
                    steps=session.steps,
                    warmup=session.warmup,
                    ranks=session.ranks
                    if method.busy
                    else method.parallelism
                    if method.on_all_ranks
                    else method.group_ranks or 1,
                    backend=f"{session.backend}:{session.device}",
                    wall_median_s=med,
                    wall_min_s=min(walls),
                    wall_max_s=max(walls),
                    speedup_vs_1rank=base1 / med,
                    speedup_vs_allcores=statistics.median(base_all) / med if base_all else None,
                    ideal_speedup=ideal,
                    efficiency=(base1 / med) / ideal if ideal == ideal else None,
                    model_calls_per_rank="/".join(str(c) for c in rs[0].calls),
                    bytes_per_call=rs[0].bytes,
                    psnr_db=statistics.median(finite) if finite else float("inf"),
                    ssim=statistics.median(r.ssim for r in rs),
                    time_split=_time_split(rs, session.warmup) if method.kind == "parastep" else None,
                    skipped_work=statistics.median(r.skipped_work or 0.0 for r in rs) if method.sparsetem else None,
                    # ParaStep's ceiling on this machine: the ideal, slowed as one rank slows when all compute
                    busy_ceiling=ideal * base1 / statistics.median(busy)
                    if busy and method.on_all_ranks and not method.busy
                    else None,
                )
            )
    return rows


def _time_split(runs: list[Run], warmup: int) -> dict[str, float]:
    """Where rank 0's time goes after warm-up: seconds per step, by what the step did."""
    split: dict[str, list[float]] = {}
    for run in runs:
        for r in run.records[warmup:]:
            split.setdefault(r["action"], []).append(r["seconds"])
    return {k: statistics.mean(v) for k, v in split.items()}


def format_table(rows: list[dict]) -> str:
    head = [
        "session",
        "model",
        "method",
        "ranks",
        "backend:device",
        "wall s med [min-max]",
        "x 1rank",
        "x allcores",
        "ideal",
        "eff",
        "calls/rank",
        "bytes",
        "PSNR dB",
        "SSIM",
    ]

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None or v != v else format(v, fmt)

    lines = [head]
    for r in rows:
        lines.append(
            [
                r["session"],
                r["model"],
                r["method"],
                str(r["ranks"]),
                r["backend"],
                f"{r['wall_median_s']:.2f} [{r['wall_min_s']:.2f}-{r['wall_max_s']:.2f}]",
                f(r["speedup_vs_1rank"], ".2f"),
                f(r["speedup_vs_allcores"], ".2f"),
                f(r["ideal_speedup"], ".2f"),
                f(r["efficiency"], ".2f"),
                r["model_calls_per_rank"],
                str(r["bytes_per_call"]),
                "inf" if r["psnr_db"] == float("inf") else f(r["psnr_db"], ".1f"),
                f(r["ssim"], ".4f"),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["method"] != "baseline-1rank"]
    labels = [f"{r['session']}\n{r['model']}\n{r['method']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["speedup_vs_1rank"] for r in rows], 0.4, label="measured vs 1-rank baseline")
    ax.bar(
        [x + 0.2 for x in xs],
        [r["ideal_speedup"] if r["ideal_speedup"] == r["ideal_speedup"] else 0 for r in rows],
        0.4,
        label="ideal",
        alpha=0.6,
    )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(list(xs), labels, fontsize=6, rotation=90)
    ax.set_ylabel("speedup")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--app" in argv:  # the app's Compare against this benchmark: launcher/app_bench.py
        from launcher import app_bench

        return app_bench.main([a for a in argv if a != "--app"])
    p = argparse.ArgumentParser(prog="python -m launcher.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=["image", "video", "audio"], help="built-in kinds to measure")
    p.add_argument("--model", action="append", default=[], help="a diffusers model id or path (local cache only)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance scale for every method (default: each model's own; CFG-parallel needs > 1)",
    )
    p.add_argument(
        "--ranks",
        type=int,
        default=None,
        help="ParaStep degree (default: all ranks this machine supports: GPUs, else cores)",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="cuda: one rank per GPU on NCCL; cpu: CPU ranks on gloo; auto: cuda with two GPUs or more",
    )
    p.add_argument("--strides", type=int, nargs="*", default=[2, 4])
    p.add_argument("--stress-steps", type=int, default=20)
    p.add_argument("--stress-degree", type=int, default=4, help="ranks of the stress session (0: skip it)")
    p.add_argument(
        "--hook-pairs",
        type=int,
        default=20,
        help="back-to-back (baseline, degree-1) pairs per model measuring the hooks' cost (0: skip)",
    )
    p.add_argument("--only", nargs="*", default=None, help="measure only these rows of the main session (by name)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    p.add_argument(
        "--link",
        nargs="+",
        metavar="RATE",
        help="run 2 ranks as two nodes (network namespaces, a veth pair limited to RATE each way, e.g. "
        "10gbit 1gbit 100mbit; torchrun's multi-node rendezvous): baseline, ParaStep-2, AsyncDiff-2 and "
        "CFG-parallel per rate. Needs root (CAP_NET_ADMIN)",
    )
    p.add_argument("--link-rank", nargs=2, type=Path, help=argparse.SUPPRESS)  # what torchrun starts per node
    args = p.parse_args(argv)
    if args.link_rank:
        link_rank(*args.link_rank)
    cores, gpus = len(os.sched_getaffinity(0)), torch.cuda.device_count()
    device = args.device if args.device != "auto" else "cuda" if gpus >= 2 else "cpu"
    ranks = args.ranks or (gpus if device == "cuda" else cores)
    if ranks < 2 and not args.link:
        p.error("ParaStep needs at least 2 ranks: pass --ranks 2")
    if device == "cuda" and ranks > gpus:
        p.error(
            f"one rank per GPU on NCCL: {ranks} ranks need {ranks} GPUs, this machine has {gpus}; "
            "lower --ranks or pass --device cpu"
        )
    stress_degree = min(args.stress_degree, gpus) if device == "cuda" else args.stress_degree
    if not 0 < args.warmup < args.steps:
        p.error(f"--warmup must be between 1 and --steps - 1 ({args.steps - 1}), got {args.warmup}")
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.link:
        return _main_link(p, args, argv)

    methods = (
        Method("baseline-1rank", "baseline"),
        Method("baseline-allcores", "baseline", all_cores=True),
        Method("baseline-busy", "baseline", busy=True),
        Method("parastep-1", "parastep", 1),
        Method(f"parastep-{ranks}", "parastep", ranks),
        *(Method(f"batchstep-{s}", "batchstep", s) for s in args.strides),
        *contestants(ranks),
        Method("sparsetem", "baseline", sparsetem=True),
        Method(f"sparsetem+parastep-{ranks}", "parastep", ranks, sparsetem=True),
    )
    if args.only is not None:
        unknown = set(args.only) - {m.name for m in methods}
        if unknown or "baseline-1rank" not in args.only:
            p.error(f"--only: rows are among {[m.name for m in methods]}, baseline-1rank included (got {args.only})")
        methods = tuple(m for m in methods if m.name in args.only)
    seeds = tuple(range(args.seeds))
    main_session = Session(
        "main",
        ranks,
        args.steps,
        args.warmup,
        seeds,
        methods,
        tuple(args.models),
        tuple(args.model),
        max(1, cores // ranks),
        cores,
        args.hook_pairs,
        device,
        args.guidance,
    )
    sessions = [main_session]
    if stress_degree:
        stress_methods: tuple[Method, ...] = (
            Method("baseline-1rank", "baseline"),
            Method(f"parastep-{ranks}", "parastep", ranks),
            Method(f"parastep-{stress_degree}", "parastep", stress_degree),
            Method(f"batchstep-{max(args.strides)}", "batchstep", max(args.strides)),
            *contestants(max(ranks, stress_degree)),  # on 3 ranks: AsyncDiff-2 and CFG on a group of 2
        )
        stress_methods = tuple({m.name: m for m in stress_methods}.values())  # parastep-P once
        sessions.append(
            replace(
                main_session,
                label="stress",
                ranks=max(ranks, stress_degree),
                steps=args.stress_steps,
                methods=stress_methods,
                threads=1,
                hook_pairs=0,
            )
        )
    rows: list[dict] = []
    hooks: dict[str, dict] = {}
    started, cpu_before = time.perf_counter(), psutil.cpu_times()
    for session in sessions:
        runs, session_hooks = run_session(session)
        rows += summarise(session, runs)
        hooks.update(session_hooks)
    steal = steal_share(cpu_before, psutil.cpu_times())
    print(format_table(rows))
    print(
        f"\nhost: {steal:.1%} of the CPU time went to other guests during the run (steal); parallel rows wait "
        "for their slowest rank, so ratios here drop on a host that steals"
    )
    for r in rows:
        if r["busy_ceiling"]:
            print(
                f"\n{r['session']} {r['model']} {r['method']}: one rank computes "
                f"{r['ideal_speedup'] / r['busy_ceiling']:.2f}x slower while every rank computes (baseline-busy), "
                f"so its ceiling here is {r['busy_ceiling']:.2f}x; measured {r['speedup_vs_1rank']:.2f}x = "
                f"{r['speedup_vs_1rank'] / r['busy_ceiling']:.2f} of it"
            )
    for r in rows:
        if r.get("skipped_work") is not None:
            print(
                f"\n{r['session']} {r['model']} {r['method']}: SparseTem skipped {r['skipped_work']:.1%} of its "
                f"layers' multiply-adds (median); {r['speedup_vs_1rank']:.2f}x the dense baseline at "
                f"PSNR {r['psnr_db']:.1f} dB"
            )
    print(
        f"\nhook cost with nothing to parallelise (ParaStep degree 1 / baseline, {args.hook_pairs} "
        f"back-to-back pairs, T={args.steps}):"
    )
    for model, h in hooks.items():
        print(
            f"  {model}: median {h['median_pct']:+.2f} %  (quartiles {h['q1_pct']:+.2f} % .. {h['q3_pct']:+.2f} %); "
            f"on a null denoiser the hooks add {h['us_per_step']:.0f} us per step = {h['pct_of_step']:.2f} % "
            f"of the baseline's {h['step_ms']:.1f} ms step"
        )
    (args.out / "bench.json").write_text(
        json.dumps(
            dict(
                command=" ".join(["python -m launcher.bench", *(argv if argv is not None else sys.argv[1:])]),
                cores=cores,
                ranks=ranks,
                backend=main_session.backend,
                device=device,
                gpus=gpus,
                seconds=time.perf_counter() - started,
                steal_share=steal,
                rows=rows,
                hook_cost=hooks,
            ),
            indent=2,
            default=str,
        )
    )
    plot(rows, args.out / "bench.png")
    print(f"\nwrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    return 0


def _main_link(p: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> int:
    from launcher import link

    if args.device == "cuda":
        p.error("--link runs CPU ranks on gloo (one per namespace): leave --device out or pass --device cpu")
    try:
        for rate in args.link:
            link.rate_bits(rate)
    except link.LinkError as exc:
        p.error(str(exc))
    why = link.unavailable()
    if why:
        p.exit(2, f"python -m launcher.bench --link: {why}\n")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: the namespaces are deleted
    cores = len(os.sched_getaffinity(0))
    methods = (Method("baseline-1rank", "baseline"), Method("parastep-2", "parastep", 2), *contestants(2))
    session = Session(
        "link",
        2,
        args.steps,
        args.warmup,
        tuple(range(args.seeds)),
        methods,
        tuple(args.models),
        tuple(args.model),
        max(1, cores // 2),
        cores,
        guidance=args.guidance,
    )
    rows: list[dict] = []
    links: list[dict] = []
    started = time.perf_counter()
    for rate in args.link:
        rated = replace(session, label=f"link-{rate}")
        print(f"[link {rate}] two nodes, tbf {rate} each way, no added latency", file=sys.stderr, flush=True)
        try:
            runs, carried = _link_session(rated, rate, args.out)
        except KeyboardInterrupt:
            print("interrupted: the ranks are stopped and the namespaces removed", file=sys.stderr)
            return 130
        mine = summarise(rated, runs)
        rows += mine
        links.append(dict(rate=rate, bits_per_s=link.rate_bits(rate), sent_bytes=carried))
        print(f"\nlink {rate} each way (tbf), two nodes, 1 rank each:\n{format_table(mine)}", flush=True)
        print(f"the link carried {carried[0]:,} B from node 0 and {carried[1]:,} B from node 1 in all", flush=True)
    (args.out / "link.json").write_text(
        json.dumps(
            dict(
                command=" ".join(["python -m launcher.bench", *(argv if argv is not None else sys.argv[1:])]),
                cores=cores,
                threads_per_rank=session.threads,
                seconds=time.perf_counter() - started,
                links=links,
                rows=rows,
            ),
            indent=2,
            default=str,
        )
    )
    print(f"\nwrote {args.out / 'link.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
