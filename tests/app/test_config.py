import argparse
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.app.settings_checks import load_settings
from bridge.config import ConfigError, Settings, add_cli_options
from tests.conftest import start_bridge
from tests.peers import free_port


def test_defaults_match_the_documented_ones():
    s = Settings()
    assert (s.host, s.mllp_port, s.dicom_port, s.ae_title) == ("0.0.0.0", 2575, 11112, "WLBRIDGE")
    assert str(s.worklist_dir) == "worklists"
    assert s.translation_log == "./logs/translation.log"
    assert s.max_frame_size == 1024 * 1024
    # MPPS: finished instances kept 30 days, open ones 90, at most 100,000
    assert (s.mpps_retention, s.mpps_in_progress_retention) == (720.0, 2160.0)
    assert s.mpps_max_instances == 100_000


def test_file_then_command_line(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(
        'mllp-port = 3000\nae_title = "FROMFILE"\n'
        '[[station-rules]]\nmatch = { "OBR-24" = "CT" }\nae-titles = ["CT1"]\n'
    )
    parser = argparse.ArgumentParser()
    add_cli_options(parser)
    args = parser.parse_args(["--config", str(config), "--ae-title", "FROMCLI"])
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    s = load_settings(args.config, overrides)
    assert s.mllp_port == 3000  # from the file
    assert s.ae_title == "FROMCLI"  # the command line wins
    assert s.station_rules[0].ae_titles == ["CT1"]


@pytest.mark.parametrize(
    "text",
    ["no-such-setting = 1\n", 'mllp-port = "x"\n', 'worklist-layout = "nested"\n'],
)
def test_bad_config_is_refused_with_a_reason(tmp_path, text):
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(ValueError):
        load_settings(config)


@pytest.mark.parametrize(
    "rule",
    ['match = { "OBR24" = "CT" }', 'match = { "OBR-24" = "/[unclosed/" }'],
)
def test_a_station_rule_that_could_never_work_fails_at_start(tmp_path, rule):
    config = tmp_path / "c.toml"
    config.write_text(f'[[station-rules]]\n{rule}\nae-titles = ["CT1"]\n')
    with pytest.raises(ValueError, match="station rule 1"):
        load_settings(config)


# Config mistakes: each refused at load with a sentence naming the file and the setting.
MISTAKES = {
    "string-for-list": ('[[station-rules]]\nae-titles = "CT01"\n', ["ae-titles", '["CT01"]']),
    "hidden-cancelled": ('hidden-statuses = ["CANCELLED"]\n', ["hidden-statuses", "CANCELED"]),
    "long-station-aet": (
        '[[station-rules]]\nmatch = { "OBR-24" = "CT" }\nae-titles = ["CT-ROOM-1-SIEMENS-X"]\n',
        ["ae-titles", "16"],
    ),
    "mllp-ca-alone": ('mllp-tls-ca = "ca.pem"\n', ["mllp-tls-ca", "mllp-tls-cert"]),
    "mllp-key-alone": ('mllp-tls-key = "k.pem"\n', ["mllp-tls-key", "mllp-tls-cert"]),
    "dicom-ca-alone": ('dicom-tls-ca = "ca.pem"\n', ["dicom-tls-ca", "dicom-tls-cert"]),
    "bad-address": (
        'allowed-mllp-sources = ["10.1.2.300"]\n',
        ["allowed-mllp-sources", "10.1.2.300"],
    ),
    "host-name": (
        'allowed-mllp-sources = ["mirth.hospital.local"]\n',
        ["allowed-mllp-sources", "mirth.hospital.local", "address"],
    ),
    "rule-unknown-key": (
        '[[station-rules]]\nae-title = ["CT01"]\n',
        ["ae-title", "ae-titles", "station-name", "match"],
    ),
    "toml-syntax": ("mllp-port = 2575\ndicom-port = \n", ["line 2"]),
    "unknown-top": ("mllp-prot = 2575\n", ["mllp-prot", "mllp-port"]),
    "int-as-string": ('mllp-port = "2575"\n', ["mllp-port", "2575"]),
    "bool-as-string": ('own-items-only = "yes"\n', ["own-items-only", "true or false"]),
    "float-as-string": ('idle-timeout = "5m"\n', ["idle-timeout", "number"]),
    "list-as-number": ("processing-ids = 1\n", ["processing-ids", "list"]),
    "path-as-number": ("worklist-dir = 3\n", ["worklist-dir", "folder"]),
    "bad-processing-id": ('processing-ids = ["X"]\n', ["processing-ids", "'X'"]),
    "port-too-big": ("dicom-port = 70000\n", ["dicom-port", "70000"]),
    "zero-timeout": ("acse-timeout = 0\n", ["acse-timeout"]),
    "layout-typo": ('worklist-layout = "perae"\n', ["worklist-layout", "per-ae"]),
    "slash-in-own-aet": ('ae-title = "RAD/CT1"\n', ["ae-title", "/"]),
    "absolute-aet": ('ae-title = "/etc"\n', ["ae-title", "/"]),
    "backslash-in-aet": ('allowed-calling-aets = ["CT01\\\\MR01"]\n', ["allowed-calling-aets"]),
    "control-in-aet": (
        'allowed-calling-aets = ["CT\\u001b01"]\n',
        ["allowed-calling-aets", "control"],
    ),
    "space-around-aet": ('ae-title = " WLB "\n', ["ae-title", "spaces"]),
    "empty-aet": ('ae-title = ""\n', ["ae-title", "1 to 16"]),
    "slash-in-station": ('[[station-rules]]\nae-titles = ["RAD/CT1"]\n', ["ae-titles", "/"]),
    "long-station-name": (
        '[[station-rules]]\nae-titles = ["CT1"]\nstation-name = "COMPUTED TOMOGRAPHY 1"\n',
        ["station-name", "16"],
    ),
    "match-not-table": ('[[station-rules]]\nmatch = "CT"\nae-titles = ["CT1"]\n', ["match"]),
    "rules-not-tables": ('station-rules = ["CT01"]\n', ["station-rules", "[[station-rules]]"]),
    "mpps-retention-negative": ("mpps-retention = -1\n", ["mpps-retention", "more than 0"]),
    "mpps-retention-zero": ("mpps-in-progress-retention = 0\n", ["mpps-in-progress-retention"]),
    "mpps-retention-text": ('mpps-retention = "30d"\n', ["mpps-retention", "number", "30d"]),
    "mpps-retention-nan": ("mpps-retention = nan\n", ["mpps-retention", "not a number of hours"]),
    "mpps-retention-inf": ("mpps-retention = inf\n", ["mpps-retention", "not a number of hours"]),
    "mpps-open-shorter": (
        "mpps-retention = 720\nmpps-in-progress-retention = 24\n",
        ["mpps-in-progress-retention", "shorter than mpps-retention", "720"],
    ),
    "mpps-max-zero": ("mpps-max-instances = 0\n", ["mpps-max-instances", "at least 1"]),
    "mpps-max-float": ("mpps-max-instances = 1.5\n", ["mpps-max-instances", "whole number"]),
}


@pytest.mark.parametrize("name", sorted(MISTAKES))
def test_each_config_mistake_is_a_sentence_naming_file_and_setting(tmp_path, name):
    text, expected = MISTAKES[name]
    config = tmp_path / "site.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    message = str(caught.value)
    assert str(config) in message
    for part in expected:
        assert part in message, message


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_settings(tmp_path / "nope.toml")


def test_command_line_mistakes_name_the_command_line():
    with pytest.raises(ConfigError, match="the command line: ae-title"):
        load_settings(None, {"ae_title": "A" * 17})
    with pytest.raises(ConfigError, match="the command line: mpps-retention: -5 is too small"):
        load_settings(None, {"mpps_retention": -5.0})


def test_networks_and_addresses_are_allowed_sources(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('allowed-mllp-sources = ["10.1.2.3", "10.9.0.0/16", "::1"]\n')
    assert load_settings(config).allowed_mllp_sources == ["10.1.2.3", "10.9.0.0/16", "::1"]


def test_the_sample_config_loads():
    from tests.conftest import SAMPLES

    settings = load_settings(SAMPLES / "wlbridge.toml")
    assert settings.station_rules[0].ae_titles == ["CT01"]


# The same mistakes through `wlbridge serve`: exit non-zero, a sentence, never a traceback.
def serve(tmp_path: Path, text: str, *extra: str) -> subprocess.CompletedProcess:
    config = tmp_path / "site.toml"
    for name in ("mllp-port", "dicom-port"):  # free ports unless the test sets them
        if f"{name} =" not in text and f"--{name}" not in extra:
            text = f"{name} = {free_port()}\n" + text  # before any [table]
    config.write_text(text)
    cmd = [sys.executable, "-m", "bridge", "serve", "--config", str(config), "--host", "127.0.0.1"]
    cmd += list(extra)
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)


def refused(result: subprocess.CompletedProcess, *parts: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    assert "wlbridge serving" not in output, output
    for part in parts:
        assert part in output, output
    return output


@pytest.mark.parametrize(
    "name", ["string-for-list", "hidden-cancelled", "rule-unknown-key", "mpps-open-shorter"]
)
def test_serve_stops_at_a_config_mistake_without_traceback(tmp_path, name):
    text, expected = MISTAKES[name]
    refused(serve(tmp_path, text), "site.toml", *expected)


def test_serve_names_an_unwritable_rejected_dir(tmp_path):
    (tmp_path / "afile").write_text("")
    result = serve(tmp_path, f'rejected-dir = "{tmp_path / "afile" / "rejected"}"\n')
    refused(result, "rejected-dir", str(tmp_path / "afile" / "rejected"))


@pytest.mark.parametrize("setting", ["mpps-dir", "outbox-dir"])
def test_serve_names_an_unwritable_mpps_or_outbox_dir(tmp_path, setting):
    (tmp_path / "afile").write_text("")
    folder = tmp_path / "afile" / "sub"
    # the outbox is written only when there is a receiver to write for
    receiver = '[[outbound]]\nname = "ris"\nhost = "127.0.0.1"\nport = 9\n'
    if setting != "outbox-dir":
        receiver = ""
    result = serve(tmp_path, f'{setting} = "{folder}"\n{receiver}')
    refused(result, "site.toml", setting, str(folder))


def test_serve_names_an_unwritable_log_folder(tmp_path):
    (tmp_path / "afile").write_text("")
    result = serve(tmp_path, f'translation-log = "{tmp_path / "afile" / "t.log"}"\n')
    refused(result, "translation-log", str(tmp_path / "afile"))


def test_serve_names_an_unusable_worklist_dir(tmp_path):
    (tmp_path / "afile").write_text("")
    result = serve(tmp_path, f'worklist-dir = "{tmp_path / "afile" / "wl"}"\n')
    refused(result, "worklist-dir", str(tmp_path / "afile" / "wl"))


def test_serve_names_a_missing_certificate(tmp_path):
    missing = tmp_path / "missing.pem"
    result = serve(tmp_path, f'mllp-tls-cert = "{missing}"\nmllp-tls-key = "{missing}"\n')
    refused(result, "mllp-tls-cert", str(missing))


def test_serve_names_the_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve(tmp_path, "", "--mllp-port", str(port))
        refused(result, "mllp-port", str(port), "in use")
        result = serve(tmp_path, f"dicom-port = {port}\n")
        refused(result, "dicom-port", str(port), "in use")


def test_serve_says_once_that_it_created_an_empty_worklist_folder(tmp_path):
    running = start_bridge(tmp_path, worklist_dir=tmp_path / "typo")
    try:
        said = [line for line in running.stderr_lines if "did not exist" in line]
        assert len(said) == 1 and str((tmp_path / "typo").absolute()) in said[0]
        assert "EMPTY" in said[0]
    finally:
        assert running.stop() == 0


def test_the_start_up_line_says_what_is_on(tmp_path):
    existing = tmp_path / "worklists" / "WLBRIDGE"
    existing.mkdir(parents=True)
    config = tmp_path / "c.toml"
    config.write_text(
        'allowed-mllp-sources = ["127.0.0.1", "10.0.0.0/8"]\nallowed-calling-aets = ["CT01"]\n'
    )
    running = start_bridge(tmp_path, "--config", str(config), "--own-items-only")
    try:
        [line] = [line for line in running.stderr_lines if "wlbridge serving" in line]
        assert f"MLLP on 127.0.0.1:{running.mllp_port} (plain TCP" in line
        assert "sources: 127.0.0.1, 10.0.0.0/8" in line
        assert f"DICOM WLBRIDGE on 127.0.0.1:{running.dicom_port}" in line
        assert "calling AE titles: CT01" in line and "own items only" in line
        assert f"worklist {existing.absolute()} (flat, 0 item(s))" in line
        assert not [line for line in running.stderr_lines if "did not exist" in line]
    finally:
        assert running.stop() == 0


def test_per_ae_makes_its_own_sub_folder_without_alarm(tmp_path):
    folder = tmp_path / "wl"
    folder.mkdir()
    running = start_bridge(tmp_path, "--worklist-layout", "per-ae", worklist_dir=folder)
    try:
        assert not [line for line in running.stderr_lines if "did not exist" in line]
        assert (folder / "WLBRIDGE").is_dir()
    finally:
        assert running.stop() == 0
