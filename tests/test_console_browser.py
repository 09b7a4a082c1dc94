"""The console in a real headless browser (Debian's chromium and
chromium-driver through Selenium) against `lora-ckpt serve` on loopback: the
store's adapters and a truncated one's reason, an uploaded PNG's label equal
to the pool's own answer, the service view counting those requests, and a
tenant's key seeing only its adapters. Takes docs/console.png.

Slow (a server subprocess and a browser); skipped with the reason where
chromium, chromedriver or selenium is missing (`python3 run.py test`
installs them where apt-get exists). Every wait has a timeout; the browser
quits in ``finally``.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from lora_ckpt.serving.options import ServiceOptions

from .helpers.http_server import Server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "console.png"
"""The README's picture: written when missing, or again with LORA_CKPT_SCREENSHOT=1
(a test run must not leave the work tree changed)."""
WAIT = 30  # seconds, for any one thing the page must show
NAMES = ("birds", "cats", "dogs")


def _missing() -> str | None:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        return (
            "needs Debian's chromium and chromium-driver (/usr/bin/chromium, "
            "/usr/bin/chromedriver): `python3 run.py test` installs them with apt-get as root, "
            "or run `apt-get install chromium chromium-driver`"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium (the test extra: pip install -e '.[test]')"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_missing() is not None, reason=str(_missing()))]


@contextlib.contextmanager
def chromium():
    """A headless Chromium with a fresh profile, driven through /usr/bin/chromedriver
    (never a driver Selenium would download: the machine has no network)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="console-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1440,900",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = None
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.set_page_load_timeout(WAIT)
        driver.set_script_timeout(WAIT)
        # A laptop's screen, whatever the headless window's frame takes.
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1440, "height": 900, "deviceScaleFactor": 1, "mobile": False},
        )
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, condition, what: str):
    """``condition(driver)`` once truthy (its value), within WAIT seconds."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.1).until(condition, f"waiting for {what}")


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def script_errors(driver) -> list[str]:
    """The page's JavaScript errors (failed requests are the server's answers, not errors)."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and entry.get("source") != "network"
    ]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from .helpers.scale import make_tiny_store

    path = tmp_path_factory.mktemp("console") / "store"
    make_tiny_store(str(path), names=NAMES)
    broken = path / "adapters" / "truncated"
    shutil.copytree(path / "adapters" / "birds", broken)
    data = next(broken.glob("*.data-*"))
    data.write_bytes(data.read_bytes()[:100])
    return path


@pytest.fixture(scope="module")
def server(store):
    running = Server(str(store), "--capacity", "3", "--max-body-bytes", "200000")
    try:
        running.wait()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """Where each test saves what the page looked like (for a person to look at)."""
    return tmp_path_factory.mktemp("console-screenshots")


def screenshot(driver, folder: Path, name: str) -> Path:
    """Saves the page as ``folder/name.png`` (1440x900) and returns the path."""
    path = folder / f"{name}.png"
    assert driver.save_screenshot(str(path))
    with Image.open(path) as picture:
        assert picture.size == (1440, 900)
    return path


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    """A 32x32 PNG (the tiny model's input size: no resize) and the pool's input for it."""
    rng = np.random.default_rng(11)
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pixels[8:24, 8:24] = (240, 40, 40)
    path = tmp_path_factory.mktemp("images") / "red-square.png"
    Image.fromarray(pixels).save(path)
    decoded = np.asarray(Image.open(path).convert("RGB"), np.float32)
    return path, decoded / 127.5 - 1.0


def open_console(driver, server, view="store"):
    driver.get(f"{server.url}/#{view}")
    wait_for(driver, lambda d: not css(d, f"#view-{view}")[0].get_attribute("hidden"), view)


