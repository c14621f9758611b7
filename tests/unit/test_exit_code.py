"""distclm/exit_code.py: the cause of a failed torchrun attempt, written once per attempt, for launchers/torchrun.sh."""

from __future__ import annotations

from distclm import exit_code


def test_the_first_cause_of_an_attempt_wins_and_signals_are_no_cause(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTCLM_EXIT_DIR", str(tmp_path))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    exit_code.started()
    for code in (0, 143, 130):  # a peer stopped by torchrun after the failing worker: not the cause
        exit_code.record(code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attempt-0"]
    exit_code.record(75)
    exit_code.record(1)  # later, another worker of the same attempt
    assert (tmp_path / "attempt-0.code").read_text() == "75\n"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun's next attempt has its own
    exit_code.started()
    exit_code.record(2)
    assert (tmp_path / "attempt-1.code").read_text() == "2\n" and (tmp_path / "attempt-1").exists()


def test_nothing_is_written_without_the_launchers_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("DISTCLM_EXIT_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    exit_code.started()
    exit_code.record(75)
    monkeypatch.setenv("DISTCLM_EXIT_DIR", str(tmp_path / "gone"))  # the script removed it: no error either
    exit_code.started()
    exit_code.record(75)
    assert list(tmp_path.iterdir()) == []


def test_the_cli_writes_its_own_exit_code(tmp_path, monkeypatch, capsys):
    from distclm.cli import main

    monkeypatch.setenv("DISTCLM_EXIT_DIR", str(tmp_path))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "3")
    assert main(["train", "--no.such_flag=1"]) == 2  # a user error: one line, code 2
    assert "distclm: error:" in capsys.readouterr().err
    assert (tmp_path / "attempt-3").exists() and (tmp_path / "attempt-3.code").read_text() == "2\n"


def test_the_entry_point_exits_with_mains_code_a_crash_1_and_a_message_1(monkeypatch, capsys):
    """cli.entry (the `distclm` script, `python -m distclm.cli`) as a plain exit where no process group formed
    (the ranks that formed one: tests/dist/test_process_exit.py)."""
    import pytest

    from distclm import cli

    def crash():
        raise ValueError("boom")

    def message():
        raise SystemExit("distclm: bad")

    monkeypatch.setattr(cli.dist, "_owned", False)  # entry() claims the process for its grace: not pytest's, after
    for main, code in ((lambda: 2, 2), (lambda: 0, 0), (crash, 1), (message, 1), (lambda: cli.sys.exit(), 0)):
        monkeypatch.setattr(cli, "main", main)
        with pytest.raises(SystemExit) as exc:
            cli.entry()
        assert exc.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: boom" in err and "distclm: bad" in err
