"""End to end in headless Chromium (Debian's, at /usr/bin/chromium; `make test` installs it): type a
prompt, run the race, step the replay, and check the tree and both replies are on the page."""

import re
from pathlib import Path

import pytest

from .ui_server import ROOT, running_app

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
SCREENSHOT = ROOT / "out" / "ui-browser-test.png"


@pytest.fixture(scope="module")
def page(tiny_dir, tiny_base, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "install Debian's chromium (make test does: apt-get install -y chromium)"
    with running_app(tiny_dir, tiny_base, tmp_path_factory.mktemp("app")) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(60_000)
        page.goto(url)
        yield page
        browser.close()


def step_label(page) -> int:
    return int(re.search(r"Step (\d+) of", page.locator("text=/Step \\d+ of \\d+/").first.inner_text()).group(1))


def test_race_replay_and_tree_in_a_browser(page):
    page.get_by_text("Model:").wait_for()  # the model finished loading in the background
    page.get_by_label("Prompt", exact=True).fill("w3 w4 w5 w6")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Run finished").wait_for()
    plain = page.locator(".ss-reply").nth(0).inner_text()
    specstream = page.locator(".ss-reply").nth(1).inner_text()
    assert plain.strip() and plain == specstream
    assert page.get_by_text("Identical replies (64 tokens)").is_visible()
    assert page.locator(".ss-bonus").count() > 0

    shown = step_label(page)
    page.get_by_role("button", name="Next ▶").click()
    page.get_by_text(f"Step {shown + 1} of").wait_for()
    tree = page.locator(".js-plotly-plot").first
    title = tree.get_by_text(f"Step {shown + 1}:")
    title.wait_for()
    assert tree.locator(".legendtext", has_text=re.compile("^accepted$")).count() == 1
    drafted = int(re.search(r": (\d+) drafted", title.text_content()).group(1))
    assert tree.locator(".scatterlayer .point").count() == drafted + 1  # every drafted node and the root

    page.locator(".ss-token[data-step='2']").first.click()  # a token selects the step that made it
    page.get_by_text("Step 2 of").wait_for()
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_an_empty_prompt_gives_one_message_and_leaves_the_last_run_alone(page):
    """Bad input is checked in an event of its own: a toast, not an error badge on every output."""
    page.get_by_text("Run finished").wait_for()  # after the race above
    reply = page.locator(".ss-reply").nth(1).inner_text()
    page.get_by_label("Prompt", exact=True).fill("   ")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Please type a prompt first").wait_for()
    page.wait_for_timeout(500)
    assert page.get_by_text("Error", exact=True).count() <= 1  # the toast's title, no badges
    assert page.locator(".ss-reply").nth(1).inner_text() == reply
