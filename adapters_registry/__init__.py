"""Adapter formats, validation, on-disk catalog, device slots and the tiered registry (no HTTP)."""
from .config import RegistryConfig
from .datadir_lock import DataDirBusy, DataDirLock, claim_data_dir
from .errors import AdapterError
from .ids import validate_adapter_id
from .records import AdapterInfo, Lease
from .registry import AdapterRegistry
from .slots import LoraStacks

__all__ = ["AdapterError", "AdapterInfo", "AdapterRegistry", "DataDirBusy", "DataDirLock", "Lease", "LoraStacks",
           "RegistryConfig", "claim_data_dir", "validate_adapter_id"]
