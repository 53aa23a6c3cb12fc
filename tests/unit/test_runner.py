"""The command runner: real subprocesses for CommandRunner, the same policies via FakeRunner."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from sanoffload.errors import (
    CommandError,
    CommandNotFoundError,
    CommandTimeoutError,
    Interrupted,
    MissingDependencyError,
)
from sanoffload.pipeline import Stage
from sanoffload.runner import MASK, CommandRunner, Runner
from sanoffload.signals import install_signal_handlers
from sanoffload.testing import FakeRunner

pytestmark = pytest.mark.unit

SECRET = "s3cr3t-Registered-91"
PER_CALL = "p3r-call-Secret-27"
IDIOM = "idiom-Chap-Value-55"


def _gone(pid: int, within: float = 5.0) -> bool:
    """True once ``pid`` no longer runs (a zombie waiting for init counts as gone)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _records_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------
# real runner: timeouts
# --------------------------------------------------------------------------

def test_timeout_kills_the_command() -> None:
    runner = CommandRunner()
    started = time.monotonic()
    with pytest.raises(CommandTimeoutError) as info:
        runner.run(["sleep", "30"], timeout=0.5)
    assert time.monotonic() - started < 10
    assert info.value.exit_code == 6
    assert "timed out after" in str(info.value) and info.value.argv == ["sleep", "30"]


def test_default_timeout_applies_when_call_names_none() -> None:
    with pytest.raises(CommandTimeoutError):
        CommandRunner(default_timeout=0.5).run(["sleep", "30"])


def test_a_short_command_does_not_wait_for_a_polling_loop() -> None:
    # sh's own _timeout polled every 0.1 s: each fsfreeze/lvcreate in the freeze window paid it
    runner = CommandRunner()
    runner.run(["true"])
    started = time.monotonic()
    for _ in range(10):
        runner.run(["true"], timeout=60)
    assert (time.monotonic() - started) / 10 < 0.05


def test_a_spawned_helper_is_waited_for_the_moment_it_exits() -> None:
    runner = CommandRunner()
    helper = runner.spawn(["sh", "-c", "exit 4"])
    started = time.monotonic()
    assert helper.wait(30) == 4
    assert time.monotonic() - started < 0.05
    slow = runner.spawn(["sleep", "30"])
    with pytest.raises(CommandTimeoutError):
        slow.wait(0.2)
    slow.kill()
    assert slow.wait(10) == 128 + 9


def test_timeout_kills_grandchildren_in_the_process_group() -> None:
    runner = CommandRunner()
    # the shell starts a background grandchild and reports its pid before blocking
    script = "sleep 300 & echo $!; echo $$; wait"
    with pytest.raises(CommandTimeoutError) as info:
        runner.run(["sh", "-c", script], timeout=1)
    grandchild, child = (int(x) for x in info.value.stdout.split())
    assert grandchild != child
    assert _gone(child)
    assert _gone(grandchild), "background grandchild survived the timeout"


def test_signal_while_waiting_kills_the_command(tmp_path: Path) -> None:
    """An Interrupted raised by the SIGTERM handler must not leave the child running."""
    pidfile = tmp_path / "pids"
    runner = CommandRunner()
    script = f"sleep 300 & echo $! > {pidfile}.tmp; echo $$ >> {pidfile}.tmp; " \
             f"mv {pidfile}.tmp {pidfile}; wait"
    sent = threading.Event()

    def send_when_running() -> None:
        deadline = time.monotonic() + 10
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        if pidfile.exists():
            sent.set()
            os.kill(os.getpid(), signal.SIGTERM)

    restore = install_signal_handlers([signal.SIGTERM])
    sender = threading.Thread(target=send_when_running)
    try:
        sender.start()
        with pytest.raises(Interrupted):
            runner.run(["sh", "-c", script], timeout=60)
    finally:
        sender.join()
        restore()
    assert sent.is_set()
    pids = [int(x) for x in pidfile.read_text().split()]
    assert len(pids) == 2
    assert all(_gone(pid) for pid in pids), "interrupted command left processes running"


# --------------------------------------------------------------------------
# real runner: exit codes, environment, stdin, missing tools
# --------------------------------------------------------------------------

def test_named_ok_code_lands_in_result() -> None:
    res = CommandRunner().run(["sh", "-c", "echo out; exit 15"], ok_codes={15: "session exists"})
    assert res.returncode == 15 and res.code_name == "session exists"
    assert not res.ok and res.stdout == "out\n"


