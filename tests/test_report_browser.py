"""The report of a tiny `rotaq run` opened in a real browser (headless Chromium driven by selenium).

Checks what reading the HTML text cannot: no console errors, every embedded image decoded, nothing wider than a
1280-pixel viewport (no sideways scrolling), every table with a header row. A full-page screenshot is saved to
$ROTAQ_TEST_ARTIFACTS/report-browser.png when that variable is set, else to this module's pytest temporary
folder; its path is printed and named in every assertion message, and it is written before any check runs.

Needs Debian's `chromium` and `chromium-driver` packages (/usr/bin/chromium, /usr/bin/chromedriver) and the
`selenium` package (the `test` extra). `.ci/run` installs the browser; this module only skips, saying what to
install, when they are missing.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from rotaq.pipeline.cli import main
from tests.test_run import tiny_settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
VIEWPORT = (1280, 900)

# Root in a container, a closed network: without the sandbox, the GPU, QUIC and background connections
# (component updates, sync, first-run fetches) Chromium starts and loads a file:// page without reaching out.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--disable-extensions",
                  f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}"]

# Everything the checks need, measured in one pass over the loaded page.
MEASURE = """
const viewport = document.documentElement.clientWidth;
const describe = (el) => {
  const rect = el.getBoundingClientRect();
  return {tag: el.tagName.toLowerCase(), cls: el.getAttribute('class') || '',
          text: (el.innerText || el.getAttribute('alt') || '').replace(/\\s+/g, ' ').trim().slice(0, 60),
          left: Math.round(rect.left), right: Math.round(rect.right), width: Math.round(rect.width)};
};
const tooWide = (el) => {
  const rect = el.getBoundingClientRect();
  return rect.width > 0 && rect.right > viewport + 0.5;
};
const wide = [];
for (const el of document.body.querySelectorAll('*')) {
  // Only the outermost offenders: the cells of a table that is too wide are not news.
  if (tooWide(el) && !(el.parentElement && el.parentElement !== document.body && tooWide(el.parentElement))) {
    wide.push(describe(el));
  }
}
const images = Array.from(document.images).map((img, i) => ({
  index: i, complete: img.complete, naturalWidth: img.naturalWidth,
  alt: (img.getAttribute('alt') || '').slice(0, 60), src: (img.getAttribute('src') || '').slice(0, 40)}));
const tables = Array.from(document.querySelectorAll('table')).map((table, i) => {
  let heading = table.previousElementSibling;
  while (heading && !/^H[1-6]$/.test(heading.tagName)) heading = heading.previousElementSibling;
  const headRows = table.tHead ? Array.from(table.tHead.rows) : [];
  const theadHasTh = headRows.some((row) => row.querySelector('th') !== null);
  const first = table.rows.length ? table.rows[0] : null;
  const firstRowAllTh = first !== null && first.cells.length > 0
    && Array.from(first.cells).every((cell) => cell.tagName === 'TH');
  return {index: i, heading: heading ? heading.innerText.trim() : '', rows: table.rows.length,
          header: theadHasTh || firstRowAllTh};
});
return {viewport: viewport, innerWidth: window.innerWidth, scrollWidth: document.documentElement.scrollWidth,
        scrollHeight: document.documentElement.scrollHeight, title: document.title,
        wide: wide, images: images, tables: tables};
