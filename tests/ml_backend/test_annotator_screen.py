"""The annotator's screen in a real browser: at 1366x768 the image, the three choices (hotkeys shown)
and the zoom / brightness / contrast controls share one viewport on a dark page; then a stream of 20
tasks labelled from the keyboard, keystrokes and seconds per image measured (printed, and written to
$MAMMOFLAG_TEST_SHOTS/annotator-timing.json with the screenshots when that is set)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from label_config import load_label_config
from mammoflag.labelstudio import ensure_local_storage, find_or_create_project
from mammoflag.paths import task_url_for
from mammoflag.users import invitation

pytestmark = [pytest.mark.browser, pytest.mark.label_studio]

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
VIEWPORT = {"width": 1366, "height": 768}
STREAM = 20
KEYS = {"biopsy_tool": "1", "mag_view": "2", "neither": "3"}
SUBMIT = "Control+Enter"


def _portrait_display(path: Path, seed: int) -> Path:
    """A display-sized grey 'mammogram' (portrait, like the importer's 1024-long-side PNGs)."""
    rng = np.random.default_rng(seed)
    h, w = 1024, 820
    yy, xx = np.mgrid[0:h, 0:w]
    breast = ((yy - h / 2) / (0.45 * h)) ** 2 + (xx / (0.8 * w)) ** 2 < 1
    img = (breast * rng.integers(90, 170, size=(h, w))).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


def _answer(i: int) -> list[str]:
    return [["biopsy_tool"], ["neither"], ["mag_view"], ["biopsy_tool", "mag_view"]][i % 4]


def test_one_viewport_dark_screen_and_a_keyboard_stream(label_studio, ls_client, data_root, chromium_path, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    folder = data_root / "screen"
    tasks = [{"data": {"image": task_url_for(_portrait_display(folder / "images" / f"{i:03d}" / "0.png", i), data_root),
                       "key": f"1.2.77.{i}:0", "study_label": f"st{i:03d}", "view_position": "MLO",
                       "laterality": "R"}} for i in range(STREAM)]
    config = load_label_config()
    project = find_or_create_project(ls_client, "annotator screen", config.xml, show_skip_button=True,
                                     show_instruction=False)
    ensure_local_storage(ls_client, project.id, folder)
    ls_client.projects.import_tasks(project.id, request=tasks)

    email = f"screen-{secrets.token_hex(3)}@annotators.mammoflag.test"
    password = secrets.token_urlsafe(12)
    link = invitation(ls_client, label_studio.url, email).link
    shots = tmp_path / "shots"
    shots.mkdir()
    timing: dict = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_FLAGS)
        ctx = browser.new_context(viewport=VIEWPORT)
        # Label Studio's own dark theme, as the annotator's one click on its theme switch stores it
        ctx.add_init_script("localStorage.setItem('preferred-color-scheme', 'Dark')")
        page = ctx.new_page()
        page.set_default_timeout(60_000)
        try:
            page.goto(link)
            page.fill("#email", email)
            page.fill("#password", password)
            page.click("button[type=submit]")
            page.wait_for_url(lambda url: "/user/signup" not in url)
            page.goto(f"{label_studio.url}/projects/{project.id}/data?labeling=1")
            page.wait_for_function("[...document.images].some(i => i.naturalWidth >= 800)")

            # -- layout: one viewport, hotkeys shown, controls on the image, dark, study/view hint on top
            box = max((page.locator("img").nth(i).bounding_box() or {"width": 0} for i in
                       range(page.locator("img").count())), key=lambda b: b["width"])
            assert box["width"] >= 0.25 * VIEWPORT["width"] and box["y"] + box["height"] <= VIEWPORT["height"]
            for name, key in KEYS.items():
                choice = page.get_by_role("checkbox", name=name)
                cb = choice.bounding_box()
                assert cb and cb["y"] + cb["height"] <= VIEWPORT["height"] and cb["x"] < VIEWPORT["width"]
                label = page.locator("label").filter(has=choice)
                assert key in label.inner_text()  # Label Studio shows the hotkey beside the choice
            assert page.get_by_text(re.compile(r"Study st\d{3} · MLO R")).is_visible()
            tools = page.evaluate("""() => [...document.querySelectorAll('button, [role=button]')]
                .map(b => (b.getAttribute('aria-label') || b.title || '').toLowerCase())""")
            assert any("zoom" in t for t in tools) and any("contrast" in t for t in tools) and \
                any("bright" in t for t in tools), tools
            screen_bg = page.evaluate("""() => { const el = document.querySelector('.mammoflag-screen');
                return el && getComputedStyle(el).backgroundColor; }""")
            page_bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
            assert _luminance(screen_bg) < 0.1 and _luminance(page_bg) < 0.3, (screen_bg, page_bg)
            page.screenshot(path=str(shots / "annotator-1366x768.png"))

            # -- the stream: each image is labelled by its choice keys, then submitted (and the next one opens)
            keystrokes, per_image = 0, []
            seen: list[str] = []
            for i in range(STREAM):
                page.wait_for_function("([prev]) => { const t = document.querySelector('.mammoflag-screen h4');"
                                       " return t && t.textContent.includes('Study st') && t.textContent !== prev; }",
                                       arg=[seen[-1] if seen else ""])
                page.wait_for_function("[...document.images].some(i => i.naturalWidth >= 800 && i.complete)")
                t0 = time.monotonic()
                header = page.locator(".mammoflag-screen h4").first.inner_text()
                seen.append(header)
                for choice in _answer(i):
                    page.keyboard.press(KEYS[choice])
                    keystrokes += 1
                page.keyboard.press(SUBMIT)
                keystrokes += 1
                if i < STREAM - 1:
                    page.wait_for_function("([prev]) => { const t = document.querySelector('.mammoflag-screen h4');"
                                           " return t && t.textContent !== prev; }", arg=[header])
                else:
                    expect(page.get_by_text(re.compile("No more tasks|all tasks", re.I)).first).to_be_visible()
                per_image.append(time.monotonic() - t0)
            timing = {"images": STREAM, "keystrokes": keystrokes, "keystrokes_per_image": keystrokes / STREAM,
                      "seconds_per_image_median": float(np.median(per_image)),
                      "seconds_per_image_mean": float(np.mean(per_image)), "viewport": VIEWPORT}
            print("annotator stream:", json.dumps(timing))
        except Exception:
            page.screenshot(path=str(shots / "failure.png"))
            raise
        finally:
            browser.close()
            if os.environ.get("MAMMOFLAG_TEST_SHOTS"):
                (shots / "annotator-timing.json").write_text(json.dumps(timing, indent=1))
                shutil.copytree(shots, os.environ["MAMMOFLAG_TEST_SHOTS"], dirs_exist_ok=True)

    assert len(set(seen)) == STREAM  # twenty different images, each once
    users = {u.email: u.id for u in ls_client.users.list()}
    stored = {}
    for t in ls_client.tasks.list(project=project.id, fields="all"):
        [ann] = t.annotations
        assert ann["completed_by"] == users[email]
        stored[t.data["study_label"]] = sorted(ann["result"][0]["value"]["choices"])
    for header in seen:
        label = re.search(r"st\d{3}", header).group(0)
        assert stored[label] == sorted(_answer(seen.index(header)))
    # the fewest Label Studio allows without patching it: one key per choice, one chord to submit and advance
    assert timing["keystrokes"] == sum(len(_answer(i)) + 1 for i in range(STREAM))


def _luminance(css: str | None) -> float:
    nums = [float(x) for x in re.findall(r"[\d.]+", css or "")][:3]
    if len(nums) < 3:
        return 1.0
    r, g, b = (n / 255 for n in nums)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b
