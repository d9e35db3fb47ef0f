"""Provider plugins come from the `dstack.providers` entry points; the lookup is cached, and the cache follows
what is installed."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from dstack.cli import providers
from dstack.cli.errors import WorkflowError


def install(site: Path, name: str, provider: str) -> Path:
    """A distribution as pip leaves it: a module and a *.dist-info folder with the entry point."""
    (site / f"{name}_mod.py").write_text(
        textwrap.dedent(
            f"""
            from dstack.cli.providers.bash import BashProvider

            class Plugin(BashProvider):
                name = {provider!r}
            """
        )
    )
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[dstack.providers]\n{provider} = {name}_mod:Plugin\n")
    return info


def unexpected(**kw: object) -> object:
    raise AssertionError("importlib.metadata was asked despite the cache")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.setenv("DSTACK_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sys, "path", [*sys.path, str(site)])
    providers.entry_points.cache_clear()
    yield site
    providers.entry_points.cache_clear()
    for mod in [m for m in sys.modules if m.endswith("_mod")]:
        del sys.modules[mod]


def test_an_installed_plugin_is_found_then_served_from_the_cache(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(site, "plugone", "toolone")
    assert providers.load_provider("toolone").name == "toolone"
    assert "toolone" in providers.known_providers() and "bash" in providers.known_providers()

    providers.entry_points.cache_clear()  # a new CLI process: the file answers, importlib.metadata is not asked

    monkeypatch.setattr(importlib.metadata, "entry_points", unexpected)
    assert providers.load_provider("toolone").name == "toolone"
    assert providers.load_provider("bash").name == "bash"


def test_installing_changing_or_removing_a_plugin_is_seen_at_once(site: Path) -> None:
    assert "tooltwo" not in providers.known_providers()
    info = install(site, "plugtwo", "tooltwo")
    providers.entry_points.cache_clear()
    assert providers.load_provider("tooltwo").name == "tooltwo"

    # reinstalled with another name for its provider: entry_points.txt is written anew
    entry_points = info / "entry_points.txt"
    written = entry_points.stat().st_mtime_ns
    entry_points.write_text("[dstack.providers]\ntoolthree = plugtwo_mod:Plugin\n")
    os.utime(entry_points, ns=(written + 10**9, written + 10**9))  # as on a file system with coarse times
    providers.entry_points.cache_clear()
    assert "toolthree" in providers.known_providers() and "tooltwo" not in providers.known_providers()

    shutil.rmtree(info)
    providers.entry_points.cache_clear()
    with pytest.raises(WorkflowError, match="unknown provider 'toolthree'"):
        providers.load_provider("toolthree")


def test_a_change_to_a_folder_without_distributions_keeps_the_cache(
    site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"  # on the path as `python -m dstack.cli` puts the working directory there
    project.mkdir()
    monkeypatch.setattr(sys, "path", [str(project), *sys.path])
    providers.entry_points()
    (project / "train.py").write_text("")
    providers.entry_points.cache_clear()
    monkeypatch.setattr(importlib.metadata, "entry_points", unexpected)
    assert providers.load_provider("bash").name == "bash"


def test_a_broken_cache_file_is_asked_again(site: Path) -> None:
    install(site, "plugthree", "toolthree")
    providers.entry_points()
    cache = Path(os.environ["DSTACK_HOME"]) / "cache" / providers.CACHE_FILE
    cache.write_text("{not json")
    providers.entry_points.cache_clear()
    assert providers.load_provider("toolthree").name == "toolthree"
    assert cache.read_text().startswith("{")
