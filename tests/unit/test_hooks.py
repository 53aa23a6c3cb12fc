"""Pre-freeze / post-thaw hooks: who may be a hook, how they run, what a failure does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sanoffload.agent.hooks import (
    POST_THAW,
    PRE_FREEZE,
    Hook,
    Hooks,
    check_hook,
    check_hooks,
    run_post_thaw,
    run_pre_freeze,
    stderr_tail,
)
from sanoffload.errors import FreezeError, RefusedError
from sanoffload.testing import FakeRunner

pytestmark = pytest.mark.unit

ME = os.getuid()
MP = "/srv/data"
PATH = "/srv/data/db"


def make_hook(path: Path, mode: int = 0o755) -> str:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(mode)
    return str(path)


@pytest.fixture
def hookdir(tmp_path: Path) -> Path:
    d = tmp_path / "hooks"
    d.mkdir(mode=0o755)
    return d


# --------------------------------------------------------------------------
# who may be a hook
# --------------------------------------------------------------------------

def test_a_private_executable_is_accepted(hookdir: Path) -> None:
    check_hook(Hook(make_hook(hookdir / "ok")), trusted_uid=ME)


def test_relative_path_is_refused() -> None:
    with pytest.raises(RefusedError, match="absolute path") as info:
        check_hook(Hook("hooks/flush-db"), trusted_uid=ME)
    assert info.value.exit_code == 3


def test_missing_hook_is_refused(hookdir: Path) -> None:
    with pytest.raises(RefusedError, match="No such file"):
        check_hook(Hook(str(hookdir / "nope")), trusted_uid=ME)


def test_not_executable_is_refused(hookdir: Path) -> None:
    with pytest.raises(RefusedError, match="not executable"):
        check_hook(Hook(make_hook(hookdir / "h", 0o644)), trusted_uid=ME)


def test_directory_is_refused(hookdir: Path) -> None:
    with pytest.raises(RefusedError, match="not a regular file"):
        check_hook(Hook(str(hookdir)), trusted_uid=ME)


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777])
def test_group_or_world_writable_hook_is_refused(hookdir: Path, mode: int) -> None:
    with pytest.raises(RefusedError, match=f"group- or world-writable \\(mode {mode:04o}\\)") \
            as info:
        check_hook(Hook(make_hook(hookdir / "h", mode)), trusted_uid=ME)
    assert info.value.hint == f"chmod go-w {hookdir / 'h'}"


def test_hook_not_owned_by_root_is_refused(hookdir: Path) -> None:
    path = make_hook(hookdir / "h")
    if os.geteuid() == 0:
        os.chown(path, 12345, -1)  # as root: give it away; as a user it is already not root's
    with pytest.raises(RefusedError, match="owned by uid .*, must be owned by root"):
        check_hook(Hook(path), trusted_uid=0)


def test_hook_in_a_writable_directory_is_refused(hookdir: Path) -> None:
    path = make_hook(hookdir / "h")
    hookdir.chmod(0o777)  # anyone could rename it away and put their own in its place
    with pytest.raises(RefusedError, match=f"directory {hookdir} is group- or world-writable"):
        check_hook(Hook(path), trusted_uid=ME)


def test_hook_in_a_sticky_directory_is_accepted(hookdir: Path) -> None:
    path = make_hook(hookdir / "h")
    hookdir.chmod(0o1777)  # like /tmp: others cannot rename or remove what is not theirs
    check_hook(Hook(path), trusted_uid=ME)


def test_symlink_is_judged_by_its_target(hookdir: Path) -> None:
    target = make_hook(hookdir / "real", 0o777)
    (hookdir / "link").symlink_to(target)
    with pytest.raises(RefusedError, match="world-writable"):
        check_hook(Hook(str(hookdir / "link")), trusted_uid=ME)


def test_check_hooks_covers_post_thaw_hooks_too(hookdir: Path) -> None:
    hooks = Hooks.from_paths([make_hook(hookdir / "pre")], [make_hook(hookdir / "post", 0o777)],
                             trusted_uid=ME)
    with pytest.raises(RefusedError, match="post"):
        check_hooks(hooks)


# --------------------------------------------------------------------------
# running them
# --------------------------------------------------------------------------

def test_pre_freeze_hooks_run_in_order_with_env_and_timeout(hookdir: Path) -> None:
    a, b = make_hook(hookdir / "a"), make_hook(hookdir / "b")
    hooks = Hooks((Hook(a, 7), Hook(b, 9)), (), trusted_uid=ME)
    runner = FakeRunner().on(a).on(b)
    run_pre_freeze(runner, hooks, MP, PATH)
    assert runner.argvs() == [[a], [b]]
    assert [c.timeout for c in runner.calls] == [7, 9]
    env = runner.calls[0].env
    assert env["SANOFFLOAD_PHASE"] == PRE_FREEZE == "pre-freeze"
    assert env["SANOFFLOAD_MOUNTPOINT"] == MP and env["SANOFFLOAD_PATH"] == PATH
    assert env["LC_ALL"] == "C"  # the runner's minimal environment, plus ours


def test_failing_pre_freeze_hook_raises_freeze_error_with_stderr_tail(hookdir: Path) -> None:
    a, b = make_hook(hookdir / "flush-db"), make_hook(hookdir / "b")
    hooks = Hooks.from_paths([a, b], trusted_uid=ME)
    noise = "".join(f"line {i}\n" for i in range(20))
    runner = FakeRunner().on(a, returncode=3, stderr=noise + "db: cannot lock tables\n").on(b)
    with pytest.raises(FreezeError) as info:
        run_pre_freeze(runner, hooks, MP, PATH)
    msg = str(info.value)
    assert f"pre-freeze hook {a} failed (exit 3)" in msg
    assert "nothing was frozen" in msg
    assert msg.endswith("line 16 | line 17 | line 18 | line 19 | db: cannot lock tables")
    assert info.value.exit_code == 9
    assert not runner.called(b), "hooks after a failing one must not run"


def test_pre_freeze_hook_timeout_is_a_freeze_error(hookdir: Path) -> None:
    a = make_hook(hookdir / "slow")
    runner = FakeRunner().on(a, timeout=True, stderr="still flushing\n")
    with pytest.raises(FreezeError, match="slow timed out after 60s; nothing was frozen: "
                                          "still flushing"):
        run_pre_freeze(runner, Hooks.from_paths([a], trusted_uid=ME), MP, PATH)


def test_pre_freeze_hook_changed_since_the_check_is_refused(hookdir: Path) -> None:
    a = make_hook(hookdir / "a")
    hooks = Hooks.from_paths([a], trusted_uid=ME)
    check_hooks(hooks)
    Path(a).chmod(0o777)
    runner = FakeRunner()
    with pytest.raises(RefusedError):
        run_pre_freeze(runner, hooks, MP, PATH)
    assert runner.calls == []


def test_post_thaw_failures_are_collected_and_every_hook_runs(hookdir: Path) -> None:
    a, b, c = (make_hook(hookdir / n) for n in ("a", "b", "c"))
    hooks = Hooks.from_paths([], [a, b, c], trusted_uid=ME)
    runner = FakeRunner().on(a, returncode=2, stderr="resume failed\n").on(b, timeout=True).on(c)
    failures = run_post_thaw(runner, hooks, MP, PATH)
    assert runner.argvs() == [[a], [b], [c]]
    assert all(call.env["SANOFFLOAD_PHASE"] == POST_THAW for call in runner.calls)
    assert [f.hook.path for f in failures] == [a, b]
    assert failures[0].returncode == 2 and failures[0].stderr_tail == "resume failed"
    assert failures[0].phase == "post-thaw"
    assert "timed out" in failures[1].message


def test_refused_post_thaw_hook_is_a_failure_not_an_exception(hookdir: Path) -> None:
    a, b = make_hook(hookdir / "a"), make_hook(hookdir / "b")
    Path(a).chmod(0o777)
    runner = FakeRunner().on(b)
    failures = run_post_thaw(runner, Hooks.from_paths([], [a, b], trusted_uid=ME), MP, PATH)
    assert runner.argvs() == [[b]]
    assert len(failures) == 1 and "world-writable" in failures[0].message


def test_stderr_tail_is_bounded() -> None:
    assert stderr_tail("") == ""
    assert stderr_tail("a\n\nb\n") == "a | b"
    assert len(stderr_tail("x" * 10_000)) == 500
