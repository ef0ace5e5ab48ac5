"""An identity embedding for the micro world ("micro DINO"): tells concept *instances* apart.

The micro CLIP's image embedding mostly reflects background and layout, so CLIP-I barely moves when
a personal subject is learned (docs/microworld.md). DreamBooth reports DINO beside CLIP-I because
self-supervised features separate instances; this module trains the micro world's counterpart.

* **Random procedural identities** (never the 20 personal concepts: nothing here reads
  ``concepts.GLYPHS`` / ``STYLES`` / ``BACKGROUNDS`` while making training data):

  - ``glyph``: a class noun's (or shape's) world silhouette with every part recoloured from random
    RGB colours, an optional body pattern, and random accessories (spots, patches, bands, collars,
    emblems, stripes, bows) on the body: the kind of thing a personal subject is. Half of them start
    from the world's own look (one world colour) and change a few parts, and "siblings" differ from
    another identity in one part or accessory, so small accessories and part colours matter.
  - ``plain``: a world object (one world colour + pattern), so "a brown dog" is an identity too and
    a hard negative of "a brown dog with a white chest".
  - ``style``: a composition of generic image operations with random parameters (duotone / tritone
    maps, edge glow, dot screens, hatching, posterize, channel mixing, scanlines, frames, grain...),
    applied to random world scenes.
  - ``scene``: a random background layout (gradient sky or wallpaper, discs, hills / peaks, a
    ground, sea, floor band, a prop) behind random world objects.

  Everything renders through ``world.render_scene`` with the identity's painter / background /
  style registered under its own key, so images look like the world's.
* **Views** (``identity_views``): the same identity in different scenes: background, position,
  size and seed for objects; content for styles; foreground for scenes.
* **Model**: a transformers ``ViTModel`` (64 px, 8 px patches, hidden 192, 6 layers, 2.7 M
  parameters) whose CLS feature ``last_hidden_state[:, 0]`` is the embedding; saved as a plain HF
  folder (fp16 safetensors + ``preprocessor_config.json``), so ``evaluation.metrics.load_dino``
  scores with it exactly as with a real DINO.
* **Training** (``train``): SupCon / InfoNCE (temperature 0.1) over batches of many identities x 2
  views rendered in DataLoader workers: about 60% objects, in same-noun groups of 4 (a plain world
  object, a glyph of the same world colour changed in a few things, its sibling, a random glyph),
  30% styles, in groups of 3 shown on the same content (a style, its sibling with one parameter
  changed, a random style), 10% scenes. Batch ``k`` is a pure function of ``(seed, k)``, so a
  resumed run sees the same data. AdamW, warm-up + cosine, bf16 autocast on CUDA. Only a 2 px
  shift jitter: colour is identity. Rendering: about 700 images/s per CPU process (measured on the
  2-core shared dev machine at load average 6).
* **Validation** (``evaluate``): per personal concept, the AUC that the concept's new renders score
  above renders of its class in other colours / patterns / styles / backgrounds, where the score is
  the mean cosine to the concept's training images; the micro CLIP's AUC in a second column.

    python -m cns_lightning.microworld.identity train --out DIR --steps 4000 --batch 512 --workers 15 \
        --max-seconds 540 --device cuda        # rerun the same command to resume
    python -m cns_lightning.microworld.identity eval --model DIR --out DIR/eval.json
"""

from __future__ import annotations

import argparse
import colorsys
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from .trainstate import load_training_state, save_training_state
from . import concepts as C
from . import world as W
from .assets import ROOT as ASSETS_ROOT

IDENTITY_DIR = ASSETS_ROOT / "identity"
KINDS = ("glyph", "plain", "style", "scene")
MEAN = STD = (0.5, 0.5, 0.5)
VIT = dict(
    image_size=W.RES, patch_size=8, hidden_size=192, num_hidden_layers=6, num_attention_heads=6, intermediate_size=768
)
RGB = tuple[int, int, int]


# --------------------------------------------------------------------------------------------- colours


def random_rgb(rng: np.random.Generator) -> RGB:
    """A random colour: 30% near a world colour (hard cases), 10% a grey, else any HSV colour."""
    u = rng.random()
    if u < 0.3:
        return W._jitter(list(W.COLOURS.values())[rng.integers(len(W.COLOURS))], rng, 25)
    if u < 0.4:
        v = int(rng.integers(0, 256))
        return (v, v, v)
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.3, 1), rng.uniform(0.3, 1))
    return (int(255 * r), int(255 * g), int(255 * b))


def _dark_rgb(rng) -> RGB:
    return tuple(int(c) for c in rng.integers(0, 70, 3))  # type: ignore[return-value]


def _light_rgb(rng) -> RGB:
    return tuple(int(c) for c in rng.integers(170, 256, 3))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- identities


class GlyphParams(NamedTuple):
    """A glyph identity: one RGB per layer of the world painter, a body pattern, accessories.

    ``pattern``: () or (kind, rgb, period, angle, phase) with kind stripes / dots / checks / world:<p>.
    ``accessories``: ((spec, clip), ...) with spec in ``concepts._parts`` format (unit coordinates);
    ``clip`` keeps the accessory inside the body silhouette (bands, stripes, spots).
    """

    fills: tuple
    pattern: tuple
    accessories: tuple


@dataclass(frozen=True)
class Identity:
    """One identity. ``params``: GlyphParams (glyph), (colour, pattern) (plain), a tuple of image
    operations (style) or a layout tuple (scene). ``noun``: the class noun / shape it is drawn as
    (glyph, plain), else "style" / "scene"."""

    kind: str
    noun: str
    params: tuple

    @property
    def key(self) -> str:
        """The name its painter / background / style is registered under for ``render_scene``."""
        return f"identity-{self.kind}-{zlib.crc32(repr((self.noun, self.params)).encode()):08x}"


_GRID = (np.mgrid[0 : W.S, 0 : W.S].astype(np.float32) + 0.5)  # (y, x) pixel centres on the canvas


