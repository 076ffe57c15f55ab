import argparse

import pytest

from bridge.config import Settings, add_cli_options, load_settings


def test_defaults_match_the_documented_ones():
    s = Settings()
    assert (s.host, s.mllp_port, s.dicom_port, s.ae_title) == ("0.0.0.0", 2575, 11112, "WLBRIDGE")
    assert str(s.worklist_dir) == "worklists"
    assert s.translation_log == "./logs/translation.log"
    assert s.max_frame_size == 1024 * 1024


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