"""


@dataclass
class Page:
    screenshot: Path
    facts: dict[str, Any]
    console: list[dict[str, Any]]

    def where(self) -> str:
        return f"(screenshot: {self.screenshot})"


def artifact_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("ROTAQ_TEST_ARTIFACTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder) / "report-browser.png"
    return tmp_path_factory.mktemp("report-browser") / "report.png"


@pytest.fixture(scope="module")
def browser_ready() -> None:
    """Skip (before the tiny run) when the browser, its driver or selenium is missing; installing is .ci/run's job."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.skip(f"browser test needs {' and '.join(missing)}: install Debian's packages with "
                    "`apt-get install chromium chromium-driver` (.ci/run does it when apt-get can)")
    pytest.importorskip("selenium", reason="browser test needs selenium: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def report_page(browser_ready: None, tmp_path_factory: pytest.TempPathFactory, tiny_hf_folder: Path,
                tiny_text_file: Path) -> Page:
    """A tiny run's report.html loaded once in headless Chromium: screenshot saved, facts measured, browser closed."""
    folder = tmp_path_factory.mktemp("tiny-run")
    config_file = folder / "rotaq.yaml"
    # Every section a report can have: training curve, outliers, export, one bench with its tables and charts.
    settings = tiny_settings(tiny_hf_folder, tiny_text_file, export__enabled=True, export__check_tokens=8,
                             bench__prompt_lengths=[16], bench__decode_tokens=4, bench__repeats=2)
    config_file.write_text(yaml.safe_dump(settings))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", "--config", str(config_file), "--out", str(folder / "run")]) == 0
    report = folder / "run" / "report.html"
    assert report.is_file()
    return load_in_chromium(report, artifact_path(tmp_path_factory), folder)


def load_in_chromium(report: Path, screenshot: Path, scratch: Path) -> Page:
    """Open `report` in headless Chromium at 1280 px, save a full-page screenshot, measure the page (MEASURE)
    and read the console. Also used on the demo's report by examples/report_screenshot.py."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    folder = Path(scratch)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=folder)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(folder / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        # The window size is not the viewport in every Chromium version: pin the viewport itself.
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": VIEWPORT[0], "height": VIEWPORT[1], "deviceScaleFactor": 1, "mobile": False})
        driver.set_page_load_timeout(60)
        driver.get(report.as_uri())
        # The whole page, at the viewport's width, written before any check so a failing run leaves it too.
        height = driver.execute_script("return document.documentElement.scrollHeight")
        width = driver.execute_script("return document.documentElement.scrollWidth")
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": max(width, VIEWPORT[0]), "height": height, "scale": 1}})
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        print(f"report screenshot: {screenshot}")
        facts = driver.execute_script(MEASURE)
        console = driver.get_log("browser")
    finally:
        driver.quit()
    return Page(screenshot=screenshot, facts=facts, console=console)


def test_screenshot_was_saved(report_page: Page) -> None:
    assert report_page.screenshot.stat().st_size > 0, report_page.where()
    assert report_page.screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", report_page.where()


def test_no_console_errors(report_page: Page) -> None:
    errors = [entry for entry in report_page.console if entry.get("level") == "SEVERE"]
    assert not errors, f"console errors: {[entry.get('message') for entry in errors]} {report_page.where()}"


def test_every_image_loaded(report_page: Page) -> None:
    images = report_page.facts["images"]
    assert images, f"the report shows no image {report_page.where()}"
    broken = [image for image in images if not image["complete"] or image["naturalWidth"] <= 0]
    assert not broken, f"images not loaded: {broken} {report_page.where()}"


def test_nothing_wider_than_the_viewport(report_page: Page) -> None:
    facts = report_page.facts
    assert facts["viewport"] <= VIEWPORT[0] and facts["innerWidth"] == VIEWPORT[0], facts
    lines = [f"<{el['tag']}{' class=' + repr(el['cls']) if el['cls'] else ''}> {el['width']} px wide, "
             f"right edge at {el['right']} px: {el['text']!r}" for el in facts["wide"]]
    assert not lines, (f"{len(lines)} element(s) reach past the {facts['viewport']}-pixel viewport "
                       f"{report_page.where()}:\n" + "\n".join(lines))
    assert facts["scrollWidth"] <= facts["viewport"], (
        f"the page scrolls sideways: {facts['scrollWidth']} px of content in a {facts['viewport']}-pixel viewport "
        f"{report_page.where()}")


def test_every_table_has_a_header_row(report_page: Page) -> None:
    tables = report_page.facts["tables"]
    headless = [f"table {table['index']} (under {table['heading']!r}, {table['rows']} rows)"
                for table in tables if not table["header"]]
    assert not headless, f"tables without a header row: {headless} {report_page.where()}"
