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

import httpx
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
    """`zimage-server serve` in its own process, on an ephemeral loopback port, until the module ends.

    Its image store is its own (beside its log), and so is its LoRA folder, with one LoRA in it."""
    folder = tmp_path_factory.mktemp("browser")
    write_lora(models_dir, folder / "loras" / "pixel-art.safetensors")
    process = ServerProcess(models_dir, folder / "server.log", env={"Z_IMAGE_LORA_DIR": str(folder / "loras")}).start()
    try:
        yield process.url
    finally:
        process.stop()


def write_lora(models_dir: Path, path: Path) -> None:
    """A random LoRA for the tiny transformer (as test_api_loras.py writes them)."""
    from diffusers import ZImagePipeline
    from safetensors.torch import save_file
    from test_loras import LAYOUTS, random_lora

    transformer = ZImagePipeline.from_pretrained(models_dir / "z-image-turbo").transformer
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(LAYOUTS["diffusers"](random_lora(transformer, seed=1)), path)


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


def open_page(browser, base: str, *, wait_for_model: bool = True, query: str = ""):
    """A fresh page load: no stored key, the model badge filled in, the default (laptop) viewport."""
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    browser.get(base + "/" + query)
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
    """The finished cards of images made in this page (not those the history brought back)."""
    return driver.find_elements(By.CSS_SELECTOR, "#gallery .card[data-seed]:not([data-history])")


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
    assert not page.find_elements(By.CSS_SELECTOR, "#gallery .card:not([data-history])")  # the placeholders are gone
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


# ---- the gallery as the server's image history (GET/DELETE /v1/images) ----------------------


def api(base: str, method: str, path: str, *, key: str | None = None, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, base + path, headers=headers, timeout=60, **kwargs)


def make_image(base: str, prompt: str, *, key: str | None = None, **fields) -> str:
    """One image made with a plain POST (not through the page); its id in the store."""
    body = {"prompt": prompt, "size": "64x64", "num_inference_steps": 2} | fields
    response = api(base, "POST", "/v1/images/generations", key=key, json=body)
    assert response.status_code == 200, response.text[:300]
    return response.json()["data"][0]["id"]


def stored_records(base: str, key: str | None = None) -> list[dict]:
    """Every kept image the key sees, newest first, read page by page from GET /v1/images."""
    records: list[dict] = []
    after = None
    while True:
        response = api(base, "GET", "/v1/images", key=key, params={"limit": 100} | ({"after": after} if after else {}))
        assert response.status_code == 200, response.text[:300]
        page = response.json()
        records += page["data"]
        if not page["has_more"]:
            return records
        after = page["last_id"]


def stored_ids(base: str, key: str | None = None) -> list[str]:
    return [record["id"] for record in stored_records(base, key)]


def history_ids(driver) -> list[str]:
    """The ids of the cards the history brought, in page order."""
    # In one script: read card by card, a card the page removes meanwhile would be a stale element.
    return driver.execute_script(
        "return [...document.querySelectorAll('#gallery .card[data-history]')].map((card) => card.dataset.id)"
    )


def wait_for_history(driver) -> None:
    """Until no page of the history is on its way (the gallery is aria-busy while one is)."""
    wait(driver).until(lambda d: css(d, "#gallery").get_attribute("aria-busy") == "false")


def card_of(driver, image_id: str):
    return css(driver, f'#gallery .card[data-id="{image_id}"]')


