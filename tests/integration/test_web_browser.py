"""A real browser on the dashboard: Debian's chromium, headless, driven by
Selenium through Debian's chromedriver (Selenium Manager is never asked to
download anything). Mail goes through a real Postfix into a real ``mxguard
serve``; the browser logs in, opens the overview, finds the message in the
history, opens its detail page, clicks learn-as-spam, and the Bayes store (read
by the real ``mxguard bayes stats``) has counted it. The screenshots in docs/
are taken here."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.support.daemon import MxguardProcess

from mxguard.testing.dns import DNSServer
from mxguard.testing.postfix import PostfixInstance, milter_wiring
from mxguard.testing.sink import Sink
from mxguard.testing.smtp import Transcript, send
from mxguard.web.auth import hash_password

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# The screenshots go to docs/ when MXGUARD_SCREENSHOTS=docs (how the ones in the repository
# were taken: `MXGUARD_SCREENSHOTS=docs pytest tests/integration/test_web_browser.py`), else
# into the test's temporary directory, so a test run leaves the checkout as it was.
DOCS = Path(__file__).resolve().parents[2] / "docs"
OUTSIDE = "127.1.0.5"
PASSWORD = "browser-pass-1234"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def require_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if not missing:
        return
    problem = f"{', '.join(missing)} missing (apt-get install chromium chromium-driver)"
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"CI must run the browser test, but {problem}", pytrace=False)
    pytest.skip(problem)


def message(subject: str, body: str) -> bytes:
    return (f"From: Alice <alice@sender.test>\r\nTo: bob@example.test\r\nSubject: {subject}"
            f"\r\nMessage-ID: <{subject.replace(' ', '-')}@sender.test>\r\n"
            f"Date: Thu, 03 Dec 2026 10:00:00 +0000\r\n\r\n{body}\r\n").encode()


def deliver(pf: PostfixInstance, data: bytes, sender: str = "alice@sender.test") -> Transcript:
    return send(pf.smtp_port, helo="mail.sender.test", mail_from=sender,
                rcpts=["bob@example.test"], data=data, source_ip=OUTSIDE)


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    zone = {"mail.sender.test": [("A", "192.0.2.10")],
            "sender.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")]}
    with DNSServer(zone) as srv:
        yield srv


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Any]:
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors, CSP
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-sync",
                f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(arg)
    # a driver path given: Selenium skips Selenium Manager (no download, no lookup)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "driver.log"))
    drv = webdriver.Chrome(service=service, options=opts)
    drv.set_page_load_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()


def bayes_stats(config: Path) -> dict[str, str]:
    done = subprocess.run([sys.executable, "-m", "mxguard", "bayes", "stats", "--config",
                           str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return dict(line.split("\t", 1) for line in done.stdout.splitlines())


def screenshot(drv: Any, name: str, where: Path | None = None) -> None:
    """The whole page as NAME in docs/ or ``where`` (the window is made as tall as the page)."""
    height = int(drv.execute_script("return document.documentElement.scrollHeight"))
    drv.set_window_size(1400, max(800, min(height + 40, 4000)))
    time.sleep(0.3)  # the resize relayouts the chart
    out = DOCS if os.environ.get("MXGUARD_SCREENSHOTS") == "docs" or where is None else where
    out.mkdir(exist_ok=True)
    assert drv.save_screenshot(str(out / name))
    assert (out / name).stat().st_size > 10000  # a page, not an empty frame


def test_browser_login_history_learn(tmp_path: Path, dns: DNSServer, sink: Sink, driver: Any,
                                     postfix_factory: Callable[..., PostfixInstance]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    mx = MxguardProcess(tmp_path, (
        f'[server]\nstate_dir = "{tmp_path}/state"\n'
        f'[dns]\nnameservers = ["{dns.address}"]\ntimeout = 2\n'
        "[helo]\nexempt_networks = []\n"
        "[dkim]\ninternal_hosts = []\n"
        "[history]\nflush_interval = 0.1\n"
        "[bayes]\nautolearn = false\n"  # the one count below comes from the button
        f'[web]\npassword_hash = "{hash_password(PASSWORD)}"\nkeep_messages = 20\n'))
    mx.start()
    try:
        pf = postfix_factory(milter_wiring(mx.milter_port))
        for i, subject in enumerate(("Team lunch on Friday", "Quarterly report draft",
                                     "Re: invoice 2211")):
            assert deliver(pf, message(subject, f"Hello Bob, note {i}.")).accepted
        spam = deliver(pf, message("You have won", GTUBE), sender="winner@sender.test")
        assert spam.end_of_data is not None and spam.end_of_data.code == 550
        target = deliver(pf, message("Cheap watches for you", "Buy cheap watches today."))
        assert target.accepted and target.queue_id
        wait = WebDriverWait(driver, 20)
        base = f"http://127.0.0.1:{mx.web_port}"

        # log in (the overview sends us to the login form first)
        driver.get(base + "/")
        wait.until(ec.presence_of_element_located((By.ID, "password")))
        assert "/login" in driver.current_url
        driver.find_element(By.ID, "user").send_keys("admin")
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.ID, "login").click()
        wait.until(ec.presence_of_element_located((By.ID, "timeline")))
        assert driver.find_element(By.TAG_NAME, "h1").text == "Overview"

        # the overview shows the mail once the history has it (live refresh or reload)
        deadline = time.monotonic() + 20
        while "GTUBE" not in driver.find_element(By.ID, "top-symbols").text:
            assert time.monotonic() < deadline, driver.page_source
            time.sleep(0.5)
            driver.refresh()
        assert "winner@sender.test" in driver.find_element(By.ID, "top-senders").text
        drawn = driver.execute_script(
            "var c = document.getElementById('timeline');"
            "return !!(window.Chart && Chart.getChart(c));")
        assert drawn, "the chart was not drawn"
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors  # no script error, no Content-Security-Policy refusal
        driver.get(base + "/?hours=1")  # the last hour: the test's mail fills the chart
        wait.until(ec.presence_of_element_located((By.ID, "timeline")))
        screenshot(driver, "dashboard-overview.png", tmp_path)

        # find the message in the history, open it
        driver.find_element(By.LINK_TEXT, "History").click()
        box = wait.until(ec.presence_of_element_located((By.NAME, "queue_id")))
        box.send_keys(target.queue_id)
        unfiltered = driver.find_element(By.TAG_NAME, "body")  # lists the target too
        driver.find_element(By.ID, "search").click()
        wait.until(ec.staleness_of(unfiltered))  # the filtered page has replaced it
        wait.until(ec.url_contains("queue_id="))
        link = wait.until(ec.element_to_be_clickable((By.LINK_TEXT, target.queue_id)))
        rows = driver.find_elements(By.CSS_SELECTOR, "#records tbody tr")
        assert len(rows) == 1 and "Cheap watches for you" in rows[0].text
        link.click()
        wait.until(ec.presence_of_element_located((By.ID, "learn-spam")))
        assert target.queue_id in driver.find_element(By.TAG_NAME, "h1").text
        assert "Cheap watches for you" in driver.find_element(By.ID, "subject").text
        assert driver.find_elements(By.CSS_SELECTOR, "#symbols tbody tr")

        # learn as spam: the page says so and the Bayes store counted it
        assert bayes_stats(mx.config)["nspam"] == "0"  # control
        driver.find_element(By.ID, "learn-spam").click()
        done = wait.until(ec.presence_of_element_located((By.ID, "done")))
        assert done.text == "learned as spam"
        stats = bayes_stats(mx.config)
        assert (stats["nspam"], stats["nham"]) == ("1", "0")
        assert "1 spam, 0 ham" in driver.find_element(By.ID, "bayes-counts").text
        screenshot(driver, "dashboard-message.png", tmp_path)
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []

        # log out: the dashboard asks for the login again
        driver.find_element(By.ID, "logout").click()
        wait.until(ec.presence_of_element_located((By.ID, "password")))
        driver.get(base + "/history")
        assert "/login" in driver.current_url
    finally:
        assert mx.stop() == 0
