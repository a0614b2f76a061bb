"""Stream samples out of WebDataset tars as raw bytes, and write tars byte-reproducibly.

Nothing here decodes or unpickles member data: members stay opaque bytes, so a ``.pyd`` or
``.pickle`` member can never execute code. Per-sample problems become a sample ``status``;
only a shard that cannot be read at all raises ``ShardError``.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, NamedTuple

from sanitizer.atomic import atomic_path
from sanitizer.data.shards import file_stamp, is_remote
from sanitizer.errors import SanitizerError

TAR_ENCODING = "utf-8"
TAR_ERRORS = "surrogateescape"  # non-UTF-8 member names round-trip byte for byte
STATUS_OK = "ok"
STATUS_MEMBER_TOO_LARGE = "member_too_large"
STATUS_TRUNCATED_SHARD = "truncated_shard"
STATUS_SPECIAL_MEMBER = "special_member"  # a hard or symbolic link, a device: no bytes of its own
STATUS_DUPLICATE_KEY = "duplicate_key"  # a key an earlier sample of the shard has: its copy would merge
INCOMPLETE_STATUSES = frozenset({STATUS_MEMBER_TOO_LARGE, STATUS_TRUNCATED_SHARD, STATUS_SPECIAL_MEMBER})
READ_STATUSES = INCOMPLETE_STATUSES | {STATUS_DUPLICATE_KEY}  # what iter_samples marks; decode adds its own
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, ValueError)
_MAX_ERROR_CHARS = 300
GZIP_MAGIC = b"\x1f\x8b"
# Compressions whose frame magic tarfile does not know (it reads gzip, bzip2 and xz)
UNREAD_COMPRESSIONS = {b"\x28\xb5\x2f\xfd": "zstd", b"\x04\x22\x4d\x18": "LZ4"}
_MAGIC_BYTES = 4
GNU_DUMPDIR, GNU_VOLUME_LABEL = b"D", b"V"  # GNU tar types that tarfile does not know
USTAR_MAGIC = b"ustar\0"  # a POSIX header's magic; GNU's is ``ustar  \0``
_GZIP_CHUNK = 1 << 16
# Surrogates that surrogateescape cannot turn back into a byte (it made U+DC80-U+DCFF of bytes 0x80-0xFF):
# a json caption's lone "\ud800" escape is valid JSON
_UNESCAPED_SURROGATE = re.compile("[\ud800-\udc7f\udd00-\udfff]")


class ShardError(SanitizerError):
    """A shard that cannot be opened or is not a tar at all; the caller marks it failed."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(f"{url}: {message}")
        self.url = url
        self.message = message


class ShardReadError(ShardError):
    """A read that failed part-way (a reset connection, a timeout, EIO): nothing is known of the file,
    whose rest may be fine, so a later run may read it where this one could not."""


@dataclass(frozen=True)
class Member:
    """One tar member: its exact name (surrogate-escaped) and its exact bytes."""

    name: str
    data: bytes


@dataclass
class Sample:
    """A run of consecutive members sharing a key; ``status`` says whether reading was complete."""

    key: str
    index: int
    members: list[Member]
    status: str = STATUS_OK
    error: str | None = None


def sha256_hex(data: bytes) -> str:
    """How member bytes are identified: the manifest's image digest, and outputs against inputs."""
    return hashlib.sha256(data).hexdigest()