@functools.lru_cache(maxsize=None)
def _canonical(noun: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """Body points (unit coordinates, non-dark layers) and per-layer areas of the world painter."""
    cx = cy = W.S / 2
    r = W.S / 2.6
    layers = W.PAINTERS[noun](cx, cy, r, np.random.default_rng(0))
    masks = [_mask(fn) for fn, _ in layers]
    body = np.any([m for m, (_, fill) in zip(masks, layers) if fill != W.DARK], axis=0)
    ys, xs = np.nonzero(body)
    pts = np.stack([(xs + 0.5 - cx) / r, (ys + 0.5 - cy) / r], 1)
    return pts, tuple(float(m.sum()) / (r * r) for m in masks)


def _mask(fn) -> np.ndarray:
    """The boolean S x S mask a painter layer draws (layers may return their own mask array)."""
    img = Image.new("L", (W.S, W.S), 0)
    drawn = fn(ImageDraw.Draw(img))
    return (np.asarray(img) if drawn is None else drawn) > 127


def _accessory(rng, pts: np.ndarray) -> list[tuple]:
    """One random accessory at a random body point: [(spec, clip), ...] (a bow has two parts)."""
    x, y = (float(v) for v in pts[rng.integers(len(pts))])
    rgb = random_rgb(rng)
    kind = ("spot", "patch", "band", "collar", "emblem", "stripe", "bow")[rng.integers(7)]
    if kind in ("spot", "patch"):
        a, b = rng.uniform(0.07, 0.2, 2) if kind == "spot" else rng.uniform(0.2, 0.4, 2)
        return [(("ellipse", (x - a, y - b, x + a, y + b), rgb), True)]
    if kind == "band":
        w = rng.uniform(0.06, 0.16)
        box = (x - w, -1.5, x + w, 1.5) if rng.random() < 0.5 else (-1.5, y - w, 1.5, y + w)
        return [(("rect", box, rgb), True)]
    if kind == "collar":
        w, h = rng.uniform(0.15, 0.35), rng.uniform(0.05, 0.1)
        return [(("rect", (x - w, y - h, x + w, y + h), rgb), False)]
    if kind == "stripe":
        x2, y2 = (float(v) for v in pts[rng.integers(len(pts))])
        return [(("line", ((x, y), (x2, y2)), rgb, rng.uniform(0.05, 0.12)), True)]
    s = rng.uniform(0.12, 0.25)
    if kind == "bow":
        left = ("poly", ((x - s, y - s / 2), (x, y), (x - s, y + s / 2)), rgb)
        return [(left, False), (("poly", ((x + s, y - s / 2), (x, y), (x + s, y + s / 2)), rgb), False)]
    n = int(rng.integers(3, 7))  # emblem: a small polygon / star
    inner = s * (rng.uniform(0.4, 0.6) if rng.random() < 0.5 else 1.0)
    rot = rng.uniform(0, math.pi)
    poly = tuple(
        (x + (s if k % 2 == 0 else inner) * math.cos(rot + k * math.pi / n), y + (s if k % 2 == 0 else inner) * math.sin(rot + k * math.pi / n))
        for k in range(2 * n)
    )
    return [(("poly", poly, rgb), False)]


def _random_pattern(rng) -> tuple:
    kind = ("stripes", "dots", "checks")[rng.integers(3)]
    return (kind, random_rgb(rng), float(rng.uniform(0.15, 0.45)), float(rng.uniform(0, math.pi)), float(rng.random()))


def random_glyph(rng: np.random.Generator, noun: str | None = None, world_look: bool | None = None, colour: str | None = None) -> Identity:
    """A random multi-colour glyph of ``noun`` (a random class noun / shape if None).

    ``world_look``: start from the world's one-colour look (world colour ``colour``, random if None,
    its shade for wings) and change one to three things: the hardest negative of a plain object.
    """
    noun = noun or (W.CLASS_NOUNS[rng.integers(len(W.CLASS_NOUNS))] if rng.random() < 0.85 else W.SHAPES[rng.integers(len(W.SHAPES))])
    world_look = bool(rng.random() < 0.5) if world_look is None else world_look
    pts, _ = _canonical(noun)
    layers = W.PAINTERS[noun](0.0, 0.0, 1.0, rng)
    if world_look:
        colour = colour or list(W.COLOURS)[rng.integers(len(W.COLOURS))]
        body, wing = W.COLOURS[colour], W._shade(W.COLOURS[colour])
        p_part, n_acc = 0.12, int(rng.integers(0, 3))
        pattern = ("world:" + W.PATTERNS[1 + rng.integers(3)], W._shade(body), 0.0, 0.0, 0.0) if rng.random() < 0.25 else ()
    else:
        body, wing = random_rgb(rng), random_rgb(rng)
        p_part, n_acc = 0.3, int(rng.choice(5, p=(0.15, 0.3, 0.3, 0.15, 0.1)))
        pattern = _random_pattern(rng) if rng.random() < 0.25 else ()
    defaults = [body if fill == "main" else wing if isinstance(fill, str) else tuple(fill) for _, fill in layers]
    fills = [random_rgb(rng) if rng.random() < (p_part if isinstance(fill, str) else 0.4) else d for d, (_, fill) in zip(defaults, layers)]
    acc = [a for _ in range(n_acc) for a in _accessory(rng, pts)]
    ident = Identity("glyph", noun, GlyphParams(tuple(fills), pattern, tuple(acc)))
    if world_look and not acc and not pattern and fills == defaults:
        ident = sibling(ident, rng)  # nothing changed yet: it would be the plain world object
    return ident


def sibling(ident: Identity, rng: np.random.Generator) -> Identity:
    """A glyph that differs from ``ident`` in one visible thing: a part's colour (a part covering at
    least 2% of the object's 2r x 2r box), an accessory's colour, one accessory more or one less."""
    g: GlyphParams = ident.params
    _, areas = _canonical(ident.noun)
    choice = rng.integers(4) if g.accessories else rng.choice([0, 3])
    if choice == 0:
        big = [i for i, a in enumerate(areas) if a >= 0.08] or [int(np.argmax(areas))]
        i = big[rng.integers(len(big))]
        fills = list(g.fills)
        fills[i] = random_rgb(rng)
        return replace(ident, params=g._replace(fills=tuple(fills)))
    acc = list(g.accessories)
    if choice == 1:
        i = int(rng.integers(len(acc)))
        (spec, clip) = acc[i]
        acc[i] = ((spec[0], spec[1], random_rgb(rng), *spec[3:]), clip)
    elif choice == 2:
        acc.pop(int(rng.integers(len(acc))))
    else:
        acc += _accessory(rng, _canonical(ident.noun)[0])
    return replace(ident, params=g._replace(accessories=tuple(acc)))


def random_plain(rng: np.random.Generator, noun: str | None = None, colour: str | None = None) -> Identity:
    """A plain world object (one world colour and pattern) as an identity."""
    noun = noun or W.NOUNS[rng.integers(len(W.NOUNS))]
    colour = colour or list(W.COLOURS)[rng.integers(len(W.COLOURS))]
    pattern = W.PATTERNS[rng.integers(len(W.PATTERNS))] if rng.random() < 0.6 else "solid"
    return Identity("plain", noun, (colour, pattern))


# ---- styles: image operations on float32 64 x 64 x 3 arrays (0..255); params drawn by _op_params


def _lum(a):
    return a @ np.array([0.299, 0.587, 0.114], np.float32)


def _duotone(a, rng, dark, light, gamma):
    g = (_lum(a)[..., None] / 255) ** gamma
    return np.asarray(dark, np.float32) * (1 - g) + np.asarray(light, np.float32) * g


def _tritone(a, rng, c0, c1, c2):
    g = _lum(a)[..., None] / 255
    c0, c1, c2 = (np.asarray(c, np.float32) for c in (c0, c1, c2))
    lo, hi = np.clip(2 * g, 0, 1), np.clip(2 * g - 1, 0, 1)
    return np.where(g < 0.5, c0 * (1 - lo) + c1 * lo, c1 * (1 - hi) + c2 * hi)


def _edges(a, rng, ground, col_x, col_y, gain, glow):
    g = _lum(a)
    gx = np.clip(np.abs(np.diff(g, axis=1, append=g[:, -1:])) / gain, 0, 1)[..., None]
    gy = np.clip(np.abs(np.diff(g, axis=0, append=g[-1:, :])) / gain, 0, 1)[..., None]
    out = np.asarray(ground, np.float32) + gx * np.asarray(col_x, np.float32) + gy * np.asarray(col_y, np.float32)
    if glow > 0:
        out = out + _blur(out, rng, glow)
    return out


def _dots(a, rng, cell, paper, ink, boost):
    """A dot screen drawn at 2x: one dot per cell, its radius by the cell's darkness."""
    n = -(-W.RES // cell)
    pad = np.pad(a, ((0, n * cell - W.RES), (0, n * cell - W.RES), (0, 0)), mode="edge")
    means = pad.reshape(n, cell, n, cell, 3).mean((1, 3))
    rad = (0.3 + 0.75 * (1 - means.mean(-1) / 255)) * cell / 2 * 1.2
    m = means.mean(-1, keepdims=True)
    col = np.clip((means - m) * boost + m * 0.85, 0, 255) if ink is None else np.broadcast_to(np.asarray(ink, np.float32), means.shape)
    yy, xx = _GRID / 2  # 1x coordinates of the 2x canvas
    iy, ix = (yy // cell).astype(int), (xx // cell).astype(int)
    inside = (yy - (iy + 0.5) * cell) ** 2 + (xx - (ix + 0.5) * cell) ** 2 <= rad[iy, ix] ** 2
    out = np.where(inside[..., None], col[iy, ix], np.asarray(paper, np.float32))
    return out.reshape(W.RES, 2, W.RES, 2, 3).mean((1, 3))


def _hatch(a, rng, paper, ink, period, angle):
    """Engraving: parallel ink lines, thicker where the image is darker."""
    g = _lum(a) / 255
    yy, xx = np.mgrid[0 : W.RES, 0 : W.RES].astype(np.float32)
    t = ((xx * math.cos(angle) + yy * math.sin(angle)) / period) % 1.0
    on = (t < (1 - g) * 0.9)[..., None]
    return np.where(on, np.asarray(ink, np.float32), np.asarray(paper, np.float32))


def _posterize(a, rng, levels):
    q = 255.0 / (levels - 1)
    return np.round(a / q) * q


def _mix(a, rng, matrix, offset):
    return a @ np.asarray(matrix, np.float32).T + np.asarray(offset, np.float32)


def _solarize(a, rng, threshold):
    return np.where(a > threshold, 255 - a, a)


def _scanlines(a, rng, period, darkness, axis, phase):
    a = a.copy()
    rows = (np.arange(W.RES) + phase) % period == 0
    if axis == 0:
        a[rows] *= 1 - darkness
    else:
        a[:, rows] *= 1 - darkness
    return a


def _frame(a, rng, thick, rgb):
    a = a.copy()
    a[:thick], a[-thick:], a[:, :thick], a[:, -thick:] = rgb, rgb, rgb, rgb
    return a


def _grain(a, rng, sigma, mono):
    return a + rng.normal(0, sigma, (W.RES, W.RES, 1 if mono else 3)).astype(np.float32)


def _pixelate(a, rng, block):
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    k = max(2, round(W.RES / block))
    return np.asarray(img.resize((k, k), Image.BOX).resize((W.RES, W.RES), Image.NEAREST), np.float32)


def _blur(a, rng, radius):
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), np.float32)


def _vignette(a, rng, strength, rgb):
    yy, xx = np.mgrid[0 : W.RES, 0 : W.RES].astype(np.float32) / (W.RES - 1) - 0.5
    w = np.clip((np.sqrt(xx**2 + yy**2) * 2 - 0.5) * strength, 0, 1)[..., None]
    return a * (1 - w) + np.asarray(rgb, np.float32) * w


STYLE_OPS: dict[str, Callable] = {
    "duotone": _duotone, "tritone": _tritone, "edges": _edges, "dots": _dots, "hatch": _hatch,
    "posterize": _posterize, "mix": _mix, "solarize": _solarize, "scanlines": _scanlines, "frame": _frame,
    "grain": _grain, "pixelate": _pixelate, "blur": _blur, "vignette": _vignette,
}  # fmt: skip
_TONES = ("duotone", "tritone", "edges", "dots", "hatch", "posterize", "mix", "solarize", "none")
_PRE = ("pixelate", "blur")  # applied before the tone
_POST = ("scanlines", "frame", "grain", "vignette")


def _op_params(name: str, rng) -> tuple:
    """(name, *random parameters) of one style operation."""
    if name == "duotone":
        return (name, _dark_rgb(rng), _light_rgb(rng) if rng.random() < 0.7 else random_rgb(rng), float(rng.uniform(0.6, 1.5)))
    if name == "tritone":
        return (name, _dark_rgb(rng), random_rgb(rng), _light_rgb(rng))
    if name == "edges":
        return (name, _dark_rgb(rng), random_rgb(rng), random_rgb(rng), float(rng.uniform(20, 60)), float(rng.choice([0, 1.0, 1.5])))
    if name == "dots":
        paper, ink = _light_rgb(rng), (random_rgb(rng) if rng.random() < 0.4 else None)
        return (name, int(rng.integers(3, 9)), paper, ink, float(rng.uniform(1.0, 2.0)))
    if name == "hatch":
        return (name, _light_rgb(rng), _dark_rgb(rng) if rng.random() < 0.6 else random_rgb(rng), float(rng.uniform(2.5, 6)), float(rng.uniform(0, math.pi)))
    if name == "posterize":
        return (name, int(rng.integers(2, 4)))
    if name == "mix":
        m = np.eye(3)[rng.permutation(3)] * 0.6 + rng.uniform(-0.5, 0.8, (3, 3)) * 0.6
        return (name, tuple(map(tuple, m.round(3).tolist())), tuple(rng.uniform(-30, 60, 3).round(1).tolist()))
    if name == "solarize":
        return (name, float(rng.uniform(90, 180)))
    if name == "scanlines":
        return (name, int(rng.integers(2, 6)), float(rng.uniform(0.3, 0.8)), int(rng.integers(2) if rng.random() < 0.3 else 0), int(rng.integers(0, 6)))
    if name == "frame":
        return (name, int(rng.integers(1, 6)), random_rgb(rng))
    if name == "grain":
        return (name, float(rng.uniform(10, 28)), bool(rng.random() < 0.5))
    if name == "pixelate":
        return (name, int(rng.integers(2, 7)))
    if name == "blur":
        return (name, float(rng.uniform(0.8, 1.8)))
    if name == "vignette":
        return (name, float(rng.uniform(0.8, 2.0)), _dark_rgb(rng) if rng.random() < 0.7 else random_rgb(rng))
    raise ValueError(name)


def random_style(rng: np.random.Generator) -> Identity:
    """A style: 0-1 pre-operations, a tone operation, 0-2 post-operations (at least two in all
    when there is no tone, so the style is always visible)."""
    tone = _TONES[rng.integers(len(_TONES))]
    pre = [p for p in _PRE if rng.random() < 0.15]
    k = int(rng.choice(3, p=(0.35, 0.45, 0.2))) if tone != "none" else int(rng.integers(2, 4))
    post = list(rng.choice(_POST, size=min(k, len(_POST)), replace=False))
    ops = [_op_params(n, rng) for n in pre] + ([_op_params(tone, rng)] if tone != "none" else []) + [_op_params(str(n), rng) for n in post]
    return Identity("style", "style", tuple(ops))


def style_sibling(ident: Identity, rng: np.random.Generator) -> Identity:
    """A style that differs from ``ident`` in one parameter of one operation (a new cell size,
    paper colour, period, ink...) or by one post-operation more or less: fine-grained negatives,
    since a style that keeps the content's colours (a dot screen, scanlines) differs from another
    only in such parameters."""
    ops = list(ident.params)
    if rng.random() < 0.75:
        i = int(rng.integers(len(ops)))
        fresh = _op_params(ops[i][0], rng)
        k = 1 + int(rng.integers(len(fresh) - 1))
        ops[i] = ops[i][:k] + (fresh[k],) + ops[i][k + 1 :]
    elif len(ops) >= 2 and ops[-1][0] in _POST:
        ops.pop()
    missing = [n for n in _POST if n not in {op[0] for op in ops}]
    if tuple(ops) == ident.params and missing:
        ops.append(_op_params(missing[rng.integers(len(missing))], rng))
    return replace(ident, params=tuple(ops))


def _style_fn(ops: tuple):
    def style(img: Image.Image, rng) -> Image.Image:
        a = np.asarray(img, np.float32)
        for name, *p in ops:
            a = STYLE_OPS[name](a, rng, *p)
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))

    return style


