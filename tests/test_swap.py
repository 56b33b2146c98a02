"""The swap and journal section on real directories: renameat2 exchange and the two-rename
fallback, restore from every intermediate state, and recovery decisions by inode."""
from __future__ import annotations

import json
import os

import pytest

import ggc_ota as g


@pytest.fixture
def layout(tmp_path):
    root, stage = tmp_path / "root", tmp_path / "state/staging/job"
    (root / "ggc").mkdir(parents=True)
    (root / "ggc/old.txt").write_text("old")
    (stage / "new").mkdir(parents=True)
    (stage / "new/new.txt").write_text("new")
    state = g.State(str(tmp_path / "state"))
    state.ensure()
    journal = g.Journal(job_id="job", execution_number=1, software="core", stage=str(stage), live=str(root / "ggc"),
                        live_id=g.path_id(str(root / "ggc")), new_id=g.path_id(str(stage / "new")), step="swap",
                        format=g.JOURNAL_FORMAT)
    return root, state, journal


def live_is(root, which):
    return (root / "ggc" / f"{which}.txt").exists()


def test_rename_exchange_works_here(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a/x").write_text("a")
    if not g.rename_exchange(str(tmp_path / "a"), str(tmp_path / "b")):
        pytest.skip("this kernel or filesystem has no RENAME_EXCHANGE")
    assert (tmp_path / "b/x").read_text() == "a" and not (tmp_path / "a/x").exists()


@pytest.mark.parametrize("exchange", [True, False])
def test_swap_and_restore(layout, monkeypatch, exchange):
    root, state, journal = layout
    if not exchange:
        monkeypatch.setattr(g, "rename_exchange", lambda a, b: False)
    g.swap_trees(journal)
    assert live_is(root, "new") and journal.exchange is exchange
    assert g.path_id(journal.old) == journal.live_id
    g.restore_old(journal)
    assert live_is(root, "old") and g.path_id(journal.live) == journal.live_id
    g.restore_old(journal)  # twice is harmless
    assert live_is(root, "old")


def test_restore_from_the_middle_of_the_fallback(layout):
    root, state, journal = layout
    os.rename(journal.live, journal.old)  # crashed between the two renames: no live tree
    g.restore_old(journal)
    assert live_is(root, "old")


def test_restore_after_exchange_before_the_rename(layout):
    root, state, journal = layout
    if not g.rename_exchange(journal.new, journal.live):
        pytest.skip("no RENAME_EXCHANGE")
    g.restore_old(journal)  # the old tree sits at the "new" path
    assert live_is(root, "old")


def test_restore_when_the_old_tree_is_lost(layout):
    root, state, journal = layout
    journal.live_id = [0, 0]
    with pytest.raises(g.RollbackFailed):
        g.restore_old(journal)


def journal_on_disk(root, staging, **changes) -> dict:
    """A format-3 journal as the agent writes it, for a core update of job `job`."""
    raw = {"jobId": "job", "executionNumber": 1, "software": "core", "step": "post_update", "format": 3,
           "live": f"{root}/ggc", "stage": f"{staging}/job", "new": f"{staging}/job/new", "old": f"{staging}/job/old",
           "liveId": [1, 2], "newId": [1, 3], "toVersion": "1.11.6", "startedAt": 5}
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not None}


def test_a_journal_is_typed_and_written_back_as_it_was_read(tmp_path):
    raw = journal_on_disk("/r", "/s/staging", recoveries=1, reason="HOOK_FAILED", message="m")
    journal = g.Journal.load(raw, "/r", "/s/staging", "/run/g.pid")
    assert journal.step == "post_update" and journal.recoveries == 1 and journal.new == "/s/staging/job/new"
    assert journal.to_disk() == raw


@pytest.mark.parametrize("old_step, software, step", [
    ("trial", "ota_agent", "new_agent_trial"), ("proven", "ota_agent", "new_agent_trial"),
    ("swapping", "core", "swap"), ("swapped", "core", "post_update"), ("swapped", "ota_agent", "hand_over"),
    ("committed", "core", "commit"), ("rolling_back", "core", "roll_back"), ("rolled_back", "core", "rolled_back"),
    ("health_check", "core", "health_check")])
