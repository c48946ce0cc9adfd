"""The ``[evaluation]`` table: which clients judge their own model each round, and which write it.

The global adapter is always evaluated on the server's held-out split. Personalized strategies
(fedsa, pfedlora) also ask clients to evaluate their own model (the shared part plus what each
keeps) on their own held-out examples; in a cross-device federation of a million clients that
must cost the clients of the round, not the federation (:func:`fedlora.server.personal.evaluation_nodes`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .errors import check
from .model import RESUMABLE, ConfigModel

EvalClients = Literal["trained", "sample", "all"]


class EvaluationConfig(ConfigModel):
    """Per-client evaluation of personalized strategies (``[evaluation]``)."""

    KEY_PREFIX = "evaluation."
    clients: EvalClients = Field(
        "trained",
        json_schema_extra=RESUMABLE,
        description="Which clients evaluate their own model each round: ``trained`` (those whose update of the "
        "round was used), ``sample`` (a seeded ``evaluation.fraction`` of all clients, drawn anew each round) or "
        "``all`` (every client every round: the cost grows with the federation). In the last round every client "
        "evaluates when there are at most ``evaluation.final_all_up_to`` of them.",
    )
    fraction: float = Field(
        0.1,
        gt=0,
        le=1,
        json_schema_extra=RESUMABLE,
        description='With ``clients = "sample"``: the fraction of all clients that evaluate each round (at least one).',
    )
    final_all_up_to: int = Field(
        100,
        ge=0,
        json_schema_extra=RESUMABLE,
        description="Federations of at most this many clients evaluate every client in the last round (the final "
        "numbers then cover everyone); 0 never.",
    )
    export_clients: Literal["auto", "none", "all"] | list[int] = Field(
        "auto",
        json_schema_extra=RESUMABLE,
        description="Whose personalized adapter is written at the end (``runs/<name>/clients/<partition>/adapter``): "
        "``auto`` (every client when the last round evaluates them all, else none), ``none``, ``all``, or a list of "
        "partition ids (simulation; a deployed device writes its own under ``fedlora-client --export-dir``). "
        "``fedlora export RUN --client K`` writes one after the run.",
    )

    @model_validator(mode="after")
    def _rules(self) -> EvaluationConfig:
        ids = self.export_clients
        check(
            not isinstance(ids, list) or min(ids, default=0) >= 0,
            "export_clients",
            f"partition ids are >= 0, got {ids}",
        )
        return self
