"""Where a deployed round's time goes, from the devices' output and the server's metrics.

Used by ``deploy_latency.py``. Every time here is wall clock (``time.time()``): the benchmark
stamps each output line as it arrives, the worker stamps its own steps
(``fedlora-worker: task N train: acquired ... created ... input ... handled ... pushed ... done``;
``created`` is the message's ``metadata.created_at``, set by the ServerApp when it built the
message) and ``MetricsWatch`` notes when each round's line reached ``metrics.jsonl``.

A device's steps, in order, when its worker takes the SuperNode's tasks (the default; each
phase starts where the one before ends, so they add up to the device's part of the round):

``pickup_s``      the server built the message -> the SuperNode's pull returned it: Flower's
                  SuperNode sleeps 3 s after every pull that found nothing
                  (``flwr/supernode/start_client_internal.py``), plus the push to the SuperLink
``receive_s``     the SuperNode pulls the message's objects from the SuperLink (TLS)
``handoff_s``     -> the worker holds the message: its ``AcquireTask`` poll (every 0.1 s; often
                  already done during ``receive_s``) and the task input over the Runtime API
``handler_s``     fedlora's ClientApp in the warm worker, its training included
``push_s``        the reply pushed to the SuperNode's Runtime API
``reply_wait_s``  -> the SuperNode sends it: it looks for a reply every 0.5 s
``send_s``        the reply and its objects to the SuperLink

With Flower's per-message ClientApp process (``before``, ``forward``) the phases are
``clientapp_start_s`` (SuperExec poll, Python start, Flower import), ``handler_s`` (to fedlora's
"trained" line), ``reply_wait_s``, ``send_s``.

A round's critical path is the device whose reply came last: ``configure_s`` (round start -> its
message built) + its phases + ``after_last_reply_s`` (its reply sent -> the round's line in
metrics.jsonl: the server's 0.2-s pull of replies, the ServerApp's pull through the SuperLink,
validation, aggregation, server-side evaluation) is the round's ``seconds`` exactly.
"""

from __future__ import annotations

import re
import statistics
from typing import Any

LOG_MARKS = {
    "recv": r"Receiving: train message",
    "received": r"Received successfully",
    "app_start": r"Start `flwr-clientapp` process",
    "trained": r"fedlora-client: round \d+: trained",
    "sending": r"Sending: train message",
    "sent": r"Sent successfully",
}
WORKER_TASK = re.compile(r"fedlora-worker: task \d+ train: (.*)")
TASK_PHASES = {  # name: (from mark, to mark)
    "pickup_s": ("created", "recv"),
    "receive_s": ("recv", "received"),
    "handoff_s": ("received", "input"),
    "handler_s": ("input", "handled"),
    "push_s": ("handled", "pushed"),
    "reply_wait_s": ("pushed", "sending"),
    "send_s": ("sending", "sent"),
}
PROCESS_PHASES = {
    "clientapp_start_s": ("recv", "app_start"),
    "handler_s": ("app_start", "trained"),
    "reply_wait_s": ("trained", "sending"),
    "send_s": ("sending", "sent"),
}


