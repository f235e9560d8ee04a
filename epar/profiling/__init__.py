from . import report
from .probe import NULL_PROBE, CallProbe, probe_for
from .recorder import BACKWARD_PHASES, PHASES, PhaseRecorder, current, phase, record
from .report import summarize

__all__ = ["BACKWARD_PHASES", "CallProbe", "NULL_PROBE", "PHASES", "PhaseRecorder", "current", "phase", "probe_for",
           "record", "report", "summarize"]
