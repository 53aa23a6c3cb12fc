"""The process layer's shape: no import cycle, one lookup and one group kill, fakes only in
testing."""

from __future__ import annotations

import ast
import io
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import click
import pytest

from sanoffload import cli
from sanoffload.pipeline import PipelineLike, Stage
from sanoffload.runner import CommandRunner
from sanoffload.store.repo import Repository
from sanoffload.testing import FakeRunner

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "sanoffload"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> Iterator[str]:
    """Every package module ``name`` imports, at the top or inside a function."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name in mods)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join([*package[:len(package) - node.level + 1],
                                 *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if base in mods:
                yield base
            yield from (f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods)


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: set(_imports(name, path, mods)) - {name} for name, path in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that ends where it starts), or None."""
    done: set[str] = set()
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in stack:
            return [*stack[stack.index(node):], node]
        if node in done:
            return None
        stack.append(node)
        for dep in sorted(graph[node]):
            found = visit(dep)
            if found:
                return found
        stack.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        found = visit(node)
        if found:
            return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package() -> None:
    graph = _graph()
    assert "sanoffload.errors" in graph["sanoffload.runner"]  # the graph sees relative imports
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_process_layer_is_layered() -> None:
    graph = _graph()
    assert not graph["sanoffload.process"] & {"sanoffload.runner", "sanoffload.pipeline"}
    assert "sanoffload.runner" not in graph["sanoffload.pipeline"]


def _production() -> Iterator[tuple[str, ast.Module]]:
    for name, path in _modules().items():
        if name != "sanoffload.testing":
            yield name, ast.parse(path.read_text(), str(path))


def test_no_test_double_in_a_production_module() -> None:
    fakes = [f"{name}.{node.name}" for name, tree in _production() for node in ast.walk(tree)
             if isinstance(node, ast.ClassDef) and node.name.lstrip("_").startswith("Fake")]
    assert fakes == []
    users = [name for name, deps in _graph().items()
             if "sanoffload.testing" in deps and name != "sanoffload.testing"]
    assert users == []


def _calls_to(attr: str) -> set[str]:
    """Production modules calling ``module.function`` (``os.killpg``) or importing ``sh``."""
    mod, _, func = attr.partition(".")
    found = set()
    for name, tree in _production():
        for node in ast.walk(tree):
            if (func and isinstance(node, ast.Attribute) and node.attr == func
                    and isinstance(node.value, ast.Name) and node.value.id == mod):
                found.add(name)
            if not func and isinstance(node, ast.Import) and any(
                    a.name == mod for a in node.names):
                found.add(name)
            if not func and isinstance(node, ast.ImportFrom) and node.module == mod:
                found.add(name)
    return found


def test_one_executable_lookup_one_group_kill_and_sh_in_one_place() -> None:
    assert _calls_to("shutil.which") == {"sanoffload.process"}
    assert _calls_to("os.killpg") == {"sanoffload.process"}
    assert _calls_to("sh") == {"sanoffload.process"}
    # the one other way processes start: the pipeline (its docstring says why not sh)
    assert _calls_to("subprocess.Popen") == {"sanoffload.pipeline"}


def test_the_fake_pipeline_has_everything_the_real_one_has() -> None:
    fake = FakeRunner().on("tar", stdout=b"x")
    with fake.pipeline([Stage(["tar", "--diff", "-f", "-"])], stdin=subprocess.PIPE) as p:
        assert isinstance(p, PipelineLike)
        assert p.stdin is not None
        p.stdin.write(b"archive bytes")
        p.stdin.close()
        assert p.stdout.read() == b"x"
        assert p.describe() == "tar"
        assert not p.timed_out
        assert [r.code_name for r in p.wait()] == ["ok"]
    assert p.written == b"archive bytes"  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="already waited"):
        p.wait()
    with fake.pipeline([Stage(["tar"])]) as p:
        assert p.stdin is None
        p.wait()
    with CommandRunner().pipeline([Stage(["cat"])], stdin=subprocess.PIPE) as real:
        assert isinstance(real, PipelineLike)
        assert real.stdin is not None
        real.stdin.close()
        real.wait()


def test_restore_to_stdout_does_not_need_click_get_binary_stream(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    def gone(name: str) -> None:
        raise AssertionError("click.get_binary_stream is deprecated and goes in Click 9")

    monkeypatch.setattr(click, "get_binary_stream", gone)
    monkeypatch.setattr(cli, "make_runner", FakeRunner)
    monkeypatch.delenv("SANOFFLOAD_REPO", raising=False)
    (tmp_path / "repo").mkdir()
    backup = Repository(tmp_path / "repo").put(
        "fs1", "/srv/data", io.BytesIO(b"the archive"),
        {"frozen_at": datetime(2026, 11, 20, tzinfo=UTC), "file_count": 1},
        verify=False)
    assert cli.run(["store", "--repo", str(tmp_path / "repo"), "restore", str(backup), "-"]) == 0
    assert capsysbinary.readouterr().out == b"the archive"
