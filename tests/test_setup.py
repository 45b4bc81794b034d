"""The README's set-up step (``make setup``, run by ``make smoke`` and ``make test``), read with
``make -n`` (what it would run, nothing installed)."""
from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _torch_install(tmp_path: Path, *assignments: str) -> list[str]:
    out = subprocess.run(["make", "-n", "setup", f"VENV={tmp_path / 'venv'}", *assignments], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if "import torch" in line]
    assert len(lines) == 1, out
    return shlex.split(lines[0].split("||", 1)[1])  # what runs when torch is not importable yet


def test_the_default_pins_torch_and_asks_no_other_index(tmp_path):
    words = _torch_install(tmp_path)
    assert words[-2:] == ["install", "torch==2.13.0"] and "--index-url" not in words


def test_a_cpu_only_machine_can_take_pytorchs_cpu_build(tmp_path):
    words = _torch_install(tmp_path, "TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    assert words[words.index("install") + 1] == "torch==2.13.0"  # == 2.13.0 admits the index's 2.13.0+cpu
    assert words[words.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"


def test_a_gpu_machine_can_pin_its_own_torch(tmp_path):
    words = _torch_install(tmp_path, "TORCH_SPEC=torch==2.9.1")
    assert words[-1] == "torch==2.9.1"
