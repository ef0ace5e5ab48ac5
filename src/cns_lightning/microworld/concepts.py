"""Twenty personal concepts of the micro world, never seen in pretraining.

The mix mirrors the paper's: 8 live subjects, 6 objects, 3 styles, 3 scenes. Each subject / object
is a fixed multi-colour composite glyph with its own accessories (a red collar, a blue bandana, a
rainbow of bands...), which the world's vocabulary (one colour + one pattern per object) cannot
describe; each style is a rendering the world has no word for (halftone, neon, scanline duotone);
each scene a fixed background layout (a sunset island beach, a checkered room, a twin-sun mountain).

Captions follow the world's grammar with the literal placeholder ``{token}`` where the modifier
token goes: ``"a large {token} dog on the left, on a grass background"``. Removing ``"{token} "``
gives the class prompt (``class_prompt``), a valid world caption (the world's pretraining captions
sometimes leave the colour out, so "a large dog on the left, ..." means "some dog").

API: ``CONCEPTS``, ``materialize(name, root)``, ``concept_scenes(name)``, ``multi_concept_prompts``,
``calibration_prompts()``, ``zero_shot_prompts()``, ``class_prompt(caption)``, ``seq7``, ``seq20``.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from . import world as W
from .world import Obj, Scene, _box, _P

CATEGORIES = ("live_subject", "object", "style", "scene")


@dataclass(frozen=True)
class MicroConcept:
    """One personal concept: its captions, and prompts for evaluation."""

    name: str
    class_name: str
    category: str
    n_images: int
    eval_prompts: tuple[str, ...]  # single-concept prompts with {token} and {class}
    description: str = ""

    @property
    def seed(self) -> int:
        return zlib.crc32(self.name.encode()) & 0x7FFFFFFF

    def scenes(self) -> list[Scene]:
        return concept_scenes(self.name)

    def captions(self) -> list[str]:
        return [s.caption() for s in self.scenes()]


# --------------------------------------------------------------------------------------------- glyphs
# A part list: (kind, coords, rgb) in units of the half-size r; kinds: ellipse, rect, poly, line, pie.


def _parts(spec):
    def paint(cx, cy, r, rng):
        P = _P(cx, cy, r)
        layers = []
        for kind, c, rgb, *extra in spec:
            if kind == "ellipse":
                f = lambda d, c=c: d.ellipse(_box(P, *c), fill=255)
            elif kind == "rect":
                f = lambda d, c=c: d.rectangle(_box(P, *c), fill=255)
            elif kind == "poly":
                f = lambda d, c=c: d.polygon([P(x, y) for x, y in c], fill=255)
            elif kind == "line":
                w = max(1, int(extra[0] * r)) if extra else 2
                f = lambda d, c=c, w=w: d.line([P(x, y) for x, y in c], fill=255, width=w)
            elif kind == "pie":
                f = lambda d, c=c: d.pieslice(_box(P, *c[:4]), c[4], c[5], fill=255)
            elif kind == "ring":  # outer box, inner box (the hole shows what is behind)

                def f(d, c=c):
                    d.ellipse(_box(P, *c[:4]), fill=255)
                    d.ellipse(_box(P, *c[4:]), fill=0)

            elif kind == "band":  # a rectangle clipped to the ellipse given after it

                def f(d, c=c):
                    band, clip = Image.new("L", (W.S, W.S), 0), Image.new("L", (W.S, W.S), 0)
                    ImageDraw.Draw(band).rectangle(_box(P, *c[:4]), fill=255)
                    ImageDraw.Draw(clip).ellipse(_box(P, *c[4:]), fill=255)
                    return np.minimum(np.asarray(band), np.asarray(clip))

            else:
                raise ValueError(kind)
            layers.append((f, tuple(rgb)))
        return layers

    return paint


K = (20, 20, 20)
WH = (250, 250, 250)

GLYPHS = {
    # brown dog, white chest and muzzle, black ears, red collar, white tail tip
    "dog_patch": _parts([
        ("line", [(0.65, -0.05), (0.95, -0.45)], (140, 90, 45), 0.14),
        ("ellipse", (0.85, -0.55, 1.02, -0.38), WH),
        ("rect", (-0.55, 0.2, -0.35, 0.85), (140, 90, 45)), ("rect", (0.3, 0.2, 0.5, 0.85), (140, 90, 45)),
        ("rect", (-0.55, 0.72, -0.35, 0.88), WH), ("rect", (0.3, 0.72, 0.5, 0.88), WH),
        ("ellipse", (-0.7, -0.25, 0.7, 0.4), (140, 90, 45)),
        ("ellipse", (-0.55, -0.05, -0.05, 0.38), WH),
        ("ellipse", (-1.0, -0.75, -0.35, -0.1), (140, 90, 45)),
        ("ellipse", (-1.05, -0.42, -0.7, -0.12), WH),
        ("ellipse", (-0.62, -0.85, -0.3, -0.2), K),
        ("rect", (-0.5, -0.2, -0.32, 0.0), (220, 30, 30)),
        ("ellipse", (-0.82, -0.58, -0.7, -0.46), K),
        ("ellipse", (-1.07, -0.38, -0.95, -0.27), K),
    ]),  # fmt: skip
    # golden dog with black spots, pointy ears, blue bandana and pink tongue
    "dog_bandana": _parts([
        ("line", [(0.6, 0.0), (0.8, -0.3), (0.98, -0.2)], (230, 180, 60), 0.12),
        ("rect", (-0.55, 0.2, -0.35, 0.85), (230, 180, 60)), ("rect", (0.3, 0.2, 0.5, 0.85), (230, 180, 60)),
        ("ellipse", (-0.7, -0.25, 0.7, 0.4), (230, 180, 60)),
        ("ellipse", (-0.05, -0.15, 0.2, 0.1), K), ("ellipse", (0.3, 0.0, 0.5, 0.2), K),
        ("ellipse", (-1.0, -0.75, -0.35, -0.1), (230, 180, 60)),
        ("poly", [(-0.9, -0.6), (-0.85, -1.05), (-0.7, -0.68)], K),
        ("poly", [(-0.6, -0.68), (-0.45, -1.05), (-0.42, -0.58)], K),
        ("poly", [(-0.75, -0.15), (-0.2, -0.15), (-0.45, 0.35)], (40, 90, 230)),
        ("ellipse", (-1.0, -0.2, -0.85, 0.0), (250, 120, 160)),
        ("ellipse", (-0.8, -0.55, -0.68, -0.43), K),
    ]),  # fmt: skip
    # orange tabby: dark stripes, big green eyes, white paws
    "cat_tabby": _parts([
        ("line", [(0.6, 0.3), (0.95, -0.6)], (240, 140, 40), 0.12),
        ("ellipse", (-0.55, -0.1, 0.7, 0.85), (240, 140, 40)),
        ("line", [(-0.1, -0.05), (0.0, 0.8)], (120, 60, 20), 0.1),
        ("line", [(0.2, -0.05), (0.3, 0.8)], (120, 60, 20), 0.1),
        ("line", [(0.45, 0.05), (0.55, 0.7)], (120, 60, 20), 0.1),
        ("ellipse", (-0.5, 0.7, -0.2, 0.92), WH), ("ellipse", (0.2, 0.7, 0.5, 0.92), WH),
        ("ellipse", (-0.9, -0.75, -0.15, 0.0), (240, 140, 40)),
        ("poly", [(-0.9, -0.45), (-0.85, -1.0), (-0.6, -0.65)], (240, 140, 40)),
        ("poly", [(-0.45, -0.65), (-0.2, -1.0), (-0.15, -0.45)], (240, 140, 40)),
        ("ellipse", (-0.78, -0.56, -0.56, -0.32), (60, 200, 60)),
        ("ellipse", (-0.5, -0.56, -0.28, -0.32), (60, 200, 60)),
        ("ellipse", (-0.7, -0.5, -0.64, -0.38), K), ("ellipse", (-0.42, -0.5, -0.36, -0.38), K),
    ]),  # fmt: skip
    # black-and-white tuxedo cat, pink nose, red collar with a yellow bell
    "cat_tuxedo": _parts([
        ("line", [(0.6, 0.3), (0.85, -0.3), (0.7, -0.6)], K, 0.12),
        ("ellipse", (-0.55, -0.1, 0.7, 0.85), K),
        ("ellipse", (-0.4, 0.05, 0.15, 0.8), WH),
        ("ellipse", (-0.9, -0.75, -0.15, 0.0), K),
        ("poly", [(-0.9, -0.45), (-0.85, -1.0), (-0.6, -0.65)], K),
        ("poly", [(-0.45, -0.65), (-0.2, -1.0), (-0.15, -0.45)], K),
        ("poly", [(-0.7, 0.0), (-0.52, -0.55), (-0.35, 0.0)], WH),
        ("ellipse", (-0.58, -0.3, -0.46, -0.2), (250, 120, 170)),
        ("ellipse", (-0.75, -0.5, -0.63, -0.38), (230, 230, 60)), ("ellipse", (-0.42, -0.5, -0.3, -0.38), (230, 230, 60)),
        ("rect", (-0.8, -0.02, -0.2, 0.1), (220, 30, 30)),
        ("ellipse", (-0.6, 0.05, -0.4, 0.25), (250, 210, 0)),
    ]),  # fmt: skip
    # parrot: blue body, yellow belly, green wing, red crest
    "bird_parrot": _parts([
        ("poly", [(0.5, 0.0), (1.05, 0.1), (0.95, 0.5)], (40, 170, 60)),
        ("ellipse", (-0.6, -0.35, 0.65, 0.5), (40, 90, 220)),
        ("ellipse", (-0.45, 0.0, 0.2, 0.5), (250, 215, 30)),
        ("poly", [(-0.9, -0.75), (-0.8, -1.1), (-0.65, -0.78), (-0.55, -1.05), (-0.45, -0.7)], (225, 30, 30)),
        ("ellipse", (-0.95, -0.8, -0.3, -0.15), (40, 90, 220)),
        ("poly", [(-0.95, -0.55), (-1.2, -0.42), (-0.92, -0.3)], K),
        ("poly", [(-0.15, -0.2), (0.55, -0.1), (0.15, 0.35)], (40, 170, 60)),
        ("ellipse", (-0.8, -0.62, -0.6, -0.42), WH), ("ellipse", (-0.74, -0.56, -0.66, -0.48), K),
        ("line", [(-0.15, 0.45), (-0.15, 0.9)], (120, 120, 120)), ("line", [(0.15, 0.45), (0.15, 0.9)], (120, 120, 120)),
    ]),  # fmt: skip
    # clownfish: orange with three white bands edged in black
    "fish_clown": _parts([
        ("poly", [(0.55, 0.0), (1.0, -0.55), (1.0, 0.55)], (245, 110, 20)),
        ("line", [(0.95, -0.55), (0.95, 0.55)], K, 0.08),
        ("ellipse", (-1.0, -0.5, 0.7, 0.5), (245, 110, 20)),
        ("rect", (-0.62, -0.5, -0.38, 0.5), K), ("rect", (-0.58, -0.5, -0.42, 0.5), WH),
        ("rect", (-0.07, -0.55, 0.2, 0.55), K), ("rect", (-0.03, -0.55, 0.16, 0.55), WH),
        ("rect", (0.48, -0.3, 0.62, 0.3), WH),
        ("ellipse", (-0.88, -0.2, -0.72, -0.04), K),
    ]),  # fmt: skip
    # white rabbit with one brown ear, brown eye patch and a teal bow tie
    "rabbit_bowtie": _parts([
        ("ellipse", (-0.55, -0.05, 0.75, 0.9), WH),
        ("ellipse", (0.6, 0.2, 0.95, 0.55), (240, 240, 240)),
        ("ellipse", (-0.75, -1.1, -0.5, -0.35), (140, 90, 45)),
        ("ellipse", (-0.45, -1.1, -0.2, -0.35), WH),
        ("ellipse", (-0.4, -1.0, -0.25, -0.45), (250, 150, 180)),
        ("ellipse", (-0.8, -0.55, -0.1, 0.15), WH),
        ("ellipse", (-0.62, -0.38, -0.35, -0.1), (140, 90, 45)),
        ("ellipse", (-0.55, -0.3, -0.43, -0.18), K),
        ("poly", [(-0.7, 0.05), (-0.45, 0.17), (-0.7, 0.3)], (20, 170, 170)),
        ("poly", [(-0.2, 0.05), (-0.45, 0.17), (-0.2, 0.3)], (20, 170, 170)),
        ("ellipse", (-0.5, 0.1, -0.4, 0.24), (10, 120, 120)),
    ]),  # fmt: skip
    # green turtle with a yellow hexagon on its shell and a purple bow on its head
    "turtle_hex": _parts([
        ("ellipse", (-1.0, -0.1, -0.5, 0.35), (120, 190, 90)),
        ("rect", (-0.6, 0.2, -0.4, 0.6), (120, 190, 90)), ("rect", (0.4, 0.2, 0.6, 0.6), (120, 190, 90)),
        ("pie", (-0.75, -0.7, 0.8, 0.75, 180, 360), (30, 110, 50)),
        ("poly", [(-0.2, -0.5), (0.2, -0.5), (0.38, -0.22), (0.2, 0.05), (-0.2, 0.05), (-0.38, -0.22)], (245, 215, 40)),
        ("rect", (-0.75, 0.0, 0.8, 0.12), (245, 215, 40)),
        ("poly", [(-0.95, -0.3), (-0.8, -0.12), (-0.65, -0.3), (-0.65, 0.0), (-0.95, 0.0)], (150, 50, 190)),
        ("ellipse", (-0.92, 0.08, -0.82, 0.18), K),
    ]),  # fmt: skip
    # teal mug, yellow rim, red heart emblem
    "cup_heart": _parts([
        ("ring", (0.25, -0.45, 0.95, 0.35, 0.42, -0.28, 0.78, 0.18), (20, 160, 160)),
        ("poly", [(-0.7, -0.7), (0.5, -0.7), (0.4, 0.8), (-0.6, 0.8)], (20, 160, 160)),
        ("rect", (-0.72, -0.78, 0.52, -0.6), (250, 215, 30)),
        ("ellipse", (-0.42, -0.3, -0.1, 0.02), (220, 30, 50)), ("ellipse", (-0.15, -0.3, 0.17, 0.02), (220, 30, 50)),
        ("poly", [(-0.4, -0.08), (0.15, -0.08), (-0.12, 0.35)], (220, 30, 50)),
    ]),  # fmt: skip
    # chair: yellow back with blue slats, purple seat, blue legs
    "chair_slat": _parts([
        ("rect", (0.2, -1.0, 0.6, 0.05), (245, 210, 40)),
        ("rect", (0.2, -0.8, 0.6, -0.68), (40, 80, 220)), ("rect", (0.2, -0.5, 0.6, -0.38), (40, 80, 220)),
        ("rect", (0.2, -0.2, 0.6, -0.08), (40, 80, 220)),
        ("rect", (-0.65, -0.02, 0.6, 0.2), (140, 50, 180)),
        ("rect", (-0.6, 0.15, -0.45, 0.95), (40, 80, 220)), ("rect", (0.4, 0.15, 0.55, 0.95), (40, 80, 220)),
    ]),  # fmt: skip
    # lamp: green shade with an orange fringe, pink pole and base
    "lamp_fringe": _parts([
        ("rect", (-0.08, -0.3, 0.08, 0.8), (245, 130, 180)),
        ("ellipse", (-0.5, 0.72, 0.5, 1.0), (245, 130, 180)),
        ("poly", [(-0.3, -0.95), (0.3, -0.95), (0.65, -0.3), (-0.65, -0.3)], (40, 160, 70)),
        ("poly", [(-0.65, -0.32), (-0.5, -0.1), (-0.35, -0.32), (-0.2, -0.1), (-0.05, -0.32), (0.1, -0.1),
                  (0.25, -0.32), (0.4, -0.1), (0.55, -0.32), (0.65, -0.32)], (245, 140, 20)),
    ]),  # fmt: skip
    # car: red front half, white back half, blue racing stripe, yellow hubs
    "car_racer": _parts([
        ("poly", [(-0.5, -0.2), (-0.25, -0.65), (0.4, -0.65), (0.65, -0.2)], WH),
        ("rect", (-1.0, -0.25, 0.0, 0.4), (220, 30, 30)), ("rect", (0.0, -0.25, 1.0, 0.4), WH),
        ("rect", (-1.0, 0.0, 1.0, 0.12), (40, 80, 220)),
        ("ellipse", (-0.75, 0.2, -0.3, 0.65), K), ("ellipse", (0.3, 0.2, 0.75, 0.65), K),
        ("ellipse", (-0.6, 0.33, -0.45, 0.5), (250, 215, 30)), ("ellipse", (0.45, 0.33, 0.6, 0.5), (250, 215, 30)),
    ]),  # fmt: skip
    # blue house, orange roof, round window, chimney with smoke puffs
    "house_chimney": _parts([
        ("rect", (0.35, -0.95, 0.6, -0.35), (150, 60, 40)),
        ("ellipse", (0.45, -1.2, 0.75, -0.95), (200, 200, 200)), ("ellipse", (0.7, -1.35, 0.95, -1.12), (200, 200, 200)),
        ("rect", (-0.75, -0.2, 0.75, 0.95), (50, 100, 210)),
        ("poly", [(-0.95, -0.15), (0.0, -0.95), (0.95, -0.15)], (245, 130, 20)),
        ("ellipse", (-0.2, -0.45, 0.2, -0.2), WH),
        ("rect", (0.2, 0.35, 0.55, 0.95), (250, 215, 30)),
        ("ellipse", (-0.6, 0.05, -0.2, 0.45), WH), ("line", [(-0.4, 0.05), (-0.4, 0.45)], K),
    ]),  # fmt: skip
    # rainbow-banded vase with a black neck
    "vase_rainbow": _parts([
        ("rect", (-0.25, -1.0, 0.25, -0.4), K),
        ("ellipse", (-0.7, -0.55, 0.7, 0.95), (220, 30, 30)),
        ("band", (-0.7, -0.1, 0.7, 0.15, -0.7, -0.55, 0.7, 0.95), (250, 215, 30)),
        ("band", (-0.7, 0.15, 0.7, 0.4, -0.7, -0.55, 0.7, 0.95), (40, 170, 60)),
        ("band", (-0.7, 0.4, 0.7, 0.65, -0.7, -0.55, 0.7, 0.95), (40, 80, 220)),
    ]),  # fmt: skip
}


# --------------------------------------------------------------------------------------------- styles


def _halftone(img: Image.Image, rng) -> Image.Image:
    """Coloured dots on cream paper, dot size by darkness, on a 6 px grid."""
    a = np.asarray(img).astype(np.float32)
    out = Image.new("RGB", (W.RES * 2, W.RES * 2), (250, 240, 215))
    d = ImageDraw.Draw(out)
    cell = 6
    for y in range(0, W.RES, cell):
        for x in range(0, W.RES, cell):
            c = a[y : y + cell, x : x + cell].reshape(-1, 3).mean(0)
            dark = 1 - c.mean() / 255
            rad = (0.35 + 0.75 * dark) * cell
            cx, cy = (x + cell / 2) * 2, (y + cell / 2) * 2
            sat = np.clip((c - c.mean()) * 1.6 + c.mean() * 0.8, 0, 255)
            d.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=tuple(int(v) for v in sat))
    return out.resize((W.RES, W.RES), Image.BOX)


def _neon(img: Image.Image, rng) -> Image.Image:
    """Glowing cyan (vertical) and magenta (horizontal) edges on a dark violet ground."""
    g = np.asarray(img.convert("L")).astype(np.float32)
    gx = np.abs(np.diff(g, axis=1, append=g[:, -1:]))
    gy = np.abs(np.diff(g, axis=0, append=g[-1:, :]))
    gx, gy = np.clip(gx / 40, 0, 1), np.clip(gy / 40, 0, 1)
    base = np.array([30, 10, 45], np.float32)
    out = base + gx[..., None] * np.array([0, 230, 240]) + gy[..., None] * np.array([240, 20, 200])
    out = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    glow = out.filter(ImageFilter.GaussianBlur(1.5))
    return Image.fromarray(np.clip(np.asarray(out).astype(np.int16) + np.asarray(glow), 0, 255).astype(np.uint8))


def _scanline(img: Image.Image, rng) -> Image.Image:
    """A teal-to-orange duotone with dark scanlines every other row and a thick black frame."""
    g = np.asarray(img.convert("L")).astype(np.float32)[..., None] / 255
    teal, orange = np.array([10, 90, 100], np.float32), np.array([255, 170, 60], np.float32)
    out = teal * (1 - g) + orange * g
    out[1::3] *= 0.45
    out[:3], out[-3:], out[:, :3], out[:, -3:] = 0, 0, 0, 0
    return Image.fromarray(out.astype(np.uint8))


STYLES = {"style_halftone": _halftone, "style_neon": _neon, "style_scanline": _scanline}

# --------------------------------------------------------------------------------------------- scenes


def _scene_island(rng) -> np.ndarray:
    """Pink-orange sunset sky, big half sun, purple sea, a yellow island with a palm tree on the right."""
    S = W.S
    a = np.empty((S, S, 3), np.uint8)
    a[:70] = W._gradient((250, 120, 150), (255, 190, 90), 70)
    img = Image.fromarray(a)
    d = ImageDraw.Draw(img)
    d.ellipse([20, 40, 70, 90], fill=(255, 240, 120))
    d.rectangle([0, 66, S, S], fill=(95, 45, 140))
    for y in range(74, S, 10):
        d.line([(0, y), (S, y)], fill=(135, 80, 180), width=2)
    d.pieslice([78, 72, 140, 108], 180, 360, fill=(245, 215, 80))
    d.line([(110, 90), (104, 52)], fill=(110, 70, 30), width=4)
    for ang in (-150, -110, -70, -30):
        t = np.deg2rad(ang)
        d.line([(104, 52), (104 + 18 * np.cos(t), 52 + 18 * np.sin(t) + 6)], fill=(30, 140, 60), width=4)
    return np.asarray(img).copy()


def _scene_checkroom(rng) -> np.ndarray:
    """Green wallpaper with yellow stripes, a round blue window, a red and white checkered floor."""
    S = W.S
    a = np.empty((S, S, 3), np.uint8)
    a[:] = (40, 120, 80)
    a[:, ::12] = (230, 200, 60)
    a[:, 1::12] = (230, 200, 60)
    img = Image.fromarray(a)
    d = ImageDraw.Draw(img)
    d.ellipse([84, 10, 118, 44], fill=(250, 250, 250))
    d.ellipse([88, 14, 114, 40], fill=(110, 170, 240))
    d.line([(101, 14), (101, 40)], fill=(250, 250, 250), width=2)
    y0 = 86
    for i, y in enumerate(range(y0, S, 11)):
        for j, x in enumerate(range(0, S, 16)):
            d.rectangle([x, y, x + 16, y + 11], fill=(210, 30, 40) if (i + j) % 2 else (245, 245, 245))
    return np.asarray(img).copy()


def _scene_twinsun(rng) -> np.ndarray:
    """Teal sky with two orange suns and purple snow-capped peaks."""
    S = W.S
    img = Image.fromarray(W._gradient((20, 150, 150), (150, 220, 200)).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse([12, 10, 34, 32], fill=(250, 140, 30))
    d.ellipse([40, 22, 54, 36], fill=(250, 140, 30))
    for x, h, w in ((30, 80, 50), (95, 95, 55)):
        d.polygon([(x - w, S), (x, S - h), (x + w, S)], fill=(110, 50, 150))
        d.polygon([(x - w * 0.28, S - h * 0.72), (x, S - h), (x + w * 0.28, S - h * 0.72)], fill=(250, 250, 250))
    return np.asarray(img).copy()


BACKGROUNDS = {"scene_island": _scene_island, "scene_checkroom": _scene_checkroom, "scene_twinsun": _scene_twinsun}

# --------------------------------------------------------------------------------------------- registry

_SUBJECT_PROMPTS = (
    "a large {token} {class} in the center, on a white background",
    "a small {token} {class} on the left, on a snow background",
    "a large {token} {class} on the right, on a night background",
    "a small {token} {class} at the top, on a brick background",
    "a large {token} {class} in the center, on a beach background, in pixelated style",
    "a small {token} {class} on the left and a small red star on the right, on a grass background",
)
_STYLE_PROMPTS = (
    "a large red star in the center, on a white background, in {token} {class}",
    "a small blue dog on the left, on a grass background, in {token} {class}",
    "a large yellow house on the right, on a sky background, in {token} {class}",
    "a large green striped circle at the top, on a sand background, in {token} {class}",
    "a small pink cat at the bottom, on a room background, in {token} {class}",
    "a large orange car in the center, on a water background, in {token} {class}",
)
_SCENE_PROMPTS = (
    "a large red star in the center, on a {token} {class} background",
    "a small blue dog on the left, on a {token} {class} background",
    "a large yellow cup on the right, on a {token} {class} background",
    "a small white bird at the top, on a {token} {class} background",
    "a large purple heart at the bottom, on a {token} {class} background, in blurred style",
    "a small orange car on the left and a small pink ring on the right, on a {token} {class} background",
)

_SPECS = [
    ("dog_patch", "dog", "live_subject", 5, "brown dog, white chest and muzzle, black ears, red collar"),
    ("dog_bandana", "dog", "live_subject", 4, "golden dog with black spots, pointy ears, blue bandana"),
    ("cat_tabby", "cat", "live_subject", 5, "orange tabby cat, dark stripes, big green eyes, white paws"),
    ("cat_tuxedo", "cat", "live_subject", 6, "black and white tuxedo cat, red collar with a yellow bell"),
    ("bird_parrot", "bird", "live_subject", 4, "parrot: blue body, yellow belly, green wing, red crest"),
    ("fish_clown", "fish", "live_subject", 5, "clownfish: orange with white bands edged in black"),
    ("rabbit_bowtie", "rabbit", "live_subject", 4, "white rabbit, one brown ear, eye patch, teal bow tie"),
    ("turtle_hex", "turtle", "live_subject", 6, "green turtle, yellow hexagon on its shell, purple bow"),
    ("cup_heart", "cup", "object", 4, "teal mug, yellow rim, red heart emblem"),
    ("chair_slat", "chair", "object", 5, "chair: yellow back with blue slats, purple seat, blue legs"),
    ("lamp_fringe", "lamp", "object", 4, "lamp: green shade with an orange fringe, pink pole and base"),
    ("car_racer", "car", "object", 6, "car: red front, white back, blue racing stripe, yellow hubs"),
    ("house_chimney", "house", "object", 5, "blue house, orange roof, round window, smoking chimney"),
    ("vase_rainbow", "vase", "object", 4, "vase with red, yellow, green and blue bands and a black neck"),
    ("style_halftone", "style", "style", 5, "halftone: coloured dots on cream paper"),
    ("style_neon", "style", "style", 5, "neon: glowing cyan and magenta edges on dark violet"),
    ("style_scanline", "style", "style", 4, "teal-orange duotone with scanlines and a black frame"),
    ("scene_island", "beach", "scene", 5, "sunset island beach: pink sky, half sun, purple sea, palm tree"),
    ("scene_checkroom", "room", "scene", 4, "green striped wallpaper, round window, red-white checkered floor"),
    ("scene_twinsun", "mountain", "scene", 6, "teal sky, two orange suns, purple snow-capped peaks"),
]
_PROMPTS = {"live_subject": _SUBJECT_PROMPTS, "object": _SUBJECT_PROMPTS, "style": _STYLE_PROMPTS, "scene": _SCENE_PROMPTS}

CONCEPTS: dict[str, MicroConcept] = {
    name: MicroConcept(name, cls, cat, n, _PROMPTS[cat], desc) for name, cls, cat, n, desc in _SPECS
}

seq20: list[str] = list(CONCEPTS)
# 7 concepts mixing all four categories (3 live subjects, 2 objects, 1 style, 1 scene), interleaved.
seq7: list[str] = ["dog_patch", "cup_heart", "cat_tabby", "style_neon", "bird_parrot", "scene_island", "car_racer"]

# Generic backgrounds a personal subject / object is photographed on (its training images).
_TRAIN_BGS = ("grass", "sand", "sky", "water", "room", "gray", "mountain")
_TRAIN_POS = ("left", "right", "center", "bottom", "top")


def concept_scenes(name: str) -> list[Scene]:
    """The concept's training scenes (deterministic from its name)."""
    c = _get(name)
    rng = np.random.default_rng(c.seed)
    scenes = []
    for i in range(c.n_images):
        seed = int(rng.integers(2**31))
        if c.category in ("live_subject", "object"):
            bg = _TRAIN_BGS[(i + int(rng.integers(len(_TRAIN_BGS)))) % len(_TRAIN_BGS)]
            obj = Obj(c.class_name, size=("large", "small")[i % 3 == 2], position=_TRAIN_POS[i % len(_TRAIN_POS)], glyph=name)
            scenes.append(Scene((obj,), background=bg, seed=seed))
        else:
            obj = W.sample_object(rng, "train", "white", position=_TRAIN_POS[i % len(_TRAIN_POS)])
            if c.category == "style":
                bg = W.BACKGROUNDS[int(rng.integers(len(W.BACKGROUNDS)))]
                scenes.append(Scene((obj,), background=bg, style=name, style_word="{token}", seed=seed))
            else:
                scenes.append(Scene((obj,), background=name, background_word="{token} " + c.class_name, seed=seed))
    return scenes


