"""capture.py: what libtiff and PIL write while decoding stays with the file (its reason, the debug log), off stderr."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.decode.pool import DecodePool
from pipeline.decode.spec import InputSpec
from tests.conftest import HOSTILE, REPO
from tests.decode import crafted

SPEC = InputSpec("shortest_edge", (64, 64), (64, 64))

CAPTURE_PROBE = """
import os, warnings
from pipeline.decode import capture

capture.install()
os.write(2, b"TIFFFillStrip: Read error on strip 0\\n")  # as libtiff's C code writes it
warnings.warn("Image was not the expected size")
print(repr(capture.take()))
print(repr(capture.take()))  # the next file starts clean
capture.release()
os.write(2, b"after release\\n")
"""


def test_fd2_goes_to_the_buffer_until_released() -> None:
    done = subprocess.run([sys.executable, "-c", CAPTURE_PROBE], capture_output=True, text=True, cwd=REPO,
                          check=True)
    first, second = done.stdout.splitlines()
    assert "TIFFFillStrip: Read error on strip 0" in first and "Image was not the expected size" in first
    assert second == "''"
    assert done.stderr == "after release\n"


@pytest.fixture
def odd_files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "unknown_tags_cut.tif": crafted.tiff_with_unknown_tags_cut_short(),
        "garbled.tif": crafted.tiff_garbled(),
        "truncated.png": crafted.truncated_png(),
        "ico_warns.ico": crafted.ico((16, 16), crafted.zero_png(64, 64)),  # PIL: "Image was not the expected size"
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in files} | {"plain.bmp": HOSTILE / "plain.bmp"}


def test_decoder_chatter_never_reaches_stderr(odd_files: dict[str, Path], capfd: pytest.CaptureFixture,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """Workers inherit the pytest process's fd 2 (capfd's file): before, libtiff's lines landed there."""
    caplog.set_level(logging.DEBUG, logger="pipeline.decode.pool")
    found = {}
    with DecodePool(SPEC, workers=1, max_image_pixels=100_000_000, timeout_s=30) as pool:
        for result in pool.imap((name, str(path), None) for name, path in odd_files.items()):
            found[result.key] = result.error or np.array(result.pixels).shape
            pool.release(result.slot)
    assert capfd.readouterr().err == ""
    # What libtiff said makes the reason truthful: PIL alone says "decoder error -2" for both.
    assert found["unknown_tags_cut.tif"] == "truncated file"
    assert found["garbled.tif"].startswith("corrupt image data: ZIPDecode: ")
    assert found["truncated.png"] == "truncated file"
    assert found["ico_warns.ico"] == found["plain.bmp"] == SPEC.output_shape
    said = {record.getMessage().split(":")[0] for record in caplog.records if "the decoder said" in record.getMessage()}
    assert said >= {str(odd_files["garbled.tif"]), str(odd_files["ico_warns.ico"])}
