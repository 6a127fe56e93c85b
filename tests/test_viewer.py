"""`maskscope view` in a real headless Chromium: the pages load, filters set by URL parameters narrow the
lists, and model output carrying <script>, onerror= and javascript: payloads is shown as text with nothing
executed (a positive control shows that the same payload, served raw, does execute in this browser)."""

from __future__ import annotations

import http.client
import http.server
import json
import re
import shutil
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest

from maskscope import runs
from maskscope.viewer import serve_in_thread

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary (Debian: apt-get install -y chromium; .ci/run installs it)"
)

MARK = "pwned"
PAYLOAD = (
    f"<script>document.title='{MARK}'</script>"
    f"<img src=x onerror=\"document.body.appendChild(document.createElement('{MARK}-img'))\">"
    f"<a id=jslink href=\"javascript:document.title='{MARK}'\">click</a>"
    f"<svg onload=\"document.body.appendChild(document.createElement('{MARK}-svg'))\"></svg>"
)


def _make_run(root: Path, name: str, seed: int, texts: list[list[str]], personas: list[str]) -> str:
    """A character run written by hand (no model): cells persona x one pressure, the given replies."""
    spec = {"experiment": "character", "name": name, "seed": seed, "targets": ["No"], "in_character": []}
    cells, calls = [], []
    for c, (persona, replies) in enumerate(zip(personas, texts, strict=True)):
        prompt = f"<prompt of {c}>"
        cells.append(
            {"persona": persona, "pressure": "stop", "prompt": prompt, "exact": {"p_target": 0.1 * (c + 1)}}
        )
        for i, text in enumerate(replies):
            result = {"index": i, "text": text, "token_ids": [1, 2], "finish_reason": "length"}
            calls.append({"key": f"{name}{c}{i}", "method": "sample", "prompt": prompt, "args": {"seed": seed},
                          "result": result})  # fmt: skip
    summary = {"experiment": "character", "name": name, "spec": spec, "cells": cells}
    digest = runs.run_digest(spec, {"weights": "w"}, {})
    rid = runs.run_id(name, digest)
    out = root / rid
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps(summary))
    (out / "report.html").write_text("<!doctype html><title>report</title><p>the report</p>")
    runs.write_tables(out, runs.tables(summary, calls))
    info = runs.begin(out, {"id": rid, "name": name, "digest": digest, "spec": spec, "model": {"name": "m"}})
    runs.finish(out, info, "done")
    return rid


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    """Two runs, one with payloads in its replies and in a persona's name, served by the viewer."""
    root = tmp_path_factory.mktemp("view")
    alpha = _make_run(
        root,
        "alpha",
        0,
        [[PAYLOAD, "No, I will not."], ["Arr, matey.", "No."]],
        [f"evil {PAYLOAD}", "pirate"],
    )
    beta = _make_run(root, "beta", 1, [["Yes.", PAYLOAD], ["Ahoy.", "No."]], [f"evil {PAYLOAD}", "pirate"])
    server, url = serve_in_thread(root)
    yield url, alpha, beta
    server.shutdown()
    server.server_close()


def dump(url: str, tmp_path: Path) -> str:
    """The DOM of a page after it loaded (and ran whatever scripts it was allowed to), as Chromium serializes it."""
    assert CHROMIUM is not None
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _title(dom: str) -> str:
    found = re.search(r"<title>(.*?)</title>", dom, re.S)
    return found.group(1) if found else ""


def _nothing_ran(dom: str) -> None:
    """The payload is in the page as text and none of it became markup or ran."""
    assert MARK not in _title(dom)
    assert f"<{MARK}-img" not in dom and f"<{MARK}-svg" not in dom  # no element was added
    assert "<script" not in dom and "<img" not in dom and "<svg" not in dom
    assert not re.search(r"<a\b[^>]*href=[\"']?javascript:", dom, re.I)  # (as text it is "&lt;a ... href=")
    assert "&lt;script&gt;document.title=" in dom  # shown, escaped


@needs_chromium
def test_the_payload_runs_when_served_raw_positive_control(tmp_path: Path):
    class Raw(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            body = (
                f"<!doctype html><html><head><title>raw</title></head><body>{PAYLOAD}</body></html>".encode()
            )
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Raw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dom = dump(f"http://127.0.0.1:{server.server_address[1]}/", tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert _title(dom) == MARK and f"<{MARK}-img" in dom  # the detector sees execution when there is some


@needs_chromium
def test_the_run_list_loads_and_url_parameters_filter_it(site, tmp_path: Path):
    url, alpha, beta = site
    everything = dump(url, tmp_path)
    assert _title(everything) == "maskscope runs"
    assert everything.count('class="run"') == 2 and alpha in everything and beta in everything
    narrowed = dump(url + "?q=alph", tmp_path)
    assert (
        narrowed.count('class="run"') == 1 and f"/run/{alpha}" in narrowed and f"/run/{beta}" not in narrowed
    )
    assert "1 of 2 runs" in narrowed
    none = dump(url + "?status=interrupted", tmp_path)
    assert none.count('class="run"') == 0


@needs_chromium
def test_samples_by_cell_and_category_show_model_output_as_text(site, tmp_path: Path):
    url, alpha, _ = site
    page = dump(f"{url}run/{alpha}", tmp_path)
    assert _title(page) == f"run {alpha}" and page.count('class="sample"') == 4
    _nothing_ran(page)
    cell = dump(f"{url}run/{alpha}?cell=1", tmp_path)
    assert (
        cell.count('class="sample"') == 2
        and "Arr, matey." in cell
        and "&lt;script&gt;" not in cell.split('id="samples"')[1]
    )
    # the character experiment's own categories: "No, I will not." and "No." begin with the target
    target = dump(f"{url}run/{alpha}?category=target", tmp_path)
    rows = target.split('id="samples"')[1]
    assert rows.count('class="sample"') == 2 and "No, I will not." in rows and "Arr" not in rows
    text = dump(f"{url}run/{alpha}?q=matey", tmp_path)
    assert text.split('id="samples"')[1].count('class="sample"') == 1
    assert 'href="/run/' + alpha + '/files/report.html"' in page


@needs_chromium
def test_two_runs_side_by_side_show_output_as_text(site, tmp_path: Path):
    url, alpha, beta = site
    page = dump(f"{url}compare?a={alpha}&b={beta}", tmp_path)
    assert _title(page) == f"compare {alpha} and {beta}"
    _nothing_ran(page)
    fields = page.split('id="fields"')[1].split("</table>")[0]
    assert "seed" in fields and "name" in fields and "targets" not in fields
    assert page.count('class="sample"') == 8


def test_files_are_served_from_the_run_directory_only_and_only_on_loopback(site):
    url, alpha, _ = site
    with urllib.request.urlopen(f"{url}run/{alpha}/files/report.html") as r:
        assert r.status == 200 and b"the report" in r.read()
        assert "script-src" not in r.headers["Content-Security-Policy"]  # default-src 'none' covers scripts
        assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    for bad in ("run.json/..", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}run/{alpha}/files/{bad}")
        assert e.value.code == 404
    host, port = url.split("//")[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/", headers={"Host": f"attacker.example:{port}"})
    assert conn.getresponse().status == 421  # a rebinding page elsewhere is refused
    conn.close()
