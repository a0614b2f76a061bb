"""Shared fixtures: tiny generated shards and a tiny trained decoder, made once per session."""

from __future__ import annotations

import io
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO, ClassVar

import fsspec
import pytest
import torch
from fsspec.spec import AbstractFileSystem

from sanitizer.data.synth import synthetic_images, write_image_shards
from sanitizer.decoder_meta import ScoreSettings
from sanitizer.encoders import load_encoder
from sanitizer.train import TrainSettings, train_decoder

torch.set_num_threads(2)


def pytest_configure(config) -> None:
    """Handle SIGINT here so that every command a test starts begins with it at its default: a suite run
    in the background (`make test &`, nohup) inherits SIGINT ignored, as do its children, and then the
    tests that Ctrl-C a command saw it go on (exit 2 or 1, not 130)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


# A timm test model: 0.4 M parameters, fast on the CPU; 32 px keeps every test quick.
TINY_ENCODER = "timm:test_resnet"
TINY_SIZE = 32
TINY_MODEL = {"patch_size": 8, "width": 32, "depth": 1, "decoder_depth": 1, "heads": 2}
# The same, as the command line gives it
TINY_ARGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_MODEL.items()]


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """3 shards x 40 image-text samples at 32 px."""
    out = tmp_path_factory.mktemp("tiny_shards")
    pixels = synthetic_images(120, TINY_SIZE, seed=1)
    write_image_shards(out, pixels, captions=[f"a photo number {i}" for i in range(120)], per_shard=40)
    return out


@pytest.fixture(scope="session")
def tiny_encoder():
    return load_encoder(TINY_ENCODER, image_size=TINY_SIZE)


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory, tiny_shards, tiny_encoder) -> Path:
    out = tmp_path_factory.mktemp("tiny_decoder")
    train_decoder(
        tiny_encoder,
        str(tiny_shards),
        out,
        TrainSettings(epochs=2, batch_size=32),
        ScoreSettings(num_masks=2),
        TINY_MODEL,
        progress=False,
    )
    return out


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every network connection and name lookup fails at once, as on a machine without a network, and
    is recorded: the package promises never to reach one (no hub, no download). Local sockets
    (AF_UNIX) still work. Yields the list of attempts, for the test to assert empty."""
    attempts: list = []

    def refuse(what: object) -> None:
        attempts.append(what)
        raise OSError(f"test: no network ({what})")

    def connect(self: socket.socket, address: object) -> None:
        return connect_unix(self, address) if self.family == socket.AF_UNIX else refuse(address)

    def connect_ex(self: socket.socket, address: object) -> int:
        return connect_ex_unix(self, address) if self.family == socket.AF_UNIX else refuse(address)

    connect_unix, connect_ex_unix = socket.socket.connect, socket.socket.connect_ex
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: refuse(host))
    return attempts


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting it costs seconds and ~1 GB)."""
    import ray

    from sanitizer.pipeline.cluster import ensure_ray

    ensure_ray(None, num_cpus=2)
    yield
    ray.shutdown()


RESET = "ConnectionResetError: [Errno 104] Connection reset by peer"  # FlakyFileSystem's error, described


class FlakyFile(io.RawIOBase):
    """A local file read through a connection that breaks after ``fail_after`` bytes: with ``error``,
    or, where that is None, by ending there, as a transfer the server cut short."""

    def __init__(self, path: str, fail_after: int, error: BaseException | None) -> None:
        self._raw = open(path, "rb")  # noqa: SIM115 - closed with this file
        self._left = fail_after
        self._error = error

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0 and size != 0:
            if self._error is None:
                return b""
            raise self._error
        data = self._raw.read(self._left if size < 0 else min(size, self._left))
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._raw.close()
        super().close()


class FlakyFileSystem(AbstractFileSystem):
    """`flaky:///PATH`: the local file PATH as a remote store whose info() gives its size and an ETag
    (`etags[NAME]`, "1" unless set), and whose reads of a file named in `broken` fail after that many
    bytes with `error` (a reset connection, a timeout, EIO), of one named in `cut` end after that many
    (a transfer the server cut short, fewer bytes than info() says)."""

    protocol = "flaky"
    broken: ClassVar[dict[str, int]] = {}
    cut: ClassVar[dict[str, int]] = {}
    etags: ClassVar[dict[str, str]] = {}
    error: BaseException = ConnectionResetError(104, "Connection reset by peer")

    def info(self, path: str, **kwargs) -> dict:
        path = self._strip_protocol(path)
        etag = f'"{self.etags.get(Path(path).name, "1")}"'
        return {"name": path, "size": os.path.getsize(path), "type": "file", "ETag": etag}

    def _open(self, path: str, mode: str = "rb", **kwargs) -> IO[bytes]:
        name = Path(path).name
        if name in self.cut:
            return FlakyFile(path, self.cut[name], None)
        return FlakyFile(path, self.broken.get(name, os.path.getsize(path) + 1), self.error)


@pytest.fixture
def flaky() -> Iterator[type[FlakyFileSystem]]:
    """The `flaky://` protocol, registered with fsspec; set its `broken`, `cut`, `etags` and `error`."""
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    FlakyFileSystem.broken, FlakyFileSystem.cut, FlakyFileSystem.etags = {}, {}, {}
    yield FlakyFileSystem
    FlakyFileSystem.broken, FlakyFileSystem.cut, FlakyFileSystem.etags = {}, {}, {}
    FlakyFileSystem.error = ConnectionResetError(104, "Connection reset by peer")


def killed_rethreshold(run: Path, rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sanitizer clean RUN --threshold RULE` killed after it re-flagged the first finished manifest
    (run.json already holds the new threshold: it is written first)."""
    import sanitizer.clean
    from sanitizer.clean import clean_run
    from sanitizer.rundir import apply_threshold

    def first_only(run_dir, stems: list[str], threshold: float | None) -> int:
        apply_threshold(run_dir, stems[:1], threshold)
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(sanitizer.clean, "apply_threshold", first_only)
        with pytest.raises(KeyboardInterrupt):
            clean_run(run, rule)
