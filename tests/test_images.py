"""cns_lightning.images: every awkward or bad input is generated here with PIL/numpy in tmp_path."""

from __future__ import annotations

import json
import struct
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from cns_lightning.images import (
    IMAGE_SUFFIXES,
    ImageInputError,
    list_images,
    load_image,
    read_captions,
)


def _png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG written by hand (for what Pillow cannot save: 16-bit RGB, headers of huge images)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def _save(im: Image.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


def _px(im: Image.Image, xy=(0, 0)):
    return im.getpixel(xy)


# ----------------------------------------------------------------------------------------------
# load_image: conversions


def test_rgb_png_exact_and_fully_loaded(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (12, 9, 3), dtype=np.uint8)
    path = _save(Image.fromarray(a), tmp_path / "x.png")
    im = load_image(path)
    path.unlink()  # the image must not need its file any more
    assert im.mode == "RGB" and im.size == (9, 12)
    np.testing.assert_array_equal(np.asarray(im), a)


def test_exif_orientation_6_rotates_pixels(tmp_path):
    a = np.zeros((16, 32, 3), np.uint8)
    a[:, :16] = (255, 0, 0)  # left half red
    a[:, 16:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(Image.fromarray(a), tmp_path / "o.jpg", exif=exif, quality=95)
    im = load_image(path)
    assert im.size == (16, 32)  # portrait now
    top, bottom = np.asarray(im)[4, 8].astype(int), np.asarray(im)[28, 8].astype(int)
    assert top[0] > 200 and top[2] < 50  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 50


def test_cmyk_tiff_and_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red ink-free cyan/magenta
    assert _px(load_image(_save(cmyk, tmp_path / "c.tif"))) == (255, 0, 0)
    r, g, b = _px(load_image(_save(cmyk, tmp_path / "c.jpg", quality=95)))
    assert r > 240 and g < 15 and b < 15


def test_greyscale_l_and_bilevel(tmp_path):
    assert _px(load_image(_save(Image.new("L", (4, 4), 100), tmp_path / "l.png"))) == (100, 100, 100)
    assert _px(load_image(_save(Image.new("1", (4, 4), 1), tmp_path / "b.png"))) == (255, 255, 255)


def test_16bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    a = np.array([[65535, 32896, 257, 0]], dtype=np.uint16)
    path = _save(Image.fromarray(a), tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I;16")
    im = load_image(path)
    assert im.mode == "RGB"
    assert [_px(im, (x, 0))[0] for x in range(4)] == [255, 128, 1, 0]


def test_16bit_rgb_png(tmp_path):
    rows = b"".join(b"\x00" + struct.pack(">HHH", 65535, 32896, 0) * 3 for _ in range(2))
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png_bytes(3, 2, 16, 2, rows))
    assert _px(load_image(path)) == (255, 128, 0)


def test_32bit_int_and_float_tiff(tmp_path):
    i8 = Image.fromarray(np.full((3, 3), 200, np.int32), mode="I")
    assert _px(load_image(_save(i8, tmp_path / "i8.tif"))) == (200, 200, 200)
    i16 = Image.fromarray(np.array([[65535, 1000]], np.int32), mode="I")
    im = load_image(_save(i16, tmp_path / "i16.tif"))
    assert [_px(im, (x, 0))[0] for x in range(2)] == [255, 4]  # round(1000 * 255 / 65535) = 4
    f01 = Image.fromarray(np.array([[1.0, 0.5, 0.0]], np.float32), mode="F")
    im = load_image(_save(f01, tmp_path / "f01.tif"))
    assert [_px(im, (x, 0))[0] for x in range(3)] == [255, 128, 0]
    f255 = Image.fromarray(np.array([[300.0, 77.0, -5.0]], np.float32), mode="F")
    im = load_image(_save(f255, tmp_path / "f255.tif"))
    assert [_px(im, (x, 0))[0] for x in range(3)] == [255, 77, 0]


def test_palette_without_and_with_transparency(tmp_path):
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert _px(load_image(_save(p, tmp_path / "p.png"))) == (10, 20, 30)
    p.putpixel((1, 1), 0)
    path = _save(p, tmp_path / "pt.png", transparency=0)
    im = load_image(path)
    assert _px(im, (1, 1)) == (255, 255, 255)  # transparent index -> white
    assert _px(im, (0, 0)) == (10, 20, 30)
    gif = load_image(_save(p, tmp_path / "pt.gif", transparency=0))
    assert _px(gif, (1, 1)) == (255, 255, 255) and _px(gif, (0, 0)) == (10, 20, 30)


def test_alpha_is_composited_onto_white(tmp_path):
    a = np.zeros((1, 3, 4), np.uint8)
    a[0, 0] = (0, 0, 0, 0)  # fully transparent black -> white
    a[0, 1] = (10, 20, 30, 255)  # opaque -> unchanged
    a[0, 2] = (0, 0, 0, 128)  # half-transparent black -> grey
    im = load_image(_save(Image.fromarray(a, mode="RGBA"), tmp_path / "a.png"))
    assert im.mode == "RGB"
    assert _px(im, (0, 0)) == (255, 255, 255)
    assert _px(im, (1, 0)) == (10, 20, 30)
    assert all(abs(v - 127) <= 1 for v in _px(im, (2, 0)))
    la = Image.fromarray(np.array([[[50, 0], [50, 255]]], np.uint8), mode="LA")
    im = load_image(_save(la, tmp_path / "la.png"))
    assert _px(im, (0, 0)) == (255, 255, 255) and _px(im, (1, 0)) == (50, 50, 50)


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_animated_first_frame_and_one_warning(tmp_path, suffix):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / f"anim{suffix}"
    extra = {"lossless": True} if suffix == ".webp" else {}
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        im = load_image(path)
    ours = [w for w in caught if str(path) in str(w.message)]
    assert len(ours) == 1 and "first frame" in str(ours[0].message)
    assert im.mode == "RGB" and _px(im, (8, 8)) == (255, 0, 0)


def test_still_image_gives_no_warning(tmp_path):
    path = _save(Image.new("RGB", (8, 8)), tmp_path / "still.gif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(path)


# ----------------------------------------------------------------------------------------------
# load_image: sizes


def test_large_jpeg_is_reduced_while_decoding(tmp_path):
    a = np.zeros((1600, 2400, 3), np.uint8)
    a[:, :1200] = 200
    path = _save(Image.fromarray(a), tmp_path / "big.jpg", quality=90)
    im = load_image(path, min_side=100, reduce_to=200)
    assert im.mode == "RGB" and 200 <= min(im.size) < 400
    assert abs(im.size[0] / im.size[1] - 1.5) < 0.02
    assert load_image(path).size == (2400, 1600)  # without reduce_to: full size
    assert load_image(path, min_side=200).size == (2400, 1600)  # min_side only validates


def test_large_png_is_reduced_by_integer_factor(tmp_path):
    path = _save(Image.new("RGB", (1200, 800), (1, 2, 3)), tmp_path / "big.png")
    im = load_image(path, reduce_to=100)
    assert im.size == (150, 100) and _px(im) == (1, 2, 3)
    assert load_image(path, reduce_to=500).size == (1200, 800)  # < 2x: untouched


@pytest.mark.parametrize("kind", ["palette", "palette_transparent", "bilevel", "grey16", "animated_gif", "cmyk"])
def test_any_mode_is_converted_before_the_size_reduction(tmp_path, kind):
    """Short side >= 2 x reduce_to: the image is reduced after its conversion to RGB, whatever its
    mode (Image.reduce refuses P, 1 and I;16: "image has wrong mode"), and the reduced pixels are
    the box-reduction of the full-size RGB conversion."""
    a = np.zeros((120, 200, 3), np.uint8)  # left half one colour, right half another
    a[:, :100] = (200, 40, 10)
    a[:, 100:] = (10, 40, 200)
    rgb = Image.fromarray(a)
    im, save, suffix = {
        "palette": (rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4), {}, ".png"),
        "palette_transparent": (rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4), {"transparency": 0}, ".png"),
        "bilevel": (rgb.convert("1"), {}, ".png"),
        "grey16": (Image.fromarray(a[..., 0].astype(np.uint16) * 257), {}, ".png"),
        "animated_gif": (rgb.convert("P"), {"save_all": True, "append_images": [Image.new("P", (200, 120), 0)]}, ".gif"),
        "cmyk": (rgb.convert("CMYK"), {}, ".tif"),
    }[kind]
    path = _save(im, tmp_path / f"{kind}{suffix}", **save)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the animated image's first-frame notice
        full = load_image(path)
        small = load_image(path, reduce_to=30)
    assert small.mode == "RGB" and small.size == (50, 30)  # factor 120 // 30 = 4
    np.testing.assert_array_equal(np.asarray(small), np.asarray(full.reduce(4)))
    left, right = np.asarray(small)[15, 10].astype(int), np.asarray(small)[15, 40].astype(int)
    assert not np.array_equal(left, right)  # the two halves survive the conversion


def test_image_smaller_than_min_side(tmp_path):
    path = _save(Image.new("RGB", (30, 20)), tmp_path / "tiny.png")
    with pytest.raises(ImageInputError) as err:
        load_image(path, min_side=64)
    msg = str(err.value)
    assert "tiny.png" in msg and "30x20" in msg and "64 px" in msg
    assert "use an image at least 64 px on its short side or lower data.resolution" in msg
    assert load_image(path, min_side=20).size == (30, 20)


def test_max_pixels_limit(tmp_path):
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "hundred.png")
    with pytest.raises(ImageInputError, match="hundred.png.*10000 pixels.*5000 pixels"):
        load_image(path, max_pixels=5000)


