"""sanoffload.proxy.devices: find the disk by identifier with fake pyudev objects.

This machine has no udevd, so the FakeUdev* classes below stand in for
pyudev's Context, Monitor and Device. They keep pyudev's API and its
behaviour where it matters: a monitor receives nothing before ``start()``
(events before it are lost), ``filter_by`` drops other subsystems and device
types, ``poll(timeout)`` returns None once the timeout has passed (on a fake
clock), ``list_devices`` shows what exists at that moment.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sanoffload.errors import DeadlineError, ResourceError
from sanoffload.proxy import devices
from sanoffload.proxy.devices import DeviceWaiter, check_identifier, normalize_wwid

pytestmark = pytest.mark.unit

HEX = "6001405a1b2c3d4e5f60718293a4b5c6"
IDENT = f"naa.{HEX}"
OTHER_HEX = "6001405ffeeddccbbaa9988776655443"


# --------------------------------------------------------------------------
# honest fakes of pyudev
# --------------------------------------------------------------------------

class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeUdevAttributes:
    """pyudev.Attributes: sysfs attribute values as bytes; ``get`` gives default if absent."""

    def __init__(self, values: dict[str, bytes]) -> None:
        self._values = values

    def get(self, attribute: str, default: Any = None) -> Any:
        return self._values.get(attribute, default)

    def asstring(self, attribute: str) -> str:
        return self._values[attribute].decode()


class FakeUdevDevice:
    """pyudev.Device for a SCSI disk (or partition) as udev shows an LIO LUN."""

    def __init__(self, name: str, *, wwn_hex: str | None = HEX, sysfs_wwid: bool = True,
                 udev_wwn: bool = True, initialized: bool = True, action: str | None = None,
                 device_type: str = "disk", subsystem: str = "block") -> None:
        self.sys_name = name
        self.sys_path = f"/sys/devices/platform/host2/session1/target2:0:0/2:0:0:0/block/{name}"
        self.device_node = f"/dev/{name}"
        self.subsystem = subsystem
        self.device_type = device_type
        self.is_initialized = initialized
        self.action = action
        props = {"DEVNAME": self.device_node, "DEVTYPE": device_type, "SUBSYSTEM": subsystem}
        attrs: dict[str, bytes] = {}
        if wwn_hex is not None:
            if udev_wwn:
                # scsi_id: ID_WWN is only the first 16 digits
                props["ID_WWN"] = f"0x{wwn_hex[:16]}"
                props["ID_WWN_WITH_EXTENSION"] = f"0x{wwn_hex}"
            if sysfs_wwid and device_type == "disk":
                attrs["device/wwid"] = f"naa.{wwn_hex}\n".encode()
        self.properties = props
        self.attributes = FakeUdevAttributes(attrs)

    def event(self, action: str | None, **changes: Any) -> FakeUdevDevice:
        """The same device as a monitor event would bring it."""
        clone = FakeUdevDevice.__new__(FakeUdevDevice)
        clone.__dict__.update(self.__dict__)
        clone.action = action
        clone.__dict__.update(changes)
        return clone


class FakeUdevContext:
    """pyudev.Context: the udev database (what exists now) and the netlink broadcast."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.devices: dict[str, FakeUdevDevice] = {}
        self.monitors: list[FakeUdevMonitor] = []
        self.log: list[str] = []
        self.enumerations: list[dict[str, Any]] = []
        self._pending: list[tuple[float, FakeUdevDevice]] = []

    def list_devices(self, **kwargs: Any) -> Iterator[FakeUdevDevice]:
        """Enumerator.match: ``subsystem=``, other keywords match properties."""
        self.enumerations.append(dict(kwargs))
        subsystem = kwargs.pop("subsystem", None)
        for device in list(self.devices.values()):
            if subsystem is not None and device.subsystem != subsystem:
                continue
            if any(device.properties.get(k) != v for k, v in kwargs.items()):
                continue
            yield device

    def add(self, device: FakeUdevDevice) -> FakeUdevDevice:
        """A device that exists before anyone watches (no event)."""
        self.devices[device.sys_path] = device
        return device

    def emit(self, device: FakeUdevDevice, action: str = "add", delay: float = 0.0) -> None:
        """udev is done with ``device`` ``delay`` s from now: then it is in the database
        and every monitor started by now receives the event."""
        at = self.clock.now + delay
        event = device.event(action)
        for monitor in self.monitors:
            monitor._deliver(at, event)
        self._pending.append((at, event))
        self.settle()

    def settle(self) -> None:
        """Apply the database changes whose time has come."""
        keep = []
        for at, event in self._pending:
            if at > self.clock.now:
                keep.append((at, event))
            elif event.action == "remove":
                self.devices.pop(event.sys_path, None)
            else:
                self.devices[event.sys_path] = event.event(None)
        self._pending = keep


