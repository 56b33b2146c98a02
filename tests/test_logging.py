"""The logging section: the eight job log levels, rotation, and redaction of URL queries."""
from __future__ import annotations

import logging

import ggc_ota as g


def test_all_eight_levels_map_in_order():
    order = ["TRACE", "DEBUG", "VERBOSE", "INFO", "WARN", "ERROR", "FATAL", "NONE"]
    assert set(order) == set(g.LOG_LEVELS)
    values = [g.LOG_LEVELS[name] for name in order]
    assert values == sorted(values) and len(set(values)) == 8


def test_level_applies_and_none_silences(tmp_path):
    log_file = tmp_path / "ggc_ota.txt"
    g.setup_logging(str(log_file), "INFO", to_stderr=False)
    g.log.info("visible at INFO")
    g.set_log_level("NONE")
    g.log.critical("hidden at NONE")
    g.set_log_level("TRACE")
    g.log.log(g.TRACE, "visible at TRACE")
    text = log_file.read_text()
    assert "visible at INFO" in text and "hidden at NONE" not in text and "TRACE visible at TRACE" in text.replace(
        "[MainThread] ", "")


def test_rotation(tmp_path):
    log_file = tmp_path / "ggc_ota.txt"
    g.setup_logging(str(log_file), "INFO", to_stderr=False, max_bytes=2000, backups=2)
    for i in range(200):
        g.log.info("line %d %s", i, "x" * 40)
    assert (tmp_path / "ggc_ota.txt.1").exists() and (tmp_path / "ggc_ota.txt.2").exists()
    assert not (tmp_path / "ggc_ota.txt.3").exists()
    numbers = []  # .2 holds older lines than .1, which holds older lines than the live file
    for name in ("ggc_ota.txt.2", "ggc_ota.txt.1", "ggc_ota.txt"):
        text = (tmp_path / name).read_text()
        assert len(text.encode()) <= 2000 and text.endswith("\n")  # whole lines, under the cap
        numbers += [int(line.split("line ")[1].split()[0]) for line in text.splitlines()]
    assert numbers == list(range(numbers[0], 200)) and numbers[0] > 0


def test_presigned_queries_are_redacted(tmp_path):
    log_file = tmp_path / "ggc_ota.txt"
    g.setup_logging(str(log_file), "INFO", to_stderr=False)
    g.log.warning("fetching %s failed", "https://b.s3.amazonaws.com/k.tgz?X-Amz-Signature=deadbeef&X-Amz-Date=1")
    g.log.error("error: %r", {"url": "https://h/p?sig=1"})
    text = log_file.read_text()
    assert "deadbeef" not in text and "sig=1" not in text and "https://b.s3.amazonaws.com/k.tgz?<redacted>" in text
    logging.getLogger("ggc-ota").handlers.clear()


def test_redaction_of_presigned_parameters_in_every_form():
    signed = "X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F&X-Amz-Signature=deadbeef"
    for text in (f"https://b.s3.amazonaws.com/k?{signed}", f"HTTPS://b.s3.amazonaws.com/k?{signed}",
                 f"error for /k?{signed} (http.client, no scheme)", "x-amz-signature=deadbeef and more"):
        clean = g.redact(text)
        assert "deadbeef" not in clean and "AKIA" not in clean, clean


def test_a_record_is_one_bounded_line(tmp_path):
    log_file = tmp_path / "ggc_ota.txt"
    g.setup_logging(str(log_file), "INFO", to_stderr=False)
    g.log.info("job %s starting", "evil\n2026-01-01 00:00:00,000 CRITICAL forged\x1b[31m")
    g.log.info("member %s", "n" * 10_000_000)
    lines = log_file.read_text().splitlines()
    assert len(lines) == 2 and "\\x0a2026" in lines[0] and "\\x1b" in lines[0]
    assert len(lines[1]) < g.MAX_LOG_RECORD + 200 and "more characters" in lines[1]


def test_a_traceback_is_one_line_escaped_redacted_and_capped(tmp_path):
    """log.exception's traceback went around the filter: an exception from outside could forge
    a line in the log file and syslog, and a presigned URL in it reached the log."""
    log_file = tmp_path / "ggc_ota.txt"
    g.setup_logging(str(log_file), "INFO", to_stderr=False)
    evil = ("refused\n2026-01-01 00:00:00,000 INFO [MainThread] job x: SUCCEEDED\x85\u2028"
            "https://bucket.s3.amazonaws.com/a?X-Amz-Signature=secret " + "y" * 10_000)
    try:
        raise ValueError(evil)
    except ValueError:
        g.log.exception("job x failed on an unexpected error")
    g.log.info("after")
    lines = log_file.read_text().splitlines()
    assert len(lines) == 2, lines
    assert "job x failed on an unexpected error | Traceback" in lines[0] and "ValueError: refused" in lines[0]
    assert " | 2026-01-01 00:00:00,000 INFO" in lines[0]  # the forged line stays inside the real one
    assert not any(ch in lines[0] for ch in "\x85\u2028\x1b")
    assert "secret" not in lines[0] and "<redacted>" in lines[0] and "more characters" in lines[0]
    assert lines[1].endswith("INFO [MainThread] after")


def test_c1_controls_and_unicode_line_breaks_are_escaped():
    assert g.one_log_line("a\x9b31mb\x85c\u2028d\x1be") == "a\\x9b31mb\\x85c\\u2028d\\x1be"


def test_log_times_are_utc_with_their_offset(tmp_path):
    """As --status prints them: a log line's time says it is UTC, whatever the device's zone."""
    import os
    import re
    import time
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    try:
        g.setup_logging(str(tmp_path / "a.log"), "INFO", to_stderr=False)
        g.log.info("hello")
        line = (tmp_path / "a.log").read_text().splitlines()[-1]
        stamp = time.strftime("%Y-%m-%dT%H", time.gmtime())
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 INFO ", line), line
        assert line.startswith(stamp) or line[:13] < stamp, (line, stamp)  # UTC, not New York
    finally:
        del os.environ["TZ"]
        time.tzset()
        g.setup_logging(None, "INFO", to_stderr=False)