def test_the_store_lists_every_adapter_and_why_one_failed(server, browser, store, shots):
    import lora_ckpt

    open_console(browser, server)
    rows = wait_for(
        browser,
        lambda d: (
            len(css(d, "#store-rows tr[data-adapter] .sha")) == 3
            and css(d, '#store-rows tr[data-adapter="truncated"] .reason')
        ),
        "the store's rows",
    )
    names = [row.get_attribute("data-adapter") for row in css(browser, "#store-rows tr")]
    assert names == ["birds", "cats", "dogs", "truncated"]
    for name in NAMES:
        summary = lora_ckpt.inspect_adapter(str(store / "adapters" / name))
        cells = [c.text for c in css(browser, f'#store-rows tr[data-adapter="{name}"] td')]
        assert cells[1] == "resident"  # the service preloads up to --capacity
        assert cells[2].splitlines() == ["4", ", ".join(f"{name}-{c}" for c in range(4))]
        assert cells[3] == "4" and cells[4] == "LoRA" and cells[6] == "v1"
        assert cells[8] == summary["config_sha256"][:12]
        assert cells[5] == f"{summary['size_bytes'] / 1024:.1f} KiB"
    reason = rows[0].text
    expected = httpx.get(f"{server.url}/adapters/truncated/info", timeout=WAIT).json()
    assert reason == expected["error"]["message"]
    assert "has 100 bytes" in reason and str(store) not in reason
    status = css(browser, '#store-rows tr[data-adapter="truncated"] .badge')[0].text
    assert status == "failed"

    # By keyboard: the name opens the detail view (layers, base, labels).
    from selenium.webdriver.common.keys import Keys

    css(browser, '#store-rows tr[data-adapter="cats"] .name-button')[0].send_keys(Keys.ENTER)
    wait_for(browser, lambda d: css(d, "#detail-body table tbody tr"), "the detail view")
    layers = [
        r.find_elements("css selector", "td")[0].text for r in css(browser, "#detail-body tbody tr")
    ]
    config = json.loads((store / "adapters" / "cats" / "adapter_config.json").read_text())
    assert layers == list(config["layers"])
    assert css(browser, "#detail-title")[0].text == "cats"
    browser.execute_script("window.scrollTo(0, 0)")
    picture = screenshot(browser, shots, "store")
    if not SCREENSHOT.exists() or os.environ.get("LORA_CKPT_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(picture, SCREENSHOT)
    assert script_errors(browser) == []


def test_tabs_answer_the_arrow_keys(server, browser):
    from selenium.webdriver.common.keys import Keys

    open_console(browser, server)
    css(browser, "#tab-store")[0].send_keys(Keys.ARROW_RIGHT)
    wait_for(browser, lambda d: not css(d, "#view-try")[0].get_attribute("hidden"), "Try it")
    assert browser.switch_to.active_element.get_attribute("id") == "tab-try"
    assert css(browser, "#tab-try")[0].get_attribute("aria-selected") == "true"
    assert css(browser, 'label[for="try-files"]') and css(browser, 'label[for="store-filter"]')


@pytest.fixture(scope="module")
def reference_pool(store):
    from lora_ckpt import AdapterPool
    from lora_ckpt.serving.store import adapter_path, build_base_model

    model, _ = build_base_model(str(store))
    pool = AdapterPool(model, capacity=2)
    for name in ("cats", "dogs"):
        pool.load(name, adapter_path(str(store), name))
    return pool


def test_an_uploaded_png_shows_the_pools_label_per_adapter(
    server, browser, png, reference_pool, shots
):
    path, image = png
    open_console(browser, server, "try")
    wait_for(browser, lambda d: len(css(d, "#try-adapters input")) == 5, "the adapters to try")
    for box in css(browser, "#try-adapters input"):
        if box.is_selected() != (box.get_attribute("value") in ("cats", "dogs", "truncated")):
            box.click()
    css(browser, "#try-files")[0].send_keys(str(path))
    wait_for(browser, lambda d: css(d, "#try-thumbs img"), "the thumbnail")
    css(browser, "#try-run")[0].click()
    wait_for(browser, lambda d: len(css(d, "#try-results .result")) == 3, "three answers")
    for name in ("cats", "dogs"):
        logits = reference_pool.predict(image[None], adapter=name)[0]
        probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        best = int(np.argmax(logits))
        card = f'#try-results .result[data-adapter="{name}"]'
        assert css(browser, f"{card} .top-label")[0].text == f"{name}-{best}"
        bars = css(browser, f"{card} .bar-row")
        assert [b.get_attribute("data-class") for b in bars] == [
            str(i) for i in np.argsort(-logits)[: len(bars)]
        ]
        assert bars[0].find_element("css selector", ".bar-value").text == (
            f"{probabilities[best] * 100:.1f} %"
        )
        assert css(browser, f"{card} .latency")[0].text.endswith("ms")
    screenshot(browser, shots, "try")
    failed = css(browser, '#try-results .result.error[data-adapter="truncated"] .message')
    assert failed and "has 100 bytes" in failed[0].text
    assert script_errors(browser) == []


def test_the_service_view_counts_requests(server, browser, png, shots):
    path, _ = png
    with httpx.Client(base_url=server.url, timeout=WAIT) as client:
        for name, status in (("cats", 200), ("cats", 200), ("truncated", 422)):
            with open(path, "rb") as image:
                answer = client.post(f"/predict/{name}", files={"image": image})
            assert answer.status_code == status, answer.text
    open_console(browser, server, "service")
    row = wait_for(
        browser, lambda d: css(d, '#service-rows tr[data-adapter="cats"]'), "the cats row"
    )[0]
    cells = [c.text for c in row.find_elements("css selector", "td")]
    assert cells[1] == "yes" and int(cells[5]) >= 2 and cells[3].endswith("ms")
    assert css(browser, "#plot-rps svg path.line") and css(browser, "#plot-latency svg circle")
    failed = wait_for(
        browser, lambda d: css(d, '#failed-list li[data-adapter="truncated"]'), "the failure"
    )[0]
    assert "truncated" in failed.text
    cards = {c.find_element("css selector", ".label").text: c for c in css(browser, ".card")}
    assert cards["RESIDENT"].find_element("css selector", ".value").text == "3 / 3"
    metrics = httpx.get(f"{server.url}/metrics", timeout=WAIT).text
    loads = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if re.match(r"lora_adapter_loads(_total)?(\{[^}]*\})? ", line)
    )
    assert loads >= 3 and cards["LOADS"].find_element("css selector", ".value").text == str(
        round(loads)
    )
    screenshot(browser, shots, "service")
    assert script_errors(browser) == []


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


