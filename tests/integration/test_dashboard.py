"""The web dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright through
`executable_path`: no browser is downloaded), against a real coordinator with TLS and a real agent.

Each page is saved as a screenshot under the test's tmp dir; on a failure the page at that moment is
saved too and its path is in the failure's message. With DSTACK_SCREENSHOTS=DIR (scripts/
dashboard-screenshots.sh) the main pages are also written there at 1024x640 (docs/screenshots/)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import Cluster, LocalMode, free_port, write_project

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = pytest.mark.integration

SECRET = "hf-token-4d2c9a7e1b"
TIMEOUT_MS = 90_000  # a shared, slow machine: runs take a while to be placed and finish


def chromium_path() -> str:
    found = os.environ.get("DSTACK_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    message = "chromium is not installed (scripts/test-deps.sh installs Debian's `chromium`)"
    if os.environ.get("CI") == "true":
        pytest.fail(message + ": the browser tests must run under CI")
    pytest.skip(message)


def optimise_png(data: bytes) -> bytes:
    """The same image with its pixel data recompressed at zlib's best level (Chromium favours speed)."""
    pos, chunks, idat = 8, [], b""
    while pos < len(data):
        (size,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + size]
        pos += size + 12
        if kind == b"IDAT":
            idat += body
        elif kind != b"IEND":
            chunks.append((kind, body))
    chunks.append((b"IDAT", zlib.compress(zlib.decompress(idat), 9)))
    chunks.append((b"IEND", b""))
    out = data[:8]
    for kind, body in chunks:
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return out


@dataclass
class Dashboard:
    cluster: Cluster
    port: int
    project: Path
    browser: Browser
    shots: Path
    member_token: str

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/"

    def page(self) -> Page:
        context = self.browser.new_context(
            ignore_https_errors=True,  # the coordinator's own CA; what is tested here is the page
            viewport={"width": 1024, "height": 640},
            accept_downloads=True,
        )
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.js_errors = errors  # type: ignore[attr-defined]
        return page

    def login(self, page: Page, token: str) -> None:
        page.goto(self.url)
        page.wait_for_url("**/#/login")
        page.fill("#token", token)
        page.click("button[type=submit]")
        page.wait_for_url("**/#/runs")
        page.wait_for_selector("#who:has-text('(')")

    def shot(self, page: Page, name: str) -> Path:
        path = self.shots / f"{name}.png"
        page.screenshot(path=str(path))
        docs = os.environ.get("DSTACK_SCREENSHOTS")
        if docs:
            Path(docs).mkdir(parents=True, exist_ok=True)
            (Path(docs) / f"{name}.png").write_bytes(optimise_png(path.read_bytes()))
        return path

    @contextmanager
    def on_failure(self, page: Page, name: str) -> Iterator[None]:
        """A failure inside carries a screenshot of the page as it was (the path is in the message)."""
        try:
            yield
        except BaseException as e:
            path = self.shots / f"FAILED-{name}.png"
            try:
                page.screenshot(path=str(path), full_page=True)
            except Exception as shot_error:  # the page itself may be gone
                path = Path(f"(no screenshot: {shot_error})")
            raise AssertionError(f"{e}\nscreenshot: {path}\nbrowser errors: {page.js_errors}") from e  # type: ignore[attr-defined]

    def run(self, workflow: str) -> str:
        r = self.cluster.cli("run", "-d", workflow, cwd=self.project)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    def http(self, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
        ctx = ssl.create_default_context(cafile=str(self.cluster.ca_file))
        c = http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx, timeout=60)
        try:
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            c.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            r = c.getresponse()
            return r.status, json.loads(r.read() or b"{}")
        finally:
            c.close()


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    executable = chromium_path()
    sync_api = pytest.importorskip("playwright.sync_api")
    tmp = tmp_path_factory.mktemp("dashboard")
    gate = tmp / "gate"
    cluster = Cluster(tmp, free_port())
    port = free_port()
    try:
        cluster.start_coordinator("--http-port", str(port))
        cluster.start_agent("agent-1", "--simulate-gpus", "2xA100-80GB")
        project = write_project(
            tmp / "p",
            f"""
            workflows:
              - name: ticker
                provider: bash
                env:
                  - MODE=fast
                commands:
                  - echo first-line
                  - while [ ! -e {gate} ]; do sleep 0.2; done
                  - echo second-line
              - name: show-secret
                provider: bash
                commands:
                  - echo "token=$HF_TOKEN"
              - name: hostile
                provider: bash
                commands:
                  - echo '<img src=x onerror="window.pwned=1">'
                  - echo '<script>window.pwned=2</script>'
              - name: big
                provider: bash
                commands:
                  - echo never
                resources: {{gpu: 4}}
              - name: build
                provider: bash
                commands:
                  - mkdir -p out && printf model-weights-42 > out/model.bin
                artifacts: [out]
            """,
        )
        r = cluster.cli("users", "add", "mia", "--role", "member")
        assert r.returncode == 0, r.stderr
        member_token = r.stdout.splitlines()[1]
        shots = tmp / "screenshots"
        shots.mkdir()
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            try:
                yield Dashboard(cluster, port, project, browser, shots, member_token)
            finally:
                browser.close()
    finally:
        cluster.stop_all()


