"""The search routes' parts on their own: signed links, the thumbnail cache and renderer, pyramid tile boxes."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
import pytest
from PIL import Image

from pipeline.serve.links import LINK_TTL_S, Links
from pipeline.serve.search_api import SearchRequest, search_answer
from pipeline.serve.thumbnails import CacheKey, ThumbnailCache, ThumbnailError, render_thumbnail
from tests.conftest import HOSTILE


def _params(url: str) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}


def test_a_link_opens_its_image_until_it_expires() -> None:
    now = [1_000_000.0]
    links = Links("secret-key", clock=lambda: now[0])
    params = _params(links.thumbnail("/photos", "cats/a b&c.jpg", 256))
    assert params["path"] == "cats/a b&c.jpg" and params["root"] == "/photos" and "secret-key" not in str(params)
    assert links.verify(params)
    assert int(params["exp"]) - now[0] >= LINK_TTL_S  # at least an hour left, whenever it was made
    assert _params(links.image("/photos", "cats/a b&c.jpg"))["sig"] == params["sig"]  # the same image, any route
    now[0] += 100  # within the same hour: the same URL again, so the browser's cache serves it
    assert _params(links.thumbnail("/photos", "cats/a b&c.jpg", 256)) == params and links.verify(params)
    now[0] = int(params["exp"]) + 1
    assert not links.verify(params)


@pytest.mark.parametrize("changed", [{"path": "cats/b.jpg"}, {"root": "/"}, {"exp": "99999999999"}, {"sig": "x"},
                                     {"exp": "9" * 5000}, {"exp": "-1"}])
def test_a_changed_link_opens_nothing(changed: dict[str, str]) -> None:
    links = Links("secret-key", clock=lambda: 1_000_000.0)
    params = _params(links.thumbnail("/photos", "cats/a.jpg", 256))
    assert not links.verify({**params, **changed})
    assert not Links("another-key", clock=lambda: 1_000_000.0).verify(params)


def test_without_a_key_links_are_plain() -> None:
    links = Links(None)
    assert links.thumbnail("/p", "a.jpg", 256) == "/v1/thumbnails?root=%2Fp&path=a.jpg&size=256"
    assert links.verify({"root": "/p", "path": "a.jpg"})


def test_the_cache_drops_the_least_recently_used_past_its_bytes() -> None:
    cache = ThumbnailCache(max_bytes=100)
    keys = [CacheKey(f"/{n}.jpg", 256, 0, 0) for n in range(4)]
    for key in keys[:3]:
        cache.put(key, b"x" * 40)  # the third pushes the total to 120: the first goes
    assert cache.get(keys[0]) is None and cache.used == 80
    assert cache.get(keys[1]) is not None  # now the most recently used
    cache.put(keys[3], b"y" * 40)
    assert cache.get(keys[2]) is None and cache.get(keys[1]) is not None and len(cache) == 2
    cache.put(CacheKey("/big.jpg", 256, 0, 0), b"z" * 101)  # larger than the whole cache: not kept
    assert len(cache) == 2


def test_thumbnails_refuse_too_many_pixels_from_the_header(tmp_path: Path) -> None:
    with pytest.raises(ThumbnailError, match="too many pixels: 400000000 > 100000000"):
        render_thumbnail(str(HOSTILE / "decompression_bomb_400mpx.png"), 256, 100_000_000)
    with pytest.raises(ThumbnailError, match="cannot render"):
        render_thumbnail(str(HOSTILE / "truncated_half.jpg"), 256, 100_000_000)
    large = tmp_path / "large.png"
    Image.new("RGBA", (3000, 1000), (10, 200, 30, 128)).save(large)
    thumbnail = render_thumbnail(str(large), 256, 100_000_000)
    assert thumbnail[:2] == b"\xff\xd8"  # a JPEG


def test_pyramid_hits_carry_their_tiles_box() -> None:
    hits = pa.table({"rank": [1], "score": [1.5], "path": ["a.jpg"], "root": ["/p"], "size_bytes": [1],
                     "mtime_ns": [1], "width": [900], "height": [600], "content_hash": ["h"],
                     "tile_level": pa.array([1], pa.int8()), "tile_row": pa.array([2], pa.int8()),
                     "tile_col": pa.array([0], pa.int8())})
    answer = search_answer(hits, SearchRequest("text", text="a"), Links(None), [(1, 1), (3, 3)], "clip", False, 1.0)
    assert answer["tiles"] is True
    assert answer["data"][0]["tile_box"] == [0, 400, 300, 600]  # the bottom-left cell of the 3 x 3 grid
    assert answer["data"][0]["tile_level"] == 1
