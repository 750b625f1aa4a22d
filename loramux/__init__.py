"""loramux: one resident base model, many LoRA and prefix-tuning adapters, one mixed batch.

The subpackages live in the repository's top-level folders (server/, engine/, kernels/,
adapters_registry/, trainer/) and are installed as loramux.server, loramux.engine, ...
(see pyproject.toml): nothing but `loramux` enters the import namespace.
"""
__version__ = "0.1.0"
