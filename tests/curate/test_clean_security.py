"""No other web page can drive the cleaner: a token in a custom header, Origin and Sec-Fetch-Site checks, JSON only."""

from __future__ import annotations

import pytest

from conftest import COLOURS, chromium_or_skip, launch_chromium, make_class_folders, noisy_image, serve_in_thread

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from imgtune.curate.changelog import ChangeLog
from imgtune.curate.clean import TOKEN_HEADER, CleanSession, create_app
from test_clean import SUSPECT, mean_colour, snapshot

REQUESTS = [("GET", "/api/items", None), ("GET", "/api/log", None), ("GET", f"/api/image?path={SUSPECT}", None),
            ("POST", "/api/keep", {"path": SUSPECT}), ("POST", "/api/relabel", {"path": SUSPECT, "label": "blue"}),
            ("POST", "/api/quarantine", {"path": SUSPECT}), ("POST", "/api/undo", {})]


@pytest.fixture
def data(tmp_path):
    root = make_class_folders(tmp_path / "colours", n=8)
    noisy_image(COLOURS["blue"], 32, seed=999).save(root / SUSPECT)
    return root


@pytest.fixture
def app(data):
    """The cleaner with one change logged, for an attacker's undo to aim at."""
    app = create_app(CleanSession(data, features=mean_colour))
    client = TestClient(app, base_url="http://127.0.0.1", headers={TOKEN_HEADER: app.state.token})
    assert client.post("/api/keep", json={"path": "red/red_1.png"}).status_code == 200
    return app


def unchanged(data, before, log_before) -> bool:
    return snapshot(data) == before and ChangeLog(data).batches() == log_before


@pytest.mark.parametrize("headers", [{}, {TOKEN_HEADER: ""}, {TOKEN_HEADER: "guess"}, {TOKEN_HEADER: b"\xe9t\xe9"},
                                     {"x-imgtune-token2": "x"}], ids=["none", "empty", "wrong", "latin-1", "other"])
def test_every_api_request_needs_the_token(app, data, headers):
    before, log_before = snapshot(data), ChangeLog(data).batches()
    client = TestClient(app, base_url="http://127.0.0.1", headers=headers)
    for method, url, body in REQUESTS:
        answer = client.request(method, url, json=body)
        assert answer.status_code == 403 and "X-Imgtune-Token" in answer.json()["detail"], (method, url)
    assert unchanged(data, before, log_before)


def test_the_right_token_works_and_each_app_has_its_own(app, data):
    page = TestClient(app, base_url="http://127.0.0.1").get("/")
    assert page.status_code == 200 and f'content="{app.state.token}"' in page.text
    assert len(app.state.token) >= 40 and create_app(CleanSession(data, features=mean_colour)).state.token != \
        app.state.token
    client = TestClient(app, base_url="http://127.0.0.1", headers={TOKEN_HEADER: app.state.token})
    assert client.get("/api/items").status_code == 200
    assert client.post("/api/undo", json={}).json() == {"undone": 1}


