"""The studio page in a real browser (Debian's chromium driven by playwright), on the tiny experts.

Run with `python -m pytest -m browser`; skipped when /usr/bin/chromium or playwright is missing
(`apt-get install -y chromium`; `playwright install` downloads browsers and is not used).
Screenshots of the main states go to $STUDIO_SCREENSHOTS when it is set.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import time
import zipfile
from pathlib import Path

import pytest

from arranger_helpers import band  # noqa: F401

CHROMIUM = os.environ.get("STAGE_STACK_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--autoplay-policy=no-user-gesture-required"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no chromium at {CHROMIUM}: apt-get install -y chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
pytest.importorskip("uvicorn", reason="the studio extra is not installed: pip install -e '.[studio]'")

from studio_helpers import make_app  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(band, tmp_path):
    import uvicorn

    studio, app = make_app(band, tmp_path / "songs")
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        if not thread.is_alive():
            pytest.fail("the studio server did not start")
        time.sleep(0.05)
    yield studio, f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(30)


@pytest.fixture
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        yield page
        browser.close()
        assert not errors, errors


def shot(page, name):
    folder = os.environ.get("STUDIO_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


def wait_idle(page):
    page.wait_for_selector("#job", state="hidden", timeout=120_000)


def test_build_play_pick_undo_download(server, page, tmp_path):
    studio, url = server
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    assert page.is_visible("#start")  # no songs yet: the start form
    shot(page, "1-start")

    page.fill("#click-form input[name=name]", "demo")
    page.fill("#click-form input[name=bpm]", "110")
    page.fill("#click-form input[name=duration]", "1.5")
    page.click("#click-form button[type=submit]")
    page.wait_for_selector("#song:not([hidden])")
    page.wait_for_selector("#no-layers", state="visible")

    # two layers: drums with two candidates, then bass
    page.select_option("#instrument-select", "drums")
    page.fill("#add-form input[name=candidates]", "2")
    page.click("#generate")
    page.wait_for_selector(".lane[data-layer=drums]", timeout=120_000)
    wait_idle(page)
    page.select_option("#instrument-select", "bass")
    page.fill("#add-form input[name=candidates]", "1")
    page.click("#add-form details summary")
    page.fill("#add-form input[name=hears]", "drums")  # what it hears, said in the page
    page.click("#generate")
    page.wait_for_selector("#job:not([hidden])", timeout=30_000)
    shot(page, "2-generating")
    page.wait_for_selector(".lane[data-layer=bass] .wave[data-ready]", timeout=120_000)
    wait_idle(page)
    page.fill("#add-form input[name=hears]", "")
    assert page.locator(".lane[data-layer=drums] .chip").count() == 2
    assert [layer["name"] for layer in studio.state("demo")["layers"]] == ["drums", "bass"]
    assert studio.state("demo")["layers"][1]["hears"] == ["drums"]
    assert "hears drums" in page.locator(".lane[data-layer=bass] .lane-meta").text_content()

    # play: the transport's clock moves
    page.click("#play")
    page.wait_for_function("Number(document.querySelector('#time').dataset.seconds) > 0.2", timeout=30_000)
    page.click("#play")  # pause
    shot(page, "3-song")

    # audition candidate 1 of drums against the mix, then keep it
    page.click(".lane[data-layer=drums] .chip >> nth=1")
    page.wait_for_selector(".lane[data-layer=drums] .keep:not([hidden])")
    shot(page, "4-audition")
    page.click(".lane[data-layer=drums] .keep")
    page.wait_for_function("document.querySelector('.lane[data-layer=drums] .chip.picked').textContent === '1'")
    assert studio.state("demo")["layers"][0]["picked"] == 1
    assert page.is_visible(".lane[data-layer=bass] .badge.stale")  # bass heard candidate 0

    # undo: candidate 0 again
    page.click("#undo")
    page.wait_for_function("document.querySelector('.lane[data-layer=drums] .chip.picked').textContent === '0'")
    assert studio.state("demo")["layers"][0]["picked"] == 0

    # download the zip
    with page.expect_download() as info:
        page.click("#download")
    data = Path(info.value.path()).read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert sorted(z.namelist()) == ["click.wav", "manifest.json", "mix.wav", "stems/bass.wav", "stems/drums.wav",
                                        "tempo.mid"]

    # a reload shows the same song (the state lives in the song's directory)
    page.reload()
    page.wait_for_selector(".lane[data-layer=bass]")
    assert page.locator(".lane").count() == 2


def wav_base64(seconds=1.5, rate=22050) -> str:
    import base64

    import numpy as np
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    sf.write(buffer, 0.3 * np.sin(2 * np.pi * 220 * t), rate, format="WAV")
    return base64.b64encode(buffer.getvalue()).decode()


def test_upload_redo_remove_mix_and_cancel(server, page):
    studio, url = server
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")

    # drop a mix on the page
    transfer = page.evaluate_handle("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "my take.wav", {type: "audio/wav"}));
        return dt;
    }""", wav_base64())
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    page.wait_for_function("document.querySelector('#drop-name').textContent.includes('my take.wav')")
    page.fill("#upload-form input[name=name]", "upl")
    page.fill("#upload-form input[name=bpm]", "96")
    page.click("#upload-form button[type=submit]")
    page.wait_for_selector(".lane.context .wave[data-ready]")
    assert "my take.wav" in page.text_content(".lane.context .lane-name")

    for name in ("drums", "bass"):
        page.select_option("#instrument-select", name)
        if name == "bass":  # "-": it hears no earlier layer, only the upload
            page.click("#add-form details summary")
            page.fill("#add-form input[name=hears]", "-")
        page.click("#generate")
        page.wait_for_selector(f".lane[data-layer={name}] .wave[data-ready]", timeout=120_000)
        wait_idle(page)
    page.fill("#add-form input[name=hears]", "")
    assert studio.state("upl")["layers"][1]["hears"] == []
    assert "hears no layer" in page.locator(".lane[data-layer=bass] .lane-meta").text_content()

    # mute and solo act on the page's own playback; gains go to the server's mix
    page.click(".lane[data-layer=drums] .solo")
    assert "silent" in page.get_attribute(".lane[data-layer=bass]", "class")
    page.click(".lane[data-layer=drums] .solo")
    page.click(".lane[data-layer=bass] .mute")
    assert "silent" in page.get_attribute(".lane[data-layer=bass]", "class")
    page.fill(".lane[data-layer=bass] .gain input", "-6")
    page.dispatch_event(".lane[data-layer=bass] .gain input", "input")
    page.click("#apply-gains")
    page.wait_for_selector("#apply-gains:disabled")
    assert studio.state("upl")["layers"][1]["gain_db"] == -6.0

    # redo drums and everything after: new takes of both
    page.click(".lane[data-layer=drums] .redo-after")
    wait_idle(page)
    page.wait_for_function("document.querySelector('.lane[data-layer=bass] .lane-meta').textContent.includes('take 2')")
    assert [layer["take"] for layer in studio.state("upl")["layers"]] == [2, 2]
    shot(page, "5-upload-song")

    # cancel a running layer: the song stays as it was
    page.select_option("#instrument-select", "keys")
    page.fill("#add-form input[name=candidates]", "4")
    page.click("#generate")
    page.wait_for_selector("#job:not([hidden])")
    page.click("#cancel")
    wait_idle(page)
    page.wait_for_function("document.querySelector('#status').textContent.includes('cancelled')"
                           " || document.querySelector('.lane[data-layer=keys]') !== null")
    keys_done = "keys" in [layer["name"] for layer in studio.state("upl")["layers"]]
    assert page.locator(".lane[data-layer=keys]").count() == int(keys_done)  # cancelled, or done first

    # remove a layer (the page asks first)
    page.on("dialog", lambda dialog: dialog.accept())
    page.click(".lane[data-layer=bass] .remove")
    page.wait_for_selector(".lane[data-layer=bass]", state="detached")
    assert "bass" not in [layer["name"] for layer in studio.state("upl")["layers"]]

    # an error from the server is shown as it is
    page.fill("#add-form input[name=name]", "drums")
    page.select_option("#instrument-select", "keys")
    page.click("#generate")
    page.wait_for_selector("#status.error")
    assert "drums" in page.text_content("#status")
