"""The web console at /ui, driven in Debian's headless chromium against a real uvicorn server.

Slow (tests/conftest.py's SLOW_PATHS). Needs `chromium` and `chromium-driver` (`.ci/run` installs
them); selenium is pointed at those binaries, so it never downloads a browser or a driver.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.auth import generate_key, hash_key
from service.console.router import CONTENT_SECURITY_POLICY
from service.main import create_app
from service.settings import ApiKeyEntry, Settings
from tests.helpers import LiveServer

os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must never fetch anything

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DATA = ROOT / "service" / "sample_data"
SCREENSHOT = ROOT / "docs" / "images" / "console.png"
HOSTILE = "<img src=x onerror=alert(1)>"
WIDTH, HEIGHT = 1280, 800


@pytest.fixture(scope="module")
def driver() -> Iterator[WebDriver]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={WIDTH},{HEIGHT}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture
def live(settings: Settings) -> Iterator[LiveServer]:
    with LiveServer(create_app(settings.model_copy(update={"embedded_worker": True}))) as server:
        yield server


def wait(driver: WebDriver, condition: Callable[[WebDriver], Any], timeout: float = 30) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def text_of(driver: WebDriver, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def open_console(driver: WebDriver, url: str) -> None:
    driver.get_log("browser")  # drop what earlier tests left
    driver.get(f"{url}/ui")
    wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")


def upload(driver: WebDriver, path: Path, name: str, key: str = "State") -> None:
    driver.find_element(By.ID, "upload-file").send_keys(str(path))
    driver.find_element(By.ID, "upload-name").send_keys(name)
    driver.find_element(By.ID, "upload-key").send_keys(key)
    driver.find_element(By.ID, "upload-submit").click()
    wait(driver, lambda d: any(row[0] == name for row in dataset_rows(d)))


def table(driver: WebDriver, selector: str) -> list[list[str]]:
    """The cells' text of the rows matching ``selector``, read in one script (the page may re-render)."""
    script = "return [...document.querySelectorAll(arguments[0])].map(r => [...r.cells].map(c => c.textContent))"
    return list(driver.execute_script(script, selector))


def dataset_rows(driver: WebDriver) -> list[list[str]]:
    return table(driver, "#datasets-table tbody tr")


def keep_columns(driver: WebDriver) -> list[str]:
    return list(driver.execute_script("return [...document.querySelectorAll('#derive-keep input')].map(i => i.value)"))