@pytest.mark.parametrize("headers", [{"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                                     {"Origin": "http://evil.example"}, {"Origin": "http://127.0.0.1:1"},
                                     {"Origin": "null"}, {"Sec-Fetch-Site": "same-origin", "Origin": "http://x.example"}])
def test_requests_from_another_site_are_refused_even_with_the_token(app, data, headers):
    before, log_before = snapshot(data), ChangeLog(data).batches()
    client = TestClient(app, base_url="http://127.0.0.1", headers={TOKEN_HEADER: app.state.token, **headers})
    for method, url, body in REQUESTS:
        answer = client.request(method, url, json=body)
        assert answer.status_code == 403 and "another" in answer.json()["detail"], (method, url, answer.text)
    assert unchanged(data, before, log_before)


@pytest.mark.parametrize("headers", [{"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1"},
                                     {"Sec-Fetch-Site": "none"}, {}])
def test_the_pages_own_requests_are_served(app, headers):
    client = TestClient(app, base_url="http://127.0.0.1", headers={TOKEN_HEADER: app.state.token, **headers})
    assert client.get(f"/api/image?path={SUSPECT}").status_code == 200
    assert client.post("/api/undo", json={}).json() == {"undone": 1}


BODY = b'{"path": "red/looks_blue.png"}'


@pytest.mark.parametrize("content", [{"content": BODY}, {"content": BODY, "headers": {"Content-Type": ""}},
                                     {"data": {"path": SUSPECT}},
                                     {"content": BODY, "headers": {"Content-Type": "text/plain"}}],
                         ids=["no-type", "empty-type", "form", "text"])
def test_post_bodies_must_be_json(app, data, content):
    before, log_before = snapshot(data), ChangeLog(data).batches()
    client = TestClient(app, base_url="http://127.0.0.1", headers={TOKEN_HEADER: app.state.token})
    for url in ("/api/quarantine", "/api/keep", "/api/undo"):
        assert client.post(url, **content).status_code == 415, url
    assert unchanged(data, before, log_before)


def test_no_preflight_is_allowed_and_no_frame_may_hold_the_page(app):
    client = TestClient(app, base_url="http://127.0.0.1")
    answer = client.options("/api/relabel", headers={"Origin": "http://evil.example",
                                                     "Access-Control-Request-Method": "POST",
                                                     "Access-Control-Request-Headers": "x-imgtune-token"})
    assert answer.status_code == 403 and "access-control-allow-origin" not in answer.headers
    page = client.get("/")
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


def test_an_image_probe_cannot_tell_which_paths_exist(app):
    client = TestClient(app, base_url="http://127.0.0.1")
    existing, missing = (client.get("/api/image", params={"path": p}) for p in (SUSPECT, "red/missing.png"))
    assert (existing.status_code, existing.content) == (missing.status_code, missing.content) == (403, existing.content)


ATTACK = """<!doctype html><html><body>
<iframe name="sink0"></iframe><iframe name="sink1"></iframe><iframe name="sink2"></iframe>
<form target="sink0" method="post" action="{target}api/undo"></form>
<form target="sink1" method="post" enctype="text/plain" action="{target}api/relabel">
  <input name='{{"path": "{suspect}", "label": "blue", "x": "' value='"}}'></form>
<form target="sink2" method="post" action="{target}api/quarantine"><input name="path" value="green/green_0.png"></form>
<script>
const target = "{target}", results = {{}};
const changes = [["relabel", {{path: "{suspect}", label: "blue"}}], ["quarantine", {{path: "green/green_0.png"}}],
                 ["keep", {{path: "green/green_1.png"}}], ["undo", {{}}], ["undo", {{}}]];
const later = (ms, value) => new Promise((done) => setTimeout(() => done(value), ms));
const loaded = (frame) => Promise.race([new Promise((done) => frame.onload = () => done("loaded")), later(5000, "timeout")]);
async function send(url, init) {{
  try {{ const r = await fetch(target + url, init); return `answered ${{r.type}} ${{r.status}}`; }}
  catch (error) {{ return "failed " + error.name; }}
}}
function probe(path) {{
  return new Promise((done) => {{
    const img = new Image();
    img.onload = () => done("load"); img.onerror = () => done("error");
    img.src = target + "api/image?path=" + encodeURIComponent(path);
  }});
}}
async function attack() {{
  const frames = Array.from(document.querySelectorAll("iframe"), loaded);
  for (const form of document.forms) form.submit();
  results.forms = await Promise.all(frames);
  for (const [op, body] of changes) {{
    const text = JSON.stringify(body);
    results["no-cors blob " + op] = await send("api/" + op, {{method: "POST", mode: "no-cors", body: new Blob([text])}});
    results["no-cors json blob " + op] = await send("api/" + op, {{method: "POST", mode: "no-cors",
      headers: {{"X-Imgtune-Token": "guess"}}, body: new Blob([text], {{type: "application/json"}})}});
    results["cors " + op] = await send("api/" + op, {{method: "POST", body: text,
      headers: {{"X-Imgtune-Token": "guess", "Content-Type": "application/json"}}}});
  }}
  results.items = await send("api/items", {{}});
  results.existing = await probe("{suspect}");
  results.missing = await probe("red/missing.png");
  document.body.dataset.done = "1";
}}
attack();
</script></body></html>"""


def attacker(target: str):
    """An app whose page attacks the cleaner at ``target``."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse

    app, page = FastAPI(), ATTACK.format(target=target, suspect=SUSPECT)
    app.get("/", response_class=HTMLResponse)(lambda: page)
    return app


@pytest.fixture
def servers(app):
    """The cleaner and, on another port, a page that attacks it."""
    for cleaner in serve_in_thread(app):
        for evil in serve_in_thread(attacker(cleaner)):
            yield cleaner, evil


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"], ids=["same-site", "cross-site"])
def test_a_page_from_another_origin_changes_nothing_and_learns_nothing(servers, data, host):
    executable = chromium_or_skip("uvicorn")
    from playwright.sync_api import sync_playwright

    cleaner, evil = servers
    before, log_before = snapshot(data), ChangeLog(data).batches()
    assert len(log_before) == 1
    statuses = []
    with sync_playwright() as p:
        browser = launch_chromium(p, executable)
        try:
            page = browser.new_page()
            page.on("response", lambda r: statuses.append((r.status, r.url)) if r.url.startswith(cleaner) else None)
            page.goto(evil.replace("127.0.0.1", host))
            page.wait_for_selector("body[data-done='1']", state="attached", timeout=30_000)
            results = page.evaluate("results")
        finally:
            browser.close()
    assert unchanged(data, before, log_before), results
    # The server refused every request that reached it (not only the browser hiding the answers).
    # (Playwright sees the forms and the no-cors fetches; the GETs fail in the browser, see the API tests.)
    assert len(statuses) >= 3 + 2 * 5 and {status for status, _ in statuses} == {403}, statuses
    assert results["existing"] == results["missing"] == "error"
    assert results["cors relabel"] == results["cors undo"] == "failed TypeError", results  # the preflight failed
    assert results["items"] == "failed TypeError"
