"""The fedlora ServerApp: preparation, the round loop in named steps (rounds.py), reply
validation, evaluation, checkpoint/resume, export."""

from .evaluation import evaluate_state
from .rounds import RoundLoop, RunResult
from .server_app import Prepared, make_server_app, prepare, run_server
from .validation import ReplyError, validate_reply

__all__ = [
    "Prepared",
    "ReplyError",
    "RoundLoop",
    "RunResult",
    "evaluate_state",
    "make_server_app",
    "prepare",
    "run_server",
    "validate_reply",
]
