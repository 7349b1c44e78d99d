"""Dask (``dask.distributed``) for work beyond one process: ``--cluster local`` or ``--cluster tcp://host:port``.

``local`` starts an embedded :class:`distributed.LocalCluster` of ``n_workers`` worker processes (one thread
each, so the numeric libraries do not oversubscribe the cores); an address connects to an existing
scheduler (a Slurm/Kubernetes/cloud Dask cluster started with ``dask-scheduler``/``dask-worker``,
``dask-jobqueue`` or ``dask-kubernetes``). Each chunk of work is one task, named after its cache key, and
writes its result to the shared output folder itself, so a rerun skips what is finished and a lost worker
only costs its task: the scheduler hands it to another worker (``distributed.scheduler.allowed-failures``
retries). With a remote cluster the output folder must be on a file system every worker sees.

Memory allocator of the workers: Dask starts them with ``MALLOC_TRIM_THRESHOLD_=65536`` (so that freed memory
goes back to the system), which also switches off glibc's adaptive mmap threshold; every array above 128 kB
is then a fresh ``mmap`` whose pages fault in again on first touch, and torch's convolutions on a batch of
spectra (tens of MB of temporaries per layer) ran about 1.7 times slower than in a plain process. The
workers of ``local`` therefore also get ``MALLOC_MMAP_THRESHOLD_=33554432`` (32 MiB, glibc's adaptive
maximum; unless the environment sets it): such temporaries are reused from the heap and the trimming
stays. With a fixed trim threshold the top of the heap is still given back after every large free and
faulted in again on the next allocation: preprocessing a chunk of 1000 spectra in a worker took ~420,000
page faults (0.5 s of system time, 15 % of the chunk) in a fresh worker and 50,000-90,000 later. So they
also get ``MALLOC_TOP_PAD_=67108864`` (64 MiB kept at the top of the heap when it grows or is trimmed; a
worker holds at most that much more memory): the chunk then costs the CPU time it costs in a plain
process. Start the workers of a remote cluster with the same variables.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

log = logging.getLogger(__name__)

#: Environment of ``local`` worker processes, added to Dask's ``distributed.nanny.pre-spawn-environ`` (see the
#: module docstring); a variable already in the environment wins.
WORKER_ENVIRON = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TOP_PAD_": str(64 * 2**20)}


def check_cluster_address(value: str | None) -> str | None:
    """``None``, ``'local'``, or a scheduler address such as ``tcp://host:8786`` (else ``ValueError``)."""
    if value is None or value == "":
        return None
    if value == "local" or "://" in value:
        return value
    raise ValueError(f"--cluster takes 'local' or a scheduler address such as tcp://host:8786, not {value!r}")


@contextlib.contextmanager
def dask_client(
    cluster: str | None,
    n_workers: int = 2,
    *,
    threads_per_worker: int = 1,
    dashboard_address: str | None = ":0",
    memory_limit: str | float | None = "auto",
) -> Iterator[Any]:
    """A ``distributed.Client`` for ``cluster`` (``None`` yields ``None``: no Dask at all).

    ``'local'`` starts a :class:`~distributed.LocalCluster` of ``n_workers`` processes (closed on exit; their
    environment adds :data:`WORKER_ENVIRON`); anything else is the address of a running scheduler. The
    dashboard link is logged.
    """
    cluster = check_cluster_address(cluster)
    if cluster is None:
        yield None
        return
    import dask
    from distributed import Client, LocalCluster

    lc = None
    if cluster == "local":
        environ = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_ENVIRON.items()}
        with dask.config.set(environ):
            lc = LocalCluster(
                n_workers=n_workers,
                threads_per_worker=threads_per_worker,
                processes=True,
                dashboard_address=dashboard_address,
                memory_limit=memory_limit,
            )
        client = Client(lc)
    else:
        client = Client(cluster)
    try:
        info = client.scheduler_info()
        n = len(info.get("workers", {}))
        if "dashboard" in info.get("services", {}):
            log.info("Dask cluster %s: %d workers; dashboard %s", cluster, n, client.dashboard_link)
        else:
            log.info("Dask cluster %s: %d workers (no dashboard: install bokeh>=3.1 for it)", cluster, n)
        yield client
    finally:
        client.close()
        if lc is not None:
            lc.close()


def run_tasks(
    client: Any,
    fn: Callable[..., Any],
    args: Sequence[tuple[Any, ...]],
    keys: Sequence[str],
    on_done: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """Run ``fn(*args[i])`` as the task ``keys[i]`` for every ``i``; return the results in order.

    ``on_done(i, result)`` is called in the client as each task finishes (progress, logging). A task whose
    worker dies is rerun elsewhere by the scheduler; an exception in a task is raised here.
    """
    from distributed import as_completed

    futures = [client.submit(fn, *a, key=k, pure=False) for a, k in zip(args, keys, strict=True)]
    index = {f.key: i for i, f in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    try:
        for fut in as_completed(futures):
            i = index[fut.key]
            results[i] = fut.result()
            if on_done is not None:
                on_done(i, results[i])
    finally:
        for f in futures:
            f.release()
    return results


def process_peak_rss(client: Any) -> dict[str, float]:
    """Peak resident memory (MB) of the scheduler and of each worker process (``ru_maxrss``)."""

    def peak() -> float:
        import resource
        import sys

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024 if sys.platform != "darwin" else kb / 2**20

    out = {"scheduler": float(client.run_on_scheduler(peak))}
    for i, (_addr, v) in enumerate(sorted(client.run(peak).items())):
        out[f"worker{i}"] = float(v)
    return out


def cluster_option(what: str) -> Callable[[Any], Any]:
    """The ``--cluster`` click option of a command (``what`` says what runs as tasks)."""
    import click

    def callback(ctx: Any, param: Any, value: str | None) -> str | None:
        try:
            return check_cluster_address(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None

    return click.option(
        "--cluster",
        default=None,
        metavar="local|tcp://HOST:PORT",
        callback=callback,
        help=f"Run {what} as Dask tasks: 'local' starts a LocalCluster of --n-workers processes, an "
        "address uses a running Dask scheduler (its workers must see the output folder). Without it, "
        "nothing changes.",
    )