def test_images_made_in_the_page_come_back_from_the_history_after_a_reload(page, server):
    start_generation(page, "a harbour at night, ink", 96, 64, n=2)
    wait(page).until(lambda d: len(finished_cards(d)) == 2)
    made = [card.get_attribute("data-id") for card in finished_cards(page)]
    # The streamed images carry their stored ids, so they can be deleted like the history's.
    assert all(made) and set(made) == set(stored_ids(server)[:2]), made
    assert all(card.find_element(By.CSS_SELECTOR, "button.delete").is_displayed() for card in finished_cards(page))

    open_page(page, server)
    wait_for_history(page)
    assert not finished_cards(page)  # nothing made in this page load...
    expected = stored_ids(server)[:24]
    assert history_ids(page) == expected  # ...and the gallery is the history, newest first
    for image_id in made:
        card = card_of(page, image_id)
        page.execute_script("arguments[0].scrollIntoView()", card)
        image = card.find_element(By.TAG_NAME, "img")
        # The record's signed link, which needs no key.
        assert image.get_attribute("src").startswith(f"{server}/v1/images/{image_id}/content?expires=")
        wait(page).until(lambda d: natural_size(d, image) == [96, 64])
        assert card.find_element(By.CSS_SELECTOR, ".prompt").text == "a harbour at night, ink"
        assert "96×64" in card.find_element(By.CSS_SELECTOR, ".meta").text
    assert not css(page, "#history-error").is_displayed()
    assert not css(page, "#gallery-empty").is_displayed()


def test_load_older_brings_the_rest_of_the_history_page_by_page(page, server):
    for i in range(30):
        make_image(server, f"picture {i}")
    expected = stored_ids(server)
    assert len(expected) >= 30

    open_page(page, server, query="?page_size=10")
    wait_for_history(page)
    assert history_ids(page) == expected[:10]
    older = css(page, "#load-older")
    assert older.is_displayed()
    screenshot(page, "browser-history")

    older.click()
    wait(page).until(lambda d: len(history_ids(d)) >= 20)
    shown = history_ids(page)
    assert shown == expected[: len(shown)]

    # Scrolling to the end loads the next page, and the next, until there are no more.
    def scrolled_to_the_end(driver) -> bool:
        driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        return len(history_ids(driver)) >= len(expected)

    wait(page).until(scrolled_to_the_end)
    wait_for_history(page)
    assert history_ids(page) == expected
    assert not older.is_displayed()
    screenshot(page, "browser-history-phone", phone=True)


REFUSE_DELETES = """
// The server refusing deletes (a full or broken store), without breaking anything else.
window.__realFetch = window.fetch;
window.fetch = async (url, init = {}) => {
  if (init.method === 'DELETE') {
    const error = { message: 'The image store failed (disk full).', type: 'server_error', param: null,
      code: 'store_unavailable' };
    return new Response(JSON.stringify({ error }), { status: 503, headers: { 'Content-Type': 'application/json' } });
  }
  return window.__realFetch(url, init);
};
"""


def test_delete_removes_a_card_only_once_the_server_has_deleted_its_image(page, server):
    # An image made in this page: its card can go at once.
    start_generation(page, "a teapot to throw away", 64, 64)
    wait(page).until(lambda d: len(finished_cards(d)) == 1)
    (card,) = finished_cards(page)
    image_id = card.get_attribute("data-id")
    assert image_id in stored_ids(server)
    delete = card.find_element(By.CSS_SELECTOR, "button.delete")
    assert delete.get_attribute("aria-label") == "Delete the image “a teapot to throw away”"
    delete.click()
    wait(page).until(lambda d: not d.find_elements(By.CSS_SELECTOR, f'#gallery .card[data-id="{image_id}"]'))
    assert api(server, "GET", f"/v1/images/{image_id}").status_code == 404
    assert image_id not in stored_ids(server)

    # One from the history, after a reload; the first try fails, and the card stays, saying why.
    image_id = make_image(server, "a teapot from the history")
    open_page(page, server)
    wait_for_history(page)
    assert history_ids(page)[0] == image_id
    card = card_of(page, image_id)
    page.execute_script(REFUSE_DELETES)
    card.find_element(By.CSS_SELECTOR, "button.delete").click()

    def problem(driver):
        return card_of(driver, image_id).find_element(By.CSS_SELECTOR, ".card-error")

    wait(page).until(lambda d: problem(d).is_displayed())
    assert problem(page).text == "Not deleted: The image store failed (disk full)."
    card = card_of(page, image_id)
    assert card.is_displayed() and card.find_element(By.CSS_SELECTOR, "button.delete").is_enabled()
    assert image_id in stored_ids(server)
    screenshot(page, "browser-delete-failed")

    page.execute_script("window.fetch = window.__realFetch")
    card_of(page, image_id).find_element(By.CSS_SELECTOR, "button.delete").click()
    wait(page).until(lambda d: image_id not in history_ids(d))
    assert api(server, "GET", f"/v1/images/{image_id}").status_code == 404
    assert image_id not in stored_ids(server)