def test_zero_is_ok() -> None:
    res = CommandRunner().run(["true"])
    assert res.ok and res.code_name == "ok" and res.duration >= 0


def test_unlisted_exit_code_raises_with_stderr_lines() -> None:
    script = "echo first-line >&2; echo the-last-line >&2; exit 7"
    with pytest.raises(CommandError) as info:
        CommandRunner().run(["sh", "-c", script], ok_codes={15: "session exists"})
    exc = info.value
    assert type(exc) is CommandError and exc.exit_code == 5
    assert exc.returncode == 7
    assert exc.message.endswith("failed with exit code 7: first-line; the-last-line")
    assert exc.stderr == "first-line\nthe-last-line\n"


#: what GNU tar 1.34 prints when an extraction runs out of space (recorded on a full ext4)
TAR_ENOSPC = "".join(f"tar: ./f{i}: Cannot write: No space left on device\n" for i in range(40)) + \
    "tar: Exiting with failure status due to previous errors\n"


@pytest.mark.hostile("restore", "a failing command whose cause is in an early stderr line, "
                     "followed by a summary line", "the error message names the cause")
def test_failure_message_keeps_the_cause_not_only_the_summary() -> None:
    with pytest.raises(CommandError) as info:
        CommandRunner().run(["sh", "-c", 'printf "%s" "$1" >&2; exit 2', "sh", TAR_ENOSPC])
    msg = info.value.message
    assert "Cannot write: No space left on device" in msg
    assert msg.endswith("Exiting with failure status due to previous errors (and 37 more lines)")
    assert len(msg.partition("exit code 2: ")[2]) < 1500  # bounded, however much was printed
    fake = FakeRunner().on("tar", returncode=2, stderr=TAR_ENOSPC)
    with pytest.raises(CommandError, match="No space left on device"):
        fake.run(["tar", "--extract"])


@pytest.mark.hostile("restore", "a failing command printing terminal escapes and a newline "
                     "in a name", "message is one line with the escapes shown as text")
def test_failure_message_is_escaped() -> None:
    with pytest.raises(CommandError) as info:
        FakeRunner().on("tar", returncode=2,
                        stderr="tar: ./a\x1b]0;owned\x07b: Cannot open\n").run(["tar", "-x"])
    assert "\x1b" not in info.value.message and "\\x1b]0;owned\\x07b" in info.value.message


# --------------------------------------------------------------------------
# real runner: argv is bytes on Linux
# --------------------------------------------------------------------------

@pytest.mark.hostile("agent", "a non-UTF-8 path (b'\\xff', or os.fsdecode's '\\udcff') in argv",
                     "reaches the command byte for byte; shown escaped")
def test_bytes_and_surrogate_args_reach_the_command_exactly(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="sanoffload")
    base = os.fsencode(tmp_path)
    runner = CommandRunner()
    res = runner.run(["touch", base + b"/a\xff", os.fsdecode(base + b"/b\xfe"),
                      tmp_path / os.fsdecode(b"c\xfd")])
    assert sorted(os.listdir(base)) == [b"a\xff", b"b\xfe", b"c\xfd"]
    assert res.argv[1] == os.fsdecode(base) + "/a\\xff"
    assert res.argv[2] == os.fsdecode(base) + "/b\\xfe"
    assert "\udcfe" not in _records_text(caplog) and "a\\xff" in _records_text(caplog)
    with pytest.raises(CommandError) as info:
        runner.run(["ls", base + b"/missing\xff\n"])
    assert "missing\\xff\\n" in info.value.message and "\n" not in info.value.message
    with runner.pipeline([Stage(["ls", base])]) as p:
        assert p.stdout.read() == b"a\xff\nb\xfe\nc\xfd\n"
        p.wait()
    with runner.stream(["ls", "-1", "--", base]) as out:
        assert out.read() == b"a\xff\nb\xfe\nc\xfd\n"
    spawned = runner.spawn(["touch", base + b"/d\xfc"])
    assert spawned.wait(10) == 0 and os.path.exists(base + b"/d\xfc")


def test_fake_records_bytes_args_as_their_fsdecode_form() -> None:
    fake = FakeRunner().on("tar")
    fake.run(["tar", b"--directory=/t\xff"])
    assert fake.argvs() == [["tar", os.fsdecode(b"--directory=/t\xff")]]