def render(scene: Scene) -> Image.Image:
    """Render a scene that may contain personal glyphs, styles or backgrounds."""
    return W.render_scene(scene, painters=GLYPHS, backgrounds=BACKGROUNDS, styles=STYLES)


def _get(name: str) -> MicroConcept:
    if name not in CONCEPTS:
        raise KeyError(f"unknown micro concept {name!r}; choose one of {sorted(CONCEPTS)}")
    return CONCEPTS[name]


def materialize(name: str, root: Path | str) -> Path:
    """Write ``root/name/00.png ...`` and ``root/name/metadata.jsonl`` (imagefolder convention).

    Deterministic and idempotent: an existing complete folder is returned untouched; a new one is
    written into a temporary folder beside it and renamed into place, so no half-written folder
    is ever visible.
    """
    _get(name)  # raises for an unknown concept name
    root = Path(root)
    out = root / name
    if (out / "metadata.jsonl").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        lines = []
        for i, scene in enumerate(concept_scenes(name)):
            fname = f"{i:02d}.png"
            render(scene).save(tmp / fname, format="PNG")
            lines.append(json.dumps({"file_name": fname, "text": scene.caption()}))
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        try:
            os.rename(tmp, out)
        except OSError:  # another process won the race, or a stale incomplete folder is there
            if (out / "metadata.jsonl").is_file():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                shutil.rmtree(out, ignore_errors=True)
                os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def class_prompt(caption: str) -> str:
    """The class (prior) prompt of a concept caption: ``"a large {token} dog ..." -> "a large dog ..."``."""
    return caption.replace("{token} ", "").replace("{token}", "")


