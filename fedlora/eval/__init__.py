"""``fedlora evaluate``: scoring math (:mod:`~fedlora.eval.scoring`), what it reads
(:mod:`~fedlora.eval.inputs`) and the evaluation itself (:mod:`~fedlora.eval.evaluate`)."""