# ---- scenes: a layout tuple (horizon, upper, discs, hills, ground, prop) drawn on the S x S canvas


def random_scene(rng: np.random.Generator) -> Identity:
    """A random background layout (parameters only; ``_scene_fn`` draws it)."""
    S = W.S
    h = int(rng.integers(54, 104))
    if rng.random() < 0.6:
        upper = ("sky", random_rgb(rng), random_rgb(rng))
    else:
        upper = ("wall", ("stripes", "hstripes", "checks", "dots")[rng.integers(4)], random_rgb(rng), random_rgb(rng), int(rng.integers(6, 20)))
    n_discs = int(rng.choice(4, p=(0.35, 0.35, 0.2, 0.1)))
    discs = tuple((float(rng.uniform(0, S)), float(rng.uniform(5, h)), float(rng.uniform(5, 26)), random_rgb(rng)) for _ in range(n_discs))
    hk = ("none", "peaks", "hills")[rng.choice(3, p=(0.45, 0.3, 0.25))]
    hills = (hk,) + tuple(
        (float(rng.uniform(-10, S + 10)), float(rng.uniform(20, 70)), float(rng.uniform(25, 70)), random_rgb(rng), bool(rng.random() < 0.4))
        for _ in range(int(rng.integers(1, 4)) if hk != "none" else 0)
    )
    gk = ("flat", "sea", "checker", "planks", "none")[rng.choice(5, p=(0.3, 0.2, 0.2, 0.15, 0.15))]
    ground = (gk, random_rgb(rng), random_rgb(rng), int(rng.integers(6, 20)), float(rng.uniform(1, 4)))
    pk = ("none", "tree", "palm", "window", "island")[rng.integers(5)]
    prop = (pk, float(rng.uniform(14, S - 14)), float(rng.uniform(14, h - 4)), float(rng.uniform(10, 22)), random_rgb(rng), random_rgb(rng))
    return Identity("scene", "scene", (h, upper, discs, hills, ground, prop))


