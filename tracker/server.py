"""The trio shell: serve a :class:`~tracker.app.Tracker` with hypercorn's trio worker.

``serve_tracker`` is started with ``nursery.start`` and reports the bound ``(host, port)``, so
tests and the demo can listen on port 0. It also runs the tracker's background duty (feed
watching, expiry). Cancelling the enclosing scope, or setting ``shutdown``, stops it: hypercorn
closes listeners and open connections (design.md section 10: its shutdown is immediate), then
the stores are closed.

With ``announce_port`` (0 = any free port) it also runs the fast announce listener
(:mod:`tracker.fastpath`) on the same host; its port is ``tracker.fast_port`` and is advertised
in announce answers.
"""

from __future__ import annotations

import functools

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from .app import Tracker
from .fastpath import serve_announces

__all__ = ["serve_tracker"]


async def serve_tracker(
    tracker: Tracker,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    shutdown: trio.Event | None = None,
    announce_port: int | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    config = Config()
    bind_host = f"[{host}]" if ":" in host else host
    config.bind = [f"{bind_host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 2.0
    config.keep_alive_timeout = 75.0
    stop = trio.Event() if shutdown is None else shutdown
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(tracker.run)  # the log mode catches up before serving
            if announce_port is not None:
                await nursery.start(
                    functools.partial(serve_announces, tracker, host, announce_port)
                )
            binds = await nursery.start(
                lambda task_status: serve(
                    tracker,  # type: ignore[arg-type]
                    config,
                    shutdown_trigger=stop.wait,
                    task_status=task_status,
                )
            )
            bound = binds[0].rsplit(":", 1)
            task_status.started((host, int(bound[1])))
            await stop.wait()
            nursery.cancel_scope.cancel()
    finally:
        tracker.load.close()
        tracker.ops.close()
        tracker.registry.close()
        tracker.swarm.close()
        tracker.fleet.store.close()