def test_login_then_a_running_jobs_lines_appear_live(dash: Dashboard) -> None:
    page = dash.page()
    with dash.on_failure(page, "live-logs"):
        dash.login(page, dash.cluster.admin_token)
        assert "dstack" in page.title()
        name = dash.run("ticker")
        page.wait_for_selector(f"tr[data-run='{name}']")
        dash.shot(page, "runs")
        page.click(f"a:has-text('{name}')")
        page.wait_for_selector("#logs:has-text('first-line')")
        # The job is still waiting on the gate: the first line came while it ran, not from a finished log.
        assert "second-line" not in page.inner_text("#logs")
        assert "MODE=fast" in page.inner_text("#variables")
        dash.shot(page, "run")
        (dash.cluster.tmp / "gate").touch()
        page.wait_for_selector("#logs:has-text('second-line')")
        page.wait_for_selector("#log-state:has-text('ended')")
        assert page.inner_text("#logs").splitlines() == ["first-line", "second-line"]
        assert page.js_errors == []  # type: ignore[attr-defined]


def test_runs_filter_by_workflow_and_status_and_logging_out_forgets_the_token(dash: Dashboard) -> None:
    done = dash.run("show-secret")
    dash.cluster.wait_status(done, {"done"}, timeout=120)
    page = dash.page()
    with dash.on_failure(page, "filters"):
        dash.login(page, dash.cluster.admin_token)
        page.fill("input[name=workflow]", "show-secret")
        page.select_option("select[name=status]", "done")
        page.click(".filters button[type=submit]")
        page.wait_for_selector(f"tr[data-run='{done}']")
        rows = page.query_selector_all("tr[data-run]")
        assert rows and all("show-secret" in r.inner_text() and "done" in r.inner_text() for r in rows)
        assert "workflow=show-secret" in page.url and dash.cluster.admin_token not in page.url
        page.click("#logout")
        page.wait_for_url("**/#/login")
        assert page.evaluate("sessionStorage.getItem('dstack-token')") is None
        assert page.inner_text("#who") == ""


def test_a_wrong_token_is_refused_at_login(dash: Dashboard) -> None:
    page = dash.page()
    with dash.on_failure(page, "bad-login"):
        page.goto(dash.url)
        page.fill("#token", "not-a-token")
        page.click("button[type=submit]")
        page.wait_for_selector(".error:has-text('401')")
        assert page.evaluate("sessionStorage.getItem('dstack-token')") is None
        assert "#/login" in page.url