def field(driver, form: str, name: str):
    return css(driver, f'#{form}-form [data-field="{name}"]')


def test_use_these_settings_refills_the_form_from_a_stored_record(page, server, tmp_path):
    fox = make_image(
        server, "a red fox in snow", negative_prompt="blurry", size="96x64", num_inference_steps=3,
        guidance_scale=1.5, seed=4242, loras=[{"name": "pixel-art", "scale": 0.5}],
    )  # fmt: skip
    photo = make_photo(tmp_path / "photo.png", (64, 64))
    with photo.open("rb") as file:
        response = api(
            server, "POST", "/v1/images/edits", files={"image": ("photo.png", file, "image/png")},
            data={"prompt": "make it autumn", "strength": "0.4", "num_inference_steps": "2", "seed": "77"},
        )  # fmt: skip
    assert response.status_code == 200, response.text[:300]
    edited = response.json()["data"][0]["id"]

    open_page(page, server)
    wait_for_history(page)
    # The form starts elsewhere: a preset size, a random seed, the default steps.
    fill(css(page, "#gen-prompt"), "something else")
    card_of(page, fox).find_element(By.CSS_SELECTOR, "button.use-settings").click()
    # The record keeps the prompt without its LoRA tags and the LoRAs beside it: they come back as tags.
    assert css(page, "#gen-prompt").get_attribute("value") == "a red fox in snow <lora:pixel-art:0.5>"
    assert css(page, "#gen-negative").get_attribute("value") == "blurry"
    assert css(page, '#gen-size-presets [data-size="custom"]').get_attribute("aria-pressed") == "true"
    assert css(page, "#gen-custom-size").is_displayed()
    assert css(page, "#gen-width").get_attribute("value") == "96"
    assert css(page, "#gen-height").get_attribute("value") == "64"
    assert field(page, "generate", "num_inference_steps").get_attribute("value") == "3"
    assert field(page, "generate", "guidance_scale").get_attribute("value") == "1.5"
    seed = field(page, "generate", "seed")
    assert seed.get_attribute("value") == "4242" and seed.is_enabled()
    assert not field(page, "generate", "random_seed").is_selected()
    screenshot(page, "browser-use-settings")

    # Generating again makes the same image from the same settings.
    css(page, "#generate-form [data-run]").click()
    wait(page).until(lambda d: len(finished_cards(d)) == 1)
    again = api(server, "GET", f"/v1/images/{finished_cards(page)[0].get_attribute('data-id')}").json()
    original = api(server, "GET", f"/v1/images/{fox}").json()
    assert again["prompt"] == original["prompt"] and again["negative_prompt"] == original["negative_prompt"]
    for name in ("width", "height", "seed", "num_inference_steps", "guidance_scale", "loras"):
        assert again["parameters"][name] == original["parameters"][name], name
    original_image = httpx.get(original["url"], timeout=30).content
    assert httpx.get(again["url"], timeout=30).content == original_image

    # An edit's settings go to the Edit tab (all but the input image, which is not kept).
    card_of(page, edited).find_element(By.CSS_SELECTOR, "button.use-settings").click()
    assert css(page, "#tab-edit").get_attribute("aria-selected") == "true" and css(page, "#edit-form").is_displayed()
    assert css(page, "#edit-prompt").get_attribute("value") == "make it autumn"
    assert css(page, "#edit-strength").get_attribute("value") == "0.4"
    assert css(page, "#edit-strength-value").text == "0.40"
    assert field(page, "edit", "num_inference_steps").get_attribute("value") == "2"
    assert field(page, "edit", "seed").get_attribute("value") == "77"
    assert not field(page, "edit", "random_seed").is_selected()