HAS_AUTH = "auth" in {field.name for field in dataclasses.fields(ServiceOptions)}


@pytest.mark.skipif(not HAS_AUTH, reason="needs --auth from the network issue")
def test_a_tenant_key_sees_only_its_adapters(store, browser, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(
        json.dumps(
            {
                "keys": [
                    {"sha256": _digest("acme-key"), "tenant": "acme", "adapters": ["cats"]},
                    {
                        "sha256": _digest("ops-key"),
                        "tenant": "ops",
                        "adapters": ["*"],
                        "admin": True,
                    },
                ]
            }
        )
    )
    keyed = Server(str(store), "--capacity", "3", "--auth", str(keys))
    try:
        keyed.wait()
        open_url = f"{keyed.url}/#store"
        browser.get(open_url)
        wait_for(browser, lambda d: css(d, "#login")[0].is_displayed(), "the key form")
        css(browser, "#key-input")[0].send_keys("acme-key\n")
        wait_for(browser, lambda d: css(d, "#store-rows tr[data-adapter] .sha"), "acme's adapters")
        names = [r.get_attribute("data-adapter") for r in css(browser, "#store-rows tr")]
        assert names == ["cats"]
        assert css(browser, "#store-rows button.small") == []  # no load/unload: not admin
        assert "acme" in css(browser, "#who")[0].text
        assert (
            browser.execute_script("return sessionStorage.getItem('lora-ckpt-key')") == "acme-key"
        )
        assert browser.execute_script("return localStorage.length") == 0

        css(browser, "#sign-out")[0].click()
        css(browser, "#key-input")[0].send_keys("ops-key\n")
        wait_for(browser, lambda d: len(css(d, "#store-rows tr[data-adapter] .sha")) == 3, "all")
        assert css(browser, '#store-rows tr[data-adapter="cats"] button.small')  # admin buttons
        assert script_errors(browser) == []
    finally:
        browser.execute_script("sessionStorage.clear()")
        keyed.stop()