def test_a_secret_added_in_settings_is_masked_in_the_next_runs_logs(dash: Dashboard) -> None:
    page = dash.page()
    with dash.on_failure(page, "secret"):
        dash.login(page, dash.cluster.admin_token)
        page.click("nav a:has-text('Settings')")
        page.wait_for_selector("#whoami:has-text('admin')")
        page.fill("input[name=secret-name]", "HF_TOKEN")
        page.fill("input[name=secret-value]", SECRET)
        page.click("#secret-form button[type=submit]")
        page.wait_for_selector("tr[data-secret=HF_TOKEN]")
        assert SECRET not in page.content()  # listed, never shown
        dash.shot(page, "settings")
        name = dash.run("show-secret")
        page.goto(f"{dash.url}#/runs/{name}")
        page.wait_for_selector("#log-state:has-text('ended')")
        assert page.inner_text("#logs").splitlines() == ["token=***"]
        assert SECRET not in page.content()


def test_an_artifact_downloads_from_the_runs_page(dash: Dashboard, tmp_path: Path) -> None:
    name = dash.run("build")
    dash.cluster.wait_status(name, {"done"}, timeout=120)
    page = dash.page()
    with dash.on_failure(page, "artifact"):
        dash.login(page, dash.cluster.admin_token)
        page.goto(f"{dash.url}#/runs/{name}")
        button = page.wait_for_selector("button[data-download='out/model.bin']")
        assert button is not None
        with page.expect_download() as info:
            button.click()
        assert info.value.suggested_filename == "model.bin"
        saved = tmp_path / "model.bin"
        info.value.save_as(saved)
        assert saved.read_bytes() == b"model-weights-42"


def test_pool_and_queue_pages_show_gpus_and_waiting_jobs(dash: Dashboard) -> None:
    page = dash.page()
    with dash.on_failure(page, "pool"):
        dash.login(page, dash.cluster.admin_token)
        page.click("nav a:has-text('Pool')")
        row = page.wait_for_selector("tr[data-agent=agent-1]")
        assert row is not None
        text = row.inner_text()
        assert "A100" in text and "#0" in text and "#1" in text and "util" in text, text
        dash.shot(page, "pool")
        big = dash.run("big")  # 4 GPUs on a pool of 2: it waits, and says why
        page.click("nav a:has-text('Queue')")
        waiting = page.wait_for_selector(f"tr:has(a:has-text('{big}/big'))")
        assert waiting is not None
        assert "GPU" in waiting.inner_text(), waiting.inner_text()
        dash.shot(page, "queue")
        assert dash.cluster.cli("stop", big).returncode == 0


def test_a_member_is_refused_an_admins_action_in_the_ui_and_the_api(dash: Dashboard) -> None:
    page = dash.page()
    with dash.on_failure(page, "member"):
        dash.login(page, dash.member_token)
        page.click("nav a:has-text('Settings')")
        page.wait_for_selector("#whoami:has-text('member')")
        # Join tokens are admins' only: the section says so instead of listing them.
        page.wait_for_selector("#admin .error:has-text('403')")
        # A team secret needs an admin: untick "personal" and try.
        page.fill("input[name=secret-name]", "TEAM_KEY")
        page.fill("input[name=secret-value]", "team-value-123456")
        page.uncheck("input[name=personal]")
        page.click("#secret-form button[type=submit]")
        page.wait_for_selector("#secret-result .error:has-text('Refused (403)')")
        dash.shot(page, "settings-member-refused")
        # A personal one is the member's own to set.
        page.fill("input[name=secret-name]", "MY_KEY")
        page.fill("input[name=secret-value]", "mine-value-123456")
        page.check("input[name=personal]")
        page.click("#secret-form button[type=submit]")
        page.wait_for_selector("tr[data-secret=MY_KEY]")
    status, body = dash.http("PUT", "/api/secrets/TEAM_KEY", dash.member_token, {"value": "x" * 12, "personal": False})
    assert status == 403, body
    status, body = dash.http("GET", "/api/join-tokens", dash.member_token)
    assert status == 403, body
    status, body = dash.http("GET", "/api/secrets", dash.cluster.admin_token)
    assert "TEAM_KEY" not in [s["name"] for s in body["secrets"]]


