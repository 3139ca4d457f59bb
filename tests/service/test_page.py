"""The page at ``/`` in a real browser: Debian's headless Chromium, driven by Selenium through chromedriver,
against a real uvicorn process with a read token set.

Skipped, with the reason, where Selenium, ``chromium`` or ``chromedriver`` is missing (``.ci/run``
installs them from Debian's packages)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from benchmarks.serverproc import start_server, stop_server
from detectors.datasets import read_idx
from tests.support.service import MNIST

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="no headless browser: apt-get install chromium chromium-driver (.ci/run does)")
FASHION = MNIST.parent / "fashion_mnist"
TOKEN = "page-read-token"


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = dict(GGA_ARTIFACT_DIR=str(tmp_path_factory.mktemp("page") / "a"), GGA_READ_TOKEN=TOKEN,
               GGA_LOG_LEVEL="warning", GGA_STRATEGY="device", GGA_TORCH_THREADS="1")
    proc, base = start_server(env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield base
    out = stop_server(proc)
    assert "Traceback" not in out, out


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,1400",
                "--disable-background-networking", "--disable-component-update", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def requested_urls(driver) -> list[str]:
    """Every URL the page's network stack requested since the last call (Chrome's performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def wait_cards(driver, n: int) -> list:
    WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results > li")) >= n)
    return driver.find_elements(By.CSS_SELECTOR, "#results > li")


def api_answer(base: str, body: bytes) -> dict:
    r = httpx.post(f"{base}/predict?return_csm=true&explain=true", content=body,
                   headers={"content-type": "image/png"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]


def check_card(card, expected: dict) -> None:
    assert card.get_attribute("data-label") == str(expected["label"])
    assert card.get_attribute("data-flagged") == ("true" if expected["flagged"] else "false")
    assert card.find_element(By.CSS_SELECTOR, ".label").text == expected["label_name"]
    grid = card.find_element(By.CSS_SELECTOR, ".heatmap")
    n = len(expected["csm"])
    assert grid.get_attribute("data-n") == str(n) == "5"
    assert len(grid.find_elements(By.CSS_SELECTOR, ".cell")) == n * n
    assert grid.find_elements(By.CSS_SELECTOR, ".rowhead")[0].text == expected["label_name"]  # predicted first
    assert grid.find_elements(By.CSS_SELECTOR, ".colhead")[0].text == expected["label_name"]
    bars = card.find_elements(By.CSS_SELECTOR, ".bars li")
    assert [b.get_attribute("data-name") for b in bars] == [c["name"] for c in expected["components"]]
    low = [c["name"] for c in expected["components"] if c["p_value"] < 0.05]
    assert [b.get_attribute("data-name") for b in bars if b.find_elements(By.CSS_SELECTOR, ".bar.low")] == low


def test_page_uploads_draws_and_stays_on_its_origin(server, browser, tmp_path):
    digits, labels = read_idx(MNIST / "t10k-images-idx3-ubyte.gz"), read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")
    clothes = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")
    digit, shoe = tmp_path / "digit.png", tmp_path / "shoe.png"
    digit.write_bytes(png(digits[0]))
    shoe.write_bytes(png(clothes[0]))  # an ankle boot
    want_digit, want_shoe = api_answer(server, digit.read_bytes()), api_answer(server, shoe.read_bytes())
    assert (want_digit["label"], want_digit["flagged"]) == (int(labels[0]), False)
    assert want_shoe["flagged"] is True

    browser.get(server + "/")
    token = WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "token")
                                             if d.find_element(By.ID, "token").is_displayed() else None)
    assert browser.switch_to.active_element == token  # the field takes the focus: keyboard first
    token.send_keys(TOKEN + "\n")
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "model-line").text.startswith("Model mnist_cnn"))
    assert browser.find_element(By.ID, "draw").is_displayed()
    assert not browser.find_element(By.ID, "token-form").is_displayed()

    browser.find_element(By.ID, "files").send_keys(f"{digit}\n{shoe}")  # one multipart request, in order
    cards = wait_cards(browser, 2)
    # each answer is prepended: the last file first
    check_card(cards[1], want_digit)
    check_card(cards[0], want_shoe)

    pad = browser.find_element(By.ID, "pad")
    (ActionChains(browser).move_to_element_with_offset(pad, 0, -90).click_and_hold()
     .move_by_offset(0, 60).move_by_offset(0, 60).move_by_offset(0, 60).release().perform())
    drawn = base64.b64decode(browser.execute_script("return document.getElementById('pad')"
                                                    ".toDataURL('image/png').split(',')[1]"))
    browser.find_element(By.ID, "predict-drawing").click()
    cards = wait_cards(browser, 3)
    want_drawing = api_answer(server, drawn)
    assert want_drawing["label_name"] == "1"  # a vertical stroke
    check_card(cards[0], want_drawing)
    assert cards[0].find_element(By.CSS_SELECTOR, ".source").text == "drawing"

    urls = requested_urls(browser)
    paths = {u.removeprefix(server).split("?")[0] for u in urls if u.startswith(server + "/")}
    assert {"/", "/ui/page.js", "/ui/page.css", "/info", "/predict"} <= paths
    outside = [u for u in urls if not u.startswith(server + "/") and not u.startswith(("blob:", "data:"))]
    assert outside == []

    browser.set_window_size(390, 900)  # a phone's width: nothing wider than the screen
    time.sleep(0.3)
    assert browser.execute_script("return document.documentElement.scrollWidth <= "
                                  "document.documentElement.clientWidth") is True
