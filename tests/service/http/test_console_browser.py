"""The web console in a real browser: Debian's headless Chromium driven by Playwright, against the
real server (``python -m service`` in a subprocess, tiny model, the real Redis, database 7).

Each state is photographed under ``artifacts/console/`` at the repository root (git-ignored); the
paths are printed. Nothing is downloaded: Playwright launches /usr/bin/chromium (``make test``
installs it when run as root).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from live_server import REPO, running_server
from payloads import encode_image
from playwright.sync_api import BrowserContext, Page, expect, sync_playwright
from scipy.stats import norm
from tiny_model import TINY_SIGMA

pytestmark = pytest.mark.slow  # a server process and a browser: several seconds to start

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REDIS_URL = "redis://127.0.0.1:6379/7"
KEY = "console-key"
ALPHA = 0.001
N0, N = 32, 500
ARTIFACTS = REPO / "artifacts" / "console"


@pytest.fixture(scope="module")
def server(tiny_registry: Path, tuning_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store = redis.Redis.from_url(REDIS_URL)
    store.flushdb()
    env = {
        "CERTSERVE_MODEL_DIR": str(tiny_registry),
        "CERTSERVE_TUNING_CACHE": str(tuning_cache),
        "CERTSERVE_REDIS_URL": REDIS_URL,
        "CERTSERVE_DEVICE": "cpu",
        "CERTSERVE_PRECISION": "float32",
        "CERTSERVE_API_KEYS": f'["{KEY}"]',
    }
    try:
        with running_server(env, tmp_path_factory.mktemp("console-server") / "server.log") as base:
            yield base
    finally:
        store.flushdb()
        store.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `make browser` installs Debian's chromium (as root)"
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"),  # a fresh profile: no cache, no stored state
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 900},
            accept_downloads=True,
        )
        yield context
        context.close()


@pytest.fixture
def page(browser: BrowserContext, server: str) -> Iterator[Page]:
    page = browser.new_page()
    outside: list[str] = []
    page.on(
        "request", lambda r: None if r.url.startswith(server) or r.url.startswith("blob:") else outside.append(r.url)
    )
    page.goto(server + "/")
    yield page
    page.close()
    assert outside == [], f"the console requested other origins: {outside}"


def snapshot(page: Page, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def use_key(page: Page, key: str = KEY) -> None:
    page.fill("#api-key", key)
    page.click("#save-key")


def set_parameters(page: Page, n0: int, n: int) -> None:
    page.fill("#n0", str(n0))
    page.fill("#n", str(n))
    page.press("#n", "Tab")  # the change event reloads the models' largest radius for this n


def gray_png(tmp_path: Path) -> Path:
    """Mid-gray with a little speckle: the tiny model's noisy counts favour class 0 enough to certify."""
    pixels = np.clip(128 + np.random.default_rng(0).integers(-10, 11, (28, 28)), 0, 255).astype(np.uint8)
    path = tmp_path / "gray.png"
    path.write_bytes(encode_image(pixels))
    return path


