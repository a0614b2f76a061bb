"""Starting or joining the Ray a job scores on, and checking a cluster it joins before any actor is
made: the address reachable and of a form Ray takes, a failure to join said in one line, and each node
able to import this package and to read the files the actors will (check_cluster). Apart from the
scoring stage (pipeline/run_stage.py) and the job, so that their readers need not read Ray's plumbing;
it imports nothing else of the pipeline, and a node's probe task (_files_there) loads only this module.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from sanitizer.errors import Terminated, UsageError


def cluster_address(given: str | None) -> str | None:
    """--ray-address, else RAY_ADDRESS, as `ray job submit` sets it; None: a local Ray."""
    return given or os.environ.get("RAY_ADDRESS")


def joined_cluster(given: str | None) -> str | None:
    """The address of the cluster a job joins; None for a Ray of its own (no address, or `local`)."""
    address = cluster_address(given)
    return None if address in (None, "", "local") else address


# Set while a job's scoring runs on a Ray it started (or joined), and after that scoring was stopped:
# stop_own_ray's to shut down. A Ray that was running (a caller's, a test session's) is not the job's.
OWN_RAY = threading.Event()


def ensure_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Join a cluster when given an address; otherwise start a quiet local one. False where Ray was
    running already."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    address = cluster_address(address)
    if address:
        check_reachable(address)
        kwargs["address"] = address
    else:  # "local": a new Ray, even where `ray start` left a cluster running that ray.init would join
        kwargs |= {"address": "local", "num_cpus": num_cpus, "object_store_memory": 512 * 1024**2}
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(**kwargs)
    except SystemExit as e:  # Ray's own SIGTERM handler, active while Ray starts, exits with the signal
        if e.code == signal.SIGTERM:
            raise Terminated from None
        raise
    except ConnectionError as e:  # something answers there, but Ray could not join it
        if address:
            raise UsageError(join_failure(address, e)) from None
        raise
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)  # Ray's driver handler dumps a stack and aborts
    return True


def ray_for_job(address: str | None) -> None:
    """ensure_ray for a job's scoring: a Ray it starts or joins is the job's, for stop_own_ray."""
    if ensure_ray(address):
        OWN_RAY.set()


def cluster_resources(address: str) -> dict[str, float]:
    import ray

    ray_for_job(address)
    return ray.cluster_resources()


def stop_own_ray() -> None:
    """Shut down the Ray that the stopped job's scoring started: the CLI calls it, deaf to a second
    signal, before it says the signal's line. Left to Ray's exit handler, that took seconds after the
    line (a local Ray's processes stopped one by one), in which Ray's notes of the actors it killed
    followed the line, and a second Ctrl-C ended in Ray's traceback."""
    if not OWN_RAY.is_set():
        return
    import ray

    ray.shutdown()
    OWN_RAY.clear()


REACH_TIMEOUT_S = 10.0


def check_reachable(address: str) -> None:
    """Refuse a cluster address that nothing answers at: ray.init retries it for minutes, holding the
    run. `auto` and `local` are left to Ray, as is another module's scheme (`anyscale://`)."""
    endpoint = cluster_endpoint(address)
    if endpoint is None:
        return
    try:
        socket.create_connection(endpoint, timeout=REACH_TIMEOUT_S).close()
    except OSError as e:
        raise UsageError(
            f"cannot reach the Ray cluster at {address} ({e.strerror or e}); "
            "check --ray-address or RAY_ADDRESS"
        ) from None


# What a cluster address may be, as a refusal says
ADDRESS_FORMS = (
    "give the head's HOST:PORT (its GCS, port 6379 unless `ray start --port` chose), ray://HOST:PORT or auto"
)


def cluster_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) of a HOST:PORT or ray://HOST:PORT address (an IPv6 host in brackets, as Ray writes
    it: [::1]:6379); None for `auto`, `local` and other modules' schemes, which Ray resolves. An
    address of neither form is refused: Ray raised a ValueError with its traceback for it, and for
    the job server's http:// address (the one `ray job submit` takes) said to unset RAY_ADDRESS."""
    scheme, _, rest = address.rpartition("://")
    if address in ("auto", "local") or scheme not in ("", "ray", "http", "https"):
        return None
    if scheme.startswith("http"):
        raise UsageError(
            f"--ray-address {address} is the address of the cluster's job server, which `ray job "
            f"submit --address` takes; {ADDRESS_FORMS}"
        )
    host, _, port = rest.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--ray-address {address} is not a Ray cluster's address: {ADDRESS_FORMS}")
    return host, int(port)


