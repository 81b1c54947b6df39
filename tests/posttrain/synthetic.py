"""Synthetic post-training data the tests can learn in a few steps."""
from __future__ import annotations

import random


def separable_pairs(count: int, seed: int) -> list[dict]:
    """Preference pairs a model can tell apart from the response alone: digits are chosen over letters."""
    rng = random.Random(seed)
    words = ["def", "return", "self", "import", "class", "value", "items", "print"]
    pairs = []
    for _ in range(count):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) + " = "
        n = rng.randint(3, 10)
        pairs.append({"prompt": prompt,
                      "chosen": "".join(rng.choice("0123456789") for _ in range(n)) + "\n",
                      "rejected": "".join(rng.choice("abcdefghij") for _ in range(n)) + "\n"})
    return pairs


def prompts(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = ["def", "return", "self", "import", "class", "for", "while", "if"]
    return [{"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(1, 5))) + " "} for _ in range(count)]
