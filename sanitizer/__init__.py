"""DeDe backdoor-sample sanitizer."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sanitizer")  # pyproject.toml's, as installed: one source for the number
except PackageNotFoundError:  # a checkout run without installing it
    __version__ = "dev"
