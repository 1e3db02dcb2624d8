"""The cleaning page: suspects first, relabel and quarantine move files, undo moves them back, no path escapes."""

from __future__ import annotations

import csv
import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import COLOURS, chromium_or_skip, launch_chromium, make_class_folders, noisy_image, serve_in_thread, watch_page

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from imgtune.curate.clean import THUMBNAIL, TOKEN_HEADER, CleanSession, create_app
from imgtune.curate.changelog import ChangeLog, quarantine_dir

SUSPECT = "red/looks_blue.png"


def mean_colour(paths) -> torch.Tensor:
    """Features a logistic regression separates the colour classes with."""
    return torch.tensor(np.array([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32).mean((0, 1)) / 255
                                  for p in paths]))


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def data(tmp_path):
    root = make_class_folders(tmp_path / "colours", n=8)
    noisy_image(COLOURS["blue"], 32, seed=999).save(root / SUSPECT)
    return root


def page_client(session: CleanSession, base_url: str = "http://127.0.0.1") -> TestClient:
    """A client that sends the session's token, as the page does."""
    app = create_app(session)
    return TestClient(app, base_url=base_url, headers={TOKEN_HEADER: app.state.token})


@pytest.fixture
def client(data):
    return page_client(CleanSession(data, features=mean_colour))


def test_the_most_suspicious_image_comes_first(client):
    answer = client.get("/api/items").json()
    assert answer["classes"] == sorted(COLOURS) and answer["mode"] == "folders"
    first = answer["items"][0]
    assert first["path"] == SUSPECT and first["label"] == "red" and first["predicted"] == "blue"
    assert len(answer["items"]) == 25
    probabilities = [item["given_probability"] for item in answer["items"]]
    assert probabilities == sorted(probabilities)
    image = client.get("/api/image", params={"path": SUSPECT})
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"


def test_relabel_quarantine_keep_and_undo_through_the_api(client, data):
    before = snapshot(data)
    assert client.post("/api/relabel", json={"path": SUSPECT, "label": "blue"}).json()["path"] == "blue/looks_blue.png"
    assert (data / "blue" / "looks_blue.png").is_file() and not (data / SUSPECT).exists()
    assert client.post("/api/quarantine", json={"path": "green/green_0.png"}).status_code == 200
    assert (quarantine_dir(data) / "green" / "green_0.png").is_file()
    assert client.post("/api/keep", json={"path": "red/red_1.png"}).json()["status"] == "kept"
    assert len(client.get("/api/log").json()["batches"]) == 3
    # A quarantined image can no longer be changed.
    assert client.post("/api/keep", json={"path": "green/green_0.png"}).status_code == 404
    for _ in range(3):
        assert client.post("/api/undo", json={}).json() == {"undone": 1}
    assert client.post("/api/undo", json={}).json() == {"undone": 0}
    assert snapshot(data) == before
    items = {item["path"]: item for item in client.get("/api/items").json()["items"]}
    assert items[SUSPECT]["label"] == "red" and items[SUSPECT]["status"] == ""
    assert items["green/green_0.png"]["status"] == ""


def test_a_relabel_never_overwrites(client, data):
    noisy_image(COLOURS["blue"], 32, seed=5).save(data / "blue" / "looks_blue.png")  # the name is taken
    answer = client.post("/api/relabel", json={"path": SUSPECT, "label": "blue"}).json()
    assert answer["path"] == "blue/looks_blue-1.png"
    assert client.post("/api/relabel", json={"path": "red/red_2.png", "label": "purple"}).status_code == 400


STAY_INSIDE = "paths must stay inside the data folder"  # the `..` / absolute path guard's answer
RELATIVE = "give the image's path relative to the data folder"
NOT_AN_IMAGE = "not one of the images being cleaned"


