"""Differential privacy math: the accounting (:mod:`~fedlora.privacy.accounting`: Opacus
accountants, the per-node ledger, the guarantee a run reports) and user-level DP on the server
(:mod:`~fedlora.privacy.central`: clipping, the noisy mean). DP-SGD on a client, the part that
wraps a live model, is :mod:`fedlora.train.dpsgd`."""
