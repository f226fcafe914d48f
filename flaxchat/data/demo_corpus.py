"""The `demo` preset's corpus, generated from a seed by small template grammars.

The demo pipeline must run end to end offline on a laptop, so its data is made here rather
than downloaded: children's stories (characters, places, objects, actions, feelings, with
varied plots and sentence shapes over a few hundred words, so a tiny model has something
learnable), GSM8K-style arithmetic word problems (`<<12*3=36>>` calculator annotations and
a final `#### 36` line), and short user/assistant dialogues in nanochat's conversation
format, whose arithmetic answers call the python tool (for SFT and GRPO with tool use).

Everything comes from one `random.Random` stream per call (never `hash()` or set order), so
the same seed gives identical output on every machine, and a longer request extends a shorter
one (`generate_documents(s, 10)[:5] == generate_documents(s, 5)`).
"""

from __future__ import annotations

import os
import random
import shutil
import uuid
from typing import Any, Callable

# bump when the grammar changes, so cached demo shards are regenerated
CORPUS_VERSION = 1

GIRLS = "Lily Mia Anna Zoe Emma Lucy Sara Ella Rosa Nina Kate Amy Ruby Grace Molly Daisy Ivy Clara".split()
BOYS = "Tom Ben Sam Max Leo Jack Tim Finn Noah Owen Jake Luke Eli Oscar Peter Hugo Adam Theo".split()
ANIMALS = ("cat dog rabbit bird fox bear duck frog mouse owl turtle squirrel lion puppy kitten pig "
           "cow horse sheep goat deer bee fish hen").split()
TRAITS = ("little brave kind shy clever silly happy gentle curious funny quiet busy lazy friendly "
          "sleepy strong fast young smart careful cheerful proud").split()
COLORS = "red blue green yellow pink purple orange white black brown gold silver".split()
THING_ADJ = "shiny soft round heavy small big old new pretty magic striped tiny bright".split()
OBJECTS = ("ball kite box hat book cake flower drum shell stone key boat balloon cup sock blanket "
           "apple cookie crayon robot doll feather map bell ribbon basket lamp puzzle whistle "
           "sandwich leaf star scarf bucket train coin").split()
PLACES = ("park forest garden beach school kitchen farm river hill pond playground library market "
          "zoo meadow yard lake bakery cave field village castle attic barn").split()
HIDING = ("under the bed", "behind a big tree", "inside a box", "next to the door", "under a pile of leaves",
          "on top of the shelf", "in the tall grass", "behind the sofa", "under a rock", "in a bush")
TIMES = ("One sunny morning", "One rainy day", "One cold night", "Last summer", "One windy afternoon",
         "On a snowy day", "Early one morning", "One bright spring day", "After lunch", "One warm evening")
FEELINGS_BAD = "sad scared worried lonely grumpy upset nervous angry".split()
FEELINGS_GOOD = "happy excited proud glad calm thankful joyful".split()
ACTIVITIES = ("ran very fast", "jumped up and down", "sang a happy song", "danced in a circle",
              "played hide and seek", "climbed a tall tree", "splashed in the water", "rode a red bike",
              "built a sand castle", "picked sweet berries", "flew a kite", "read a funny book",
              "drew a big picture", "baked yummy cookies", "looked at the stars", "played with a ball",
              "made a paper boat", "planted some seeds", "counted the clouds", "chased butterflies")
PLAY_IDEAS = ("fly a kite", "play hide and seek", "look for bugs", "have a picnic", "draw with chalk",
              "play tag with friends", "feed the ducks", "read a book under a tree", "ride a bike")
WEATHER = ("it started to rain", "the wind blew very hard", "dark clouds covered the sky",
           "it began to snow", "a big storm came", "it got very cold")
INDOORS = ("built a fort with pillows", "played a board game", "baked bread with Mom", "painted pictures",
           "told stories by the fire", "did a puzzle", "made a puppet show", "drank warm milk and read")