def test_pass_fds_reach_the_command(tmp_path: Path) -> None:
    (tmp_path / "inside").write_text("x")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        res = CommandRunner().run(["ls", f"/proc/self/fd/{fd}"], pass_fds=[fd])
        assert res.stdout == "inside\n"
        assert not os.get_inheritable(fd)
        with pytest.raises(CommandError):  # not passed: not there
            CommandRunner().run(["ls", f"/proc/self/fd/{fd}"])
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# Runner.stream: a command's stdout read as it comes
# --------------------------------------------------------------------------

def test_stream_reads_as_it_comes_and_checks_the_exit_status() -> None:
    runner = CommandRunner()
    with runner.stream(["sh", "-c", "printf 'a\\nb\\n'"], timeout=10) as out:
        assert list(out) == [b"a\n", b"b\n"]
    with runner.stream(["sh", "-c", "exit 3"], ok_codes={3: "fine"}) as out:
        assert out.read() == b""


@pytest.mark.hostile("store", "a streamed command that fails after part of its output",
                     "CommandError naming its stderr once the stream ends")
def test_stream_failure_after_partial_output_is_an_error() -> None:
    got: list[bytes] = []
    with pytest.raises(CommandError, match="Unexpected EOF in archive") as info:
        with CommandRunner().stream(
                ["sh", "-c", "echo one; echo 'tar: Unexpected EOF in archive' >&2; exit 2"],
                timeout=10) as out:
            got += list(out)
    assert got == [b"one\n"] and info.value.returncode == 2
    # unread output is read to its end before the status is checked
    with pytest.raises(CommandError, match="exited 2"):
        with CommandRunner().stream(["sh", "-c", "seq 100000; exit 2"]) as out:
            out.readline()


def test_stream_deadline_and_early_exit_kill_the_command(tmp_path: Path) -> None:
    runner = CommandRunner()
    started = time.monotonic()
    with pytest.raises(CommandTimeoutError):
        with runner.stream(["sh", "-c", "echo go; sleep 60"], timeout=1) as out:
            out.read()
    assert time.monotonic() - started < 10
    pidfile = tmp_path / "pid"
    with pytest.raises(ValueError):
        with runner.stream(["sh", "-c", f"echo $$ > {pidfile}; echo ready; exec sleep 60"],
                           timeout=60) as out:
            assert out.readline() == b"ready\n"
            raise ValueError("the reader gave up")
    assert _gone(int(pidfile.read_text()))


def test_fake_stream_answers_from_a_rule() -> None:
    fake = FakeRunner().on("tar", "--list", stdout=b"x\n", returncode=2, stderr="tar: cut\n")
    with pytest.raises(CommandError, match="tar: cut"):
        with fake.stream(["tar", "--list"], timeout=5) as out:
            assert out.read() == b"x\n"
    assert fake.calls[0].timeout == 5


def test_stdout_tail_used_when_stderr_empty() -> None:
    with pytest.raises(CommandError, match="only-stdout"):
        CommandRunner().run(["sh", "-c", "echo only-stdout; exit 3"])


def test_death_by_signal_is_an_error_with_shell_style_code() -> None:
    with pytest.raises(CommandError) as info:
        CommandRunner().run(["sh", "-c", "kill -TERM $$"])
    assert info.value.returncode == 128 + signal.SIGTERM


