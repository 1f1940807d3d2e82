"""Open a run's report.html in headless Chromium at 1280 px, as tests/test_report_browser.py does, save a
full-page screenshot and print what the browser test checks (from the repository root):
PYTHONPATH=. python examples/report_screenshot.py
runs/demo/report.html runs/demo/report-screenshot.png"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from tests.test_report_browser import load_in_chromium


def main(report: Path, screenshot: Path) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        page = load_in_chromium(report.resolve(), screenshot, Path(scratch))
    facts = page.facts
    errors = [entry for entry in page.console if entry.get("level") == "SEVERE"]
    broken = [image for image in facts["images"] if not image["complete"] or image["naturalWidth"] == 0]
    headless = [table for table in facts["tables"] if not table["header"]]
    print(f"screenshot {screenshot}: page {facts['scrollWidth']} x {facts['scrollHeight']} px in a "
          f"{facts['viewport']} px viewport; {len(facts['images'])} images ({len(broken)} broken), "
          f"{len(facts['tables'])} tables ({len(headless)} without a header row), {len(facts['wide'])} elements "
          f"wider than the viewport, {len(errors)} console errors")
    return 1 if errors or broken or headless or facts["wide"] else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