def image_set(tmp_path: Path, count: int) -> Path:
    rng = np.random.default_rng(1)
    images = np.clip(128 + rng.integers(-30, 31, (count, 28, 28)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=np.zeros(count, dtype=np.int64))
    path = tmp_path / "set.npz"
    path.write_bytes(buffer.getvalue())
    return path


def test_certify_one_image_and_read_its_radius(page: Page, server: str, tmp_path: Path) -> None:
    use_key(page)
    expect(page.locator("#model option")).to_have_count(1)
    set_parameters(page, N0, N)
    ceiling = TINY_SIGMA * norm.ppf(ALPHA ** (1 / N))  # all N samples agreeing
    page.wait_for_function(f"Math.abs(document.getElementById('radius-slider').max - {ceiling}) < 1e-9")
    image = gray_png(tmp_path)
    page.set_input_files("#image-file", str(image))
    expect(page.locator("#certify-result")).to_be_visible(timeout=30_000)
    expect(page.locator("#certify-verdict")).to_have_text(re.compile(r"^Class 0: t-shirt"))
    radius = float(page.text_content("#certify-radius"))

    # The same question through the API is answered from the certificate cache: the page showed that answer.
    api = httpx.post(
        f"{server}/v1/certify",
        files={"file": ("gray.png", image.read_bytes(), "image/png")},
        data={"n0": str(N0), "n": str(N), "resize": "true"},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    ).json()
    assert api["cached"] is True and round(api["radius"], 4) == radius and 0 < radius < ceiling
    estimation = page.eval_on_selector_all("#counts-table tbody tr", "rows => rows.map(r => +r.cells[2].textContent)")
    assert estimation == api["estimation_counts"] and sum(estimation) == N
    assert page.evaluate("document.getElementById('image-perturbed').width") == 28
    expect(page.locator("#perturbed-caption")).to_contain_text(f"‖δ‖₂ = {radius:.4f}")
    # The two pictures differ by about the radius (up to the display's 8-bit rounding, ~0.03 over 784 pixels).
    shown = page.evaluate(
        """() => {
          const pixels = (id) => document.getElementById(id).getContext('2d').getImageData(0, 0, 28, 28).data;
          const [a, b] = [pixels('image-original'), pixels('image-perturbed')];
          let squares = 0;
          for (let i = 0; i < a.length; i += 4) squares += ((a[i] - b[i]) / 255) ** 2;
          return Math.sqrt(squares);
        }"""
    )
    assert shown == pytest.approx(radius, abs=0.05)

    slider = page.locator("#radius-slider")
    slider.focus()
    page.keyboard.press("End")  # the largest certifiable radius: beyond this certificate
    expect(page.locator("#radius-verdict")).to_have_text(re.compile(r"^Not by the certificate above"))
    page.keyboard.press("Home")
    expect(page.locator("#radius-verdict")).to_have_text(re.compile(r"^Yes: the certificate above"))
    page.click("#radius-test")
    expect(page.locator("#radius-test-answer")).to_have_text(re.compile(r"^Certified at r = 0\.000 after \d+ samples"))
    snapshot(page, "certify")


def test_a_job_runs_to_the_end_with_its_plot_and_downloads(page: Page, tmp_path: Path) -> None:
    use_key(page)
    expect(page.locator("#model option")).to_have_count(1)
    set_parameters(page, 16, 100)
    page.set_input_files("#job-file", str(image_set(tmp_path, 6)))
    expect(page.locator("#job-state")).to_have_text("done", timeout=60_000)
    progress = page.evaluate("(({value, max}) => [value, max])(document.getElementById('job-progress'))")
    assert progress == [6, 6]
    expect(page.locator("#job-progress-text")).to_contain_text("6 / 6 images (100 %)")
    plot = page.locator("#job-plot")
    expect(plot).to_be_visible()
    page.wait_for_function("document.getElementById('job-plot').complete")
    assert plot.evaluate("img => img.naturalWidth") >= 500
    job_id = page.text_content("#job-id")
    expect(page.locator("#jobs-table tbody tr").first).to_contain_text("done")
    with page.expect_download() as download:
        page.click("#job-tsv")
    tsv = Path(download.value.path()).read_text().splitlines()
    assert download.value.suggested_filename == f"job-{job_id}.tsv"
    assert tsv[0].split("\t")[:6] == ["idx", "label", "predict", "radius", "correct", "time"] and len(tsv) == 7
    snapshot(page, "job-done")


def test_a_job_is_cancelled_from_the_list(page: Page, tmp_path: Path) -> None:
    use_key(page)
    expect(page.locator("#model option")).to_have_count(1)
    set_parameters(page, 16, 500_000)  # minutes of samples: still running when cancelled
    page.set_input_files("#job-file", str(image_set(tmp_path, 3)))
    expect(page.locator("#job-state")).to_have_text(re.compile("queued|running"), timeout=30_000)
    cancel = page.locator("#jobs-table tbody tr").first.get_by_role("button", name=re.compile("^cancel job"))
    cancel.click()
    expect(page.locator("#job-state")).to_have_text("cancelled")
    expect(page.locator("#jobs-table tbody tr").first).to_contain_text("cancelled")
    snapshot(page, "job-cancelled")


def test_errors_show_their_message(page: Page, tmp_path: Path) -> None:
    message = page.locator("#message")
    expect(message).to_contain_text("401 — this service needs an API key")  # the page loads without a key
    snapshot(page, "error-401")
    use_key(page, "not-the-key")
    expect(message).to_contain_text("403 — the API key was refused (invalid API key)")
    snapshot(page, "error-403")
    use_key(page)
    expect(message).to_be_hidden()
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image set")
    page.set_input_files("#job-file", str(notes))
    expect(message).to_contain_text("415 — unsupported file or content type (cannot tell what 'notes.txt' is")
    snapshot(page, "error-415")


def test_the_keyboard_reaches_every_control_in_order(page: Page) -> None:
    expect(page.locator("#message")).to_be_visible()  # the page opened without a key: a 401
    order = []
    for _ in range(12):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id || document.activeElement.textContent.trim()"))
    assert order == [
        "API documentation",
        "message-close",  # the page opened on a 401: its message can be dismissed
        "api-key",
        "save-key",
        "forget-key",
        "model",
        "n0",
        "n",
        "alpha",
        "resize",
        "image-file",
        "certify-button",
    ]
    page.focus("#api-key")
    page.keyboard.type(KEY)
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")  # "Use key" is a real button
    expect(page.locator("#model option")).to_have_count(1)
    expect(page.locator("#message")).to_be_hidden()


def test_readable_at_a_phone_width(page: Page, tmp_path: Path) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    use_key(page)
    set_parameters(page, N0, N)
    page.set_input_files("#image-file", str(gray_png(tmp_path)))
    expect(page.locator("#certify-result")).to_be_visible(timeout=30_000)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing scrolls sideways
    snapshot(page, "phone-390")
