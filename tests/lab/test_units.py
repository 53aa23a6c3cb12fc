"""systemd in the lab (PID 1 in the VMs): the units ``sanoffload install-units`` ships.

* px1: a job's timer is enabled, its service triggered; the backup lands in
  the catalog and the run in the journal.
* fs1: the lease timer's service releases an expired session with no request.
  (The boot-time cleanup unit after a hard reset: tests/lab/test_san.py, whose
  one reset of fs1 also checks the SAN disks come back.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sanolab import deploy

from .labctl import Lab

JOB = """\
source = "fs1:/srv/data/job"
store = "bk1:/srv/backups"
verify = true
"""


@pytest.fixture(scope="module")
def site(lab: Lab) -> Iterator[Lab]:
    deploy.deploy(lab.runner, lab.hosts, grace_s=3)
    lab.sh("fs1", "mkdir -p /srv/data/job && echo from-a-timer > /srv/data/job/file && sync")
    try:
        yield lab
    finally:
        lab.sh("px1", "systemctl disable --now sanoffload-backup@data.timer; "
                      "rm -f /etc/systemd/system/sanoffload-* /etc/sanoffload/jobs/data.toml; "
                      "systemctl daemon-reload", check=False)
        lab.sh("fs1", "systemctl disable --now sanoffload-lease.timer sanoffload-cleanup.service;"
                      " rm -f /etc/systemd/system/sanoffload-*; systemctl daemon-reload",
               check=False)
        deploy.undeploy_volumes(lab.runner)


def _sessions(lab: Lab) -> list[dict[str, Any]]:
    out = lab.sh("fs1", ["sanoffload", "agent", "sessions", "--json"]).stdout
    sessions: list[dict[str, Any]] = json.loads(out)
    return sessions


def test_a_job_timer_runs_a_backup(site: Lab) -> None:
    lab = site
    lab.sh("px1", "mkdir -p /etc/sanoffload/jobs && cat > /etc/sanoffload/jobs/data.toml",
           input=JOB)
    out = lab.sh("px1", ["sanoffload", "install-units", "--role", "proxy"]).stdout
    assert "sanoffload-backup@.service" in out
    lab.sh("px1", "systemctl daemon-reload && systemctl enable --now sanoffload-backup@data.timer")
    timers = lab.sh("px1", ["systemctl", "list-timers", "--all", "--no-pager",
                            "sanoffload-backup@data.timer"]).stdout
    assert "sanoffload-backup@data.timer" in timers
    # trigger the run now, as the timer would (a oneshot: start returns when it ends)
    lab.sh("px1", ["systemctl", "start", "sanoffload-backup@data.service"], timeout=900)
    listed = json.loads(lab.sh("px1", ["sanoffload", "list", "--store", "bk1:/srv/backups",
                                       "--json"]).stdout)
    assert len(listed) == 1 and listed[0]["path"] == "/srv/data/job"
    assert listed[0]["compared"]["status"] == "ok"
    journal = lab.sh("px1", ["journalctl", "--no-pager", "-u",
                             "sanoffload-backup@data.service"]).stdout
    assert f"backup {listed[0]['id']}" in journal, journal[-2000:]
    assert _sessions(lab) == []


def test_the_lease_timer_releases_an_expired_session(site: Lab) -> None:
    lab = site
    out = lab.sh("fs1", ["sanoffload", "install-units", "--role", "agent"]).stdout
    assert "sanoffload-cleanup.service" in out and "sanoffload-lease.timer" in out
    lab.sh("fs1", "systemctl daemon-reload && "
                  "systemctl enable sanoffload-lease.timer")
    cfg = "/etc/sanoffload/agent.toml"
    # a lease of 2 s, and nobody calls release: the lease service must
    lab.sh("fs1", f"sed -i 's/^lease_s = .*/lease_s = 2/' {cfg}")
    ans = json.loads(lab.sh("fs1", ["sanoffload", "agent", "prepare", "/srv/data/job",
                                    "--initiator", lab.iqn("px1"), "--json"]).stdout)
    time.sleep(3)
    assert _sessions(lab)[0]["status"] == "expired"
    lab.sh("fs1", ["systemctl", "start", "sanoffload-lease.service"], timeout=300)
    assert _sessions(lab) == []
    assert lab.lio_inventory("fs1") == {"targets": [], "backstores": []}
    journal = lab.sh("fs1", ["journalctl", "--no-pager", "-u", "sanoffload-lease.service"]).stdout
    assert "released 1 session(s)" in journal, journal[-2000:]
    assert ans["session_id"]

