"""The web playground in headless Chromium: enter the API key, move sliders, send a message, read the streamed
answer, compare levels side by side with APM scores. Needs Debian's chromium and chromium-driver
(`apt-get install -y chromium chromium-driver`); skipped with the reason when they are missing.

Set STEERLM_PLAYGROUND_SCREENSHOT=path.png to keep a screenshot of the page after the chat."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from _serve_support import running, steerable_tiny, tiny_apm

from steerlm.apm_model import load_apm
from steerlm.generator import Generator
from steerlm.serve import Config

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
KEY = "page-key"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and DRIVER.exists()),
    reason="headless browser test: /usr/bin/chromium or /usr/bin/chromedriver is missing "
    "(DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("playground")
    generator = Generator.load(str(steerable_tiny(root / "sft" / "best")))
    apm = load_apm(tiny_apm(root / "apm"))
    cfg = Config(model=str(root / "sft" / "best"), api_key=KEY, default_max_tokens=24, guidance_scale=2,
                 guidance_reference="middle")  # fmt: skip
    with running(cfg, generator, apm) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="steerlm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,860"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, css, timeout=30):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def record_requests(driver) -> None:
    """From now on the page keeps the JSON bodies it sends in `window.sent` (emptied here; fetch is wrapped once)."""
    driver.execute_script(
        "if (!window.sent) { const f = window.fetch;"
        " window.fetch = (url, opts) => { if (opts && opts.body) window.sent.push(JSON.parse(opts.body));"
        " return f(url, opts); }; }"
        "window.sent = [];"
    )


def test_chat_with_a_moved_slider_streams_an_answer(live, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(live.url + "/")
    # Without the key the page loads but says it needs one.
    wait_for(browser, "#error:not([hidden])")
    assert "API key" in browser.find_element(By.ID, "error").text
    browser.find_element(By.ID, "api-key").send_keys(KEY + Keys.ENTER)
    wait_for(browser, "body[data-ready=true]")
    sliders = browser.find_elements(By.CSS_SELECTOR, "#sliders input[type=range]")
    assert [s.get_attribute("data-attr") for s in sliders] == ["quality", "toxicity", "humor", "creativity"]
    assert browser.find_element(By.ID, "attr-quality-value").text == "9"

    # The guidance controls start at the server's defaults.
    assert browser.find_element(By.ID, "guidance-value").text == "2"
    assert browser.find_element(By.ID, "guidance-reference").get_attribute("value") == "middle"
    record_requests(browser)

    humor = browser.find_element(By.ID, "attr-humor")
    humor.send_keys(Keys.ARROW_RIGHT * 3)  # 0 -> 3
    assert browser.find_element(By.ID, "attr-humor-value").text == "3"
    browser.find_element(By.ID, "guidance").send_keys(Keys.ARROW_RIGHT * 4)  # 2 -> 3
    assert browser.find_element(By.ID, "guidance-value").text == "3"

    box = browser.find_element(By.ID, "chat-input")
    box.send_keys("Tell me a joke about cats.")
    box.send_keys(Keys.ENTER)
    answer = wait_for(browser, ".msg.assistant[data-state=done]")
    assert answer.find_element(By.CSS_SELECTOR, ".msg-text").text.strip()
    # The caption shows the levels the server steered to (echoed in the stream), so the slider reached it.
    assert "humor:3" in answer.find_element(By.CSS_SELECTOR, ".msg-attrs").text
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "Tell me a joke about cats."
    # The request names only the moved slider, so guidance against the middle moves humor alone (humor:3 against
    # humor:4), and the one answer decoded that neutral prompt beside it (two cache rows).
    (body,) = browser.execute_script("return window.sent")
    assert body["attributes"] == {"humor": 3}
    assert (body["guidance_scale"], body["guidance_reference"]) == (3, "middle")
    assert live.service.engine.stats.max_batch == 2
    shot = os.environ.get("STEERLM_PLAYGROUND_SCREENSHOT")
    if shot:
        browser.save_screenshot(shot)


def test_compare_tab_shows_answers_side_by_side_with_scores(live, browser):
    from selenium.webdriver.common.by import By

    if not browser.current_url.startswith(live.url):  # run alone: open the page with the key
        browser.get(live.url + "/")
        browser.find_element(By.ID, "api-key").send_keys(KEY)
        browser.find_element(By.ID, "key-save").click()
    from selenium.webdriver.common.keys import Keys

    wait_for(browser, "body[data-ready=true]")
    browser.find_element(By.ID, "attr-creativity").send_keys(Keys.ARROW_RIGHT * 2)
    browser.find_element(By.ID, "reset-attributes").click()  # forgets the moved sliders too
    record_requests(browser)
    browser.find_element(By.ID, "tab-compare").click()
    browser.find_element(By.ID, "compare-prompt").send_keys("Describe the moon.")
    assert browser.find_element(By.ID, "compare-attr").get_attribute("value") == "humor"
    levels = browser.find_element(By.ID, "compare-levels")
    levels.clear()
    levels.send_keys("0,5,9")
    browser.find_element(By.ID, "compare-run").click()
    wait_for(browser, ".compare-col[data-level='9'][data-scored=true]")
    cols = browser.find_elements(By.CSS_SELECTOR, ".compare-col")
    assert [c.get_attribute("data-level") for c in cols] == ["0", "5", "9"]
    asked = [b["attributes"] for b in browser.execute_script("return window.sent") if "attributes" in b]
    # After the reset, only the compared attribute is named (not creativity, moved before it).
    assert sorted(a["humor"] for a in asked) == [0, 5, 9] and all(list(a) == ["humor"] for a in asked)
    for col in cols:
        assert col.get_attribute("data-state") == "done"
        assert col.find_element(By.CSS_SELECTOR, ".compare-text").text.strip()
        rows = col.find_elements(By.CSS_SELECTOR, ".scores tr")
        assert [r.find_element(By.CSS_SELECTOR, "td").text for r in rows] == [
            "quality", "toxicity", "humor", "creativity"]  # fmt: skip