def test_child_env_is_minimal_with_lc_all_c(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANOFFLOAD_LEAK_CHECK", "leaked")
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    res = CommandRunner().run(["env"], env={"LC_ALL": "fr_FR.UTF-8", "EXTRA": "1"})
    lines = res.stdout.splitlines()
    assert "LC_ALL=C" in lines and "LANG=C" in lines and "EXTRA=1" in lines
    assert not any(line.startswith("SANOFFLOAD_LEAK_CHECK=") for line in lines)


def test_missing_tool_raises_command_not_found() -> None:
    with pytest.raises(CommandNotFoundError) as info:
        CommandRunner().run(["sanoffload-no-such-tool-xyz", "--help"])
    exc = info.value
    assert exc.exit_code == 4 and isinstance(exc, MissingDependencyError)
    assert "sanoffload-no-such-tool-xyz" in exc.message
    assert exc.hint and "install" in exc.hint


def test_input_is_passed_on_stdin() -> None:
    runner = CommandRunner()
    assert runner.run(["cat"], input="hello\nworld\n").stdout == "hello\nworld\n"
    assert runner.run(["wc", "-c"], input=b"\x00\x01\x02").stdout.strip() == "3"


def test_cwd_is_honoured(tmp_path: Path) -> None:
    assert CommandRunner().run(["pwd"], cwd=str(tmp_path)).stdout.strip() == str(tmp_path)


def test_json_parsing_and_bad_json() -> None:
    runner = CommandRunner()
    assert runner.json(["echo", '{"report": [1]}']) == {"report": [1]}
    with pytest.raises(CommandError, match="not JSON"):
        runner.json(["echo", "not json"])


def test_which_uses_sbin_path() -> None:
    runner = CommandRunner()
    assert runner.which("sh") is not None
    assert runner.which("sanoffload-no-such-tool-xyz") is None


def test_empty_argv_is_a_bug() -> None:
    with pytest.raises(ValueError):
        CommandRunner().run([])


# --------------------------------------------------------------------------
# real runner: masking
# --------------------------------------------------------------------------

def test_registered_secret_masked_everywhere(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="sanoffload")
    runner = CommandRunner()
    runner.add_secret(SECRET)
    res = runner.run(["sh", "-c", 'echo "out $1"; echo "err $1" >&2', "sh", SECRET])
    assert SECRET not in " ".join(res.argv) and MASK in res.argv
    assert res.stdout == f"out {MASK}\n" and res.stderr == f"err {MASK}\n"
    text = _records_text(caplog)
    assert "run: sh -c" in text and SECRET not in text


def test_per_call_secret_masked_in_error_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="sanoffload")
    runner = CommandRunner()
    with pytest.raises(CommandError) as info:
        runner.run(["sh", "-c", 'echo "login failed for $1" >&2; exit 24', "sh", PER_CALL],
                   secrets=[PER_CALL])
    exc = info.value
    assert f"login failed for {MASK}" in exc.message
    for text in (exc.message, " ".join(exc.argv), exc.stderr, exc.stdout, str(exc)):
        assert PER_CALL not in text
    assert PER_CALL not in _records_text(caplog)
    # per-call means per call: the next call does not mask it
    assert PER_CALL in runner.run(["echo", PER_CALL]).stdout


def test_secret_masked_in_timeout_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="sanoffload")
    runner = CommandRunner()
    runner.add_secret(SECRET)
    with pytest.raises(CommandTimeoutError) as info:
        runner.run(["sh", "-c", 'echo "$1"; sleep 30', "sh", SECRET], timeout=0.5)
    assert SECRET not in str(info.value) and SECRET not in info.value.stdout
    assert MASK in str(info.value)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and SECRET not in _records_text(caplog)


def test_unregistered_iscsiadm_idiom_and_chap_flag_masked(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="sanoffload")
    argv = ["sh", "-c", "exit 0", "sh", "-m", "node", "-o", "update",
            "-n", "node.session.auth.password", "-v", IDIOM, f"--chap-secret={IDIOM}x"]
    res = CommandRunner().run(argv)
    shown = list(res.argv)
    assert shown[shown.index("-v") + 1] == MASK
    assert "--chap-secret=***" in shown
    assert "node.session.auth.password" in shown  # the name stays readable
    assert IDIOM not in " ".join(shown)
    assert IDIOM not in _records_text(caplog)


def test_idiom_masked_in_failure_message() -> None:
    argv = ["sh", "-c", "exit 3", "sh", "-n", "node.session.auth.password_in", "-v", IDIOM]
    with pytest.raises(CommandError) as info:
        CommandRunner().run(argv)
    assert IDIOM not in info.value.message and IDIOM not in " ".join(info.value.argv)


# --------------------------------------------------------------------------
# FakeRunner: same policies, scripted answers
# --------------------------------------------------------------------------

def test_fake_rule_answers_and_call_is_recorded() -> None:
    fake = FakeRunner(default_timeout=42)
    fake.on("lvs", stdout='{"report": []}')
    assert fake.json(["lvs", "--reportformat", "json"]) == {"report": []}
    call = fake.calls[0]
    assert call.argv == ["lvs", "--reportformat", "json"]
    assert call.timeout == 42 and call.input is None
    assert call.env["LC_ALL"] == "C"
    assert fake.called("lvs", "--reportformat") and not fake.called("lvs", "vg0")
    assert fake.argvs() == [["lvs", "--reportformat", "json"]]


