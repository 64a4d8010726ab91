"""The dashboard in a real browser: Debian's Chromium driven headless by Playwright (the Python package, with
``executable_path``; no browser download).

The gateway is a real ``Service``: first a replayed capture (two simulated days of the demo house, made by the
simulator) fills the history, then the live simulator (``sim:demo`` over the virtual radio) feeds the same
database. The keystore holds the demo keys: Garage has a wrong key, Attic none.

Screenshots go to ``artifacts/screenshots/``; with ``MITHERM_UPDATE_SCREENSHOTS=1`` they are also copied to
``docs/screenshots/`` for the README."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_asyncio

from mitherm.captures import JsonlWriter
from mitherm.history import History
from mitherm.service import RunConfig, Service
from mitherm.sim.house import builtin_house
from mitherm.web.app import runner_url, serve
from test_web import NO_KEY, UNNAMED, plain_names, sim_adverts, write_keystore

# ./scripts/test installs playwright (Python package only) and Debian's chromium; in CI a missing browser is a
# failure, not a skip, so the dashboard is never silently untested.
_IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
try:
    from playwright.async_api import Page, async_playwright
except ImportError:
    if _IN_CI:
        raise
    pytest.skip("the Python package playwright is not installed (./scripts/test installs it)", allow_module_level=True)


CHROMIUM = os.environ.get("MITHERM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    if _IN_CI:
        raise RuntimeError("Chromium is not installed: ./scripts/test installs it with apt-get install chromium")
    pytest.skip(
        "Chromium is not installed (./scripts/test installs it: apt-get install chromium)", allow_module_level=True
    )

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
ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "artifacts" / "screenshots"
DOCS_SHOTS = ROOT / "docs" / "screenshots"

# Playwright evaluates a predicate given as an expression (not "() => ...") with eval(), which the dashboard's CSP
# forbids: every predicate below is an arrow function.
pytestmark = pytest.mark.asyncio(loop_scope="module")


class Live:
    def __init__(self, service: Service, url: str, house: Any, demo_keys: dict[str, str]) -> None:
        self.service = service
        self.url = url.rstrip("/")
        self.house = house
        self.demo_keys = demo_keys

    def mac(self, label: str) -> str:
        return self.house.device(label).address


async def _start_web(service: Service) -> tuple[Any, bool]:
    """The service's own dashboard when ``Service.run`` starts one (``service.web_runner``), else ours."""
    for _ in range(10):
        runner = getattr(service, "web_runner", None)
        if runner is not None:
            return runner, False
        await asyncio.sleep(0.05)
    return await serve(service, service.cfg.web_bind), True


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("web")
    house = builtin_house("demo")
    demo_keys = write_keystore(house, tmp / "keys.json")
    db = tmp / "history.sqlite3"
    names = plain_names(house)

    # 1. two days of history: the simulator's adverts written as a capture, replayed through a Service
    capture = tmp / "two-days.jsonl"
    start = time.time() - 2 * 86400 - 60
    with JsonlWriter(capture) as w:
        for adv in sim_adverts(builtin_house("demo", min_interval=600.0), 2 * 86400, start):
            w.write(adv)
    replay = Service(RunConfig(sources=[f"capture:{capture}"], db=str(db), keys=str(tmp / "keys.json"), web=False))
    await replay.run()
    h = History(db)
    h.delete_state("counters")  # the live simulator starts its frame counters afresh
    h.close()

    # 2. the live gateway on the simulator, with the dashboard
    cfg = RunConfig(
        sources=["sim:demo"],
        db=str(db),
        keys=str(tmp / "keys.json"),
        web=True,
        web_bind="127.0.0.1:0",
        names=names,
        follow=True,
    )
    service = Service(cfg)
    task = asyncio.create_task(service.run())
    for _ in range(200):
        if service.gateway is not None or task.done():
            break
        await asyncio.sleep(0.05)
    if task.done():
        task.result()
    runner, own = await _start_web(service)
    try:
        yield Live(service, runner_url(runner), house, demo_keys)
    finally:
        if own:
            await runner.cleanup()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 10)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> Any:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Any) -> Any:
    ctx = await browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    pg = await ctx.new_page()
    pg.set_default_timeout(20_000)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    pg.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    pg.js_errors = errors  # type: ignore[attr-defined]
    try:
        yield pg
        assert errors == [], errors
    finally:
        await ctx.close()


async def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    if os.environ.get("MITHERM_UPDATE_SCREENSHOTS") == "1":
        DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_SHOTS / path.name)


VALUES_JS = """() => Object.fromEntries([...document.querySelectorAll('#devices tbody tr')].map(r => [r.dataset.mac,
  ['temperature_c', 'humidity_pct', 'battery_pct'].map(f => r.querySelector(`td[data-field=${f}]`).textContent)
  .join('|')]))"""


