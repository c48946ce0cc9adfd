"""The fedlora ServerApp: round loop, reply validation, evaluation, checkpoint/resume, export."""

from .server_app import Prepared, RunResult, evaluate_state, make_server_app, prepare, run_server
from .validation import ReplyError, validate_reply

__all__ = ["Prepared", "ReplyError", "RunResult", "evaluate_state", "make_server_app", "prepare", "run_server",
           "validate_reply"]
