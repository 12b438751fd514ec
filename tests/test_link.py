"""Two nodes on one machine (launcher/link.py): the link's rate, its clean-up, the benchmark across
it (``launcher.bench --link``) and the app across it (torchrun's multi-node rendezvous).

Needs root or CAP_NET_ADMIN (network namespaces); every test skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import link, topology
from tests.tiny_pipelines import save_tiny_sd

WHY = link.unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"two nodes need network namespaces: {WHY}")
ROOT = Path(__file__).resolve().parent.parent

SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); n = 0
while (b := c.recv(1 << 16)): n += len(b)
c.sendall(b"x"); print(n, flush=True)
"""
CLIENT = """
import socket, sys, time
n = int(sys.argv[2]); s = socket.create_connection((sys.argv[1], 5001)); t = time.perf_counter()
s.sendall(bytes(n)); s.shutdown(socket.SHUT_WR); s.recv(1); print(time.perf_counter() - t)
"""


def _namespaces(tag: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(tag)]


def test_rate_limits_each_direction_and_namespaces_go_away() -> None:
    n = 250_000  # 2 Mbit: 0.2 s at 10mbit
    with pytest.raises(KeyboardInterrupt), link.two_nodes("10mbit") as net:
        tag = net.namespaces[0][:-2]
        assert sorted(_namespaces(tag)) == sorted(net.namespaces)
        for src, dst in ((0, 1), (1, 0)):
            server = subprocess.Popen(
                net.exec(dst, [sys.executable, "-c", SERVER, link.ADDRESSES[dst]]), stdout=subprocess.PIPE, text=True
            )
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            before = net.sent_bytes(src)
            out = subprocess.run(
                net.exec(src, [sys.executable, "-c", CLIENT, link.ADDRESSES[dst], str(n)]),
                capture_output=True,
                text=True,
                check=True,
            )
            assert int(server.communicate(timeout=30)[0].strip()) == n
            seconds = float(out.stdout)
            assert seconds > 0.9 * 8 * n / 10e6, f"{src}->{dst}: {8 * n / seconds / 1e6:.1f} Mbit/s over a 10mbit link"
            assert net.sent_bytes(src) - before >= n  # it went over the veth pair
        raise KeyboardInterrupt  # as Ctrl-C would: the namespaces still go
    assert _namespaces(tag) == []


def test_route_interface() -> None:
    assert topology.route_interface("127.0.0.1") == "lo"
    assert topology.route_interface("no-such-host.invalid") is None
    with link.two_nodes(None) as net:  # inside node 1: the veth end, for the other node and its own address
        code = "from launcher.topology import route_interface as r; print(r('10.77.0.1'), r('10.77.0.2'))"
        out = subprocess.run(net.exec(1, [sys.executable, "-c", code]), capture_output=True, text=True, cwd=ROOT)
        assert out.stdout.split() == [link.INTERFACE, link.INTERFACE], out.stderr[-2000:]


def test_rates_are_checked() -> None:
    assert link.rate_bits("100mbit") == 10**8 and link.rate_bits("1.5gbit") == 1_500_000_000
    for bad in ("100", "fast", "1mb", "10bit"):
        with pytest.raises(link.LinkError, match="link rate"):
            link.rate_bits(bad)


def test_a_failed_node_ends_the_wait_for_the_other() -> None:
    from launcher.bench import _wait_nodes

    procs = [subprocess.Popen(["sleep", "60"]), subprocess.Popen(["sh", "-c", "exit 1"])]
    try:  # the node still running would wait out torchrun's 300 s exit barrier for the failed one
        start = time.monotonic()
        _wait_nodes(procs, timeout_s=60, grace_s=1)
        assert time.monotonic() - start < 10 and procs[0].poll() is None and procs[1].returncode == 1
        with pytest.raises(TimeoutError, match="did not finish within 1 s"):  # none failed: the session's limit
            _wait_nodes(procs[:1], timeout_s=1)
    finally:
        procs[0].kill()
        procs[0].wait()


