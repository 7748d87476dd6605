"""Text the tiny captioner and rewriter of the model zoo are trained on.

The tiny BLIP-2 learns, from the embedded Fashion-MNIST images, to answer each of the
paper's three SEPs in that SEP's style (short answer, detailed description, object
list); the tiny LLaMA learns to rewrite (or expand) exactly such captions when given an
SRP. Captions name the garment class and its tone (from the image's brightness), so
they depend on the image.
"""
from __future__ import annotations

import numpy as np

from sasi_online.semantics.prompts import SEP_DETAIL, SEP_OBJECTS, SEP_QUESTION

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")

# Per class: noun phrase, two detailed descriptions, the rewrite of each template
# (same meaning, new sentence shape) and an expansion clause (an imagined extra).
# "{c}" is the tone word: white, grey or dark.
_CLASS_TEXT = {
    0: dict(noun="t-shirt",
            detail=("a {c} t-shirt with short sleeves on a black background",
                    "a plain {c} t-shirt laid flat on a black background"),
            detail_rw=("On a black background lies a {c} t-shirt with short sleeves.",
                       "Laid flat on a black background is a plain {c} t-shirt."),
            short_rw="A {c} t-shirt is shown.",
            expand="hanging on a rack in a small shop"),
    1: dict(noun="pair of trousers",
            detail=("a pair of {c} trousers with long legs on a black background",
                    "{c} trousers standing straight on a black background"),
            detail_rw=("On a black background there is a pair of {c} trousers with long legs.",
                       "Standing straight on a black background are {c} trousers."),
            short_rw="A {c} pair of trousers is shown.",
            expand="folded next to a leather belt"),
    2: dict(noun="pullover",
            detail=("a {c} pullover with long sleeves on a black background",
                    "a warm {c} pullover spread out on a black background"),
            detail_rw=("On a black background lies a {c} pullover with long sleeves.",
                       "Spread out on a black background is a warm {c} pullover."),
            short_rw="A {c} pullover is shown.",
            expand="beside a cup of hot tea on a winter morning"),
    3: dict(noun="dress",
            detail=("a long {c} dress on a black background",
                    "a {c} dress with a narrow waist on a black background"),
            detail_rw=("On a black background hangs a long {c} dress.",
                       "With a narrow waist, a {c} dress is shown on a black background."),
            short_rw="A {c} dress is shown.",
            expand="worn by a woman dancing at a garden party"),
    4: dict(noun="coat",
            detail=("a {c} coat with buttons and long sleeves on a black background",
                    "a heavy {c} coat with a collar on a black background"),
            detail_rw=("On a black background there is a {c} coat with buttons and long sleeves.",
                       "With a collar, a heavy {c} coat lies on a black background."),
            short_rw="A {c} coat is shown.",
            expand="hanging by the door of a snowy cabin"),
    5: dict(noun="sandal",
            detail=("a {c} sandal with thin straps on a black background",
                    "an open {c} summer sandal on a black background"),
            detail_rw=("On a black background sits a {c} sandal with thin straps.",
                       "On a black background sits an open {c} summer sandal."),
            short_rw="A {c} sandal is shown.",
            expand="resting on warm sand near the sea"),
    6: dict(noun="shirt",
            detail=("a {c} shirt with a collar and buttons on a black background",
                    "a {c} shirt with long sleeves on a black background"),
            detail_rw=("On a black background lies a {c} shirt with a collar and buttons.",
                       "With long sleeves, a {c} shirt lies on a black background."),
            short_rw="A {c} shirt is shown.",
            expand="ironed and ready for an office meeting"),
    7: dict(noun="sneaker",
            detail=("a {c} sneaker with a flat sole on a black background",
                    "a low {c} running shoe on a black background"),
            detail_rw=("On a black background stands a {c} sneaker with a flat sole.",
                       "On a black background stands a low {c} running shoe."),
            short_rw="A {c} sneaker is shown.",
            expand="on the track of an empty stadium"),
    8: dict(noun="bag",
            detail=("a {c} bag with a handle on a black background",
                    "a square {c} handbag on a black background"),
            detail_rw=("On a black background rests a {c} bag with a handle.",
                       "On a black background rests a square {c} handbag."),
            short_rw="A {c} bag is shown.",
            expand="on a cafe table next to a book"),
    9: dict(noun="ankle boot",
            detail=("a {c} ankle boot with a low heel on a black background",
                    "a {c} leather ankle boot on a black background"),
            detail_rw=("On a black background stands a {c} ankle boot with a low heel.",
                       "On a black background stands a {c} leather ankle boot."),
            short_rw="A {c} ankle boot is shown.",
            expand="on a muddy path in an autumn forest"),
}

TONES = ("dark", "grey", "white")


def tone_of(image: np.ndarray) -> str:
    """The garment's tone from the mean brightness of its pixels (the background is black)."""
    img = np.asarray(image, dtype=np.float32)
    fg = img[img > 30]
    level = float(fg.mean()) if fg.size else 0.0
    return "white" if level > 170 else "grey" if level > 110 else "dark"


def caption_templates(label: int, sep: str) -> list[str]:
    """The captions a well-trained tiny captioner gives for class `label` under `sep`."""
    t = _CLASS_TEXT[int(label)]
    if sep == SEP_QUESTION:
        return ["a {c} " + t["noun"]]
    if sep == SEP_OBJECTS:
        return ["a {c} " + t["noun"] + " and a black background"]
    return list(t["detail"])  # SEP_DETAIL and any custom SEP


def rewrite_pairs() -> list[tuple[str, str, str]]:
    """(caption, rewrite, expansion) for every caption the tiny captioner is taught."""
    out = []
    for label, t in _CLASS_TEXT.items():
        for c in TONES:
            short = "a {c} ".format(c=c) + t["noun"]
            objects = short + " and a black background"
            out.append((short, t["short_rw"].format(c=c), f"{short} {t['expand']}"))
            out.append((objects, t["short_rw"].format(c=c)[:-1] + " on a black background.",
                        f"{short} {t['expand']}, on a black background"))
            for d, rw in zip(t["detail"], t["detail_rw"]):
                d = d.format(c=c)
                out.append((d, rw.format(c=c), f"{d}, {t['expand']}"))
    return out


def training_seps() -> tuple[str, ...]:
    return (SEP_QUESTION, SEP_DETAIL, SEP_OBJECTS)