@pytest.mark.parametrize("path, status, why", [
    ("../outside.png", 400, STAY_INSIDE), ("red/../../outside.png", 400, STAY_INSIDE),
    # Stays inside the folder, but only the `..` guard refuses it: without that guard it is a 404.
    ("red/../red/red_0.png", 400, STAY_INSIDE), ("/etc/passwd", 400, STAY_INSIDE),
    ("~/outside.png", 400, STAY_INSIDE), ("C:/outside.png", 400, STAY_INSIDE),
    ("", 400, RELATIVE), ("red\\..\\..\\outside.png", 400, RELATIVE),
    ("red/nothing.png", 404, NOT_AN_IMAGE), ("%2e%2e/outside.png", 404, NOT_AN_IMAGE),
])
def test_paths_from_the_page_never_leave_the_data_folder(client, data, path, status, why):
    outside = data.parent / "outside.png"
    noisy_image(COLOURS["red"], 32, seed=3).save(outside)
    before = snapshot(data.parent)
    detail = why if why == RELATIVE else f"{path}: {why}"
    for url, body in [("/api/quarantine", {"path": path}), ("/api/relabel", {"path": path, "label": "blue"}),
                      ("/api/keep", {"path": path})]:
        answer = client.post(url, json=body)
        assert (answer.status_code, answer.json()) == (status, {"detail": detail}), (url, path)
    answer = client.get("/api/image", params={"path": path})
    assert (answer.status_code, answer.json()) == (status, {"detail": detail})
    assert snapshot(data.parent) == before