class FakeUdevMonitor:
    """pyudev.Monitor over a FakeUdevContext."""

    _seq = itertools.count()

    def __init__(self, context: FakeUdevContext, source: str = "udev") -> None:
        self.context = context
        self.source = source
        self.started = False
        self.filters: list[tuple[str, str | None]] = []
        self._queue: list[tuple[float, int, FakeUdevDevice]] = []
        self.polls: list[float | None] = []

    @classmethod
    def from_netlink(cls, context: FakeUdevContext, source: str = "udev") -> FakeUdevMonitor:
        monitor = cls(context, source)
        context.monitors.append(monitor)
        return monitor

    def filter_by(self, subsystem: str, device_type: str | None = None) -> None:
        self.filters.append((subsystem, device_type))

    def start(self) -> None:
        if not self.started:
            self.context.log.append("monitor-start")
        self.started = True

    def _passes(self, device: FakeUdevDevice) -> bool:
        if not self.filters:
            return True
        return any(device.subsystem == s and (t is None or device.device_type == t)
                   for s, t in self.filters)

    def _deliver(self, at: float, device: FakeUdevDevice) -> None:
        # a netlink socket not yet bound receives nothing: the event is lost for us
        if self.started and self._passes(device):
            bisect.insort(self._queue, (at, next(self._seq), device))

    def poll(self, timeout: float | None = None) -> FakeUdevDevice | None:
        self.start()  # pyudev's poll starts the monitor implicitly
        self.polls.append(timeout)
        clock = self.context.clock
        limit = float("inf") if timeout is None else clock.now + max(timeout, 0.0)
        if self._queue and self._queue[0][0] <= limit:
            at, _, device = self._queue.pop(0)
            clock.now = max(clock.now, at)
            self.context.settle()
            return device
        if timeout is None:
            raise AssertionError("poll() without timeout would block forever")
        clock.now = limit
        self.context.settle()
        return None


