"""The command line itself: version, usage, exit codes, and the README's CLI block as its contract."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from sanitizer.cli import main


def exits(argv: list[str]) -> int:
    """The exit code argparse ends with (it raises SystemExit rather than returning)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def test_version_prints_the_installed_package_version(capsys):
    assert exits(["--version"]) == 0
    assert capsys.readouterr().out == f"sanitizer {version('sanitizer')}\n"


def test_run_json_records_the_same_version():
    from sanitizer.pipeline.job import versions

    assert versions()["sanitizer"] == version("sanitizer")
