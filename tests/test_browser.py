"""The page at / in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium)
against a real `zimage-server serve` process on the tiny model. Screenshots go to test-artifacts/.

CI installs the browser with .ci/install-browser; where it is missing these tests skip and say so.
"""

from __future__ import annotations

import base64
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from attack_support import ServerProcess
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(
        "browser tests need Debian's chromium and chromium-driver (run .ci/install-browser)", allow_module_level=True
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="browser tests need selenium (pip install -e '.[test]')")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`zimage-server serve` in its own process, on an ephemeral loopback port, until the module ends."""
    process = ServerProcess(models_dir, tmp_path_factory.mktemp("browser") / "server.log").start()
    try:
        yield process.url
    finally:
        process.stop()


@pytest.fixture(scope="module")
def keyed_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same, with an API key: every /v1/* request needs `Authorization: Bearer sk-test`."""
    log_path = tmp_path_factory.mktemp("browser-keyed") / "server.log"
    process = ServerProcess(models_dir, log_path, env={"Z_IMAGE_API_KEY": "sk-test"}).start()
    try:
        yield process.url
    finally:
        process.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(30)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(browser, base: str, *, wait_for_model: bool = True):
    """A fresh page load: no stored key, the model badge filled in, the default (laptop) viewport."""
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    browser.get(base + "/")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    if wait_for_model:
        wait(browser).until(lambda d: d.find_element(By.ID, "model").text == "z-image-turbo")
    return browser


@pytest.fixture
def page(server: str, browser):
    return open_page(browser, server)


def wait(driver, timeout: float = 30) -> WebDriverWait:
    return WebDriverWait(driver, timeout)


def css(driver, selector: str):
    return driver.find_element(By.CSS_SELECTOR, selector)


def fill(element, text: str) -> None:
    element.clear()
    element.send_keys(text)


def screenshot(driver, name: str, *, phone: bool = False) -> Path:
    """A full-page PNG in test-artifacts/, at a laptop or a phone-sized viewport (checked for sideways overflow)."""
    if phone:
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}
        )
        time.sleep(0.3)  # let the layout settle at the new width
        # Nothing may stick out sideways on a phone: the page scrolls only vertically.
        assert driver.execute_script("return document.documentElement.scrollWidth") <= 390
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path = ARTIFACTS / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    if phone:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return path


RECORD_CHANGES = """
// Every value the progress bar and the result images take, in order: mutation records keep the
// old value, so nothing is lost however quickly events arrive.
window.__progress = [];
window.__sources = [];
const bar = arguments[0];
new MutationObserver((records) => {
  for (const r of records) window.__progress.push(Number(r.oldValue));
}).observe(bar, { attributes: true, attributeFilter: ['aria-valuenow'], attributeOldValue: true });
new MutationObserver((records) => {
  for (const r of records) if (r.target.tagName === 'IMG') window.__sources.push(r.target.getAttribute('src') || '');
}).observe(document.getElementById('gallery'), { attributes: true, attributeFilter: ['src'], subtree: true });
"""


def start_generation(driver, prompt: str, width: int, height: int, n: int = 1, *, keyboard: bool = False) -> None:
    """Fill the Generate form with a custom size and press Generate (or Ctrl+Enter in the prompt)."""
    css(driver, '#gen-size-presets [data-size="custom"]').click()
    fill(css(driver, "#gen-width"), str(width))
    fill(css(driver, "#gen-height"), str(height))
    fill(css(driver, '#generate-form [data-field="n"]'), str(n))
    fill(css(driver, "#gen-prompt"), prompt)
    if keyboard:
        css(driver, "#gen-prompt").send_keys(Keys.CONTROL, Keys.ENTER)
    else:
        css(driver, "#generate-form [data-run]").click()


def natural_size(driver, image) -> list[int]:
    return driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)