def _draw_scene(layout: tuple) -> np.ndarray:
    S = W.S
    h, upper, discs, hills, ground, prop = layout
    if upper[0] == "sky":
        a = W._gradient(upper[1], upper[2]).astype(np.uint8)
    else:
        _, kind, c1, c2, p = upper
        yy, xx = _GRID.astype(int)
        m = {"stripes": xx // p % 2, "hstripes": yy // p % 2, "checks": (xx // p + yy // p) % 2,
             "dots": ((xx % p - p / 2) ** 2 + (yy % p - p / 2) ** 2 < (p / 3) ** 2)}[kind].astype(bool)  # fmt: skip
        a = np.where(m[..., None], np.asarray(c1, np.uint8), np.asarray(c2, np.uint8))
    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8))
    d = ImageDraw.Draw(img)
    for x, y, r, rgb in discs:
        d.ellipse([x - r, y - r, x + r, y + r], fill=rgb)
    for x, hgt, w, rgb, cap in hills[1:]:
        base = h if ground[0] != "none" else S
        if hills[0] == "peaks":
            d.polygon([(x - w, base), (x, base - hgt), (x + w, base)], fill=rgb)
            if cap:
                d.polygon([(x - w * 0.28, base - hgt * 0.72), (x, base - hgt), (x + w * 0.28, base - hgt * 0.72)], fill=(250, 250, 250))
        else:
            d.ellipse([x - w, base - hgt, x + w, base + hgt], fill=rgb)
    kind, c1, c2, p, amp = ground
    if kind != "none":
        d.rectangle([0, h, S, S], fill=c1)
    if kind == "sea":
        for y in range(h + 4, S, p):
            d.line([(x, y + amp * math.sin(x / 7 + y)) for x in range(0, S + 4, 4)], fill=c2, width=2)
    elif kind == "checker":
        for i, y in enumerate(range(h, S, p)):
            for j, x in enumerate(range(0, S, int(p * 1.5))):
                if (i + j) % 2:
                    d.rectangle([x, y, x + int(p * 1.5) - 1, y + p - 1], fill=c2)
    elif kind == "planks":
        for x in range(0, S, p + 4):
            d.line([(x, h), (x, S)], fill=c2, width=2)
    pk, x, y, s, ca, cb = prop
    if pk == "tree":
        d.rectangle([x - s * 0.15, y, x + s * 0.15, y + s * 1.6], fill=ca)
        d.ellipse([x - s, y - s, x + s, y + s * 0.6], fill=cb)
    elif pk == "palm":
        d.line([(x, y + s * 1.8), (x - s * 0.2, y)], fill=ca, width=4)
        for ang in (-160, -115, -65, -20):
            t = math.radians(ang)
            d.line([(x - s * 0.2, y), (x - s * 0.2 + s * math.cos(t), y + s * math.sin(t) + s * 0.4)], fill=cb, width=4)
    elif pk == "window":
        d.rectangle([x - s, y - s, x + s, y + s], fill=ca)
        d.rectangle([x - s * 0.8, y - s * 0.8, x + s * 0.8, y + s * 0.8], fill=cb)
        d.line([(x, y - s), (x, y + s)], fill=ca, width=2)
    elif pk == "island":
        d.pieslice([x - s * 1.6, h - s * 0.7, x + s * 1.6, h + s * 0.7], 180, 360, fill=ca)
    return np.asarray(img).copy()


