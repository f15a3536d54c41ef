"""Optuna's gRPC storage proxy on the Ray driver (`pet-sweep run --ray --storage-proxy`).

Optuna's documented path for many workers: one process holds the database connections
(`optuna.storages.run_grpc_proxy_server`), and the workers open
`optuna.storages.GrpcStorageProxy(host, port)` instead of the database URL. The number of
PostgreSQL connections then stays that of the driver, whatever the number of workers,
and the workers never see the database URL or its password: their experiment names the
proxy (``grpc://HOST:PORT``, `sweep.storage.make_storage` opens it).

What the workers lose: `GrpcStorageProxy` records no heartbeats, so Optuna cannot fail
the trial of a worker that died. On Ray the engine knows instead: a worker's task that
Ray started again first fails the trials its dead predecessor left RUNNING and queues
their retry (`launch.ray_worker.take_over`); a worker that Ray does not start again leaves
its trial to the driver, which fails and queues it once every worker has ended.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import grpc  # optional: comes with ray[default] (the `ray` extra), as this module is only used with Ray
import optuna

# Private, wrapped in `storage_proxy` alone and pinned by tests/test_ray.py (the proxy serves,
# then stops): the public optuna.storages.run_grpc_proxy_server cannot serve here, as it blocks
# in server.wait_for_termination() with no handle to stop the server, so in a thread it would
# leave an unauthenticated port open for the driver's whole life (a notebook's).
from optuna.storages._grpc.auto_generated.api_pb2_grpc import add_StorageServiceServicer_to_server  # private
from optuna.storages._grpc.servicer import OptunaStorageProxyService  # private, see above

from pet_sweep.config import JOURNAL_PREFIX, Experiment
from pet_sweep.errors import ConfigError
from pet_sweep.sweep.storage import GRPC_PREFIX, make_storage

THREADS = 10  # the server's threads, as Optuna's default: at most this many requests at once


def grpc_url(host: str, port: int) -> str:
    return f"{GRPC_PREFIX}[{host}]:{port}" if ":" in host else f"{GRPC_PREFIX}{host}:{port}"


def check_proxied(exp: Experiment) -> None:
    """Refuse a storage the proxy cannot serve, before any study or run exists."""
    if exp.storage_url.startswith((JOURNAL_PREFIX, GRPC_PREFIX)):
        kind = "a journal file" if exp.storage_url.startswith(JOURNAL_PREFIX) else "another proxy"
        raise ConfigError(f"--storage-proxy serves a database (PostgreSQL, MySQL/MariaDB, SQLite), "
                          f"but the experiment's storage is {kind}")


@contextlib.contextmanager
def storage_proxy(exp: Experiment, host: str) -> Iterator[Experiment]:
    """Serve `exp`'s storage on `host` (a free port) while the block runs; yields the
    experiment as the workers see it (its storage: the proxy). The server is stopped
    when the block ends, by an exception or Ctrl-C too.

    `host` is an address of this machine that the workers reach (Ray's node address of
    the driver). The proxy has neither authentication nor TLS: anyone who reaches the port
    can read and write every study in the database, so it listens on that one address,
    not on every interface (0.0.0.0), and only while the sweep runs.
    """
    check_proxied(exp)
    # The proxy's server, as optuna.storages.run_grpc_proxy_server builds it (optuna's private
    # server.make_server); that function blocks until the process ends and has no way to stop
    # the server, so it is built here, to learn the free port it took and to stop it.
    # get_storage: the RDB storage behind Optuna's in-process cache, as its docs advise for the proxy
    storage = optuna.storages.get_storage(make_storage(exp.storage_url, exp.config.faults))
    pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="pet-sweep-storage-proxy")
    server = grpc.server(pool)
    add_StorageServiceServicer_to_server(OptunaStorageProxyService(storage), server)
    try:
        port = server.add_insecure_port(f"[{host}]:0" if ":" in host else f"{host}:0")
    except RuntimeError as err:
        pool.shutdown(wait=False)
        raise ConfigError(f"--storage-proxy: cannot listen on {host}: {err}") from None
    server.start()
    try:
        yield exp.with_overrides(storage=grpc_url(host, port))
    finally:
        server.stop(grace=2).wait()
        pool.shutdown(wait=True)