async def test_values_appear_and_update_live(live: Live, page: Page) -> None:
    await page.goto(live.url + "/")
    await page.wait_for_selector("#live.on")
    await page.wait_for_function("() => document.querySelectorAll('#devices tbody tr').length >= 15")
    await page.wait_for_function(
        "() => [...document.querySelectorAll('#devices td[data-field=temperature_c]')]"
        ".some(td => td.textContent.includes('°C'))"
    )
    rows = await page.eval_on_selector_all("#devices tbody tr", "rs => rs.map(r => r.dataset.mac)")
    assert set(rows) == {d.address for d in live.house.devices if d.label not in (*UNNAMED, *NO_KEY)}
    nearby = await page.eval_on_selector_all("#nearby tbody tr", "rs => rs.map(r => r.dataset.mac)")
    assert set(nearby) == {live.mac(label) for label in (*UNNAMED, *NO_KEY)}
    living = page.locator(f'#devices tr[data-mac="{live.mac("Living room")}"]')
    assert await living.locator('td[data-field="name"]').inner_text() == "Living room"
    assert "Stock firmware" in await living.locator('td[data-field="firmware"]').inner_text()
    # updates arrive over SSE without a reload
    before = await page.evaluate(VALUES_JS)
    await page.wait_for_function(
        f"before => Object.entries(({VALUES_JS})()).some(([m, v]) => m in before && before[m] !== v)", arg=before
    )
    # sortable: temperature descending puts the warmest first
    await page.click('#devices th[data-sort="temperature_c"]')
    await page.click('#devices th[data-sort="temperature_c"]')
    assert await page.get_attribute('#devices th[data-sort="temperature_c"]', "aria-sort") == "descending"
    # values keep arriving over SSE while the test reads, so wait for a render in which the order holds (a table
    # that is never sorted times out here)
    temps = await (
        await page.wait_for_function(
            """() => {
              const t = [...document.querySelectorAll('#devices td[data-field=temperature_c]')]
                .map(td => parseFloat(td.textContent)).filter(v => !isNaN(v));
              return t.length >= 5 && t.every((v, i) => i === 0 || t[i - 1] >= v) ? t : null;
            }"""
        )
    ).json_value()
    assert temps == sorted(temps, reverse=True) and len(temps) >= 5


CHART_PIXELS_JS = """q => {
  const c = document.querySelector(`#chart-${q} canvas`);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4)
    if (Math.abs(d[i] - 228) < 40 && Math.abs(d[i + 1] - 87) < 40 && Math.abs(d[i + 2] - 46) < 40
        && d[i + 3] > 200) n++;
  return n;
}"""


async def test_device_page_plots_history_zoom_range_and_csv(live: Live, page: Page) -> None:
    mac = live.mac("Living room")
    await page.goto(f"{live.url}/device/{mac}")
    await page.wait_for_selector('body[data-charts-ready="3"]')
    assert await page.inner_text("#title") == "Living room"
    points = await page.evaluate("window.mithermCharts.temperature_c.data[1].filter(v => v !== null).length")
    assert points > 20
    assert await page.evaluate(CHART_PIXELS_JS, "temperature_c") > 200  # the line is drawn
    # week: hourly means with a min-max band, two days of them
    await page.click('#ranges button[data-range="week"]')
    await page.wait_for_function("() => document.getElementById('range-note').textContent.startsWith('Hourly')")
    await page.wait_for_selector('body[data-charts-ready="3"]')
    hours = await page.evaluate("window.mithermCharts.humidity_pct.data[0].length")
    assert 40 <= hours <= 60
    # zoom by dragging across the temperature chart; the other charts follow
    over = page.locator("#chart-temperature_c .u-over")
    box = await over.bounding_box()
    assert box is not None
    full = await page.evaluate("(({min, max}) => max - min)(window.mithermCharts.temperature_c.scales.x)")
    await page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] / 2)
    await page.mouse.down()
    await page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] / 2, steps=5)
    await page.mouse.up()
    zoomed = await page.evaluate(
        "['temperature_c', 'humidity_pct'].map(q => window.mithermCharts[q].scales.x).map(s => s.max - s.min)"
    )
    assert zoomed[0] < full * 0.5 and abs(zoomed[0] - zoomed[1]) < 1
    await page.click("#reset-zoom")
    assert await page.evaluate("(({min, max}) => max - min)(window.mithermCharts.temperature_c.scales.x)") >= full * 0.9
    await shot(page, "device")
    async with page.expect_download() as dl:
        await page.click("#csv")
    download = await dl.value
    text = Path(await download.path()).read_text()
    lines = text.strip().splitlines()
    assert "temperature_c_mean" in lines[0] and len(lines) > 40
    assert download.suggested_filename == f"mitherm-{mac.replace(':', '').lower()}-week.csv"


async def _wait_failed(page: Page, live: Live, mac: str) -> None:
    for _ in range(60):
        st = live.service.gateway.devices.get(mac)
        if st is not None and st.key_status == "key_failed":
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"{mac} never reported a failing key")


