from .comm import CommError
from .dispatcher import AllToAllDispatcher, CallInfo, LocalDispatcher

__all__ = ["AllToAllDispatcher", "CallInfo", "CommError", "LocalDispatcher"]
