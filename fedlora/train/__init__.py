"""The training layer: a client's local round over a peft model (:mod:`~fedlora.train.local`:
plain steps, evaluation, the learning-rate schedule) and DP-SGD with Opacus
(:mod:`~fedlora.train.dpsgd`)."""