class FakeUdev:
    """A context, its clock and a waiter factory for DeviceWaiter."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.context = FakeUdevContext(self.clock)

    def waiter(self, identifier: str = IDENT, deadline_s: float = 60.0) -> DeviceWaiter:
        return DeviceWaiter(identifier, deadline_s, context=self.context,
                            monitor_factory=FakeUdevMonitor.from_netlink, clock=self.clock)

    def factory(self) -> Callable[..., DeviceWaiter]:
        return lambda identifier, deadline_s=60.0: self.waiter(identifier, deadline_s)

    @property
    def monitor(self) -> FakeUdevMonitor:
        assert len(self.context.monitors) == 1
        return self.context.monitors[0]


@pytest.fixture
def udev() -> FakeUdev:
    return FakeUdev()


# --------------------------------------------------------------------------
# identifiers
# --------------------------------------------------------------------------

def test_normalize_wwid_spellings() -> None:
    assert normalize_wwid(f"0x{HEX.upper()}") == IDENT
    assert normalize_wwid(f"naa.{HEX}\n".encode()) == IDENT
    assert normalize_wwid(f"  NAA.{HEX}  ") == IDENT
    assert normalize_wwid("") is None and normalize_wwid(None) is None
    # sixteen digits (udev's ID_WWN) stay sixteen: never equal to the full identifier
    assert normalize_wwid(f"0x{HEX[:16]}") == f"naa.{HEX[:16]}" != IDENT
    assert normalize_wwid("t10.LIO-ORG disk0") == "t10.lio-org disk0"


@pytest.mark.parametrize("bad", ["naa.123", f"eui.{HEX}", HEX, f"naa.{HEX}zz", "-naa"])
def test_check_identifier_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        check_identifier(bad)


def test_check_identifier_accepts_udev_spelling() -> None:
    assert check_identifier(f"0x{HEX}") == IDENT


# --------------------------------------------------------------------------
# the waiter
# --------------------------------------------------------------------------

def test_monitor_filters_block_disks_and_starts_on_enter(udev: FakeUdev) -> None:
    with udev.waiter() as _w:
        assert udev.monitor.started
        assert udev.monitor.filters == [("block", "disk")]
        assert udev.monitor.source == "udev"


def test_already_present_device_is_matched_without_waiting(udev: FakeUdev) -> None:
    udev.context.add(FakeUdevDevice("sda", wwn_hex=OTHER_HEX))
    udev.context.add(FakeUdevDevice("sdb"))
    start = udev.clock.now
    with udev.waiter() as w:
        assert w.wait() == "/dev/sdb"
    assert udev.clock.now == start
    assert udev.context.enumerations == [{"subsystem": "block", "DEVTYPE": "disk"}]


def test_matched_by_sysfs_wwid_alone(udev: FakeUdev) -> None:
    udev.context.add(FakeUdevDevice("sdc", udev_wwn=False))
    with udev.waiter() as w:
        assert w.wait() == "/dev/sdc"


def test_matched_by_id_wwn_with_extension_alone(udev: FakeUdev) -> None:
    udev.context.add(FakeUdevDevice("sdc", sysfs_wwid=False))
    with udev.waiter() as w:
        assert w.wait() == "/dev/sdc"


def test_sixteen_digit_id_wwn_alone_never_matches(udev: FakeUdev) -> None:
    # another LUN of the same target: same first 16 digits, other extension
    twin = HEX[:16] + "0" * 16
    udev.context.add(FakeUdevDevice("sdd", wwn_hex=twin))
    with udev.waiter(deadline_s=4) as w, pytest.raises(DeadlineError):
        w.wait()


def test_device_appearing_later_is_matched(udev: FakeUdev) -> None:
    start = udev.clock.now
    with udev.waiter() as w:
        udev.context.emit(FakeUdevDevice("sdb"), delay=3.5)
        assert w.wait() == "/dev/sdb"
    assert udev.clock.now == pytest.approx(start + 3.5)


def test_event_between_enter_and_wait_is_not_lost(udev: FakeUdev) -> None:
    with udev.waiter() as w:
        # the login: the kernel adds the disk and udev announces it before wait() runs
        udev.context.emit(FakeUdevDevice("sdb"))
        udev.context.devices.clear()  # even if the enumeration somehow missed it
        assert w.wait() == "/dev/sdb"


def test_event_before_the_monitor_started_is_lost_to_it(udev: FakeUdev) -> None:
    # why the waiter must be entered before the login (the fake is honest about it)
    udev.context.emit(FakeUdevDevice("sdb"))
    udev.context.devices.clear()
    with udev.waiter(deadline_s=2) as w, pytest.raises(DeadlineError):
        w.wait()


def test_non_matching_devices_are_ignored(udev: FakeUdev) -> None:
    udev.context.add(FakeUdevDevice("sda", wwn_hex=None))
    with udev.waiter() as w:
        udev.context.emit(FakeUdevDevice("sdx", wwn_hex=OTHER_HEX), delay=1)
        udev.context.emit(FakeUdevDevice("sdy", wwn_hex=None), delay=2)
        udev.context.emit(FakeUdevDevice("sdb"), delay=5)
        assert w.wait() == "/dev/sdb"


def test_partitions_carrying_the_identifier_are_not_disks(udev: FakeUdev) -> None:
    # udev copies ID_WWN_WITH_EXTENSION to partitions: only DEVTYPE disk may count
    udev.context.add(FakeUdevDevice("sdb1", device_type="partition"))
    with udev.waiter() as w:
        udev.context.emit(FakeUdevDevice("sdb2", device_type="partition"), delay=1)
        udev.context.emit(FakeUdevDevice("sdb"), delay=2)
        assert w.wait() == "/dev/sdb"


def test_uninitialized_device_is_ignored_until_udev_is_done(udev: FakeUdev) -> None:
    udev.context.add(FakeUdevDevice("sdb", initialized=False))
    with udev.waiter() as w:
        udev.context.emit(FakeUdevDevice("sdb"), delay=2)
        assert w.wait() == "/dev/sdb"
    assert udev.clock.now > 1000.0  # it waited for the event


def test_uninitialized_forever_times_out(udev: FakeUdev) -> None:
    udev.context.add(FakeUdevDevice("sdb", initialized=False))
    with udev.waiter(deadline_s=3) as w:
        udev.context.emit(FakeUdevDevice("sdb", initialized=False), action="change", delay=1)
        with pytest.raises(DeadlineError):
            w.wait()


def test_two_existing_disks_with_the_identifier_is_an_error(udev: FakeUdev) -> None:
    udev.context.add(FakeUdevDevice("sdb"))
    udev.context.add(FakeUdevDevice("sdc"))
    with udev.waiter() as w, pytest.raises(ResourceError) as excinfo:
        w.wait()
    assert "2 disks carry identifier" in str(excinfo.value)
    assert "/dev/sdb, /dev/sdc" in str(excinfo.value)


def test_two_disks_arriving_together_is_an_error(udev: FakeUdev) -> None:
    with udev.waiter() as w:
        udev.context.emit(FakeUdevDevice("sdb"), delay=1)
        udev.context.emit(FakeUdevDevice("sdc"), delay=1)
        with pytest.raises(ResourceError):
            w.wait()


def test_change_events_of_the_same_disk_are_one_match(udev: FakeUdev) -> None:
    udev.context.add(FakeUdevDevice("sdb"))
    with udev.waiter() as w:
        udev.context.emit(FakeUdevDevice("sdb"), action="change")
        assert w.wait() == "/dev/sdb"


def test_a_disk_removed_again_does_not_count(udev: FakeUdev) -> None:
    with udev.waiter(deadline_s=10) as w:
        disk = FakeUdevDevice("sdb")
        udev.context.emit(disk, delay=1)
        udev.context.emit(disk, action="remove", delay=1)
        udev.context.emit(FakeUdevDevice("sdc"), delay=4)
        assert w.wait() == "/dev/sdc"


def test_deadline(udev: FakeUdev) -> None:
    start = udev.clock.now
    with udev.waiter() as w, pytest.raises(DeadlineError) as excinfo:
        w.wait()
    err = excinfo.value
    assert str(err).startswith(f"no disk with identifier {IDENT} appeared within 60 s")
    assert err.exit_code == 6
    assert f"wwn-0x{HEX}" in (err.hint or "")
    assert udev.clock.now == pytest.approx(start + 60)
    # it waited on the monitor, never slept; each poll bounded
    assert all(t is not None and 0 <= t <= devices._MAX_POLL_S for t in udev.monitor.polls)


def test_rescan_called_once_at_half_the_deadline(udev: FakeUdev) -> None:
    calls: list[float] = []
    start = udev.clock.now
    with udev.waiter(deadline_s=20) as w, pytest.raises(DeadlineError):
        w.wait(lambda: calls.append(udev.clock.now - start))
    assert calls == [pytest.approx(10.0)]
    assert w.rescans == 1


def test_rescan_that_brings_the_disk(udev: FakeUdev) -> None:
    with udev.waiter(deadline_s=60) as w:
        def rescan() -> None:
            udev.context.emit(FakeUdevDevice("sdb"), delay=0.5)
        assert w.wait(rescan) == "/dev/sdb"
        assert w.rescans == 1


def test_no_rescan_when_the_disk_comes_in_time(udev: FakeUdev) -> None:
    calls: list[int] = []
    with udev.waiter() as w:
        udev.context.emit(FakeUdevDevice("sdb"), delay=29)
        assert w.wait(lambda: calls.append(1)) == "/dev/sdb"
    assert calls == []


def test_wait_outside_the_with_block_is_a_bug(udev: FakeUdev) -> None:
    w = udev.waiter()
    with pytest.raises(RuntimeError):
        w.wait()
    with w:
        pass
    with pytest.raises(RuntimeError):
        w.wait()


def test_waiter_refuses_a_bad_identifier_or_deadline() -> None:
    with pytest.raises(ValueError):
        DeviceWaiter("sdb")
    with pytest.raises(ValueError):
        DeviceWaiter(IDENT, 0)
