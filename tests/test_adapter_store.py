"""AdapterStore: the shared adapter directory replicas load from (adapters_registry/store.py)."""
from __future__ import annotations

import pytest

from loramux.adapters_registry.errors import AdapterError
from loramux.adapters_registry.store import AdapterStore


def _adapter(folder, content: bytes = b"weights"):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(content)
    (folder / "notes.txt").write_text("not copied")
    return folder


def test_put_path_for_list_delete(tmp_path):
    store = AdapterStore(tmp_path / "store")
    path = store.put("a", _adapter(tmp_path / "src-a"))
    assert store.path_for("a") == path and path.parent == store.root / "a"
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert "a" in store and "b" not in store
    store.put("b", _adapter(tmp_path / "src-b"))
    assert store.list() == ["a", "b"]
    store.delete("a")
    assert store.list() == ["b"] and "a" not in store
    with pytest.raises(AdapterError) as e:
        store.path_for("a")
    assert e.value.status == 404
    with pytest.raises(AdapterError) as e:
        store.delete("a")
    assert e.value.status == 404


def test_each_put_is_a_new_version(tmp_path):
    store = AdapterStore(tmp_path / "store")
    src = _adapter(tmp_path / "src")
    first = store.put("a", src)
    with pytest.raises(AdapterError) as e:
        store.put("a", src)
    assert e.value.status == 409
    store.delete("a")
    second = store.put("a", src)
    assert second != first and store.path_for("a") == second   # a replica holding `first` sees it is stale


def test_refusals_and_sweep(tmp_path):
    store = AdapterStore(tmp_path / "store")
    for bad in ("../x", ".hidden", "", "a/b"):
        with pytest.raises(AdapterError) as e:
            store.put(bad, tmp_path)
        assert e.value.status == 400
    with pytest.raises(AdapterError):
        store.put("a", tmp_path / "missing")
    (store.root / ".staging-x").mkdir()
    assert store.list() == []
    AdapterStore(store.root, sweep=True)
    assert not (store.root / ".staging-x").exists()