SAY = "said shouted whispered cried replied".split()
ASK = "asked wondered whispered".split()
FAMILY = "Mom Dad Grandma Grandpa".split()
MORALS = ("sharing is fun", "it is good to be kind", "friends help each other",
          "being brave is hard but it is worth it", "it is important to say sorry",
          "it is good to ask for help", "being patient is a good thing", "telling the truth is always best",
          "a good friend listens", "trying again makes you stronger")
SOUNDS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "sheep": "baa", "pig": "oink",
          "owl": "hoot", "horse": "neigh", "frog": "ribbit", "bee": "buzz", "lion": "roar", "hen": "cluck"}
LEGS = {"cat": 4, "dog": 4, "cow": 4, "duck": 2, "bird": 2, "owl": 2, "horse": 4, "bee": 6,
        "spider": 8, "fish": 0, "snake": 0, "hen": 2, "fox": 4}
HOMES = {"fish": "in the water", "bird": "in a nest", "bee": "in a hive", "bear": "in a cave",
         "rabbit": "in a hole under the ground", "owl": "in a tree", "cow": "on a farm", "fox": "in a den"}


class _Hero:
    """A story character with consistent pronouns."""

    def __init__(self, rng: random.Random, kind: str | None = None):
        girl = rng.random() < 0.5
        self.name = rng.choice(GIRLS if girl else BOYS)
        self.kind = kind or (rng.choice(ANIMALS) if rng.random() < 0.4 else ("girl" if girl else "boy"))
        self.he, self.him, self.his = ("she", "her", "her") if girl else ("he", "him", "his")
        self.trait = rng.choice(TRAITS)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _story(rng: random.Random, kind: str | None = None) -> str:
    c = rng.choice
    hero, pal = _Hero(rng, kind), _Hero(rng)
    while pal.name == hero.name:
        pal = _Hero(rng)
    obj, place = c(OBJECTS), c(PLACES)
    thing = f"{c(THING_ADJ)} {c(COLORS)} {obj}" if rng.random() < 0.5 else f"{c(COLORS)} {obj}"
    h, p = hero, pal
    opening = c((
        f"Once upon a time, there was {_a(h.trait)} {h.kind} named {h.name}.",
        f"{c(TIMES)}, {_a(h.trait)} {h.kind} named {h.name} went to the {place}.",
        f"{h.name} was {_a(h.trait)} {h.kind} who lived near the {place}.",
        f"There once lived {_a(h.trait)} {h.kind}. {_cap(h.his)} name was {h.name}.",
    ))
    likes = c((
        f"{_cap(h.he)} loved {h.his} {thing} more than anything.",
        f"{_cap(h.he)} had {_a(thing)} that {h.he} carried everywhere.",
        f"Every day, {h.he} played with {h.his} {thing}.",
    ))
    plot = rng.randrange(5)
    lines = [opening, likes]
    if plot == 0:  # lost and found
        lines += [
            f"{c(TIMES)}, {h.name} went to the {c(PLACES)} with {h.his} {obj}.",
            f"{_cap(h.he)} {c(ACTIVITIES)}. When {h.he} looked down, the {obj} was gone!",
            f"{h.name} felt {c(FEELINGS_BAD)}. \"Where is my {obj}?\" {h.he} {c(ASK)}.",
            f"{_cap(_a(p.trait))} {p.kind} named {p.name} came by. \"I will help you look,\" {p.name} said.",
            f"They looked {c(HIDING)}. Then they looked {c(HIDING)}.",
            f"At last, {p.name} found the {obj} {c(HIDING)}!",
            f"{h.name} was so {c(FEELINGS_GOOD)}. \"Thank you, {p.name}!\" {h.he} said.",
            f"From that day on, {h.name} and {p.name} were best friends.",
        ]
    elif plot == 1:  # a new friend
        mood = c(FEELINGS_BAD)
        first, then = rng.sample(ACTIVITIES, 2)
        lines += [
            f"At the {place}, {h.he} saw {_a(p.kind)} sitting all alone. It was {p.name}.",
            f"{p.name} looked {mood}. \"Why are you {mood}?\" {h.name} {c(ASK)}.",
            f"\"I have no one to play with,\" {p.name} {c(SAY)}.",
            f"\"You can play with me and my {obj}!\" said {h.name}.",
            f"So they {first} and then they {then}.",
            f"When the sun went down, {p.name} was not {mood} anymore. {_cap(p.he)} was {c(FEELINGS_GOOD)}.",
            f"{h.name} learned that {c(MORALS)}.",
        ]
    elif plot == 2:  # weather spoils a plan
        plan = c(ACTIVITIES)
        lines += [
            f"{c(TIMES)}, {h.name} wanted to go to the {place}. {_cap(h.he)} wanted to play there all day.",
            f"But then {c(WEATHER)}. {h.name} had to stay inside.",
            f"{_cap(h.he)} felt {c(FEELINGS_BAD)} and looked out of the window.",
            f"{c(FAMILY)} {c(SAY)}, \"Let us have fun inside!\" So they {c(INDOORS)}.",
            f"Soon {h.name} was laughing. Staying home was fun too.",
            f"The next day the sky was clear, and {h.name} went to the {place} and {plan}.",
        ]
    elif plot == 3:  # sharing
        lines += [
            f"One day, {p.name} the {p.kind} saw the {obj}. \"Can I play with it?\" {p.he} asked.",
            f"\"No, it is mine!\" said {h.name}. {p.name} felt {c(FEELINGS_BAD)} and walked away.",
            f"{h.name} played alone, but it was not fun. {_cap(h.he)} felt {c(FEELINGS_BAD)} too.",
            f"{_cap(h.he)} ran to {p.name} and said, \"I am sorry. Let us play together.\"",
            f"They took turns with the {obj}. Then they {c(ACTIVITIES)}.",
            f"Both friends were {c(FEELINGS_GOOD)}. {h.name} learned that {c(MORALS)}.",
        ]
    else:  # a small adventure
        found = f"{c(THING_ADJ)} {c(OBJECTS)}"
        lines += [
            f"{c(TIMES)}, {h.name} walked to the {c(PLACES)} to look for something new.",
            f"{_cap(h.he)} found {_a(found)} {c(HIDING)}.",
            f"\"What is this?\" {h.he} {c(ASK)}. {_cap(h.he)} was very {c(('curious', 'surprised', 'excited'))}.",
            f"{_cap(h.he)} took it to {p.name} the {p.kind}, and together they {c(ACTIVITIES)}.",
            f"When it was time to go home, {h.name} told {c(FAMILY)} all about {h.his} day.",
            f"{c(FAMILY)} smiled and said, \"What a wonderful adventure!\"",
        ]
    if rng.random() < 0.25:
        lines.append("The end.")
    # paragraphs of 2-3 sentences, like simple picture books
    paras, i = [], 0
    while i < len(lines):
        step = rng.choice((2, 3))
        paras.append(" ".join(lines[i:i + step]))
        i += step
    return "\n\n".join(paras)