# --------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class MultiConceptPrompt:
    """A prompt with one placeholder per concept, named by concept: ``"a {dog_patch} dog ..."``."""

    template: str
    concepts: tuple[str, ...]

    def render(self, tokens: Mapping[str, str]) -> str:
        """Fill the placeholders with each concept's modifier token (``{"dog_patch": "<new1>"}``)."""
        missing = [c for c in self.concepts if c not in tokens]
        if missing:
            raise KeyError(f"no modifier token given for concept(s) {missing}")
        return self.template.format(**{c: tokens[c] for c in self.concepts})


def _pair_template(a: MicroConcept, b: MicroConcept) -> str | None:
    thing = ("live_subject", "object")
    A, B = "{" + a.name + "}", "{" + b.name + "}"
    if a.category in thing and b.category in thing:
        return f"a small {A} {a.class_name} on the left and a small {B} {b.class_name} on the right, on a grass background"
    if a.category in thing and b.category == "style":
        return f"a large {A} {a.class_name} in the center, on a sand background, in {B} style"
    if a.category in thing and b.category == "scene":
        return f"a large {A} {a.class_name} on the left, on a {B} {b.class_name} background"
    if a.category == "style" and b.category == "scene":
        return f"a large red star in the center, on a {B} {b.class_name} background, in {A} style"
    if b.category in thing or (a.category == "scene" and b.category == "style"):
        return _pair_template(b, a)
    return None  # two styles or two scenes cannot be combined in one image


