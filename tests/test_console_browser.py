"""The console in a real headless browser (Debian's chromium through its chromedriver, tests/support/browser.py)
against a real ``dicom-node serve`` that DCMTK's storescu sent a generated chest radiograph to.

One node and one browser for the module. The node runs no analysis worker (loading the models would cost ~10 s):
the test takes the received job the way a worker does, through the worker's own database calls (``db.queue.claim``,
``db.results.finish_job`` with a classifier finding and an SR routed to a destination), and fails that export the
way the exporter does (``db.exports.claim_due`` and ``schedule_retry`` with one attempt allowed), so the pages show
rows written by the same code a working node uses. The destination is not in the node's configuration, so its
running exporter leaves the export alone and the state the resend sets stays on the page. The login test serves the
console app of the same database in-process (its own uvicorn server on a thread), bound to the machine's own
non-loopback address (0.0.0.0 where it has none).
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from .support.browser import chromium
from .support.cxr_dicom import Film, write_film
from .support.data import DATA_DIR
from .support.dicom_tools import storescu
from .support.net import free_port
from .support.node import Node, open_db

RETIRED_DESTINATION = "retired-pacs"  # has an export row, not in the node's configuration
READER = "Dr Browser"
ADMIN_PASSWORD = "correct horse battery staple"
WAIT_SECONDS = 10.0


@dataclass
class Console:
    node: Node
    url: str
    film: Film


def wait_http(url: str, timeout: float = 20.0) -> None:
    """Until ``url`` answers at all (any status): the console starts beside the Storage SCP."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def own_address() -> tuple[str, str]:
    """(address to bind, address to browse): this machine's non-loopback IPv4 address, the one its default route
    uses (a UDP connect sends nothing); without one, every interface (0.0.0.0), browsed through 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.254", 9))
            address = str(sock.getsockname()[0])
        except OSError:
            address = ""
    if not address or address.startswith("127.") or address == "0.0.0.0":
        return "0.0.0.0", "127.0.0.1"
    return address, address


def act_as_worker(node: Node) -> tuple[int, int]:
    """Take the received job and record its finding and SR, then fail the SR's export for good: the worker's and
    the exporter's own database calls. Returns (job id, export id)."""
    from db.exports import claim_due, schedule_retry
    from db.findings import FindingValues
    from db.models import JobState
    from db.queue import claim
    from db.results import ResultFile, finish_job

    engine = open_db(node)
    try:
        job = claim(engine, "browser-test-worker", 60.0, 3)
        assert job is not None, "the received image queued no job"
        finding = FindingValues(model_name="pneumo-resnet34", model_version="test", model_sha256="0" * 64,
                                probability=0.83, present=True, threshold=0.5, category=2,
                                category_probabilities=(0.05, 0.12, 0.71, 0.12), analysis_seconds=0.25)
        sr = ResultFile(kind="sr", sop_instance_uid=f"{job.sop_instance_uid[:50]}.9.1",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                        series_instance_uid="1.2.826.0.1.3680043.10.1456.7",
                        transfer_syntax_uid="1.2.840.10008.1.2.1", archive_path="results/browser-test-sr.dcm",
                        size_bytes=1000, analysed=True, reason="analysed")
        assert finish_job(engine, job, JobState.DONE, None, None, [sr], {RETIRED_DESTINATION: ("sr",)},
                          finding=finding)
        (claimed,) = claim_due(engine, "browser-test-exporter", 60.0, 10, destinations=[RETIRED_DESTINATION])
        state = schedule_retry(engine, claimed.export_id, "browser-test-exporter", None,
                               "PACS@192.0.2.1:104 could not be reached (connection refused)", 30.0, 3600.0, 1)
        assert state is not None and state.value == "dead"
        return job.job_id, claimed.export_id
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator:  # type: ignore[type-arg]
    with chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def console(tmp_path_factory) -> Iterator[Console]:
    root = tmp_path_factory.mktemp("console-node")
    pngs = sorted((DATA_DIR / "cxr-lung-masks" / "images").glob("*.png"))
    if not pngs:
        pytest.fail(f"no lung-mask films under {DATA_DIR}: set PNEUMO_DATA_DIR to the shared data folder")
    film = write_film(pngs[0], root / "synthetic-chest.dcm", index=1, present=1, tag="syn")
    console_port = free_port()
    node = Node(root=root, port=free_port(), overrides={"console.enabled": "true", "console.port": str(console_port)})
    node.start()
    try:
        url = f"http://127.0.0.1:{console_port}"
        wait_http(url + "/health/live")
        sent = storescu(node.port, [film.path])
        assert sent.returncode == 0 and sent.statuses == [(str(film.path), "Success")], sent.output
        yield Console(node, url, film)
    finally:
        node.kill()


@pytest.fixture(scope="module")
def analysed(console) -> tuple[int, int]:
    """(job id, dead export id) once the received job has its finding and its SR's export is dead."""
    return act_as_worker(console.node)


