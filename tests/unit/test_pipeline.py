"""Runner.pipeline with real processes: bytes flow stage to stage, failures and deadlines."""

from __future__ import annotations

import hashlib
import time

import psutil
import pytest

from sanoffload.errors import CommandError, CommandNotFoundError, CommandTimeoutError
from sanoffload.pipeline import Pipeline, Stage
from sanoffload.runner import CommandRunner

pytestmark = pytest.mark.unit


def test_stages_are_joined_and_the_last_output_is_read() -> None:
    size = 3 * 1024 * 1024 + 7
    runner = CommandRunner()
    with runner.pipeline([Stage(["head", "-c", str(size), "/dev/zero"]),
                          Stage(["zstd", "-q", "-c"]), Stage(["zstd", "-q", "-d", "-c"])],
                         timeout=30) as p:
        out = p.stdout.read()
        results = p.wait()
    assert hashlib.sha256(out).digest() == hashlib.sha256(bytes(size)).digest()
    assert [r.code_name for r in results] == ["ok", "ok", "ok"]


def test_a_failing_stage_is_named_with_its_stderr_and_secrets_masked() -> None:
    runner = CommandRunner()
    with pytest.raises(CommandError) as info:
        with runner.pipeline([Stage(["sh", "-c", "echo bad s3cret >&2; exit 3"]),
                              Stage(["cat"])], secrets=["s3cret"]) as p:
            p.stdout.read()
            p.wait()
    assert "sh exited 3: bad ***" in str(info.value)
    assert "s3cret" not in str(info.value)


def test_named_exit_codes_are_tolerated() -> None:
    runner = CommandRunner()
    with runner.pipeline([Stage(["sh", "-c", "exit 1"], ok_codes={1: "file changed"}),
                          Stage(["cat"])]) as p:
        p.stdout.read()
        assert [r.code_name for r in p.wait()] == ["file changed", "ok"]


def test_the_deadline_kills_every_stage() -> None:
    runner = CommandRunner()
    started = time.monotonic()
    with pytest.raises(CommandTimeoutError):
        with runner.pipeline([Stage(["sleep", "60"]), Stage(["cat"])], timeout=1) as p:
            p.stdout.read()
            assert isinstance(p, Pipeline)
            pids = [proc.pid for proc in p.procs]
            p.wait()
    assert time.monotonic() - started < 10
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                   for pid in pids)


def test_a_reader_error_kills_the_pipeline() -> None:
    runner = CommandRunner()
    with pytest.raises(ValueError):
        with runner.pipeline([Stage(["sleep", "60"]), Stage(["cat"])], timeout=60) as p:
            assert isinstance(p, Pipeline)
            pids = [proc.pid for proc in p.procs]
            raise ValueError("the store refused the stream")
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


def test_a_missing_tool_is_reported_before_anything_starts() -> None:
    with pytest.raises(CommandNotFoundError, match="no-such-tool"):
        CommandRunner().pipeline([Stage(["cat"]), Stage(["no-such-tool"])])


def test_fake_pipeline_answers_from_rules_with_the_same_checks() -> None:
    from sanoffload.testing import FakeRunner

    fake = FakeRunner().on("tar", returncode=1, stderr="tar: file changed as we read it\n")
    fake.on("zstd", stdout=b"\x28\xb5\x2f\xfd")
    with fake.pipeline([Stage(["tar", "-cf", "-", "x"], ok_codes={1: "changed"}),
                        Stage(["zstd", "-c"])]) as p:
        assert p.stdout.read() == b"\x28\xb5\x2f\xfd"
        assert [r.code_name for r in p.wait()] == ["changed", "ok"]
    with pytest.raises(CommandError, match="tar exited 1"):
        with fake.pipeline([Stage(["tar", "-cf", "-", "x"]), Stage(["zstd", "-c"])]) as p:
            p.wait()
    assert fake.argvs()[0] == ["tar", "-cf", "-", "x"]


def test_a_failing_stage_keeps_the_lines_that_say_why() -> None:
    script = ("for i in 1 2 3 4 5; do echo \"tar: ./f$i: Cannot write: No space left on device\""
              " >&2; done; echo 'tar: Exiting with failure status due to previous errors' >&2;"
              " exit 2")
    with pytest.raises(CommandError) as info:
        with CommandRunner().pipeline([Stage(["sh", "-c", script])]) as p:
            p.stdout.read()
            p.wait()
    msg = str(info.value)
    assert "./f1: Cannot write: No space left on device" in msg
    assert msg.endswith("Exiting with failure status due to previous errors (and 2 more lines)")
