"""Counts in what the page and the command line say: a count and its noun agree in number."""

from __future__ import annotations


def counted(n: int, singular: str, plural: str | None = None, spec: str = "") -> str:
    """ "1 sample", "0 samples", "2,048 samples" (`spec` ","): the singular for exactly one, else the
    plural (the singular and an s unless given: "shard was", "shards were"). "flagged 1 samples" and
    "1 shard(s) were" read wrong."""
    return f"{n:{spec}} {singular if n == 1 else plural or singular + 's'}"
