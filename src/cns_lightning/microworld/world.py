"""A procedural image world, 64 px RGB, deterministic from a seed, with compositional English captions.

A scene is one or two objects on a background, optionally in a rendering style::

    "a large red striped star on the left, on a sand background, in outline style"
    "a small blue dog on the left and a small yellow cup on the right, on a grass background"

Vocabulary (all plain English words the CLIP BPE tokenizer knows):

* nouns: 10 shapes (``SHAPES``) and 12 class nouns (``CLASS_NOUNS``: dog, cat, bird, ... cup, car, house)
* ``COLOURS`` (10), ``PATTERNS`` (solid / striped / dotted / checkered), ``SIZES`` (small / large),
  ``POSITIONS`` (left / right / top / bottom / center)
* ``BACKGROUNDS`` (12: plain white/gray and textured sky, grass, sand, water, night, snow, brick,
  beach, room, mountain) and ``STYLES`` (none, outline, pixelated, blurred, inverted, sepia).

Everything is drawn with PIL at 2x (128 px) and box-downsampled to 64 px, then the style is applied.
``render_scene`` takes extra painters / backgrounds / styles so that ``concepts.py`` can draw the
personal concepts with the same machinery.

Held-out split: ``HELDOUT_PAIRS`` are (colour, noun) pairs that never occur in the pretraining split
(``sample_scene(rng, split="train")``); ``split="heldout"`` scenes always show one of them, so the
micro models are scored on compositions they never saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

RES = 64  # output resolution
S = 128  # drawing canvas (2x, box-downsampled for anti-aliasing)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (245, 215, 30),
    "green": (40, 165, 60),
    "blue": (35, 80, 220),
    "purple": (135, 50, 180),
    "pink": (245, 135, 190),
    "brown": (125, 78, 40),
    "white": (248, 248, 248),
    "black": (22, 22, 22),
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "heart", "diamond", "moon", "hexagon")
LIVE_NOUNS = ("dog", "cat", "bird", "fish", "rabbit", "turtle")
OBJECT_NOUNS = ("cup", "chair", "lamp", "car", "house", "vase")
CLASS_NOUNS = LIVE_NOUNS + OBJECT_NOUNS
NOUNS = SHAPES + CLASS_NOUNS
PATTERNS = ("solid", "striped", "dotted", "checkered")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("white", "gray", "sky", "grass", "sand", "water", "night", "snow", "brick", "beach", "room", "mountain")
STYLES = ("none", "outline", "pixelated", "blurred", "inverted", "sepia")

# Objects of these colours are not drawn on these backgrounds (they would vanish).
_CLASHES = {"white": {"white", "snow"}, "black": {"night"}, "green": {"grass"}, "blue": {"water"}, "brown": {"room"}}

# (colour, noun) pairs never seen in pretraining: one colour per noun, spread over all colours.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    (list(COLOURS)[(7 * i + 3) % len(COLOURS)], noun) for i, noun in enumerate(NOUNS)
)

POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom", "center": "in the center"}
# Every word a world caption can hold (Scene.caption's grammar): the micro text encoder was
# pretrained on these captions only, so the micro pipeline can draw nothing else.
CAPTION_WORDS: frozenset[str] = frozenset(
    [*COLOURS, *NOUNS, *PATTERNS, *SIZES, *BACKGROUNDS, *STYLES, "a", "and", "background", "style"]
    + [w for phrase in POSITION_PHRASES.values() for w in phrase.split()]
) - {"solid", "none"}


def words_outside_the_world(text: str, tokens: Sequence[str] = ()) -> list[str]:
    """The words of ``text`` that no world caption holds (lower-cased, punctuation dropped; the
    concept ``tokens`` and ``{token}`` / ``{class}`` placeholders do not count), in order, once each."""
    for t in (*tokens, "{token}", "{class}"):
        text = text.replace(t, " ")
    words = [w.strip(".,;:!?\"'()[]") for w in text.lower().split()]
    return list(dict.fromkeys(w for w in words if w and w not in CAPTION_WORDS))
_POS_XY = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72), "center": (0.5, 0.5)}
_SIZE_R = {"small": 0.15, "large": 0.23}  # half-size as a fraction of the image

RGB = tuple[int, int, int]


# --------------------------------------------------------------------------------------------- scene


@dataclass(frozen=True)
class Obj:
    """One object. ``noun`` is a shape or class noun; ``colour``/``pattern`` are ignored (and left out
    of the caption) when ``glyph`` names a personal concept painter, whose caption word is ``word``."""

    noun: str
    colour: str = "red"
    pattern: str = "solid"
    size: str = "large"
    position: str = "center"
    glyph: str | None = None
    word: str = "{token}"

    def phrase(self, omit: frozenset[str] | set[str] = frozenset()) -> str:
        """``"a large red striped star on the left"``; words of attributes in ``omit`` are left out
        (pretraining captions sometimes under-describe, so "a large dog on the left" means any dog)."""
        if self.glyph is not None:
            words = [self.size, self.word, self.noun]
        else:
            words = [self.size, self.colour, "" if self.pattern == "solid" else self.pattern, self.noun]
            words = [w for w, a in zip(words, ("size", "colour", "pattern", "noun")) if a not in omit]
        text = "a " + " ".join(w for w in words if w)
        return text + ("" if "position" in omit else " " + POSITION_PHRASES[self.position])


@dataclass(frozen=True)
class Scene:
    """Objects on a background in a style; ``seed`` drives textures and jitter."""

    objects: tuple[Obj, ...]
    background: str = "white"
    style: str = "none"
    seed: int = 0
    background_word: str | None = None  # caption words for a personal background (e.g. "{token} beach")
    style_word: str | None = None  # caption word for a personal style (e.g. "{token}")

    def caption(self, omit: frozenset[str] | set[str] = frozenset()) -> str:
        text = " and ".join(o.phrase(omit) for o in self.objects)
        bg = self.background_word or self.background
        text += f", on a {bg} background"
        if self.style != "none":
            text += f", in {self.style_word or self.style} style"
        return text

    def render(self, **extra: Mapping) -> Image.Image:
        return render_scene(self, **extra)


# --------------------------------------------------------------------------------------------- colour helpers


def _jitter(rgb: RGB, rng: np.random.Generator, amount: int = 12) -> RGB:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)  # type: ignore[return-value]


def _shade(rgb: RGB) -> RGB:
    """The second colour of a pattern: lighter for dark colours, darker for light ones."""
    lum = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255
    if lum < 0.55:
        return tuple(int(c + 0.6 * (255 - c)) for c in rgb)  # type: ignore[return-value]
    return tuple(int(c * 0.5) for c in rgb)  # type: ignore[return-value]


def pattern_texture(rgb: RGB, pattern: str, rng: np.random.Generator) -> np.ndarray:
    """An S x S x 3 uint8 fill for ``pattern`` in colour ``rgb``."""
    a = np.empty((S, S, 3), np.uint8)
    a[:] = rgb
    if pattern == "solid":
        return a
    yy, xx = np.mgrid[0:S, 0:S]
    off = int(rng.integers(0, 12))
    if pattern == "striped":
        m = ((xx + yy + off) // 7) % 2 == 1
    elif pattern == "dotted":
        m = (((xx + off) % 14 - 7) ** 2 + ((yy + off) % 14 - 7) ** 2) <= 10
    elif pattern == "checkered":
        m = (((xx + off) // 12) + ((yy + off) // 12)) % 2 == 1
    else:
        raise ValueError(f"unknown pattern {pattern!r}; choose one of {PATTERNS}")
    a[m] = _shade(rgb)
    return a


# --------------------------------------------------------------------------------------------- painters
# A painter draws one object as a list of layers: (mask-drawing function, fill). The fill is "main"
# (the object's colour and pattern), or an RGB tuple. Geometry is in units of the half-size r around
# (cx, cy) on the S x S canvas; P(x, y) maps unit coordinates to pixels.

Layer = tuple[Callable[[ImageDraw.ImageDraw], None], object]
Painter = Callable[[float, float, float, np.random.Generator], list[Layer]]
DARK: RGB = (25, 25, 25)


def _P(cx: float, cy: float, r: float):
    return lambda x, y: (cx + x * r, cy + y * r)


def _box(P, x0, y0, x1, y1):
    (a, b), (c, d) = P(x0, y0), P(x1, y1)
    return [min(a, c), min(b, d), max(a, c), max(b, d)]


def _poly_star(P, n: int, outer: float, inner: float, rot: float = -math.pi / 2):
    pts = []
    for k in range(2 * n):
        rad = outer if k % 2 == 0 else inner
        t = rot + k * math.pi / n
        pts.append(P(rad * math.cos(t), rad * math.sin(t)))
    return pts


def _shape_painter(kind: str) -> Painter:
    def paint(cx, cy, r, rng):
        P = _P(cx, cy, r)
        if kind == "circle":
            f = lambda d: d.ellipse(_box(P, -1, -1, 1, 1), fill=255)
        elif kind == "square":
            f = lambda d: d.rectangle(_box(P, -0.85, -0.85, 0.85, 0.85), fill=255)
        elif kind == "triangle":
            f = lambda d: d.polygon([P(0, -1), P(1, 0.8), P(-1, 0.8)], fill=255)
        elif kind == "star":
            f = lambda d: d.polygon(_poly_star(P, 5, 1.05, 0.45), fill=255)
        elif kind == "ring":

            def f(d):
                d.ellipse(_box(P, -1, -1, 1, 1), fill=255)
                d.ellipse(_box(P, -0.55, -0.55, 0.55, 0.55), fill=0)

        elif kind == "cross":

            def f(d):
                d.rectangle(_box(P, -1, -0.32, 1, 0.32), fill=255)
                d.rectangle(_box(P, -0.32, -1, 0.32, 1), fill=255)

        elif kind == "heart":

            def f(d):
                d.ellipse(_box(P, -1, -0.85, 0.05, 0.2), fill=255)
                d.ellipse(_box(P, -0.05, -0.85, 1, 0.2), fill=255)
                d.polygon([P(-0.97, -0.2), P(0.97, -0.2), P(0, 1)], fill=255)

        elif kind == "diamond":
            f = lambda d: d.polygon([P(0, -1), P(0.7, 0), P(0, 1), P(-0.7, 0)], fill=255)
        elif kind == "moon":

            def f(d):
                d.ellipse(_box(P, -1, -1, 1, 1), fill=255)
                d.ellipse(_box(P, -0.35, -1.05, 1.25, 0.65), fill=0)

        elif kind == "hexagon":
            f = lambda d: d.polygon(_poly_star(P, 3, 1.0, 1.0, rot=0.0), fill=255)
        else:
            raise ValueError(kind)
        return [(f, "main")]

    return paint


def _ellipse(P, x0, y0, x1, y1):
    return lambda d: d.ellipse(_box(P, x0, y0, x1, y1), fill=255)


def _rect(P, x0, y0, x1, y1):
    return lambda d: d.rectangle(_box(P, x0, y0, x1, y1), fill=255)


def _polygon(P, *pts):
    return lambda d: d.polygon([P(x, y) for x, y in pts], fill=255)


def _line(P, x0, y0, x1, y1, w):
    return lambda d: d.line([P(x0, y0), P(x1, y1)], fill=255, width=max(1, int(w)))


def _dog(cx, cy, r, rng):
    P = _P(cx, cy, r)
    return [
        (_line(P, 0.65, -0.05, 0.95, -0.45, r * 0.14), "main"),  # tail
        (_rect(P, -0.55, 0.2, -0.35, 0.85), "main"),
        (_rect(P, 0.3, 0.2, 0.5, 0.85), "main"),
        (_ellipse(P, -0.7, -0.25, 0.7, 0.4), "main"),  # body
        (_ellipse(P, -1.0, -0.75, -0.35, -0.1), "main"),  # head
        (_ellipse(P, -0.95, -0.6, -0.75, -0.05), "ear"),  # floppy ear
        (_ellipse(P, -0.78, -0.55, -0.68, -0.45), DARK),  # eye
        (_ellipse(P, -1.05, -0.35, -0.93, -0.25), DARK),  # nose
    ]


def _cat(cx, cy, r, rng):
    P = _P(cx, cy, r)
    return [
        (_line(P, 0.6, 0.3, 0.95, -0.6, r * 0.12), "main"),  # upright tail
        (_ellipse(P, -0.55, -0.1, 0.7, 0.85), "main"),  # body
        (_ellipse(P, -0.9, -0.75, -0.15, 0.0), "main"),  # head
        (_polygon(P, (-0.9, -0.45), (-0.85, -1.0), (-0.6, -0.65)), "main"),  # ears
        (_polygon(P, (-0.45, -0.65), (-0.2, -1.0), (-0.15, -0.45)), "main"),
        (_ellipse(P, -0.72, -0.5, -0.6, -0.36), DARK),
        (_ellipse(P, -0.45, -0.5, -0.33, -0.36), DARK),
        (_line(P, -1.0, -0.2, -0.65, -0.25, 2), DARK),  # whiskers
        (_line(P, -0.4, -0.25, -0.05, -0.2, 2), DARK),
    ]


def _bird(cx, cy, r, rng):
    P = _P(cx, cy, r)
    return [
        (_polygon(P, (0.5, 0.0), (1.0, -0.3), (1.0, 0.35)), "main"),  # tail
        (_ellipse(P, -0.6, -0.35, 0.65, 0.5), "main"),  # body
        (_ellipse(P, -0.95, -0.8, -0.3, -0.15), "main"),  # head
        (_polygon(P, (-0.95, -0.55), (-1.2, -0.42), (-0.92, -0.35)), (235, 150, 30)),  # beak
        (_polygon(P, (-0.2, -0.1), (0.45, -0.05), (0.1, 0.35)), "wing"),  # wing
        (_ellipse(P, -0.75, -0.6, -0.63, -0.48), DARK),
        (_line(P, -0.15, 0.45, -0.15, 0.9, 2), DARK),  # legs
        (_line(P, 0.15, 0.45, 0.15, 0.9, 2), DARK),
    ]


def _fish(cx, cy, r, rng):
    P = _P(cx, cy, r)
    return [
        (_polygon(P, (0.55, 0.0), (1.0, -0.55), (1.0, 0.55)), "main"),  # tail
        (_ellipse(P, -1.0, -0.5, 0.7, 0.5), "main"),
        (_polygon(P, (-0.3, -0.4), (0.2, -0.8), (0.3, -0.35)), "main"),  # fin
        (_ellipse(P, -0.75, -0.2, -0.6, -0.05), DARK),
        (_line(P, -0.3, -0.35, -0.3, 0.35, 2), "wing"),  # gill
    ]


def _rabbit(cx, cy, r, rng):
    P = _P(cx, cy, r)
    return [
        (_ellipse(P, -0.55, -0.05, 0.75, 0.9), "main"),  # body
        (_ellipse(P, 0.6, 0.2, 0.95, 0.55), "wing"),  # tail puff
        (_ellipse(P, -0.8, -0.55, -0.1, 0.15), "main"),  # head
        (_ellipse(P, -0.75, -1.1, -0.5, -0.35), "main"),  # long ears
        (_ellipse(P, -0.45, -1.1, -0.2, -0.35), "main"),
        (_ellipse(P, -0.55, -0.3, -0.43, -0.18), DARK),
    ]


def _turtle(cx, cy, r, rng):
    P = _P(cx, cy, r)
    return [
        (_ellipse(P, -1.0, -0.1, -0.5, 0.35), "main"),  # head
        (_rect(P, -0.6, 0.2, -0.4, 0.6), "main"),  # legs
        (_rect(P, 0.4, 0.2, 0.6, 0.6), "main"),
        (lambda d, P=P: d.pieslice(_box(P, -0.75, -0.7, 0.8, 0.75), 180, 360, fill=255), "main"),  # shell
        (_rect(P, -0.75, 0.0, 0.8, 0.22), "wing"),  # shell rim
        (_ellipse(P, -0.88, 0.0, -0.76, 0.12), DARK),
    ]


def _cup(cx, cy, r, rng):
    P = _P(cx, cy, r)

    def handle(d):
        d.ellipse(_box(P, 0.25, -0.45, 0.95, 0.35), fill=255)
        d.ellipse(_box(P, 0.42, -0.28, 0.78, 0.18), fill=0)

    return [
        (handle, "main"),
        (_polygon(P, (-0.7, -0.7), (0.5, -0.7), (0.4, 0.8), (-0.6, 0.8)), "main"),
        (_rect(P, -0.7, -0.75, 0.5, -0.6), "wing"),  # rim
    ]


def _chair(cx, cy, r, rng):
    P = _P(cx, cy, r)
    return [
        (_rect(P, 0.35, -1.0, 0.55, 0.1), "main"),  # back
        (_rect(P, -0.6, 0.0, 0.55, 0.18), "main"),  # seat
        (_rect(P, -0.55, 0.15, -0.4, 0.95), "wing"),  # legs
        (_rect(P, 0.38, 0.15, 0.53, 0.95), "wing"),
        (_rect(P, 0.35, -0.75, 0.55, -0.6), "wing"),
    ]


def _lamp(cx, cy, r, rng):
    P = _P(cx, cy, r)
    return [
        (_rect(P, -0.07, -0.3, 0.07, 0.8), DARK),  # pole
        (_rect(P, -0.45, 0.8, 0.45, 0.95), DARK),  # base
        (_polygon(P, (-0.3, -0.95), (0.3, -0.95), (0.65, -0.25), (-0.65, -0.25)), "main"),  # shade
    ]


def _car(cx, cy, r, rng):
    P = _P(cx, cy, r)
    return [
        (_polygon(P, (-0.5, -0.2), (-0.25, -0.65), (0.4, -0.65), (0.65, -0.2)), "main"),  # cabin
        (_rect(P, -1.0, -0.25, 1.0, 0.4), "main"),  # body
        (_polygon(P, (-0.3, -0.25), (-0.15, -0.55), (0.1, -0.55), (0.1, -0.25)), (200, 230, 250)),  # window
        (_ellipse(P, -0.75, 0.2, -0.3, 0.65), DARK),  # wheels
        (_ellipse(P, 0.3, 0.2, 0.75, 0.65), DARK),
    ]


def _house(cx, cy, r, rng):
    P = _P(cx, cy, r)
    return [
        (_rect(P, -0.75, -0.2, 0.75, 0.95), "main"),  # walls
        (_polygon(P, (-0.95, -0.15), (0.0, -1.0), (0.95, -0.15)), "wing"),  # roof
        (_rect(P, -0.2, 0.35, 0.2, 0.95), DARK),  # door
        (_rect(P, 0.35, 0.05, 0.6, 0.3), (200, 230, 250)),  # window
    ]


def _vase(cx, cy, r, rng):
    P = _P(cx, cy, r)
    return [
        (_rect(P, -0.25, -1.0, 0.25, -0.4), "main"),  # neck
        (_ellipse(P, -0.7, -0.55, 0.7, 0.95), "main"),  # belly
        (_rect(P, -0.35, -1.0, 0.35, -0.88), "wing"),  # lip
    ]


PAINTERS: dict[str, Painter] = {s: _shape_painter(s) for s in SHAPES}
PAINTERS.update(
    dog=_dog, cat=_cat, bird=_bird, fish=_fish, rabbit=_rabbit, turtle=_turtle,
    cup=_cup, chair=_chair, lamp=_lamp, car=_car, house=_house, vase=_vase,
)  # fmt: skip


def draw_layers(canvas: np.ndarray, layers: Sequence[Layer], main_fill: np.ndarray, wing: RGB) -> None:
    """Composite painter layers onto an S x S x 3 uint8 canvas in place."""
    for fn, fill in layers:
        mask = Image.new("L", (S, S), 0)
        drawn = fn(ImageDraw.Draw(mask))  # a painter may return its own mask array instead
        m = (np.asarray(mask) if drawn is None else drawn) > 127
        if isinstance(fill, str):
            if fill == "main":
                canvas[m] = main_fill[m]
            else:  # "wing"/"ear": a shade of the object colour (still one colour word)
                canvas[m] = wing
        else:
            canvas[m] = fill


# --------------------------------------------------------------------------------------------- backgrounds

Background = Callable[[np.random.Generator], np.ndarray]


def _flat(rgb: RGB) -> Background:
    def bg(rng):
        a = np.empty((S, S, 3), np.float32)
        a[:] = _jitter(rgb, rng, 8)
        a += rng.normal(0, 3, (S, S, 1))
        return np.clip(a, 0, 255).astype(np.uint8)

    return bg


def _gradient(top: RGB, bottom: RGB, h: int = S) -> np.ndarray:
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    g = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t
    return np.broadcast_to(g, (h, S, 3)).copy()


def _sky(rng):
    a = _gradient(_jitter((95, 160, 235), rng), _jitter((190, 220, 250), rng))
    img = Image.fromarray(a.astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 3))):
        x, y = rng.uniform(0, S), rng.uniform(5, S * 0.6)
        w = rng.uniform(25, 45)
        for dx in (-0.35, 0.0, 0.35):
            d.ellipse([x + dx * w - w * 0.4, y - w * 0.22, x + dx * w + w * 0.4, y + w * 0.22], fill=(245, 248, 252))
    return np.asarray(img).copy()


def _grass(rng):
    a = _flat((70, 150, 55))(rng).astype(np.int16)
    img = Image.fromarray(a.astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(110):
        x, y = rng.uniform(0, S), rng.uniform(0, S)
        c = (40, 110, 35) if rng.random() < 0.5 else (110, 190, 80)
        d.line([(x, y), (x + rng.uniform(-3, 3), y - rng.uniform(5, 10))], fill=c, width=2)
    return np.asarray(img).copy()


def _sand(rng):
    a = _flat((225, 198, 140))(rng).astype(np.float32)
    a += rng.normal(0, 12, (S, S, 1)) * (rng.random((S, S, 1)) < 0.15)
    return np.clip(a, 0, 255).astype(np.uint8)


def _water(rng, top: RGB = (35, 100, 185), bottom: RGB = (25, 70, 150), h: int = S):
    a = _gradient(_jitter(top, rng), _jitter(bottom, rng), h)
    img = Image.fromarray(a.astype(np.uint8))
    d = ImageDraw.Draw(img)
    ph = rng.uniform(0, 6.28)
    for y0 in range(6, h, 14):
        pts = [(x, y0 + 3 * math.sin(x / 8 + ph + y0)) for x in range(0, S + 4, 4)]
        d.line(pts, fill=(120, 180, 235), width=2)
    return np.asarray(img).copy()


def _night(rng):
    a = _flat((14, 18, 48))(rng)
    n = 40
    ys, xs = rng.integers(0, S, n), rng.integers(0, S, n)
    for y, x in zip(ys, xs):
        a[y : y + 2, x : x + 2] = (240, 240, 210)
    return a


def _snow(rng):
    a = _flat((232, 238, 248))(rng)
    ys, xs = rng.integers(0, S, 70), rng.integers(0, S, 70)
    for y, x in zip(ys, xs):
        a[y : y + 2, x : x + 2] = (170, 185, 210)
    return a


def _brick(rng):
    a = np.empty((S, S, 3), np.uint8)
    a[:] = (205, 195, 180)
    base = np.asarray(_jitter((165, 65, 45), rng), np.int16)
    bh, bw = 12, 26
    for row, y in enumerate(range(0, S, bh)):
        off = (bw // 2) * (row % 2)
        for x in range(-off, S, bw):
            c = np.clip(base + rng.integers(-15, 16), 0, 255)
            a[y + 1 : y + bh - 1, max(0, x + 1) : max(0, x + bw - 1)] = c
    return a


def _beach(rng):
    h1 = int(rng.integers(40, 56))
    h2 = int(rng.integers(78, 92))
    a = np.empty((S, S, 3), np.uint8)
    a[:h1] = _gradient(_jitter((110, 175, 240), rng), (200, 225, 250), h1)
    a[h1:h2] = _water(rng, h=h2 - h1)
    a[h2:] = _sand(rng)[h2:]
    return a


def _room(rng):
    h = int(rng.integers(78, 92))
    a = np.empty((S, S, 3), np.uint8)
    a[:h] = _flat((225, 205, 165))(rng)[:h]
    floor = _flat((150, 100, 60))(rng)
    for x in range(int(rng.integers(0, 16)), S, 16):
        floor[:, x] = (105, 68, 38)
    a[h:] = floor[h:]
    a[h - 2 : h] = (120, 85, 55)
    return a


def _mountain(rng):
    img = Image.fromarray(_gradient(_jitter((120, 170, 230), rng), (215, 230, 245)).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for k in range(3):
        x = rng.uniform(-10, S + 10)
        hgt = rng.uniform(45, 85)
        w = rng.uniform(45, 75)
        g = int(rng.integers(95, 135))
        d.polygon([(x - w, S), (x, S - hgt), (x + w, S)], fill=(g, g, g + 10))
    return np.asarray(img).copy()


BACKGROUND_PAINTERS: dict[str, Background] = {
    "white": _flat((238, 238, 238)),
    "gray": _flat((150, 150, 150)),
    "sky": _sky,
    "grass": _grass,
    "sand": _sand,
    "water": _water,
    "night": _night,
    "snow": _snow,
    "brick": _brick,
    "beach": _beach,
    "room": _room,
    "mountain": _mountain,
}

# --------------------------------------------------------------------------------------------- styles

Style = Callable[[Image.Image, np.random.Generator], Image.Image]


def _outline(img, rng):
    e = img.filter(ImageFilter.FIND_EDGES)
    e = np.asarray(e).astype(np.float32).max(axis=2, keepdims=True)
    col = np.asarray(img).astype(np.float32)
    # dark coloured lines (the local colour, darkened) on white paper
    t = np.clip(e / 60.0, 0, 1)
    out = 250 * (1 - t) + (col * 0.55) * t
    return Image.fromarray(out.astype(np.uint8))


def _pixelated(img, rng):
    return img.resize((8, 8), Image.BOX).resize((RES, RES), Image.NEAREST)


def _blurred(img, rng):
    return img.filter(ImageFilter.GaussianBlur(2.2))


def _inverted(img, rng):
    return ImageOps.invert(img)


def _sepia(img, rng):
    g = np.asarray(img.convert("L")).astype(np.float32)[..., None] / 255.0
    dark, light = np.array([60, 35, 15], np.float32), np.array([245, 225, 180], np.float32)
    return Image.fromarray((dark * (1 - g) + light * g).astype(np.uint8))


STYLE_PAINTERS: dict[str, Style] = {
    "none": lambda img, rng: img,
    "outline": _outline,
    "pixelated": _pixelated,
    "blurred": _blurred,
    "inverted": _inverted,
    "sepia": _sepia,
}

# --------------------------------------------------------------------------------------------- rendering


def render_scene(
    scene: Scene,
    painters: Mapping[str, Painter] | None = None,
    backgrounds: Mapping[str, Background] | None = None,
    styles: Mapping[str, Style] | None = None,
) -> Image.Image:
    """Draw ``scene`` as a 64 x 64 RGB PIL image; the same scene always gives the same pixels.

    ``painters`` / ``backgrounds`` / ``styles`` add drawing functions (personal concepts) to the
    world's own; an object's ``glyph`` (else its ``noun``) picks its painter.
    """
    pnt = {**PAINTERS, **(painters or {})}
    bgs = {**BACKGROUND_PAINTERS, **(backgrounds or {})}
    sts = {**STYLE_PAINTERS, **(styles or {})}
    rng = np.random.default_rng(scene.seed)
    if scene.background not in bgs:
        raise ValueError(f"scene.background={scene.background!r} is unknown; choose one of {sorted(bgs)}")
    if scene.style not in sts:
        raise ValueError(f"scene.style={scene.style!r} is unknown; choose one of {sorted(sts)}")
    canvas = np.ascontiguousarray(bgs[scene.background](rng), dtype=np.uint8)
    for obj in scene.objects:
        key = obj.glyph or obj.noun
        if key not in pnt:
            raise ValueError(f"object {key!r} has no painter; choose one of {sorted(pnt)}")
        fx, fy = _POS_XY[obj.position]
        cx = (fx + rng.uniform(-0.03, 0.03)) * S
        cy = (fy + rng.uniform(-0.03, 0.03)) * S
        r = _SIZE_R[obj.size] * S * rng.uniform(0.93, 1.07)
        if obj.glyph is not None:
            main, wing = np.zeros((S, S, 3), np.uint8), DARK
        else:
            rgb = _jitter(COLOURS[obj.colour], rng)
            main = pattern_texture(rgb, obj.pattern, rng)
            wing = _shade(rgb) if obj.pattern == "solid" else rgb
        draw_layers(canvas, pnt[key](cx, cy, r, rng), main, wing)
    img = Image.fromarray(canvas).resize((RES, RES), Image.BOX)
    return sts[scene.style](img, rng).convert("RGB")


# --------------------------------------------------------------------------------------------- sampling


def _clash(colour: str, background: str) -> bool:
    return background in _CLASHES.get(colour, ())


def sample_object(rng: np.random.Generator, split: str, background: str, size=None, position=None, heldout=False) -> Obj:
    """A random object for ``split`` ("train": never a held-out pair; "heldout": always one)."""
    while True:
        noun = NOUNS[rng.integers(len(NOUNS))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        if _clash(colour, background):
            continue
        is_held = (colour, noun) in HELDOUT_PAIRS
        if (split == "train" and is_held) or (heldout and not is_held):
            continue
        return Obj(
            noun=noun,
            colour=colour,
            pattern=PATTERNS[rng.integers(len(PATTERNS))] if rng.random() < 0.6 else "solid",
            size=size or SIZES[rng.integers(2)],
            position=position or POSITIONS[rng.integers(len(POSITIONS))],
        )


def sample_scene(rng: np.random.Generator, split: str = "train", two_objects: float = 0.2, styled: float = 0.3) -> Scene:
    """A random world scene. ``split="train"`` avoids ``HELDOUT_PAIRS``; ``"heldout"`` shows one."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}; choose 'train' or 'heldout'")
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    style = STYLES[1 + rng.integers(len(STYLES) - 1)] if rng.random() < styled else "none"
    if rng.random() < two_objects:
        pa, pb = (("left", "right"), ("top", "bottom"))[rng.integers(2)]
        objs = (
            sample_object(rng, split, background, "small", pa, heldout=split == "heldout"),
            sample_object(rng, split, background, "small", pb),
        )
    else:
        objs = (sample_object(rng, split, background, heldout=split == "heldout"),)
    return Scene(objects=objs, background=background, style=style, seed=int(rng.integers(2**31)))


def heldout_scenes(n: int, seed: int = 12345, **kw) -> list[Scene]:
    """``n`` deterministic single-object held-out scenes (for attribute accuracy and CLIP-T)."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, "heldout", two_objects=0.0, **kw) for _ in range(n)]


ATTRIBUTES = ("colour", "noun", "pattern", "size", "position", "background", "style")


def attribute_values(attr: str) -> tuple[str, ...]:
    return {
        "colour": tuple(COLOURS),
        "noun": NOUNS,
        "pattern": PATTERNS,
        "size": SIZES,
        "position": POSITIONS,
        "background": BACKGROUNDS,
        "style": STYLES,
    }[attr]


def with_attribute(scene: Scene, attr: str, value: str) -> Scene:
    """``scene`` with one attribute of its first object (or of the scene) replaced by ``value``."""
    if attr in ("background", "style"):
        return replace(scene, **{attr: value})
    first = replace(scene.objects[0], **{attr: value})
    return replace(scene, objects=(first,) + scene.objects[1:])
