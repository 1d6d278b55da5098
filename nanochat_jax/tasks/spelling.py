"""SpellingBee and SimpleSpelling: synthetic tasks that teach a token-level model to see letters.

SpellingBee: "How many <letter> are in <word>?" answered by spelling the word out, counting, then checking with
the python tool, ending in '#### N'. SimpleSpelling: "Spell <word>" answered with the letters. Both are generated
deterministically from a word list: the `english-words` package's when installed, else a built-in list.
"""

from __future__ import annotations

import random

from nanochat_jax.tasks.common import Task, extract_answer, same_number

_FALLBACK_WORDS = """apple banana cherry strawberry raspberry blueberry lemon orange grape melon mississippi
bookkeeper committee balloon letter little happiness address coffee success puzzle pepper tomato potato
banana engineer computer keyboard language transformer attention gradient optimizer parameter tokenizer
elephant giraffe kangaroo crocodile hippopotamus rhinoceros butterfly caterpillar dragonfly grasshopper
mountain river valley ocean island desert forest meadow glacier volcano thunder lightning rainbow sunshine
bicycle airplane helicopter submarine spaceship rocket tractor scooter skateboard umbrella necessary
accommodate embarrass occurrence millennium questionnaire possession broccoli cinnamon vacuum zucchini""".split()

_TEMPLATES = ["How many {l} are in the word {w}?", "How many times does the letter {l} appear in {w}?",
              "Count the letter {l} in \"{w}\".", "how many {l}s are in {w}", "In the word {w}, how many {l} are there?"]


def word_list(max_words: int = 20000) -> list[str]:
    try:
        from english_words import get_english_words_set  # optional data package (see README); fallback below
        words = sorted(w for w in get_english_words_set(["web2"], lower=True, alpha=True) if 3 <= len(w) <= 12)
        rng = random.Random(0)
        rng.shuffle(words)
        return words[:max_words]
    except Exception:  # the package is optional
        return sorted(set(_FALLBACK_WORDS))


class SpellingBee(Task):
    name = "SpellingBee"

    def __init__(self, size=1000, split="train", words=None, **kw):
        super().__init__(**kw)
        self.size, self.words = size, words or word_list()
        self.seed_base = 0 if split == "train" else 10_000_000  # disjoint streams for train and test

    def num_examples(self):
        return self.size

    def get_example(self, index):
        rng = random.Random(self.seed_base + index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        count = word.count(letter)
        spelled = ",".join(word)
        running, n = [], 0
        for ch in word:
            n += ch == letter
            running.append(f"{ch}{'=' + str(n) if ch == letter else ''}")
        parts = [
            {"type": "text", "text": f"Spell it out: {word} = {spelled}\nCount the {letter}: {' '.join(running)}\n"
                                     f"So by hand I count {count}. Let me check with Python:\n\n"},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nThe letter {letter} appears {count} time{'s' if count != 1 else ''} "
                                     f"in {word}.\n\n#### {count}"},
        ]
        user = rng.choice(_TEMPLATES).format(l=letter, w=word)
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation, completion):
        parts = conversation["messages"][-1]["content"]
        reference = extract_answer("".join(p["text"] for p in parts))
        return int(same_number(extract_answer(completion), reference))


class SimpleSpelling(Task):
    name = "SimpleSpelling"

    def __init__(self, size=1000, split="train", words=None, **kw):
        super().__init__(**kw)
        self.size, self.words = size, words or word_list()
        self.seed_base = 1_000_000 if split == "train" else 20_000_000

    def num_examples(self):
        return self.size

    def get_example(self, index):
        rng = random.Random(self.seed_base + index)
        word = rng.choice(self.words)
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": f"{word}:{','.join(word)}"}]}

    def evaluate(self, conversation, completion):
        return int(completion.strip() == conversation["messages"][-1]["content"])
