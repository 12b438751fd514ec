"""A real browser (Debian's headless Chromium, driven by Playwright) runs Compare in the app."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from launcher.testing import ROOT, shared_app

pytestmark = pytest.mark.slow  # starts the app or the benchmark as subprocesses

APP_ARGS = ["--ranks", "2", "--threads-per-rank", "1"]  # the same app as tests/test_app_e2e.py
CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = ROOT / "outputs" / "screenshots" / "compare.png"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@contextmanager
def _page(tmp_path: Path, height: int) -> Iterator[Any]:
    """A page of the shared app in headless Chromium, once the model's defaults are shown."""
    from playwright.sync_api import expect, sync_playwright

    app = shared_app(APP_ARGS)
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": height},
        )
        try:
            page = browser.new_page()
            page.goto(app.url)
            expect(page.locator("#steps input")).not_to_have_value("0")  # the model's defaults are shown
            yield page
        finally:
            browser.close()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium: bash scripts/setup.sh --browser")
def test_compare_in_a_real_browser(tmp_path: Path) -> None:
    from playwright.sync_api import expect

    with _page(tmp_path, height=1300) as page:
        # The prompt box opens with one of the model's example prompts: no typing needed.
        example = page.locator("#prompt textarea").input_value()
        assert example and example[:40] in page.locator("#examples").inner_text(), example
        page.locator("#steps input").fill("6")
        page.locator("#compare-btn").click()
        panel = page.locator("#latency-panel table")
        expect(panel).to_be_visible(timeout=180_000)
        for row in (
            "Wall time",
            "Speedup",
            "Ideal speedup",
            "Model calls per rank",
            "Bytes communicated",
            "PSNR",
            "SSIM",
        ):
            expect(panel).to_contain_text(row)
        expect(page.locator("#left-output img")).to_be_visible()
        expect(page.locator("#right-output img")).to_be_visible()
        expect(page.locator("#timeline img, #timeline svg, #timeline canvas").first).to_be_visible()
        page.wait_for_timeout(500)
        shot = tmp_path / "compare.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, SCREENSHOT)

        # Another model opens with its own example prompt and its own fields.
        page.get_by_label("Model").click()
        page.get_by_role("option", name="built-in audio").click()
        expect(page.locator("#prompt textarea")).not_to_have_value(example)
        audio_example = page.locator("#prompt textarea").input_value()
        assert audio_example and audio_example[:40] in page.locator("#examples").inner_text(), audio_example
        expect(page.get_by_label("Duration (s)")).to_be_visible()
        expect(page.get_by_label("Height")).to_be_hidden()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium: bash scripts/setup.sh --browser")
def test_race_and_share_in_a_real_browser(tmp_path: Path) -> None:
    from playwright.sync_api import expect

    with _page(tmp_path, height=1400) as page:
        page.locator("#steps input").fill("6")
        page.get_by_role("tab", name="Race").click()
        page.locator("#race-methods").get_by_label("AsyncDiff").check()  # with the default three: four
        page.locator("#race-btn").click()
        table = page.locator("#race-table table")
        expect(table).to_be_visible(timeout=240_000)
        for label in ("Baseline", "ParaStep (2 ranks)", "BatchStep", "AsyncDiff (2 ranks)"):
            expect(table).to_contain_text(label)
        expect(page.locator("#race-table")).to_contain_text("crosses the link")
        # no word of the table breaks inside itself (Gradio's Markdown breaks words: "Ide / al")
        broken = table.locator("th, td").evaluate_all(
            """cells => cells.flatMap(cell => {
                const words = [];
                const walk = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
                for (let node = walk.nextNode(); node; node = walk.nextNode()) {
                    for (const m of node.textContent.matchAll(/\\S+/g)) {
                        const range = document.createRange();
                        range.setStart(node, m.index);
                        range.setEnd(node, m.index + m[0].length);
                        const tops = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
                        if (tops.size > 1) words.push(m[0]);
                    }
                }
                return words;
            })"""
        )
        assert broken == [], f"words broken across lines in the race table: {broken}"
        expect(page.locator("#race-gallery img")).to_have_count(4)
        expect(page.locator("#race-timeline img, #race-timeline svg, #race-timeline canvas").first).to_be_visible()
        page.locator("#share-btn").click()
        expect(page.locator("#race-share a").first).to_be_visible(timeout=60_000)
        page.wait_for_timeout(500)
        shot = tmp_path / "race.png"
        page.screenshot(path=str(shot), full_page=True)
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, SCREENSHOT.parent / "race.png")

        # The video model offers SparseTem; the image model does not.
        expect(page.locator("#sparsetem")).to_be_hidden()
        page.get_by_label("Model").click()
        page.get_by_role("option", name="built-in video").click()
        expect(page.locator("#sparsetem")).to_be_visible()