# --------------------------------------------------------------------------- arithmetic

ITEMS = "apples marbles stickers pencils cookies cards stamps shells crayons balloons books toy cars".split(" ")
FOODS = "muffins cupcakes cookies pies rolls".split()


def _calc(expr: str) -> tuple[int, str]:
    """Evaluate an integer expression and render it GSM8K-style: `12*3 = <<12*3=36>>36`."""
    value = eval(expr, {"__builtins__": {}})  # our own generated digits and operators only
    value = int(value) if float(value).is_integer() else value
    return value, f"{expr} = <<{expr}={value}>>{value}"


def _math(rng: random.Random) -> dict[str, Any]:
    r, c = rng.randint, rng.choice
    h = _Hero(rng, "kid")
    n, he, his = h.name, h.he, h.his
    t = rng.randrange(10)
    if t == 0:
        a, b, k, item = r(2, 30), r(2, 9), r(2, 12), c(ITEMS)
        v1, s1 = _calc(f"{b}*{k}")
        v2, s2 = _calc(f"{a}+{v1}")
        q = f"{n} has {a} {item}. {_cap(he)} buys {b} packs with {k} {item} in each pack. How many {item} does {n} have now?"
        steps = [f"The packs hold {s1} {item}.", f"{n} has {s2} {item} now."]
    elif t == 1:
        p, k = r(2, 15), r(2, 6)
        bill = c([b for b in (20, 50, 100) if b >= p * k] or [100])
        v1, s1 = _calc(f"{p}*{k}")
        v2, s2 = _calc(f"{bill}-{v1}")
        q = f"{_cap(_a(c(OBJECTS)))} costs ${p}. {n} buys {k} of them and pays with a ${bill} bill. How much change does {he} get?"
        steps = [f"{_cap(he)} spends {s1} dollars.", f"{_cap(his)} change is {s2} dollars."]
    elif t == 2:
        k, m = r(2, 8), r(3, 12)
        e = r(1, m - 1)
        food = c(FOODS)
        v1, s1 = _calc(f"{k * m}/{k}")
        v2, s2 = _calc(f"{v1}-{e}")
        q = f"{n} shares {k * m} {food} equally among {k} friends. Each friend eats {e} of them. How many {food} does each friend have left?"
        steps = [f"Each friend gets {s1} {food}.", f"After eating, each friend has {s2} {food} left."]
    elif t == 3:
        p, d = r(5, 30), r(2, 9)
        total = p * d + r(10, 120)
        v1, s1 = _calc(f"{p}*{d}")
        v2, s2 = _calc(f"{total}-{v1}")
        q = f"A book has {total} pages. {n} reads {p} pages every day for {d} days. How many pages are left to read?"
        steps = [f"{n} reads {s1} pages.", f"There are {s2} pages left."]
    elif t == 4:
        a = r(10, 40)
        b, k = r(1, a - 1), r(1, 20)
        animal = c(("birds", "ducks", "frogs", "bees", "squirrels"))
        v1, s1 = _calc(f"{a}-{b}")
        v2, s2 = _calc(f"{v1}+{k}")
        q = f"There are {a} {animal} in the {c(PLACES)}. {b} of them go away, and then {k} more come. How many {animal} are there now?"
        steps = [f"After {b} leave there are {s1} {animal}.", f"When {k} more come there are {s2} {animal}."]
    elif t == 5:
        trays, per = r(2, 6), r(6, 24)
        g = r(1, trays * per - 1)
        food = c(FOODS)
        v1, s1 = _calc(f"{trays}*{per}")
        v2, s2 = _calc(f"{v1}-{g}")
        q = f"{n} bakes {trays} trays of {food} with {per} {food} on each tray. {_cap(he)} gives away {g} {food}. How many {food} does {he} keep?"
        steps = [f"{_cap(he)} bakes {s1} {food}.", f"{_cap(he)} keeps {s2} {food}."]
    elif t == 6:
        s, w = r(2, 25), r(2, 12)
        x = r(1, s * w - 1)
        v1, s1 = _calc(f"{s}*{w}")
        v2, s2 = _calc(f"{v1}-{x}")
        q = f"{n} saves ${s} every week for {w} weeks. Then {he} spends ${x} on {_a(c(OBJECTS))}. How much money does {he} have left?"
        steps = [f"{_cap(he)} saves {s1} dollars.", f"{_cap(he)} has {s2} dollars left."]
    elif t == 7:
        rows, per = r(2, 12), 2 * r(2, 10)
        v1, s1 = _calc(f"{rows}*{per}")
        v2, s2 = _calc(f"{v1}/2")
        q = f"{n} plants {rows} rows of flowers with {per} flowers in each row. Half of the flowers are red. How many red flowers are there?"
        steps = [f"There are {s1} flowers.", f"Half of them, {s2}, are red."]
    elif t == 8:
        a, b, y = r(3, 12), r(1, 9), r(1, 10)
        v1, s1 = _calc(f"{a}+{b}")
        v2, s2 = _calc(f"{v1}+{y}")
        q = f"{n} is {a} years old. {_cap(his)} sister is {b} years older. How old will {his} sister be in {y} years?"
        steps = [f"{_cap(his)} sister is {s1} years old now.", f"In {y} years she will be {s2} years old."]
    else:
        speed, hours, days = r(2, 6), r(1, 4), r(2, 7)
        v1, s1 = _calc(f"{speed}*{hours}")
        v2, s2 = _calc(f"{v1}*{days}")
        q = f"{n} walks {speed} miles every hour. {_cap(he)} walks for {hours} hours each day. How many miles does {he} walk in {days} days?"
        steps = [f"Each day {he} walks {s1} miles.", f"In {days} days {he} walks {s2} miles."]
    answer_text = "\n".join(steps) + f"\n#### {v2}"
    return {"question": q, "answer_text": answer_text, "answer": v2}


