"""Converters to and from other libraries' layouts.

Each submodule imports its optional dependency itself, so `import epar.interop`
needs nothing beyond epar: `epar.interop.transformers` needs `pip install epar[hf]`.
"""
