"""Find the disk an iSCSI login brought in, by the identifier the agent answered.

The agent names the LUN by its NAA identifier (``naa.6001405…``, 32 hex
digits). On the proxy the same value shows as

* the sysfs attribute ``/sys/block/sdX/device/wwid`` (``naa.6001405…``),
* udev's ``ID_WWN_WITH_EXTENSION`` (``0x6001405…``, all 32 digits) and the link
  ``/dev/disk/by-id/wwn-0x6001405…``.

udev's ``ID_WWN`` holds only the first 16 digits, which LUNs of the same LIO
target share almost entirely, so it is never compared.

:class:`DeviceWaiter` starts a udev monitor *before* the login, so the disk's
"add" event cannot slip by between the login and the wait; ``wait`` first
looks at the disks that already exist (a fast login, or an earlier login to
the same target), then waits on the monitor, without sleep loops.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Protocol

from ..channel.messages import check_identifier, device_wwids, normalize_wwid
from ..errors import DeadlineError, ResourceError
from ..requirements import Requirement

__all__ = ["DEFAULT_DEADLINE_S", "DeviceWaiter", "DisksWaiter", "GroupWaiter", "UdevContext",
           "Waiter", "check_identifier", "device_wwids", "normalize_wwid"]

REQUIRES: tuple[Requirement, ...] = (
    Requirement("pyudev", "Python module pyudev (with libudev)", roles=("proxy",),
                fails_without="cannot match the logged-in LUN to its block device",
                python=("pyudev",), kernel=("udev",)),
)

log = logging.getLogger(__name__)

DEFAULT_DEADLINE_S = 60.0
#: the longest single monitor.poll: bounds how late the rescan and the deadline are noticed
_MAX_POLL_S = 5.0


class UdevContext(Protocol):
    """What is used of ``pyudev.Context`` (pyudev has no types; its devices stay ``Any``)."""

    def list_devices(self, **match: Any) -> Iterable[Any]: ...


class Waiter(Protocol):
    """What a caller uses of :class:`DeviceWaiter`: ``with waiter: ...; waiter.wait(rescan)``."""

    def __enter__(self) -> Waiter: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...

    def wait(self, rescan: Callable[[], None] | None = None) -> str: ...


def start_disk_monitor(context: UdevContext | None,
                       monitor_factory: Callable[[Any], Any] | None) -> tuple[Any, Any]:
    """A udev monitor of block disks, receiving from now on: every event after this call is
    queued for the waiter (so it must start before the login). ``(context, monitor)``."""
    if context is None or monitor_factory is None:
        import pyudev  # only here: unit tests never load libudev

        context = context if context is not None else pyudev.Context()
        monitor_factory = monitor_factory or pyudev.Monitor.from_netlink
    monitor = monitor_factory(context)
    monitor.filter_by(subsystem="block", device_type="disk")
    monitor.start()
    return context, monitor


class DeviceWaiter:
    """Wait for the block disk carrying ``identifier``; use as a context manager.

    ``with DeviceWaiter(ident) as w: login(); dev = w.wait(rescan)``. The
    pyudev ``context`` and ``monitor_factory`` (``pyudev.Monitor.from_netlink``)
    and the ``clock`` are injectable for tests.
    """

    def __init__(self, identifier: str, deadline_s: float = DEFAULT_DEADLINE_S,
                 context: UdevContext | None = None, *,
                 monitor_factory: Callable[[Any], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if deadline_s <= 0:
            raise ValueError(f"deadline must be positive, not {deadline_s}")
        self.identifier = check_identifier(identifier)
        self.deadline_s = float(deadline_s)
        self._context = context
        self._monitor_factory = monitor_factory
        self._clock = clock
        self._monitor: Any | None = None
        #: how often rescan was called (0 or 1), for the caller's log
        self.rescans = 0

    # -- lifecycle --------------------------------------------------------
    def __enter__(self) -> DeviceWaiter:
        self._context, self._monitor = start_disk_monitor(self._context, self._monitor_factory)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # pyudev has no close(): dropping the last reference unrefs the netlink socket
        self._monitor = None

    # -- matching -----------------------------------------------------------
    def _handle(self, device: Any, matches: dict[str, Any]) -> None:
        key = str(device.sys_path)
        if getattr(device, "action", None) == "remove":
            if matches.pop(key, None) is not None:
                log.info("disk %s with identifier %s went away", device.device_node,
                         self.identifier)
            return
        if self.identifier not in device_wwids(device):
            return
        if not device.is_initialized:
            # udev has not run its rules yet: the monitor brings the device again once it has
            log.debug("disk %s carries %s but is not initialized yet", key, self.identifier)
            return
        if not device.device_node:
            return
        matches[key] = device

    def _drain(self, matches: dict[str, Any]) -> None:
        """Take every event already queued, so two disks arriving together are both seen."""
        assert self._monitor is not None
        while True:
            device = self._monitor.poll(timeout=0)
            if device is None:
                return
            self._handle(device, matches)

    def _one(self, matches: dict[str, Any]) -> str:
        if len(matches) > 1:
            nodes = sorted(str(d.device_node) for d in matches.values())
            raise ResourceError(
                f"{len(matches)} disks carry identifier {self.identifier}: {', '.join(nodes)}",
                hint="two sessions to the same LUN, or a multipath setup: log out the stale "
                     "session (iscsiadm -m session)")
        device = next(iter(matches.values()))
        log.info("disk %s carries identifier %s", device.device_node, self.identifier)
        return str(device.device_node)

    def existing(self) -> Iterable[Any]:
        """The block disks udev knows now."""
        assert self._context is not None
        return self._context.list_devices(subsystem="block", DEVTYPE="disk")

    # -- waiting ------------------------------------------------------------
    def wait(self, rescan: Callable[[], None] | None = None) -> str:
        """The /dev node of the one initialized disk carrying the identifier.

        Raises DeadlineError when none appears within the deadline (``rescan``
        is called once at half of it), ResourceError when two disks carry it.
        """
        if self._monitor is None:
            raise RuntimeError("DeviceWaiter.wait() outside its 'with' block")
        start = self._clock()
        deadline = start + self.deadline_s
        half = start + self.deadline_s / 2
        matches: dict[str, Any] = {}
        for device in self.existing():
            self._handle(device, matches)
        self._drain(matches)
        if matches:
            return self._one(matches)
        while True:
            now = self._clock()
            if now >= deadline:
                raise DeadlineError(
                    f"no disk with identifier {self.identifier} appeared within "
                    f"{self.deadline_s:g} s",
                    hint="check the session (iscsiadm -m session -P 3) and "
                         f"/dev/disk/by-id/wwn-0x{self.identifier[4:]}")
            if rescan is not None and not self.rescans and now >= half:
                log.info("no disk with identifier %s after %.1f s: rescanning the session",
                         self.identifier, now - start)
                self.rescans += 1
                rescan()
                continue
            until = deadline if rescan is None or self.rescans else half
            device = self._monitor.poll(timeout=max(min(until - now, _MAX_POLL_S), 0.01))
            if device is None:
                continue
            self._handle(device, matches)
            if matches:
                self._drain(matches)
                if matches:
                    return self._one(matches)


class GroupWaiter(Protocol):
    """What a group's attach uses of :class:`DisksWaiter`: one disk per identifier."""

    def __enter__(self) -> GroupWaiter: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...

    def wait(self, rescan: Callable[[], None] | None = None) -> list[str]: ...