def test_journals_of_the_older_formats_are_read(old_step, software, step):
    """Formats 1 (no format key) and 2 named some steps otherwise, and format 2's agent on trial
    wrote its progress into the journal: read, mapped to today's steps, and written back in the
    format they were begun in."""
    tree = "ota" if software == "ota_agent" else "ggc"
    for fmt in (None, 2):
        raw = journal_on_disk("/r", "/s/staging", software=software, step=old_step, format=fmt,
                              live=f"/r/{tree}", rolledBack="true", trialConnected=True)
        journal = g.Journal.load(raw, "/r", "/s/staging", "/run/g.pid")
        assert journal.step == step and journal.format == (fmt or 1)
        back = journal.to_disk()
        # format 2 knew post_update (a core's `swapped` recovers the same way from it); `proven`
        # is the trial's own news, no step of the agent that runs it
        assert back["step"] == {"proven": "trial"}.get(old_step, step if step == "post_update" else old_step)
        assert back["trialConnected"] is True and ("format" in back) == (fmt is not None)


@pytest.mark.parametrize("change, why", [
    ({"format": 4}, "newer agent"), ({"step": "trial"}, "step"), ({"live": "/etc"}, "live is"),
    ({"liveId": [1]}, "pair"), ({"reason": "NOPE"}, "no reason code"), ({"executionNumber": True}, "is a bool"),
    ({"trialConnected": True}, "unknown field"), ({"jobId": None}, "without jobId"),
    ({"corePidFile": "/tmp/x"}, "corePidFile"), ({"recoveries": -1}, "negative")])
def test_a_journal_is_trusted_whole_or_not_at_all(change, why):
    """A field of the wrong type, a path this agent would not have written, a name of format 2
    in a format-3 journal, a newer format: JournalCorrupt, saying why."""
    with pytest.raises(g.JournalCorrupt, match=why):
        g.Journal.load(journal_on_disk("/r", "/s/staging", **change), "/r", "/s/staging", "/run/g.pid")


def test_copy_kept_replaces_the_new_trees_copy(tmp_path):
    live, new = tmp_path / "live", tmp_path / "new"
    (live / "var/state").mkdir(parents=True)
    (live / "var/state/db").write_bytes(b"\x01live")
    (live / "deployment").mkdir()
    (new / "var").mkdir(parents=True)
    (new / "var/shipped").write_text("from the release")
    copied = g.copy_kept(str(live), str(new), ["ggc/var", "ggc/deployment", "ggc/absent", "ota/x"], "ggc")
    assert copied == ["ggc/var", "ggc/deployment"]
    assert (new / "var/state/db").read_bytes() == b"\x01live" and not (new / "var/shipped").exists()


def test_journal_and_outbox_and_history(tmp_path):
    state = g.State(str(tmp_path / "s"))
    state.ensure()
    assert state.journal() is None and not state.has_journal()
    record = {key: "x" for key in g.JOURNAL_KEYS}
    state.write_journal(record)
    assert state.journal() == record
    for torn in ("{torn", "", "[]", '{"step": "x"}', "x" * (g.JOURNAL_MAX_BYTES + 1)):
        (tmp_path / "s/journal.json").write_text(torn)
        with pytest.raises(g.JournalCorrupt):  # doubt is never "no journal"
            state.journal()
        assert state.has_journal()
    aside = state.set_aside_journal()
    assert not state.has_journal() and os.path.exists(aside)
    state.queue_status({"jobId": "j", "status": "IN_PROGRESS", "statusDetails": {}, "at": 1})
    state.queue_status({"jobId": "j", "status": "SUCCEEDED", "statusDetails": {}, "at": 2})
    assert [e["status"] for e in state.pending_statuses()] == ["SUCCEEDED"]  # the latest wins
    state.status_sent({"jobId": "j", "at": 1})  # an older send does not remove a newer status
    assert state.pending_statuses()
    state.status_sent({"jobId": "j", "at": 2})
    assert not state.pending_statuses()
    for i in range(g.HISTORY_LIMIT + 25):
        state.add_history({"jobId": f"j{i}", "executionNumber": 1, "result": "SUCCEEDED"})
    history = state.history()
    assert len(history) == g.HISTORY_LIMIT and history[-1]["jobId"] == f"j{g.HISTORY_LIMIT + 24}"
    assert state.handled(f"j{g.HISTORY_LIMIT + 24}", 1) and not state.handled("j0", 1)


