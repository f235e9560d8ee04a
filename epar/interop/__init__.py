"""Converters to and from other libraries' layouts.

Each submodule imports its optional dependency itself, so `import epar.interop`
needs nothing beyond epar: `epar.interop.transformers` needs `pip install epar[hf]`
(imported on first use, as `import epar.interop.transformers` would).
"""

_SUBMODULES = ("transformers",)


def __getattr__(name: str):
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES))
