"""Sentences for calibrating, distilling and evaluating text encoders (``gblr compress``).

    train, evaluation = split_sentences(None, 512, 256)        # generated, disjoint
    train, evaluation = split_sentences(read_sentences("my.txt"), 512, 256)

The corpus is written here (templates and word lists, no download), so calibration and
evaluation data are reproducible everywhere; :func:`read_sentences` takes a user's own text
instead. Needs only the standard library.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable
from pathlib import Path

__all__ = ["generated_sentences", "read_sentences", "split_sentences"]


# -- a small English corpus, generated --------------------------------------------------------------

# Per topic: who acts, what they do (base, 3rd person present, past), to what, how it is, where.
_TOPICS: dict[str, dict[str, list]] = {
    "science": {
        "agents": ["researcher", "chemist", "biologist", "physicist", "student", "lab assistant", "geologist",
                   "astronomer"],
        "verbs": [("measure", "measures", "measured"), ("study", "studies", "studied"), ("test", "tests", "tested"),
                  ("observe", "observes", "observed"), ("analyse", "analyses", "analysed"),
                  ("record", "records", "recorded"), ("heat", "heats", "heated")],
        "things": ["sample", "crystal", "microscope slide", "bacteria culture", "magnetic field", "chemical reaction",
                   "telescope image", "rock layer", "protein", "solution"],
        "qualities": ["unusual", "stable", "radioactive", "microscopic", "surprising", "fragile", "dense", "cold"],
        "places": ["in the laboratory", "under the microscope", "at the observatory", "near the volcano",
                   "in a sealed chamber", "at the university"],
    },
    "cooking": {
        "agents": ["chef", "baker", "grandmother", "cook", "waiter", "home cook", "pastry chef"],
        "verbs": [("bake", "bakes", "baked"), ("chop", "chops", "chopped"), ("taste", "tastes", "tasted"),
                  ("stir", "stirs", "stirred"), ("season", "seasons", "seasoned"), ("roast", "roasts", "roasted"),
                  ("serve", "serves", "served")],
        "things": ["bread", "soup", "tomato sauce", "chocolate cake", "onion", "roast chicken", "pasta", "salad",
                   "lemon tart", "curry", "dough"],
        "qualities": ["spicy", "fresh", "crispy", "sweet", "salty", "warm", "homemade", "delicious"],
        "places": ["in the kitchen", "at the bakery", "on the stove", "in a small restaurant", "at the market",
                   "in the oven"],
    },
    "travel": {
        "agents": ["traveller", "tourist", "pilot", "guide", "backpacker", "family", "driver", "passenger"],
        "verbs": [("visit", "visits", "visited"), ("book", "books", "booked"), ("explore", "explores", "explored"),
                  ("photograph", "photographs", "photographed"), ("miss", "misses", "missed"),
                  ("cross", "crosses", "crossed"), ("pack", "packs", "packed")],
        "things": ["train", "museum", "old bridge", "mountain pass", "hotel room", "ferry", "suitcase", "map",
                   "harbour", "castle", "night bus"],
        "qualities": ["crowded", "quiet", "expensive", "famous", "remote", "ancient", "cheap", "beautiful"],
        "places": ["in Lisbon", "near the border", "at the airport", "on the coast", "in the mountains",
                   "at the station", "in a small village"],
    },
    "sport": {
        "agents": ["striker", "coach", "goalkeeper", "runner", "swimmer", "referee", "team captain", "cyclist"],
        "verbs": [("win", "wins", "won"), ("lose", "loses", "lost"), ("train for", "trains for", "trained for"),
                  ("watch", "watches", "watched"), ("score in", "scores in", "scored in"),
                  ("prepare for", "prepares for", "prepared for")],
        "things": ["match", "final", "marathon", "race", "tournament", "penalty shootout", "relay", "season opener",
                   "championship"],
        "qualities": ["exciting", "difficult", "close", "long", "decisive", "muddy", "historic", "tense"],
        "places": ["at the stadium", "on the track", "in the pool", "on home ground", "in the rain",
                   "at the national arena"],
    },
    "finance": {
        "agents": ["investor", "bank", "accountant", "trader", "small business", "pension fund", "analyst",
                   "central bank"],
        "verbs": [("buy", "buys", "bought"), ("sell", "sells", "sold"), ("review", "reviews", "reviewed"),
                  ("reduce", "reduces", "reduced"), ("approve", "approves", "approved"),
                  ("forecast", "forecasts", "forecast")],
        "things": ["shares", "loan", "interest rate", "budget", "quarterly report", "bond", "mortgage", "invoice",
                   "tax return", "exchange rate"],
        "qualities": ["risky", "profitable", "volatile", "modest", "overdue", "unexpected", "annual", "large"],
        "places": ["on the stock market", "at the bank", "in the annual meeting", "at the branch office",
                   "in the financial district", "on the trading floor"],
    },
    "weather": {
        "agents": ["forecaster", "farmer", "sailor", "meteorologist", "weather station", "pilot", "hiker"],
        "verbs": [("predict", "predicts", "predicted"), ("expect", "expects", "expected"),
                  ("report", "reports", "reported"), ("fear", "fears", "feared"), ("track", "tracks", "tracked"),
                  ("notice", "notices", "noticed")],
        "things": ["storm", "heavy rain", "fog", "heatwave", "snowfall", "strong wind", "frost", "thunderstorm",
                   "drought", "hail"],
        "qualities": ["sudden", "severe", "mild", "unusual", "freezing", "humid", "seasonal", "light"],
        "places": ["over the valley", "along the coast", "in the north", "across the plains", "over the sea",
                   "in the city"],
    },
    "technology": {
        "agents": ["engineer", "programmer", "startup", "technician", "designer", "user", "developer",
                   "support team"],
        "verbs": [("update", "updates", "updated"), ("install", "installs", "installed"), ("fix", "fixes", "fixed"),
                  ("design", "designs", "designed"), ("debug", "debugs", "debugged"),
                  ("release", "releases", "released"), ("replace", "replaces", "replaced")],
        "things": ["laptop", "software update", "database", "smartphone app", "network cable", "server", "battery",
                   "web browser", "password manager", "printer"],
        "qualities": ["slow", "secure", "outdated", "wireless", "broken", "open source", "powerful", "tiny"],
        "places": ["in the data centre", "at the office", "on the cloud platform", "in the repair shop",
                   "at home", "in the basement"],
    },
    "health": {
        "agents": ["doctor", "nurse", "patient", "pharmacist", "surgeon", "physiotherapist", "dentist"],
        "verbs": [("examine", "examines", "examined"), ("treat", "treats", "treated"),
                  ("prescribe", "prescribes", "prescribed"), ("check", "checks", "checked"),
                  ("monitor", "monitors", "monitored"), ("recommend", "recommends", "recommended")],
        "things": ["blood pressure", "vaccine", "broken arm", "headache", "diet", "medicine", "sleep schedule",
                   "knee injury", "heart rate", "fever"],
        "qualities": ["healthy", "painful", "chronic", "mild", "regular", "balanced", "serious", "minor"],
        "places": ["at the clinic", "in the hospital", "at the pharmacy", "in the waiting room",
                   "at the health centre", "in the emergency ward"],
    },
    "history": {
        "agents": ["historian", "king", "archaeologist", "soldier", "merchant", "monk", "explorer", "queen"],
        "verbs": [("discover", "discovers", "discovered"), ("build", "builds", "built"), ("defend", "defends", "defended"),
                  ("describe", "describes", "described"), ("restore", "restores", "restored"),
                  ("conquer", "conquers", "conquered")],
        "things": ["fortress", "manuscript", "empire", "treaty", "temple", "trade route", "coin", "city wall",
                   "battle plan", "tomb"],
        "qualities": ["medieval", "forgotten", "powerful", "ruined", "sacred", "royal", "ancient", "famous"],
        "places": ["in the old capital", "along the river", "during the siege", "in the desert", "on the island",
                   "in the archives"],
    },
    "nature": {
        "agents": ["gardener", "fox", "park ranger", "beekeeper", "fisherman", "owl", "child", "volunteer"],
        "verbs": [("plant", "plants", "planted"), ("find", "finds", "found"), ("follow", "follows", "followed"),
                  ("feed", "feeds", "fed"), ("protect", "protects", "protected"), ("water", "waters", "watered")],
        "things": ["oak tree", "river", "flower bed", "nest", "honey", "forest path", "pond", "rabbit", "seedling",
                   "wild mushroom"],
        "qualities": ["green", "tall", "hidden", "wild", "colourful", "young", "peaceful", "rare"],
        "places": ["in the garden", "by the lake", "in the forest", "on the hill", "in the meadow",
                   "near the farm"],
    },
    "music": {
        "agents": ["pianist", "singer", "band", "conductor", "composer", "drummer", "violinist", "choir"],
        "verbs": [("play", "plays", "played"), ("rehearse", "rehearses", "rehearsed"), ("compose", "composes", "composed"),
                  ("perform", "performs", "performed"), ("tune", "tunes", "tuned"), ("record", "records", "recorded")],
        "things": ["song", "symphony", "guitar", "melody", "concert", "album", "old piano", "chorus", "waltz"],
        "qualities": ["loud", "gentle", "beautiful", "new", "sad", "lively", "famous", "short"],
        "places": ["at the concert hall", "in the studio", "on the radio", "at the festival", "in the church",
                   "on stage"],
    },
    "education": {
        "agents": ["teacher", "pupil", "professor", "librarian", "tutor", "headmaster", "class"],
        "verbs": [("explain", "explains", "explained"), ("read", "reads", "read"), ("grade", "grades", "graded"),
                  ("write", "writes", "wrote"), ("discuss", "discusses", "discussed"), ("learn", "learns", "learned")],
        "things": ["lesson", "essay", "history book", "exam", "homework", "poem", "geometry problem", "lecture",
                   "spelling test", "timetable"],
        "qualities": ["difficult", "boring", "interesting", "long", "clear", "final", "short", "careful"],
        "places": ["in the classroom", "at the library", "at school", "in the lecture hall", "at the kitchen table",
                   "after class"],
    },
}

_TIMES = ["yesterday", "last week", "this morning", "every summer", "on Monday", "after lunch", "in the evening",
          "two years ago", "at dawn", "before the holidays", "last night", "every day", "in early spring",
          "on a cold afternoon", "during the weekend", "recently"]
_ADVERBS = ["carefully", "quickly", "slowly", "proudly", "quietly", "happily", "reluctantly", "eagerly",
            "patiently", "suddenly"]
_FEELINGS = ["happy", "worried", "surprised", "tired", "excited", "disappointed", "relieved", "curious",
             "nervous", "confident"]
_MODALS = ["should", "could", "might", "must", "will", "would"]
_OPINIONS = ["Many people believe that", "It is often said that", "Experts agree that", "Some argue that",
             "Nobody expected that", "It turned out that", "Everyone knows that", "A recent survey showed that"]
_BECAUSE = ["because it was late", "because the weather changed", "since nobody else could do it",
            "although it took longer than planned", "even though the budget was small",
            "so that everyone could see the result", "before anyone noticed", "while the others were waiting"]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _capitalise(text: str) -> str:
    return text[0].upper() + text[1:]


def _noun(rng: random.Random, topic: dict, *, quality: float = 0.5) -> str:
    """``the [quality] thing`` (or ``a``/``an``), sometimes with a quality."""
    thing = rng.choice(topic["things"])
    if rng.random() < quality:
        thing = f"{rng.choice(topic['qualities'])} {thing}"
    determiner = rng.choice(["the", "the", "this", _article(thing)])
    return f"{determiner} {thing}"


def _sentence(rng: random.Random) -> str:
    topic = _TOPICS[rng.choice(sorted(_TOPICS))]
    agent, agent2 = rng.choice(topic["agents"]), rng.choice(topic["agents"])
    base, present, past = rng.choice(topic["verbs"])
    base2, present2, past2 = rng.choice(topic["verbs"])
    place, time_ = rng.choice(topic["places"]), rng.choice(_TIMES)
    quality, thing = rng.choice(topic["qualities"]), rng.choice(topic["things"])
    noun, noun2 = _noun(rng, topic), _noun(rng, topic)
    shape = rng.randrange(14)
    if shape == 0:
        text = f"The {agent} {past} {noun} {place} {time_}."
    elif shape == 1:
        text = f"{_capitalise(time_)}, the {agent} {rng.choice(_ADVERBS)} {past} {noun}."
    elif shape == 2:
        text = f"Why did the {agent} {base} {noun} {place}?"
    elif shape == 3:
        text = f"{_capitalise(rng.choice(['please', 'always', 'never']))} {base} {noun} {place}."
    elif shape == 4:
        text = f"The {agent} {past} {noun}, and then the {agent2} {past2} {noun2} {place}."
    elif shape == 5:
        text = f"The {thing} was {quality} {time_}."
    elif shape == 6:
        text = f"{rng.choice(_OPINIONS)} {_article(agent)} {agent} {rng.choice(_MODALS)} {base} {noun} {place}."
    elif shape == 7:
        text = f"According to the {agent}, the {thing} {place} was {quality} {time_}."
    elif shape == 8:
        text = f"If {noun} is {quality}, the {agent} will {base2} it {place}."
    elif shape == 9:
        text = f"What {_article(quality)} {quality} {thing} the {agent} {past} {place}!"
    elif shape == 10:
        text = (f"The {agent} felt {rng.choice(_FEELINGS)} {rng.choice(_BECAUSE)}, so the {agent2} "
                f"{past2} {noun2} {time_}.")
    elif shape == 11:
        text = f"Every {agent} {present} {noun} {place}, {rng.choice(_BECAUSE)}."
    elif shape == 12:
        text = (f"Have you ever seen {_article(agent)} {agent} {base} {noun} {place} {time_}, "
                f"while the {agent2} {present2} {noun2}?")
    else:
        text = (f"{_capitalise(time_)}, {_article(agent)} {rng.choice(_FEELINGS)} {agent} {past} {noun} "
                f"{place}, and the {agent2} {rng.choice(_ADVERBS)} {past2} {noun2} {rng.choice(_BECAUSE)}.")
    return text


def generated_sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` English sentences of 6 to 30 words on a dozen topics (science, cooking, travel,
    sport, finance, weather, technology, health, history, nature, music, education), in 14
    shapes (statements, questions, commands, exclamations, compound and conditional sentences).

    Deterministic in ``seed`` (Python's ``random.Random``, independent of torch's state); 2000
    sentences are nearly all distinct, and different seeds give different sentences.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    rng = random.Random(f"gblr-sentences-{seed}")
    sentences = []
    while len(sentences) < count:
        text = _sentence(rng)
        if 6 <= len(text.split()) <= 30:
            sentences.append(text)
    return sentences


# -- sentences from a file ----------------------------------------------------------------------------

# A sentence ends at . ! or ? (and closing quotes or brackets) followed by white space and what
# looks like the start of the next sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def read_sentences(path: str | os.PathLike) -> list[str]:
    """The sentences of a UTF-8 text file: one per non-empty line, with lines that hold several
    sentences (paragraphs) split after ``.``, ``!`` or ``?`` followed by a capitalised word.
    White space inside a sentence is collapsed to single spaces."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path} (expected a UTF-8 file with one sentence per line)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error})") from error
    sentences = []
    for line in text.splitlines():
        line = " ".join(line.split())
        if line:
            sentences.extend(part.strip() for part in _SENTENCE_END.split(line) if part.strip())
    if not sentences:
        raise ValueError(f"{path} contains no sentences (it is empty or only white space)")
    return sentences


