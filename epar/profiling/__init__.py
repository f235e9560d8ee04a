from .recorder import PHASES, PhaseRecorder, current, phase, record

__all__ = ["PHASES", "PhaseRecorder", "current", "phase", "record"]
