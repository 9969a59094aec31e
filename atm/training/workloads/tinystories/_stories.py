"""A deterministic generator of TinyStories-style children's stories (templates, word lists, a seeded RNG).

The stories are simple enough for a 1M-parameter model to learn their grammar and plots, and random
enough in names, places and objects that a small corpus is memorised long before it is exhausted:
the point of the workload is a run that clearly overfits.
"""

from __future__ import annotations

import random
from collections.abc import Callable

GIRLS = ["Lily", "Mia", "Sue", "Amy", "Lucy", "Anna", "Emma", "Ella", "Rose", "Kate", "Zoe", "Jane", "Sara",
         "Molly", "Daisy", "Ruby", "Nora", "Ivy", "Tina", "Pam"]
BOYS = ["Tom", "Ben", "Max", "Sam", "Tim", "Jack", "Leo", "Joe", "Bob", "Dan", "Finn", "Jake", "Ned", "Ted",
        "Luke", "Kim", "Ray", "Roy", "Bill", "Pip"]
ANIMALS = ["cat", "dog", "bunny", "bear", "bird", "fox", "frog", "duck", "mouse", "owl", "pig", "lamb",
           "puppy", "kitten", "squirrel", "turtle"]
TRAITS = ["kind", "happy", "curious", "brave", "shy", "silly", "little", "cheerful", "gentle", "playful"]
PLACES = ["park", "garden", "forest", "beach", "farm", "yard", "lake", "meadow", "playground", "hill", "woods",
          "field"]
COLORS = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "shiny", "big", "small", "soft"]
THINGS = ["ball", "kite", "hat", "box", "toy car", "doll", "boat", "drum", "book", "cup", "stone", "shell",
          "bell", "scarf", "truck", "balloon"]
FOODS = ["cookie", "apple", "cake", "sandwich", "banana", "pie", "carrot", "muffin", "pear", "bun"]
ACTIVITIES = ["play with a ball", "run in the grass", "sing songs", "draw pictures", "climb trees",
              "look at the stars", "build sand castles", "jump in puddles", "pick flowers", "read books",
              "dance in the sun", "chase butterflies"]