def _scene_fn(layout: tuple):
    base = _draw_scene(layout)

    def background(rng) -> np.ndarray:
        return np.clip(base + rng.normal(0, 2, (W.S, W.S, 1)), 0, 255).astype(np.uint8)

    return background


# ---- glyph painter


def _pattern_mask(pattern: tuple, cx, cy, r, rng) -> np.ndarray:
    kind, _, period, angle, phase = pattern
    if kind.startswith("world:"):
        return W.pattern_texture((0, 0, 0), kind[6:], rng).any(-1)  # the world's pattern geometry
    yy, xx = (_GRID[0] - cy) / r, (_GRID[1] - cx) / r
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    if kind == "stripes":
        return (u / period + phase) % 1 < 0.45
    if kind == "checks":
        return (np.floor(u / period + phase) + np.floor(v / period)) % 2 == 0
    return ((u / period + phase) % 1 - 0.5) ** 2 + ((v / period) % 1 - 0.5) ** 2 < 0.08


def _glyph_fn(noun: str, g: GlyphParams):
    accessories = C._parts([spec for spec, _ in g.accessories])  # the personal glyphs' part format
    clips = [clip for _, clip in g.accessories]

    def paint(cx, cy, r, rng):
        base = W.PAINTERS[noun](cx, cy, r, rng)
        body = functools.cache(lambda: np.any([_mask(fn) for fn, fill in base if fill != W.DARK], axis=0))
        pmask = _pattern_mask(g.pattern, cx, cy, r, rng) if g.pattern else None
        layers = []
        for (fn, fill), rgb in zip(base, g.fills):
            layers.append((fn, rgb))
            if pmask is not None and fill == "main":
                layers.append((lambda d, fn=fn: np.where(_mask(fn) & pmask, 255, 0).astype(np.uint8), g.pattern[1]))
        for (fn, rgb), clip in zip(accessories(cx, cy, r, rng), clips):
            layers.append(((lambda d, fn=fn: np.where(_mask(fn) & body(), 255, 0).astype(np.uint8)) if clip else fn, rgb))
        return layers

    return paint


@functools.lru_cache(maxsize=1024)
def extras(ident: Identity) -> dict:
    """``render_scene`` keyword arguments that register ``ident``'s drawing function."""
    if ident.kind == "glyph":
        return {"painters": {ident.key: _glyph_fn(ident.noun, ident.params)}}
    if ident.kind == "style":
        return {"styles": {ident.key: _style_fn(ident.params)}}
    if ident.kind == "scene":
        return {"backgrounds": {ident.key: _scene_fn(ident.params)}}
    if ident.kind == "plain":
        return {}
    raise ValueError(f"identity kind {ident.kind!r}; choose one of {KINDS}")


def render(scene: W.Scene, identities: Sequence[Identity] = ()) -> Image.Image:
    """Render a world scene that may show the given identities (never a personal concept)."""
    kw: dict = {"painters": {}, "backgrounds": {}, "styles": {}}
    for ident in identities:
        for k, v in extras(ident).items():
            kw[k].update(v)
    return W.render_scene(scene, **kw)


# --------------------------------------------------------------------------------------------- views


def _world_objects(rng, background: str, n: int) -> tuple[W.Obj, ...]:
    if n == 1:
        return (W.sample_object(rng, "train", background),)
    pa, pb = (("left", "right"), ("top", "bottom"))[rng.integers(2)]
    return (W.sample_object(rng, "train", background, "small", pa), W.sample_object(rng, "train", background, "small", pb))


def view_scene(ident: Identity, rng: np.random.Generator) -> tuple[W.Scene, tuple[Identity, ...]]:
    """One random scene showing ``ident`` (and the identities it needs to render)."""
    seed = int(rng.integers(2**31))
    if ident.kind == "style":
        content = W.sample_scene(rng, "train", styled=0.0)
        return replace(content, style=ident.key, seed=seed), (ident,)
    if ident.kind == "scene":
        return W.Scene(_world_objects(rng, "white", 1 + int(rng.random() < 0.3)), background=ident.key, seed=seed), (ident,)
    colour, pattern = ident.params if ident.kind == "plain" else ("red", "solid")
    needs: tuple[Identity, ...] = (ident,)
    if rng.random() < 0.2:
        bg_ident = random_scene(rng)
        background, needs = bg_ident.key, (ident, bg_ident)
    else:
        choices = [b for b in W.BACKGROUNDS if not W._clash(colour, b)] if ident.kind == "plain" else W.BACKGROUNDS
        background = choices[rng.integers(len(choices))]
    glyph = ident.key if ident.kind == "glyph" else None
    if rng.random() < 0.2:  # a small world object beside it
        pa, pb = (("left", "right"), ("top", "bottom"), ("right", "left"), ("bottom", "top"))[rng.integers(4)]
        obj = W.Obj(ident.noun, colour, pattern, "small", pa, glyph=glyph)
        other = W.sample_object(rng, "train", background if background in W.BACKGROUNDS else "white", "small", pb)
        return W.Scene((obj, other), background=background, seed=seed), needs
    obj = W.Obj(ident.noun, colour, pattern, W.SIZES[rng.integers(2)], W.POSITIONS[rng.integers(len(W.POSITIONS))], glyph=glyph)
    return W.Scene((obj,), background=background, seed=seed), needs