def one_line(text: str, limit: int = _MAX_ERROR_CHARS) -> str:
    """Collapse whitespace and cut to ``limit`` chars: errors go into one manifest cell."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(exc: BaseException) -> str:
    """``Type: message`` on one line, never a traceback."""
    msg = str(exc)
    return one_line(f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__)


def printable(text: str) -> str:
    """Replace lone surrogates (from non-UTF-8 names, or a json caption's ``\\ud800`` escape) with
    U+FFFD, so the text can be stored as UTF-8: a surrogate left in a caption failed its whole shard."""
    text = _UNESCAPED_SURROGATE.sub("\ufffd", text)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def split_key(name: str) -> tuple[str, str]:
    """WebDataset rule: key is the path up to the first dot of the base name, ext the rest.

    ``a/b.seg.png`` -> ``("a/b", "seg.png")``; a base name without a dot has ext ``""``.
    """
    dirname, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    key = f"{dirname}/{stem}" if dirname else stem
    return key, ext.lower() if dot else ""


class _RecordingTarInfo(tarfile.TarInfo):
    """Remembers why header reading stopped: tarfile ends silently on a cut, we must not. Reads
    names as GNU tar does (see ``frombuf``)."""

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        """tarfile puts bytes 345-500 before every name, but only a POSIX header (magic
        ``ustar\\0``) holds a name prefix there: a GNU one holds its atime and ctime (GNU tar's
        incremental archives fill them), so ``a/k.png`` read as ``15305253145/a/k.png``, where GNU
        tar reads ``a/k.png``."""
        info = super().frombuf(buf, encoding, errors)
        prefix = buf[345:500].split(b"\0", 1)[0]
        if prefix and buf[257:263] != USTAR_MAGIC and info.type not in tarfile.GNU_TYPES:
            info.name = info.name[len(prefix.decode(encoding, errors)) + 1 :]
        return info

    @classmethod
    def fromtarfile(cls, tarfile_obj: tarfile.TarFile) -> tarfile.TarInfo:
        tarfile_obj._sanitizer_header_error = None  # type: ignore[attr-defined]
        try:
            return super().fromtarfile(tarfile_obj)
        except tarfile.HeaderError as e:
            tarfile_obj._sanitizer_header_error = e  # type: ignore[attr-defined]
            raise

    def _proc_builtin(self, tarfile_obj: tarfile.TarFile) -> tarfile.TarInfo:
        """tarfile skips the data of regular files alone. A directory, link or device that declares
        some (an old tar's regular file named ``x/`` is a directory) has it too, as GNU tar reads it:
        parsed as headers, it made every sample after it unreadable."""
        info = super()._proc_builtin(tarfile_obj)  # type: ignore[misc]
        if info.type in tarfile.SUPPORTED_TYPES and not info.isreg() and info.size > 0:
            tarfile_obj.offset += info._block(info.size)  # type: ignore[attr-defined]
        return info


class _CountingReader(io.RawIOBase):
    """Counts bytes read, to tell a 0-byte shard (empty) from one that is not a tar, and turns a
    failed read into a ShardError. A file cut short reads as an early end, never as an error: an
    error (a reset connection, a timeout, EIO) says nothing of the file, whose rest may be fine, so
    it fails the shard (a re-run reads it again) rather than ending it as cut off (as done). So does
    an end before `size`, the bytes its stamp says it has: a transfer the server cut short."""

    def __init__(self, raw: IO[bytes], url: str, size: int | None) -> None:
        self._raw = raw
        self._url = url
        self._size = size
        self.nbytes = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        try:
            data = self._raw.read(size)
        except Exception as e:  # noqa: BLE001 - whatever the filesystem raises, the read failed
            raise ShardReadError(self._url, f"read failed after {self.nbytes} bytes: {describe(e)}") from None
        self.nbytes += len(data)
        if not data and size != 0 and self._size is not None and self.nbytes < self._size:
            raise ShardReadError(self._url, f"read ended after {self.nbytes} of its {self._size} bytes")
        return data

    def readinto(self, buffer: Any) -> int:
        """What io.BufferedReader reads through (to peek at the gzip magic)."""
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _GzipMembers(io.RawIOBase):
    """A gzip file's members one after another, as `gzip -d` and GNU tar read them. bgzip, pgzip and
    `cat` of gzipped parts of a tar write several; tarfile's own reader stops at the end of the first, so
    the samples after it were lost and the shard read as cut off. Bytes after a member that do not
    start another are ignored, as gzip ignores trailing garbage; a cut member ends the data there."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._z = zlib.decompressobj(wbits=31)
        self._pending = b""
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._decompress(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _decompress(self, size: int) -> bytes:
        while not self._done:
            if not self._pending:
                self._pending = self._raw.read(_GZIP_CHUNK)
                if not self._pending:
                    self._done = True
                    break
            out = self._z.decompress(self._pending, size)
            self._pending = self._z.unconsumed_tail
            if self._z.eof:
                self._pending = self._z.unused_data
                self._start_next_member()
            if out:
                return out
        return b""

    def _start_next_member(self) -> None:
        while len(self._pending) < len(GZIP_MAGIC) and (more := self._raw.read(_GZIP_CHUNK)):
            self._pending += more
        if self._pending.startswith(GZIP_MAGIC):
            self._z = zlib.decompressobj(wbits=31)
        else:
            self._done = True


def _open_raw(url: str, stack: ExitStack) -> IO[bytes]:
    try:
        if is_remote(url):
            import fsspec

            return stack.enter_context(fsspec.open(url, "rb"))
        return stack.enter_context(open(url, "rb"))
    except Exception as e:  # noqa: BLE001 - any failure to open means the shard failed
        raise ShardError(url, f"cannot open: {describe(e)}") from None


class _End(NamedTuple):
    """Why reading stopped before the end-of-archive marker, and whether every member read is whole."""

    problem: str
    whole: bool


def _cut_end(tar: tarfile.TarFile, last: tarfile.TarInfo | None, error: BaseException) -> _End:
    """Why moving to the next header failed. A file that ends inside the zero padding after the last
    member's data ends after whole members (GNU tar fails that member, ``Unexpected EOF``, though
    every byte of it is there); one that ends before that data's end, or a bad header, does not."""
    position = tar.fileobj.tell()  # type: ignore[union-attr]  # as far as the file went
    if last is not None and last.offset_data + last.size <= position < tar.offset:
        return _End("shard ends inside the padding after its last member (cut off?)", whole=True)
    return _End(f"shard cut off or corrupt: {describe(error)}", whole=False)


def _header_end(tar: tarfile.TarFile) -> _End | None:
    """Why header reading stopped, None if at the end-of-archive marker. A file that ends where a
    header would start, or inside one, ends after whole members."""
    err = getattr(tar, "_sanitizer_header_error", None)
    if isinstance(err, tarfile.EOFHeaderError):
        return None
    if isinstance(err, tarfile.EmptyHeaderError):
        return _End("shard ends without an end-of-archive marker (cut off?)", whole=True)
    if err is None:
        return _End("shard ended unexpectedly", whole=False)
    problem = f"shard cut off or corrupt at a member header: {describe(err)}"
    return _End(problem, whole=isinstance(err, tarfile.TruncatedHeaderError))


def _mark_truncated(sample: Sample, message: str) -> None:
    sample.status = STATUS_TRUNCATED_SHARD
    sample.error = one_line(message)


def _stop(url: str, current: Sample | None, exts: set[str], before: set[str] | None, end: _End) -> None:
    """A shard that stops reading marks the sample it was in; one that stops before its first sample
    (after directory entries) fails, rather than read as an empty shard. A stop after whole members
    (a writer killed before it closed the tar, which GNU tar and WebDataset read whole) marks none
    when the last sample has every extension of the sample before it, as a WebDataset shard's
    samples do: marking it lost a whole sample. One without them, or without a sample before it,
    may be cut between two of its members: its later members missing, it is marked."""
    if current is None:
        raise ShardError(url, f"{end.problem}, before its first sample")
    if not end.whole:
        _mark_truncated(current, end.problem)
    elif before is None:
        _mark_truncated(current, f"{end.problem}, after its first sample, which may lack later members")
    elif missing := sorted(before - exts):
        lacks = ", ".join(repr(ext) for ext in missing)
        _mark_truncated(
            current, f"{end.problem}, its last sample without the {lacks} members of the one before"
        )


def iter_samples(url: str, max_member_bytes: int = 256 << 20) -> Iterator[Sample]:
    """Yield every sample of a (possibly gzipped) tar in file order, never raising per sample.

    Raises ``ShardError`` when no tar header can be read at all, or when a read fails or ends before
    the size the file's stamp gives (at any point: the samples already yielded are not the whole
    shard). A cut-off shard ends with its in-progress sample marked ``truncated_shard``, unless the cut
    follows whole members and that sample has every extension of the one before it; members larger
    than ``max_member_bytes`` are skipped unread (data ``b""``) and mark their sample
    ``member_too_large``, links and devices ``special_member``, a sample whose key an earlier one has
    ``duplicate_key``. Directory entries are passed over.
    """
    with ExitStack() as stack:
        stamp = file_stamp(url)  # before the open: the bytes the object has as it is read
        reader = _CountingReader(_open_raw(url, stack), url, stamp.get("size") if stamp else None)
        buffered = io.BufferedReader(reader, tarfile.RECORDSIZE)
        head = buffered.peek(_MAGIC_BYTES)[:_MAGIC_BYTES]
        gzipped = head.startswith(GZIP_MAGIC)
        try:
            tar = tarfile.open(  # noqa: SIM115 - entered into the stack below
                fileobj=_GzipMembers(buffered) if gzipped else buffered,
                mode="r|" if gzipped else "r|*",
                tarinfo=_RecordingTarInfo,
                encoding=TAR_ENCODING,
                errors=TAR_ERRORS,
            )
        except _READ_ERRORS as e:
            if reader.nbytes == 0:
                return
            raise ShardError(url, _not_a_tar(head, e)) from None
        stack.enter_context(tar)
        yield from _group_members(url, tar, max_member_bytes)


def _not_a_tar(head: bytes, error: BaseException) -> str:
    """Why a shard is not read. A tar compressed with what tarfile cannot decompress says so: as
    `not a readable tar file: ReadError: invalid header` it read as a damaged file."""
    for magic, name in UNREAD_COMPRESSIONS.items():
        if head.startswith(magic):
            return (
                f"compressed with {name}, which is not read (plain, gzip, bzip2 and xz tars are): "
                "decompress it, or compress it with gzip"
            )
    return f"not a readable tar file: {describe(error)}"


def _group_members(url: str, tar: tarfile.TarFile, max_member_bytes: int) -> Iterator[Sample]:
    """Group consecutive members into samples; a repeated extension starts a new sample."""
    current: Sample | None = None
    exts: set[str] = set()
    before: set[str] | None = None  # the extensions of the sample before the current one
    last: tarfile.TarInfo | None = None
    first_index: dict[str, int] = {}  # each key's first sample
    count = 0
    while True:
        try:
            info = tar.next()
        except _READ_ERRORS as e:
            _stop(url, current, exts, before, _cut_end(tar, last, e))
            break
        tar.members = []  # stream mode keeps every TarInfo otherwise
        if info is None:
            if (end := _header_end(tar)) is not None:
                _stop(url, current, exts, before, end)
            break
        last = info
        if _is_structure(info):
            continue
        key, ext = split_key(info.name)
        if current is None or key != current.key or ext in exts:
            if current is not None:
                yield current
                before = exts
            current = Sample(key=key, index=count, members=[])
            _mark_duplicate(current, first_index)
            count += 1
            exts = set()
        exts.add(ext)
        if (unread := _unread(info, max_member_bytes)) is not None:
            current.members.append(Member(info.name, b""))
            if current.status == STATUS_OK:
                current.status, current.error = unread[0], one_line(unread[1])
            continue
        try:
            fileobj = tar.extractfile(info)
            data = fileobj.read() if fileobj is not None else b""
        except _READ_ERRORS as e:
            current.members.append(Member(info.name, b""))
            _mark_truncated(current, f"shard cut off inside member {printable(info.name)!r}: {describe(e)}")
            break
        current.members.append(Member(info.name, data))
    if current is not None:
        yield current


def _is_structure(info: tarfile.TarInfo) -> bool:
    """An entry of the archive's structure, not of a sample's content: a directory (GNU tar's
    incremental archives store each as a ``D`` entry, its data a list of its files; a regular file
    whose name ends in ``/`` is one too) or a GNU volume label (``V``, `tar -V`). GNU tar lists them
    as such, WebDataset passes them over; read as members, each was a sample."""
    is_dir = info.isdir() or (info.isreg() and info.name.endswith("/"))
    return is_dir or info.type in (GNU_DUMPDIR, GNU_VOLUME_LABEL)


def _mark_duplicate(sample: Sample, first_index: dict[str, int]) -> None:
    """A key is one sample. Two of a key, copied to one output tar with the samples between them
    removed, would read back side by side: as one sample (``a.jpg a.txt`` + ``a.png``), or as an
    error in WebDataset (``duplicate file name``). So the first is the key's sample; a later one is
    marked, keeps its row and is not copied."""
    first = first_index.setdefault(sample.key, sample.index)
    if first != sample.index:
        sample.status = STATUS_DUPLICATE_KEY
        sample.error = one_line(
            f"key {printable(sample.key)!r} is sample {first}'s: only the first sample of a key is kept"
        )


def _unread(info: tarfile.TarInfo, max_member_bytes: int) -> tuple[str, str] | None:
    """Why a member's bytes are not read, as (status, error) for its sample; None when they are. A
    link is not followed: its target may be another sample's member, or a file on this machine."""
    name = printable(info.name)
    if info.islnk() or info.issym():
        kind = "hard" if info.islnk() else "symbolic"
        return STATUS_SPECIAL_MEMBER, f"member {name!r} is a {kind} link to {printable(info.linkname)!r}"
    if not info.isreg():
        return STATUS_SPECIAL_MEMBER, f"member {name!r} is not a file (tar type {info.type!r})"
    if info.size > max_member_bytes:
        return (
            STATUS_MEMBER_TOO_LARGE,
            f"member {name!r} has {info.size} bytes, more than max_member_bytes={max_member_bytes}",
        )
    return None


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """Fixed metadata, so rewriting the same samples yields the same bytes."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class TarWriter:
    """Write samples to a tar that appears under ``final_path`` only when complete.

    Members keep their names and bytes; metadata is fixed (mtime 0, mode 0644, uid/gid 0) and
    the GNU format stores long names, so identical input gives a byte-identical file.
    """

    def __init__(self, final_path: Path) -> None:
        self.final_path = Path(final_path)
        self.count = 0
        self._stack: ExitStack | None = None
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> TarWriter:
        stack = ExitStack()
        try:
            tmp = stack.enter_context(atomic_path(self.final_path))
            fileobj = stack.enter_context(open(tmp, "wb"))
            self._tar = tarfile.open(
                fileobj=fileobj,
                mode="w",
                format=tarfile.GNU_FORMAT,
                encoding=TAR_ENCODING,
                errors=TAR_ERRORS,
            )
        except BaseException as e:  # the temp file goes, not published: atomic_path sees the exception
            if not stack.__exit__(type(e), e, e.__traceback__):
                raise
        self._stack = stack
        return self

    def write(self, sample: Sample) -> None:
        """Append every member of ``sample`` in order; refuses samples read incompletely."""
        if self._tar is None:
            raise RuntimeError("TarWriter.write called outside its with-block")
        if sample.status in INCOMPLETE_STATUSES:
            raise ValueError(
                f"sample {printable(sample.key)!r} has status {sample.status}: "
                "its bytes are incomplete and cannot be copied"
            )
        try:
            for member in sample.members:
                self._tar.addfile(_tarinfo(member.name, len(member.data)), io.BytesIO(member.data))
        except OSError as e:
            if e.filename is None:  # a failed write (ENOSPC) names no file: name this output
                e.filename = str(self.final_path)
            raise
        self.count += 1

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        tar, stack = self._tar, self._stack
        self._tar = self._stack = None
        if stack is None:
            return False
        if exc_type is None:
            try:
                assert tar is not None
                tar.close()  # writes the end-of-archive blocks into the temp file
            except BaseException as close_error:
                if not stack.__exit__(type(close_error), close_error, close_error.__traceback__):
                    raise
                return False
        return bool(stack.__exit__(exc_type, exc, tb))


def _sample_from_dict(record: dict[str, Any], index: int) -> Sample:
    key = record["__key__"]
    key = key.decode("utf-8", TAR_ERRORS) if isinstance(key, bytes) else str(key)
    members = []
    for ext, value in record.items():
        if ext.startswith("__"):
            continue
        data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        members.append(Member(f"{key}.{ext}", data))
    return Sample(key=key, index=index, members=members)


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: Path,
    prefix: str = "shard",
    per_shard: int = 1000,
) -> list[Path]:
    """Write ``{"__key__": k, ext: bytes, ...}`` records to ``{prefix}-000000.tar``, ...

    Deterministic bytes; no empty trailing shard is written. ``str`` values are UTF-8 encoded.
    """
    if per_shard < 1:
        raise ValueError("per_shard must be at least 1")
    out_dir = Path(out_dir)
    paths: list[Path] = []
    writer: TarWriter | None = None
    try:
        for i, record in enumerate(samples):
            if writer is None:
                path = out_dir / f"{prefix}-{len(paths):06d}.tar"
                writer = TarWriter(path).__enter__()
                paths.append(path)
            writer.write(_sample_from_dict(record, i))
            if writer.count >= per_shard:
                current, writer = writer, None
                current.__exit__(None, None, None)
    except BaseException as e:
        if writer is not None:
            writer.__exit__(type(e), e, e.__traceback__)
            paths.pop()
        raise
    if writer is not None:
        writer.__exit__(None, None, None)
    return paths
