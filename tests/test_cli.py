"""The CLI section's own parser: both option forms, defaults, and a usage error (exit 2) for
anything else. The end-to-end CLI runs are in test_e2e_cli.py."""
from __future__ import annotations

import pytest

import ggc_ota as g


def test_defaults():
    args = g.parse_args([])
    assert args.root is None and args.foreground is False and args.log_level == g.DEFAULT_LOG_LEVEL
    assert args.daemon_child is False and args.check_config is False


def test_both_value_forms_and_flags():
    args = g.parse_args(["--root", "/gg", "--config=/c.json", "--foreground", "--log-level", "DEBUG",
                         g.DAEMON_CHILD_FLAG])
    assert (args.root, args.config, args.foreground, args.log_level, args.daemon_child) == \
        ("/gg", "/c.json", True, "DEBUG", True)
    assert g.parse_args(["--root="]).root == ""  # an explicit empty value is the user's choice


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "unrecognized argument: --bogus"),
    (["--fore"], "unrecognized argument"),  # no abbreviations: a script must say what it means
    (["stray"], "unrecognized argument: stray"),
    (["--root"], "--root expects a value"),
    (["--root", "--foreground"], "--root expects a value"),
    (["--json=yes"], "--json takes no value"),
    (["--log-level", "LOUD"], "--log-level must be one of"),
])
def test_usage_errors(argv, message):
    with pytest.raises(g.UsageError, match=message):
        g.parse_args(argv)


def test_main_turns_usage_errors_into_exit_2(capsys):
    assert g.main(["--bogus"]) == g.EXIT_USAGE
    assert "ggc-ota: error: unrecognized argument: --bogus" in capsys.readouterr().err


def test_help_lists_the_public_options_only(capsys):
    with pytest.raises(SystemExit) as done:
        g.parse_args(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for name, _, text in g.OPTIONS:
        assert (name in out) == (text is not None), name


@pytest.mark.parametrize("argv", [["--dry-run", "--status"], ["--status", "--version"], ["--json"],
                                  ["--check-config", "--dry-run"], ["--log-level", "LOUD"]])
def test_modes_are_exclusive_and_json_needs_one(argv):
    with pytest.raises(g.UsageError):
        g.parse_args(argv)


@pytest.mark.parametrize("given,level", [("debug", "DEBUG"), ("Info", "INFO"), ("warning", "WARN"),
                                         ("none", "NONE"), ("TRACE", "TRACE")])
def test_log_levels_in_any_case(given, level):
    assert g.parse_args(["--log-level", given]).log_level == level


def test_a_job_level_never_quiets_the_agent():
    g.set_job_log_level("ERROR", "INFO")
    assert g.log.level == g.logging.INFO
    g.set_job_log_level("TRACE", "INFO")
    assert g.log.level == g.TRACE
    g.set_log_level("INFO")


def test_the_journal_format_is_told_to_an_agent_that_asks(capsys):
    """An older agent asks before it tries this one (an internal option, not in --help)."""
    assert g.main([g.JOURNAL_FORMAT_FLAG]) == g.EXIT_OK
    assert capsys.readouterr().out.strip() == str(g.JOURNAL_FORMAT)
    assert g.main([g.JOURNAL_FORMAT_FLAG, "--version"]) == g.EXIT_USAGE


@pytest.mark.parametrize("argv, message", [
    (["--dry-run", "--foreground"], "--foreground goes with running the agent, not with --dry-run"),
    (["--status", "--log-file", "/tmp/x"], "--log-file goes with running the agent, not with --status"),
    (["--check-now", "--pid-file", "/tmp/p"], "--pid-file goes with running the agent, not with --check-now"),
])
def test_options_of_a_running_agent_are_refused_with_a_mode(argv, message):
    """Silently accepted, they suggested an effect they never had."""
    with pytest.raises(g.UsageError, match=message):
        g.parse_args(argv)
