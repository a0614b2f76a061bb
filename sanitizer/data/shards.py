"""Turn a user's SHARDS argument into an ordered list of shards with unique, file-safe stems.

The stem names every per-shard output (``manifest/<stem>.parquet``, ``clean/<stem>.tar``), so it
must be unique, safe as a file name, and independent of the order the inputs were given in. A local
shard is its file's resolved path, but is named as the listing reached it: a Hugging Face hub cache's
``snapshots/REV/data/00000.tar`` links to ``blobs/<sha256>``, and is ``00000``.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from braceexpand import UnbalancedBracesError, braceexpand

from sanitizer.errors import UsageError

log = logging.getLogger(__name__)
# What a directory or a glob lists as shards, and what a stem drops: tars plain or compressed, those
# compressed with zstd or LZ4 included, so that they fail saying they are not read rather than go
# unseen (a directory of them read as "no shards found").
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tar.lz4")
_SUFFIX_LIST = ", ".join(SHARD_SUFFIXES)
MAX_STEM_CHARS = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_GLOB_CHARS = re.compile(r"[*?\[]")
MAX_SHARDS = 100_000  # per pattern: LAION-5B as img2dataset writes it is about 60,000 shards
STAMP_THREADS = 32  # requests to a store in flight at once, for stamps
_NUMERIC_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?\}")


@dataclass(frozen=True)
class ShardRef:
    """One input shard: where to read it and the stem its outputs are named after."""

    url: str
    stem: str


def is_remote(url: str) -> bool:
    """fsspec-style URLs are passed through untouched; everything else is a local path."""
    return "://" in url


# A remote object's version, by the names fsspec stores give it in info() (s3fs: ETag, VersionId,
# LastModified; gcsfs: etag, md5Hash, generation, updated, mtime; HTTP: ETag, Content-MD5,
# Last-Modified), each stamped under one name, from the first of its names the store gives.
_REMOTE_VERSION = {
    "etag": ("ETag", "etag"),
    "md5": ("md5Hash", "md5", "Content-MD5"),
    "version": ("VersionId", "version_id", "generation"),
    "modified": ("LastModified", "updated", "mtime", "Last-Modified"),
}
_STAMP_TYPES = {"size": int, "mtime_ns": int, **dict.fromkeys(_REMOTE_VERSION, str)}
STAMP_FORM = "{size, mtime_ns} in whole numbers, or a remote object's size and version as text"


def local_path(url: str) -> str | None:
    """The local path a shard URL names: a path itself, or a `file://` URL's path; None for a remote
    URL. One file is one shard however it is named."""
    path = url.removeprefix("file://")
    return None if is_remote(path) else path


def file_url_shard(url: str) -> str | None:
    """The shard expand_shards gives a `file://` URL now (its file's resolved path); None for any
    other url. A run.json written before a `file://` URL was read as its path records the URL itself,
    and its stem: the hash that tells shards of the same file name apart was taken of the URL."""
    if not url.startswith("file://"):
        return None
    return str(Path(url.removeprefix("file://")).expanduser().resolve())


def listed_before(recorded: ShardRef, shard: ShardRef) -> bool:
    """Whether run.json's `recorded` is `shard` as an earlier version listed it, whose outputs and
    stats markers are there under the recorded stem: by a `file://` URL, which it passed through as
    remote (a stem's hash taken of the URL), or, for a file the listing now names after a link to it,
    by that file's own name (a hub cache's `blobs/<sha256>`, where the listing now says `00000`)."""
    if recorded.url.startswith("file://"):
        return file_url_shard(recorded.url) == shard.url
    own = target_stems(shard.url)
    return recorded.url == shard.url and recorded.stem in own and shard.stem not in own


def file_stamp(url: str) -> dict[str, int | str] | None:
    """What tells that a shard changed under the same name without reading it again: a local file's
    size and mtime (ns) (a `file://` URL is one), a remote object's size and whichever version (ETag,
    MD5, generation or version id, modification time) its store gives. None where there is neither,
    or it cannot be stat'ed."""
    path = local_path(url)
    return _remote_stamp(url) if path is None else path_stamp(path)


def path_stamp(path: str | os.PathLike) -> dict[str, int] | None:
    """A local file's size and mtime (ns), as file_stamp takes them; None if it cannot be stat'ed."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _remote_stamp(url: str) -> dict[str, int | str] | None:
    """`file_stamp` of a fsspec URL, from its store's info() (asked afresh, not from a listing cache)."""
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        fs.invalidate_cache(path)
        info = fs.info(path)
    except Exception:  # noqa: BLE001 - an unknown protocol, no such object, no access: no stamp
        return None
    stamp: dict[str, int | str] = {}
    if type(info.get("size")) is int:
        stamp["size"] = info["size"]
    for field, names in _REMOTE_VERSION.items():
        value = next((info[n] for n in names if info.get(n) not in (None, "")), None)
        if value is not None:
            stamp[field] = str(value)
    return stamp or None


