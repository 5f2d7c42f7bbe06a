"""The playground page, driven in a real headless Chromium against a real `serve` (builtin/shapes,
behind an API key): streamed previews then the final image, an inpainting edit with a painted mask,
the server's error message, and Stop freeing the worker. Screenshots go to the test's tmp folder."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import ServerProcess, wait_until
from tools.shapes.scenes import Scene, draw

API_KEY = "sk-playground-51c2"
TIMEOUT_S = 180


def _ensure_chromium() -> None:
    """Install Debian's chromium and its driver when missing (CI included); fail, never skip."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"],
                    ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]):
        done = subprocess.run([*sudo, *command], env=environment, capture_output=True, text=True, timeout=1200)
        if done.returncode == 0 and shutil.which("chromium") and shutil.which("chromedriver"):
            return
    pytest.fail(f"the playground tests need Chromium (Debian: apt-get install chromium chromium-driver); "
                f"installing it failed:\n{done.stderr[-2000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = ServerProcess(["builtin/shapes"], env={"DITSERVE_API_KEY": API_KEY})
    server.start(tmp_path_factory.mktemp("playground") / "serve.log")
    yield server
    server.stop()
    assert API_KEY not in server.log()


@pytest.fixture(scope="module")
def browser():
    _ensure_chromium()
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    yield driver
    driver.quit()


def _open_unlocked(browser, server) -> None:
    """Load the playground and unlock it with the API key."""
    from selenium.webdriver.common.by import By

    browser.get(f"{server.url}/")
    element = browser.find_element
    _wait(browser, lambda: element(By.ID, "key-row").is_displayed())  # the server answered 401
    element(By.ID, "api-key").send_keys(API_KEY)
    element(By.ID, "prompt").click()  # leaving the field loads the models with the key
    _wait(browser, lambda: element(By.ID, "model").get_attribute("value") == "builtin/shapes")
    assert API_KEY not in browser.current_url


@pytest.fixture
def page(browser, server, tmp_path):
    _open_unlocked(browser, server)
    yield browser
    browser.save_screenshot(str(tmp_path / "playground.png"))


def _wait(driver, condition):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, TIMEOUT_S, poll_frequency=0.1).until(lambda _: condition())


def _fill(driver, **values: str) -> None:
    from selenium.webdriver.common.by import By

    for element_id, value in values.items():
        field = driver.find_element(By.ID, element_id)
        field.clear()
        field.send_keys(value)


def _fix_seed(driver, seed: int) -> None:
    from selenium.webdriver.common.by import By

    if driver.find_element(By.ID, "random-seed").is_selected():
        driver.find_element(By.ID, "random-seed").click()
    _fill(driver, seed=str(seed))


def _gallery_pixels(driver, index: int = 0) -> np.ndarray:
    from selenium.webdriver.common.by import By

    source = driver.find_elements(By.CSS_SELECTOR, "#gallery .result img")[index].get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).convert("RGB"), dtype=int)


def _api_pixels(server: ServerProcess, **request) -> np.ndarray:
    result = server.client(api_key=API_KEY).images.generate(model="builtin/shapes", **request)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB"), dtype=int)


def test_generate_streams_previews_then_the_image_the_api_gives_for_that_seed(page, server, tmp_path):
    from selenium.webdriver.common.by import By

    prompt = "a large red circle on the left on a blue background"
    _fill(page, prompt=prompt, size="128x128", steps="9", previews="2")
    _fix_seed(page, 17)
    page.find_element(By.ID, "generate").click()
    _wait(page, lambda: page.find_elements(By.CSS_SELECTOR, "#gallery .result"))
    page.save_screenshot(str(tmp_path / "generated.png"))
    result = page.find_element(By.CSS_SELECTOR, "#gallery .result")
    assert int(result.get_attribute("data-previews")) >= 1  # shown live before the final image
    assert result.get_attribute("data-seed") == "17" and "seed 17" in result.text
    assert "seed used: 17" in page.find_element(By.ID, "last-seed").text
    expected = _api_pixels(server, prompt=prompt, size="128x128", extra_body={"seed": 17, "num_inference_steps": 9})
    assert np.array_equal(_gallery_pixels(page), expected)


