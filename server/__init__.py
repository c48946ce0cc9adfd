"""The fedlora ServerApp: preparation, the round loop in named steps (rounds.py), reply
validation, evaluation, checkpoint/resume, export; and a fedlora strategy for a plain Flower
ServerApp's ``Strategy.start`` (flower.py)."""

from .evaluation import evaluate_state
from .flower import FlowerStrategy, create_flower_strategy
from .rounds import RoundLoop, RunResult
from .server_app import Prepared, make_server_app, prepare, run_server
from .validation import ReplyError, validate_reply

__all__ = [
    "FlowerStrategy",
    "Prepared",
    "ReplyError",
    "RoundLoop",
    "RunResult",
    "create_flower_strategy",
    "evaluate_state",
    "make_server_app",
    "prepare",
    "run_server",
    "validate_reply",
]
