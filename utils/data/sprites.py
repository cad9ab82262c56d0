"""One sprite file made a model input: read and decoded under guard (the one image loader of every
tool: prepare, reconstruct, fuse, metrics, fid), cropped onto its canvas, augmented, put on a
background, and named as a prepared image."""
import errno
import io
import os
import stat
import zipfile
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError

from utils.errors import first_sentence, printable

# A sprite has no business past these: a bigger file or image is skipped before it is read whole
# or decoded, so that a small zip inflating to gigabytes, or a PNG declaring 20000x20000 pixels,
# costs nothing.
MAX_FILE_BYTES = 8 << 20
MAX_IMAGE_PIXELS = 2048 * 2048
TOO_LARGE = f"larger than {MAX_FILE_BYTES >> 20} MiB, more than any sprite needs"
# Modes whose values are not 8-bit colours, refused by name rather than converted to black.
UNSUPPORTED_MODES = {"F": "32-bit floating point", "I": "32-bit integer"}
BACKGROUND_COLOURS = {"white": (255, 255, 255), "black": (0, 0, 0)}


# ---------------------------------------------------------------- reading a file, guarded


def _bounded(read):
    """What `read(n)` gives, refused once past MAX_FILE_BYTES without reading further."""
    data = read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise SkipImage(TOO_LARGE)
    return data


def regular_files(paths, log):
    """The paths that are files to read; each other entry is named on `log` with its reason and
    left out, so that one FIFO or link loop in a folder of sprites does not stop the work."""
    kept = []
    for path in paths:
        problem = entry_problem(path)
        if problem:
            log(f"skipped {printable(path)}: {problem}")
        else:
            kept.append(path)
    return kept


def entry_problem(path):
    """Why the folder entry `path` is not a file to read (a link loop, a broken link, a FIFO or
    another non-regular file), or None. Opening a FIFO would wait for a writer for ever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken link"
    except OSError as err:
        return "a link loop" if err.errno == errno.ELOOP else (err.strerror or str(err))
    if stat.S_ISREG(mode):
        return None
    kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
    return f"not a regular file ({kind})"


def _read_file(path):
    # O_NONBLOCK: a FIFO named like a sprite opens at once instead of waiting, and is refused.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SkipImage(entry_problem(path) or "not a regular file")
        return _bounded(f.read)


def _read_member(archive, name):
    try:
        with archive.open(name) as member:
            return _bounded(member.read)
    except RuntimeError as err:
        if "encrypted" in str(err):
            raise SkipImage("encrypted zip member; a password is needed") from None
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
        raise SkipImage(f"damaged zip member ({err})") from None


# ---------------------------------------------------------------- turning files into canvases


class SkipImage(Exception):
    """An input file that cannot become a sprite; it is skipped and listed with the reason."""


def _open_image(data):
    """The decoded Pillow image in `data`, checked for size before decoding and for mode."""
    if not data:
        raise SkipImage("empty file")
    too_many = f"too many pixels for a sprite (the limit is {MAX_IMAGE_PIXELS})"
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise SkipImage(f"{too_many}: {width}x{height}")
        if image.mode in UNSUPPORTED_MODES and image.mode != "I":
            raise SkipImage(f"unsupported image mode {image.mode} ({UNSUPPORTED_MODES[image.mode]})")
        image.load()
    except UnidentifiedImageError:
        raise SkipImage("not an image") from None
    except Image.DecompressionBombError as err:  # Pillow's own, larger limit, checked as it opens
        raise SkipImage(f"{too_many}: {first_sentence(err)}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise SkipImage(f"unreadable image ({err})") from None
    return image


def decode_rgba(data):
    """Any PNG (or other Pillow-readable image) as an RGBA uint8 array, colours untouched.

    The one image loader of every tool (prepare, reconstruct, fuse, metrics, fid)."""
    image = _open_image(data)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = np.asarray(image, dtype=np.float64)
        # Older Pillows read a 16-bit PNG as mode I; other 32-bit integers are no colours.
        if image.mode == "I" and (grey.min() < 0 or grey.max() > 65535):
            raise SkipImage(f"unsupported image mode I ({UNSUPPORTED_MODES['I']}) with values outside 0-65535")
        # Pillow's convert() clips 16-bit grey to 255 instead of scaling it.
        peak = 65535.0 if image.mode.startswith("I;16") or grey.max() > 255 else 255.0
        image = Image.fromarray(np.round(grey * 255.0 / peak).clip(0, 255).astype(np.uint8), "L")
    elif image.mode == "P" and "transparency" not in image.info:
        image = image.convert("RGB")
    # P with a transparent index, LA, L, RGB, 1, CMYK: Pillow keeps the exact palette colours.
    return np.asarray(image.convert("RGBA"))


def read_image_file(path):
    """decode_rgba of the file at `path`, read no further than MAX_FILE_BYTES."""
    try:
        return decode_rgba(_read_file(path))
    except OSError as err:
        raise SkipImage(err.strerror or str(err)) from None


def crop_to_canvas(rgba, size):
    """Crop to the alpha bounding box and centre on a transparent size x size canvas, without
    resampling. Returns (canvas, was_centre_cropped)."""
    opaque = rgba[..., 3] > 0
    if not opaque.any():
        raise SkipImage("fully transparent")
    rows, cols = np.flatnonzero(opaque.any(1)), np.flatnonzero(opaque.any(0))
    sprite = rgba[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = sprite.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    sprite = sprite[top:top + size, left:left + size]
    h2, w2 = sprite.shape[:2]
    canvas = np.zeros((size, size, 4), np.uint8)
    y, x = (size - h2) // 2, (size - w2) // 2
    canvas[y:y + h2, x:x + w2] = sprite
    return canvas, (h, w) != (h2, w2)


def augment(canvas, name):
    if name == "orig":
        return canvas
    if name == "flip":
        return canvas[:, ::-1]
    angle = int(name.removeprefix("rot"))
    # Nearest neighbour keeps every pixel one of the sprite's own colours.
    return np.asarray(Image.fromarray(canvas, "RGBA").rotate(angle, resample=Image.NEAREST, fillcolor=(0, 0, 0, 0)))


def background(name, size, seed, tag):
    if name in BACKGROUND_COLOURS:
        return np.broadcast_to(np.array(BACKGROUND_COLOURS[name], np.uint8), (size, size, 3))
    # Seeded by the image's own name, so the output does not depend on processing order.
    rng = np.random.default_rng([seed, zlib.crc32(tag.encode())])
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def composite(rgba, back):
    alpha = rgba[..., 3:4].astype(np.uint16)
    mixed = (rgba[..., :3] * alpha + back.astype(np.uint16) * (255 - alpha) + 127) // 255
    return mixed.astype(np.uint8)


def sprite_image(path, size, background_name):
    """One image file as a model input exactly as preparation makes a test image: cropped,
    centred, no augmentation, on a plain background. Returns (uint8 RGB, bool mask)."""
    canvas, _ = crop_to_canvas(read_image_file(path), size)
    return composite(canvas, background(background_name, size, 0, "")), canvas[..., 3] > 0


def image_name(key, bg, aug):
    return f"{key}__{bg}__{aug}.png"


def background_of(name):
    """The background an image of a prepared set was put on, read back from its `image_name`."""
    return name.rsplit("__", 2)[-2]
