"""Deterministic, offline text-classification tasks made of real English words.

They exist so the quickstart runs on a machine with no dataset hub. ``topics``: four topics
(sports, cooking, weather, technology), each sentence built from a topic's own nouns and verbs
mixed with shared filler and a sprinkle of words from other topics. ``sentiment``: positive or
negative reviews of products and restaurants, with a vocabulary of their own so that a
multi-task run (one adapter per task) has two genuinely different tasks. A pretrained encoder
already knows these words, which is what lets a few federated rounds of LoRA climb far above
chance. They are synthetic: say so wherever their numbers are reported.
"""

from __future__ import annotations

import random

TOPICS: dict[str, dict[str, list[str]]] = {
    "sports": {
        "subjects": [
            "the striker",
            "our goalkeeper",
            "the coach",
            "the home team",
            "the champion",
            "the referee",
            "the defender",
            "the young sprinter",
            "the captain",
            "the fans",
        ],
        "verbs": [
            "scored",
            "defended",
            "trained for",
            "celebrated",
            "lost",
            "won",
            "kicked",
            "raced through",
            "tackled",
            "cheered for",
        ],
        "objects": [
            "the final match",
            "a late goal",
            "the league title",
            "the penalty",
            "the marathon",
            "the tournament",
            "the second half",
            "a record lap",
            "the playoff game",
            "the gold medal",
        ],
    },
    "cooking": {
        "subjects": [
            "the chef",
            "my grandmother",
            "the baker",
            "the waiter",
            "the cook",
            "our kitchen staff",
            "the pastry chef",
            "the host",
            "the butcher",
            "the diner",
        ],
        "verbs": [
            "baked",
            "seasoned",
            "roasted",
            "stirred",
            "tasted",
            "grilled",
            "chopped",
            "simmered",
            "served",
            "fried",
        ],
        "objects": [
            "the garlic soup",
            "fresh bread",
            "a chocolate cake",
            "the tomato sauce",
            "the roast chicken",
            "a bowl of pasta",
            "the spicy curry",
            "warm cookies",
            "the vegetable stew",
            "a lemon pie",
        ],
    },
    "weather": {
        "subjects": [
            "the storm",
            "a cold front",
            "the forecast",
            "heavy rain",
            "the wind",
            "thick fog",
            "the hurricane",
            "a heat wave",
            "the snowfall",
            "thunder",
        ],
        "verbs": [
            "flooded",
            "swept across",
            "covered",
            "chilled",
            "soaked",
            "battered",
            "drifted over",
            "warmed",
            "froze",
            "darkened",
        ],
        "objects": [
            "the coastal towns",
            "the valley",
            "the mountain pass",
            "the northern plains",
            "the harbor",
            "the farmland",
            "the city streets",
            "the frozen lake",
            "the sky at dawn",
            "the islands",
        ],
    },
    "technology": {
        "subjects": [
            "the engineer",
            "the startup",
            "the software update",
            "the new processor",
            "the programmer",
            "the robot",
            "the laptop",
            "the server",
            "the app",
            "the chip maker",
        ],
        "verbs": [
            "crashed",
            "compiled",
            "encrypted",
            "downloaded",
            "debugged",
            "upgraded",
            "launched",
            "rebooted",
            "installed",
            "optimized",
        ],
        "objects": [
            "the database",
            "a faster network",
            "the operating system",
            "the source code",
            "the smartphone",
            "a cloud service",
            "the graphics driver",
            "the wireless router",
            "the battery firmware",
            "the search engine",
        ],
    },
}

FILLERS = [
    "yesterday",
    "this morning",
    "again",
    "late at night",
    "as expected",
    "once more",
    "last week",
    "without warning",
    "on monday",
    "after a while",
]


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