def identity_views(ident: Identity, n: int, rng: np.random.Generator) -> list[Image.Image]:
    """``n`` renders of ``ident`` in different scenes (different layout / content / foreground)."""
    return [render(*view_scene(ident, rng)) for _ in range(n)]


# --------------------------------------------------------------------------------------------- batches


def _object_group(rng) -> list[Identity]:
    """Hard negatives of one noun: a plain world object, a glyph of the same world colour changed in
    a few things, a sibling of that glyph, and a random glyph."""
    noun = W.CLASS_NOUNS[rng.integers(len(W.CLASS_NOUNS))] if rng.random() < 0.85 else W.SHAPES[rng.integers(len(W.SHAPES))]
    colour = list(W.COLOURS)[rng.integers(len(W.COLOURS))]
    world = random_glyph(rng, noun, world_look=True, colour=colour)
    return [random_plain(rng, noun, colour), world, sibling(world, rng), random_glyph(rng, noun, world_look=False)]


def _style_group(rng) -> list[Identity]:
    """A style, its sibling and another random style."""
    st = random_style(rng)
    return [st, style_sibling(st, rng), random_style(rng)]


def sample_groups(rng: np.random.Generator, n: int) -> list[list[Identity]]:
    """Groups of identities, ``n`` in all: object groups of 4 (45% of draws), style groups of 3
    (30%), single scenes (25%), i.e. about 60% / 30% / 10% of the identities."""
    groups: list[list[Identity]] = []
    left = n
    while left > 0:
        u = rng.random()
        g = _object_group(rng) if u < 0.45 else _style_group(rng) if u < 0.75 else [random_scene(rng)]
        groups.append(g[:left])
        left -= len(groups[-1])
    return groups


def sample_identities(rng: np.random.Generator, n: int) -> list[Identity]:
    """``n`` identities (``sample_groups`` flattened)."""
    return [i for g in sample_groups(rng, n) for i in g]


def _shift(a: np.ndarray, rng, max_px: int = 2) -> np.ndarray:
    """A random translation by up to ``max_px`` pixels (edge padding): the only augmentation."""
    p = max_px
    dy, dx = rng.integers(0, 2 * p + 1, 2)
    return np.pad(a, ((p, p), (p, p), (0, 0)), mode="edge")[dy : dy + W.RES, dx : dx + W.RES]


def render_batch(seed: int, index: int, batch: int, views: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Batch ``index`` of the stream ``seed``: uint8 images (batch, 64, 64, 3) and int64 labels.

    View ``v`` of every member of a style group shows the same content, so a style's nearest
    negatives differ from it in style only, as the eval's negatives do (its positives always show
    other content). Objects and scenes get a scene of their own per view. A pure function of
    (seed, index): resuming at step k replays batch k. Identical identities drawn twice (plain
    world objects can repeat) share a label, as SupCon allows.
    """
    rng = np.random.default_rng([seed, index])
    label_of: dict[Identity, int] = {}
    imgs, labels = [], []
    for group in sample_groups(rng, batch // views):
        shared = [int(rng.integers(2**63)) for _ in range(views)]
        for ident in group:
            lab = label_of.setdefault(ident, len(label_of))
            for v in range(views):
                layout = np.random.default_rng(shared[v] if ident.kind == "style" else int(rng.integers(2**63)))
                imgs.append(_shift(np.asarray(render(*view_scene(ident, layout))), rng))
                labels.append(lab)
    return np.stack(imgs), np.asarray(labels, np.int64)


class IdentityBatches(torch.utils.data.IterableDataset):
    """Endless batches ``start, start + 1, ...``; DataLoader worker ``w`` of ``n`` renders batches
    ``start + w + k n``, which the loader yields in order, so the stream is independent of ``n``."""

    def __init__(self, seed: int, start: int, batch: int, views: int):
        self.seed, self.start, self.batch, self.views = seed, start, batch, views

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        i = self.start + w
        while True:
            imgs, labels = render_batch(self.seed, i, self.batch, self.views)
            yield torch.from_numpy(imgs), torch.from_numpy(labels)
            i += n


# --------------------------------------------------------------------------------------------- model


def build_model(**overrides):
    """A ViTModel; the CLS token of the last hidden state is the embedding. (Its pooler is never
    trained or used; it is there so that ``AutoModel.from_pretrained`` finds every weight.)"""
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(**{**VIT, **overrides}))


def pixel_values(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 64, 64, 3) -> normalised float (B, 3, 64, 64), as ``preprocessor_config.json`` says."""
    x = images_u8.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def embed(model, images_u8: torch.Tensor) -> torch.Tensor:
    """L2-normalised CLS features (float32)."""
    cls = model(pixel_values=pixel_values(images_u8)).last_hidden_state[:, 0]
    return torch.nn.functional.normalize(cls.float(), dim=-1)


def save_model(model, folder: Path) -> None:
    """``folder``: fp16 safetensors, a config that loads as float32, a ViTImageProcessor; atomic."""
    import copy

    from transformers import ViTImageProcessor

    from .pretrain import _patch_dtype

    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        copy.deepcopy(model).cpu().half().save_pretrained(tmp, safe_serialization=True)
        _patch_dtype(tmp / "config.json")
        ViTImageProcessor(size={"height": W.RES, "width": W.RES}, image_mean=list(MEAN), image_std=list(STD)).save_pretrained(tmp)
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            os.rename(folder, old)
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------- training


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out) over L2-normalised ``z``; with two
    views per label it is InfoNCE / NT-Xent (SimCLR). Anchors without a positive are skipped."""
    z = z.float()
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
    logprob = logits.log_softmax(dim=1)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    n_pos = pos.sum(1)
    per_anchor = -logprob.masked_fill(~pos, 0.0).sum(1) / n_pos.clamp_min(1)
    return per_anchor[n_pos > 0].mean()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train_step(model, opt, images_u8, labels, temperature: float) -> float:
    """One AdamW step on a batch (bf16 autocast on CUDA); returns the loss."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=images_u8.device.type == "cuda"):
        z = embed(model, images_u8)
    loss = supcon_loss(z, labels, temperature)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())