def test_lock_is_exclusive(tmp_path):
    a, b = g.State(str(tmp_path)), g.State(str(tmp_path))
    a.ensure()
    a.lock()
    assert b.lock_holder() == str(os.getpid())
    import subprocess
    import sys
    code = ("import ggc_ota as g, sys\ntry:\n    g.State(sys.argv[1]).lock()\nexcept g.AnotherAgent:\n"
            "    sys.exit(3)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=os.path.dirname(g.__file__))
    assert out.returncode == 3


def test_only_terminal_statuses_are_fsynced(tmp_path, monkeypatch):
    """An IN_PROGRESS status lost to a power cut costs nothing (the update is recovered and
    reported again); a terminal one must survive it. Flash is spared two syncs per progress report."""
    state = g.State(str(tmp_path / "s"))
    state.ensure()
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    state.queue_status({"jobId": "j", "status": "IN_PROGRESS", "statusDetails": {"phase": "download"}, "at": 1})
    assert synced == [] and state.pending_statuses()[0]["status"] == "IN_PROGRESS"
    state.queue_status({"jobId": "j", "status": "FAILED", "statusDetails": {}, "at": 2})
    assert len(synced) == 2  # the file, then its directory
    assert [e["status"] for e in state.pending_statuses()] == ["FAILED"]
    assert not [p for p in os.listdir(tmp_path / "s/outbox") if ".tmp" in p]


def test_a_state_directory_others_can_write_is_refused(tmp_path):
    state = g.State(str(tmp_path / "s"))
    state.ensure()
    os.chmod(tmp_path / "s", 0o777)
    with pytest.raises(g.OtaError) as err:
        state.ensure()
    assert err.value.reason == "STATE_DIR_UNSAFE"


def test_planted_symlinks_are_never_followed(tmp_path):
    """A link planted where the agent writes (the lock, a temp file's name, the PID file's temp
    name) must not make root write through it."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    state = g.State(str(tmp_path / "s"))
    state.ensure()
    (tmp_path / "s/lock").symlink_to(victim)
    with pytest.raises(g.OtaError) as err:
        state.lock()
    assert err.value.reason == "STATE_DIR_UNSAFE" and victim.read_text() == "precious"
    (tmp_path / "s/lock").unlink()
    journal = tmp_path / "s/journal.json"
    os.symlink(victim, f"{journal}.tmp{os.getpid()}")
    g.write_json_atomic(str(journal), {"a": 1})
    pid_file = tmp_path / "run/ggc-ota.pid"
    pid_file.parent.mkdir()
    os.symlink(victim, f"{pid_file}.tmp{os.getpid()}")
    g.write_pid(str(pid_file), 4242)
    assert victim.read_text() == "precious" and not victim.is_symlink()
    assert pid_file.read_text() == "4242\n" and json.loads(journal.read_text()) == {"a": 1}


def test_history_is_never_written_through_a_planted_symlink(tmp_path):
    state = g.State(str(tmp_path / "state"))
    state.ensure()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / "state/history.jsonl.tmp")
    state.add_history({"jobId": "j1", "executionNumber": 1, "result": "SUCCEEDED"})
    assert victim.read_text() == "precious"
    assert state.history()[-1]["jobId"] == "j1"
    assert not os.path.lexists(tmp_path / "state/history.jsonl.tmp")


def test_the_state_directorys_parents_are_checked_and_a_swap_is_caught(tmp_path):
    """With a stateDir under a directory another user may write, that user could swap in a
    directory of their own while the agent runs: every ancestor is checked (sticky ones, as
    /tmp, excepted), at start and again before unpack, the journal and the swap."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(g.OtaError, match="on the way to the state directory") as err:
        g.State(str(shared / "s")).ensure()
    assert err.value.reason == "STATE_DIR_UNSAFE"
    os.chmod(shared, 0o1777)  # sticky: others cannot rename what is not theirs
    g.State(str(shared / "s")).ensure()
    os.chmod(shared, 0o755)
    os.chown(shared, 4242, 4242)  # another user's directory
    with pytest.raises(g.OtaError, match="on the way"):
        g.State(str(shared / "s")).ensure()
    os.chown(shared, 0, 0)
    state = g.State(str(shared / "s"))
    state.ensure()
    state.verify()
    os.rename(shared / "s", shared / "s.theirs")
    os.mkdir(shared / "s", 0o700)
    for sub in ("outbox", "downloads", "staging"):
        os.mkdir(shared / "s" / sub, 0o700)
    with pytest.raises(g.OtaError, match="was replaced while the agent ran"):
        state.verify()