HIDING = ["under the bed", "behind the tree", "in the tall grass", "next to the door", "under a big leaf",
          "in the old box", "near the pond", "on the high shelf", "behind the fence", "under the bench"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy", "bright"]
FEARS = [("the dark", "dark"), ("the big storm", "loud"), ("the tall slide", "high"), ("the deep water", "deep"),
         ("the old barn", "dark"), ("the loud dog", "loud")]
LESSONS = [
    "It is good to share with friends.",
    "Friends help each other.",
    "It is important to listen to mom.",
    "Being brave is not so hard when you have a friend.",
    "Saying sorry makes things better.",
    "Small things can make someone very happy.",
    "It is fun to try new things.",
    "Kind words make a good day.",
]


class _Person:
    """One character: a name, what it is, and the pronouns to use."""

    def __init__(self, rng: random.Random, exclude: set[str]) -> None:
        girl = rng.random() < 0.5
        pool = [n for n in (GIRLS if girl else BOYS) if n not in exclude]
        self.name = rng.choice(pool)
        self.kind = rng.choice(["girl" if girl else "boy"] * 2 + ANIMALS)
        self.trait = rng.choice(TRAITS)
        self.he, self.him, self.his = ("she", "her", "her") if girl else ("he", "him", "his")

    @property
    def He(self) -> str:  # noqa: N802 - reads like the sentence it builds
        return self.he.capitalize()

    @property
    def His(self) -> str:  # noqa: N802
        return self.his.capitalize()


def _pick(rng: random.Random, *options: str) -> str:
    return rng.choice(options)


def _opening(rng: random.Random, a: _Person) -> list[str]:
    who = f"a {a.trait} {a.kind} named {a.name}" if a.kind in ("girl", "boy") else \
        f"a {a.trait} little {a.kind} named {a.name}"
    first = _pick(rng, f"Once upon a time, there was {who}.", f"One day, there was {who}.",
                  f"There once was {who}.")
    return [first, f"{a.He} loved to {rng.choice(ACTIVITIES)} in the {rng.choice(PLACES)}."]


def _lost_thing(rng: random.Random, a: _Person, b: _Person) -> list[str]:
    thing = f"{rng.choice(COLORS)} {rng.choice(THINGS)}"
    spots = rng.sample(HIDING, 3)
    return [
        f"{a.name} had a {thing}. {a.He} played with it every day.",
        _pick(rng, f"One morning, {a.name} could not find the {thing}.",
              f"But one day, the {thing} was gone."),
        f"{a.name} was very sad. {a.He} looked {spots[0]}, but it was not there.",
        f"{a.He} looked {spots[1]}, but it was not there too.",
        f"Then {a.his} friend {b.name} the {b.kind} came to help.",
        f"\"Let us look {spots[2]},\" said {b.name}.",
        _pick(rng, f"They looked {spots[2]} and there it was!", f"And there was the {thing}, {spots[2]}!"),
        f"{a.name} hugged {b.name}. \"Thank you!\" {a.he} said.",
        f"From that day on, {a.name} and {b.name} played with the {thing} together.",
    ]


def _new_friend(rng: random.Random, a: _Person, b: _Person) -> list[str]:
    food = rng.choice(FOODS)
    place = rng.choice(PLACES)
    return [
        f"One {rng.choice(WEATHER)} day, {a.name} went to the {place}.",
        f"There {a.he} saw a {b.trait} {b.kind} sitting alone.",
        _pick(rng, f"The {b.kind} looked sad.", f"The {b.kind} did not have anyone to play with."),
        f"\"Hello, my name is {a.name}. What is your name?\" asked {a.name}.",
        f"\"My name is {b.name},\" said the {b.kind}.",
        f"{a.name} had a {food} in {a.his} bag. {a.He} gave half of the {food} to {b.name}.",
        f"{b.name} smiled. \"This is yummy!\" {b.he} said.",
        f"Then they played in the {place} all day long.",
        _pick(rng, f"{a.name} was happy to have a new friend.", f"Now {a.name} and {b.name} were best friends."),
    ]


def _warning(rng: random.Random, a: _Person, b: _Person) -> list[str]:
    place = rng.choice(["lake", "hill", "woods", "road", "river", "old tree"])
    mom = _pick(rng, "mom", "dad", "grandma")
    return [
        f"{a.name}'s {mom} said, \"Do not go near the {place} alone.\"",
        f"But {a.name} was {rng.choice(['curious', 'bored', 'silly'])}. {a.He} wanted to see the {place}.",
        f"So {a.he} went to the {place} when no one was looking.",
        _pick(rng, f"At the {place}, {a.name} slipped and fell.", f"At the {place}, {a.name} got lost."),
        f"{a.He} felt scared and started to cry.",
        f"{b.name} the {b.kind} heard {a.him} and ran to get {a.his} {mom}.",
        f"{a.His} {mom} came fast and took {a.him} home.",
        f"\"I am sorry,\" said {a.name}. \"I will listen next time.\"",
        f"{a.His} {mom} gave {a.him} a big hug.",
    ]


def _sharing(rng: random.Random, a: _Person, b: _Person) -> list[str]:
    thing = f"{rng.choice(COLORS)} {rng.choice(THINGS)}"
    return [
        f"{a.name} got a new {thing} for {a.his} birthday.",
        f"{b.name} saw the {thing} and wanted to play with it too.",
        f"\"Can I play with your {thing}?\" asked {b.name}.",
        _pick(rng, f"\"No, it is mine!\" said {a.name}.", f"{a.name} held the {thing} tight and said no."),
        f"{b.name} felt sad and walked away.",
        f"Soon {a.name} was not having fun alone.",
        f"{a.He} ran to {b.name} and said, \"I am sorry. Let us play together.\"",
        f"They took turns with the {thing} and laughed a lot.",
        f"{a.name} learned that sharing is more fun than playing alone.",
    ]


def _fear(rng: random.Random, a: _Person, b: _Person) -> list[str]:
    fear, how = rng.choice(FEARS)
    return [
        f"{a.name} was afraid of {fear}. It was so {how}!",
        f"One night, {a.name} could not sleep because of {fear}.",
        f"{a.He} called {a.his} friend {b.name}.",
        f"\"Do not be scared,\" said {b.name}. \"I will stay with you.\"",
        _pick(rng, f"{b.name} held {a.name}'s hand.", f"{b.name} sang a soft song for {a.name}."),
        f"Little by little, {a.name} felt brave.",
        f"\"{fear.capitalize()} is not so bad,\" {a.he} said with a smile.",
        f"After that, {a.name} was not afraid of {fear} any more.",
    ]


def _baking(rng: random.Random, a: _Person, b: _Person) -> list[str]:
    food = rng.choice(["cake", "pie", "cookies", "bread", "muffins"])
    fruit = rng.choice(["apples", "berries", "bananas", "lemons", "pears"])
    return [
        f"One {rng.choice(WEATHER)} morning, {a.name} wanted to bake {food} with {b.name}.",
        f"They got flour, milk, eggs and some {fruit}.",
        f"{a.name} mixed the flour and {b.name} cut the {fruit}.",
        _pick(rng, "Oops! The flour went everywhere.", "Oh no! An egg fell on the floor."),
        f"{a.name} and {b.name} laughed and cleaned it up.",
        f"They put the {food} in the oven and waited.",
        "Soon the house smelled so good.",
        f"The {food} was warm and sweet. They shared it with everyone.",
    ]


def _discovery(rng: random.Random, a: _Person, b: _Person) -> list[str]:
    thing = f"{rng.choice(COLORS)} {rng.choice(['stone', 'key', 'shell', 'box', 'egg', 'feather'])}"
    spot = rng.choice(HIDING)
    return [
        f"One day, {a.name} found a {thing} {spot}.",
        f"\"What is this?\" {a.he} asked. {a.He} showed it to {b.name}.",
        f"{b.name} looked at the {thing}. \"Maybe it is magic!\" said {b.name}.",
        _pick(rng, f"They made a wish on the {thing}.", f"They held the {thing} and closed their eyes."),
        f"Then a {rng.choice(ANIMALS)} came out of the {rng.choice(PLACES)} and said hello.",
        f"{a.name} and {b.name} were very surprised.",
        "They played with their new friend until the sun went down.",
        f"{a.name} kept the {thing} in a safe place.",
    ]


PLOTS: list[Callable[[random.Random, _Person, _Person], list[str]]] = [
    _lost_thing, _new_friend, _warning, _sharing, _fear, _baking, _discovery,
]


def generate_story(rng: random.Random) -> str:
    """One story of 9 to 14 sentences, as a single paragraph."""
    a = _Person(rng, exclude=set())
    b = _Person(rng, exclude={a.name})
    plot = rng.choice(PLOTS)
    sentences = _opening(rng, a) + plot(rng, a, b)
    if rng.random() < 0.6:
        sentences.append(_pick(rng, "The end.", f"{a.name} had a very good day.", rng.choice(LESSONS)))
    return " ".join(sentences)


def generate_stories(target_bytes: int, seed: int) -> list[str]:
    """Stories from ``random.Random(seed)`` until their total size reaches ``target_bytes``."""
    if target_bytes <= 0:
        raise ValueError(f"target_bytes must be positive, got {target_bytes}")
    rng = random.Random(seed)
    stories: list[str] = []
    total = 0
    while total < target_bytes:
        story = generate_story(rng)
        stories.append(story)
        total += len(story.encode()) + 2  # the blank line that separates stories in text form
    return stories
