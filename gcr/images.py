"""Input images (`--image` and batch files' `image:`): one size limit and one check for both.

An image is checked from its header before any pixel is decoded, so a small file that claims to be
30000x30000 (a decompression bomb) is refused in milliseconds instead of exhausting memory. PIL's
own bomb guard (a warning above ~89 megapixels, an error above twice that) never reaches the user:
it is turned into the same sentence. Nothing heavy is imported here (PIL only).
"""
from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

# The largest source image gcr accepts, in pixels: the generation size limit (8192 x 8192), which
# is already far beyond what the edit models work at (about 1 megapixel).
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE
# The file is read whole (to hash it); even an uncompressed 16-bit RGBA image at the pixel limit
# is 512 MiB.
MAX_IMAGE_BYTES = 512 * 2**20


class ImageProblem(ValueError):
    """What is wrong with an input image: a sentence fragment (lowercase start, no final period)
    that names the file and the fix; the caller adds where the path came from."""


def read_image(path: Path):
    """(RGB PIL image, sha256 of the file's bytes) for a readable image within MAX_IMAGE_PIXELS;
    ImageProblem otherwise."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "is not a regular file" if path.exists() else "does not exist"
        raise ImageProblem(f"the image {path} {what}")
    try:
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise ImageProblem(f"the image {path} is over {MAX_IMAGE_BYTES // 2**20} MiB: save it as a PNG, "
                               "JPEG or WebP of at most 8192x8192 pixels")
        data = path.read_bytes()
    except OSError as e:
        raise ImageProblem(f"the image {path} cannot be read ({e.strerror or e})") from None
    return decode_image(data, path), hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, path) -> object:
    """The RGB PIL image in `data` (the bytes of the file `path`, named in messages), within
    MAX_IMAGE_PIXELS; ImageProblem otherwise. For images that arrive as bytes (a cluster worker
    gets them so) as much as for files."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's notes on odd files are not the user's business
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise _too_large(path, f" is {width}x{height},")
                im.load()  # decode it all here: a truncated file fails now, not mid-run
                image = im.convert("RGB")
    except ImageProblem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large(path, " is") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files (OSError, SyntaxError, ...)
        raise ImageProblem(f"the image {path} cannot be read: it is not a readable image "
                           f"({e.__class__.__name__}); use a PNG, JPEG or WebP file") from None
    return image


def _too_large(path: Path, what: str) -> ImageProblem:
    return ImageProblem(f"the image {path}{what} over the {MAX_IMAGE_PIXELS:,}-pixel limit "
                        f"({MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}): scale it down first")
