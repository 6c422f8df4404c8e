"""The `fastmaisi` command's dispatcher: version, help, unknown command."""

import subprocess
import sys

from fastmaisi import __version__
from fastmaisi.cli import main


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fastmaisi {__version__}"


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in ("generate", "convert", "phantom"):
        assert name in out


def test_unknown_command_exit_2(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'frobnicate'" in err and len(err.strip().splitlines()) == 1


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "fastmaisi", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"fastmaisi {__version__}"
