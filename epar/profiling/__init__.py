from . import report
from .recorder import BACKWARD_PHASES, PHASES, PhaseRecorder, current, phase, record
from .report import summarize

__all__ = ["BACKWARD_PHASES", "PHASES", "PhaseRecorder", "current", "phase", "record", "report", "summarize"]
