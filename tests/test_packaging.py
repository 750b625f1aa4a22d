"""loramux installs one import package, `loramux`, and nothing that shadows a neighbour.

Before, the top-level folders were installed as top-level modules: `kernels` answered bitsandbytes'
`from kernels import get_kernel` (Hugging Face's kernel-hub package) in every process of the
environment. Then, with only `loramux` installed, the checkout's root still put them first on
`sys.path` for anything run there (`python -m pytest`, `python -m ...`, `python -c`), and
transformers >= 5.25's `from kernels import CUDAProperties` landed in our folder. Now the folders
are namespace portions (no `__init__.py`), which the import system ranks below any regular package
(loramux/__init__.py). These checks run in fresh interpreters, outside the repository and in its root.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

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


def _in_checkout_not_installed(origin: str) -> str:
    """Python source for: is `origin` a file of the checkout rather than of an installed
    distribution (the venv may live under the checkout, so site-packages is told apart)."""
    return (f"(lambda o: o is not None and o.startswith({str(ROOT)!r} + '/') and "
            f"not any(o.startswith(d + '/') for d in __import__('site').getsitepackages()))({origin})")


def test_no_checkout_folder_shadows_an_installed_module():
    """Run in the checkout's root, where '' leads sys.path: every top-level module that an installed
    distribution provides resolves to that distribution, whatever folders the checkout has."""
    assert not [d.name for d in ROOT.iterdir() if d.is_dir() and d.name != "loramux" and (d / "__init__.py").exists()], \
        "a top-level folder with __init__.py is a regular package: from the root it shadows any namesake"
    out = _python(
        "import importlib.metadata as md, importlib.util as u, os\n"
        "local = {e.split('.')[0] for e in os.listdir('.') if not e.startswith('.')}\n"
        "others = {m for m, dists in md.packages_distributions().items() if set(dists) != {'loramux'}}\n"
        "shadowed = []\n"
        "for name in sorted(others & local):\n"
        "    spec = u.find_spec(name)\n"
        f"    if spec is None or {_in_checkout_not_installed('spec.origin')}:\n"
        "        shadowed.append((name, spec and spec.origin))\n"
        "assert not shadowed, shadowed\n"
        "print(sorted(others & local))\n", ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "kernels" in out.stdout, "HF `kernels` (a transformers dependency) is the namesake this guards against"


def test_transformers_hub_kernels_import_from_the_root():
    """The reported failure: transformers' hub integration imports HF `kernels` by name."""
    out = _python("from transformers.integrations import hub_kernels  # noqa\n"
                  "import benchmarks.run_all, tests.server_process  # noqa: the checkout's own namespaces\n"
                  "import loramux.kernels.ops\nprint('ok')\n", ROOT)
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
        f"assert spec is None or not {_in_checkout_not_installed('spec.origin')}, spec\n"
        "print(buf.getvalue())\n", tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "cannot import name 'get_kernel'" not in log, log
    assert str(ROOT / "kernels") not in log, log


@pytest.mark.parametrize("where", ["elsewhere", "root"])
def test_python_dash_m_loramux(tmp_path, where):
    out = subprocess.run([sys.executable, "-m", "loramux", "serve", "--help"],
                         cwd=tmp_path if where == "elsewhere" else ROOT, capture_output=True,
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
    for module in ("server/cli.py", "engine/llm_engine.py", "kernels/ops.py", "adapters_registry/registry.py",
                   "trainer/api.py", "engine/models/llama.py", "engine/csrc/quant_matmul.cpp"):
        assert f"loramux/{module}" in names, module
    assert not [f for f in FOLDERS if f"loramux/{f}/__init__.py" in names], "the folders are namespace portions"


def _locked() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_the_lock_pins_everything_loramux_installs():
    """`make setup` installs from requirements.lock: every distribution that loramux[train,dev,ray]
    pulls in (recursively) is pinned there, at the version installed here."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins, seen = _locked(), set()
    todo = [(canonicalize_name("loramux"), frozenset({"train", "dev", "ray"}))]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        if name != "loramux":
            assert name in pins, f"{name} is installed for loramux but not pinned in requirements.lock"
            installed = Version(metadata.version(name))
            assert installed.public == Version(pins[name]).public, (name, str(installed), pins[name])
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    assert {"torch", "transformers", "peft", "bitsandbytes", "kernels", "fastapi"} <= set(pins)