def train(a: argparse.Namespace, log=print) -> dict:
    """Train (or resume) into ``a.out``: ``checkpoint.pt`` every ``a.save_every`` steps, at the end
    and at the time cap; ``model/`` (the HF folder) and ``train.json`` whenever the run stops."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device))
    hp = dict(seed=a.seed, batch=a.batch, views=a.views, lr=a.lr, weight_decay=a.weight_decay, temperature=a.temperature,
              vit=dict(hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads, intermediate_size=4 * a.hidden))  # fmt: skip
    state = load_training_state(ckpt_path) if ckpt_path.is_file() else None
    if state is not None:
        changed = {k: (v, state["hparams"][k]) for k, v in hp.items() if state["hparams"][k] != v}
        if changed:
            log(f"resuming: keeping the checkpoint's {sorted(changed)} (given, stored): {changed}")
        hp = state["hparams"]
    torch.manual_seed(hp["seed"])
    model = build_model(**hp["vit"]).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"], betas=(0.9, 0.98))
    step, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        step, history = state["step"], state["history"]
        log(f"resumed from step {step} ({ckpt_path})")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    n_params = sum(p.numel() for p in model.parameters())
    log(f"ViT {n_params / 1e6:.2f} M params on {dev}; steps {step} -> {a.steps}, batch {hp['batch']} = {hp['batch'] // hp['views']} identities x {hp['views']} views, {a.workers} workers")

    def checkpoint():
        save_training_state(ckpt_path, {"step": step, "hparams": hp, "model": model.state_dict(), "optimizer": opt.state_dict(),
                                        "torch_rng": torch.get_rng_state(), "data": {"seed": hp["seed"], "next_batch": step},
                                        "history": history})  # fmt: skip

    t0, stop, first = time.time(), "steps", step
    warmup = max(1, min(200, a.steps // 20))
    if step < a.steps:
        data = IdentityBatches(hp["seed"], step, hp["batch"], hp["views"])
        loader = torch.utils.data.DataLoader(
            data, batch_size=None, num_workers=a.workers, pin_memory=dev.type == "cuda", prefetch_factor=4 if a.workers else None
        )
        model.train()
        for imgs, labels in loader:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, a.steps, hp["lr"], warmup)
            loss = train_step(model, opt, imgs.to(dev, non_blocking=True), labels.to(dev, non_blocking=True), hp["temperature"])
            step += 1
            elapsed = time.time() - t0
            if step % a.log_every == 0 or step == a.steps or step == first + 1:
                history.append((step, round(loss, 4)))
                rate = (step - first) * hp["batch"] / max(elapsed, 1e-9)
                log(f"step {step} loss {loss:.4f} lr {opt.param_groups[0]['lr']:.2e} {elapsed:.0f}s {rate:.0f} img/s")
            if step >= a.steps:
                break
            if a.max_seconds is not None and elapsed >= a.max_seconds:
                stop = "time cap"
                break
            if step % a.save_every == 0:
                checkpoint()
    checkpoint()
    model.eval()
    save_model(model, out / "model")
    info = {"step": step, "steps": a.steps, "steps_this_call": step - first, "stopped_by": stop, "seconds_this_call": round(time.time() - t0, 1), "device": _device_name(dev),
            "hparams": hp, "params": n_params, "history": history}  # fmt: skip
    (out / "train.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"stopped at step {step} by {stop}; model written to {out / 'model'}")
    return info


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


# --------------------------------------------------------------------------------------------- validation

Embedder = Callable[[Sequence[Image.Image]], torch.Tensor]


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(score of a positive > score of a negative), ties counted one half (Mann-Whitney U / n m)."""
    p, n = np.asarray(positive, np.float64)[:, None], np.asarray(negative, np.float64)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def concept_eval_sets(name: str, n_pos: int = 24, n_neg: int = 48, seed: int = 0) -> dict[str, list[Image.Image]]:
    """References (the concept's training images), held-out positives and negatives (see module doc).

    Negatives reuse the positives' layouts (scene seed, background, position, size, content) with
    the class drawn otherwise: subjects / objects in random world colours and patterns (5/6) or as
    random glyphs of the class (1/6); styles as the world's 6 styles (2/3) or random styles; scenes
    on the world's class background (1/3), other world backgrounds (1/3) or random layouts (1/3).
    """
    c = C.CONCEPTS[name]
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    refs = [C.render(s) for s in C.concept_scenes(name)]
    pos_scenes, neg = [], []
    if c.category in ("live_subject", "object"):
        for _ in range(n_pos):
            bg = W.BACKGROUNDS[rng.integers(len(W.BACKGROUNDS))]
            obj = W.Obj(c.class_name, size=W.SIZES[rng.integers(2)], position=W.POSITIONS[rng.integers(len(W.POSITIONS))], glyph=name)
            pos_scenes.append(W.Scene((obj,), background=bg, seed=int(rng.integers(2**31))))
        n_glyph = n_neg // 6
        for j in range(n_neg):
            s = pos_scenes[j % n_pos]
            if j < n_neg - n_glyph:
                colours = [k for k in W.COLOURS if not W._clash(k, s.background)]
                pattern = W.PATTERNS[rng.integers(len(W.PATTERNS))] if rng.random() < 0.5 else "solid"
                obj = replace(s.objects[0], glyph=None, colour=colours[rng.integers(len(colours))], pattern=pattern)
                neg.append(render(replace(s, objects=(obj,))))
            else:
                g = random_glyph(rng, c.class_name)
                neg.append(render(replace(s, objects=(replace(s.objects[0], glyph=g.key),)), (g,)))
    elif c.category == "style":
        for _ in range(n_pos):
            pos_scenes.append(replace(W.sample_scene(rng, "train", styled=0.0), style=name))
        for j in range(n_neg):
            s = pos_scenes[j % n_pos]
            if j < 2 * n_neg // 3:
                neg.append(render(replace(s, style=W.STYLES[j % len(W.STYLES)])))
            else:
                st = random_style(rng)
                neg.append(render(replace(s, style=st.key), (st,)))
    else:
        for _ in range(n_pos):
            objs = _world_objects(rng, "white", 1 + int(rng.random() < 0.3))
            pos_scenes.append(W.Scene(objs, background=name, seed=int(rng.integers(2**31))))
        others = [b for b in W.BACKGROUNDS if b != c.class_name]
        for j in range(n_neg):
            s = pos_scenes[j % n_pos]
            if j % 3 == 0:
                neg.append(render(replace(s, background=c.class_name)))
            elif j % 3 == 1:
                neg.append(render(replace(s, background=others[rng.integers(len(others))])))
            else:
                sc = random_scene(rng)
                neg.append(render(replace(s, background=sc.key), (sc,)))
    return {"references": refs, "positives": [C.render(s) for s in pos_scenes], "negatives": neg}


