"""A spec is data a user may have downloaded: it cannot write outside the run's directory, cannot choose which
secret is sent or where, and credentials written into a URL are never stored or shown."""

from __future__ import annotations

import http.server
import json
import sqlite3
import threading
from pathlib import Path

import pytest
import yaml
from cli_harness import invoke

from maskscope.errors import UserError
from maskscope.models.openai_backend import (
    Credentials,
    OpenAIModel,
    ServerOptions,
    check_transport,
    redact_url,
)
from maskscope.runner import parse_spec, run, run_dir

SPEC = {
    "experiment": "character",
    "name": "sec",
    "personas": [{"name": "p", "system": "You are a pirate."}],
    "pressures": [{"name": "q", "user": "Say no."}],
    "targets": ["no"],
    "samples": 2,
    "max_new_tokens": 3,
    "top_k": 2,
}


class KeyRecorder:
    """A loopback server that lists one model and records the Authorization header of every request."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                recorder.seen.append(self.headers.get("Authorization"))
                body = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def __enter__(self) -> KeyRecorder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# ----------------------------------------------------------------- the run's name
@pytest.mark.parametrize("name", ["../escaped", "/srv/anywhere/evil", "", ".", "..", "a/b", "a\\b", "a\x00b"])
def test_a_name_that_is_not_a_label_is_refused(name: str):
    with pytest.raises(UserError, match="field 'name'"):
        parse_spec({**SPEC, "name": name})


def test_a_run_directory_never_leaves_the_output_root(tmp_path: Path):
    root = tmp_path / "runs"
    root.mkdir()
    assert run_dir(root, "ok-name_1.2") == root / "ok-name_1.2"
    (root / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="outside the output directory"):
        run_dir(root, "link")


def test_every_file_of_a_run_lands_in_its_directory(tiny, tmp_path: Path):
    experiment, spec = parse_spec({**SPEC, "name": "inside"})
    out = tmp_path / "out"
    rid = run(experiment, spec, out_root=out, model=tiny).name
    files = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    tables = {
        f"out/{rid}/{t}.{ext}"
        for t in ("cells", "samples", "calls", "tokens")
        for ext in ("jsonl", "parquet")
    }
    assert files == {
        "out/maskscope.sqlite",
        f"out/{rid}/run.json",
        f"out/{rid}/summary.json",
        f"out/{rid}/report.html",
        f"out/{rid}/exact_heatmap.png",
        f"out/{rid}/sampled_categories.png",
        *tables,
    }
    assert rid.startswith("inside-") and (out / "inside").resolve() == (out / rid).resolve()  # the label


# ----------------------------------------------------------------- the key
def test_a_spec_cannot_name_the_variable_holding_the_key():
    with pytest.raises(UserError, match="cannot choose which secret"):
        parse_spec({**SPEC, "model": "openai:http://127.0.0.1:1/v1#m", "server": {"api_key_env": "SECRET"}})


def test_the_key_comes_from_the_users_variable_and_openai_key_only_when_asked(monkeypatch):
    monkeypatch.delenv("MASKSCOPE_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "openai-secret")
    monkeypatch.setenv("SECRET_DB_PASSWORD", "db-secret")
    options = ServerOptions(max_retries=0)
    with KeyRecorder() as server:
        url = f"http://127.0.0.1:{server.port}/v1"
        OpenAIModel(url, "m", options)
        OpenAIModel(url, "m", options, credentials=Credentials(openai_fallback=True))
        monkeypatch.setenv("MASKSCOPE_API_KEY", "maskscope-secret")
        OpenAIModel(url, "m", options, credentials=Credentials(openai_fallback=True))
        OpenAIModel(url, "m", options, credentials=Credentials(key_env="SECRET_DB_PASSWORD"))
    assert server.seen == [
        "Bearer none",  # OPENAI_API_KEY is not sent unless the user opts in
        "Bearer openai-secret",
        "Bearer maskscope-secret",
        "Bearer db-secret",  # a variable the user (not a spec) named on the command line
    ]


def test_no_key_over_plain_http_to_another_machine_without_the_flag(monkeypatch):
    monkeypatch.setenv("MASKSCOPE_API_KEY", "k")
    for url in ("http://example.com/v1", "http://10.0.0.8:8000/v1", "http://localhost.example.com/v1"):
        with pytest.raises(UserError, match="allow-insecure-key"):
            check_transport(url, "k", Credentials())
        check_transport(url, "k", Credentials(allow_insecure=True))
        check_transport(url, None, Credentials())  # no key, nothing secret to protect
    for url in (
        "https://example.com/v1",
        "http://127.0.0.1:8000/v1",
        "http://localhost/v1",
        "http://[::1]:80/v1",
    ):
        check_transport(url, "k", Credentials())
    with pytest.raises(UserError, match="allow-insecure-key"):
        check_transport("http://u:p@example.com/v1", None, Credentials())  # credentials in the URL
    outcome = invoke(
        ["sample", "hi", "--model", "openai:http://example.com/v1#m"], env={"MASKSCOPE_API_KEY": "k"}
    )
    assert outcome.one_line_error() and "allow-insecure-key" in outcome.stderr


# ----------------------------------------------------------------- credentials in URLs
def test_credentials_in_a_url_are_never_stored_or_shown(tiny, tmp_path: Path, monkeypatch):
    assert redact_url("http://user:pa55@h:1/v1") == "http://h:1/v1"
    assert redact_url("https://h/v1") == "https://h/v1"
    monkeypatch.delenv("MASKSCOPE_API_KEY", raising=False)
    with KeyRecorder() as server:
        model = OpenAIModel(f"http://user:pa55@127.0.0.1:{server.port}/v1", "m", ServerOptions())
    assert "pa55" not in model.name and "pa55" not in json.dumps(model.fingerprint())

    secret_model = "openai:http://user:pa55@127.0.0.1:9/v1#m"
    experiment, spec = parse_spec({**SPEC, "name": "url", "model": secret_model})
    out = tmp_path / "out"
    run(experiment, spec, out_root=out, model=tiny)  # the spec names the server; the tiny model answers
    con = sqlite3.connect(out / "maskscope.sqlite")
    dump = "\n".join(con.iterdump())
    con.close()
    assert "127.0.0.1:9" in dump and "pa55" not in dump and "user:" not in dump
    for name in ("summary.json", "report.html"):
        text = (out / "url" / name).read_text()
        assert "127.0.0.1:9" in text and "pa55" not in text, name

    bad = tmp_path / "s.yaml"
    bad.write_text(yaml.safe_dump({**SPEC, "model": "openai:ftp://user:pa55@h/v1"}))
    outcome = invoke(["run", str(bad), "--out", str(tmp_path / "o2")])
    assert outcome.one_line_error() and "pa55" not in outcome.stderr
