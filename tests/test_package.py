"""The package as a user gets it: a wheel installed into a fresh virtual environment."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_cli_help_imports_no_heavy_modules():
    """`cnn --help` must answer fast: no matplotlib, PIL, web stack, torch or Ray at start-up."""
    code = (
        "import sys\n"
        "from classic_cnn import cli\n"
        "try:\n"
        "    cli.app(['--help'], standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('matplotlib', 'PIL', 'fastapi', 'starlette', 'uvicorn', 'torch', 'ray',\n"
        "         'pyarrow')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Usage" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheels = list(dist.glob("classic_cnn-*.whl"))
    assert len(wheels) == 1, wheels
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bindir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    py = bindir / "python"
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", str(wheels[0])],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    # run from an empty folder so that the source tree cannot be imported by accident
    probe = subprocess.run(
        [
            str(py),
            "-c",
            "import classic_cnn, numpy as np; "
            "m = classic_cnn.Sequential([classic_cnn.Flatten(), classic_cnn.Dense(3)], (2, 2, 1)); "
            "print(classic_cnn.__file__); print(m.predict(np.zeros((1, 2, 2, 1))))",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr
    assert str(env_dir) in probe.stdout and "[" in probe.stdout
    help_ = subprocess.run([str(bindir / "cnn"), "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "Usage" in help_.stdout