def severe_console_messages(driver: WebDriver) -> list[str]:
    """Errors in the browser console (a CSP violation is one), except the API's own refusals."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and "the server responded with a status of" not in entry["message"]
    ]


def no_horizontal_scroll(driver: WebDriver) -> None:
    assert driver.execute_script("return window.innerWidth") <= WIDTH
    assert driver.execute_script("return document.documentElement.scrollWidth") <= WIDTH


def test_the_workshop_through_the_console(driver: WebDriver, live: LiveServer, tmp_path: Path) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    open_console(driver, live.url)
    assert text_of(driver, "key-status") == "no key set"

    # Step 5: both tables, keyed by State.
    upload(driver, SAMPLE_DATA / "crimes.csv", "crimes")
    upload(driver, SAMPLE_DATA / "densities.csv", "densities")
    rows = {row[0]: row[3] for row in dataset_rows(driver)}
    assert "DensityPerMile (float64)" in rows["densities"] and "Assault (int64)" in rows["crimes"]
    driver.save_screenshot(str(shots / "1-datasets.png"))

    # Steps 6-8: join, scale density to [-1, 1], keep the five features.
    Select(driver.find_element(By.ID, "derive-base")).select_by_visible_text("crimes (50 rows)")
    Select(driver.find_element(By.ID, "derive-other")).select_by_visible_text("densities (50 rows)")
    Select(driver.find_element(By.ID, "derive-scale")).select_by_visible_text("DensityPerMile")
    keep = keep_columns(driver)
    assert keep == ["Murder", "Assault", "UrbanPop", "Rape", "DensityPerMile"]
    name = driver.find_element(By.ID, "derive-name")
    name.clear()
    name.send_keys("workshop")
    driver.find_element(By.ID, "derive-submit").click()
    wait(driver, lambda d: any(row[0] == "workshop" for row in dataset_rows(d)))
    assert Select(driver.find_element(By.ID, "train-dataset")).first_selected_option.text == "workshop (50 rows)"
    derived = httpx.get(f"{live.url}/datasets?name=workshop").json()["items"][0]
    assert [c["name"] for c in derived["columns"]] == ["State", *keep]

    # Train k = 10 and follow the job's event stream to Completed.
    k = driver.find_element(By.ID, "train-k")
    k.clear()
    k.send_keys("10")
    driver.find_element(By.ID, "train-submit").click()
    status = driver.find_element(By.ID, "train-status")
    wait(driver, lambda d: status.get_attribute("data-status") in ("Completed", "Failed"), timeout=60)
    assert status.get_attribute("data-status") == "Completed", status.text
    assert driver.find_element(By.ID, "train-progress").get_attribute("value") == "100"
    assert "Completed" in status.text and "100%" in status.text
    wait(driver, lambda d: "train:msd" in d.find_element(By.ID, "model-metrics").text)
    metrics = text_of(driver, "model-metrics")
    assert "k 10" in metrics and "DensityPerMile" in metrics
    model_id = Select(driver.find_element(By.ID, "model-select")).first_selected_option.get_attribute("value")
    recipe = httpx.get(f"{live.url}/models/{model_id}").json()["recipe"]
    assert recipe["steps"][1]["params"] == {"DensityPerMile": {"min": 0.6, "max": 975.0}}

    # A plot, fetched with fetch() and shown from a blob: URL.
    Select(driver.find_element(By.ID, "plot-kind")).select_by_value("states")
    driver.find_element(By.ID, "show-plot").click()
    plot = driver.find_element(By.ID, "plot")
    wait(
        driver,
        lambda d: (plot.get_attribute("src") or "").startswith("blob:") and plot.get_property("naturalWidth") > 0,
    )
    driver.save_screenshot(str(shots / "2-model.png"))

    # Deploy, wait for InService, predict one row typed by hand.
    driver.find_element(By.ID, "deploy-submit").click()
    endpoint = driver.find_element(By.ID, "endpoint-status")
    wait(driver, lambda d: endpoint.get_attribute("data-status") in ("InService", "Failed"))
    assert endpoint.get_attribute("data-status") == "InService", endpoint.text
    driver.find_element(By.ID, "invoke-row").send_keys("13.2,236,58,21.2,-0.855")
    driver.find_element(By.ID, "invoke-submit").click()
    result = driver.find_element(By.ID, "invoke-result")
    wait(driver, lambda d: result.get_attribute("data-cluster"))
    assert 0 <= float(result.get_attribute("data-cluster")) < 10 and result.text.startswith("cluster ")

    # Assignments: 50 states, counts summing to 50, sortable.
    driver.find_element(By.ID, "load-assignments").click()
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#assignments-table tbody tr")) == 50)
    counts = [[int(cell) for cell in row] for row in table(driver, "#cluster-counts tbody tr")]
    assert sum(count for _, count in counts) == 50 and all(0 <= cluster < 10 for cluster, _ in counts)

    def column(index: int) -> list[str]:
        return [row[index - 1] for row in table(driver, "#assignments-table tbody tr")]

    clusters = [int(value) for value in column(2)]
    assert clusters == sorted(clusters)  # by cluster at first
    driver.find_element(By.CSS_SELECTOR, "button[data-sort=key]").click()
    assert column(1) == sorted(column(1)) and column(1)[0] == "Alabama"
    driver.find_element(By.CSS_SELECTOR, "button[data-sort=key]").click()
    assert column(1)[0] == "Wyoming"
    driver.find_element(By.CSS_SELECTOR, "button[data-sort=distance]").click()
    distances = [float(value) for value in column(3)]
    assert distances == sorted(distances)
    assignments = httpx.get(f"{live.url}/models/{model_id}/assignments").json()
    assert {str(c): n for c, n in counts} == assignments["counts"]

    driver.save_screenshot(str(shots / "3-assignments.png"))
    no_horizontal_scroll(driver)
    assert severe_console_messages(driver) == []
    if os.environ.get("CENTROID_UPDATE_SCREENSHOT") == "1":
        driver.execute_script("window.scrollTo(0, 0)")
        driver.set_window_size(WIDTH, 1400)
        try:
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(SCREENSHOT))
        finally:
            driver.set_window_size(WIDTH, HEIGHT)


def test_names_and_messages_from_users_and_server_show_as_text(driver: WebDriver, live: LiveServer) -> None:
    csv = f'State,"{HOSTILE}",<script>alert(2)</script>\nAlabama,1,2\nAlaska,3,4\n'
    created = httpx.post(
        f"{live.url}/datasets",
        files={"file": ("evil.csv", csv.encode())},
        data={"name": "<b>bold</b>", "key_column": "State"},
    )
    assert created.status_code == 201, created.text
    open_console(driver, live.url)
    wait(driver, lambda d: len(dataset_rows(d)) == 1)
    row = dataset_rows(driver)[0]
    assert row[0] == "<b>bold</b>"
    assert row[3] == f"State (string), {HOSTILE} (int64), <script>alert(2)</script> (int64)"
    assert driver.find_elements(By.CSS_SELECTOR, "main img:not(#plot), main b, main script") == []
    boxes = keep_columns(driver)
    assert boxes == [HOSTILE, "<script>alert(2)</script>"]
    assert HOSTILE in text_of(driver, "derive-keep")

    # An error message quoting what the user typed is text too.
    driver.find_element(By.ID, "upload-file").send_keys(str(SAMPLE_DATA / "crimes.csv"))
    driver.find_element(By.ID, "upload-name").send_keys("crimes")
    driver.find_element(By.ID, "upload-key").send_keys("<i>nope</i>")
    driver.find_element(By.ID, "upload-submit").click()
    message = driver.find_element(By.ID, "message")
    wait(driver, lambda d: message.get_attribute("class") == "error")
    assert "<i>nope</i>" in message.text and message.find_elements(By.CSS_SELECTOR, "*") == []
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 - reading it is the check
    assert severe_console_messages(driver) == []


def test_with_api_keys_the_key_stays_out_of_the_page_and_urls(driver: WebDriver, settings: Settings) -> None:
    key = generate_key()
    secured = settings.model_copy(
        update={"embedded_worker": True, "api_keys": [ApiKeyEntry(name="console", scope="admin", sha256=hash_key(key))]}
    )
    with LiveServer(create_app(secured)) as server:
        for path in ("/ui", "/ui/app.js", "/ui/app.css"):  # open, and under the strict policy
            response = httpx.get(f"{server.url}{path}")
            assert response.status_code == 200, path
            assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
        assert httpx.get(f"{server.url}/datasets").status_code == 401
        paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
        assert not [path for path in paths if path.startswith("/ui")]

        open_console(driver, server.url)
        message = driver.find_element(By.ID, "message")
        wait(driver, lambda d: "unauthorized" in message.text)  # the API's refusal, shown
        assert "enter an API key" in message.text
        field = driver.find_element(By.ID, "api-key")
        assert field.get_attribute("type") == "password"
        field.send_keys(key)
        driver.find_element(By.ID, "save-key").click()
        wait(driver, lambda d: message.text == "connected")
        assert text_of(driver, "key-status") == "a key is set for this tab"
        upload(driver, SAMPLE_DATA / "densities.csv", "densities")
        driver.find_element(By.ID, "refresh").click()
        wait(driver, lambda d: len(dataset_rows(d)) == 1)

        assert driver.execute_script("return sessionStorage.getItem('centroid.apiKey')") == key
        assert driver.execute_script("return localStorage.length") == 0
        assert driver.get_cookies() == []
        assert key not in driver.execute_script("return document.documentElement.outerHTML")
        assert driver.find_element(By.ID, "api-key").get_property("value") == ""
        urls = driver.execute_script("return performance.getEntries().map(e => e.name)")
        assert f"{server.url}/datasets" in urls and any("/datasets?limit=" in url for url in urls)
        assert not [url for url in urls if key in url or key[4:] in url]
        assert key not in driver.current_url

        # Forgetting the key: the next call is refused again.
        driver.find_element(By.ID, "forget-key").click()
        driver.find_element(By.ID, "refresh").click()
        wait(driver, lambda d: "unauthorized" in message.text)
        assert driver.execute_script("return sessionStorage.length") == 0
        no_horizontal_scroll(driver)
        assert severe_console_messages(driver) == []