def test_the_history_loads_once_the_api_key_is_given(keyed_server, browser):
    made = [make_image(keyed_server, f"a keyed picture {i}", key="sk-test") for i in range(2)]
    page = open_page(browser, keyed_server, wait_for_model=False)
    wait(page).until(lambda d: css(d, "#key-form").is_displayed())
    assert not history_ids(page)
    fill(css(page, "#api-key"), "sk-test")
    css(page, "#key-form button[type=submit]").click()
    # Both refused requests are retried with the key: the model badge and the history.
    wait(page).until(lambda d: d.find_element(By.ID, "model").text == "z-image-turbo")
    wait(page).until(lambda d: history_ids(d))
    wait_for_history(page)
    assert history_ids(page) == stored_ids(keyed_server, key="sk-test")[:24]
    assert set(made) <= set(history_ids(page))
    assert not css(page, "#history-error").is_displayed()


def test_without_an_image_store_the_gallery_is_the_sessions_and_no_error_shows(models_dir, tmp_path_factory, browser):
    log_path = tmp_path_factory.mktemp("browser-no-store") / "server.log"
    process = ServerProcess(models_dir, log_path, env={"Z_IMAGE_STORE": "none"}).start()
    try:
        listed = api(process.url, "GET", "/v1/images")
        assert listed.status_code == 503 and listed.json()["error"]["code"] == "store_unavailable"
        page = open_page(browser, process.url)
        wait_for_history(page)
        assert not css(page, "#history-error").is_displayed()
        assert not css(page, "#load-older").is_displayed()
        assert css(page, "#gallery-empty").is_displayed()

        start_generation(page, "a cat that is not kept", 64, 64)
        wait(page).until(lambda d: len(finished_cards(d)) == 1)
        (card,) = finished_cards(page)
        assert card.get_attribute("data-id") is None
        assert not card.find_element(By.CSS_SELECTOR, "button.delete").is_displayed()  # nothing to delete
        assert card.find_element(By.CSS_SELECTOR, "button.use-settings").is_displayed()
        assert not css(page, "#history-error").is_displayed()
        assert not css(page, "#generate-form .error").is_displayed()
    finally:
        process.stop()


def test_enhance_fills_the_prompt_with_the_expansion_before_generating(models_dir, tmp_path_factory, browser):
    """The Enhance button asks POST /v1/prompts/enhance (here a chat backend on loopback) and puts
    the expansion in the prompt box; an answer the enhancer cannot use leaves the prompt as written."""
    from test_prompt_enhancer import ChatServer

    chat = ChatServer()
    chat.replies = {"a lighthouse": "A white lighthouse on a basalt cliff at dawn, gulls over a calm sea.",
                    "a secret": "I'm sorry, I can't help with that."}  # fmt: skip
    env = {"Z_IMAGE_PROMPT_ENHANCER": chat.url, "Z_IMAGE_PROMPT_ENHANCER_MODEL": "qwen3-max"}
    process = ServerProcess(models_dir, tmp_path_factory.mktemp("browser-enhance") / "server.log", env=env).start()
    try:
        page = open_page(browser, process.url)
        box = css(page, "#gen-prompt")
        fill(box, "a lighthouse")
        css(page, "#gen-enhance").click()
        wait(page).until(lambda d: css(d, "#gen-prompt").get_attribute("value").startswith("A white lighthouse"))
        assert "Enhanced" in css(page, "#gen-enhance-status").text
        assert chat.requests[-1]["messages"][-1]["content"] == "a lighthouse"
        fill(box, "a secret")
        css(page, "#gen-enhance").click()
        wait(page).until(lambda d: "Kept as written" in css(d, "#gen-enhance-status").text)
        assert css(page, "#gen-prompt").get_attribute("value") == "a secret"
        assert "refusal" in css(page, "#gen-enhance-status").text
    finally:
        process.stop()
        chat.close()
