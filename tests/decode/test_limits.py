"""limits.py: a decode process's memory bound counts from its own size; a file past it is an error row, not 8 GB."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import DecodeConfig
from pipeline.decode.pool import DecodePool
from pipeline.decode.spec import InputSpec
from tests.conftest import HOSTILE, REPO
from tests.decode import crafted

SPEC = InputSpec("shortest_edge", (64, 64), (64, 64))
MAX_PIXELS = 100_000_000

RELATIVE_PROBE = """
import numpy as np
from multiprocessing.shared_memory import SharedMemory
from pipeline.decode import limits

shared = SharedMemory(create=True, size=512 << 20)  # as a decode worker maps the pool's regions
try:
    limits.bound_memory(64)
    small = np.ones(32 << 20, np.uint8)  # within the 64 MB over the size at start (shared memory included)
    print("32 MB ok", limits.bound_mb())
    try:
        big = np.ones(128 << 20, np.uint8)
        print("128 MB ok")
    except MemoryError:
        print("128 MB refused")
finally:
    shared.close()
    shared.unlink()
"""


def test_the_bound_counts_from_the_process_own_size_with_its_shared_memory() -> None:
    """512 MB of shared memory mapped before the bound does not eat the 64 MB budget; 128 MB more is refused."""
    done = subprocess.run([sys.executable, "-c", RELATIVE_PROBE], capture_output=True, text=True, cwd=REPO,
                          check=True)
    assert done.stdout.splitlines() == ["32 MB ok 64", "128 MB refused"]


def outcomes(pool: DecodePool, paths: list[str]) -> dict[str, object]:
    found = {}
    for result in pool.imap((Path(path).name, path, None) for path in paths):
        found[result.key] = result.error if result.error else np.array(result.pixels).shape
        pool.release(result.slot)
    return found


def test_a_file_past_the_bound_is_an_error_row_and_the_next_files_decode(tmp_path: Path) -> None:
    """A 6000x6000 RGBA PNG (144 MB of pixels, 45 KB on disk) in workers bounded at 128 MB: its row says why,
    and the same worker goes on to decode the next files."""
    big = tmp_path / "big.png"
    big.write_bytes(crafted.zero_png(6000, 6000))
    huge = tmp_path / "huge.jpg"  # 256 MB of (sparse) bytes: reading them alone is past the bound
    with open(huge, "wb") as handle:
        handle.truncate(256 << 20)
    after = [str(HOSTILE / name) for name in ("plain.bmp", "large_24mp.jpg", "rgba_half_alpha.png", "lzw.tiff")]
    with DecodePool(SPEC, workers=1, max_image_pixels=MAX_PIXELS, timeout_s=60, max_worker_mb=128) as pool:
        found = outcomes(pool, [str(big), str(huge), *after])
        assert pool.crashes == 0
    assert found.pop("big.png") == found.pop("huge.jpg") == "needs more than 128 MB to decode"
    assert found == {Path(path).name: SPEC.output_shape for path in after}


def test_a_100mpx_rgba_png_at_the_pixel_limit_decodes_under_the_default_bound(tmp_path: Path) -> None:
    """The heaviest legitimate file the default must admit: 10000x10000 RGBA, rotated by EXIF (a copy more)."""
    default_mb = DecodeConfig().max_worker_mb
    assert default_mb is not None
    path = tmp_path / "limit.png"
    path.write_bytes(crafted.zero_png(10_000, 10_000, exif=crafted.exif_orientation(6)))
    with DecodePool(SPEC, workers=1, max_image_pixels=MAX_PIXELS, timeout_s=120, max_worker_mb=default_mb) as pool:
        assert outcomes(pool, [str(path)]) == {"limit.png": SPEC.output_shape}


@pytest.mark.parametrize("max_mb", [None, 0])
def test_no_bound_when_none_is_asked(max_mb: int | None) -> None:
    from pipeline.decode import limits

    assert limits.bound_memory(max_mb) is None


def test_the_servers_decode_processes_have_the_same_bound() -> None:
    """`embindex serve` decodes request images in its own processes (serve/images.py): a request image past the
    bound is a 422 with the run's reason, and the next image decodes in the same pool."""
    import asyncio
    import base64
    import io

    from PIL import Image

    from pipeline.serve.images import Decoded, DecodeWorkers, Failed

    def uri(data: bytes) -> str:
        return "data:image/png;base64," + base64.b64encode(data).decode()

    small = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(small, "PNG")
    workers = DecodeWorkers(SPEC, 1, True, 60, max_worker_mb=128)
    try:
        big, fine = asyncio.run(workers.decode([uri(crafted.zero_png(6000, 6000)), uri(small.getvalue())],
                                               MAX_PIXELS, None))
    finally:
        workers.close()
    assert isinstance(big, Failed) and (big.status, big.reason) == (422, "needs more than 128 MB to decode")
    assert isinstance(fine, Decoded) and fine.pixels.shape == (1, *SPEC.output_shape)
