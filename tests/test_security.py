"""Security without a server: no shipped module can load a pickle, an empty admin key is refused, and
`loramux serve` warns when its admin routes are open beyond loopback. (The admin key and path
confinement over HTTP: test_http_contract*.py, in both serving modes.)
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from loramux.server.bootstrap import ServeConfig, exposure_warning

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ("server", "engine", "kernels", "adapters_registry", "trainer")


def test_exposure_warning():
    """The startup warning when the admin routes are reachable beyond loopback without a key
    (build_state logs it). Tested as a function: binding 0.0.0.0 here would expose the port."""
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.com", ""):
        assert "NOT locked" in exposure_warning(host, None)
        assert exposure_warning(host, "k") is None
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        assert exposure_warning(host, None) is None


def test_empty_admin_key_is_refused():
    for key in ("", "   "):
        with pytest.raises(ValueError, match="empty"):
            ServeConfig(admin_key=key)


_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
_LOADERS = {("torch", "load"), ("jit", "load"), ("np", "load"), ("numpy", "load"), ("pickle", "load"),
            ("pickle", "loads"), ("torch", "load_state_dict_from_url"), ("hub", "load_state_dict_from_url")}


def _pickle_uses(source: str, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in _PICKLE_MODULES for a in node.names):
            found.append(f"{where} imports a pickle module")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _PICKLE_MODULES:
            found.append(f"{where} imports from a pickle module")
        elif isinstance(node, ast.ImportFrom) and any(a.name == "load" for a in node.names) and \
                (node.module or "").split(".")[0] in ("torch", "numpy"):
            found.append(f"{where} imports a pickle loader")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, (ast.Name, ast.Attribute)):
                owner = func.value.id if isinstance(func.value, ast.Name) else func.value.attr
                if (owner, func.attr) in _LOADERS:
                    found.append(f"{where} calls {owner}.{func.attr}")
            for kw in node.keywords:
                if (kw.arg, getattr(kw.value, "value", None)) in (("weights_only", False), ("allow_pickle", True),
                                                                   ("use_safetensors", False)):
                    found.append(f"{where} passes {kw.arg}={kw.value.value}")
    return found


def test_no_pickle_is_ever_loaded():
    """No shipped module imports a pickle module or calls a pickle-based loader (torch.load,
    torch.jit.load, numpy.load, pickle.load*), nor turns a loader's pickle safety off."""
    files = [p for pkg in SHIPPED for p in (REPO / pkg).rglob("*.py")]
    assert len(files) > 20
    found = [use for path in files for use in _pickle_uses(path.read_text(), str(path.relative_to(REPO)))]
    assert not found, "\n".join(found)
    # the checker sees what it looks for
    bad = ("import torch, pickle\nfrom joblib import load\ntorch.load(f)\nself.torch.jit.load(f)\n"
           "np.load(f, allow_pickle=True)\npickle.loads(b)\nm.from_pretrained(d, use_safetensors=False)\n"
           "torch.load(f, weights_only=False)\n")
    assert len(_pickle_uses(bad, "probe")) == 10, _pickle_uses(bad, "probe")