def finished_cards(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#gallery .card[data-seed]")


def test_generate_moves_the_progress_bar_and_shows_an_image_of_the_chosen_size(page):
    # The fields start at the served model's defaults, read from GET /v1/models (turbo: 8 steps, guidance 0).
    steps = css(page, '#generate-form [data-field="num_inference_steps"]')
    wait(page).until(lambda d: steps.get_attribute("value") == "8")
    assert css(page, '#generate-form [data-field="guidance_scale"]').get_attribute("value") == "0"
    bar = css(page, "#generate-form .bar")
    page.execute_script(RECORD_CHANGES, bar)
    start_generation(page, "a lighthouse at dawn, watercolor", 192, 128, n=2)

    wait(page).until(lambda d: len(finished_cards(d)) == 2)
    wait(page).until(lambda d: css(d, "#generate-form [data-run]").text == "Generate")
    progress = page.execute_script("return window.__progress") + [int(bar.get_attribute("aria-valuenow"))]
    assert progress[-1] == 100 and any(0 < value < 100 for value in progress), progress
    assert progress == sorted(progress)
    sources = page.execute_script("return window.__sources")
    assert any(src.startswith("data:image/png") for src in sources), "no preview was shown"
    assert css(page, "#generate-form .status").text == "Done: 2 images"

    cards = finished_cards(page)
    for card in cards:
        image = card.find_element(By.TAG_NAME, "img")
        assert natural_size(page, image) == [192, 128]
        download = card.find_element(By.CSS_SELECTOR, "a.download")
        assert download.get_attribute("download") == f"zimage-{card.get_attribute('data-seed')}.png"
        assert download.get_attribute("href").startswith("blob:")
    seeds = [int(card.get_attribute("data-seed")) for card in cards]
    assert seeds[1] == seeds[0] + 1  # image 0 first, image i uses seed + i
    assert "192×128" in cards[0].find_element(By.CSS_SELECTOR, ".meta").text

    screenshot(page, "browser-generate")
    screenshot(page, "browser-generate-phone", phone=True)

    # Reusing a result's seed fixes the seed field to it.
    cards[1].find_element(By.CSS_SELECTOR, "button.reuse").click()
    seed_input = css(page, '#generate-form [data-field="seed"]')
    assert seed_input.get_attribute("value") == str(seeds[1]) and seed_input.is_enabled()
    assert not css(page, '#generate-form [data-field="random_seed"]').is_selected()


def test_an_invalid_size_shows_the_servers_message_next_to_the_form(page):
    start_generation(page, "a cat", 100, 100, keyboard=True)

    error = css(page, "#generate-form .error")
    wait(page).until(lambda d: error.is_displayed())
    assert error.text == "Invalid size 100x100: width and height must be multiples of 16."
    assert css(page, "#gen-width").get_attribute("aria-invalid") == "true"
    assert not page.find_elements(By.CSS_SELECTOR, "#gallery .card")  # the placeholders are gone
    assert css(page, "#generate-form [data-run]").text == "Generate"
    screenshot(page, "browser-invalid-size")


def test_the_page_asks_for_an_api_key_on_401_and_keeps_it(keyed_server, browser):
    # A real server with Z_IMAGE_API_KEY: the page's first /v1 request (the model list) gets 401.
    page = open_page(browser, keyed_server, wait_for_model=False)
    key_form = css(page, "#key-form")
    wait(page).until(lambda d: key_form.is_displayed())
    screenshot(page, "browser-api-key")
    fill(css(page, "#api-key"), "sk-test")
    css(page, "#key-form button[type=submit]").click()
    # The refused request is retried with the key: the model badge fills in.
    wait(page).until(lambda d: d.find_element(By.ID, "model").text == "z-image-turbo")
    # Record the Authorization header of every later request the page makes.
    page.execute_script(
        """
        const realFetch = window.fetch;
        window.__authHeaders = [];
        window.fetch = async (url, init = {}) => {
          window.__authHeaders.push(new Headers(init.headers || {}).get('Authorization'));
          return realFetch(url, init);
        };
        """
    )
    start_generation(page, "a cat", 64, 64)
    wait(page).until(lambda d: len(finished_cards(d)) == 1)
    assert page.execute_script("return localStorage.getItem('zimage.apiKey')") == "sk-test"
    assert page.execute_script("return window.__authHeaders")[-1] == "Bearer sk-test"


def make_photo(path: Path, size: tuple[int, int]) -> Path:
    width, height = size
    image = Image.new("RGB", size)
    image.putdata([(x * 255 // width, y * 255 // height, 128) for y in range(height) for x in range(width)])
    image.save(path)
    return path


CAPTURE_MASK = """
// Decode the mask the page sends, to check OpenAI's convention: transparent where to edit.
const realFetch = window.fetch;
window.__mask = null;
window.fetch = async (url, init = {}) => {
  if (init.body instanceof FormData && init.body.get('mask')) {
    const bitmap = await createImageBitmap(init.body.get('mask'), { premultiplyAlpha: 'none' });
    const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
    const ctx = canvas.getContext('2d');
    ctx.drawImage(bitmap, 0, 0);
    const alpha = ctx.getImageData(0, 0, bitmap.width, bitmap.height).data.filter((_, i) => i % 4 === 3);
    window.__mask = { width: bitmap.width, height: bitmap.height,
      clear: alpha.filter((a) => a === 0).length, opaque: alpha.filter((a) => a === 255).length,
      centre: alpha[Math.floor(bitmap.height / 2) * bitmap.width + Math.floor(bitmap.width / 2)] };
  }
  return realFetch(url, init);
};
"""


def test_edit_an_uploaded_image_with_a_painted_mask(page, tmp_path):
    photo = make_photo(tmp_path / "photo.png", (160, 128))
    css(page, "#tab-edit").click()
    css(page, "#edit-file").send_keys(str(photo))
    mask = css(page, "#edit-mask")
    wait(page).until(lambda d: mask.is_displayed())
    # A stroke across the middle of the picture.
    stroke = ActionChains(page).move_to_element(mask).move_by_offset(-40, 0).click_and_hold()
    stroke.move_by_offset(40, 0).move_by_offset(40, 0).release().perform()
    fill(css(page, "#edit-prompt"), "make it stormy")
    fill(css(page, '#edit-form [data-field="num_inference_steps"]'), "4")
    page.execute_script(CAPTURE_MASK)
    bar = css(page, "#edit-form .bar")
    page.execute_script(RECORD_CHANGES, bar)
    css(page, "#edit-form [data-run]").click()

    wait(page).until(lambda d: finished_cards(d) or css(d, "#edit-form .error").is_displayed())
    assert not css(page, "#edit-form .error").is_displayed(), css(page, "#edit-form .error").text
    sent = page.execute_script("return window.__mask")
    assert sent["width"] == 160 and sent["height"] == 128
    assert sent["centre"] == 0 and sent["clear"] > 0 and sent["opaque"] > sent["clear"]
    (card,) = finished_cards(page)
    image = card.find_element(By.TAG_NAME, "img")
    assert natural_size(page, image) == [160, 128]
    assert "strength 0.6" in card.find_element(By.CSS_SELECTOR, ".meta").text
    progress = page.execute_script("return window.__progress") + [int(bar.get_attribute("aria-valuenow"))]
    assert progress[-1] == 100 and any(0 < value < 100 for value in progress), progress
    screenshot(page, "browser-edit")
    screenshot(page, "browser-edit-phone", phone=True)
