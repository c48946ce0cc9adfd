"""A Flower App using a fedlora strategy with Flower's own ``Strategy.start``."""
