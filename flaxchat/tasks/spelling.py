"""Spelling and letter counting, generated (nanochat's SpellingBee / SimpleSpelling idea).

"How many r are in strawberry?" is hard for a small LLM because a token hides its letters. Two
generated tasks over-represent the skill in SFT data:
* SpellingBee: count a letter in a word. The reference answer spells the word out, walks the
  letters keeping a running count, double-checks with the calculator tool
  (`'word'.count('l')` as a python part, the count as its output) and ends with `#### N`, so it
  is graded like GSM8K (the number after ####).
* SimpleSpelling: "Spell the word: cat" -> "cat:c,a,t", the core sub-skill in condensed form;
  graded by exact match.

Every example is a pure function of (seed, split, index) through a string-seeded random.Random,
so any host can produce example i without generating the ones before it. Words come from the
built-in list of common English words below (nothing is downloaded); `words_path` (local or
gs://, one word per line) swaps in a bigger list such as the 370K-word list nanochat uses. With
the small built-in list train and test share words (only the letter and phrasing differ), so
the test split measures the skill on seen words.
"""

from __future__ import annotations

import random
import re
from typing import Any

from flaxchat.tasks.base import Conversation, Task, TaskError, final_assistant_text
from flaxchat.tasks.gsm8k import grade_numeric

ALPHABET = "abcdefghijklmnopqrstuvwxyz"

COMMON_WORDS = """
about above across action actually address afraid afternoon again against agree ahead airport
almost alone along already always amazing among animal another answer anything apple area arrive
article attention autumn away baby back balance banana basket beautiful because become bedroom
before begin behind believe below better between bicycle birthday blanket bottle bottom branch
bread breakfast bridge bright brother brown build butter butterfly button cabbage camera candle
captain careful carpet castle catch celebrate center chair change chapter cheese cherry chicken
children chocolate choose circle city classroom clever climb clock closet cloud coffee collect
color comfortable common computer cookie corner country cousin cover crayon cross crowd current
curtain daughter decide deliver dessert different difficult dinner direction discover distance
doctor dollar dragon dream dress during early earth easily eight elephant eleven empty energy
engine enough evening every example excellent exercise explain family famous farmer father
feather festival field finger finish flower follow football forest forget forward friend front
fruit funny garden gather gentle giraffe glass global golden government grandmother grass great
guitar hammer happen happy harbor health heavy hello helpful history hobby holiday honest horse
hospital hundred hungry idea imagine important inside instead island jacket jelly journey jungle
kangaroo kitchen knife knowledge ladder language laugh leader letter library light listen little
lizard machine magazine market marriage measure medicine memory message middle million minute
mirror mission mistake moment money monkey morning mountain mouse music mystery narrow nature
nearly needle neighbor never newspaper night nobody noodle normal notebook number ocean office
often orange outside oxygen paint paper parent party pencil people pepper perfect person picture
pillow planet plastic please pocket police possible potato power present pretty problem promise
pumpkin puzzle question quickly quiet rabbit rainbow reason record remember repeat restaurant
river rocket rubber salad sandwich school science scissors season second secret seven shadow
shoulder simple sister sleep slowly smile snake soccer society soldier something spider spring
square squirrel staircase station stomach strawberry street strong student subject success
sudden summer sunshine supper surprise sweater swimming system table teacher telephone thousand
through thunder ticket tiger together tomato tomorrow tongue tooth towel travel treasure
triangle trouble turtle twelve umbrella uncle under understand unusual useful vacation valley
vegetable village violin visitor voice volcano wallet water weather wheel whisper window winter
wizard woman wonderful yellow yesterday young zebra zipper
""".split()