def _click_chip(driver, kind: str, word: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f'.chip[data-kind="{kind}"][data-word="{word}"]').click()


def _run_snippet(command: list[str], folder) -> np.ndarray:
    """Run a copied snippet in `folder` as a user would (the key in the environment): its image.png."""
    done = subprocess.run(command, cwd=folder, env={**os.environ, "DITSERVE_API_KEY": API_KEY}, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    return np.asarray(Image.open(folder / "image.png").convert("RGB"), dtype=int)


def test_chips_build_the_prompt_and_copied_commands_remake_the_image(page, server, tmp_path):
    from selenium.webdriver.common.by import By

    assert page.find_element(By.ID, "prompt").get_attribute("value") == "a large red circle in the centre on a white " \
                                                                         "background"  # the model's example
    assert not page.find_element(By.ID, "live-heading").is_displayed()  # nothing live yet: no empty heading
    for kind, word in (("size", "small"), ("colour", "green"), ("shape", "triangle"), ("position", "at the top right"),
                       ("background", "black")):
        _click_chip(page, kind, word)
    prompt = "a small green triangle at the top right on a black background"
    assert page.find_element(By.ID, "prompt").get_attribute("value") == prompt
    pressed = [chip.text for chip in page.find_elements(By.CSS_SELECTOR, '.chip[aria-pressed="true"]')]
    assert pressed == ["small", "green", "triangle", "at the top right", "black"]
    _fill(page, size="128x128", steps="6", previews="0")
    _fix_seed(page, 23)
    page.find_element(By.ID, "generate").click()
    _wait(page, lambda: page.find_elements(By.CSS_SELECTOR, "#gallery .result"))
    tile = page.find_element(By.CSS_SELECTOR, "#gallery .result")
    assert tile.find_element(By.CSS_SELECTOR, ".prompt").text == prompt
    shown = _gallery_pixels(page)
    tile.find_element(By.CSS_SELECTOR, ".copy-curl").click()
    curl = tile.find_element(By.TAG_NAME, "pre").text
    assert curl.startswith("curl ") and API_KEY not in curl and '"seed":23' in curl
    (tmp_path / "curl").mkdir()
    assert np.array_equal(_run_snippet(["bash", "-c", curl], tmp_path / "curl"), shown)
    tile.find_element(By.CSS_SELECTOR, ".copy-python").click()
    python = tile.find_element(By.TAG_NAME, "pre").text
    (tmp_path / "python").mkdir()
    assert np.array_equal(_run_snippet([sys.executable, "-c", python], tmp_path / "python"), shown)
    page.save_screenshot(str(tmp_path / "copied.png"))

    page.find_element(By.ID, "surprise").click()
    surprise = page.find_element(By.ID, "prompt").get_attribute("value")
    words = re.fullmatch(r"a (small|large) (\w+) (circle|square|triangle) (.+) on a (\w+) background", surprise)
    assert words and words.group(2) != words.group(5), surprise  # never a shape the colour of its background
    _fill(page, size="1024x1024")
    warning = page.find_element(By.ID, "size-warning")
    assert warning.is_displayed() and "128x128" in warning.text
    page.save_screenshot(str(tmp_path / "size-warning.png"))


def test_a_bad_size_shows_the_servers_error_message(page, server, tmp_path):
    from selenium.webdriver.common.by import By

    _fill(page, prompt="a small green square in the centre on a white background", size="100x100")
    page.find_element(By.ID, "generate").click()
    _wait(page, lambda: page.find_element(By.ID, "error").is_displayed())
    page.save_screenshot(str(tmp_path / "error.png"))
    response = httpx.post(f"{server.url}/v1/images/generations", headers={"authorization": f"Bearer {API_KEY}"},
                          json={"prompt": "a small green square", "size": "100x100"})
    assert response.status_code == 400
    assert page.find_element(By.ID, "error").text == f"400: {response.json()['error']['message']}"


def test_edit_with_a_painted_mask_changes_the_painted_part(page, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    original = draw(Scene("square", "black", "white", "left", "large"), np.random.default_rng(0))
    Image.fromarray(original).save(tmp_path / "input.png")
    page.find_element(By.CSS_SELECTOR, "input[name=mode][value=edit]").click()
    page.find_element(By.ID, "image-file").send_keys(str(tmp_path / "input.png"))
    canvas = page.find_element(By.ID, "mask-canvas")
    _wait(page, lambda: canvas.is_displayed() and canvas.size["width"] > 0)
    page.execute_script("document.getElementById('brush').value = 48; arguments[0].scrollIntoView({block: 'center'})",
                        canvas)
    width, height = canvas.size["width"], canvas.size["height"]
    strokes = ActionChains(page)
    for x in (0.62, 0.75, 0.88):  # paint the right third, top to bottom
        strokes.move_to_element_with_offset(canvas, int((x - 0.5) * width), int(-0.45 * height)).click_and_hold()
        for y in np.linspace(-0.45, 0.45, 10):
            strokes.move_to_element_with_offset(canvas, int((x - 0.5) * width), int(y * height))
        strokes.release()
    strokes.perform()
    painted = np.array(page.execute_script(
        "const c = document.getElementById('mask-canvas');"
        "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data).filter((_, i) => i % 4 == 3);"
    )).reshape(original.shape[:2]) > 0
    assert 0.15 < painted.mean() < 0.6
    _fill(page, prompt="a large yellow circle on the right on a red background", size="128x128", steps="9",
          strength="1")
    _fix_seed(page, 5)
    page.find_element(By.ID, "generate").click()
    _wait(page, lambda: page.find_elements(By.CSS_SELECTOR, "#gallery .result"))
    page.save_screenshot(str(tmp_path / "edited.png"))
    assert not page.find_element(By.ID, "error").is_displayed()
    edited = _gallery_pixels(page)
    assert edited.shape == original.shape
    change = np.abs(edited - original.astype(int)).mean(axis=-1)
    # Inside the paint the scene is redrawn; away from it (the mask is blended at latent
    # resolution, 8 pixels a cell) the image only passes through the VAE.
    far = ~np.array([[painted[max(0, y - 12):y + 13, max(0, x - 12):x + 13].any() for x in range(128)]
                     for y in range(128)])
    assert far.mean() > 0.3
    assert change[painted].mean() > 40 and change[far].mean() < 8, (change[painted].mean(), change[far].mean())


def _start_a_long_generation(page) -> None:
    """256x256, 200 steps: running until stopped (150 steps after the first preview is on screen)."""
    from selenium.webdriver.common.by import By

    _fill(page, prompt="a small blue triangle at the top on a yellow background", size="256x256", steps="200",
          previews="3")
    page.find_element(By.ID, "generate").click()
    _wait(page, lambda: page.find_elements(By.CSS_SELECTOR, "#live .tile img[src]"))


def test_stop_cancels_the_generation_and_frees_the_worker(page, server, tmp_path):
    from selenium.webdriver.common.by import By

    cancelled = server.metric("ditserve_requests_cancelled_total")
    _start_a_long_generation(page)
    page.find_element(By.ID, "stop").click()
    _wait(page, lambda: page.find_element(By.ID, "status").text == "stopped")
    page.save_screenshot(str(tmp_path / "stopped.png"))
    wait_until(lambda: server.metric("ditserve_requests_cancelled_total") == cancelled + 1, TIMEOUT_S,
               "the stopped request cancelled")
    wait_until(lambda: server.metric("ditserve_running_requests") == 0, TIMEOUT_S, "the worker free")
    _fill(page, size="128x128", steps="4", previews="0")
    page.find_element(By.ID, "generate").click()
    _wait(page, lambda: page.find_element(By.ID, "status").text.startswith("done"))


def test_closing_the_tab_cancels_the_generation(browser, server):
    cancelled = server.metric("ditserve_requests_cancelled_total")
    first_tab = browser.current_window_handle
    browser.switch_to.new_window("tab")
    _open_unlocked(browser, server)
    _start_a_long_generation(browser)
    browser.close()
    browser.switch_to.window(first_tab)
    wait_until(lambda: server.metric("ditserve_requests_cancelled_total") == cancelled + 1, TIMEOUT_S,
               "the closed tab's request cancelled")
    wait_until(lambda: server.metric("ditserve_running_requests") == 0, TIMEOUT_S, "the worker free")
