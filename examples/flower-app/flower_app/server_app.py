"""A plain Flower ServerApp: a fedlora strategy, run by Flower's own ``Strategy.start``.

Each round Flower's loop asks the strategy for the train messages (the global LoRA adapter, the
run's settings), sends them to fedlora's ClientApp on every node (``fedlora.client.entry:app``,
named in pyproject.toml), and hands the replies back to the strategy to aggregate; the strategy
validates each reply first. ``evaluate_fn`` scores the global adapter on the server's held-out
split after every round. At the end the adapter is saved in peft's format.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.server import create_flower_strategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    num_rounds = int(context.run_config["num-server-rounds"])
    out = Path(str(context.run_config["out-dir"])).expanduser().resolve()

    # The `fedlora.*` keys of the run config are fedlora's configuration (model, LoRA, data, ...).
    strategy = create_flower_strategy(run_config=context.run_config)
    result = strategy.start(
        grid=grid,
        initial_arrays=strategy.initial_arrays(),
        num_rounds=num_rounds,
        evaluate_fn=strategy.evaluate_global,
    )

    adapters = strategy.export(result.arrays, out / "adapter")
    summary = {
        "strategy": strategy.strategy.name,
        "rounds": num_rounds,
        "train": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
        "evaluate": {str(r): dict(m) for r, m in result.evaluate_metrics_serverapp.items()},
        "dropped": {str(r): d for r, d in strategy.dropped.items()},
        "adapters": [str(a) for a in adapters],
    }
    (out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"fedlora-flower-app: adapter saved to {adapters[0]}", flush=True)