@pytest.mark.slow  # the benchmark as a subprocess
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) drops the capability")
def test_without_net_admin_the_command_says_why(tmp_path: Path) -> None:
    cmd = ["setpriv", "--inh-caps=-net_admin,-sys_admin", "--bounding-set=-net_admin,-sys_admin"]
    cmd += [sys.executable, "-m", "launcher.bench", "--link", "10mbit", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--link: cannot create network namespaces (needs root or CAP_NET_ADMIN)" in proc.stderr


@pytest.mark.slow  # the benchmark as a subprocess, two torchrun nodes per rate
def test_bench_over_two_rates(tmp_path: Path) -> None:
    model = save_tiny_sd(tmp_path)
    out = tmp_path / "link"
    cmd = [sys.executable, "-m", "launcher.bench", "--models", "--model", str(model), "--steps", "8"]
    cmd += ["--warmup", "2", "--seeds", "1", "--out", str(out), "--link", "1gbit", "10mbit"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    assert _namespaces(f"parastep-{proc.pid}-") == []  # cleaned up
    result = json.loads((out / "link.json").read_text())
    rows = {(r["session"], r["method"]): r for r in result["rows"]}
    methods = ("baseline-1rank", "parastep-2", "asyncdiff-2", "cfg-parallel")
    assert set(rows) == {(f"link-{rate}", m) for rate in ("1gbit", "10mbit") for m in methods}
    for rate in ("1gbit", "10mbit"):  # a table per rate
        assert f"link {rate} each way (tbf)" in stdout
        mine = {m: rows[f"link-{rate}", m] for m in methods}
        assert mine["parastep-2"]["model_calls_per_rank"] == "5/5" and mine["asyncdiff-2"]["ranks"] == 2
        assert mine["asyncdiff-2"]["bytes_per_call"] > mine["parastep-2"]["bytes_per_call"] > 0
        assert mine["cfg-parallel"]["psnr_db"] > 100 and 10 < mine["parastep-2"]["psnr_db"]
    # the same messages whatever the rate (AsyncDiff cuts its stages by measured block time, so its
    # bytes may differ from run to run on a model this small)
    for m in ("parastep-2", "cfg-parallel"):
        assert rows["link-10mbit", m]["bytes_per_call"] == rows["link-1gbit", m]["bytes_per_call"]
    links = {entry["rate"]: entry for entry in result["links"]}
    sent = sum(rows["link-10mbit", m]["bytes_per_call"] for m in methods)
    assert sum(links["10mbit"]["sent_bytes"]) >= sent  # every message crossed the veth pair
    # 10mbit is slow enough to cost AsyncDiff its megabits: slower than at 1gbit
    slow, fast = rows["link-10mbit", "asyncdiff-2"], rows["link-1gbit", "asyncdiff-2"]
    assert slow["wall_median_s"] > fast["wall_median_s"] + 0.5 * 8 * slow["bytes_per_call"] / 10e6 / 2


@pytest.mark.slow  # the benchmark as a subprocess
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_bench_interrupted_leaves_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    model = save_tiny_sd(tmp_path)
    cmd = [sys.executable, "-m", "launcher.bench", "--models", "--model", str(model), "--steps", "40"]
    cmd += ["--warmup", "2", "--seeds", "20", "--out", str(tmp_path / "out"), "--link", "1mbit"]
    # Ctrl-C reaches a foreground program, whose SIGINT is not ignored; a suite started in the
    # background of a non-interactive shell would hand its SIG_IGN down, and Python keeps it
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, preexec_fn=default_sigint
    )
    tag = f"parastep-{proc.pid}-"
    deadline = time.monotonic() + 120
    while len(_namespaces(tag)) < 2 or not _rank_pids(tag):  # the ranks run in the namespaces
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    ranks = _rank_pids(tag)
    time.sleep(3)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], stderr[-3000:]
    assert _namespaces(tag) == []
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks), "a rank outlived the benchmark"


def _rank_pids(tag: str) -> list[int]:
    """Processes inside the namespaces whose names start with ``tag``."""
    pids = []
    for ns in _namespaces(tag):
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        pids += [int(p) for p in out.split()]
    return pids


CLIENT_APP = """
import json, sys, time, urllib.request
from gradio_client import Client
url = "http://127.0.0.1:7860/"
deadline = time.monotonic() + 480
while True:
    try:
        urllib.request.urlopen(url, timeout=5).read(); break
    except Exception:
        if time.monotonic() > deadline: raise
        time.sleep(2)
result = Client(url, verbose=False).predict(
    prompt="a large red circle in the center on a blue background", model="built-in image", method="parastep",
    steps=6, warmup_steps=2, guidance_scale=3.0, seed=7, api_name="/compare")
value = result[9]
print(json.dumps(json.loads(value) if isinstance(value, str) else value))
"""


@pytest.mark.slow  # two app processes under torchrun, one in each namespace
def test_app_across_two_nodes(tmp_path: Path) -> None:
    # no GLOO_SOCKET_IFNAME: the app picks the interface that reaches node 0 (here the veth pair)
    env = {"PARASTEP_CONTROL_TOKEN": secrets.token_hex(32)}
    env |= {"GRADIO_SERVER_PORT": "7860", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
    env["PARASTEP_SHM_DISABLE"] = "1"  # the two "nodes" share /dev/shm: every message must cross the link
    procs: list[subprocess.Popen] = []
    with link.two_nodes("1gbit") as net:
        try:
            for node, addr in enumerate(link.ADDRESSES):
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"]
                cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={link.ADDRESSES[0]}:29400", "--rdzv-id=app"]
                cmd += [f"--local-addr={addr}", f"--rdzv-conf=is_host={int(node == 0)}", "--max-restarts=0"]
                cmd += [str(ROOT / "app.py"), "--builtins", "image", "--threads-per-rank", "1"]
                log = (tmp_path / f"node{node}.log").open("w")
                procs.append(
                    subprocess.Popen(
                        net.exec(node, ["env", *(f"{k}={v}" for k, v in env.items()), *cmd]),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        cwd=ROOT,
                    )
                )
            before = net.sent_bytes(1)
            client = subprocess.run(
                net.exec(0, [sys.executable, "-c", CLIENT_APP]), capture_output=True, text=True, timeout=600, cwd=ROOT
            )
            logs = "\n".join(f"--- node {n} ---\n{(tmp_path / f'node{n}.log').read_text()[-3000:]}" for n in range(2))
            assert client.returncode == 0, client.stderr[-3000:] + logs
            stats = json.loads(client.stdout.strip().splitlines()[-1])
            calls = stats["method"]["model_calls_per_rank"]
            assert stats["method"]["method"] == "parastep" and len(calls) == 2 and min(calls) > 0, stats
            assert stats["method"]["bytes_communicated"] > 0
            assert net.sent_bytes(1) - before > 0  # node 1 answered over the link
            for n in range(2):
                assert (
                    f"gloo on {link.INTERFACE}, the interface that reaches {link.ADDRESSES[0]}"
                    in (tmp_path / f"node{n}.log").read_text()
                )
            print(f"\ntwo nodes: {json.dumps(stats)}; node 1 sent {net.sent_bytes(1) - before} B over the link")
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