@pytest.mark.parametrize("pil_limit", [None, "default"])
def test_decompression_bomb_refused_whatever_pil_global(tmp_path, monkeypatch, pil_limit):
    # a 100000 x 100000 PNG header (10 gigapixels) with one tiny IDAT: only the header is read
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_bytes(100_000, 100_000, 1, 0, b"\x00" * 16))
    if pil_limit is None:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # someone switched Pillow's guard off
    with pytest.raises(ImageInputError, match="bomb.png.*decompression bomb|bomb.png.*decompression-bomb"):
        load_image(path)


# ----------------------------------------------------------------------------------------------
# load_image: bad files


def test_missing_empty_folder_and_not_an_image(tmp_path):
    with pytest.raises(ImageInputError, match="nope.png.*does not exist"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageInputError, match=r"empty.png.*0 bytes.*Fix: replace it"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "notes.png").write_text("these are not pixels")
    with pytest.raises(ImageInputError, match="notes.png.*not an image.*Fix: replace it"):
        load_image(tmp_path / "notes.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageInputError, match="dir.png.*not a file"):
        load_image(tmp_path / "dir.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP"])
def test_truncated_images_raise_even_if_pil_flag_on(tmp_path, monkeypatch, fmt):
    a = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / f"cut.{fmt.lower()}"
    Image.fromarray(a).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # set by some other library
    with pytest.raises(ImageInputError, match=f"cut.{fmt.lower()}.*(truncated|corrupt|not an image).*Fix"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for the other library


def test_corrupt_png_data(tmp_path):
    a = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = _save(Image.fromarray(a), tmp_path / "flip.png")
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 8
    data[start:start + 40] = bytes(40)  # zero the deflate stream's start
    path.write_bytes(bytes(data))
    with pytest.raises(ImageInputError, match="flip.png.*truncated or corrupt"):
        load_image(path)


# ----------------------------------------------------------------------------------------------
# list_images


def test_list_images_filters_and_sorts(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.JpEg", "d.webp", "e.tiff", ".hidden.png", "a.txt",
                 "metadata.jsonl", "notes.md", "z.gif", "y.bmp", "x.tif"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["a.jpg", "b.PNG", "c.JpEg", "d.webp", "e.tiff", "x.tif", "y.bmp", "z.gif"]
    assert {s.lstrip(".") for s in IMAGE_SUFFIXES} == {"jpg", "jpeg", "png", "webp", "bmp", "gif",
                                                        "tif", "tiff"}


def test_list_images_errors(tmp_path):
    with pytest.raises(ImageInputError, match="missing.*does not exist.*Fix"):
        list_images(tmp_path / "missing")
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(ImageInputError, match="f.png.*is a file.*Fix"):
        list_images(tmp_path / "f.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "caption.txt").write_text("a caption")
    with pytest.raises(ImageInputError, match="empty.*no image files.*Fix: put"):
        list_images(empty)


def test_list_images_names_dangling_links_and_link_loops(tmp_path):
    """A symbolic link with an image suffix that leads to no file is an error naming it (it used
    to be dropped silently, so a concept could lose images unnoticed); a link to an image counts."""
    Image.new("RGB", (4, 4)).save(tmp_path / "real.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "real.png")
    assert [p.name for p in list_images(tmp_path)] == ["link.png", "real.png"]
    (tmp_path / "gone.png").symlink_to(tmp_path / "moved_away.png")
    with pytest.raises(ImageInputError, match=r"gone.png: is a symbolic link to .*moved_away.png, which does not exist.*Fix: point the link"):
        list_images(tmp_path)
    (tmp_path / "gone.png").unlink()
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    with pytest.raises(ImageInputError, match=r"loop.jpg: is a symbolic link loop.*Fix"):
        list_images(tmp_path)
    (tmp_path / "loop.jpg").unlink()
    (tmp_path / "notes.txt").symlink_to(tmp_path / "nothing.txt")  # not an image name: ignored as before
    assert [p.name for p in list_images(tmp_path)] == ["link.png", "real.png"]


# ----------------------------------------------------------------------------------------------
# read_captions


def _folder(tmp: Path, n: int = 3) -> list[Path]:
    paths = []
    for i in range(n):
        p = tmp / f"{i:02d}.png"
        p.write_bytes(b"not decoded by read_captions")
        paths.append(p)
    return paths


def _jsonl(folder: Path, rows: list[dict], **dump) -> None:
    text = "\n".join(json.dumps(r, **dump) for r in rows) + "\n"
    (folder / "metadata.jsonl").write_bytes(text.encode("utf-8"))


def test_no_captions_gives_none(tmp_path):
    assert read_captions(tmp_path, _folder(tmp_path)) is None


def test_txt_captions(tmp_path):
    images = _folder(tmp_path)
    for i, p in enumerate(images):
        p.with_suffix(".txt").write_text(f"  photo {i}\n")
    (tmp_path / "README.txt").write_text("ignored: not an image's caption")
    assert read_captions(tmp_path, images) == ["photo 0", "photo 1", "photo 2"]
    images[0].with_suffix(".txt").write_bytes("\ufeffwith BOM".encode("utf-8"))
    assert read_captions(tmp_path, images)[0] == "with BOM"


def test_txt_captions_partial_and_empty(tmp_path):
    images = _folder(tmp_path)
    images[0].with_suffix(".txt").write_text("one")
    with pytest.raises(ImageInputError, match="1 of 3 images.*01.png, 02.png do not.*Fix"):
        read_captions(tmp_path, images)
    images[1].with_suffix(".txt").write_text("two")
    images[2].with_suffix(".txt").write_text(" \n\t")
    with pytest.raises(ImageInputError, match="02.txt.*caption is empty.*Fix"):
        read_captions(tmp_path, images)
    images[2].with_suffix(".txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ImageInputError, match="02.txt.*not valid UTF-8.*Fix"):
        read_captions(tmp_path, images)


def test_jsonl_captions_in_image_order(tmp_path):
    images = _folder(tmp_path)
    _jsonl(tmp_path, [{"file_name": "02.png", "text": "c"}, {"file_name": "00.png", "caption": "a"},
                      {"file_name": "01.png", "text": "b", "caption": "b", "extra": 1}])
    assert read_captions(tmp_path, images) == ["a", "b", "c"]
    assert read_captions(tmp_path, images[1:]) == ["b", "c"]  # a subset of the folder is fine


@pytest.mark.parametrize(
    "rows, pattern",
    [
        (['{"file_name": "00.png", "text": "a"}', "", '{"file_name": "01.png", "text": oops}'],
         r"metadata.jsonl line 3.*not valid JSON.*Fix"),
        (['["00.png", "a"]'], r"line 1.*no \"file_name\".*Fix"),
        (['{"file_name": "00.png"}'], r"line 1.*no \"text\" \(or \"caption\"\).*Fix"),
        (['{"file_name": "00.png", "text": 3}'], r"line 1.*no \"text\".*Fix"),
        (['{"file_name": "00.png", "text": "a", "caption": "b"}'], r"line 1.*differ.*Fix"),
        (['{"file_name": "00.png", "text": "  "}'], r"line 1.*caption of 00.png is empty.*Fix"),
        (['{"file_name": "07.png", "text": "a"}'], r"line 1.*07.png, which does not exist.*Fix"),
        (['{"file_name": "00.png", "text": "a"}', '{"file_name": "00.png", "text": "b"}'],
         r"line 2.*second time.*Fix"),
        (['{"file_name": "00.png", "text": "a"}', '{"file_name": "02.png", "text": "c"}'],
         r"metadata.jsonl.*no caption for 01.png.*Fix: add a line"),
    ],
)
def test_jsonl_errors(tmp_path, rows, pattern):
    images = _folder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(ImageInputError, match=pattern):
        read_captions(tmp_path, images)


def test_both_conventions_must_agree(tmp_path):
    images = _folder(tmp_path, 2)
    for p, t in zip(images, ["a", "b"]):
        p.with_suffix(".txt").write_text(t)
    _jsonl(tmp_path, [{"file_name": "00.png", "text": "a"}, {"file_name": "01.png", "text": "b"}])
    assert read_captions(tmp_path, images) == ["a", "b"]
    _jsonl(tmp_path, [{"file_name": "00.png", "text": "a"}, {"file_name": "01.png", "text": "B"}])
    with pytest.raises(ImageInputError, match="01.png.*01.txt.*differs.*metadata.jsonl.*Fix: keep only one"):
        read_captions(tmp_path, images)


# --- fuzzing caption text through both conventions ---------------------------------------------

_chars = st.characters(codec="utf-8")
_caption = st.one_of(
    st.text(_chars, max_size=40),
    st.tuples(st.text(_chars, min_size=1, max_size=8), st.integers(100, 3000)).map(lambda t: t[0] * t[1]),
)


def _expected(text: str, convention: str) -> str:
    if convention == "txt" and text.startswith("\ufeff"):
        text = text[1:]  # a leading BOM at the start of a .txt file is its encoding marker
    return text.strip()


@settings(max_examples=40, deadline=None)
@given(captions=st.lists(_caption, min_size=1, max_size=3), ascii_json=st.booleans())
def test_fuzz_caption_round_trip(captions, ascii_json):
    for convention in ("txt", "jsonl"):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            images = _folder(folder, len(captions))
            if convention == "txt":
                for p, c in zip(images, captions):
                    p.with_suffix(".txt").write_bytes(c.encode("utf-8"))
            else:
                _jsonl(folder, [{"file_name": p.name, "text": c} for p, c in zip(images, captions)],
                       ensure_ascii=ascii_json)
            expected = [_expected(c, convention) for c in captions]
            if all(expected):
                assert read_captions(folder, images) == expected
            else:
                with pytest.raises(ImageInputError, match="empty"):
                    read_captions(folder, images)