async def test_wrong_key_shows_the_doctors_verdict(live: Live, page: Page) -> None:
    mac = live.mac("Garage")
    await _wait_failed(page, live, mac)
    await page.goto(f"{live.url}/device/{mac}")
    await page.wait_for_selector('body[data-key-status="key_failed"]')
    await page.wait_for_selector('#current-verdict[data-verdict="wrong_key"]')
    badge = await page.inner_text("#key-badge .badge")
    assert badge == "key failed: Wrong key"
    wrong = live.demo_keys[mac]
    masked = await page.inner_text("#key-current code")
    assert masked == f"{wrong[:4]}…{wrong[-4:]}"
    assert wrong not in await page.content()
    await page.fill("#key", wrong)
    await page.select_option("#key-source", "cloud")
    await page.click("#key-save")
    verdict = page.locator('#verdict[data-verdict="wrong_key"]')
    await verdict.wait_for()
    text = await verdict.inner_text()
    assert "Wrong key" in text and "integrity check" in text and "Not saved" in text
    assert await page.get_attribute("#verdict", "data-saved") == "false"
    assert await page.is_visible("#key-force")
    await shot(page, "device-wrong-key")


async def test_right_key_turns_the_device_green(live: Live, page: Page) -> None:
    mac = live.mac("Garage")
    right = live.house.keys()[mac]
    await page.goto(f"{live.url}/device/{mac}")
    await page.wait_for_selector('body[data-key-status="key_failed"]')
    await page.fill("#key", right)
    await page.click("#key-save")
    await page.wait_for_selector('#verdict[data-verdict="ok"][data-saved="true"]')
    await page.wait_for_selector('body[data-key-status="verified"]')
    assert await page.input_value("#key") == ""
    assert live.service.keystore.get(mac).bindkey == right
    await page.goto(live.url + "/")
    row = page.locator(f'#devices tr[data-mac="{mac}"]')
    await page.wait_for_selector(f'#devices tr[data-mac="{mac}"][data-key-status="verified"]')
    badge = row.locator("td[data-field=key] .badge")
    assert await badge.inner_text() == "verified"
    assert await badge.evaluate("b => getComputedStyle(b).color") == "rgb(21, 128, 61)"  # green
    # its readings now decrypt: values appear (a stock sensor sends one about every 10 s here, temperature,
    # humidity and battery in turn)
    await page.wait_for_function(
        f"""() => [...document.querySelectorAll('#devices tr[data-mac="{mac}"] td.num')]
            .some(td => /°C|%/.test(td.textContent))""",
        timeout=25_000,
    )
    await shot(page, "devices")


async def test_add_a_sensor_walkthrough(live: Live, page: Page) -> None:
    mac = live.mac("Attic")
    await page.goto(f"{live.url}/add?mac={mac}")
    await page.wait_for_selector(f'#candidates label[data-mac="{mac}"]')
    await page.wait_for_selector("#step-firmware:not(.hidden)")
    firmware = await page.inner_text("#firmware")
    assert "Custom firmware, atc1441 format, encrypted" in firmware
    assert await page.get_attribute('#sources .card[data-source="pvvx"]', "class") == "card recommended"
    await page.fill("#add-name", "Attic")
    await page.fill("#add-key", live.house.keys()[mac][:20])
    await page.wait_for_timeout(400)
    assert await page.is_hidden("#add-verdict")  # not judged before the key is complete
    await page.fill("#add-key", live.house.keys()[mac])
    await page.wait_for_selector('#add-verdict[data-verdict="ok"]')  # the verdict at once, before saving
    assert live.service.keystore.get(mac) is None
    await shot(page, "add")
    await page.click("#add-save")
    await page.wait_for_selector("#add-done:not(.hidden)")
    entry = live.service.keystore.get(mac)
    assert entry is not None and entry.name == "Attic" and entry.source == "pvvx"
    st = live.service.gateway.devices[mac]
    assert st.known and st.key_status == "verified" and st.name == "Attic"
    await page.goto(live.url + "/")
    await page.wait_for_selector(f'#devices tr[data-mac="{mac}"][data-key-status="verified"]')


async def test_login_when_not_on_loopback(live: Live, page: Page) -> None:
    """Bound off loopback the dashboard asks for the password first (here: an app built as if it were)."""
    from aiohttp import web

    from mitherm.web.app import create_app

    runner = web.AppRunner(create_app(live.service, password="correct horse", loopback=False))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    mac = live.mac("Kitchen")
    try:
        await page.goto(f"http://127.0.0.1:{port}/device/{mac}")
        url = urlsplit(page.url)
        assert url.path == "/login" and parse_qs(url.query)["next"] == [f"/device/{mac}"]
        await page.fill("#password", "battery staple")
        await page.click("#login-form button")
        await page.wait_for_function("() => document.getElementById('login-error').textContent === 'wrong password'")
        page.js_errors.clear()  # type: ignore[attr-defined]  # the browser logs the expected 401
        await page.fill("#password", "correct horse")
        await page.click("#login-form button")
        await page.wait_for_url(f"http://127.0.0.1:{port}/device/{mac}")
        await page.wait_for_selector('body[data-charts-ready="3"]')
        assert await page.is_visible("#logout")
        await page.click("#logout")
        await page.wait_for_url(f"http://127.0.0.1:{port}/login")
    finally:
        await runner.cleanup()