def is_file_stamp(value: object) -> bool:
    """Whether `value` has file_stamp's form, as a stats marker read back must: a local file's
    {size, mtime_ns}, or a remote object's size and version fields."""
    return (
        isinstance(value, dict)
        and bool(value)
        and all(k in _STAMP_TYPES and type(v) is _STAMP_TYPES[k] for k, v in value.items())
        and ("mtime_ns" not in value or set(value) == {"size", "mtime_ns"})
    )


def pins_content(stamp: dict[str, int | str] | None) -> bool:
    """Whether a stamp that still matches shows that the file holds what it held when stamped: a local
    file's mtime, or a remote object's version (ETag, MD5, version id, modification time), does. A
    size alone does not: an object replaced by another of the same size keeps it."""
    return stamp is not None and any(k == "mtime_ns" or k in _REMOTE_VERSION for k in stamp)


def file_stamps(urls: list[str]) -> list[dict[str, int | str] | None]:
    """`file_stamp` of each URL, asked in parallel: a remote one is a request to its store each, and
    a run may have tens of thousands of shards."""
    with ThreadPoolExecutor(max_workers=STAMP_THREADS) as pool:
        return list(pool.map(file_stamp, urls))


def stamp_differs(recorded: object, current: dict[str, int | str] | None) -> bool:
    """Whether a shard's input differs from the `file_stamp` recorded when it was scored, in any field
    both stamps hold (a store may give a field to one call and not another). A stamp that was not
    recorded (a marker of an earlier version, a store that gives nothing) or cannot be taken now tells
    nothing: False."""
    if not isinstance(recorded, dict) or current is None:
        return False
    return any(recorded[k] != current[k] for k in recorded.keys() & current.keys())


def changed_since(recorded: object, url: str) -> bool:
    """`stamp_differs` from the input as it is now."""
    return stamp_differs(recorded, file_stamp(url))


