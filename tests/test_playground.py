"""The playground page in a real headless Chromium, with a fake microphone fed from a WAV.

Chromium's own fake capture device plays an espeak-ng question into getUserMedia; the page
streams it over the realtime socket while the button is held, and on release the answer must
stream into the page with a TTFT-after-speech figure. A dropped file goes over POST
/v1/audio/chat and must show exactly what that endpoint answers.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import httpx
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make install adds it)")


@pytest.fixture(scope="module")
def mic_wav(speech, tmp_path_factory):
    """The question as 48 kHz 16-bit mono with a second of silence: what the fake device plays."""
    out = tmp_path_factory.mktemp("mic") / "mic.wav"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(speech["capital"]), "-af", "apad=pad_dur=1",
                    "-ar", "48000", "-ac", "1", "-sample_fmt", "s16", str(out)], check=True, timeout=60)
    return out


@pytest.fixture(scope="module")
def page(mic_wav):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic_wav}",
        ])
        page = browser.new_page()
        yield page
        browser.close()


def open_playground(page, url: str, adapter: str) -> None:
    page.goto(f"{url}/")
    assert page.url.endswith("/playground")
    page.wait_for_function("document.querySelectorAll('#adapter option').length >= 2", timeout=30_000)
    page.select_option("#adapter", adapter)
    page.wait_for_function("!document.getElementById('talk').disabled", timeout=30_000)


def test_hold_to_talk_streams_the_answer_with_ttft_after_speech(server, page):
    open_playground(page, server.url, "alpha")
    page.hover("#talk")
    page.mouse.down()
    page.wait_for_timeout(2500)  # speak for 2.5 s (the fake microphone plays the question)
    page.mouse.up()
    page.wait_for_function("document.getElementById('answer').textContent.length > 0", timeout=120_000)
    page.wait_for_function("/\\d+ ms/.test(document.getElementById('ttft').textContent)", timeout=120_000)
    assert not page.locator("#answer.error").count(), page.text_content("#answer")
    assert re.fullmatch(r"\d+ ms", page.text_content("#ttft"))


def test_a_dropped_file_shows_what_the_chat_endpoint_answers(server, page, speech):
    with open(speech["sky"], "rb") as f:
        r = httpx.post(f"{server.url}/v1/audio/chat", files={"file": ("q.wav", f, "audio/wav")},
                       data={"adapter": "beta"}, timeout=180)
    expected = r.json()["choices"][0]["message"]["content"]
    open_playground(page, server.url, "beta")
    page.set_input_files("#file", str(speech["sky"]))
    page.wait_for_function("document.getElementById('ttft').textContent.includes('ms')", timeout=120_000)
    page.wait_for_function(f"document.getElementById('answer').textContent.length >= {len(expected)}",
                           timeout=180_000)
    assert page.text_content("#answer") == expected
