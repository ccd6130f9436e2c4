"""launch/setup_env.sh: a failed install stops the set-up with pip's own error and leaves no
"installed" stamp, so the next run tries again."""

from __future__ import annotations

import os
import subprocess

from dist_scripts.procs import REPO


def test_a_failed_pip_install_stops_the_set_up(tmp_path):
    venv = tmp_path / "venv"
    env = {**os.environ, "OGNET_VENV": str(venv), "OGNET_TORCH": "ognet-no-such-package==0.0.0"}
    proc = subprocess.run(
        ["bash", "-c", "source launch/setup_env.sh dev && echo reached-the-end"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "reached-the-end" not in proc.stdout
    assert "ognet-no-such-package" in proc.stderr  # pip's own words
    assert "pip install ognet-no-such-package==0.0.0 failed" in proc.stderr
    assert not (venv / ".ognet-installed").exists()
