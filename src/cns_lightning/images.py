"""Reading a concept folder: its image files, the images themselves and their captions.

Every problem with user input raises :class:`ImageInputError`, whose message names the file (or
folder), what is wrong with it, and how to fix it.

* :func:`list_images` - the sorted image files of a concept folder.
* :func:`load_image` - one image as a fully loaded 8-bit RGB ``PIL.Image``, whatever its mode,
  orientation, bit depth, alpha, animation or size.
* :func:`read_captions` - one caption per image, from ``<stem>.txt`` files or a ``metadata.jsonl``
  (Hugging Face ``imagefolder`` convention), or ``None`` when the folder has neither.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = ["IMAGE_SUFFIXES", "ImageInputError", "list_images", "load_image", "read_captions"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA_FILE = "metadata.jsonl"
CAPTION_KEYS = ("text", "caption")

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_DECODE_LOCK = threading.Lock()


class ImageInputError(ValueError):
    """A concept image, folder or caption file that cannot be used; the message names file and fix."""


def _error(path: Path | str, problem: str, fix: str) -> ImageInputError:
    return ImageInputError(f"{path}: {problem}. Fix: {fix}.")


@contextmanager
def _strict_decoding():
    """Decode with ``ImageFile.LOAD_TRUNCATED_IMAGES`` forced off, so truncated files raise.

    Another library may have switched the global on; it is restored afterwards. The lock keeps
    threads of one process from racing on the global (DataLoader workers are processes).
    """
    with _DECODE_LOCK:
        old = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = old


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    * 16-bit greyscale (``I;16*``) is scaled ``v * 255 / 65535`` (Pillow's own conversion clips).
    * ``I`` (32-bit int): taken as 8-bit when all values are <= 255, else as 16-bit (clipped to
      ``[0, 65535]`` and scaled like ``I;16``).
    * ``F`` (float): values in ``[0, 1]`` are scaled by 255, anything else is clipped to ``[0, 255]``.
    * Alpha (``RGBA``, ``LA``, ``PA``, palette with transparency) is composited onto white.
    * ``CMYK``, ``L``, ``1``, ``P``, ``YCbCr`` ... use Pillow's conversion.
    """
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im)
        if mode == "F":
            a = a.astype(np.float64)
            finite = a[np.isfinite(a)]
            if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
                a = a * 255.0
            a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
            a8 = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        else:
            a = a.astype(np.int64)
            if mode == "I" and a.size and a.max() <= 255:
                a8 = np.clip(a, 0, 255).astype(np.uint8)
            else:
                a = np.clip(a, 0, 65535)
                a8 = ((a * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(a8, mode="L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif mode in _ALPHA_MODES:
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def load_image(
    path: Path,
    *,
    min_side: int | None = None,
    max_pixels: int = 40_000_000,
    reduce_to: int | None = None,
) -> Image.Image:
    """Load one image as a fully loaded 8-bit ``RGB`` ``PIL.Image.Image``.

    * EXIF orientation is applied (``ImageOps.exif_transpose``).
    * Any mode is converted to RGB (see :func:`_to_rgb`): CMYK, greyscale, 16-bit (scaled, not
      clipped), palette; transparent pixels are composited onto white (no warning).
    * Animated GIF/WebP: the first frame is used and one ``UserWarning`` names the file.
    * Images with more than ``max_pixels`` pixels are refused (decompression-bomb guard, checked
      from the header before decoding; independent of ``PIL.Image.MAX_IMAGE_PIXELS``, whose own
      refusal is also turned into an :class:`ImageInputError`).
    * ``min_side``: an image whose short side is below it is refused (validation only).
    * ``reduce_to`` (e.g. the training resolution): an image whose short side is at least twice
      that is reduced while decoding (JPEG DCT scaling via ``draft``, then an integer box
      ``reduce``, after the conversion to RGB, so any mode can be reduced) so that its short side stays >= ``reduce_to``; the caller resizes to the final
      resolution anyway, and huge photos then cost little memory and time. ``None``: full size.
    * Missing, empty, non-image, truncated or corrupt files raise :class:`ImageInputError`;
      truncated files raise even if ``ImageFile.LOAD_TRUNCATED_IMAGES`` was switched on elsewhere.
    """
    path = Path(path)
    replace = "replace it with a valid image file (or remove it from the concept folder)"
    if not path.exists():
        raise _error(path, "image file does not exist", "check the concept's path and file name")
    if not path.is_file():
        raise _error(path, "is not a file", "point to an image file")
    if path.stat().st_size == 0:
        raise _error(path, "image file is empty (0 bytes)", replace)
    try:
        with _strict_decoding(), warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise _error(
                        path,
                        f"image is {width}x{height} = {width * height} pixels, above the limit of "
                        f"{max_pixels} pixels (decompression-bomb guard)",
                        "downscale the image, or raise max_pixels if the image is genuine",
                    )
                short = min(width, height)
                if min_side is not None and short < min_side:
                    raise _error(
                        path,
                        f"image is {width}x{height}, its short side {short} px is below the "
                        f"required {min_side} px",
                        f"use an image at least {min_side} px on its short side or lower "
                        "data.resolution",
                    )
                if getattr(im, "n_frames", 1) > 1:
                    warnings.warn(
                        f"{path}: animated (multi-frame) image with {im.n_frames} frames; only "
                        "the first frame is used",
                        UserWarning,
                        stacklevel=2,
                    )
                    im.seek(0)
                if reduce_to and short >= 2 * reduce_to:  # draft is a no-op unless JPEG/MPO
                    im.draft("RGB", (width * reduce_to // short, height * reduce_to // short))
                im.load()
                # to RGB first: Image.reduce refuses palette, 1-bit and 16-bit modes ("image has
                # wrong mode"), and averaging palette indices would be wrong anyway
                out = _to_rgb(ImageOps.exif_transpose(im))
                factor = min(out.size) // reduce_to if reduce_to else 1
                if factor >= 2:
                    out = out.reduce(factor)
                if out is im:
                    out = im.copy()
                out.load()
                return out
    except ImageInputError:
        raise
    except Image.DecompressionBombError as exc:
        raise _error(
            path,
            f"Pillow refuses to open it as a decompression bomb ({exc})",
            "downscale the image, or raise PIL.Image.MAX_IMAGE_PIXELS if the image is genuine",
        ) from exc
    except UnidentifiedImageError as exc:
        raise _error(path, "is not an image Pillow can read", replace) from exc
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, KeyError, IndexError) as exc:
        problem = f"image is truncated or corrupt ({type(exc).__name__}: {exc})"
        raise _error(path, problem, replace) from exc


def _broken_link(path: Path) -> str | None:
    """What is wrong with ``path`` when it is a symbolic link that leads to no file (dangling, or
    a loop), else ``None``."""
    if not path.is_symlink():
        return None
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link loop (it leads back to itself)"
        return f"is a symbolic link to {os.readlink(path)}, which does not exist (dangling link)"
    return None


def list_images(folder: Path) -> list[Path]:
    """The image files of a concept folder, sorted by name (not recursive).

    Files count as images by suffix (case-insensitive, :data:`IMAGE_SUFFIXES`); hidden files,
    caption ``.txt`` files, ``metadata.jsonl`` and sub-folders are ignored. Symbolic links to
    images are followed; one with an image suffix that leads nowhere (dangling, or a loop) is an
    error naming it, not silently dropped.
    """
    folder = Path(folder)
    if not folder.exists():
        raise _error(folder, "concept folder does not exist", "check the concept's path")
    if not folder.is_dir():
        raise _error(folder, "is a file, not a concept folder",
                     "point the concept's path at the folder that holds its images")
    named = sorted((p for p in folder.iterdir() if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: p.name)
    for p in named:
        broken = _broken_link(p)
        if broken:
            raise _error(p, broken, "point the link at an existing image file, or remove the link from the concept folder")
    images = [p for p in named if p.is_file()]
    if not images:
        raise _error(
            folder,
            "concept folder holds no image files",
            f"put the concept's images ({', '.join(sorted(s[1:] for s in IMAGE_SUFFIXES))}) in it",
        )
    return images


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _error(path, f"is not valid UTF-8 ({exc})", "save the file as UTF-8") from exc


def _txt_captions(folder: Path, images: list[Path]) -> list[str] | None:
    txts = [p.with_suffix(".txt") for p in images]
    have = [t.is_file() for t in txts]
    if not any(have):
        return None
    if not all(have):
        missing = [p.name for p, h in zip(images, have) if not h]
        raise _error(
            folder,
            f"{sum(have)} of {len(images)} images have a caption .txt file but "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} do not",
            "give every image a <name>.txt caption, or remove all of them",
        )
    captions = []
    for txt in txts:
        text = _read_text(txt).strip()
        if not text:
            raise _error(txt, "caption is empty",
                         "write the caption into the file, or remove all .txt captions")
        captions.append(text)
    return captions


def _jsonl_captions(folder: Path, images: list[Path]) -> list[str] | None:
    meta = folder / METADATA_FILE
    if not meta.is_file():
        return None
    fix_line = 'make each line a JSON object like {"file_name": "00.png", "text": "a caption"}'
    by_path: dict[Path, str] = {}
    # split on "\n" only: str.splitlines() would also split inside captions holding U+2028 etc.
    for number, line in enumerate(_read_text(meta).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{meta} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problem = f"is not valid JSON ({exc.msg} at column {exc.colno})"
            raise _error(where, problem, fix_line) from exc
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise _error(where, 'has no "file_name" string', fix_line)
        texts = {k: row[k] for k in CAPTION_KEYS if k in row}
        if not texts or not all(isinstance(t, str) for t in texts.values()):
            raise _error(where, 'has no "text" (or "caption") string', fix_line)
        if len(set(texts.values())) > 1:
            raise _error(where, 'has a "text" and a "caption" that differ', "keep only one of them")
        text = next(iter(texts.values())).strip()
        if not text:
            raise _error(where, f"caption of {row['file_name']} is empty", "write a caption for it")
        target = (folder / row["file_name"]).resolve()
        if not target.is_file():
            raise _error(where, f"names {row['file_name']}, which does not exist in {folder}",
                         "fix the file name or remove the line")
        if target in by_path:
            raise _error(where, f"names {row['file_name']} a second time", "keep one line per image")
        by_path[target] = text
    missing = [p.name for p in images if p.resolve() not in by_path]
    if missing:
        raise _error(
            meta,
            f"has no caption for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}",
            "add a line for every image of the folder",
        )
    return [by_path[p.resolve()] for p in images]


def read_captions(folder: Path, images: list[Path]) -> list[str] | None:
    """One caption per image of ``images`` (in that order), or ``None`` when there are none.

    Captions come from one ``<stem>.txt`` per image (UTF-8) or from ``folder/metadata.jsonl``
    (lines ``{"file_name": "00.png", "text": "..."}``; the key ``"caption"`` is accepted too).
    Captions are stripped of surrounding whitespace and must not be empty. Lines for files that
    exist but are not in ``images`` are ignored (a caller may use a subset of the folder). When
    both conventions are present they must agree. Anything else raises :class:`ImageInputError`.
    """
    folder = Path(folder)
    images = [Path(p) for p in images]
    from_txt = _txt_captions(folder, images)
    from_jsonl = _jsonl_captions(folder, images)
    if from_txt is not None and from_jsonl is not None:
        for image, a, b in zip(images, from_txt, from_jsonl):
            if a != b:
                raise _error(
                    image,
                    f"caption in {image.with_suffix('.txt').name} ({a[:60]!r}) differs from the one "
                    f"in {METADATA_FILE} ({b[:60]!r})",
                    f"keep only one caption convention (the .txt files or {METADATA_FILE})",
                )
    return from_txt if from_txt is not None else from_jsonl
