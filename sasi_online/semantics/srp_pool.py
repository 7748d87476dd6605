"""The SRP example pool and SRP assembly (paper section 3.2 and Appendix B).

An SRP is a system line, `num_examples` (caption → rewrite) pairs drawn from a pool of
100 at random (seeded per image and variant), then the caption to rewrite and "→".
The pool is our own: varied subjects and sentence shapes, written for this project
(only its first two captions are the paper's shown examples). Each entry holds a
caption, a rewrite that keeps its meaning, and an imagined extra clause for the
"expansion" mode, whose examples add something that was not in the caption.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from sasi_online.errors import UserInputError
from sasi_online.utils import derive_seed

ARROW = "→"

# The paper's system lines, word for word (section 3.2 and Appendix B).
SYSTEM_REWRITE = ("You are a helpful, respectful and honest assistant, and you can rewrite "
                  "sentences while retaining their original meaning. I will give you a few "
                  "examples:")
SYSTEM_EXPANSION = ("You are a helpful, respectful and honest assistant. You can expand "
                    "sentences to make them more expressive, and you can imagine "
                    "appropriately. I will give you a few examples:")

MODES = ("rewrite", "expansion", "none")

# (caption, rewrite, expansion clause appended to the caption)
POOL: tuple[tuple[str, str, str], ...] = (
    ("a green python curled up on a branch", "A branch held a coiled green python.",
     "is about to attack a small bird"),
    ("two men posing with a fish on a boat", "On a boat, two men are seen posing with a fish.",
     "with an island looming behind them"),
    ("a red bicycle leaning against a brick wall", "Against a brick wall rests a red bicycle.",
     "while a cat sleeps in the basket"),
    ("a bowl of oranges on a wooden table", "On a wooden table sits a bowl filled with oranges.",
     "next to a knife and a glass of juice"),
    ("a child flying a kite on a beach", "On the beach, a kite is being flown by a child.",
     "as seagulls circle above the waves"),
    ("an old lighthouse on a rocky cliff", "A rocky cliff is topped by an old lighthouse.",
     "with a storm gathering over the sea"),
    ("a black dog running through tall grass", "Through the tall grass runs a black dog.",
     "chasing a yellow ball thrown by its owner"),
    ("a cup of coffee next to an open laptop", "Beside an open laptop stands a cup of coffee.",
     "and a sticky note with a phone number"),
    ("a herd of cows grazing in a green field", "In a green field, a herd of cows is grazing.",
     "while a farmer watches from a tractor"),
    ("a woman reading a book on a park bench", "On a park bench, a woman is reading a book.",
     "as pigeons gather around her feet"),
    ("a yellow taxi stuck in city traffic", "In the city traffic, a yellow taxi is stuck.",
     "and its driver leans out of the window"),
    ("a snowy mountain behind a quiet lake", "Behind a quiet lake rises a snowy mountain.",
     "and a lone canoe drifts near the shore"),
    ("a plate of pasta with tomato sauce", "Pasta covered in tomato sauce fills a plate.",
     "sprinkled with basil leaves and cheese"),
    ("a brown horse standing in a stable", "In the stable stands a brown horse.",
     "munching hay beside a sleeping goat"),
    ("a man repairing a car engine", "A car engine is being repaired by a man.",
     "while his son hands him a wrench"),
    ("three ducks swimming in a pond", "In a pond, three ducks are swimming.",
     "followed by a line of tiny ducklings"),
    ("a wooden bridge over a small stream", "A small stream runs under a wooden bridge.",
     "where a boy is fishing with a stick"),
    ("a vase of sunflowers by a window", "By a window there is a vase holding sunflowers.",
     "with rain tapping on the glass"),
    ("a girl playing the violin on a stage", "On a stage, a girl plays the violin.",
     "in front of a hall full of listeners"),
    ("a stack of books on a desk", "Books lie stacked on a desk.",
     "beside a flickering candle"),
    ("a cat sleeping on a sofa", "On a sofa, a cat is fast asleep.",
     "curled up next to a knitted blanket"),
    ("a sailboat on a calm blue sea", "A calm blue sea carries a sailboat.",
     "while dolphins leap beside its bow"),
    ("a train crossing a stone viaduct", "Over a stone viaduct, a train is crossing.",
     "as steam drifts across the valley"),
    ("a chef slicing vegetables in a kitchen", "In a kitchen, vegetables are sliced by a chef.",
     "while a pot boils over on the stove"),
    ("an elephant drinking from a river", "From a river, an elephant is drinking.",
     "as a flock of birds rests on its back"),
    ("a pair of boots by the front door", "By the front door stands a pair of boots.",
     "still covered in fresh mud"),
    ("a crowd watching fireworks at night", "At night, a crowd watches fireworks.",
     "from the roofs of a harbour town"),
    ("a baby sleeping in a crib", "In a crib, a baby lies sleeping.",
     "under a mobile of paper stars"),
    ("a squirrel holding a nut on a fence", "On a fence, a squirrel holds a nut.",
     "while a dog barks at it from below"),
    ("a red barn in a snowy field", "A snowy field surrounds a red barn.",
     "with smoke rising from a nearby chimney"),
    ("an airplane taking off from a runway", "From a runway, an airplane is taking off.",
     "as passengers wave from the terminal"),
    ("a boy brushing his teeth in a mirror", "In a mirror, a boy is seen brushing his teeth.",
     "while his sister waits at the door"),
    ("a basket of eggs on a kitchen counter", "On a kitchen counter rests a basket of eggs.",
     "next to a bag of flour and a whisk"),
    ("a tiger resting in the shade of a tree", "In the shade of a tree, a tiger rests.",
     "watching a deer at the edge of the forest"),
    ("a couple walking along a sandy beach", "Along a sandy beach, a couple is walking.",
     "as the sun sets behind a row of palms"),
    ("a blue door in a white stone wall", "A white stone wall holds a blue door.",
     "with a pot of red flowers beside it"),
    ("a skateboarder jumping over a ramp", "Over a ramp jumps a skateboarder.",
     "as his friends cheer and film him"),
    ("a glass of milk and a plate of cookies", "A plate of cookies sits with a glass of milk.",
     "left out for a visitor on a winter night"),
    ("a fisherman casting a net from a pier", "From a pier, a fisherman casts a net.",
     "while pelicans wait on the posts"),
    ("a bus stopped at a rainy street corner", "At a rainy street corner, a bus has stopped.",
     "and people with umbrellas climb aboard"),
    ("a parrot perched on a man's shoulder", "On a man's shoulder sits a parrot.",
     "whistling a tune to a laughing crowd"),
    ("a field of tulips under a blue sky", "Under a blue sky lies a field of tulips.",
     "with a windmill turning in the distance"),
    ("a soldier standing guard at a gate", "At a gate, a soldier stands guard.",
     "while tourists take photos of him"),
    ("a tennis player serving the ball", "The ball is being served by a tennis player.",
     "in front of a packed stadium"),
    ("a teapot and two cups on a tray", "On a tray are a teapot and two cups.",
     "beside a plate of lemon cake"),
    ("a giraffe eating leaves from a tall tree", "From a tall tree, a giraffe eats leaves.",
     "while a jeep of tourists stops to watch"),
    ("an empty street lit by lamps at night", "At night, lamps light an empty street.",
     "and a fox crosses under the last lamp"),
    ("a man riding a horse across a desert", "Across a desert, a man rides a horse.",
     "toward a distant oasis with palm trees"),
    ("a wooden chair in an empty room", "An empty room holds a single wooden chair.",
     "with a letter lying on its seat"),
    ("a woman painting a portrait in a studio", "In a studio, a woman paints a portrait.",
     "while her model dozes in an armchair"),
    ("two kittens playing with a ball of yarn", "A ball of yarn is played with by two kittens.",
     "under the table of a busy kitchen"),
    ("a green tractor plowing a field", "A field is being plowed by a green tractor.",
     "followed by a cloud of hungry gulls"),
    ("a clock tower in the center of a town", "In the center of a town stands a clock tower.",
     "where a market is setting up its stalls"),
    ("a hiker resting on a mountain trail", "On a mountain trail, a hiker takes a rest.",
     "sharing a sandwich with a curious goat"),
    ("a jar of honey on a breakfast table", "On a breakfast table sits a jar of honey.",
     "with a bee circling around its lid"),
    ("a ship docked at a busy port", "At a busy port, a ship is docked.",
     "as cranes lift containers onto its deck"),
    ("a man playing guitar by a campfire", "By a campfire, a man plays the guitar.",
     "while friends roast marshmallows around him"),
    ("a lamp glowing on a bedside table", "On a bedside table glows a lamp.",
     "next to a half-read novel"),
    ("a group of children in a classroom", "In a classroom sits a group of children.",
     "watching their teacher draw a map"),
    ("a penguin standing on an ice floe", "On an ice floe stands a penguin.",
     "as a seal surfaces beside it"),
    ("a bicycle parked beside a canal", "Beside a canal, a bicycle is parked.",
     "while a boat full of tourists passes by"),
    ("a pile of autumn leaves in a garden", "In a garden lies a pile of autumn leaves.",
     "with a rake leaning on a nearby tree"),
    ("a doctor listening to a patient's heart", "A patient's heart is listened to by a doctor.",
     "while a nurse writes notes"),
    ("a loaf of bread on a cutting board", "On a cutting board rests a loaf of bread.",
     "still steaming from the oven"),
    ("a waterfall in a green forest", "In a green forest, a waterfall pours down.",
     "where a rainbow forms in the spray"),
    ("a motorcycle parked in front of a diner", "In front of a diner, a motorcycle is parked.",
     "while its rider eats a burger inside"),
    ("an owl sitting on a fence post at dusk", "At dusk, an owl sits on a fence post.",
     "watching a mouse in the grass below"),
    ("a little girl holding a red balloon", "A red balloon is held by a little girl.",
     "at the gate of a busy fairground"),
    ("a row of houses along a river", "Along a river stands a row of houses.",
     "with boats tied up at every door"),
    ("a man sleeping in a hammock", "In a hammock, a man lies asleep.",
     "strung between two palms on an island"),
    ("a fox walking through fresh snow", "Through fresh snow walks a fox.",
     "leaving tracks toward a frozen pond"),
    ("a bakery window full of cakes", "A bakery window is full of cakes.",
     "and a child presses her nose to the glass"),
    ("a pianist playing in a dark hall", "In a dark hall, a pianist is playing.",
     "lit by a single spotlight"),
    ("a white swan on a misty lake", "On a misty lake floats a white swan.",
     "followed by three grey cygnets"),
    ("a surfer riding a large wave", "A large wave is ridden by a surfer.",
     "while a helicopter films from above"),
    ("a kettle boiling on a gas stove", "On a gas stove, a kettle is boiling.",
     "next to a pan of frying eggs"),
    ("a monkey hanging from a branch", "From a branch hangs a monkey.",
     "holding a banana in one hand"),
    ("a farmer carrying a basket of apples", "A basket of apples is carried by a farmer.",
     "through an orchard in full bloom"),
    ("a black umbrella left on a bench", "On a bench, a black umbrella has been left.",
     "as the rain finally stops"),
    ("a bee landing on a purple flower", "On a purple flower, a bee is landing.",
     "while a butterfly waits its turn"),
    ("an old man feeding pigeons in a square", "In a square, an old man feeds pigeons.",
     "as a street musician plays nearby"),
    ("a pizza fresh out of the oven", "Fresh out of the oven comes a pizza.",
     "and a family gathers around the table"),
    ("a deer standing at the edge of a forest", "At the edge of a forest stands a deer.",
     "as the morning fog lifts"),
    ("a student writing on a blackboard", "On a blackboard, a student is writing.",
     "while the class laughs at a joke"),
    ("a canoe pulled up on a river bank", "On a river bank rests a canoe.",
     "with a tent pitched among the trees"),
    ("a woman jogging with her dog", "With her dog, a woman is out jogging.",
     "along a path lined with cherry trees"),
    ("a stone castle on a green hill", "A green hill is crowned by a stone castle.",
     "with flags waving from its towers"),
    ("a bowl of soup with a spoon", "A spoon rests in a bowl of soup.",
     "beside a basket of warm bread"),
    ("a firefighter spraying water on a fire", "Water is sprayed on a fire by a firefighter.",
     "while neighbours watch from across the street"),
    ("a goldfish in a round glass bowl", "A round glass bowl holds a goldfish.",
     "while a cat stares at it from the shelf"),
    ("a person's hand holding a stopwatch", "A stopwatch is held in a person's hand.",
     "at the finish line of a race"),
    ("a row of bicycles at a station", "At a station stands a row of bicycles.",
     "as a train pulls in behind them"),
    ("a lion lying on a rock in the sun", "On a rock in the sun lies a lion.",
     "while two cubs wrestle beside it"),
    ("a bride and groom cutting a cake", "A cake is cut by a bride and groom.",
     "as their guests raise their glasses"),
    ("a red apple on a stack of books", "On a stack of books sits a red apple.",
     "left for a teacher on the first day"),
    ("a hot air balloon over a valley", "Over a valley floats a hot air balloon.",
     "with a wedding couple waving from the basket"),
    ("a mechanic holding a wrench in a garage", "In a garage, a mechanic holds a wrench.",
     "beside a car with its hood open"),
    ("a dog catching a frisbee in a park", "In a park, a frisbee is caught by a dog.",
     "as children clap from a picnic blanket"),
    ("a lantern hanging from a wooden porch", "From a wooden porch hangs a lantern.",
     "while moths dance around its light"),
    ("a tram climbing a steep city street", "A steep city street is climbed by a tram.",
     "past a cafe where old friends play chess"),
)
assert len(POOL) == 100, len(POOL)


def pool_pairs(mode: str) -> list[tuple[str, str]]:
    """The 100 (caption, example output) pairs for `mode` ('rewrite' or 'expansion')."""
    if mode == "rewrite":
        return [(c, r) for c, r, _ in POOL]
    if mode == "expansion":
        return [(c, f"{c} {e}") for c, _, e in POOL]
    raise UserInputError(f"SRP mode {mode!r} has no example pool; use 'rewrite' or 'expansion'")


def system_line(mode: str) -> str:
    check_mode(mode)
    return SYSTEM_EXPANSION if mode == "expansion" else SYSTEM_REWRITE


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UserInputError(
            f"semantics.rewrite_mode={mode!r} is not a rewrite mode; choose one of {', '.join(MODES)}"
        )
    return mode


@dataclass(frozen=True)
class SRP:
    """One assembled Semantic Rewriting Prompt and the examples it shows."""
    text: str
    examples: tuple[tuple[str, str], ...]
    example_ids: tuple[int, ...]


def sample_example_ids(image_id: str | int, variant: int, num_examples: int, seed: int = 0,
                       pool_size: int = len(POOL)) -> list[int]:
    """Distinct pool indices, reproducible per (seed, image, variant)."""
    if not 0 <= num_examples <= pool_size:
        raise UserInputError(
            f"semantics.num_examples={num_examples} must be between 0 and the pool size {pool_size}"
        )
    rng = random.Random(derive_seed("srp", seed, image_id, variant))
    return rng.sample(range(pool_size), num_examples)


def format_srp(caption: str, examples: list[tuple[str, str]], mode: str) -> str:
    """System line, a blank line, one 'caption → output' line per example, then 'caption →'."""
    lines = [system_line(mode), ""]
    lines += [f"{c} {ARROW} {r}" for c, r in examples]
    lines.append(f"{caption} {ARROW}")
    return "\n".join(lines)


def build_srp(caption: str, image_id: str | int, variant: int = 0, mode: str = "rewrite",
              num_examples: int = 5, seed: int = 0) -> SRP:
    """The SRP for one caption; examples drawn per (seed, image, variant)."""
    pairs = pool_pairs(mode)
    ids = sample_example_ids(image_id, variant, num_examples, seed, len(pairs))
    examples = tuple(pairs[i] for i in ids)
    return SRP(format_srp(caption, list(examples), mode), examples, tuple(ids))