def join_failure(address: str, error: ConnectionError) -> str:
    """Why ray.init could not join the cluster at `address`, which answers, and what to do. A cluster
    that `ray start` began with token authentication (Ray does so where ~/.ray/auth_token exists)
    refuses a driver without RAY_AUTH_MODE=token: Ray says only "Failed to connect", the gRPC status
    (InvalidAuthToken) in the text of the error it raises from."""
    if any("InvalidAuthToken" in str(e) for e in causes(error)):  # in the text of a RuntimeError
        return (
            f"the Ray cluster at {address} asks for its authentication token: run with "
            "RAY_AUTH_MODE=token, the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN"
        )
    return f"cannot join the Ray cluster at {address} ({error}); check --ray-address or RAY_ADDRESS"


def causes(error: BaseException) -> Iterator[BaseException]:
    """`error` and the exceptions it was raised from, innermost last (Ray wraps the one that says why)."""
    seen: BaseException | None = error
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


# A file the scoring actors read is hashed on each node up to this size (a decoder, most encoder
# weights): a stale copy of the same size is caught too; a larger one is compared by its size alone.
HASHED_BYTES = 64 << 20


@dataclass(frozen=True)
class Fingerprint:
    """A file as one node sees it: its size and (up to HASHED_BYTES) sha256, or why it cannot be read."""

    size: int | None = None
    sha256: str | None = None
    why: str | None = None


def fingerprint(path: str) -> Fingerprint:
    """`path` as this process sees it: opened and read (there is not enough: it must be readable)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > HASHED_BYTES:
                f.read(1)  # readable, not only there
                return Fingerprint(size)
            return Fingerprint(size, hashlib.file_digest(f, "sha256").hexdigest())
    except OSError as e:
        return Fingerprint(why=e.strerror or type(e).__name__)


def _files_there(paths: list[str]) -> list[Fingerprint]:
    """The task each node runs before any actor starts: a worker unpickles it by importing this
    module, as every scoring actor must, and it fingerprints the files the actors will read there."""
    return [fingerprint(p) for p in paths]


# What a worker says when it lacks the package, or has an older one without this module's probe task.
UNIMPORTABLE = r"(?:No module named|Can't get attribute) [^\n]*"


# How to give every node the files the actors read
SHARE_FILES = (
    "put DECODER_DIR and the encoder weights on storage that every node shares, or copy them to the "
    "same paths on every node"
)


def check_cluster(address: str, files: list[str]) -> None:
    """Ask each node of a joined cluster that can hold a scoring actor (one with CPUs) to import this
    package and to read `files` as the driver reads them, before any actor is made: one task pinned to
    each node. Where a node lacks the package or a file (a local disk, not shared storage) or holds
    another copy, each actor placed there fails and is retried, in pages of tracebacks. A cluster too
    busy to answer within a minute, or a node gone meanwhile, is left to the actors."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    expected = [fingerprint(f) for f in files]
    task = ray.remote(num_cpus=0, max_retries=0)(_files_there)
    probes = [
        (
            node["NodeManagerAddress"],
            task.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(files),
        )
        for node in ray.nodes()
        if node["Alive"] and node["Resources"].get("CPU", 0) > 0
    ]
    deadline = time.monotonic() + 6 * REACH_TIMEOUT_S
    for ip, probe in probes:
        try:
            found = ray.get(probe, timeout=max(0.0, deadline - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            return
        except ray.exceptions.TaskUnschedulableError:
            continue
        except ray.exceptions.RayError as e:
            missing = re.search(UNIMPORTABLE, str(e))
            if missing is None:
                raise
            raise UsageError(
                f"the workers of the Ray cluster at {address} cannot import sanitizer ({missing[0]}): "
                "install this package on every node (the Dockerfile's image has it), or submit the job "
                "with `ray job submit --working-dir .`"
            ) from None
        if why := file_difference(files, expected, found):
            raise UsageError(f"node {ip} of the Ray cluster at {address} {why}: {SHARE_FILES}")


def file_difference(files: list[str], expected: list[Fingerprint], found: list[Fingerprint]) -> str | None:
    """The first file a node sees otherwise than the driver, in words; None if it sees them all alike."""
    for path, mine, theirs in zip(files, expected, found, strict=True):
        if theirs == mine:
            continue
        if theirs.why is not None:
            return f"cannot read {path} ({theirs.why})"
        if theirs.size != mine.size:
            return f"holds another {path} than the driver ({theirs.size} bytes, the driver's {mine.size})"
        return f"holds another {path} than the driver (same size, another sha256)"
    return None