def split_sentences(sentences: Iterable[str] | None, train: int, evaluation: int, seed: int = 0
                    ) -> tuple[list[str], list[str]]:
    """Disjoint ``(train, evaluation)`` sentence lists (no sentence in both).

    With ``sentences=None`` they are generated (:func:`generated_sentences` with ``seed``,
    duplicates dropped). Otherwise the distinct given sentences are shuffled with ``seed`` and
    split; if there are fewer than ``train + evaluation``, both parts shrink in proportion (each
    keeps at least one sentence).
    """
    for name, value in (("train", train), ("evaluation", evaluation)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} (a number of sentences) must be a positive int, got {value!r}")
    wanted = train + evaluation
    if sentences is None:
        unique: list[str] = []
        count = wanted
        while len(unique) < wanted:
            unique = list(dict.fromkeys(generated_sentences(count, seed)))
            count += wanted - len(unique) + 8
        return unique[:train], unique[train:wanted]
    unique = list(dict.fromkeys(sentences))
    if len(unique) < 2:
        raise ValueError(f"need at least 2 distinct sentences to split into training and evaluation, got {len(unique)}")
    random.Random(seed).shuffle(unique)
    if len(unique) < wanted:
        evaluation = min(len(unique) - 1, max(1, round(len(unique) * evaluation / wanted)))
        train = len(unique) - evaluation
    return unique[:train], unique[train : train + evaluation]

