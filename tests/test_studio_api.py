"""The studio's HTTP API on the tiny test experts: every action, and the bad requests."""

from __future__ import annotations

import io
import json
import threading
import zipfile

import numpy as np
import pytest
import soundfile as sf

from arranger_helpers import SR, band  # noqa: F401
from studio_helpers import make_app

from fastapi.testclient import TestClient  # noqa: E402

from stage_stack import Song  # noqa: E402
from stage_stack.studio.jobs import JobQueue  # noqa: E402


@pytest.fixture
def studio_client(band, tmp_path):
    studio, app = make_app(band, tmp_path / "songs")
    with TestClient(app) as client:
        yield studio, client


def wait(studio, job):
    done = studio.jobs.wait(job["id"], timeout=300)
    assert done.state == "done", done.error
    return done


def new_song(client, name="s1", **fields):
    r = client.post("/api/songs", json={"name": name, "bpm": 100, "duration": 1.0, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_song_through_every_action(studio_client, tmp_path):
    studio, client = studio_client
    assert client.get("/").status_code == 200 and "stage-stack studio" in client.get("/").text
    names = {row["name"]: row for row in client.get("/api/instruments").json()["instruments"]}
    assert names["drums"]["installed"] and names["bass"]["installed"]

    state = new_song(client)
    assert (state["bpm"], state["duration"], state["layers"]) == (100, 1.0, [])
    assert client.get("/api/songs").json()["songs"] == ["s1"]

    job = client.post("/api/songs/s1/layers", json={"instrument": "drums", "candidates": 2, "seed": 3,
                                                    "sampling": {"temperature": 0.9, "top_k": 50, "cfg": 2.0}}).json()
    assert job["action"] == "add drums" and job["position"] in (0, 1)
    wait(studio, job)
    job = client.post("/api/songs/s1/layers", json={"instrument": "bass"}).json()
    finished = wait(studio, job)
    assert finished.steps > 0 and finished.step == finished.steps  # progress reached the last decoding step
    state = client.get("/api/songs/s1").json()
    drums, bass = state["layers"]
    assert (drums["name"], len(drums["candidates"]), drums["picked"], drums["seed"]) == ("drums", 2, 0, 3)
    assert drums["sampling"] == {"temperature": 0.9, "top_k": 50, "cfg": 2.0}
    assert not bass["stale"]

    # every file the page is given can be fetched, and is the song's audio
    audio, rate = sf.read(io.BytesIO(client.get(drums["candidates"][1]).content), dtype="float32")
    assert rate == SR and np.array_equal(audio, Song.open(tmp_path / "songs" / "s1").candidates["drums"][1])

    # pick: the mix follows, and bass (which heard the other candidate) is stale
    mix_before = client.get(state["mix"]).content
    state = client.post("/api/songs/s1/layers/drums/pick", json={"candidate": 1}).json()
    assert state["layers"][0]["picked"] == 1 and state["layers"][1]["stale"]
    assert client.get(state["mix"]).content != mix_before

    # redo one layer, then it and everything after
    wait(studio, client.post("/api/songs/s1/layers/bass/redo", json={"seed": 9}).json())
    state = client.get("/api/songs/s1").json()
    assert (state["layers"][1]["take"], state["layers"][1]["seed"], state["layers"][1]["stale"]) == (2, 9, False)
    job = client.post("/api/songs/s1/layers/drums/redo", json={"seed": 4, "downstream": True}).json()
    assert job["action"] == "redo drums and later layers"
    wait(studio, job)
    state = client.get("/api/songs/s1").json()
    assert [layer["take"] for layer in state["layers"]] == [2, 3]

    # re-mix with gains
    state = client.post("/api/songs/s1/mix", json={"gains": {"bass": -6.0}}).json()
    assert state["layers"][1]["gain_db"] == -6.0

    # download: stems + mix + click + MIDI + manifest
    r = client.get("/api/songs/s1/export.zip?rate=44100")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        assert sorted(z.namelist()) == ["click.wav", "manifest.json", "mix.wav", "stems/bass.wav", "stems/drums.wav",
                                        "tempo.mid"]
        assert json.loads(z.read("manifest.json"))["layers"][1]["gain_db"] == -6.0

    # remove; the CLI's view of the directory is the same
    state = client.request("DELETE", "/api/songs/s1/layers/bass").json()
    assert [layer["name"] for layer in state["layers"]] == ["drums"]
    assert Song.open(tmp_path / "songs" / "s1").layers == ["drums"]
    assert [h["action"] for h in state["history"]][:3] == ["remove", "mix", "redo"]  # newest first
    assert state["history"][0]["current"] and state["can_undo"]

    # undo brings the removed layer back, with its take, pick and gain; undo again goes further back
    state = client.post("/api/songs/s1/undo").json()
    assert [(l["name"], l["take"], l["gain_db"]) for l in state["layers"]] == [("drums", 2, 0.0), ("bass", 3, -6.0)]
    assert state["history"][0]["action"] == "undo"
    state = client.post("/api/songs/s1/undo").json()
    assert state["layers"][1]["gain_db"] == 0.0  # before the re-mix
    assert np.array_equal(Song.open(tmp_path / "songs" / "s1").mix, sf.read(io.BytesIO(client.get(state["mix"]).content),
                                                                            dtype="float32")[0])


def test_cli_changes_show_in_the_studio(studio_client, tmp_path, band):
    from click.testing import CliRunner

    from stage_stack.cli import arrange as _commands  # noqa: F401
    from stage_stack.cli import cli

    studio, client = studio_client
    new_song(client, duration=1.0)
    directory = tmp_path / "songs" / "s1"
    result = CliRunner().invoke(cli, ["add", str(directory), "drums", "--expert", f"drums={band['drums']}",
                                      "--candidates", "2", "-q"])
    assert result.exit_code == 0, result.output
    assert [layer["name"] for layer in client.get("/api/songs/s1").json()["layers"]] == ["drums"]
    client.post("/api/songs/s1/layers/drums/pick", json={"candidate": 1})
    result = CliRunner().invoke(cli, ["show", str(directory)])
    assert "candidate 1 of 2" in result.output


def test_upload_a_context(studio_client):
    studio, client = studio_client
    t = np.arange(int(1.5 * 22050)) / 22050
    buffer = io.BytesIO()
    sf.write(buffer, np.stack([np.sin(2 * np.pi * 220 * t)] * 2, axis=1) * 0.3, 22050, format="FLAC")
    r = client.post("/api/songs/upload", data={"name": "up", "bpm": "90"},
                    files={"file": ("my mix.flac", buffer.getvalue(), "audio/flac")})
    assert r.status_code == 200, r.text
    state = r.json()
    assert state["context"]["source"] == "my mix.flac" and state["bpm"] == 90 and state["duration"] == 1.5
    assert client.get(state["context"]["file"]).status_code == 200
    assert not (studio.root / ".studio-uploads").exists()  # the upload was removed once read


def test_bad_requests(studio_client, band, tmp_path):
    studio, client = studio_client
    new_song(client)
    # path traversal, in a song name, a file path and a layer field
    for url in ["/api/songs/..%2F..%2Fetc", "/api/songs/s1/files/../../manifest.json", "/api/songs/s1/files/manifest.json",
                "/api/songs/s1/files/%2Fetc%2Fpasswd"]:
        r = client.get(url)
        assert r.status_code in (400, 404) and "error" in r.json(), url
    r = client.post("/api/songs", json={"name": "../escape", "bpm": 100})
    assert r.status_code == 422 and "field 'name'" in r.json()["error"]
    r = client.post("/api/songs/s1/layers", json={"instrument": "drums", "name": "../../x"})
    assert r.status_code == 422 and "field 'name'" in r.json()["error"]
    assert not (tmp_path / "escape").exists() and not (tmp_path / "x").exists()
    # fields out of bounds, unknown fields, unknown instruments and layers: the library's messages
    r = client.post("/api/songs/s1/layers", json={"instrument": "drums", "candidates": 99})
    assert r.status_code == 422 and "field 'candidates'" in r.json()["error"]
    r = client.post("/api/songs/s1/layers", json={"instrument": "drums", "colour": "red"})
    assert r.status_code == 422 and "colour" in r.json()["error"]
    r = client.post("/api/songs/s1/layers", json={"instrument": "tuba"})
    assert r.status_code == 400 and "tuba" in r.json()["error"]
    r = client.post("/api/songs/s1/layers/nope/pick", json={"candidate": 0})
    assert r.status_code == 400 and "has no layer 'nope'" in r.json()["error"]
    r = client.post("/api/songs", json={"name": "s1"})
    assert r.status_code == 400 and "already exists" in r.json()["error"]
    assert client.get("/api/songs/none").status_code == 404
    assert client.get("/api/jobs/999").status_code == 404
    # a non-audio upload, one with a wrong extension, and an oversized one
    r = client.post("/api/songs/upload", data={"name": "u1"}, files={"file": ("mix.wav", b"not audio" * 100, "audio/wav")})
    assert r.status_code == 400 and "not an audio file" in r.json()["error"]
    r = client.post("/api/songs/upload", data={"name": "u2"}, files={"file": ("notes.txt", b"hello", "text/plain")})
    assert r.status_code == 400 and "expected an audio file" in r.json()["error"]
    assert studio.song_names() == ["s1"]


def test_oversized_upload(band, tmp_path):
    studio, app = make_app(band, tmp_path / "songs", max_upload_bytes=1000)
    with TestClient(app) as client:
        r = client.post("/api/songs/upload", data={"name": "big"}, files={"file": ("big.wav", b"\0" * 5000, "audio/wav")})
        assert r.status_code == 413 and "limit" in r.json()["error"]
        huge = b"\0" * (3 << 20)  # past the Content-Length check: refused before it is read
        r = client.post("/api/songs/upload", data={"name": "big"}, files={"file": ("big.wav", huge, "audio/wav")})
        assert r.status_code == 413
    assert studio.song_names() == [] and not (studio.root / ".studio-uploads").exists()


def test_token(band, tmp_path):
    studio, app = make_app(band, tmp_path / "songs", token="s3cret")
    with TestClient(app) as client:
        for url in ["/", "/api/songs", "/static/studio.js"]:
            r = client.get(url)
            assert r.status_code == 401 and "token" in r.json()["error"]
        assert client.get("/api/songs", headers={"X-Studio-Token": "wrong"}).status_code == 401
        assert client.get("/api/songs", headers={"X-Studio-Token": "s3cret"}).status_code == 200
        assert client.get("/api/songs?token=s3cret").status_code == 200
        assert client.post("/api/songs", json={"name": "t"}).status_code == 401
    assert studio.song_names() == []


def test_second_writer_is_busy_and_cancel_keeps_the_song(studio_client, tmp_path):
    studio, client = studio_client
    new_song(client, duration=1.0)
    wait(studio, client.post("/api/songs/s1/layers", json={"instrument": "drums"}).json())
    before = (tmp_path / "songs" / "s1" / "manifest.json").read_text()
    # hold the worker inside the next job's first progress report
    entered, release = threading.Event(), threading.Event()
    real_report = JobQueue._report

    def held(self, job, progress):
        entered.set()
        release.wait(30)
        real_report(self, job, progress)

    JobQueue._report = held
    try:
        job = client.post("/api/songs/s1/layers", json={"instrument": "bass"}).json()
        assert entered.wait(30)
        r = client.post("/api/songs/s1/layers/drums/pick", json={"candidate": 0})
        assert r.status_code == 409 and "busy" in r.json()["error"] and "add bass" in r.json()["error"]
        assert client.post("/api/songs/s1/layers", json={"instrument": "keys"}).status_code == 409
        assert client.get("/api/songs/s1/export.zip").status_code == 409
        # a job on another song queues behind it, with its position
        new_song(client, name="s2")
        queued = client.post("/api/songs/s2/layers", json={"instrument": "drums"}).json()
        assert queued["state"] == "queued" and queued["position"] == 1
        assert client.get("/api/songs/s1").json()["job"]["state"] == "running"
        client.post(f"/api/jobs/{queued['id']}/cancel")
        client.post(f"/api/jobs/{job['id']}/cancel")
    finally:
        release.set()
        JobQueue._report = real_report
    assert studio.jobs.wait(job["id"], timeout=60).state == "cancelled"
    assert client.get(f"/api/jobs/{queued['id']}").json()["state"] == "cancelled"
    assert (tmp_path / "songs" / "s1" / "manifest.json").read_text() == before  # nothing committed
    assert Song.open(tmp_path / "songs" / "s1").layers == ["drums"]
    assert client.post("/api/songs/s1/layers/drums/pick", json={"candidate": 0}).status_code == 200


def test_stopping_the_server_mid_layer_loses_nothing(band, tmp_path):
    studio, app = make_app(band, tmp_path / "songs")
    entered = threading.Event()
    real_report = JobQueue._report

    def slow(self, job, progress):
        entered.set()
        real_report(self, job, progress)

    with TestClient(app) as client:
        new_song(client)
        wait(studio, client.post("/api/songs/s1/layers", json={"instrument": "drums"}).json())
        before = (tmp_path / "songs" / "s1" / "manifest.json").read_text()
        JobQueue._report = slow
        try:
            job = client.post("/api/songs/s1/layers", json={"instrument": "bass", "candidates": 3}).json()
            assert entered.wait(30)
        finally:
            JobQueue._report = real_report
    # leaving the client runs the app's shutdown: the running layer is cancelled, not committed
    assert studio.jobs.get(job["id"]).state in ("cancelled", "done")
    song = Song.open(tmp_path / "songs" / "s1")
    if studio.jobs.get(job["id"]).state == "cancelled":
        assert (tmp_path / "songs" / "s1" / "manifest.json").read_text() == before and song.layers == ["drums"]
    else:
        assert song.layers == ["drums", "bass"]


def test_another_process_holding_the_song_is_busy(studio_client, tmp_path):
    import subprocess
    import sys
    import textwrap

    studio, client = studio_client
    new_song(client)
    directory = tmp_path / "songs" / "s1"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from stage_stack.arrangement import Arrangement
        with Arrangement({str(directory)!r}).lock(False):
            print("held", flush=True)
            sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = client.post("/api/songs/s1/undo")
        assert r.status_code == 409 and "is being changed by process" in r.json()["error"]
    finally:
        holder.communicate("\n", timeout=30)


def test_studio_command_binds_locally_and_needs_a_token_elsewhere(band, tmp_path, monkeypatch):
    import uvicorn
    from click.testing import CliRunner

    from stage_stack.cli import cli
    from stage_stack.cli import studio as _studio_command  # noqa: F401

    runs = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: runs.append((app, host, port)))
    experts = [f"--expert={name}={path}" for name, path in band.items()]
    result = CliRunner().invoke(cli, ["studio", str(tmp_path / "songs"), "--host", "0.0.0.0", *experts])
    assert result.exit_code == 1 and "--token" in result.output and not runs
    result = CliRunner().invoke(cli, ["studio", str(tmp_path / "songs"), "--port", "9999", *experts])
    assert result.exit_code == 0, result.output
    assert runs[-1][1:] == ("127.0.0.1", 9999) and "http://127.0.0.1:9999/" in result.output
    local = TestClient(runs[-1][0], base_url="http://127.0.0.1:9999")
    assert local.get("/api/songs").status_code == 200
    r = TestClient(runs[-1][0], base_url="http://evil.example:9999").get("/api/songs")  # DNS rebinding
    assert r.status_code == 403 and "not this studio's address" in r.json()["error"]
    result = CliRunner().invoke(cli, ["studio", str(tmp_path / "songs"), "--host", "0.0.0.0", "--token", "t0k",
                                      *experts])
    assert result.exit_code == 0 and "?token=t0k" in result.output
    with TestClient(runs[-1][0]) as client:  # the app it would serve requires the token
        assert client.get("/api/songs").status_code == 401
        assert client.get("/api/songs?token=t0k").json()["songs"] == []


def test_uninstalled_instruments_come_with_their_install_command(band, tmp_path, monkeypatch):
    from stage_stack import Arranger
    from stage_stack.registry import Registry
    from stage_stack.studio.app import create_app
    from stage_stack.studio.session import Studio

    monkeypatch.setenv("STAGE_STACK_HOME", str(tmp_path / "home"))  # no installed experts
    studio = Studio(tmp_path / "songs", Arranger(band, registry=Registry.load()))
    with TestClient(create_app(studio)) as client:
        rows = {row["name"]: row for row in client.get("/api/instruments").json()["instruments"]}
        assert rows["guitar"]["installed"] is False
        assert rows["guitar"]["install"] == "stage-stack install guitar PATH_OR_URL"
        assert rows["drums"]["installed"] and rows["drums"]["install"] is None
        new_song(client)
        r = client.post("/api/songs/s1/layers", json={"instrument": "guitar"})
        assert r.status_code == 400 and "stage-stack install guitar" in r.json()["error"]


def test_a_layer_added_in_the_page_can_hear_chosen_layers(studio_client):
    studio, client = studio_client
    new_song(client)
    wait(studio, client.post("/api/songs/s1/layers", json={"instrument": "drums", "candidates": 2}).json())
    wait(studio, client.post("/api/songs/s1/layers", json={"instrument": "keys"}).json())
    wait(studio, client.post("/api/songs/s1/layers", json={"instrument": "bass", "hears": ["keys"]}).json())
    state = client.get("/api/songs/s1").json()
    assert [layer["hears"] for layer in state["layers"]] == [None, None, ["keys"]]
    state = client.post("/api/songs/s1/layers/drums/pick", json={"candidate": 1}).json()
    assert [layer["stale"] for layer in state["layers"]] == [False, True, False]  # the bass did not hear the drums
    r = client.post("/api/songs/s1/layers", json={"instrument": "bass", "name": "bass2", "hears": ["lead"]})
    assert r.status_code == 400 and "hears 'lead', which is not an earlier layer" in r.json()["error"]
    r = client.post("/api/songs/s1/layers", json={"instrument": "bass", "name": "bass3", "hears": ["../x"]})
    assert r.status_code == 422 and "field 'hears" in r.json()["error"]
