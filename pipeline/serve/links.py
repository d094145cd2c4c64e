"""Links to indexed images: an <img> cannot send the API key, so its URL carries an expiring HMAC of the image."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from urllib.parse import urlencode

# A link works for 1 to 2 hours: its expiry is rounded up to a whole hour, so the same image gets the same URL
# in every search of that hour and the browser's cache (Cache-Control max-age, LINK_TTL_S) serves it again.
LINK_TTL_S = 3600
SIGNATURE_CHARS = 22  # 128 bits of the HMAC-SHA256, base64url


class Links:
    """URLs of the thumbnail and original-image routes. With an API key they carry `exp` and `sig`: an HMAC of
    (root, path, exp) under a secret derived from the key, so a link opens that one image until it expires and
    nothing else; the key itself never appears in a URL. A server without a key signs nothing."""

    def __init__(self, api_key: str | None, clock: Callable[[], float] = time.time) -> None:
        # Derived, not random: replicas behind one balancer with the same key accept each other's links.
        self._secret = None if api_key is None else hmac.new(api_key.encode(), b"embindex image links v1",
                                                             hashlib.sha256).digest()
        self._clock = clock

    def _signature(self, root: str, path: str, exp: int) -> str:
        assert self._secret is not None
        digest = hmac.new(self._secret, f"{root}\0{path}\0{exp}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode()[:SIGNATURE_CHARS]

    def params(self, root: str, path: str) -> dict[str, str]:
        params = {"root": root, "path": path}
        if self._secret is not None:
            exp = (int(self._clock()) // LINK_TTL_S + 2) * LINK_TTL_S
            params |= {"exp": str(exp), "sig": self._signature(root, path, exp)}
        return params

    def thumbnail(self, root: str, path: str, size: int) -> str:
        return "/v1/thumbnails?" + urlencode({**self.params(root, path), "size": str(size)})

    def image(self, root: str, path: str) -> str:
        return "/v1/images?" + urlencode(self.params(root, path))

    def verify(self, query: Mapping[str, str]) -> bool:
        """True for a link this server signed for exactly this root and path that has not expired."""
        if self._secret is None:
            return True
        exp, sig = query.get("exp", ""), query.get("sig", "")
        if not (exp.isdigit() and len(exp) <= 12) or int(exp) < self._clock():  # 12 digits: year 33,000
            return False
        expected = self._signature(query.get("root", ""), query.get("path", ""), int(exp))
        return hmac.compare_digest(sig.encode(), expected.encode())