# Reviews: the subject is neutral, the opinion and the verdict carry the polarity. No word is
# shared with TOPICS beyond "the", "a", "of" and the like, so the two tasks need different adapters.
REVIEWS: dict[str, list[str]] = {
    "subjects": [
        "the headset",
        "the blender",
        "the vacuum cleaner",
        "the mattress",
        "the backpack",
        "the umbrella",
        "the espresso machine",
        "the desk lamp",
        "the jacket",
        "the suitcase",
        "the restaurant",
        "the hospitality",
        "the dessert",
        "the buffet",
        "the menu",
        "the atmosphere",
        "the bartender",
        "the wine list",
        "the delivery",
        "the hotel room",
    ],
}
SENTIMENT: dict[str, dict[str, list[str]]] = {
    "positive": {
        "opinions": [
            "was absolutely wonderful",
            "exceeded all expectations",
            "felt sturdy and reliable",
            "was a delight",
            "looked gorgeous",
            "was worth every penny",
            "impressed everyone",
            "was friendly and attentive",
            "felt comfortable",
            "was excellent",
        ],
        "verdicts": [
            "highly recommended",
            "five stars",
            "i will definitely return",
            "i love it",
            "i would purchase another",
            "a pleasant surprise",
            "great value",
            "simply perfect",
        ],
    },
    "negative": {
        "opinions": [
            "was terribly disappointing",
            "broke within days",
            "felt cheap and flimsy",
            "was a nightmare",
            "looked shabby",
            "was a waste of money",
            "annoyed everyone",
            "was rude and careless",
            "felt uncomfortable",
            "was awful",
        ],
        "verdicts": [
            "avoid it",
            "one star",
            "i will never return",
            "i hate it",
            "i want a refund",
            "a total letdown",
            "poor value",
            "simply useless",
        ],
    },
}
REVIEW_FILLERS = ["honestly", "overall", "to be fair", "in my opinion", "frankly", "all things considered"]


def generate_sentiment(num_examples: int, seed: int = 0, noise: float = 0.15) -> dict[str, list]:
    """Generate ``num_examples`` positive or negative reviews, deterministically from ``seed``.

    Parameters
    ----------
    num_examples : int
        Rows to produce; labels are balanced in expectation.
    seed : int
        Same seed, same rows, on every machine.
    noise : float
        Probability that a review's opinion has the other polarity (its verdict still decides),
        which keeps the task from being solvable by one keyword.

    Returns
    -------
    dict
        Columns ``text`` (str) and ``label`` (``positive`` or ``negative``), as
        :func:`generate_topics`.
    """
    rng = random.Random(seed)
    names = sorted(SENTIMENT)
    texts, labels = [], []
    for _ in range(num_examples):
        label = rng.choice(names)
        other = names[1 - names.index(label)]
        opinion_bank = SENTIMENT[other] if rng.random() < noise else SENTIMENT[label]
        words = [
            rng.choice(REVIEWS["subjects"]),
            rng.choice(opinion_bank["opinions"]),
            rng.choice(SENTIMENT[label]["verdicts"]),
        ]
        if rng.random() < 0.5:
            words.insert(0, rng.choice(REVIEW_FILLERS))
        texts.append(" ".join(words))
        labels.append(label)
    return {"text": texts, "label": labels}


# ``synthetic:<name>`` in data.path: the generators by name.
GENERATORS = {"topics": generate_topics, "sentiment": generate_sentiment}


def vocabulary() -> list[str]:
    """Every word the generators can emit (for building tiny test tokenizers)."""
    phrases: list[str] = list(FILLERS) + list(REVIEW_FILLERS) + REVIEWS["subjects"]
    for bank in list(TOPICS.values()) + list(SENTIMENT.values()):
        for group in bank.values():
            phrases += group
    return sorted({word for phrase in phrases for word in phrase.split()})


def tiny_tokenizer():
    """A word-piece tokenizer over :func:`vocabulary` (every word the generators emit), for tiny
    random models in tests and benchmarks."""
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = specials + vocabulary() + list("abcdefghijklmnopqrstuvwxyz0123456789")
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)


def write_tiny_bert(directory) -> str:
    """A 2-layer random BERT encoder (hidden 32, seeded) and :func:`tiny_tokenizer`, saved to
    ``directory``: a model the real loading code reads in milliseconds (no head: a classifier
    starts fresh, as on MiniLM)."""
    import torch
    from transformers import BertConfig, BertModel

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def write_tiny_gpt2(directory, tok=None) -> str:
    """A 2-layer random GPT-2 causal LM (width 32, seeded) and its tokenizer (``tok``, default
    :func:`tiny_tokenizer`, whose [CLS]/[SEP] then serve as BOS/EOS), saved to ``directory``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tok if tok is not None else tiny_tokenizer()
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        pad_token_id=tok.pad_token_id,
        bos_token_id=bos,
        eos_token_id=eos,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)
