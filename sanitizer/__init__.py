"""DeDe backdoor-sample sanitizer."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    """`__version__`, read when asked for: importlib.metadata takes 50-180 ms to load, which every
    `sanitizer` command paid before its own code ran, in which a Ctrl-C printed a traceback."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sanitizer")  # pyproject.toml's, as installed: one source for the number
    except PackageNotFoundError:  # a checkout run without installing it
        return "dev"