def _tool_parts(answer_text: str) -> list[dict[str, str]]:
    """Split `<<expr=value>>` annotations into python / python_output parts (as nanochat's
    GSM8K task does), leaving the surrounding prose as text parts."""
    parts: list[dict[str, str]] = []
    rest = answer_text
    while "<<" in rest:
        before, _, tail = rest.partition("<<")
        inner, _, rest = tail.partition(">>")
        expr, _, value = inner.rpartition("=")
        if before:
            parts.append({"type": "text", "text": before})
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": value})
    if rest:
        parts.append({"type": "text", "text": rest})
    return parts


# --------------------------------------------------------------------------- dialogues

def _small_talk(rng: random.Random) -> tuple[str, str]:
    c = rng.choice
    animal = c(sorted(SOUNDS))
    leg_animal, home_animal = c(sorted(LEGS)), c(sorted(HOMES))
    legs = LEGS[leg_animal]
    pairs = (
        (c(("Hi!", "Hello!", "Hey there!", "Good morning!")), c(("Hello! How can I help you today?",
                                                              "Hi! What would you like to talk about?"))),
        ("What is your name?", "I am flaxchat, a small language model. I like stories and simple math."),
        ("How are you?", c(("I am doing well, thank you! How are you?", "I am great. What can I do for you?"))),
        (c(("Thank you!", "Thanks a lot!")), c(("You are welcome!", "Happy to help!"))),
        (f"What sound does {_a(animal)} make?", f"{_cap(_a(animal))} says \"{SOUNDS[animal]}\"."),
        (f"How many legs does {_a(leg_animal)} have?",
         f"{_cap(_a(leg_animal))} has {legs} legs." if legs else f"{_cap(_a(leg_animal))} has no legs."),
        (f"Where does {_a(home_animal)} live?", f"{_cap(_a(home_animal))} lives {HOMES[home_animal]}."),
        ("What color is the sky on a sunny day?", "On a sunny day the sky is blue."),
        (f"Can you give me a word that means {c(FEELINGS_GOOD)}?",
         f"Sure! You could say {c(('cheerful', 'glad', 'delighted', 'pleased'))}."),
        (f"What can I do at the {c(PLACES)}?", f"You could {c(PLAY_IDEAS)}. That is a lot of fun!"),
    )
    return c(pairs)


