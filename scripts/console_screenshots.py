"""Regenerate docs/figures/console-*.png: the console's main pages on a real node with real analyses.

    .venv/bin/python scripts/console_screenshots.py [--out docs/figures] [--keep DIR]

Starts a ``dicom-node serve`` (one analysis worker, the bundled models) in a temporary folder, with two export
destinations: DCMTK's storescp as a working PACS and a closed port (one attempt allowed, so its exports are dead).
DCMTK's storescu sends generated CR files made from the public lung-mask films (tests/support/cxr_dicom.py): their
patient names, IDs and birth dates are synthetic ("Rehearsal^Patient00001"), and no page is shot logged in, so no
patient data is on any screenshot. Two readers' reads are recorded through ``db.feedback`` so the disagreements page
has rows. Then Debian's chromium (tests/support/browser.py) shoots each page 1280 px wide; each PNG is reduced to a
256-colour palette when that keeps it under ``--max-kb``. About a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.browser import chromium, full_page_png  # noqa: E402
from tests.support.cxr_dicom import Film, write_film  # noqa: E402
from tests.support.data import DATA_DIR  # noqa: E402
from tests.support.dicom_tools import storescu  # noqa: E402
from tests.support.net import free_port  # noqa: E402
from tests.support.node import Node, open_db  # noqa: E402

FILMS_PER_CLASS = 4
PAGES = ("overview", "jobs", "job", "exports", "destinations", "associations", "models", "statistics", "disagreements",
         "audit", "login")


def films(out: Path) -> list[Film]:
    """Normal and tuberculosis films (the public labels' classes), alternating, as synthetic patients' CR files."""
    folder = DATA_DIR / "cxr-lung-masks"
    with (folder / "labels.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["source"] == "montgomery"]
    normal = [r for r in rows if r["finding"] == "normal"][:FILMS_PER_CLASS]
    sick = [r for r in rows if r["finding"] != "normal"][:FILMS_PER_CLASS]
    picked = [r for pair in zip(normal, sick, strict=True) for r in pair]
    return [write_film(folder / "images" / r["file"], out / f"synthetic-{i:02d}.dcm", index=i,
                       present=int(r["finding"] != "normal"), tag="demo") for i, r in enumerate(picked, start=1)]


def wait_for(what: str, check, timeout: float = 180.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"console_screenshots: timed out waiting for {what}")
        time.sleep(0.25)


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def record_reads(node: Node) -> None:
    """Two readers judge the analysed jobs: one mostly accepts, the other gives readings of their own."""
    from db.feedback import Reading, add_feedback
    from db.findings import findings

    engine = open_db(node)
    try:
        for i, finding in enumerate(sorted(findings(engine), key=lambda f: f.job_id)):
            action = "reject" if finding.present and i % 2 == 0 else "accept"  # rejecting a negative needs a category
            add_feedback(engine, job_id=finding.job_id, reader="Reader A", action=action, actor="screenshots")
            present = i % 2 == 1
            add_feedback(engine, job_id=finding.job_id, reader="Reader B", action="reading",
                         reading=Reading(present=present, category=(1 + i % 3) if present else 0), actor="screenshots")
    finally:
        engine.dispose()


def shrink(path: Path, max_kb: int) -> None:
    """Re-save optimised; as a 256-colour palette when the full-colour file is over ``max_kb``."""
    from PIL import Image

    with Image.open(path) as img:
        rgb = img.convert("RGB")
    rgb.save(path, optimize=True)
    if path.stat().st_size > max_kb * 1024:
        rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "figures")
    parser.add_argument("--keep", type=Path, help="use this folder for the node and keep it (default: a temporary one)")
    parser.add_argument("--max-kb", type=int, default=300)
    args = parser.parse_args(argv)
    from dicom_node.console.passwords import hash_password

    root = args.keep or Path(tempfile.mkdtemp(prefix="console-screens-"))
    root.mkdir(parents=True, exist_ok=True)
    pacs_port, closed_port, console_port = free_port(), free_port(), free_port()
    (root / "pacs").mkdir(exist_ok=True)
    pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(root / "pacs"), "+xa", str(pacs_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    destinations = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port},
                    {"name": "teaching-file", "ae_title": "TEACHING", "host": "127.0.0.1", "port": closed_port,
                     "types": ["sr"]}]
    node = Node(root=root, port=free_port(), overrides={
        "worker.processes": "1", "console.enabled": "true", "console.port": str(console_port),
        "export.max_attempts": "1",
        "export.destinations": json.dumps(destinations),
        # a login page to show; nobody logs in (the password is thrown away)
        "console.admin_password_hash": hash_password(secrets.token_urlsafe(16))})
    try:
        sent = films(root / "films")
        node.start()
        base = f"http://127.0.0.1:{console_port}"
        wait_for("the console", lambda: answers(base + "/health/live"), 30)
        result = storescu(node.port, [f.path for f in sent], aet="CR-ROOM-1")
        if result.returncode != 0:
            raise SystemExit(f"console_screenshots: storescu failed:\n{result.output}")
        from db.exports import export_counts
        from db.queue import counts_by_state

        engine = open_db(node)
        wait_for("the analyses", lambda: counts_by_state(engine)["done"] + counts_by_state(engine)["failed"]
                 + counts_by_state(engine)["not_analysed"] >= len(sent))
        wait_for("the exports", lambda: export_counts(engine)["pending"] + export_counts(engine)["sending"] == 0, 60)
        from dicom_node.champion import register_installed

        register_installed(engine, None)  # the bundled classifier as the registry's first champion
        record_reads(node)
        from db.findings import findings

        shown = max(findings(engine), key=lambda f: f.probability).job_id
        engine.dispose()
        urls = {"overview": "/", "jobs": "/jobs", "job": f"/jobs/{shown}", "exports": "/exports",
                "destinations": "/destinations", "associations": "/associations", "models": "/models",
                "statistics": "/statistics",
                "disagreements": "/disagreements", "audit": "/audit", "login": "/login"}
        args.out.mkdir(parents=True, exist_ok=True)
        with chromium() as driver:
            for page in PAGES:
                driver.get(base + urls[page])
                path = full_page_png(driver, args.out / f"console-{page}.png")
                shrink(path, args.max_kb)
                print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: "
                      f"{path.stat().st_size // 1024} KB")
    finally:
        node.stop()
        pacs.terminate()
        pacs.wait(10)
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
