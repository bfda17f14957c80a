"""Wire the store, the gRPC server and the admin API onto one asyncio loop; stop on a signal."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
from dataclasses import dataclass
from pathlib import Path

from .control import Controls
from .seed import load_seed
from .store import Store
from .surfaces.admin_http import start_admin
from .surfaces.grpc import start_grpc
from .surfaces.rest import start_rest

log = logging.getLogger("cloudrun_emulator")


@dataclass(frozen=True)
class Options:
    host: str = "127.0.0.1"
    port: int = 0
    admin_port: int = 0
    seed: str | None = None
    rollout_ms: int = 0
    audit_topic: str | None = None
    ready_file: str | None = None
    random_seed: int | None = None
    parent_pid: int | None = None
    rest_port: int | None = None  # None = no REST surface


async def serve(opts: Options, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or `stop` is set)."""
    stop = stop or asyncio.Event()
    rng = random.Random(opts.random_seed)
    publisher = None
    if opts.audit_topic:
        from .audit import AuditPublisher

        publisher = AuditPublisher(opts.audit_topic)
        await asyncio.get_running_loop().run_in_executor(None, publisher.ensure_topic)
    store = Store(
        rollout_ms=opts.rollout_ms, rng=rng, audit=publisher.publish if publisher else None
    )
    controls = Controls(rng=random.Random(rng.random()))
    if opts.seed:
        services, accounts = load_seed(store, opts.seed)
        log.info(
            "seed_loaded file=%s services=%d serviceAccounts=%d", opts.seed, services, accounts
        )

    grpc_server, grpc_port = await start_grpc(store, controls, opts.host, opts.port)
    runner, admin_port = await start_admin(store, controls, opts.host, opts.admin_port)
    rest_runner, rest_port = None, None
    if opts.rest_port is not None:
        rest_runner, rest_port = await start_rest(store, controls, opts.host, opts.rest_port)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    log.info(
        "listening grpc=%s:%d admin=http://%s:%d rest=%s rollout_ms=%d audit_topic=%s",
        opts.host,
        grpc_port,
        opts.host,
        admin_port,
        f"http://{opts.host}:{rest_port}" if rest_port is not None else "-",
        opts.rollout_ms,
        opts.audit_topic or "-",
    )
    if opts.ready_file:
        _write_ready_file(opts.ready_file, grpc_port, admin_port, rest_port)
    watchdog = None
    if opts.parent_pid:
        watchdog = asyncio.create_task(_watch_parent(opts.parent_pid, stop))
    try:
        await stop.wait()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        log.info("stopping")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await grpc_server.stop(grace=0.5)
        await runner.cleanup()
        if rest_runner is not None:
            await rest_runner.cleanup()
        if publisher is not None:
            await loop.run_in_executor(None, publisher.close)
        log.info("stopped")


def _write_ready_file(path: str, grpc_port: int, admin_port: int, rest_port: int | None) -> None:
    """Atomically, so a reader never sees half a file."""
    tmp = Path(path + ".tmp")
    info: dict[str, int] = {"grpcPort": grpc_port, "adminPort": admin_port, "pid": os.getpid()}
    if rest_port is not None:
        info["restPort"] = rest_port
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


async def _watch_parent(pid: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            log.info("parent_gone pid=%d", pid)
            stop.set()
            return
        except PermissionError:
            pass  # exists, owned by someone else
        await asyncio.sleep(1.0)
