#!/usr/bin/env python3
"""A clerk at the reception page, in Debian's chromium driven headless by Playwright.

Usage: web_browser.py BASE_URL USER PASSWORD TOKEN MISTYPED_TOKEN MISTYPED_GROUP ARTIFACTS

Logs in, types MISTYPED_TOKEN key by key and Enter as a USB QR scanner does and checks
that the page names group MISTYPED_GROUP and stays on the form (nothing queued), then
types TOKEN the same way and follows the job page until the import is done (its progress
arrives as server-sent events); looks at the jobs and sent pages, re-prints the slip,
extends the token by 30 days (the new expiry shown) and revokes it after its
confirmation page (the row then says revoked, with no action); logs out, and fails the
login three times so that the right password is refused too. Saves a screenshot of
each page into ARTIFACTS and prints one line per step it saw succeed.
"""

import os
import re
import sys

from playwright.sync_api import expect, sync_playwright

ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def main():
    base, user, password, token, mistyped, group, artifacts = sys.argv[1:8]
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")

    def shot(page, name):
        page.screenshot(path=os.path.join(artifacts, name + ".png"), full_page=True)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=ARGS)
        context = browser.new_context(locale="ja-JP", viewport={"width": 1100, "height": 760})
        page = context.new_page()
        external = []
        page.on(
            "request",
            lambda r: external.append(r.url) if not r.url.startswith(base) else None,
        )
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        # Refused logins (401, 429) are logged by the browser as failed loads: expected.
        page.on(
            "console",
            lambda m: errors.append(m.text)
            if m.type == "error" and "Failed to load resource" not in m.text
            else None,
        )

        page.goto(base + "/login")
        expect(page.locator("#user")).to_be_focused()
        shot(page, "login")
        page.keyboard.type(user)
        page.keyboard.press("Tab")
        page.keyboard.type(password)
        page.keyboard.press("Enter")
        page.wait_for_url(base + "/receive")
        print("logged in")

        field = page.locator("#token")
        expect(field).to_be_focused()
        shot(page, "receive")
        # A scanner types fast, then Enter.
        page.keyboard.type(mistyped, delay=8)
        page.keyboard.press("Enter")
        check = page.locator("#token-check")
        expect(check).to_have_class(re.compile(r"\bbad\b"), timeout=10_000)
        expect(check).to_contain_text(group)
        expect(field).to_have_attribute("aria-invalid", "true")
        page.wait_for_timeout(500)
        assert page.url == base + "/receive", page.url
        shot(page, "mistyped")
        print("mistyped group named before queueing: " + check.inner_text())

        # The field's text is selected after a refusal: the next scan replaces it.
        expect(field).to_be_focused()
        page.keyboard.type(token, delay=8)
        page.keyboard.press("Enter")
        page.wait_for_url(re.compile(re.escape(base) + r"/receive/R[0-9a-f]{12}$"))
        job = page.locator("#job")
        expect(job).to_have_attribute("data-state", "done", timeout=120_000)
        expect(page.locator("#job-count")).to_contain_text("/")
        expect(page.locator("#job-study")).to_contain_text("P1")
        shot(page, "job")
        print("import finished: " + page.locator("#job-count").inner_text())

        page.goto(base + "/jobs?lang=en")
        expect(page.locator("h1")).to_have_text("Failed and held jobs")
        shot(page, "jobs")
        print("jobs page: " + str(page.locator("tbody tr").count()) + " job(s)")
        # An inbound job that failed for good cannot run again: the page says what to do.
        page.get_by_role("button", name=re.compile("^Retry")).first.click()
        page.wait_for_load_state()
        refusal = page.locator("p.notice.error")
        expect(refusal).to_contain_text("failed for good")
        print("retry answered: " + refusal.inner_text())

        # The repository's answer is reused for 10 s: the download and the receipt of the
        # import above show within that.
        page.goto(base + "/sent")
        expect(page.locator("h1")).to_have_text("Issued tokens")
        expect(page.locator("table.sent tbody tr")).to_have_count(1)
        for _ in range(30):
            if page.locator("ul.receipts").count() > 0:
                break
            page.wait_for_timeout(500)
            page.goto(base + "/sent")
        expect(page.locator("ul.receipts")).to_contain_text("imported")
        print("sent page: " + page.locator("ul.receipts").inner_text())
        slip = page.locator("td.actions a.reprint").get_attribute("href")
        answer = page.goto(base + slip)
        assert answer.status == 200, answer.status
        policy = answer.headers["content-security-policy"]
        assert policy.startswith("default-src 'none'"), policy
        assert "HT2-" in page.content()
        print("slip re-printed: " + slip)

        # Extend by days, with the keyboard: the field has the focus, Enter sends.
        page.goto(base + "/sent")
        page.get_by_role("link", name=re.compile("^Extend ")).click()
        expect(page.locator("#days")).to_be_focused()
        before = page.locator("#expiry").inner_text()
        shot(page, "sent-extend")
        page.keyboard.type("30")
        page.keyboard.press("Enter")
        page.wait_for_url(re.compile(re.escape(base) + r"/sent\?extended="))
        notice = page.locator("div.notice[role=status]")
        expect(notice).to_contain_text("is now valid until")
        expect(notice.get_by_role("link", name="Print the new slip")).to_be_visible()
        expiry = page.locator("table.sent td.expiry").first.inner_text()
        assert expiry != before, (expiry, before)
        shot(page, "sent")
        print("extended: " + expiry + " (was " + before + ")")

        # Revoke: the confirmation page, then the red button.
        page.get_by_role("link", name=re.compile("^Revoke ")).click()
        expect(page.locator("h1")).to_contain_text("Revoke the token of job")
        # Cancel has the focus: a stray Enter (a scanner's) revokes nothing.
        expect(page.get_by_role("link", name="Cancel (back to the list)")).to_be_focused()
        button = page.get_by_role("button", name="Revoke this token")
        shot(page, "sent-revoke")
        button.click()
        page.wait_for_url(re.compile(re.escape(base) + r"/sent\?revoked="))
        expect(page.locator("p.notice[role=status]")).to_contain_text(
            "the repository refuses every later download"
        )
        expect(page.locator("table.sent strong.revoked")).to_contain_text("revoked")
        expect(page.locator("td.actions a")).to_have_count(0)
        shot(page, "sent-revoked")
        print("revoked: " + page.locator("table.sent strong.revoked").inner_text())

        # A form posted from the logged-in page without its CSRF token (as a forged
        # form would be, cookies and all): refused before anything is read.
        status = page.evaluate(
            """async () => {
                const answer = await fetch('/receive', {
                    method: 'POST',
                    headers: {'Content-Type': 'application/x-www-form-urlencoded'},
                    body: 'patient_id=&token=' + encodeURIComponent(document.title),
                });
                return answer.status;
            }"""
        )
        assert status == 403, status
        print("post without csrf: %d" % status)

        page.goto(base + "/receive?lang=ja")
        page.get_by_role("button", name="ログアウト").click()
        page.wait_for_url(re.compile(re.escape(base) + r"/login"))
        print("logged out")

        for _ in range(3):
            page.fill("#user", user)
            page.fill("#password", "not the password")
            page.keyboard.press("Enter")
            page.wait_for_load_state()
        page.fill("#user", user)
        page.fill("#password", password)
        page.keyboard.press("Enter")
        page.wait_for_load_state()
        alert = page.locator("#login-error")
        expect(alert).to_contain_text("正しいパスワードでも同じです")
        assert "/login" in page.url, page.url
        shot(page, "locked")
        print("locked out: " + alert.inner_text())

        assert not external, "requests outside the page: %r" % external
        assert not errors, "script errors: %r" % errors
        browser.close()


if __name__ == "__main__":
    main()
