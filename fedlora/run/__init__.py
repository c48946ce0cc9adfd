"""What a run leaves behind: the run directory and its lock
(:mod:`~fedlora.run.directory`, :mod:`~fedlora.run.lock`), atomic checkpoints
(:mod:`~fedlora.run.checkpoint`), progress lines and TensorBoard scalars
(:mod:`~fedlora.run.progress`), the exported PEFT adapter (:mod:`~fedlora.run.export`), reports
(:mod:`~fedlora.run.report`)."""
