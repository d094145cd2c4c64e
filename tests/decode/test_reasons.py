"""reasons.py: one mapping from decode failures to stable labels; one PIL error gets one label at every stage."""

from __future__ import annotations

import io
import shutil
import struct

import pytest
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from pipeline.decode.image import decode_bytes
from pipeline.decode.reasons import reason_for
from pipeline.decode.spec import InputSpec
from pipeline.errors import DecodeError
from tests.decode import crafted

SPEC = InputSpec("exact", (16, 16), None)
MAX_PIXELS = 100_000_000
ZIP_SAID = "ZIPDecode: Decoding error at scanline 0, invalid bit length repeat."
STRIP_SAID = "TIFFFillStrip: Read error on strip 0; got 5 bytes, expected 35."


def struct_error() -> struct.error:
    try:
        struct.unpack("<I", b"")
    except struct.error as exc:
        return exc
    raise AssertionError("unreachable")


@pytest.mark.parametrize(("exc", "said", "reason"), [
    (UnidentifiedImageError("cannot identify image file <_io.BytesIO>"), "", "not an image"),
    (OSError("image file is truncated (3 bytes not processed)"), "", "truncated file"),
    (OSError("broken data stream when reading image file"), "", "truncated file"),
    (EOFError(), "", "truncated file"),
    (OSError("decoder error -2"), STRIP_SAID, "truncated file"),
    (OSError("decoder error -2"), ZIP_SAID, f"corrupt image data: {ZIP_SAID}"),
    (OSError("decoder error -2"), "", "corrupt image data: decoder error -2"),
    (OSError("Unable to locate Ghostscript on paths"), "", "missing decoder (ghostscript)"),
    (OSError("decoder jpeg2k not available"), "", "missing decoder (jpeg2k)"),
    (OSError("Unsupported BMP compression (7)"), "", "unsupported format: Unsupported BMP compression (7)"),
    (ValueError("unknown raw mode for given image mode"), "",
     "unsupported format: unknown raw mode for given image mode"),
    (MemoryError(), "", "out of memory"),  # this process has no bound (limits.py): no "needs more than"
    (OSError("decoder error -9"), "", "out of memory"),
    (Image.DecompressionBombError("Image size (200 pixels) exceeds limit of 100 pixels, could be decompression "
                                  "bomb DOS attack."), "", "too many pixels: 200 > 100"),
    (SyntaxError("not a TIFF file"), "", "corrupt image data: not a TIFF file"),
    (ValueError(""), "", "corrupt image data: ValueError"),
    (struct_error(), "", "corrupt image data: struct.error: unpack requires a buffer of 4 bytes"),
    (KeyError(5), "", "corrupt image data: KeyError: 5"),
    (DecodeError("empty file"), "", "empty file"),
])
def test_each_failure_has_one_label(exc: BaseException, said: str, reason: str) -> None:
    assert reason_for(exc, said) == reason


def test_a_long_message_stays_one_short_line() -> None:
    reason = reason_for(OSError("x" * 1000 + "\nsecond line"))
    assert "\n" not in reason and len(reason) < 200


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), (1, 2, 3)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(("error", "label"), [
    (OSError("image file is truncated"), "truncated file"),
    (ValueError("bad tile extents"), "corrupt image data: bad tile extents"),
    (OSError("Unsupported BMP compression (7)"), "unsupported format: Unsupported BMP compression (7)"),
])
def test_one_pil_error_gets_one_label_whether_open_or_load_raised_it(monkeypatch: pytest.MonkeyPatch,
                                                                      error: Exception, label: str) -> None:
    """Before, the same error read "unreadable image header: ..." from open and "corrupt image data: ..." or
    "truncated file" from load, and "decode error: ..." from a later step."""
    def raise_it(*args: object, **kwargs: object) -> None:
        raise error

    data, reasons = png(), []
    for target, name in ((Image, "open"), (PngImagePlugin.PngImageFile, "load"), (Image.Image, "resize")):
        with monkeypatch.context() as patch:
            patch.setattr(target, name, raise_it)
            with pytest.raises(DecodeError) as caught:
                decode_bytes(data, SPEC, MAX_PIXELS)
            reasons.append(str(caught.value))
    assert reasons == [label] * 3


@pytest.mark.skipif(shutil.which("gs") is not None, reason="Ghostscript is installed here: EPS decodes")
def test_eps_without_ghostscript_is_a_missing_decoder() -> None:
    """Was "corrupt image data: Unable to locate Ghostscript on paths": the file is fine, the machine lacks gs."""
    with pytest.raises(DecodeError, match=r"^missing decoder \(ghostscript\)$"):
        decode_bytes(crafted.eps(), SPEC, MAX_PIXELS)


def test_an_unsupported_variant_says_so() -> None:
    """A BMP compression PIL has no code for: was "unreadable image header: Unsupported BMP compression (7)"."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "BMP")
    data = bytearray(buffer.getvalue())
    data[30:34] = struct.pack("<I", 7)  # biCompression
    with pytest.raises(DecodeError, match=r"^unsupported format: Unsupported BMP compression \(7\)$"):
        decode_bytes(bytes(data), SPEC, MAX_PIXELS)