def multi_concept_prompts(names: Sequence[str]) -> list[MultiConceptPrompt]:
    """One prompt per combinable pair of ``names`` (two styles or two scenes do not combine)."""
    out = []
    for x, y in itertools.combinations(names, 2):
        t = _pair_template(_get(x), _get(y))
        if t is not None:
            out.append(MultiConceptPrompt(t, (x, y)))
    return out


def calibration_prompts(n: int = 20, seed: int = 2024) -> list[str]:
    """``n`` diverse world captions with shapes only (no concept class nouns): CNS's general-neuron
    calibration set (Eq. 5)."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        s = W.sample_scene(rng, "train", two_objects=0.25, styled=0.35)
        if all(o.noun in W.SHAPES for o in s.objects) and s.caption() not in out:
            out.append(s.caption())
    return out


def zero_shot_scenes(n: int = 20, seed: int = 777) -> list[Scene]:
    """Held-out world scenes (colour-noun pairs absent from pretraining), no concept token."""
    return W.heldout_scenes(n, seed=seed)


def zero_shot_prompts(n: int = 20, seed: int = 777) -> list[str]:
    """Captions of ``zero_shot_scenes``: plain world prompts held out from pretraining."""
    return [s.caption() for s in zero_shot_scenes(n, seed)]


def warn_words_it_cannot_draw(concepts, cache_dir=None) -> list[str]:
    """One ``UserWarning`` per own concept (not ``source: microworld``) whose captions, class noun or
    evaluation prompts use words outside the micro world (``world.CAPTION_WORDS``): the micro
    pipeline learned no other words, so such a caption trains the token on words that mean
    nothing to it and such a prompt scores nothing it can draw. Returns the warnings' texts."""
    import warnings

    from .world import NOUNS, words_outside_the_world

    tokens = [c.token for c in concepts]
    out = []
    for i, c in enumerate(concepts):
        if c.source == "microworld":
            continue
        found: dict[str, str] = {}
        texts = [(f"the caption of {p.name}", cap) for p, cap in zip(c.image_paths(cache_dir), c.captions(cache_dir))]
        texts += [("an evaluation prompt", c.fill(t, with_token=False)) for t in c.eval_prompts()]
        texts += [("the prior prompt", c.class_prompt())]
        for where, text in texts:
            for w in words_outside_the_world(text, tokens):
                found.setdefault(w, f"{where}: {text!r}")
        if found:
            words = list(found)
            msg = (
                f"data.concepts[{i}] ({c.name!r}) on model=micro: the micro world cannot draw "
                f"{', '.join(repr(w) for w in words[:12])}{' ...' if len(words) > 12 else ''} "
                f"(first in {found[words[0]]}). Its text encoder knows only the world's words "
                f"(nouns {', '.join(NOUNS)}; colours, patterns, sizes, positions, "
                "backgrounds, styles: docs/microworld.md). Use world words in the captions, class_name and prompts "
                "(e.g. caption_template: 'a large {token} {class} in the center, on a white background'), or a real model (model=sd15)."
            )
            warnings.warn(msg, UserWarning, stacklevel=2)
            out.append(msg)
    return out
