"""loramux installs one import package, `loramux`, and nothing that shadows a neighbour.

Before, the top-level folders were installed as top-level modules: `kernels` answered bitsandbytes'
`from kernels import get_kernel` (Hugging Face's kernel-hub package) in every process of the
environment. These checks run in fresh interpreters outside the repository, where the working
directory cannot make the folders importable.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("server", "engine", "kernels", "adapters_registry", "trainer")


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          check=False)


def test_only_loramux_is_importable(tmp_path):
    out = _python(
        "import importlib.util as u\n"
        f"for name in {FOLDERS!r}:\n"
        "    spec = u.find_spec(name)\n"
        "    assert spec is None or 'site-packages' in str(spec.origin), (name, spec)\n"
        f"for name in {FOLDERS!r}:\n"
        "    assert u.find_spec('loramux.' + name) is not None, name\n"
        "print('ok')\n", tmp_path)
    assert out.stdout.strip() == "ok", out.stderr[-3000:]


def test_bitsandbytes_cpu_path_is_not_shadowed(tmp_path):
    """bitsandbytes' CPU 4-bit backend imports HF `kernels` when it is installed; with loramux
    loaded in the same process that import must not land in loramux's kernels folder."""
    out = _python(
        "import logging, io\n"
        "buf = io.StringIO(); logging.basicConfig(stream=buf, level=logging.WARNING)\n"
        "import loramux.kernels, loramux.engine.quantize\n"
        "import bitsandbytes, bitsandbytes.backends.cpu.ops\n"
        "import importlib.util as u\n"
        "spec = u.find_spec('kernels')\n"
        f"assert spec is None or not str(spec.origin).startswith({str(ROOT)!r}), spec\n"
        "print(buf.getvalue())\n", tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "cannot import name 'get_kernel'" not in log, log
    assert str(ROOT / "kernels") not in log, log


def test_python_dash_m_loramux(tmp_path):
    out = subprocess.run([sys.executable, "-m", "loramux", "serve", "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0 and "--max-loras" in out.stdout, out.stderr[-3000:]


def test_wheel_holds_only_the_loramux_package(tmp_path):
    """A regular (non-editable) build maps the folders under loramux/ and ships nothing else."""
    src = tmp_path / "src"          # a copy: setuptools writes build/ and *.egg-info next to the sources
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "build", "*.egg-info",
                                                              ".pytest_cache", ".ruff_cache"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("loramux-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith((".dist-info", ".data"))} == {"loramux"}, tops
    names = zipfile.ZipFile(wheel).namelist()
    for folder in FOLDERS:
        assert f"loramux/{folder}/__init__.py" in names, folder
    assert "loramux/engine/models/llama.py" in names
