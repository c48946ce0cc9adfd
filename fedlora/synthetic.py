"""A deterministic, offline text-classification task made of real English words.

It exists so the quickstart runs on a machine with no dataset hub: four topics (sports,
cooking, weather, technology), each sentence built from a topic's own nouns and verbs mixed
with shared filler and a sprinkle of words from other topics. A pretrained encoder already
knows these words, which is what lets a few federated rounds of LoRA climb far above chance.
It is synthetic: say so wherever its numbers are reported.
"""

from __future__ import annotations

import random

TOPICS: dict[str, dict[str, list[str]]] = {
    "sports": {
        "subjects": ["the striker", "our goalkeeper", "the coach", "the home team", "the champion",
                     "the referee", "the defender", "the young sprinter", "the captain", "the fans"],
        "verbs": ["scored", "defended", "trained for", "celebrated", "lost", "won", "kicked",
                  "raced through", "tackled", "cheered for"],
        "objects": ["the final match", "a late goal", "the league title", "the penalty",
                    "the marathon", "the tournament", "the second half", "a record lap",
                    "the playoff game", "the gold medal"],
    },
    "cooking": {
        "subjects": ["the chef", "my grandmother", "the baker", "the waiter", "the cook",
                     "our kitchen staff", "the pastry chef", "the host", "the butcher", "the diner"],
        "verbs": ["baked", "seasoned", "roasted", "stirred", "tasted", "grilled", "chopped",
                  "simmered", "served", "fried"],
        "objects": ["the garlic soup", "fresh bread", "a chocolate cake", "the tomato sauce",
                    "the roast chicken", "a bowl of pasta", "the spicy curry", "warm cookies",
                    "the vegetable stew", "a lemon pie"],
    },
    "weather": {
        "subjects": ["the storm", "a cold front", "the forecast", "heavy rain", "the wind",
                     "thick fog", "the hurricane", "a heat wave", "the snowfall", "thunder"],
        "verbs": ["flooded", "swept across", "covered", "chilled", "soaked", "battered",
                  "drifted over", "warmed", "froze", "darkened"],
        "objects": ["the coastal towns", "the valley", "the mountain pass", "the northern plains",
                    "the harbor", "the farmland", "the city streets", "the frozen lake",
                    "the sky at dawn", "the islands"],
    },
    "technology": {
        "subjects": ["the engineer", "the startup", "the software update", "the new processor",
                     "the programmer", "the robot", "the laptop", "the server", "the app", "the chip maker"],
        "verbs": ["crashed", "compiled", "encrypted", "downloaded", "debugged", "upgraded",
                  "launched", "rebooted", "installed", "optimized"],
        "objects": ["the database", "a faster network", "the operating system", "the source code",
                    "the smartphone", "a cloud service", "the graphics driver", "the wireless router",
                    "the battery firmware", "the search engine"],
    },
}

FILLERS = ["yesterday", "this morning", "again", "late at night", "as expected", "once more",
           "last week", "without warning", "on monday", "after a while"]


def generate_topics(num_examples: int, seed: int = 0, noise: float = 0.15) -> dict[str, list]:
    """Generate ``num_examples`` labelled sentences, deterministically from ``seed``.

    Parameters
    ----------
    num_examples : int
        Rows to produce; labels are balanced in expectation.
    seed : int
        Same seed, same rows, on every machine.
    noise : float
        Probability that a sentence's object is drawn from another topic, which keeps the task
        from being solvable by one keyword.

    Returns
    -------
    dict
        Columns ``text`` (str) and ``label`` (topic name).
    """
    rng = random.Random(seed)
    names = sorted(TOPICS)
    texts, labels = [], []
    for _ in range(num_examples):
        topic = rng.choice(names)
        bank = TOPICS[topic]
        obj_bank = TOPICS[rng.choice(names)] if rng.random() < noise else bank
        words = [rng.choice(bank["subjects"]), rng.choice(bank["verbs"]), rng.choice(obj_bank["objects"])]
        if rng.random() < 0.5:
            words.append(rng.choice(FILLERS))
        texts.append(" ".join(words))
        labels.append(topic)
    return {"text": texts, "label": labels}


def vocabulary() -> list[str]:
    """Every word the generator can emit (for building tiny test tokenizers)."""
    words: set[str] = set()
    for bank in TOPICS.values():
        for phrases in bank.values():
            for phrase in phrases:
                words.update(phrase.split())
    for phrase in FILLERS:
        words.update(phrase.split())
    return sorted(words)