def split_top_level(spec: str) -> list[str]:
    """Split on commas outside braces, so ``a/{x,y}.tar,b.tar`` is two parts, not three."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    return [p.strip() for p in parts if p.strip()]


def _is_shard_name(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


def _is_shard_file(path: Path) -> bool:
    return path.is_file() and _is_shard_name(path.name)


def _first_three(items: list[str], sep: str) -> str:
    """A list too long for one line: its first three, and how many more."""
    more = f" (and {len(items) - 3} more)" if len(items) > 3 else ""
    return sep.join(items[:3]) + more


def _expand_glob(item: str) -> list[Path]:
    """A glob's shard files, as a directory's. img2dataset writes `00000.parquet` and
    `00000_stats.json` beside each `00000.tar`, so `data/*` matches them too: they are left out,
    with a warning naming them, rather than each failing the job as a shard that is not a tar."""
    files = [Path(m) for m in sorted(glob.glob(os.path.expanduser(item))) if Path(m).is_file()]
    others = [p.name for p in files if not _is_shard_name(p.name)]
    if others and len(others) < len(files):
        log.warning(
            "pattern %r also matches files that are not %s shards, left out: %s",
            item,
            _SUFFIX_LIST,
            _first_three(others, ", "),
        )
    return [p for p in files if _is_shard_name(p.name)]


def _expand_local(item: str) -> list[Path]:
    """Expand one local glob, directory or file into the paths it lists (links not followed); an empty
    list means it matched nothing."""
    path = Path(item).expanduser()
    if _GLOB_CHARS.search(item):
        return _expand_glob(item)
    if path.is_dir():
        return [p for p in sorted(path.iterdir()) if _is_shard_file(p)]
    if path.is_file():
        return [path]
    return []


def _describe_miss(item: str) -> str:
    path = Path(item).expanduser()
    if _GLOB_CHARS.search(item):
        return f"pattern {item!r} matches no {_SUFFIX_LIST} files"
    if path.is_dir():
        return f"directory {item!r} contains no {_SUFFIX_LIST} files"
    return f"shard file {item!r} does not exist"


def _file_name(url: str) -> str:
    if is_remote(url):
        return urlparse(url).path.rstrip("/").rsplit("/", 1)[-1]
    return Path(url).name


def base_stem(url: str) -> str:
    """The shard's file name without its tar suffix, restricted to ``[A-Za-z0-9._-]`` and starting
    with a letter or digit: pandas, pyarrow and Spark skip files whose names start with ``_`` or ``.``
    when they read a directory, so ``pd.read_parquet(RUN_DIR/manifest)`` would silently lack the rows
    of ``_a.tar``, ``.a.tar`` or ``ü-1.tar``. A name with no letter or digit left is ``shard``."""
    name = _file_name(url)
    lower = name.lower()
    for suffix in SHARD_SUFFIXES:
        if lower.endswith(suffix):
            name = name[: -len(suffix)]
            break
    stem = _UNSAFE.sub("_", name).lstrip("._-")
    return stem[:MAX_STEM_CHARS] or "shard"


# The hex digits of the URL's hash that assign_stems appends to a colliding stem: 8, and all 40 where a
# file's own name is another's "<stem>-<hash8>".
SHORT_HASH, FULL_HASH = 8, 40


def target_stems(url: str) -> tuple[str, ...]:
    """The stems assign_stems gives the shard `url` named after its own file name: alone, or hashed
    apart from another of its stem."""
    base = base_stem(url)
    return (base, *(_with_hash(base, url, n_hex) for n_hex in (SHORT_HASH, FULL_HASH)))


def _with_hash(stem: str, url: str, n_hex: int) -> str:
    digest = hashlib.sha1(url.encode("utf-8", "surrogateescape")).hexdigest()[:n_hex]
    return f"{stem[: MAX_STEM_CHARS - n_hex - 1]}-{digest}"


def assign_stems(urls: list[str], names: dict[str, str] | None = None) -> list[ShardRef]:
    """Give every URL a unique stem, from its file name or the name `names` gives it (a link's); each
    colliding stem gets a hash of its own URL appended, the URL being what identifies the shard.

    Stems that differ only in case collide too: on a case-insensitive file system (macOS, Windows)
    ``manifest/A.parquet`` and ``manifest/a.parquet`` are one file. Only the set of URLs and their
    names matters, never their order, so re-runs with reordered inputs write to the same outputs.
    """
    names = names or {}
    bases = [base_stem(names.get(u, u)) for u in urls]
    counts = Counter(b.casefold() for b in bases)
    stems = [
        _with_hash(b, u, SHORT_HASH) if counts[b.casefold()] > 1 else b
        for b, u in zip(bases, urls, strict=True)
    ]
    counts = Counter(s.casefold() for s in stems)
    if len(counts) != len(stems):  # a literal file name equal to "<stem>-<hash8>": use full hash
        stems = [
            _with_hash(b, u, FULL_HASH) if counts[s.casefold()] > 1 else s
            for b, s, u in zip(bases, stems, urls, strict=True)
        ]
    return [ShardRef(url=u, stem=s) for u, s in zip(urls, stems, strict=True)]


def ranged_count(pattern: str) -> int:
    """How many names the numeric ranges {A..B} or {A..B..STEP} of a brace pattern multiply out to,
    counted without listing them."""
    count = 1
    for a, b, step in _NUMERIC_RANGE.findall(pattern):
        count *= abs(int(b) - int(a)) // max(1, abs(int(step or 1))) + 1
    return count


def _misses_message(misses: list[str], found: int) -> str:
    """What --data names and is not there. Beside shards that were found, it is not "no shards": a
    brace range over img2dataset's output lacks the shards that failed to download, and a glob or the
    directory takes those that are there."""
    if not found:
        return "no shards found: " + _first_three(misses, "; ")
    return (
        f"{len(misses)} of the shards --data names not found ({found} found): {_first_three(misses, '; ')}; "
        "to take only those that exist, give their directory or a glob"
    )


def link_names(listed_as: dict[str, set[str]]) -> dict[str, str]:
    """The name each local shard (a resolved path) takes from the names the listing reached it by,
    where that is not its file's own: a link's. A file listed by its own name keeps it, as it always
    did (a link listed beside its target does not rename it); one reached only through links takes
    the smallest of their names (as text), which no order of the listing changes."""
    return {url: min(names) for url, names in listed_as.items() if Path(url).name not in names}


def expand_shards(spec: str) -> list[ShardRef]:
    """Expand brace patterns, globs, directories and comma lists into ordered, unique shards.

    Raises ``UsageError`` naming every part that matched nothing, so a typo in one shard range
    is not silently skipped.
    """
    parts = split_top_level(spec or "")
    if not parts:
        raise UsageError("no shards given: expected a file, directory, glob or brace pattern")
    urls: list[str] = []
    listed_as: dict[str, set[str]] = {}
    misses: list[str] = []
    for part in parts:
        if ranged_count(part) > MAX_SHARDS:  # braceexpand would take minutes and gigabytes to list them
            raise UsageError(
                f"shard pattern {part!r} names more than {MAX_SHARDS:,} shards; check its ranges"
            )
        try:
            items = list(braceexpand(part))
        except UnbalancedBracesError as e:
            raise UsageError(f"bad shard pattern {part!r}: {e}") from None
        for item in items:
            path = local_path(item)
            if path is None:
                urls.append(item)
                continue
            found = _expand_local(path)
            if not found:
                misses.append(_describe_miss(path))
            for listed in found:
                url = str(listed.resolve())
                urls.append(url)
                listed_as.setdefault(url, set()).add(listed.name)
    if misses:
        raise UsageError(_misses_message(misses, len(urls)))
    unique = list(dict.fromkeys(urls))
    for url in unique:
        if not is_text(url):
            raise UsageError(
                f"shard {url!r} has a name that is not UTF-8; rename it (run.json records it as text)"
            )
    return assign_stems(unique, link_names(listed_as))


def is_text(name: str) -> bool:
    """Whether a path as Python decoded it (undecodable bytes as surrogates) can be written as UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
