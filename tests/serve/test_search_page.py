"""The search page in headless Chromium (Debian's chromium and chromedriver, driven by Selenium): the key entered in
the page, a typed query's grid, an uploaded indexed image first in its own results, a click for the image and its
neighbours, 404 for a thumbnail outside the index, and no script error. Skipped where no browser is installed."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serve.conftest import ADDED_LATER, PHOTOS, SEARCH_KEY

try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # the [test] extra brings it; without it the test is skipped, not failed
    webdriver = None  # type: ignore[assignment]

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver", "chromium.chromedriver")  # Debian's chromium-driver; Ubuntu's snap
WAIT_S = 60  # bounds a failing test only: each step waits on the page's own state, which changes in milliseconds


def _which(names: tuple[str, ...]) -> str | None:
    return next((path for path in map(shutil.which, names) if path), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    if webdriver is None:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    binary, driver = _which(BROWSERS), _which(DRIVERS)
    if binary is None or driver is None:
        pytest.skip("no Chromium with its chromedriver here (.ci/run installs Debian's chromium and chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900"):  # --no-sandbox: CI runs as root, where Chromium's sandbox cannot
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver's path is given, so Selenium Manager never looks for (or downloads) one.
    session = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    yield session
    session.quit()


def _text(browser: WebDriver, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def _searches(browser: WebDriver) -> int:
    return int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-searches"))


def _wait_for_search(browser: WebDriver, done_before: int) -> None:
    WebDriverWait(browser, WAIT_S).until(lambda b: _searches(b) > done_before)
    state = browser.find_element(By.ID, "status").get_attribute("data-state")
    assert state == "done", _text(browser, "status")


def _hits(browser: WebDriver, container: str = "grid") -> list[tuple[str, float]]:
    return [(card.get_attribute("data-path"), float(card.get_attribute("data-score")))
            for card in browser.find_elements(By.CSS_SELECTOR, f"#{container} .hit")]


def _status_of(browser: WebDriver, url: str) -> int:
    """The HTTP status the page's own fetch gets for url, with the key the page holds."""
    return browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {headers: {Authorization: 'Bearer ' + arguments[1]}}).then(r => done(r.status));",
        url, SEARCH_KEY)


def test_search_page_in_a_browser(browser: WebDriver, search_server: dict) -> None:
    wait = WebDriverWait(browser, WAIT_S)
    browser.get(search_server["url"] + "/")
    wait.until(lambda b: b.find_element(By.ID, "status").get_attribute("data-state") == "error")
    assert "needs an API key" in _text(browser, "status")  # the server has a key: the page asks for it
    key = browser.find_element(By.ID, "key")
    key.send_keys(SEARCH_KEY, Keys.TAB)  # the change event stores it for this tab and reloads the index's facts
    wait.until(lambda b: "33 images" in _text(b, "index-info"))

    before = _searches(browser)
    browser.find_element(By.ID, "text").send_keys("a dog on a beach", Keys.ENTER)
    _wait_for_search(browser, before)
    hits = _hits(browser)
    assert len(hits) == 24 and [score for _, score in hits] == sorted((score for _, score in hits), reverse=True)
    assert "Smoke test" in _text(browser, "banner") and "#text=a+dog+on+a+beach" in browser.current_url
    wait.until(lambda b: b.execute_script(  # every thumbnail loaded through its signed link, without the key
        "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"))

    before = _searches(browser)
    photo = Path(search_server["root"]) / PHOTOS[9].name
    browser.find_element(By.ID, "image").send_keys(str(photo))  # the file picker, as a person uploads
    _wait_for_search(browser, before)
    first_path, first_score = _hits(browser)[0]
    assert first_path == PHOTOS[9].name and first_score == pytest.approx(1.0, abs=1e-4)
    assert _text(browser, "query-name") == PHOTOS[9].name

    browser.find_elements(By.CSS_SELECTOR, "#grid .hit")[1].click()  # its nearest other image, and its neighbours
    wait.until(lambda b: b.find_element(By.ID, "detail").get_attribute("open") is not None)
    wait.until(lambda b: b.find_element(By.ID, "neighbours-status").get_attribute("data-state") == "done")
    opened = _hits(browser)[1][0]
    assert _text(browser, "detail-path") == opened
    neighbours = _hits(browser, "neighbours")
    assert len(neighbours) == 12 and opened not in [path for path, _ in neighbours]
    wait.until(lambda b: b.execute_script("const i = document.getElementById('detail-img');"
                                          "return i.complete && i.naturalWidth > 0"))

    for outside in ("../../../etc/passwd", "/etc/passwd", "notes.txt", ADDED_LATER):
        assert _status_of(browser, "/v1/thumbnails?path=" + outside.replace("/", "%2F")) == 404, outside
    errors = [entry["message"] for entry in browser.get_log("browser")
              if entry["level"] == "SEVERE" and "status of 401" not in entry["message"]
              and "status of 404" not in entry["message"]]
    assert not errors, errors  # no script error, no refused resource (the page's Content-Security-Policy)
