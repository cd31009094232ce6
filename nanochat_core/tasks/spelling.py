"""Spelling tasks, generated (no download): small models see tokens, not letters, so "how many r's in
strawberry" is hard for them. SpellingBee teaches counting a letter by spelling the word out with a
running count and then checking with a calculator call; SimpleSpelling just spells a word letter by
letter. Both are deterministic in (split, index), so train and test draw different examples."""
from __future__ import annotations

import random
import re
from typing import Any

from nanochat_core.tasks.common import Generated
from nanochat_core.tasks.gsm8k import extract_answer

# Common English words (a few hundred is plenty: the skill is spelling, not vocabulary).
WORDS = """
apple banana cherry grape lemon orange peach pear plum melon mango berry strawberry raspberry blueberry
water river ocean island mountain valley forest desert garden flower tree leaf grass stone rock sand
house window door table chair kitchen bedroom bottle glass paper pencil letter number alphabet school
teacher student library book story poem music guitar piano violin drum singer dancer painter doctor
nurse farmer baker butter bread cheese coffee pepper salt sugar honey cookie pizza pasta rice tomato
potato carrot onion garlic cabbage pumpkin coconut chocolate vanilla cinnamon balloon rabbit turtle
monkey giraffe elephant kangaroo penguin dolphin squirrel hippopotamus butterfly mosquito beetle spider
horse sheep chicken kitten puppy tiger zebra parrot falcon eagle sparrow mississippi committee
necessary accommodate occasionally embarrass tomorrow address beginning believe calendar cemetery
definitely parallel recommend rhythm separate success tennessee bookkeeper balloonist assessment
coffee programming computer keyboard monitor software hardware network internet database language
science physics chemistry biology history geography mathematics algebra geometry calculus statistics
planet galaxy universe comet rocket engine bicycle scooter airplane helicopter submarine train tunnel
bridge street village city country summer winter autumn spring morning evening midnight yesterday
friend family mother father sister brother daughter grandmother neighbor stranger village happiness
kindness courage freedom wisdom patience silence thunder lightning rainbow blizzard hurricane
tornado volcano earthquake umbrella scissors hammer ladder bucket basket blanket pillow mirror
candle lantern jacket sweater pocket button zipper needle thread yellow purple silver golden
crimson turquoise lavender seventeen eleven twelve hundred thousand million billion quarter
""".split()


def spell(word: str) -> str:
    return "-".join(word)


def letter_count_answer(word: str, letter: str) -> list[dict[str, str]]:
    """Assistant parts: spell with a running count of `letter`, check with the calculator, answer."""
    pieces, n = [], 0
    for ch in word:
        if ch == letter:
            n += 1
            pieces.append(f"{ch}({n})")
        else:
            pieces.append(ch)
    return [
        {"type": "text", "text": f"Spelling out '{word}' and counting each '{letter}': {'-'.join(pieces)}.\n"
                                 f"Let me double-check with code: "},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(n)},
        {"type": "text", "text": f"\nThe letter '{letter}' appears {n} time{'s' if n != 1 else ''} in "
                                 f"'{word}'.\n\n#### {n}"},
    ]


_BEE_QUESTIONS = [
    "How many times does the letter '{l}' appear in the word '{w}'?",
    "How many {l}'s are in {w}?",
    "Count the letter {l} in \"{w}\".",
    "In the word {w}, how many times do you see the letter {l}?",
    "how many {l} in {w}",
]
_SPELL_QUESTIONS = ["Spell the word '{w}'.", "How do you spell {w}?", "Spell {w} letter by letter.",
                    "spell: {w}"]


class SpellingBee(Generated):
    name = "SpellingBee"
    eval_type = "generative"

    def get_example(self, index: int) -> dict[str, Any]:
        rng = random.Random(self.seed_base + index)
        word = rng.choice(WORDS)
        # mostly letters that occur in the word (the interesting case), sometimes one that does not
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        question = rng.choice(_BEE_QUESTIONS).format(l=letter, w=word)
        if rng.random() < 0.3:
            question = question.lower()
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": letter_count_answer(word, letter)}]}

    def evaluate(self, conversation: dict[str, Any], response: str) -> bool:
        parts = conversation["messages"][-1]["content"]
        gold = extract_answer("".join(p["text"] for p in parts if p["type"] == "text"))
        return gold is not None and extract_answer(response) == gold


class SimpleSpelling(Generated):
    name = "SimpleSpelling"
    eval_type = "generative"

    def get_example(self, index: int) -> dict[str, Any]:
        rng = random.Random(self.seed_base + index)
        word = rng.choice(WORDS)
        question = rng.choice(_SPELL_QUESTIONS).format(w=word)
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": spell(word)}]}

    def evaluate(self, conversation: dict[str, Any], response: str) -> bool:
        # the letters must come spelled out ("a-p-p-l-e"), not just the word again
        gold = conversation["messages"][-1]["content"]
        return re.sub(r"\s", "", response.lower()).rstrip(".") == gold
