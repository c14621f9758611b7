"""Helpers shared by the test suite: importable (`from tests.support.cli import run_cli`), no sys.path tricks.

    env.py    the one environment builder for child processes (offline, this checkout first on the path)
    cli.py    the one CLI runner: `distclm ARGS` as a real process, on 1 process or under torchrun
    data.py   real offline text, and reading a prepared folder through the contract only
    runs.py   reading a run dir back: metrics, block ids, weights
    hooks/    fault injection from the test side (a sitecustomize that the child processes load)
"""
