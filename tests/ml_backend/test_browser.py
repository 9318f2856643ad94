"""An annotator in a real browser (Debian's Chromium, driven by Playwright) sees the prelabel, changes it
with a hotkey, submits with Ctrl+Enter, and the annotation is stored."""

from __future__ import annotations

import os
import secrets
import shutil
import time

import pytest
import redis

from mlb_helpers import import_tasks, make_tasks, predictions_by_task, run_setup_project, setup_project

pytestmark = [pytest.mark.browser, pytest.mark.label_studio, pytest.mark.services]

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", "--disable-dev-shm-usage"]


def test_annotator_sees_prelabel_changes_it_with_a_hotkey_and_submits(stack, ls_client, label_studio, data_root,
                                                                      redis_url, chromium_path, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    tasks = make_tasks(data_root, "mlb-browser", [255])  # a bright marker: prelabel biopsy_tool + mag_view
    pid = setup_project(stack.env, "mlb browser")
    [task_id] = import_tasks(ls_client, pid, tasks)
    redis.Redis.from_url(redis_url).delete("predict")
    ls_client.actions.create(id="retrieve_tasks_predictions", project=pid, selected_items={"all": True, "excluded": []})
    [prediction] = predictions_by_task(ls_client, pid, stack.version.name)[task_id]
    assert prediction.result[0]["value"]["choices"] == ["biopsy_tool", "mag_view"]
    run_setup_project(stack.env, "mlb browser")  # now the project's model_version can be the prediction's

    # A new annotator joins through the organization's invite link (the API cannot set passwords).
    password = secrets.token_urlsafe(12)
    email = f"mlb-annotator-{secrets.token_hex(3)}@annotators.mammoflag.test"
    invite = ls_client.organizations.invites.get_invite_link().invite_url

    shots = tmp_path / "shots"
    shots.mkdir()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_FLAGS)
        try:
            signup = browser.new_page()
            signup.set_default_timeout(60_000)
            signup.goto(label_studio.url + invite)
            signup.fill("#email", email)
            signup.fill("#password", password)
            signup.click("button[type=submit]")
            signup.wait_for_url(lambda url: "/user/signup" not in url)
            signup.context.close()

            page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{label_studio.url}/user/login/")
            page.fill("#email", email)
            page.fill("#password", password)
            page.click("button[type=submit]")
            page.wait_for_url(lambda url: "/user/login" not in url)

            # "Label All Tasks": the labeling stream asks /next for the task
            page.goto(f"{label_studio.url}/projects/{pid}/data?labeling=1")
            biopsy = page.get_by_role("checkbox", name="biopsy_tool")
            mag = page.get_by_role("checkbox", name="mag_view")
            neither = page.get_by_role("checkbox", name="neither")
            expect(biopsy).to_be_checked()  # the prelabel is shown
            expect(mag).to_be_checked()
            expect(neither).not_to_be_checked()
            page.locator("img").first.wait_for(state="visible")
            page.screenshot(path=str(shots / "1-prelabel.png"))

            page.get_by_text("Study s000").click()  # focus the labeling page (not an input, not the menu)
            page.keyboard.press("1")  # hotkey of biopsy_tool: the annotator disagrees with the model
            expect(biopsy).not_to_be_checked()
            expect(mag).to_be_checked()
            page.screenshot(path=str(shots / "2-changed.png"))
            page.keyboard.press("Control+Enter")  # submit

            deadline = time.monotonic() + 30
            annotations = []
            while time.monotonic() < deadline and not annotations:
                annotations = ls_client.annotations.list(task_id)
                time.sleep(0.5)
            page.screenshot(path=str(shots / "3-submitted.png"))
        except Exception:
            page.screenshot(path=str(shots / "failure.png"))
            raise
        finally:
            browser.close()
            if os.environ.get("MAMMOFLAG_TEST_SHOTS"):  # keep the screenshots to look at them
                shutil.copytree(shots, os.environ["MAMMOFLAG_TEST_SHOTS"], dirs_exist_ok=True)

    assert len(annotations) == 1, "the submitted annotation was not stored"
    stored = annotations[0]
    [annotator] = [u for u in ls_client.users.list() if u.email == email]
    assert stored.completed_by == annotator.id
    assert stored.result[0]["value"]["choices"] == ["mag_view"]
    assert stored.result[0]["from_name"] == "findings" and stored.result[0]["to_name"] == "image"