class DisksWaiter:
    """Wait for the disks of a consistency group (LUNs of one target): one monitor, one deadline.

    ``with DisksWaiter([id0, id1]) as w: login(); devs = w.wait(rescan)``: the
    monitor starts on entering, before the one login brings every LUN in, so no
    disk's "add" event slips by; ``wait`` returns the /dev nodes in the order of
    the identifiers, once every one is there, or raises DeadlineError naming
    those still missing. Matching is :class:`DeviceWaiter`'s, identifier by identifier.
    """

    def __init__(self, identifiers: Sequence[str], deadline_s: float = DEFAULT_DEADLINE_S,
                 context: UdevContext | None = None, *,
                 monitor_factory: Callable[[Any], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # one DeviceWaiter per identifier, never entered: only its matching is used
        self._each = [DeviceWaiter(i, deadline_s, context, clock=clock) for i in identifiers]
        names = [w.identifier for w in self._each]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"want distinct identifiers, not {names}")
        self.deadline_s = float(deadline_s)
        self._context = context
        self._monitor_factory = monitor_factory
        self._clock = clock
        self._monitor: Any | None = None
        self.rescans = 0

    def __enter__(self) -> DisksWaiter:
        self._context, self._monitor = start_disk_monitor(self._context, self._monitor_factory)
        for w in self._each:
            w._context = self._context
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._monitor = None

    def _handle(self, device: Any, matches: list[dict[str, Any]]) -> None:
        for w, found in zip(self._each, matches, strict=True):
            w._handle(device, found)

    def _drain(self, matches: list[dict[str, Any]]) -> None:
        assert self._monitor is not None
        while (device := self._monitor.poll(timeout=0)) is not None:
            self._handle(device, matches)

    def _missing(self, matches: list[dict[str, Any]]) -> list[str]:
        return [w.identifier for w, found in zip(self._each, matches, strict=True) if not found]

    def _all(self, matches: list[dict[str, Any]]) -> list[str]:
        nodes = [w._one(found) for w, found in zip(self._each, matches, strict=True)]
        if len(set(nodes)) != len(nodes):  # one disk cannot be two members
            raise ResourceError(f"one disk carries two of the identifiers: {', '.join(nodes)}")
        return nodes

    def wait(self, rescan: Callable[[], None] | None = None) -> list[str]:
        """The /dev node of each identifier's one initialized disk, in the identifiers' order.

        DeadlineError when one is still missing at the deadline (``rescan`` is
        called once at half of it); ResourceError when two disks carry one identifier.
        """
        if self._monitor is None:
            raise RuntimeError("DisksWaiter.wait() outside its 'with' block")
        assert self._context is not None
        start = self._clock()
        deadline = start + self.deadline_s
        half = start + self.deadline_s / 2
        matches: list[dict[str, Any]] = [{} for _ in self._each]
        for device in self._context.list_devices(subsystem="block", DEVTYPE="disk"):
            self._handle(device, matches)
        self._drain(matches)
        while self._missing(matches):
            now = self._clock()
            if now >= deadline:
                missing = self._missing(matches)
                raise DeadlineError(
                    f"no disk with identifier {', '.join(missing)} appeared within "
                    f"{self.deadline_s:g} s ({len(self._each) - len(missing)} of "
                    f"{len(self._each)} found)",
                    hint="check the session's LUNs (iscsiadm -m session -P 3)")
            if rescan is not None and not self.rescans and now >= half:
                log.info("disks %s still missing after %.1f s: rescanning the session",
                         ", ".join(self._missing(matches)), now - start)
                self.rescans += 1
                rescan()
                continue
            until = deadline if rescan is None or self.rescans else half
            device = self._monitor.poll(timeout=max(min(until - now, _MAX_POLL_S), 0.01))
            if device is not None:
                self._handle(device, matches)
                self._drain(matches)
        return self._all(matches)
