"""loramux: one resident base model, many LoRA and prefix-tuning adapters, one mixed batch.

The subpackages live in the repository's top-level folders (server/, engine/, kernels/,
adapters_registry/, trainer/) and are imported as loramux.server, loramux.engine, ... only.
Those folders have no ``__init__.py``: seen from the checkout's root (the first entry of
``sys.path`` for ``python -m ...``, ``python -c`` or pytest there) each is at most a namespace
portion, and Python's import system takes any regular package of the same name (Hugging Face's
``kernels``, a ``server`` or ``trainer`` distribution) before a namespace portion, from whatever
directory it runs. A wheel copies the folders under ``loramux/``; run from a checkout (an editable
install), this package finds them beside itself.
"""
from pathlib import Path

__version__ = "0.1.0"

_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "engine" / "llm_engine.py").is_file():
    __path__.append(str(_checkout))
