"""Housekeeping of idle items: the rules' settings, the rounds in-process, and a real server."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pydicom
import pytest

from bridge.app.settings_checks import load_settings
from bridge.config import _housekeeping_rules
from bridge.core.events import StatusChange
from bridge.ops.housekeeping import Housekeeping
from tests.conftest import start_bridge
from tests.core.test_worklist_service import World, status_of
from tests.messages import orm
from tests.test_end_to_end import msa, raw_send

NOW = datetime(2026, 12, 3, 12, 0)  # the orders start 2026-12-01 10:30: 49.5 hours before


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bridge.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_rules_are_read_with_dashes_and_off_by_default(tmp_path):
    assert load_settings().housekeeping == []
    config = write_config(tmp_path, """
[[housekeeping]]
status = "scheduled"
after-hours = 24
action = "discontinue"
stations = ["CT1"]

[[housekeeping]]
status = "STARTED"
after-hours = 12.5
action = "remove"
""")  # fmt: skip
    first, second = load_settings(config).housekeeping
    assert (first.status, first.after_hours, first.action, first.stations) == (
        "SCHEDULED", 24.0, "discontinue", ["CT1"],
    )  # fmt: skip
    assert (second.status, second.after_hours, second.action) == ("STARTED", 12.5, "remove")


@pytest.mark.parametrize(
    "rule, sentence",
    [
        ('status = "COMPLETED"', "housekeeping rule 1: status must be one of SCHEDULED"),
        ("after-hours = 0", "housekeeping rule 1: after-hours must be a number of hours above 0"),
        ('after-hours = "1"', "after-hours must be a number"),
        ('action = "delete"', "housekeeping rule 1: action must be one of discontinue, remove"),
        ('stations = "CT1"', "housekeeping rule 1: stations must be a list of AE titles"),
        ("hours = 3", "housekeeping rule 1: unknown key 'hours'"),
    ],
)
def test_a_mistake_in_a_rule_is_a_sentence_naming_the_file_and_the_rule(tmp_path, rule, sentence):
    config = write_config(tmp_path, f"[[housekeeping]]\n{rule}\n")
    with pytest.raises(ValueError) as caught:
        load_settings(config)
    assert str(caught.value).startswith(f"{config}: ")
    assert sentence in str(caught.value)


def test_cli_reports_a_bad_rule_without_a_traceback(tmp_path):
    config = write_config(tmp_path, '[[housekeeping]]\naction = "delete"\n')
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    assert "action must be one of discontinue, remove" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def housekeeping_world(tmp_path: Path, *rules: dict) -> World:
    """An in-process world whose settings hold `rules` ([[housekeeping]] tables)."""
    world = World(tmp_path)
    world.settings.housekeeping = _housekeeping_rules(list(rules))
    world.housekeeping = Housekeeping(world.settings, world.service, world.log)
    return world


def test_an_idle_scheduled_item_is_discontinued_through_the_service(tmp_path):
    world = housekeeping_world(tmp_path, {"status": "SCHEDULED", "after-hours": 48})
    path = world.order()
    seen = []
    world.events.subscribe(StatusChange, seen.append)
    assert world.housekeeping.run_once(now=datetime(2026, 12, 3, 10, 0)) == []  # 47.5 h
    done = world.housekeeping.run_once(now=NOW)
    assert done == [f"{path.name}:discontinued"]
    assert not path.exists()  # finished-retention 0: a finished item goes at once
    [event] = seen
    assert (event.old_status, event.new_status, event.cause) == (
        "SCHEDULED", "DISCONTINUED", "housekeeping",
    )  # fmt: skip
    record = world.records()[-1]
    assert record["type"] == "housekeeping" and record["outcome"] == "discontinued"
    assert record["file"] == path.name and record["accession"] == "ACC0001"
    assert "SCHEDULED more than 48 h" in record["note"]


def test_remove_action_stations_and_statuses(tmp_path):
    world = housekeeping_world(
        tmp_path,
        {"status": "SCHEDULED", "after-hours": 1, "action": "remove", "stations": ["MR1"]},
        {"status": "STARTED", "after-hours": 1},
    )
    ct = world.order()  # scheduled on no station of the rule: kept
    world.settings.finished_retention = 5.0  # a discontinued STARTED item stays, with its status
    mr = world.order(control_id="M2", accession="ACC0002", sps_id="SPS0002", study_uid="1.2.3",
                     placer="P2", filler="F2")  # fmt: skip
    started = world.order(control_id="M3", accession="ACC0003", sps_id="SPS0003",
                          study_uid="1.2.4", placer="P3", filler="F3")  # fmt: skip
    world.service.set_status(started, "STARTED", "mpps")
    ds = pydicom.dcmread(mr)  # put the second order on MR1, as a station rule would
    ds.ScheduledProcedureStepSequence[0].ScheduledStationAETitle = "MR1"
    world.store.write(mr, ds)
    seen = []
    world.events.subscribe(StatusChange, seen.append)
    done = world.housekeeping.run_once(now=NOW)
    assert sorted(done) == sorted([f"{mr.name}:removed", f"{started.name}:discontinued"])
    assert not mr.exists()
    assert status_of(started) == "DISCONTINUED" and status_of(ct) == "SCHEDULED"
    assert {e.new_status for e in seen} == {"DISCONTINUED"}
    assert {e.cause for e in seen} == {"housekeeping"}
    assert world.housekeeping.run_once(now=NOW) == []  # nothing left to do


def test_an_item_changed_after_it_was_found_is_left_alone(tmp_path):
    world = housekeeping_world(tmp_path, {"status": "SCHEDULED", "after-hours": 1})
    path = world.order()
    found = world.housekeeping.find(now=NOW)
    world.service.set_status(path, "STARTED", "mpps")  # an MPPS came meanwhile
    assert world.housekeeping.apply(found) == []
    assert status_of(path) == "STARTED"


def test_the_server_runs_the_rules_on_its_items(tmp_path):
    config = write_config(tmp_path, """
housekeeping-interval = 0.2
[[housekeeping]]
status = "SCHEDULED"
after-hours = 1
""")  # fmt: skip
    running = start_bridge(tmp_path, "--config", str(config))
    try:
        old_order = orm(control_id="H1", start="202001011030")
        assert msa(raw_send(running.mllp_port, old_order))[0] == "AA"
        deadline = time.monotonic() + 30
        while running.wl_files() and time.monotonic() < deadline:
            time.sleep(0.1)  # the round runs on the server's timer: nothing to await but files
        assert running.wl_files() == []
        [record] = [r for r in running.log_records() if r.get("type") == "housekeeping"]
        assert record["outcome"] == "discontinued"
    finally:
        assert running.stop() == 0