def test_an_admin_adds_a_user_rotates_its_token_and_manages_join_tokens(dash: Dashboard) -> None:
    page = dash.page()
    page.on("dialog", lambda d: d.accept())
    with dash.on_failure(page, "admin"):
        dash.login(page, dash.cluster.admin_token)
        page.click("nav a:has-text('Settings')")
        page.wait_for_selector("#user-form")
        page.fill("input[name=user-name]", "noah")
        page.select_option("select[name=user-role]", "viewer")
        page.click("#user-form button[type=submit]")
        first = page.inner_text("#new-token code")
        assert dash.http("GET", "/api/whoami", first)[1]["role"] == "viewer"
        page.click("button[data-rotate=noah]")
        page.wait_for_selector("#new-token:has-text('New token of noah')")
        second = page.inner_text("#new-token code")
        assert second != first
        assert dash.http("GET", "/api/whoami", first)[0] == 401  # the old token stops at once
        assert dash.http("GET", "/api/whoami", second)[0] == 200
        page.fill("input[name=join-uses]", "3")
        page.click("#join-form button[type=submit]")
        page.wait_for_selector("#new-token:has-text('Join token')")
        row = page.wait_for_selector("#join-tokens tr[data-join]:has-text('0/3')")
        assert row is not None
        dash.shot(page, "settings-admin")
        row.query_selector("button:has-text('Revoke')").click()  # type: ignore[union-attr]
        page.wait_for_selector("#join-tokens tr[data-join]:not(:has(button))")
        page.click("button[data-remove=noah]")
        page.wait_for_selector("#users:not(:has(tr[data-user=noah]))")
        assert dash.http("GET", "/api/whoami", second)[0] == 401
    # A member may not do any of it over the API either.
    for method, path, body in (
        ("POST", "/api/users", {"name": "eve", "role": "admin"}),
        ("POST", "/api/users/admin/token", None),  # another user's token (its own is the member's to rotate)
        ("DELETE", "/api/users/admin", None),
        ("POST", "/api/join-tokens", {"ttl_s": 60, "max_uses": 1}),
    ):
        assert dash.http(method, path, dash.member_token, body)[0] == 403, path


def test_a_viewer_rotates_their_own_token_in_settings_and_the_tab_goes_on_with_the_new_one(dash: Dashboard) -> None:
    r = dash.cluster.cli("users", "add", "olga", "--role", "viewer")
    assert r.returncode == 0, r.stderr
    old = r.stdout.splitlines()[1]
    page = dash.page()
    page.on("dialog", lambda d: d.accept())
    with dash.on_failure(page, "rotate-own"):
        dash.login(page, old)
        page.click("nav a:has-text('Settings')")
        page.click("#rotate-own")
        page.wait_for_selector("#own-token:has-text('Your new token')")
        new = page.inner_text("#own-token code")
        assert new != old
        assert dash.http("GET", "/api/whoami", old)[0] == 401  # the old token stops at once
        assert dash.http("GET", "/api/whoami", new)[1]["user"] == "olga"
        page.reload()  # the tab keeps working: it holds the new token now
        page.wait_for_selector("#whoami:has-text('viewer')")
    # Another user's token stays an admin's to rotate.
    assert dash.http("POST", "/api/users/mia/token", new)[0] == 403


def test_pages_are_served_with_a_strict_csp_and_no_token_in_urls(dash: Dashboard) -> None:
    ctx = ssl.create_default_context(cafile=str(dash.cluster.ca_file))
    for path in ("/", "/static/app.js", "/static/app.css"):
        c = http.client.HTTPSConnection("127.0.0.1", dash.port, context=ctx, timeout=60)
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        csp = r.getheader("Content-Security-Policy", "")
        assert r.status == 200 and "script-src 'self'" in csp and "unsafe-inline" not in csp, (path, csp)
        assert r.getheader("X-Frame-Options") == "DENY"
        c.close()
    for path in ("/static/../server.py", "/static/dashboard.py", "/static/index.html", "/static/%2e%2e%2fapi.py"):
        c = http.client.HTTPSConnection("127.0.0.1", dash.port, context=ctx, timeout=60)
        c.request("GET", path)
        r = c.getresponse()
        assert r.status == 404 and b"import" not in r.read(), path
        c.close()
    # A script injected through a run's name or a log line would be text, and CSP forbids inline ones anyway.
    page = dash.page()
    with dash.on_failure(page, "urls"):
        seen: list[str] = []
        page.on("request", lambda req: seen.append(req.url))
        dash.login(page, dash.cluster.admin_token)
        page.click("nav a:has-text('Pool')")
        page.wait_for_selector("tr[data-agent=agent-1]")
        assert seen and not [u for u in seen if dash.cluster.admin_token in u]
        blocked = page.evaluate(
            "() => { const s = document.createElement('script'); s.textContent = 'window.pwned = 1';"
            " document.body.append(s); return window.pwned === undefined; }"
        )
        assert blocked


