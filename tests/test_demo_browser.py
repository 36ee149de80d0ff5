"""`python -m bot demo` in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright, doing what a
user does on the page: a mention in #general, `/newchat`, a turn in its thread, `/history` with its autocomplete,
its pages and its buttons, `/status` as the administrator. Every wait is on the page showing something."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from demo_process import RunningDemo, running_demo, world_of
from playwright.async_api import Browser, Locator, Page, async_playwright, expect

CHROMIUM = Path("/usr/bin/chromium")
# Playwright drives the system's Chromium as it is: no `playwright install`, nothing fetched at run time.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 90_000  # generous: two busy CPU cores answer, render and run the browser at once

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(), reason=f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)"
)


@pytest.fixture
async def demo(tiny_llama_dir: Path, tmp_path: Path) -> AsyncIterator[RunningDemo]:
    async with running_demo(tiny_llama_dir, tmp_path / "demo") as running:
        yield running


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


async def type_line(page: Page, text: str) -> None:
    box = page.locator("#message-input")
    await box.fill(text)
    await box.press("Enter")


def final_answer_to(page: Page, username: str) -> Locator:
    """The bot's reply to `username` in the open channel, once its final edit has dropped the streaming mark."""
    return page.locator(f'#messages .message[data-author="llama-bot"][data-reply-author="{username}"]:not(.streaming)')


async def test_a_user_talks_to_the_bot_in_the_browser(demo: RunningDemo, browser: Browser, tmp_path: Path) -> None:
    page = await browser.new_page(viewport={"width": 1280, "height": 860})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    expect.set_options(timeout=TIMEOUT_MS)
    try:
        await page.goto(demo.url)
        await expect(page.locator("#message-input")).to_be_enabled()  # the bot is online
        await expect(page.locator("#user-picker")).to_have_value(await alice_id(demo))
        await expect(page.locator("#channel-header")).to_contain_text("general")

        # A mention in #general: the answer arrives streaming (edited with the mark), then final.
        await type_line(page, "@llama-bot hello, who are you?")
        mine = page.locator('#messages .message[data-author="alice"]')
        await expect(mine.locator(".mention")).to_have_text("@llama-bot")
        answer = final_answer_to(page, "alice")
        await expect(answer).to_have_count(1)
        await expect(answer).to_have_attribute("data-streamed", "1")
        assert (await answer.locator(".content").inner_text()).strip()

        # /newchat opens a thread under #general; in it, no mention is needed.
        await type_line(page, "/newchat space llamas")
        thread = page.locator("#channel-list a.thread", has_text="space llamas")
        await expect(thread).to_be_visible()
        await expect(page.locator("#messages .message", has_text="Started a new chat")).to_be_visible()
        await thread.click()
        await expect(page.locator("#channel-header")).to_contain_text("space llamas")
        await expect(page.locator("#messages .message", has_text="New chat started by")).to_be_visible()
        await type_line(page, "tell me about llamas in space")
        await expect(final_answer_to(page, "alice")).to_have_count(1)

        # /history: autocomplete lists the session; its answer is ephemeral, shown to alice only.
        await page.locator("#message-input").fill("/history spa")
        choice = page.locator("#popup .popup-item.choices", has_text="space llamas")
        await expect(choice).to_be_visible()
        await choice.click()
        await expect(page.locator("#message-input")).to_have_value(re.compile(r"^/history session:\S+"))
        await page.locator("#message-input").press("Enter")
        transcript = page.locator("#messages .message.ephemeral", has_text="tell me about llamas in space")
        await expect(transcript).to_be_visible()
        await expect(transcript.locator(".ephemeral-note")).to_contain_text("Only you can see this")

        # Enough sessions for two pages: the buttons are drawn, and a click is a component interaction.
        await make_sessions(demo, count=10)
        await type_line(page, "/history")
        listing = page.locator("#messages .message.ephemeral", has_text="Your sessions here")
        await expect(listing).to_contain_text("page 1 of 2")
        await expect(listing).not_to_contain_text("space llamas")  # newest first: carol's ten fill page 1
        await listing.locator("button", has_text="Next").click()
        await expect(listing).to_contain_text("page 2 of 2")
        await expect(listing).to_contain_text("space llamas")

        # Bob does not see alice's ephemeral answers.
        await page.locator("#user-picker").select_option(label="Bob")
        await expect(page.locator("#messages .message.ephemeral")).to_have_count(0)
        await expect(page.locator("#messages .message", has_text="tell me about llamas in space").first).to_be_visible()

        # /status answers the administrator.
        await page.locator("#user-picker").select_option(label="Alice (admin)")
        await type_line(page, "/status")
        await expect(page.locator("#messages .message.ephemeral", has_text="Bot status")).to_be_visible()
        assert errors == [], errors
    except Exception as exc:
        await page.screenshot(path=tmp_path / "failure.png", full_page=True)  # in pytest's tmp dir, never the repo
        if errors:
            raise AssertionError(f"the page's script failed: {errors}") from exc
        raise


async def alice_id(demo: RunningDemo) -> str:
    _, people, _ = world_of(await demo.state())
    return str(people["alice"]["id"])


async def make_sessions(demo: RunningDemo, *, count: int) -> None:
    """Sessions made through the page's API: carol runs /reset in #random `count` times, each a new session
    (stored before the bot answers the interaction; /newchat has a per-person limit a minute)."""
    _, people, channels = world_of(await demo.state())
    body = {"user_id": people["carol"]["id"], "channel_id": channels["random"]["id"], "name": "reset"}
    for _ in range(count):
        answered = await demo.post("commands", body)
        assert answered["responded"]