def med(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def device_marks(lines: list[tuple[float, str]]) -> tuple[str, dict[int, dict[str, float]]]:
    """(node id, {round: {mark: time}}) of one device's train messages."""
    marks: dict[int, dict[str, float]] = {}
    node, current = "", None
    for t, line in lines:
        if m := re.search(r"connected as node (\d+)", line):
            node = m.group(1)
        if m := re.search(r"\[RUN \d+, ROUND (\d+)\]", line):
            current = int(m.group(1))
            continue
        if current is None:
            continue
        here = marks.setdefault(current, {})
        if m := WORKER_TASK.search(line):
            words = m.group(1).split()
            here.update({k: float(v) for k, v in zip(words[::2], words[1::2])})
            continue
        for name, pattern in LOG_MARKS.items():
            if name not in here and (name == "recv" or "recv" in here) and re.search(pattern, line):
                here[name] = t
    return node, marks


def phases_of(marks: dict[str, float]) -> dict[str, float] | None:
    """The device's phases in one round (task or process path), or None when a mark is missing."""
    table = TASK_PHASES if "input" in marks else PROCESS_PHASES
    needed = {m for pair in table.values() for m in pair}
    if not needed <= set(marks):
        return None
    out = {name: round(marks[b] - marks[a], 3) for name, (a, b) in table.items()}
    out["device_s"] = round(marks["sent"] - marks["recv"], 3)
    return out


def timeline(run: dict[str, Any], rows: list[dict[str, float]]) -> list[dict[str, Any]]:
    """Steady rounds (2..N): each device's phases, and the round's critical path where the
    worker's marks and the round's end are known."""
    devices = [device_marks(lines) for lines in run["clients"]]
    train = {
        int(r["round"]): {str(c.get("node_id")): float(c.get("seconds", 0.0)) for c in r["clients"]}
        for r in run["rounds"]
    }
    out = []
    for row in rows:
        rnd = row["round"]
        marks = [d.get(rnd, {}) for _, d in devices]
        phases = [phases_of(m) for m in marks]
        if rnd < 2 or any(p is None for p in phases):
            continue
        entry: dict[str, Any] = {"round": rnd, "devices": phases}
        entry["receive_spread_s"] = round(max(m["recv"] for m in marks) - min(m["recv"] for m in marks), 3)
        end = run.get("round_ends", {}).get(rnd)
        if end is not None and all("created" in m for m in marks):
            last = max(range(len(marks)), key=lambda i: marks[i]["sent"])
            entry["critical"] = critical_path(marks[last], phases[last], end, row["round_s"])
            entry["critical"]["train_s"] = train.get(rnd, {}).get(devices[last][0])
            prev = devices[last][1].get(rnd - 1, {})
            if "sent" in prev:  # with a 3-s pull sleep: ~3 s, or a multiple, plus request times
                entry["critical"]["since_previous_reply_s"] = round(marks[last]["recv"] - prev["sent"], 3)
            entry["round_start"] = end - row["round_s"]
            entry["round_end"] = end
        out.append(entry)
    return out


def critical_path(marks: dict[str, float], phases: dict[str, float], end: float, round_s: float) -> dict[str, float]:
    """The round's seconds along the device that replied last (they add up to ``round_s``)."""
    start = end - round_s
    path = {"configure_s": round(marks["created"] - start, 3)}
    path.update({k: v for k, v in phases.items() if k != "device_s"})
    path["after_last_reply_s"] = round(end - marks["sent"], 3)
    path["round_s"] = round_s
    return path


def breakdown(tl: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the steady rounds: per device, along the critical path, between rounds."""
    names = [k for r in tl[:1] for k in r["devices"][0]]
    out: dict[str, Any] = {name: med([d[name] for r in tl for d in r["devices"]]) for name in names}
    out["receive_spread_s"] = med([r["receive_spread_s"] for r in tl])
    crit = [r["critical"] for r in tl if "critical" in r]
    if crit:
        keys = list(dict.fromkeys(k for c in crit for k in c))
        out["critical_path"] = {k: med([c[k] for c in crit if c.get(k) is not None]) for k in keys}
        # Means add up: the components' means sum to the mean round_s.
        out["critical_path_mean"] = {
            k: round(statistics.fmean(c[k] for c in crit if c.get(k) is not None), 3)
            for k in keys
            if any(c.get(k) is not None for c in crit)
        }
        gaps = [
            b["round_start"] - a["round_end"]
            for a, b in zip(tl, tl[1:])
            if "round_end" in a and "round_start" in b and b["round"] == a["round"] + 1
        ]
        # Not in a round's seconds (checkpoint, next round's start), but in the run's wall time.
        out["between_rounds_s"] = med(gaps)
    return out
