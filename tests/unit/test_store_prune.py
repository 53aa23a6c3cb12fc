"""Retention: the pure selection (restic/borg semantics) and prune on a repository."""

from __future__ import annotations

import io
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sanoffload.errors import UsageError
from sanoffload.store.prune import Policy, prune, select
from sanoffload.store.repo import BackupId, Repository

pytestmark = pytest.mark.unit


def T(text: str) -> datetime:
    """'2026-11-26 10:00' in UTC."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=UTC)


def pairs(*texts: str) -> list[tuple[str, datetime]]:
    return [(t, T(t)) for t in texts]


def kept(items: list[tuple[str, datetime]], policy: Policy) -> list[str]:
    sel = select(items, policy)
    assert set(sel.keep) | set(sel.remove) == {k for k, _ in items}
    assert not set(sel.keep) & set(sel.remove)
    return sorted(sel.keep)


def hourly(start: str, count: int, step_h: int = 1) -> list[tuple[str, datetime]]:
    t0 = T(start)
    out = []
    for i in range(count):
        t = t0 + timedelta(hours=i * step_h)
        out.append((t.strftime("%Y-%m-%d %H:%M"), t))
    return out


def test_nothing_in_nothing_out() -> None:
    sel = select([], Policy(last=3))
    assert sel.keep == {} and sel.remove == []


def test_the_only_backup_is_always_kept() -> None:
    items = pairs("2026-11-26 10:00")
    for policy in (Policy(), Policy(last=0, daily=0), Policy(monthly=1)):
        assert kept(items, policy) == ["2026-11-26 10:00"]


def test_the_newest_is_always_kept_even_by_an_empty_policy() -> None:
    items = pairs("2026-11-24 10:00", "2026-11-25 10:00", "2026-11-26 10:00")
    sel = select(items, Policy())
    assert sel.keep == {"2026-11-26 10:00": ("newest",)}
    assert sorted(sel.remove) == ["2026-11-24 10:00", "2026-11-25 10:00"]


def test_keep_last() -> None:
    items = hourly("2026-11-26 00:00", 10)
    assert kept(items, Policy(last=3)) == ["2026-11-26 07:00", "2026-11-26 08:00",
                                           "2026-11-26 09:00"]
    assert len(kept(items, Policy(last=10))) == 10
    assert len(kept(items, Policy(last=50))) == 10


def test_keep_daily_keeps_the_newest_of_each_day() -> None:
    items = pairs("2026-11-24 01:00", "2026-11-24 23:59", "2026-11-25 00:00", "2026-11-25 12:00",
                  "2026-11-26 06:00", "2026-11-26 07:00")
    assert kept(items, Policy(daily=2)) == ["2026-11-25 12:00", "2026-11-26 07:00"]
    assert kept(items, Policy(daily=3)) == ["2026-11-24 23:59", "2026-11-25 12:00",
                                            "2026-11-26 07:00"]


def test_days_without_backups_do_not_use_up_slots() -> None:
    items = pairs("2026-11-01 10:00", "2026-11-10 10:00", "2026-11-26 10:00")
    assert kept(items, Policy(daily=3)) == ["2026-11-01 10:00", "2026-11-10 10:00",
                                            "2026-11-26 10:00"]


def test_days_are_utc_days() -> None:
    # 23:30 and 00:30 UTC are two days, whatever the local zone says
    items = pairs("2026-11-25 23:30", "2026-11-26 00:30")
    assert kept(items, Policy(daily=2)) == ["2026-11-25 23:30", "2026-11-26 00:30"]


def test_keep_weekly_uses_iso_weeks_across_a_year_end() -> None:
    # Mon 2026-12-28 .. Sun 2027-01-03 is ISO week 53 of 2026: one week
    items = pairs("2026-12-21 10:00", "2026-12-28 10:00", "2026-12-31 10:00", "2027-01-03 10:00",
                  "2027-01-04 10:00")
    assert kept(items, Policy(weekly=2)) == ["2027-01-03 10:00", "2027-01-04 10:00"]
    assert kept(items, Policy(weekly=3)) == ["2026-12-21 10:00", "2027-01-03 10:00",
                                             "2027-01-04 10:00"]


def test_keep_monthly_and_yearly() -> None:
    items = pairs("2025-12-31 23:00", "2026-01-15 10:00", "2026-01-31 10:00", "2026-02-01 10:00",
                  "2026-03-05 10:00", "2026-03-06 10:00")
    assert kept(items, Policy(monthly=3)) == ["2026-01-31 10:00", "2026-02-01 10:00",
                                              "2026-03-06 10:00"]
    assert kept(items, Policy(yearly=2)) == ["2025-12-31 23:00", "2026-03-06 10:00"]


def test_rules_are_independent_and_reasons_are_given() -> None:
    items = hourly("2026-11-20 12:00", 7 * 4, step_h=6)  # four a day for seven days
    sel = select(items, Policy(last=2, daily=3, weekly=1))
    assert sel.keep["2026-11-27 06:00"] == ("newest", "last", "daily", "weekly")
    assert sel.keep["2026-11-27 00:00"] == ("last",)
    assert sel.keep["2026-11-26 18:00"] == ("daily",)
    assert sel.keep["2026-11-25 18:00"] == ("daily",)
    assert len(sel.keep) == 4


def test_a_backup_kept_by_last_still_counts_as_its_days_newest() -> None:
    # restic semantics: daily's slot for today is used by the same backup "last" kept
    items = hourly("2026-11-25 20:00", 6)  # 20:00 .. 01:00 next day
    sel = select(items, Policy(last=1, daily=2))
    assert sorted(sel.keep) == ["2026-11-25 23:00", "2026-11-26 01:00"]


def test_input_order_does_not_matter() -> None:
    items = hourly("2026-01-01 00:00", 24 * 90, step_h=3)
    policy = Policy(last=5, daily=7, weekly=4, monthly=3)
    expected = select(items, policy).keep
    shuffled = items[:]
    random.Random(7).shuffle(shuffled)
    assert select(shuffled, policy).keep == expected
    assert len(expected) == len(set(expected))


def test_same_time_is_broken_by_key() -> None:
    t = T("2026-11-26 10:00")
    sel = select([("a", t), ("b", t)], Policy(last=1))
    assert list(sel.keep) == ["b"] and sel.remove == ["a"]


def test_a_long_history() -> None:
    items = hourly("2025-01-01 00:00", 24 * 400, step_h=1)
    sel = select(items, Policy(last=24, daily=7, weekly=4, monthly=12, yearly=3))
    # at most one per rule slot, and at least the 24 newest
    assert 24 <= len(sel.keep) <= 24 + 7 + 4 + 12 + 3
    newest = sorted(k for k, _ in items)[-24:]
    assert set(newest) <= set(sel.keep)
    monthly = [k for k, r in sel.keep.items() if "monthly" in r]
    assert len(monthly) == 12 and len({m[:7] for m in monthly}) == 12
    yearly = sorted(k for k, r in sel.keep.items() if "yearly" in r)
    assert [y[:4] for y in yearly] == ["2025", "2026"]  # only two years have backups
    assert yearly[0] == "2025-12-31 23:00"


@pytest.mark.parametrize("bad", [{"last": -1}, {"daily": True}, {"weekly": 1.5},
                                 {"monthly": "3"}])
def test_bad_policies_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        Policy(**bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# prune on a repository
# --------------------------------------------------------------------------

def _fill(repo: Repository, host: str, path: str, times: list[str]) -> list[BackupId]:
    ids = []
    for t in times:
        ids.append(repo.put(host, path, io.BytesIO(f"{host}{path}{t}".encode()),
                            {"frozen_at": T(t)}, verify=False))
    return ids


def test_prune_removes_per_object_and_keeps_the_newest(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    days = [f"2026-11-{d:02d} 10:00" for d in range(20, 27)]
    data = _fill(repo, "fs1", "/srv/data", days)
    www = _fill(repo, "fs1", "/srv/www", days[:1])
    other = _fill(repo, "fs2", "/srv/data", days[:2])
    dry = prune(repo, Policy(last=2), dry_run=True)
    assert sorted(str(b.id) for b in dry.remove) == sorted(str(i) for i in data[:5] + other[:0])
    assert len(repo.list()) == 10  # dry run: nothing gone
    plan = prune(repo, Policy(last=2))
    assert [b.id for b in plan.remove] == data[:5]
    left = {b.id for b in repo.list()}
    assert left == {*data[5:], *www, *other}
    # the files are gone, not just unlisted
    for bid in data[:5]:
        assert not repo.archive_path(bid).exists() and not repo.manifest_path(bid).exists()
    plan = prune(repo, Policy(last=1))
    assert {b.id for b in repo.list()} == {data[-1], www[0], other[-1]}
    assert plan.to_dict()["remove"] == [str(data[5]), str(other[0])]


def test_prune_of_one_host(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    a = _fill(repo, "fs1", "/srv", ["2026-11-25 10:00", "2026-11-26 10:00"])
    b = _fill(repo, "fs2", "/srv", ["2026-11-25 10:00", "2026-11-26 10:00"])
    prune(repo, Policy(last=1), host="fs2")
    assert {x.id for x in repo.list()} == {*a, b[1]}


def test_prune_refuses_an_empty_policy(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    _fill(repo, "fs1", "/srv", ["2026-11-25 10:00", "2026-11-26 10:00"])
    with pytest.raises(UsageError):
        prune(repo, Policy())
    assert len(repo.list()) == 2