def embed_sets(embedder: Embedder, sets: dict[str, list[Image.Image]]) -> dict[str, torch.Tensor]:
    """Each set's L2-normalised embeddings (every image embedded once)."""
    return {k: embedder(v) for k, v in sets.items()}


def concept_auc(emb: dict[str, torch.Tensor]) -> float:
    """AUC of score(x) = mean cosine of x to the references, positives against negatives."""
    score = lambda e: (e @ emb["references"].T).mean(1).tolist()
    return auc(score(emb["positives"]), score(emb["negatives"]))


def self_similarity(e: torch.Tensor) -> float:
    """Mean cosine between distinct rows of ``e`` (self-pairs excluded): ``metrics.self_similarity``
    on the 0-1 scale of the AUC tables."""
    from ..evaluation.metrics import self_similarity as percent

    return percent(e) / 100.0


def identity_embedder(model_path: str | os.PathLike) -> Embedder:
    """Embeddings of an identity model folder (or a training folder holding ``model/``), computed
    by ``evaluation.metrics.load_dino``: the exact path DINO scores take."""
    from ..evaluation.metrics import load_dino

    p = Path(model_path)
    if not (p / "config.json").is_file() and (p / "model" / "config.json").is_file():
        p = p / "model"
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"identity model folder {p} has no config.json: train one with `python -m cns_lightning.microworld.identity "
            f"train --out DIR` and pass DIR/model (or DIR), or copy it to {IDENTITY_DIR}"
        )
    scorer = load_dino(p)
    return scorer.image_embeddings


def clip_embedder(path: str | None = None) -> Embedder:
    """The shipped micro CLIP's image embeddings (the CLIP-I column)."""
    from .assets import micro_clip
    from .metrics import image_embeds

    clip, _ = micro_clip(path)
    return lambda ims: image_embeds(clip, list(ims)).cpu()


def reference_self_similarity(model: str | os.PathLike | Embedder, name: str) -> float:
    """Mean cosine between the concept's reference (training) images under ``model``, self-pairs
    excluded: how alike the identity model finds the concept's own images."""
    embedder = model if callable(model) else identity_embedder(model)
    return self_similarity(embedder([C.render(s) for s in C.concept_scenes(name)]))


def evaluate(model: str | os.PathLike | Embedder, n_pos: int = 24, n_neg: int = 48, seed: int = 0, with_clip: bool = True,
             names: Sequence[str] | None = None) -> dict[str, dict]:  # fmt: skip
    """Per concept: category, identity AUC, identity reference self-similarity, and (with_clip)
    the micro CLIP's AUC and self-similarity on the same images."""
    ours = model if callable(model) else identity_embedder(model)
    clip = clip_embedder() if with_clip else None
    out = {}
    for name in names or C.seq20:
        sets = concept_eval_sets(name, n_pos, n_neg, seed)
        emb = embed_sets(ours, sets)
        row = {"category": C.CONCEPTS[name].category, "auc": concept_auc(emb), "self_similarity": self_similarity(emb["references"])}
        if clip is not None:
            emb = embed_sets(clip, sets)
            row.update(clip_auc=concept_auc(emb), clip_self_similarity=self_similarity(emb["references"]))
        out[name] = row
    return out


def format_table(results: dict[str, dict]) -> str:
    has_clip = any("clip_auc" in r for r in results.values())
    lines = [f"{'concept':16s} {'category':13s} {'AUC':>6s} {'self-sim':>8s}" + (f" {'CLIP AUC':>8s} {'CLIP self':>9s}" if has_clip else "")]
    for name, r in results.items():
        line = f"{name:16s} {r['category']:13s} {r['auc']:6.3f} {r['self_similarity']:8.3f}"
        if has_clip:
            line += f" {r['clip_auc']:8.3f} {r['clip_self_similarity']:9.3f}"
        lines.append(line)
    aucs = [r["auc"] for r in results.values()]
    tail = f"{'min / mean':30s} {min(aucs):6.3f} / {np.mean(aucs):.3f}"
    if has_clip:
        caucs = [r["clip_auc"] for r in results.values()]
        tail += f"   CLIP {min(caucs):.3f} / {np.mean(caucs):.3f}"
    return "\n".join(lines + [tail])


# --------------------------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cns_lightning.microworld.identity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train or resume an identity model into --out")
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--batch", type=int, default=512, help="images per step (identities x views)")
    t.add_argument("--views", type=int, default=2)
    t.add_argument("--workers", type=int, default=max(0, (os.cpu_count() or 1) - 1))
    t.add_argument("--max-seconds", type=float, default=None, help="stop (and save) after this many seconds")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=0.05)
    t.add_argument("--temperature", type=float, default=0.1)
    t.add_argument("--hidden", type=int, default=VIT["hidden_size"])
    t.add_argument("--layers", type=int, default=VIT["num_hidden_layers"])
    t.add_argument("--heads", type=int, default=VIT["num_attention_heads"])
    t.add_argument("--save-every", type=int, default=200)
    t.add_argument("--log-every", type=int, default=50)
    e = sub.add_parser("eval", help="per-concept AUC of an identity model (and the micro CLIP)")
    e.add_argument("--model", required=True, type=Path, help="HF folder, or a training --out folder holding model/")
    e.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    e.add_argument("--positives", type=int, default=24)
    e.add_argument("--negatives", type=int, default=48)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no-clip", action="store_true", help="skip the micro CLIP column")
    e.add_argument("--concepts", default=None, help="comma-separated concept names (default: all 20)")
    a = ap.parse_args(argv)
    if a.cmd == "train":
        for k in ("steps", "batch", "views", "save_every", "log_every", "hidden", "layers", "heads"):
            if getattr(a, k) < 1:
                ap.error(f"--{k.replace('_', '-')} must be >= 1")
        if a.batch % a.views or a.batch // a.views < 2:
            ap.error(f"--batch {a.batch} must be a multiple of --views {a.views} with at least 2 identities")
        if a.hidden % a.heads:
            ap.error(f"--hidden {a.hidden} must be divisible by --heads {a.heads}")
        train(a)
        return 0
    try:
        names = a.concepts.split(",") if a.concepts else None
        unknown = sorted(set(names or ()) - set(C.CONCEPTS))
        if unknown:
            ap.error(f"--concepts: unknown {unknown}; choose from {sorted(C.CONCEPTS)}")
        results = evaluate(a.model, a.positives, a.negatives, a.seed, with_clip=not a.no_clip, names=names)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(results))
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": str(a.model), "positives": a.positives, "negatives": a.negatives, "seed": a.seed, "concepts": results}
        tmp = a.out.with_name(f".{a.out.name}.tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
