"""Names a family's package exports, imported on first use (so that its megatron-free
submodules import without megatron-core)."""

import importlib


def lazy_exports(package: str, table: dict):
    """(__all__, __getattr__) for `package` exporting table {name: submodule}."""
    def __getattr__(name):
        if name in table:
            return getattr(importlib.import_module(f".{table[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return sorted(table), __getattr__
