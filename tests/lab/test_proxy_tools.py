"""open-iscsi and udev on px1 as sanoffload relies on them, recorded for the unit tests.

Runs tests/fixtures/recorded/record-proxy.sh on px1 against a session fs1's
agent prepared, then checks what sanoffload's wrappers assume: the exit codes
it names (24 bad CHAP, 15 session exists, 21 no session), that its parsers
read the real outputs, and that udev's ID_WWN_WITH_EXTENSION is the agent's
identifier. The outputs are kept under tests/fixtures/recorded/RELEASE/proxy/
(``SANOLAB_RECORD=1`` writes them into the tree).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sanoffload.tools import iscsiadm
from sanolab import deploy

from .labctl import Lab

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "recorded"


def test_open_iscsi_and_udev_answer_as_sanoffload_expects(lab: Lab) -> None:
    deploy.deploy(lab.runner, lab.hosts)
    try:
        lab.sh("fs1", "mkdir -p /srv/data/d && echo x > /srv/data/d/f")
        ans = json.loads(lab.sh("fs1", ["sanoffload", "agent", "prepare", "/srv/data/d",
                                        "--initiator", lab.iqn("px1"), "--json"]).stdout)
        script = (FIXTURES / "record-proxy.sh").read_text()
        env = (f"T={ans['target_iqn']} P={ans['portals'][0]} U={ans['chap_user']} "
               f"S={ans['chap_secret']} R=/tmp/rec-proxy")
        lab.sh("px1", f"{env} sh -s", input=script, timeout=600)
        rec = json.loads(lab.py("px1", "import json, pathlib\nprint(json.dumps({p.name: "
                                       "p.read_text(errors='replace') for p in "
                                       "pathlib.Path('/tmp/rec-proxy').iterdir()}))").stdout)
    finally:
        lab.sh("px1", "iscsiadm -m node --logoutall=all; iscsiadm -m node -o delete; true",
               check=False)
        lab.sh("fs1", "sanoffload agent cleanup --all", check=False)
        deploy.undeploy_volumes(lab.runner)

    rc = {k[:-3]: int(v) for k, v in rec.items() if k.endswith(".rc")}
    assert rc["session_none"] == iscsiadm.ISCSI_ERR_NO_OBJS_FOUND
    assert rc["login_badchap"] == iscsiadm.ISCSI_ERR_LOGIN_AUTH_FAILED, rec["login_badchap.err"]
    assert rc["login"] == 0
    assert rc["login_again"] == iscsiadm.ISCSI_ERR_SESS_EXISTS, rec["login_again.err"]
    assert rc["logout"] == 0
    assert rc["logout_again"] == iscsiadm.ISCSI_ERR_NO_OBJS_FOUND, rec["logout_again.err"]
    assert rc["node_delete_again"] == iscsiadm.ISCSI_ERR_NO_OBJS_FOUND, rec["node_delete_again.err"]

    # the parsers read the real outputs
    sessions = iscsiadm.parse_sessions(rec["session.out"])
    assert [(s.target, s.portal) for s in sessions] == [(ans["target_iqn"], ans["portals"][0])]
    found = iscsiadm.parse_discovery(rec["discovery.out"])
    assert ans["target_iqn"] in [d.target for d in found]

    # the identifier the agent answered is what udev and sysfs show
    assert rec["wwid"].strip() == ans["identifier"]
    props = dict(line.split("=", 1) for line in rec["udev_props.out"].splitlines()
                 if "=" in line)
    assert props["ID_WWN_WITH_EXTENSION"] == "0x" + ans["identifier"].removeprefix("naa.")
    assert props["ID_WWN"] != props["ID_WWN_WITH_EXTENSION"]  # only the first 16 digits
    assert rec["blkid_type.out"].strip() == "ext4"
    assert ans["chap_secret"] not in json.dumps(rec)

    if os.environ.get("SANOLAB_RECORD") == "1":
        out = FIXTURES / lab.release / "proxy"
        out.mkdir(parents=True, exist_ok=True)
        for name, text in rec.items():
            (out / name).write_text(text)
