"""Render a bench report in headless Chromium and check that its plots are on screen.

`.ci/run` calls this on the report that tests/bench/test_e2e_real_server.py wrote: the test
suite itself checks the page with Python only, so that it passes on a machine without a
browser; this adds what only a browser shows (the page's own layout draws the images).
Usage: python .ci/render_report.py REPORT.html
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.bench.report_pixels import count_plot_pixels  # noqa: E402


def main(page: Path) -> int:
    chromium = next((path for name in ("chromium", "chromium-browser", "google-chrome")
                     if (path := shutil.which(name))), None)
    if chromium is None:
        print("render_report: no Chromium found (apt-get install chromium)", file=sys.stderr)
        return 2
    import matplotlib.image

    with tempfile.TemporaryDirectory() as scratch:
        png = Path(scratch) / "report.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", f"--user-data-dir={scratch}/profile", f"--screenshot={png}",
                        "--window-size=1300,1800", page.resolve().as_uri()],
                       check=True, timeout=180, capture_output=True)
        blue_pixels = count_plot_pixels(matplotlib.image.imread(str(png)))
    if blue_pixels <= 500:
        print(f"render_report: only {blue_pixels} plot-coloured pixels on screen for {page}", file=sys.stderr)
        return 1
    print(f"render_report: {page} renders with its plots ({blue_pixels} plot-coloured pixels)")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
