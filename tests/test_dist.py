"""ParaStep on real processes: 2 (and 3) gloo ranks spawned by the test."""

from __future__ import annotations

import copy
import errno
import math
import os
import time

import diffusers
import numpy as np
import pytest
import torch
import torch.distributed as dist

import parastep
import parastep.shm
from parastep.comm import Comm
from tests.distributed import run_ranks
from tests.toy import toy_embeds, toy_pipeline

SCHEDULERS = ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"]
T, W = 11, 2


def _scheduler_state(scheduler) -> dict:
    """Everything a later step may read, as plain comparable values."""
    state: dict[str, object] = {}
    for k, v in vars(scheduler).items():
        if k in ("step", "set_timesteps", "config", "_internal_dict"):
            continue
        if isinstance(v, torch.Tensor) or (isinstance(v, (int, float, bool, type(None))) and not callable(v)):
            state[k] = v
        elif isinstance(v, list) and all(isinstance(x, (torch.Tensor, int, float, type(None))) for x in v):
            state[k] = list(v)
    return state


def parastep_rank(rank: int, scheduler_names: list[str], steps: int, warmup: int) -> dict:
    results = {}
    for name in scheduler_names:
        pipe = toy_pipeline(getattr(diffusers, name))
        handle = parastep.apply(pipe, parastep.ParaStepConfig(warmup_steps=warmup))
        windows = []  # latents and scheduler state after every step, as seen by the pipeline
        step = pipe.scheduler.step

        def recording_step(*args, _step=step, _windows=windows, _pipe=pipe, **kwargs):
            out = _step(*args, **kwargs)
            _windows.append((out[0].clone(), copy.deepcopy(_scheduler_state(_pipe.scheduler))))
            return out

        pipe.scheduler.step = recording_step
        pe, ne = toy_embeds()
        out = pipe(pe, ne, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent")
        s = handle.last_stats
        results[name] = dict(
            out=out,
            calls=s.model_calls,
            sent=s.bytes_sent,
            received=s.bytes_received,
            actions=[r.action for r in s.records],
            windows=windows,
        )
    return results


@torch.no_grad()
def parastep_replay(scheduler_cls, steps: int, warmup: int, degree: int, guidance: float = 3.0):
    """The paper's algorithm in one process, written independently of the engine."""
    pipe = toy_pipeline(scheduler_cls)
    pe, ne = toy_embeds()
    emb = torch.cat([ne, pe])
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    ts = sched.timesteps
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma

    def raw(x, t, s):
        return pipe.unet(s.scale_model_input(torch.cat([x, x]), t), t, encoder_hidden_states=emb).sample

    def guide(r):
        u, c = r.chunk(2)
        return u + guidance * (c - u)

    cache = [None] * degree
    for i in range(warmup):
        r = raw(x, ts[i], sched)
        x = sched.step(guide(r), ts[i], x).prev_sample
        cache = [r] * degree
    k = warmup
    while k < steps:
        n, preds = min(degree, steps - k), []
        for rank in range(n):  # rank r reuses its cache for k..k+r-1, then predicts step k+r
            own, xr = copy.deepcopy(sched), x
            for j in range(rank):
                xr = own.step(guide(cache[rank]), ts[k + j], xr).prev_sample
            cache[rank] = raw(xr, ts[k + rank], own)
            preds.append(cache[rank])
        for j in range(n):  # rank 0 applies the predictions in order
            x = sched.step(guide(preds[j]), ts[k + j], x).prev_sample
        k += n
    return x


def _window_ends(steps, warmup, degree):
    return [s for s in range(warmup, steps) if (s - warmup) % degree == degree - 1 or s == steps - 1]


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(parastep_rank, 2, SCHEDULERS, T, W)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_rank0_equals_the_replayed_algorithm(two_ranks, name):
    r0, r1 = two_ranks[0][name], two_ranks[1][name]
    expected = parastep_replay(getattr(diffusers, name), T, W, 2)
    torch.testing.assert_close(r0["out"], expected, rtol=1e-5, atol=1e-6)
    baseline = toy_pipeline(getattr(diffusers, name))(
        *toy_embeds(), num_inference_steps=T, generator=torch.Generator().manual_seed(0), output_type="latent"
    )
    assert (r0["out"] - baseline).abs().max() > 1e-4  # ParaStep really ran: it is not the baseline
    windows = math.ceil((T - W) / 2)
    assert r0["calls"] == W + windows and r1["calls"] == W + (T - W) // 2
    assert r0["actions"][:W] == ["computed"] * W
    assert r0["actions"][W:] == ["computed", "received"] * ((T - W) // 2) + ["computed"] * ((T - W) % 2)
    assert r1["actions"][W : W + 2] == ["reused", "computed"]
    # P-1 predictions in, the latents out, per window: rank 1 sends what rank 0 receives
    assert r1["sent"] == r0["received"] > 0 and r0["sent"] == r1["received"] > 0


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_rank_holds_the_same_latents_and_scheduler_state_after_each_window(two_ranks, name):
    w0, w1 = two_ranks[0][name]["windows"], two_ranks[1][name]["windows"]
    assert len(w0) == len(w1) == T
    for s in _window_ends(T, W, 2):
        (x0, state0), (x1, state1) = w0[s], w1[s]
        assert torch.equal(x0, x1), f"latents differ after window ending at step {s}"
        assert state0.keys() == state1.keys()
        for key in state0:
            a, b = state0[key], state1[key]
            same = (
                all(
                    (x is None and y is None) or torch.equal(torch.as_tensor(x), torch.as_tensor(y))
                    for x, y in zip(a, b)
                )
                if isinstance(a, list)
                else torch.equal(torch.as_tensor(a), torch.as_tensor(b))
                if a is not None
                else b is None
            )
            assert same, f"{name}.{key} differs between ranks after step {s}"
    assert not torch.equal(w0[W][0], w1[W][0])  # inside a window the ranks really diverge


def _messages() -> list:
    """A call's messages on one channel: one; the same skeleton with new values; smaller; larger
    (mixed dtypes, nested state); the same but for one value's type; numpy state twice; then,
    after a new call begins, the first again."""
    import numpy as np

    one = ([torch.full((2, 8), 1.0)], {})

    def larger(lower):
        return (
            [torch.arange(16, dtype=torch.float16).reshape(2, 8)],
            {
                "model_outputs": [torch.arange(40, dtype=torch.int16), None],
                "lower_order_nums": lower,
                "mask": torch.tensor([True, False, True]),
                "t": (torch.linspace(0, 1, 10).double(), "dpm"),
            },
        )

    numpy_state = ([torch.full((2, 8), 6.0)], {"sigmas": np.array([1.0, 0.5])})
    return [
        one,
        ([torch.full((2, 8), 2.0)], {}),
        ([torch.full((2, 3), 3.0)], {}),
        larger(2),
        larger(2.0),
        numpy_state,
        numpy_state,
        "new call",
        one,
    ]


def comm_messages(rank: int, shared_memory: bool) -> dict:
    os.environ["PARASTEP_SHM_DISABLE"] = "0" if shared_memory else "1"
    refusals: list[int] = []
    if shared_memory and rank == 1:  # /dev/shm has no room past 256 bytes: larger messages go over gloo
        real = parastep.shm.os.posix_fallocate

        def full(fd: int, offset: int, length: int) -> None:
            if length > 256:
                refusals.append(length)
                raise OSError(errno.ENOSPC, "No space left on device")
            real(fd, offset, length)

        parastep.shm.os.posix_fallocate = full
    comm = Comm(dist.group.WORLD, timeout_s=10)
    cpu = torch.device("cpu")
    got, deltas = [], []
    for i, message in enumerate(_messages()):
        if message == "new call":
            comm.begin_call()
            continue
        before = comm.bytes_sent + comm.bytes_received
        if rank == 1:
            comm.send(message, 0, cpu)
            comm.flush()
        else:
            if i % 2:
                comm.expect(1, cpu)  # posted before the message is sent, as ParaStep's windows do
            got.append(comm.recv(1, cpu))
        deltas.append(comm.bytes_sent + comm.bytes_received - before)
    # between messages no operation of the group is held: nothing keeps it alive past destroy_process_group
    holds = [w for w in (comm._completed, *comm._posted.values(), *comm._pending) if w is not None]
    refused = None
    if shared_memory:  # no receive is posted ahead there (a peer ahead may mail a call's first message early)
        pass
    elif rank == 0:  # a call cannot begin while a receive of the last one is still posted
        comm.expect(1, cpu)
        try:
            comm.begin_call()
        except parastep.CommError as exc:
            refused = str(exc)
        comm.recv(1, cpu)
    else:
        comm.send(torch.ones(1), 0, cpu)
        comm.flush()
    expected = [m for m in _messages() if m != "new call"]
    matches = [(_same(e, g), repr((e, g))) for e, g in zip(expected, got)]  # compared here: no conversion
    peers = sorted(comm.shared_memory_peers)
    return dict(
        matches=matches, received=len(got), deltas=deltas, refused=refused, peers=peers, full=refusals, holds=len(holds)
    )


def _same(a, b) -> bool:
    """Equal values of equal types all the way down."""
    import numpy as np

    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def test_a_skeleton_is_left_out_only_when_nothing_in_it_can_differ():
    import numpy as np

    from parastep.comm import _same_skeleton, _strip

    def skeleton(state):
        return _strip(([torch.zeros(2, 3)], state), [])

    assert _same_skeleton(
        skeleton({"lower": 2, "kind": "dpm", "t": None}), skeleton({"lower": 2, "kind": "dpm", "t": None})
    )
    assert not _same_skeleton(skeleton({"lower": 2}), skeleton({"lower": 2.0}))  # the type changed
    assert not _same_skeleton(skeleton({"lower": 1}), skeleton({"lower": True}))
    assert not _same_skeleton(skeleton({"x": float("nan")}), skeleton({"x": float("nan")}))
    assert not _same_skeleton(_strip([torch.zeros(2, 3)], []), _strip([torch.zeros(3, 2)], []))  # shape
    assert not _same_skeleton(_strip([torch.zeros(2)], []), _strip([torch.zeros(2).double()], []))  # dtype
    sigmas = np.array([1.0])  # the same object, perhaps changed in place: it must travel again
    assert not _same_skeleton(skeleton({"sigmas": sigmas}), skeleton({"sigmas": sigmas}))


def test_messages_arrive_exactly_in_one_buffer_of_the_size_agreed_in_the_call():
    r0, r1 = run_ranks(comm_messages, 2, False)  # over gloo
    assert r0["peers"] == r1["peers"] == []
    assert r0["received"] == len(_messages()) - 1
    for same, both in r0["matches"]:
        assert same, both
    first, same, smaller, larger, *_, new_call = r0["deltas"]
    assert r1["deltas"] == r0["deltas"]  # what rank 1 sends, rank 0 receives
    assert first == 16 + same  # a call's first message: a 16-byte header, then the buffer
    assert smaller == same  # one buffer of the agreed size (padded)
    assert larger > 2 * same  # the header padded to the agreed size, then the larger buffer
    assert new_call == first  # a new call agrees its sizes again
    assert r0["holds"] == r1["holds"] == 0
    assert "stopped mid-window" in r0["refused"] and "new_group" in r0["refused"]


def test_on_one_host_messages_travel_through_shared_memory_and_over_gloo_when_it_is_full():
    r0, r1 = run_ranks(comm_messages, 2, True)
    assert r0["peers"] == [1] and r1["peers"] == [0]
    assert r0["received"] == len(_messages()) - 1
    for same, both in r0["matches"]:
        assert same, both
    first, same, smaller, larger, *_, new_call = r0["deltas"]
    assert r1["deltas"] == r0["deltas"]  # each message counted once, at its own size, on both ends
    assert first > same  # the skeleton is left out once it is known
    assert larger > 256 and r1["full"]  # `larger` and later messages went over gloo
    assert new_call == first  # a new call sends its skeleton again


MAILBOX_SIZES = [64, 64, 20_000, 20_000, 100_000, 64, 20_000]  # float32 values per message
ROOM = 300_000  # bytes /dev/shm has room for in mailbox_traffic: message 4 (400 KB) goes over gloo


def _mailbox_message(i: int) -> dict:
    """Message ``i`` of :func:`mailbox_traffic`: every value in it is ``i``."""
    import numpy as np

    n = MAILBOX_SIZES[i]
    return {"x": torch.full((n,), float(i)), "mask": torch.tensor([True, i % 2 == 0, False]), "state": np.full(3, i)}


def _padding(buf: np.ndarray) -> np.ndarray:
    """The bytes of a packed message that carry nothing: after the skeleton and after each tensor."""
    from parastep import comm

    n_blob = int(buf[:8].view(np.int64)[0])
    offset = 16 + comm._pad8(n_blob)
    gaps = [buf[16 + n_blob : offset]]
    for slot in comm._layout(comm._decode(buf[16 : 16 + n_blob].tobytes())):
        gaps.append(buf[offset + slot.nbytes : offset + comm._pad8(slot.nbytes)])
        offset += comm._pad8(slot.nbytes)
    assert offset == len(buf)
    return np.concatenate(gaps)


def mailbox_traffic(rank: int) -> dict:
    """Rank 1 sends :data:`MAILBOX_SIZES`' messages to rank 0 through their mailbox, which has
    room for all but one; rank 0 keeps every message it receives until the last has arrived."""
    os.environ["PARASTEP_SHM_DISABLE"] = "0"
    comm = Comm(dist.group.WORLD, timeout_s=10)
    cpu = torch.device("cpu")
    boxes = comm._shm
    assert boxes is not None and comm.shared_memory_peers == {1 - rank}
    if rank == 1:
        refused: list[int] = []
        over_gloo: list[np.ndarray] = []
        real_fallocate, real_isend = parastep.shm.os.posix_fallocate, dist.isend

        def full(fd: int, offset: int, length: int) -> None:
            if length > ROOM:
                refused.append(length)
                raise OSError(errno.ENOSPC, "No space left on device")
            real_fallocate(fd, offset, length)

        def isend(tensor: torch.Tensor, *args, **kwargs):
            over_gloo.append(tensor.numpy().copy())
            return real_isend(tensor, *args, **kwargs)

        parastep.shm.os.posix_fallocate = full
        dist.isend = isend
        mailbox, x_at = [], []
        for i in range(len(MAILBOX_SIZES)):
            comm.send(_mailbox_message(i), 0, cpu)
            comm.flush()
            box = boxes._out[0].map
            mailbox.append(len(box))
            _, over_group, lead = np.frombuffer(box, dtype=np.int64, count=3)
            n_blob = np.frombuffer(box, dtype=np.int64, count=1, offset=64 + lead)[0]
            if not over_group:  # where "x", the first and largest tensor, begins in the mapping
                x_at.append(int(64 + lead + 16 + -(-n_blob // 8) * 8))
        return dict(refused=refused, over_gloo=over_gloo, mailbox=mailbox, x_at=x_at)
    got, mailbox, aliased, owned = [], [], [], []
    for _ in MAILBOX_SIZES:
        message = comm.recv(1, cpu)
        box = boxes._in[1].map
        view = np.frombuffer(box, dtype=np.uint8)
        start, end = view.ctypes.data, view.ctypes.data + len(box)
        del view
        mailbox.append(len(box))
        values = [message["x"], message["mask"], torch.from_numpy(message["state"])]
        aliased.append([start <= t.data_ptr() < end or start < t.data_ptr() + t.nbytes <= end for t in values])
        owned.append([t.untyped_storage().nbytes() == t.nbytes for t in values[:2]])
        got.append(message)
    matches = [_same(_mailbox_message(i), g) for i, g in enumerate(got)]  # after every later message
    return dict(matches=matches, mailbox=mailbox, aliased=aliased, owned=owned)


def test_shared_memory_messages_are_packed_in_the_mailbox_and_copied_out_of_it_once():
    r0, r1 = run_ranks(mailbox_traffic, 2)
    assert r0["matches"] == [True] * len(MAILBOX_SIZES)  # each survived the later messages in its mailbox
    assert not any(map(any, r0["aliased"]))  # nothing received points into the mapping
    assert all(map(all, r0["owned"]))  # each tensor owns exactly its own bytes
    # a larger message grows both ends' mapping, which keeps its size when the next are smaller
    assert r1["mailbox"] == r0["mailbox"]
    small, _, large, *_ = r0["mailbox"]
    assert 64 + 256 < small < 64 + 4096 and large > 64 + 80_000
    assert r0["mailbox"] == [small, small, large, large, large, large, large]
    assert len(r1["x_at"]) == len(MAILBOX_SIZES) - 1 and all(at % 64 == 0 for at in r1["x_at"])  # on a cache line
    # the 400 KB message found no room: it went over gloo, in a zeroed buffer; the next used the mailbox
    assert len(r1["refused"]) == 1 and r1["refused"][0] > ROOM
    (sent,) = r1["over_gloo"]
    assert len(sent) > 400_000
    padding = _padding(sent.numpy())
    assert len(padding) >= 5 and not padding.any()


def switched_off_on_rank_0(rank: int) -> tuple:
    os.environ["PARASTEP_SHM_DISABLE"] = "1" if rank == 0 else "0"
    comm = Comm(dist.group.WORLD, timeout_s=10)
    again = Comm(dist.group.WORLD, timeout_s=10)  # the group's mailboxes are set up once
    cpu = torch.device("cpu")
    if rank == 1:
        comm.send(torch.arange(3), 0, cpu)
        comm.flush()
        return sorted(comm.shared_memory_peers), again._shm is comm._shm, None
    return sorted(comm.shared_memory_peers), again._shm is comm._shm, comm.recv(1, cpu)


def test_a_rank_with_shared_memory_off_keeps_its_pairs_on_gloo_and_nobody_waits():
    (peers0, reused0, got), (peers1, reused1, _) = run_ranks(switched_off_on_rank_0, 2)
    assert peers0 == peers1 == [] and reused0 and reused1
    assert torch.equal(got, torch.arange(3))


def dead_peer(rank: int) -> tuple:
    comm = Comm(dist.group.WORLD, timeout_s=30)
    dist.barrier()  # every rank unlinked its files
    left = [f for f in os.listdir("/dev/shm") if f.startswith("parastep-")]
    if rank == 1:
        return left, "", 0.0  # exits without sending: its mailboxes close
    start = time.perf_counter()
    try:
        comm.recv(1, torch.device("cpu"))
    except parastep.CommError as exc:
        return left, str(exc), time.perf_counter() - start
    return left, "no error", 0.0


def test_shared_memory_leaves_no_file_and_a_peer_that_exits_is_an_error_at_once():
    (left, message, seconds), (left1, *_) = run_ranks(dead_peer, 2, barrier=False)
    assert left == left1 == []
    assert message.startswith("rank 1 is gone") and seconds < 10  # not the 30 s timeout


def three_rank_degree(rank: int) -> tuple:
    """Degree 2 on a group of 3: rank 2 follows rank 0's latents without computing."""
    pipe = toy_pipeline()
    handle = parastep.apply(pipe, parastep.ParaStepConfig(warmup_steps=3, degree=2))
    pe, ne = toy_embeds()
    out = pipe(pe, ne, num_inference_steps=9, generator=torch.Generator().manual_seed(0), output_type="latent")
    return out, handle.last_stats.model_calls


@pytest.mark.slow  # three ranks
def test_degree_smaller_than_the_group():
    results = run_ranks(three_rank_degree, 3)
    assert torch.equal(results[0][0], results[2][0]) and torch.equal(results[0][0], results[1][0])
    assert [calls for _, calls in results] == [3 + 3, 3 + 3, 3]
    torch.testing.assert_close(results[0][0], parastep_replay(diffusers.DDIMScheduler, 9, 3, 2), rtol=1e-5, atol=1e-6)


def mismatched_rank(rank: int) -> str:
    try:
        parastep.apply(toy_pipeline(), parastep.ParaStepConfig(warmup_steps=2 + rank))
    except parastep.ConfigError as exc:
        return str(exc)
    return "no error"


def test_mismatched_configs_are_refused_on_every_rank():
    for message in run_ranks(mismatched_rank, 2):
        assert "same config" in message


def degree_too_large(rank: int) -> str:
    try:
        parastep.apply(toy_pipeline(), parastep.ParaStepConfig(degree=3))
    except parastep.ConfigError as exc:
        return str(exc)
    return "no error"


def test_degree_larger_than_the_group_is_refused():
    for message in run_ranks(degree_too_large, 2):
        assert "larger than the process group (2 rank(s))" in message


def stuck_peer(rank: int) -> tuple[str, float]:
    pipe = toy_pipeline()
    parastep.apply(pipe, parastep.ParaStepConfig(warmup_steps=2, timeout_s=3))
    if rank == 1:
        time.sleep(8)  # stuck past the 3 s timeout: never calls the pipeline
        return "stuck", 0.0
    start = time.perf_counter()
    try:
        pipe(*toy_embeds(), num_inference_steps=6, generator=torch.Generator().manual_seed(0))
    except parastep.CommError as exc:
        return str(exc), time.perf_counter() - start
    return "no error", 0.0


def test_a_stuck_peer_is_a_clear_error_naming_it_in_bounded_time():
    message, seconds = run_ranks(stuck_peer, 2, timeout=120, barrier=False)[0]
    assert message.startswith("rank 1 did not complete") and "within 3s" in message
    assert seconds < 10


def all_to_all(rank: int) -> dict:
    """Every rank sends every other rank its own tensor (and rank 0 a second, larger one)."""
    comm = Comm(dist.group.WORLD, timeout_s=10)
    cpu = torch.device("cpu")
    others = [r for r in range(comm.size) if r != rank]
    got = {}
    for size in (4, 64):
        outgoing = {r: {"from": rank, "x": torch.full((size,), float(rank))} for r in others}
        got[size] = comm.exchange(outgoing, others, cpu)
    only_to_zero = comm.exchange({0: torch.tensor([rank])} if rank else {}, others if rank == 0 else [], cpu)
    return dict(got=got, to_zero=only_to_zero)


@pytest.mark.slow  # three ranks
def test_exchange_delivers_every_message_between_three_ranks():
    results = run_ranks(all_to_all, 3)
    for rank, result in enumerate(results):
        for size, received in result["got"].items():
            assert sorted(received) == [r for r in range(3) if r != rank]
            for src, message in received.items():
                assert message["from"] == src and torch.equal(message["x"], torch.full((size,), float(src)))
    assert {src: int(t) for src, t in results[0]["to_zero"].items()} == {1: 1, 2: 2}
    assert results[1]["to_zero"] == {} and results[2]["to_zero"] == {}
