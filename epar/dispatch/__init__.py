"""How tokens cross the expert-parallel group: one protocol (base.py), one module per
exchange, chosen once per layer (registry.py). docs/architecture.md lists the files to
touch to add one."""

from .base import CallContext, TokenExchange
from .comm import CommError
from .registry import EXCHANGES, build_exchange, resolve_exchange

__all__ = ["CallContext", "CommError", "EXCHANGES", "TokenExchange", "build_exchange", "resolve_exchange"]
