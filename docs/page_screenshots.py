"""The README's screenshots of the page at ``/``: a clean MNIST test digit and an outlier (a Fashion-MNIST
image), each uploaded in a fresh page of headless Chromium against a real service.

    python docs/page_screenshots.py [--data ../shared/data] [--out docs]

Writes ``page_clean.png`` and ``page_outlier.png`` (palette PNGs, small). Needs Debian's ``chromium``
and ``chromium-driver`` and Selenium (the dev extra)."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from benchmarks.serverproc import start_server, stop_server  # noqa: E402
from detectors.datasets import read_idx  # noqa: E402


def shoot(driver, base: str, image: Path, out: Path) -> None:
    driver.get(base + "/")
    WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "model-line").text.startswith("Model"))
    driver.find_element(By.ID, "files").send_keys(str(image))
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results > li"))
    height = int(driver.execute_script("return document.body.getBoundingClientRect().bottom")) + 16
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    shot = shot.crop((0, 0, shot.size[0], min(height, shot.size[1])))
    shot.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"{out}: {shot.size[0]}x{shot.size[1]}, {out.stat().st_size} bytes")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    args = p.parse_args()
    digit = read_idx(args.data / "mnist" / "t10k-images-idx3-ubyte.gz")[0]
    boot = read_idx(args.data / "fashion_mnist" / "t10k-images-idx3-ubyte.gz")[0]
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name, pixels in (("digit-7.png", digit), ("ankle-boot.png", boot)):
            files[name] = Path(tmp) / name
            Image.fromarray(np.asarray(pixels)).save(files[name])
        proc, base = start_server(dict(GGA_ARTIFACT_DIR=str(Path(tmp) / "a"), GGA_LOG_LEVEL="warning",
                                       GGA_STRATEGY="device"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        options = webdriver.ChromeOptions()
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=900,2400",
                    "--hide-scrollbars"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            shoot(driver, base, files["digit-7.png"], args.out / "page_clean.png")
            shoot(driver, base, files["ankle-boot.png"], args.out / "page_outlier.png")
        finally:
            driver.quit()
            stop_server(proc)


if __name__ == "__main__":
    main()