def _exchange(rng: random.Random, tools: bool) -> tuple[str, Any]:
    """One user turn and the assistant's reply (a string, or a list of parts with tool use)."""
    kind = rng.random()
    if tools and kind < 0.35:
        prob = _math(rng)
        return prob["question"], _tool_parts(prob["answer_text"])
    if tools and kind < 0.55:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op, word = rng.choice((("+", "plus"), ("-", "minus"), ("*", "times")))
        expr = f"{a}{op}{b}"
        value = eval(expr, {"__builtins__": {}})
        ask = rng.choice((f"What is {a} {word} {b}?", f"Can you compute {a} {word} {b}?", f"Calculate {expr}."))
        return ask, [{"type": "text", "text": "Let me calculate that. "},
                     {"type": "python", "text": expr}, {"type": "python_output", "text": str(value)},
                     {"type": "text", "text": f"{a} {word} {b} is {value}."}]
    if kind < 0.75:
        animal = rng.choice(ANIMALS)
        ask = rng.choice((f"Tell me a story about {_a(animal)}.", f"Can you write a short story about {_a(animal)}?",
                          f"I want a bedtime story about {_a(animal)}, please."))
        return ask, _story(rng, kind=animal)
    return _small_talk(rng)


def _conversation(rng: random.Random, tools: bool = True) -> dict[str, Any]:
    messages = []
    for _ in range(2 if rng.random() < 0.3 else 1):
        user, assistant = _exchange(rng, tools)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def _dialogue_text(rng: random.Random) -> str:
    convo = _conversation(rng, tools=False)
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in convo["messages"])


