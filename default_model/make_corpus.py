"""Generate the training text of the embedded default model from a small grammar.

Everything the model learns comes from this file: short stories about a village, calendar dates,
arithmetic, structured records, and question/answer dialogues in the chat format. The text is
written by this program (seeded, so it is reproducible), not copied from anywhere.
"""

from __future__ import annotations

import random
from pathlib import Path

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
MONTH_DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
PEOPLE = ["the farmer", "the baker", "the teacher", "the old sailor", "the young painter", "the miller",
          "the doctor", "the shepherd", "the weaver", "the blacksmith", "the clerk", "the gardener"]
NAMES = ["Ada", "Boris", "Clara", "Dmitri", "Elena", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Karla",
         "Lukas", "Mira", "Nils", "Olga", "Pavel", "Rosa", "Stefan", "Tilda", "Viktor"]
CITIES = ["Lima", "Oslo", "Riga", "Turin", "Porto", "Ghent", "Bergen", "Krakow", "Lyon", "Split", "Tartu"]
PLACES = ["the market", "the river", "the mill", "the harbour", "the old bridge", "the school",
          "the forest", "the church", "the bakery", "the square"]
THINGS = ["apples", "pears", "loaves of bread", "candles", "eggs", "fish", "baskets", "books", "plums",
          "jars of honey", "bottles of milk", "sacks of flour"]
COLOURS = ["red", "green", "yellow", "brown", "white", "blue"]
WEATHER = ["it was raining", "the sun was shining", "a cold wind was blowing", "the sky was grey",
           "snow was falling", "the air was warm"]
FEELINGS = ["happy", "tired", "hungry", "pleased", "worried", "calm"]
NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]
OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}

END = "<|endoftext|>"


def story(r: random.Random) -> str:
    who = r.choice(PEOPLE)
    n = r.randint(2, 12)
    colour = r.choice(COLOURS)
    thing = r.choice(THINGS)
    place, other = r.sample(PLACES, 2)
    sentences = [
        f"On {r.choice(DAYS)} {who} walked to {place}.",
        f"{r.choice(WEATHER).capitalize()}.",
        f"At {place} {who} bought {NUMBER_WORDS[n]} {colour} {thing}.",
        f"Then {who} went to {other} and felt {r.choice(FEELINGS)}.",
    ]
    if r.random() < 0.5:
        sentences.append(f"In the evening {who} gave {NUMBER_WORDS[r.randint(1, n)]} {thing} to {r.choice(NAMES)}.")
    return " ".join(sentences)


def date_line(r: random.Random) -> str:
    m = r.randrange(12)
    day = r.randint(1, MONTH_DAYS[m])
    year = r.randint(1850, 2030)
    event = r.choice(["the market opened", "the bridge was finished", "the school was built",
                      "a letter arrived", "the river froze", "the mill burned"])
    return f"On {day} {MONTHS[m]} {year} {event}. The next month was {MONTHS[(m + 1) % 12]}."


def arithmetic(r: random.Random) -> tuple[str, str]:
    op = r.choice(list(OPS))
    a, b = r.randint(0, 20), r.randint(0, 20)
    if op == "minus" and b > a:
        a, b = b, a
    if op == "times":
        a, b = r.randint(0, 9), r.randint(0, 9)
    return f"What is {a} {op} {b}?", f"{a} {op} {b} is {OPS[op](a, b)}."


def record(r: random.Random) -> str:
    return (f"name: {r.choice(NAMES)}; city: {r.choice(CITIES)}; age: {r.randint(18, 90)}; "
            f"born: {r.randint(1, 28)} {r.choice(MONTHS)} {r.randint(1930, 2005)}.")


def question(r: random.Random) -> tuple[str, str]:
    kind = r.randrange(4)
    if kind == 0:
        return arithmetic(r)
    if kind == 1:
        i = r.randrange(7)
        return f"What day comes after {DAYS[i]}?", f"After {DAYS[i]} comes {DAYS[(i + 1) % 7]}."
    if kind == 2:
        m = r.randrange(12)
        return f"How many days are in {MONTHS[m]}?", f"{MONTHS[m]} has {MONTH_DAYS[m]} days."
    name, city = r.choice(NAMES), r.choice(CITIES)
    return f"Where does {name} live?", f"{name} lives in {city}."


def chat(r: random.Random) -> str:
    q, a = question(r)
    return f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"


def document(r: random.Random) -> str:
    kind = r.random()
    if kind < 0.35:
        return " ".join(story(r) for _ in range(r.randint(1, 3)))
    if kind < 0.5:
        return "\n".join(date_line(r) for _ in range(r.randint(1, 4)))
    if kind < 0.65:
        return "\n".join(" ".join(arithmetic(r)[1:]) for _ in range(r.randint(2, 6)))
    if kind < 0.75:
        return "\n".join(record(r) for _ in range(r.randint(1, 4)))
    return "".join(chat(r) for _ in range(r.randint(1, 3)))


def make_corpus(n_chars: int, seed: int) -> str:
    r = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < n_chars:
        doc = document(r) + END
        parts.append(doc)
        size += len(doc)
    return "".join(parts)


if __name__ == "__main__":
    out = Path(__file__).with_name("corpus_sample.txt")
    out.write_text(make_corpus(20_000, seed=1))
    print(f"wrote {out}")
