"""What the report tests look for in the plots: pixels of matplotlib's first line colour."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import numpy as np

PLOT_BLUE = np.array([0x1F, 0x77, 0xB4]) / 255
"""matplotlib's tab:blue (#1f77b4), the first line colour of every plot in the report."""


def count_plot_pixels(pixels: np.ndarray) -> int:
    """Pixels of an RGB(A) float image in [0, 1] that are the plots' line colour."""
    return int((np.abs(pixels[..., :3] - PLOT_BLUE).max(axis=-1) < 0.08).sum())


class _ImageSources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.sources.append(dict(attrs).get("src") or "")


def embedded_images(page_html: str) -> list[np.ndarray]:
    """Decode every <img> of the page as a browser would: each must be an inline PNG."""
    import matplotlib.image

    parser = _ImageSources()
    parser.feed(page_html)
    images = []
    for source in parser.sources:
        header, _, payload = source.partition(",")
        assert header == "data:image/png;base64", f"an image is not an inline PNG: {source[:60]!r}"
        images.append(matplotlib.image.imread(io.BytesIO(base64.b64decode(payload, validate=True)), format="png"))
    return images