def test_fake_records_input_and_call_timeout() -> None:
    fake = FakeRunner().on("cat")
    fake.run(["cat"], input="data", timeout=3)
    assert fake.calls[0].input == "data" and fake.calls[0].timeout == 3


def test_fake_prefix_matching_later_rule_wins() -> None:
    fake = FakeRunner()
    fake.on("iscsiadm", stdout="generic")
    fake.on("iscsiadm", "-m", "session", stdout="sessions")
    assert fake.run(["iscsiadm", "-m", "session", "-P", "3"]).stdout == "sessions"
    assert fake.run(["iscsiadm", "-m", "node"]).stdout == "generic"
    # a prefix longer than argv never matches
    fake2 = FakeRunner().on("a", "b", "c")
    with pytest.raises(AssertionError):
        fake2.run(["a", "b"])


def test_fake_times_limits_a_rule() -> None:
    fake = FakeRunner()
    fake.on("udevadm", "settle", stdout="second")
    fake.on("udevadm", "settle", stdout="first", times=1)
    assert fake.run(["udevadm", "settle"]).stdout == "first"
    assert fake.run(["udevadm", "settle"]).stdout == "second"
    assert fake.rules[0].used == 1


def test_fake_unmatched_call_fails_loudly() -> None:
    fake = FakeRunner().on("lvs")
    with pytest.raises(AssertionError, match="no rule for.*vgs"):
        fake.run(["vgs"])
    assert fake.argvs() == [["vgs"]]  # recorded even though it failed


def test_fake_exhausted_rule_then_unmatched() -> None:
    fake = FakeRunner().on("x", times=1)
    fake.run(["x"])
    with pytest.raises(AssertionError):
        fake.run(["x"])


def test_fake_exit_code_policy() -> None:
    fake = FakeRunner()
    fake.on("iscsiadm", "-m", "node", "--login", returncode=15, stderr="already present")
    res = fake.run(["iscsiadm", "-m", "node", "--login"], ok_codes={15: "session exists"})
    assert res.code_name == "session exists"
    fake.on("lvcreate", returncode=5, stderr="  Volume group \"vg\" has insufficient free space\n")
    with pytest.raises(CommandError) as info:
        fake.run(["lvcreate", "-s", "vg/lv"])
    assert info.value.returncode == 5 and "insufficient free space" in info.value.message


def test_fake_not_found_and_timeout() -> None:
    fake = FakeRunner()
    fake.on("iscsiadm", not_found=True)
    fake.on("udevadm", timeout=True, stdout="partial")
    with pytest.raises(CommandNotFoundError) as nf:
        fake.run(["iscsiadm", "-m", "session"])
    assert nf.value.exit_code == 4
    with pytest.raises(CommandTimeoutError) as to:
        fake.run(["udevadm", "settle"], timeout=7)
    assert to.value.stdout == "partial" and "after 7s" in to.value.message


def test_fake_action_sees_argv() -> None:
    seen: list[list[str]] = []
    fake = FakeRunner().on("mkdir", action=seen.append)
    fake.run(["mkdir", "/x"])
    assert seen == [["mkdir", "/x"]]


def test_fake_masks_like_the_real_runner(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="sanoffload")
    fake = FakeRunner()
    fake.add_secret(SECRET)
    fake.on("targetcli", returncode=1, stdout="user ok\n", stderr=f"bad password {SECRET}\n")
    with pytest.raises(CommandError) as info:
        fake.run(["targetcli", "set", f"password={PER_CALL}", SECRET], secrets=[PER_CALL])
    exc = info.value
    assert exc.stderr == f"bad password {MASK}\n"
    assert exc.argv == ["targetcli", "set", f"password={MASK}", MASK]
    for text in (exc.message, _records_text(caplog)):
        assert SECRET not in text and PER_CALL not in text
    fake.on("iscsiadm", stdout=f"{SECRET}\n")
    res = fake.run(["iscsiadm", "-n", "node.session.auth.password", "-v", IDIOM])
    assert res.stdout == f"{MASK}\n" and res.argv[-1] == MASK


def test_mask_prefers_longest_secret() -> None:
    runner: Runner = FakeRunner()
    runner.add_secret("abc")
    runner.add_secret("abcdef")
    assert runner.mask("xabcdefx abc") == f"x{MASK}x {MASK}"
    runner.add_secret("")  # an empty secret would mask between every character
    assert runner.mask("plain") == "plain"
