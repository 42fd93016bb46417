"""`data/images.py` as the server meets it (issue #29): a request's images open only as PNG, JPEG, WEBP, GIF or
BMP, data files also as TIFF, PPM, TGA and JPEG 2000, never as EPS; the size is judged from the header, and
decoding touches no process-wide state (requests decode on several threads)."""

from __future__ import annotations

import io
import warnings

import pytest
from PIL import Image

from mmbridge.data.images import DATA_FORMATS, IMAGE_FORMATS, ImageError, ImageTooLarge, decode_image, load_image

# An EPS header PIL's EPS plugin accepts; loading it would start Ghostscript (where installed).
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n%%EOF\n"


def encoded(fmt: str, size=(8, 6), mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, 90).save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_allowed_formats_decode(fmt):
    img = decode_image(encoded(fmt, mode="P" if fmt == "GIF" else "RGB"))
    assert img.mode == "RGB" and img.size == (8, 6)


@pytest.mark.parametrize(
    "data", [encoded("TIFF"), encoded("PPM"), encoded("ICO", (16, 16)), EPS], ids=["tiff", "ppm", "ico", "eps"]
)
def test_other_formats_are_not_opened_from_a_request(data):
    with pytest.raises(ImageError, match="not a recognised image format"):
        decode_image(data, formats=IMAGE_FORMATS)


@pytest.mark.parametrize("fmt", [f for f in DATA_FORMATS if f not in IMAGE_FORMATS])
def test_data_files_also_open_as_the_formats_datasets_use(fmt, tmp_path):
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(encoded(fmt))
    assert load_image(path).size == (8, 6)
    with pytest.raises(ImageError, match="not a recognised image format"):
        load_image(path, formats=IMAGE_FORMATS)


@pytest.mark.parametrize("data", [encoded("ICO", (16, 16)), EPS], ids=["ico", "eps"])
def test_data_files_never_open_as_other_formats(data):
    with pytest.raises(ImageError, match="not a recognised image format"):
        decode_image(data)


def test_decoding_leaves_the_warning_filters_alone(monkeypatch):
    """`warnings.catch_warnings` swaps the process-wide filter list, so two threads decoding at once could leave
    each other's filters (or an "error" filter) behind; the filters seen while PIL opens are the caller's own."""
    before, seen = list(warnings.filters), []
    opened = Image.open

    def spy(*args, **kw):
        seen.append(list(warnings.filters))
        return opened(*args, **kw)

    monkeypatch.setattr(Image, "open", spy)
    decode_image(encoded("PNG"))
    assert seen == [before] and warnings.filters == before


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns, then we refuse
def test_pil_limit_applies_when_ours_is_off(monkeypatch):
    """`max_pixels=None` leaves PIL's `MAX_IMAGE_PIXELS`, which is now enforced as an error, not a warning."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for size in [(12, 12), (20, 20)]:  # PIL warns up to twice its limit, and raises beyond
        with pytest.raises(ImageTooLarge, match="exceeds"):
            decode_image(encoded("PNG", size), max_pixels=None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert decode_image(encoded("PNG", (20, 20)), max_pixels=None).size == (20, 20)
