"""ParaStep Studio: the app.

    python app.py                          # rank 0 here + peers it spawns (GPUs, or --ranks CPU ranks)
    torchrun --nproc_per_node=N app.py     # same app; rank 0 serves, the others follow

Serves on 127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT respected).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
import threading

from launcher.models import BUILTIN_KINDS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks to spawn when there is no GPU (default 2)")
    parser.add_argument(
        "--threads-per-rank",
        type=int,
        default=None,
        help="torch threads per CPU rank (default: the cores split between ranks)",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="ID_OR_PATH",
        help="a diffusers model id (from the local HF cache) or local path; repeatable",
    )
    parser.add_argument(
        "--builtins",
        default=",".join(BUILTIN_KINDS),
        help="built-in demo models to load: comma-separated of image,video,audio, or 'none'",
    )
    parser.add_argument(
        "--peer-timeout",
        type=float,
        default=30.0,
        help="seconds a ParaStep run waits on a peer before failing with an error naming it",
    )
    parser.add_argument(
        "--preview-every",
        type=float,
        default=0.3,
        metavar="SECONDS",
        help="stream a preview at most this often while denoising (default 0.3; 0: progress only, no previews)",
    )
    parser.add_argument("--share", action="store_true", help="create a public Gradio link")
    args = parser.parse_args(argv)
    args.builtins = [] if args.builtins.strip() in ("", "none") else [k.strip() for k in args.builtins.split(",")]
    unknown = set(args.builtins) - set(BUILTIN_KINDS)
    if unknown:
        parser.error(f"--builtins: unknown kind(s) {sorted(unknown)}; choose from {list(BUILTIN_KINDS)}")
    if not args.builtins and not args.model:
        parser.error("nothing to serve: keep a built-in model or pass --model")
    if args.ranks < 1:
        parser.error("--ranks must be at least 1")
    return args


def _quiet_at_rest(demo) -> None:
    """Make the idle app cost next to nothing: a hosted demo sits at rest most of its life.

    Measured on this 2-core machine (2 ranks, 20 s windows, 2026-11-28): Gradio's queue polls for
    work every 1 ms and for progress every 10 ms (4-6 % of a core); at 250 ms / 500 ms it costs
    ~0.15 % (a request may start up to 250 ms later). Uvicorn's server loop wakes every 100 ms to
    refresh its Date header and check for shutdown: ~0.25 % of a core on its own; once a second is
    enough for both (the header has one-second resolution; shutdown waits up to 1 s more). Together
    with the main thread waiting on an event instead of Gradio's 100 ms sleep loop: 0.15-0.2 % of a
    core for the whole app, against 0.45-0.6 % before.
    """
    import asyncio

    from gradio import http_server

    queue = getattr(demo, "_queue", None)
    if queue is not None and hasattr(queue, "sleep_when_free"):
        queue.sleep_when_free, queue.progress_update_sleep_when_free = 0.25, 0.5

    async def main_loop(server) -> None:  # uvicorn.Server.main_loop, ticking once a second
        while not await server.on_tick(0):  # counter 0: the Date header is refreshed every tick
            await asyncio.sleep(1.0)

    if hasattr(http_server.Server, "main_loop") and hasattr(http_server.Server, "on_tick"):
        # Gradio's own subclass only, not uvicorn.Server:
        http_server.Server.main_loop = main_loop  # type: ignore[method-assign,assignment]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    from launcher import topology
    from launcher.control import ControlChannel
    from launcher.models import load_models, warm_up

    topo = topology.start(args.ranks, args.threads_per_rank, [os.path.abspath(__file__), *sys.argv[1:]])
    channel = ControlChannel(topo.store, topo.rank, topo.token)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints where every thread is
    if not topo.is_leader:
        from launcher import peer

        models = load_models(args.builtins, args.model, topo.device)
        warm_up(models, latent_only=True)
        try:
            peer.serve(topo, channel, models)
        except (RuntimeError, ConnectionError) as exc:  # the store lives in rank 0: it is gone
            logging.getLogger("app").warning("rank 0 is gone (%s); exiting", exc)
            os._exit(0)
        os._exit(0)  # never wait on a process-group teardown that may involve a dead rank

    from launcher.backend import Backend
    from ui.app import CSS, build_demo

    # SIGTERM (e.g. from a test or a supervisor) must also take the spawned peers down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    backend = None
    code = 0
    try:
        models = load_models(args.builtins, args.model, topo.device)
        warm_up(models, latent_only=False)
        backend = Backend(topo, channel, models, peer_timeout_s=args.peer_timeout, preview_every_s=args.preview_every)
        backend.start()
        demo = build_demo(backend)
        demo.queue(max_size=64)
        _quiet_at_rest(demo)
        demo.launch(
            share=args.share or None,
            css=CSS,
            show_error=True,
            footer_links=["api", "gradio"],
            prevent_thread_lock=True,  # Gradio's own wait polls every 100 ms; ours sleeps until a signal
        )
        threading.Event().wait()  # SIGTERM / Ctrl-C end it (SystemExit / KeyboardInterrupt below)
    except (KeyboardInterrupt, SystemExit):
        pass
    except BaseException:
        logging.getLogger("app").exception("rank 0 failed")
        code = 1
    finally:
        if backend is not None:
            backend.close()
        else:
            topo.stop_children()
        os._exit(code)


if __name__ == "__main__":
    main()