def test_dstack_dashboard_prints_the_local_url_and_never_the_token(local: LocalMode, tmp_path: Path) -> None:
    r = local.cli("dashboard", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    recorded = (local.home / "local" / "server" / "http-url").read_text().strip()
    assert r.stdout.strip() == recorded + "/"
    token = (local.home / "local" / "admin-token").read_text().strip()
    assert token not in r.stdout + r.stderr and "admin-token" in r.stderr
    c = http.client.HTTPConnection("127.0.0.1", int(recorded.rsplit(":", 1)[1]), timeout=30)
    try:
        c.request("GET", "/")
        page = c.getresponse()
        assert page.status == 200 and b'src="/static/app.js"' in page.read()
    finally:
        c.close()


def test_dstack_dashboard_with_a_team_coordinator_needs_its_url(local: LocalMode, tmp_path: Path) -> None:
    local.extra_env["DSTACK_COORDINATOR"] = "coordinator.example:3000"  # never dialled: nothing to ask it
    r = local.cli("dashboard", cwd=tmp_path)
    assert r.returncode == 1 and "--url" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = local.cli("dashboard", "--url", "https://coordinator.example:3001", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "https://coordinator.example:3001/", r.stderr
    assert not (local.home / "local").exists()  # no local services were started for it


def test_hostile_log_lines_are_shown_as_text_and_never_run(dash: Dashboard) -> None:
    """Another user's job prints HTML and script: the page shows the characters, runs nothing."""
    name = dash.run("hostile")
    page = dash.page()
    with dash.on_failure(page, "hostile"):
        dash.login(page, dash.cluster.admin_token)
        page.goto(f"{dash.url}#/runs/{name}")
        page.wait_for_selector("#log-state:has-text('ended')")
        assert page.inner_text("#logs").splitlines() == [
            '<img src=x onerror="window.pwned=1">',
            "<script>window.pwned=2</script>",
        ]
        assert page.query_selector("#logs img, #logs script") is None
        assert page.evaluate("window.pwned === undefined")


def test_a_cross_site_write_without_the_token_is_refused(dash: Dashboard) -> None:
    """What a forged form or fetch from another site would send: no Authorization header (there is no
    cookie to ride on), whatever its Origin. Refused, and nothing changed."""
    ctx = ssl.create_default_context(cafile=str(dash.cluster.ca_file))
    for method, path in (("PUT", "/api/secrets/EVIL"), ("POST", "/api/users"), ("POST", "/api/join-tokens")):
        c = http.client.HTTPSConnection("127.0.0.1", dash.port, context=ctx, timeout=60)
        c.request(
            method,
            path,
            body=json.dumps({"value": "x" * 12, "name": "eve", "role": "admin"}),
            headers={"Origin": "https://evil.example", "Content-Type": "text/plain"},
        )
        r = c.getresponse()
        r.read()
        assert r.status == 401 and r.getheader("Access-Control-Allow-Origin") is None, (path, r.status)
        c.close()
    _, listed = dash.http("GET", "/api/secrets", dash.cluster.admin_token)
    assert "EVIL" not in [s["name"] for s in listed["secrets"]]
    _, found = dash.http("GET", "/api/users", dash.cluster.admin_token)
    assert "eve" not in [u["name"] for u in found["users"]]