def submit(driver, button) -> None:  # type: ignore[no-untyped-def]
    """Click a form's submit ``button`` and wait until the page it leads to (after the POST's redirect) replaced
    this one."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    page = driver.find_element(By.TAG_NAME, "html")
    button.click()

    def replaced(_driver) -> bool:  # type: ignore[no-untyped-def]
        try:
            page.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as exc:  # chromedriver answers this when the page goes away during the call
            if "does not belong to the document" in str(exc):
                return True
            raise
        return False

    WebDriverWait(driver, WAIT_SECONDS).until(replaced)


def counts(driver, table_id: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """A counts table of the overview as {state or "total": number}, as the browser shows it."""
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, f"table#{table_id} tbody tr")
    return {cells[0].text.strip(): cells[1].text.strip()
            for cells in (row.find_elements(By.CSS_SELECTOR, "td, th") for row in rows) if len(cells) == 2}


def test_overview_counts_the_image_storescu_sent(browser, console, request) -> None:
    browser.get(console.url + "/")
    assert "Overview" in browser.title or "console" in browser.title
    jobs = counts(browser, "job-counts")
    assert jobs["queued"] == "1" and jobs["total"] == "1", jobs
    # once a worker has analysed it (and its export failed for good) the same page says so
    request.getfixturevalue("analysed")
    browser.refresh()
    jobs, exports = counts(browser, "job-counts"), counts(browser, "export-counts")
    assert jobs["queued"] == "0" and jobs["done"] == "1" and jobs["total"] == "1", jobs
    assert exports["dead"] == "1" and exports["total"] == "1", exports


def test_resend_on_the_exports_page_puts_the_dead_export_back_to_pending(browser, console, analysed) -> None:
    from selenium.webdriver.common.by import By

    _job_id, export_id = analysed
    row_xpath = f"//table[@id='exports']//tr[td[1][normalize-space()='{export_id}']]"
    browser.get(console.url + "/exports")
    row = browser.find_element(By.XPATH, row_xpath)
    assert row.find_element(By.CSS_SELECTOR, ".state").text == "dead"
    submit(browser, row.find_element(By.XPATH, ".//button[normalize-space()='Resend']"))
    row = browser.find_element(By.XPATH, row_xpath)  # the page the POST redirected to
    assert row.find_element(By.CSS_SELECTOR, ".state").text == "pending"
    assert browser.current_url.startswith(console.url + "/exports")
    engine = open_db(console.node)
    try:
        from db.exports import list_exports

        (export,) = [e for e in list_exports(engine) if e.export_id == export_id]
        assert export.state == "pending" and export.attempts == 0
    finally:
        engine.dispose()


def test_feedback_form_records_the_readers_acceptance(browser, console, analysed) -> None:
    from selenium.webdriver.common.by import By
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from db.models import Label, LabelSource

    job_id, _export_id = analysed
    browser.get(f"{console.url}/jobs/{job_id}")
    assert "0.830" in browser.find_element(By.ID, "finding").text  # the finding the reader judges
    form = browser.find_element(By.ID, "feedback-form")
    form.find_element(By.ID, "reader").clear()
    form.find_element(By.ID, "reader").send_keys(READER)
    submit(browser, form.find_element(By.CSS_SELECTOR, "button[name=action][value=accept]"))
    labels = browser.find_element(By.ID, "labels").text  # the job page again, with the recorded label
    assert READER in labels and "present, category 2" in labels and "console" in labels, labels
    engine = open_db(console.node)
    try:
        with Session(engine) as session:
            rows = session.scalars(select(Label).where(Label.reader == READER)).all()
            assert [(r.source, r.present, r.category) for r in rows] == [(LabelSource.CONSOLE, True, 2)]
    finally:
        engine.dispose()


@pytest.fixture
def exposed_console(console) -> Iterator[str]:
    """The console app on the node's database and storage root, served in-process by its own server (uvicorn on
    a thread) bound to this machine's non-loopback address, with an admin password."""
    from db.engine import make_engine
    from dicom_node.archive import Archive
    from dicom_node.config import load_config
    from dicom_node.console.context import ConsoleContext
    from dicom_node.console.passwords import hash_password
    from dicom_node.console.server import ConsoleServer

    from .support.data import CONFIG

    (address, browsed), port = own_address(), free_port()
    config = load_config(CONFIG, {"storage.storage_root": str(console.node.storage_root),
                                  "console.bind_address": address, "console.port": str(port),
                                  "console.admin_password_hash": hash_password(ADMIN_PASSWORD)}, environ={})
    engine = make_engine(config.database.url)
    ctx = ConsoleContext(config, engine, Archive(config.storage.storage_root, 0))
    assert ctx.requires_login
    server = ConsoleServer(ctx)
    server.start()
    try:
        yield f"http://{browsed}:{port}"
    finally:
        server.stop()
        engine.dispose()


def test_console_bound_beyond_loopback_demands_the_admin_login(browser, console, exposed_console) -> None:
    from selenium.webdriver.common.by import By
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from db.models import Event

    browser.get(exposed_console + "/exports")
    assert browser.current_url.startswith(exposed_console + "/login?"), browser.current_url
    assert not browser.find_elements(By.ID, "exports")

    def log_in(password: str) -> None:
        browser.find_element(By.ID, "user").clear()
        browser.find_element(By.ID, "user").send_keys("admin")
        browser.find_element(By.ID, "password").send_keys(password)
        submit(browser, browser.find_element(By.CSS_SELECTOR, "form[action='/login'] button[type=submit]"))

    log_in("not the password")
    assert "wrong user name or password" in browser.find_element(By.CSS_SELECTOR, "[role=alert]").text
    assert urllib.parse.urlparse(browser.current_url).path == "/login"
    log_in(ADMIN_PASSWORD)
    assert browser.current_url == exposed_console + "/exports"  # back to the page it asked for
    assert browser.find_element(By.ID, "exports")
    assert browser.find_element(By.CSS_SELECTOR, "header .user").text == "admin"
    engine = open_db(console.node)
    try:
        with Session(engine) as session:
            kinds = [e.kind for e in session.scalars(select(Event).where(Event.kind.like("console_login%")))]
        assert kinds == ["console_login_failed", "console_login"], kinds
    finally:
        engine.dispose()
