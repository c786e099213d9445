"""The worklist page in headless Chromium: sign in, priority order, a new urgent result appears live, detail view."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from cxr_triage.labels import COVID19, DEMO_DISCLAIMER, NO_FINDING, PNEUMONIA
from cxr_triage.settings import Settings
from db.migrate import upgrade
from db.session import session_scope
from tests.conftest import ROOT, free_port, wait_for_port
from tests.test_worklist_api import (
    add_study,
    fast_password_hashes,  # noqa: F401 (autouse: scrypt at a test cost here too)
    make_settings,
)
from worklist.app import create_app
from worklist.auth import create_user

ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@contextmanager
def serving(settings: Settings) -> Iterator[str]:
    """The app for `settings` served by uvicorn on a free port, in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(port, timeout=30)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def served(pg_url: str, tmp_path: Path) -> Iterator[tuple[str, Settings]]:
    upgrade(pg_url)
    settings = make_settings(pg_url, tmp_path / "var")
    with serving(settings) as base:
        yield base, settings


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    if not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists():
        pytest.fail("chromium and chromium-driver are required (scripts/setup.sh --with-services installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1400,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _row_uids(driver: WebDriver) -> list[str]:
    uids: list[str] = driver.execute_script(
        "return Array.from(document.querySelectorAll('#rows tr'), (r) => r.dataset.uid);"
    )
    return uids


def _badges(driver: WebDriver) -> list[str]:
    texts: list[str] = driver.execute_script(
        "return Array.from(document.querySelectorAll('#rows .prio'), (b) => b.innerText);"
    )
    return texts


@pytest.mark.timeout(60)
def test_radiologist_signs_in_sees_priority_order_and_a_new_urgent_result_live(
    served: tuple[str, Settings], browser: WebDriver
) -> None:
    base, settings = served
    with session_scope(settings.effective_database_url) as session:
        create_user(session, "radiologist", "reading room 4")
    normal = {COVID19: 0.02, PNEUMONIA: 0.03, NO_FINDING: 0.95}
    routine = add_study(settings, probabilities=normal, age_s=1800, patient_name="Routine^Rita")
    unsure = add_study(
        settings, probabilities={COVID19: 0.3, PNEUMONIA: 0.3, NO_FINDING: 0.4}, age_s=900, patient_name="Maybe^Max"
    )
    high = add_study(settings, probabilities=normal, requested_priority="HIGH", age_s=300, patient_name="High^Hana")
    wait = WebDriverWait(browser, 15)

    browser.get(base + "/")
    assert "Routine" not in browser.page_source, "no patient data before signing in"
    browser.find_element(By.ID, "username").send_keys("radiologist")
    browser.find_element(By.ID, "password").send_keys("reading room 4", Keys.ENTER)
    wait.until(lambda d: len(_row_uids(d)) == 3)
    assert _row_uids(browser) == [high, unsure, routine]
    badges = _badges(browser)
    assert badges[0] == "HIGH" and badges[1].startswith("INDETERMINATE") and badges[2] == "ROUTINE"
    assert browser.find_element(By.ID, "disclaimer").text == DEMO_DISCLAIMER
    browser.execute_script("window.__sameDocument = true;")

    urgent = add_study(
        settings, probabilities={COVID19: 0.93, PNEUMONIA: 0.04, NO_FINDING: 0.03}, patient_name="Urgent^Una"
    )
    started = time.monotonic()
    wait.until(lambda d: _row_uids(d)[:1] == [urgent])
    assert time.monotonic() - started < 10
    assert browser.execute_script("return window.__sameDocument === true;"), "updated without a reload"
    assert _row_uids(browser) == [urgent, high, unsure, routine]
    assert _badges(browser)[0] == "STAT"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "worklist.png"))

    # keyboard only: j moves to the first study, Enter opens it
    ActionChains(browser).send_keys("j").perform()
    assert browser.execute_script("return document.activeElement.textContent;") == "Urgent, Una"
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    wait.until(lambda d: d.current_url.endswith(f"/studies/{urgent}"))
    page = browser.find_element(By.ID, "study").text
    assert "Urgent, Una" in page and "STAT" in page and "stat-covid-19" in page and "COVID-19 0.93 >= 0.50" in page
    assert DEMO_DISCLAIMER in browser.find_element(By.TAG_NAME, "main").text
    browser.find_element(By.ID, "toggle-read").click()
    wait.until(lambda d: d.find_element(By.ID, "read-state").text == "read by radiologist")
    browser.save_screenshot(str(ARTIFACTS / "worklist-detail.png"))
    assert (ARTIFACTS / "worklist.png").stat().st_size > 10_000