# --------------------------------------------------------------------------- public API

def _generate(tag: str, seed: int, n: int, make: Callable[[random.Random], Any]) -> list[Any]:
    rng = random.Random(f"flaxchat-demo-{tag}-v{CORPUS_VERSION}-{int(seed)}")
    return [make(rng) for _ in range(int(n))]


def _document(rng: random.Random) -> str:
    u = rng.random()
    if u < 0.65:
        return _story(rng)
    if u < 0.85:
        prob = _math(rng)
        return f"{prob['question']}\n{prob['answer_text']}"
    return _dialogue_text(rng)


def generate_documents(seed: int, n: int) -> list[str]:
    """`n` pretraining documents: ~65% stories, ~20% worked word problems, ~15% dialogues."""
    return _generate("docs", seed, n, _document)


def generate_conversations(seed: int, n: int) -> list[dict[str, Any]]:
    """`n` conversations in nanochat's format; arithmetic replies use python tool parts."""
    return _generate("conv", seed, n, _conversation)


def generate_math_problems(seed: int, n: int) -> list[dict[str, Any]]:
    """`n` word problems: {question, answer_text (GSM8K style), answer (the #### number)}."""
    return _generate("math", seed, n, _math)


def write_demo_shards(out_dir: str, seed: int, n_docs: int, n_val_docs: int,
                      docs_per_row_group: int = 1024, row_groups_per_shard: int = 8) -> list[str]:
    """Write the demo corpus as parquet shards with one `text` column; the LAST shard is the
    validation split (nanochat's convention). The directory is built beside `out_dir` and
    renamed into place, so a reader sees all shards or none. Returns the shard paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if n_docs < 1 or n_val_docs < 1:
        raise ValueError(f"write_demo_shards needs n_docs >= 1 and n_val_docs >= 1, got {n_docs}, {n_val_docs}")
    docs = generate_documents(seed, n_docs + n_val_docs)
    per_shard = docs_per_row_group * row_groups_per_shard
    train, val = docs[:n_docs], docs[n_docs:]
    chunks = [train[i:i + per_shard] for i in range(0, n_docs, per_shard)] + [val]
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{uuid.uuid4().hex[:12]}")
    os.makedirs(tmp)
    names = [f"shard_{i:05d}.parquet" for i in range(len(chunks))]
    try:
        for name, chunk in zip(names, chunks):
            table = pa.table({"text": pa.array(chunk, type=pa.string())})
            pq.write_table(table, os.path.join(tmp, name), row_group_size=docs_per_row_group)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)  # an older/partial copy; ours is complete
        os.rename(tmp, out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not all(os.path.exists(os.path.join(out_dir, nm)) for nm in names):
            raise
        # another process published the same deterministic shards first: use theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [os.path.join(out_dir, name) for name in names]