# Phrasings of the question; {letter} and {word} are filled in (possibly quoted) per example.
# A few non-English ones, as nanochat includes, so the skill is not tied to one template.
TEMPLATES = (
    "How many {letter} are in the word {word}", "How many {letter} are there in {word}",
    "Count the {letter} in {word}", "How many times does {letter} appear in {word}",
    "What is the number of {letter} in {word}", "In {word}, how many {letter} are there",
    "How many letter {letter} does {word} have", "Tell me how many {letter} are in {word}",
    "Count the occurrences of {letter} in the word {word}", "How often does {letter} occur in {word}",
    "{word}: how many {letter}", "Give me the count of {letter} in {word}",
    "How many {letter}'s are in {word}", "Number of {letter} in {word}",
    "¿Cuántas {letter} hay en {word}", "Combien de {letter} dans {word}",
    "Wie viele {letter} sind in {word}", "{word}里有几个{letter}",
)


def load_words(words_path: str | None) -> list[str]:
    if words_path is None:
        return list(COMMON_WORDS)
    from flaxchat import storage
    words = [w.strip().lower() for w in storage.read_text(words_path).splitlines()]
    words = [w for w in words if re.fullmatch(r"[a-z]+", w)]
    if not words:
        raise TaskError(f"{words_path} has no usable words; give one lowercase a-z word per line")
    return words


def spell(word: str) -> str:
    # "cat:c,a,t" — no spaces, so each letter is the same single-letter token wherever it occurs
    return f"{word}:{','.join(word)}"


class _WordTask(Task):
    tag = ""

    def __init__(self, size: int = 1000, split: str = "train", seed: int = 0,
                 words_path: str | None = None, **slice_kw: Any):
        super().__init__(**slice_kw)
        if split not in ("train", "test"):
            raise TaskError(f"{type(self).__name__} split {split!r} must be 'train' or 'test'")
        if size < 0:
            raise TaskError(f"{type(self).__name__} size={size} must be >= 0")
        self.size, self.split, self.seed = size, split, seed
        self.words = load_words(words_path)

    def num_examples(self) -> int:
        return self.size

    def _rng(self, index: int) -> random.Random:
        # string seeds hash through sha512: stable across runs and platforms, and the split name
        # in the seed keeps train and test on independent random streams
        return random.Random(f"flaxchat-{self.tag}-{self.seed}-{self.split}-{index}")


class SpellingBee(_WordTask):
    """Count one letter in one word, spelled out by hand and checked with the python tool."""

    tag = "spellingbee"
    eval_type = "generative"

    def get_example(self, index: int) -> Conversation:
        rng = self._rng(index)
        word = rng.choice(self.words)
        # mostly a letter of the word; sometimes one that may be absent, so "0" is also taught
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(ALPHABET)
        count = word.count(letter)
        template = rng.choice(TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()
        lq, wq = rng.choice(("", "'", '"')), rng.choice(("", "'", '"'))
        question = template.format(letter=f"{lq}{letter}{lq}", word=f"{wq}{word}{wq}")
        question += rng.choice(("?", "", "?"))

        lines = [f"We need to count the letter '{letter}' in the word '{word}'. First I spell the word out:",
                 spell(word), "", f"Now I go through the letters, counting '{letter}':"]
        running = 0
        for i, ch in enumerate(word, 1):
            if ch == letter:
                running += 1
                lines.append(f"{i}:{ch} hit! count={running}")
            else:
                lines.append(f"{i}:{ch}")
        lines += ["", f"That makes {running}.", "", "Let me double check with Python:", "", ""]
        parts = [
            {"type": "text", "text": "\n".join(lines)},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython agrees: {count}.\n\n#### {count}"},
        ]
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": parts}],
                "word": word, "letter": letter, "answer": count}

    def evaluate(self, conversation: Conversation, completion: str) -> float:
        return grade_numeric(conversation, completion)


class SimpleSpelling(_WordTask):
    """"Spell the word: cat" -> "cat:c,a,t"."""

    tag = "simplespelling"
    eval_type = "generative"

    def get_example(self, index: int) -> Conversation:
        word = self._rng(index).choice(self.words)
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": spell(word)}],
                "word": word}

    def evaluate(self, conversation: Conversation, completion: str) -> float:
        if not isinstance(completion, str):
            raise TaskError(f"completion must be a string, got {type(completion).__name__}")
        return 1.0 if completion.strip() == final_assistant_text(conversation).strip() else 0.0
