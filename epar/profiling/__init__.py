from . import report
from .recorder import PHASES, PhaseRecorder, current, phase, record
from .report import summarize

__all__ = ["PHASES", "PhaseRecorder", "current", "phase", "record", "report", "summarize"]