def test_a_thumbnail_is_at_most_256_pixels_a_side(tmp_path):
    root = make_class_folders(tmp_path / "big", n=4)
    noisy_image(COLOURS["red"], 32, seed=6).resize((1000, 700)).save(root / "red" / "wide.png")
    client = page_client(CleanSession(root, features=mean_colour))
    answer = client.get("/api/image", params={"path": "red/wide.png"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    thumbnail = Image.open(io.BytesIO(answer.content))
    assert THUMBNAIL == 256 and thumbnail.format == "JPEG"
    assert thumbnail.size == (256, 179)  # 1000 x 700 scaled by 256 / 1000, rounded


def test_a_symlink_out_of_the_data_folder_is_refused(data, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    noisy_image(COLOURS["red"], 32, seed=4).save(secret / "private.png")
    try:
        (data / "red" / "link.png").symlink_to(secret / "private.png")
        (data / "green" / "linked_dir").symlink_to(secret, target_is_directory=True)
    except OSError:
        pytest.skip("no symlinks here")
    client = page_client(CleanSession(data, features=mean_colour))
    for path in ("red/link.png", "green/linked_dir/private.png"):
        assert client.post("/api/quarantine", json={"path": path}).status_code == 400
        assert client.get("/api/image", params={"path": path}).status_code == 400
    assert (secret / "private.png").is_file() and (data / "red" / "link.png").is_symlink()


def test_only_local_host_names_are_served(data):
    app = create_app(CleanSession(data, features=mean_colour))
    token = {TOKEN_HEADER: app.state.token}
    assert TestClient(app, base_url="http://evil.example", headers=token).get("/api/items").status_code == 400
    assert TestClient(app, base_url="http://localhost", headers=token).get("/api/items").status_code == 200


def test_a_relabel_finds_the_class_folder_by_its_place_not_its_name(tmp_path):
    # The data folder sits in a folder named like a class, its split folders are train/ and valid/, and
    # one class is called "train": the class folder is the one right below the split folder.
    root = tmp_path / "train" / "photos"
    for split in ("train", "valid"):
        for label, colour in (("train", COLOURS["red"]), ("blue", COLOURS["blue"])):
            (root / split / label).mkdir(parents=True)
            for i in range(4):
                noisy_image(colour, 32, seed=hash((split, label, i)) % 1000).save(root / split / label / f"{label}_{i}.png")
    before = snapshot(root)
    client = page_client(CleanSession(root, features=mean_colour))
    moves = {"train/train/train_0.png": ("blue", "train/blue/train_0.png"),
             "valid/train/train_1.png": ("blue", "valid/blue/train_1.png"),
             "train/blue/blue_2.png": ("train", "train/train/blue_2.png")}
    for path, (label, moved) in moves.items():
        answer = client.post("/api/relabel", json={"path": path, "label": label})
        assert answer.status_code == 200 and answer.json()["path"] == moved, answer.text
        assert (root / moved).is_file() and not (root / path).exists()
    from imgtune.data.loaders import find_items

    labels = {Path(item.path).relative_to(root).as_posix(): (item.label, item.split) for item in find_items(root).items}
    assert labels["train/blue/train_0.png"] == ("blue", "train") and labels["valid/blue/train_1.png"] == ("blue", "valid")
    assert labels["train/train/blue_2.png"] == ("train", "train") and len(labels) == 16
    for _ in moves:
        assert client.post("/api/undo", json={}).json() == {"undone": 1}
    assert snapshot(root) == before
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["photos", "photos.quarantine"]  # the log


def test_csv_data_is_relabelled_in_its_rows(tmp_path):
    root = make_class_folders(tmp_path / "flat", n=6)
    rows = [(f"{c}/{p.name}", c) for c in sorted(COLOURS) for p in sorted((root / c).iterdir())]
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as handle:
        csv.writer(handle).writerows([("file", "label"), *rows])
    client = page_client(CleanSession(root, csv_path=table, features=mean_colour))
    assert client.post("/api/relabel", json={"path": "red/red_0.png", "label": "green"}).status_code == 200
    assert ["red/red_0.png", "green"] in [r for r in csv.reader(open(table))]
    assert (root / "red" / "red_0.png").is_file()  # the file stays where it is
    assert client.post("/api/undo", json={}).json() == {"undone": 1}
    assert ["red/red_0.png", "red"] in [r for r in csv.reader(open(table))]


def test_ranking_by_a_runs_model(tmp_path, data):
    from conftest import TINY
    from imgtune import Learner, load_data

    learner = Learner.from_data(load_data(data, valid_pct=0.25, stratify=True, seed=0), **TINY)
    learner.fit_one_cycle(1, 1e-2)
    learner.save(tmp_path / "run")
    session = CleanSession(data, run_dir=tmp_path / "run")
    assert len(session.entries) == 25 and set(e.predicted for e in session.entries) <= set(COLOURS)
    given = [e.given_probability for e in session.entries]
    assert given == sorted(given)


@pytest.fixture
def served(data):
    yield from serve_in_thread(create_app(CleanSession(data, features=mean_colour)))


def test_the_page_in_a_real_browser(served, data, tmp_path):
    executable = chromium_or_skip("uvicorn")
    from playwright.sync_api import sync_playwright

    artifacts = Path(os.environ.get("IMGTUNE_ARTIFACTS", tmp_path / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    before = snapshot(data)
    errors = []
    with sync_playwright() as p:
        browser = launch_chromium(p, executable)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            watch_page(page, errors)
            page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            page.goto(served)
            page.wait_for_selector(".card")
            first = page.locator(".card").first
            assert first.get_attribute("data-path") == SUSPECT
            page.wait_for_function("() => document.querySelector('.card img').naturalWidth > 0")

            # Relabel the suspect as blue (the page proposes the predicted class).
            first.locator("select.label").select_option("blue")
            first.locator("button.relabel").click()
            page.wait_for_selector(".card[data-path='blue/looks_blue.png'].relabelled")
            # Quarantine another image.
            page.locator(".card[data-path='green/green_3.png'] button.quarantine").click()
            page.wait_for_selector(".card.quarantined")
            page.screenshot(path=str(artifacts / "clean-page.png"), full_page=True)
            assert (data / "blue" / "looks_blue.png").is_file() and not (data / SUSPECT).exists()
            assert not (data / "green" / "green_3.png").exists()
            assert (quarantine_dir(data) / "green" / "green_3.png").is_file()

            # The class filter shows one class.
            page.locator("#filter").select_option("green")
            labels = page.locator(".card .about").all_inner_texts()
            assert labels and all(text.startswith("label green") for text in labels)
            page.locator("#filter").select_option("")

            for _ in range(2):
                page.locator("#undo").click()
                page.wait_for_selector("#status:has-text('undid 1 change')")
                page.evaluate("() => document.getElementById('status').textContent = ''")
            page.wait_for_selector(f".card[data-path='{SUSPECT}']:not(.relabelled)")
        finally:
            browser.close()
    assert errors == []
    assert snapshot(data) == before
    assert ChangeLog(data).batches() == []


def test_page_changes_are_undone_from_the_cli(client, data):
    from click.testing import CliRunner

    from imgtune.cli import cli

    before = snapshot(data)
    client.post("/api/relabel", json={"path": SUSPECT, "label": "blue"})
    client.post("/api/quarantine", json={"path": "red/red_3.png"})
    assert snapshot(data) != before
    result = CliRunner().invoke(cli, ["doctor", str(data), "--undo"])  # the log is shared with doctor --fix
    assert result.exit_code == 0 and "undid 2 changes" in result.output, result.output
    assert snapshot(data) == before
    result = CliRunner().invoke(cli, ["clean", str(data), "--undo"])
    assert result.exit_code == 0 and "undid 0 changes" in result.output, result.output
