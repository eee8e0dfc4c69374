"""The studio's HTTP API and page (FastAPI): thin routes over `Studio` (stage_stack.studio.session).

    GET    /                                     the page (static/index.html)
    GET    /api/instruments                      the registry's list, with install commands
    GET    /api/songs                            song names
    POST   /api/songs                            start a song from a click        (requests.NewSong)
    POST   /api/songs/upload                     start a song on an uploaded mix  (multipart: file, name, bpm, seed)
    GET    /api/songs/{song}                     the song's state (layers, candidates, files, job)
    GET    /api/songs/{song}/files/{path}        an audio file the manifest lists
    POST   /api/songs/{song}/layers              add a layer (a job)              (requests.NewLayer)
    POST   /api/songs/{song}/layers/{layer}/redo redo it, or it and what follows (a job)
    POST   /api/songs/{song}/layers/{layer}/pick use another candidate
    DELETE /api/songs/{song}/layers/{layer}      remove a layer
    POST   /api/songs/{song}/mix                 new gains, re-render the mix
    POST   /api/songs/{song}/undo                back to the state before the last change
    GET    /api/songs/{song}/export.zip          stems + mix + click + MIDI + manifest (stage_stack.export)
    GET    /api/jobs, /api/jobs/{id}             progress and queue position; POST /api/jobs/{id}/cancel

Errors are JSON, {"error": message}, with the library's messages (the CLI prints the same):
400 bad input, 404 unknown song/file/job, 409 busy (a job of the studio, or another process
holding the song's lock, e.g. a `stage-stack add` in a terminal), 413 upload too large, 401 bad token, 422 a
request field out of its bounds (the message names the field).

With a token, every request must carry it: header `X-Studio-Token: T`, or `?token=T` (the
page adds it to the URLs it makes, since an <audio> or download link cannot set a header).
"""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import StageStackError
from ..export import ExportOptions, export_files, zip_bytes
from ..locks import LockBusyError
from .jobs import SongBusyError
from .requests import NewLayer, NewSong, Pick, Redo, Remix
from .session import NotFoundError, Studio

STATIC = Path(__file__).parent / "static"
TOKEN_HEADER = "x-studio-token"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(studio: Studio, token: str | None = None, allowed_hosts: tuple[str, ...] | None = None) -> FastAPI:
    """The studio's app. `allowed_hosts`: the Host header values accepted (None: any); the CLI
    sets the loopback names, so a web page elsewhere cannot reach a local studio by DNS rebinding."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        studio.jobs.stop()  # a running layer is cancelled before its commit point: the song stays as it was

    app = FastAPI(title="stage-stack studio", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.studio = studio

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]")
        if allowed_hosts is not None and host not in allowed_hosts:
            return _error(403, f"host {host!r} is not this studio's address; open it as http://127.0.0.1:PORT/")
        if token is not None:
            given = request.headers.get(TOKEN_HEADER) or request.query_params.get("token") or ""
            if not secrets.compare_digest(given.encode(), token.encode()):
                return _error(401, "this studio needs its token: open the URL the server printed (it ends in "
                                   "?token=...), or send the X-Studio-Token header")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > studio.max_upload_bytes + (1 << 20):
            return _error(413, f"the request is {int(length) / 1e6:.1f} MB; uploads are limited to "
                               f"{studio.max_upload_bytes / 1e6:g} MB. Trim or compress the audio (FLAC, MP3)")
        return await call_next(request)

    @app.exception_handler(StageStackError)
    async def library_error(request: Request, e: StageStackError):
        status = 404 if isinstance(e, NotFoundError) else 409 if isinstance(e, (SongBusyError, LockBusyError)) else 400
        if "larger than the limit" in str(e):
            status = 413
        return _error(status, str(e))

    @app.exception_handler(RequestValidationError)
    async def bad_field(request: Request, e: RequestValidationError):
        parts = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"] if p not in ("body", "query", "path", "form"))
            parts.append(f"field '{loc or '<request>'}': {err['msg']}")
        return _error(422, "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = "no such page or API route" if e.status_code == 404 else str(e.detail)
        return _error(e.status_code, f"{message}: {request.method} {request.url.path}")

    @app.exception_handler(KeyError)
    async def no_job(request: Request, e: KeyError):
        return _error(404, f"no job {e.args[0]!r}")

    # -- the page ---------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- reading ----------------------------------------------------------------------------
    @app.get("/api/instruments")
    def instruments():
        return {"instruments": studio.instruments()}

    @app.get("/api/songs")
    def songs():
        return {"songs": studio.song_names(), "root": str(studio.root)}

    @app.get("/api/songs/{song}")
    def song_state(song: str):
        return studio.state(song)

    @app.get("/api/songs/{song}/files/{rel:path}")
    def song_file(song: str, rel: str):
        return FileResponse(studio.audio_file(song, rel), media_type="audio/wav",
                            headers={"Cache-Control": "no-cache"})

    @app.get("/api/songs/{song}/export.zip")
    def export_zip(song: str, format: str = "wav", rate: int = 48000, stereo: bool = False):
        options = ExportOptions(format=format, rate=rate, stereo=stereo)
        directory = studio.song_dir(song)
        studio.jobs.check_idle(song)
        data = zip_bytes(export_files(directory, options))
        return Response(data, media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{song}.zip"'})

    # -- starting songs ---------------------------------------------------------------------
    @app.post("/api/songs")
    def new_song(request: NewSong):
        return studio.new_song(request)

    @app.post("/api/songs/upload")
    def upload(file: UploadFile = File(...), name: str = Form(...), bpm: float | None = Form(None),
               seed: int = Form(0)):
        return studio.upload_song(name, file.filename or "", file.file.read, bpm, seed)

    # -- layers -----------------------------------------------------------------------------
    @app.post("/api/songs/{song}/layers")
    def add_layer(song: str, request: NewLayer):
        return studio.job_json(studio.add_layer(song, request))

    @app.post("/api/songs/{song}/layers/{layer}/redo")
    def redo(song: str, layer: str, request: Redo):
        return studio.job_json(studio.redo_layer(song, layer, request))

    @app.post("/api/songs/{song}/layers/{layer}/pick")
    def pick(song: str, layer: str, request: Pick):
        return studio.pick(song, layer, request.candidate)

    @app.delete("/api/songs/{song}/layers/{layer}")
    def remove(song: str, layer: str):
        return studio.remove(song, layer)

    @app.post("/api/songs/{song}/undo")
    def undo(song: str):
        return studio.undo(song)

    @app.post("/api/songs/{song}/mix")
    def remix(song: str, request: Remix):
        return studio.remix(song, request.gains)

    # -- jobs -------------------------------------------------------------------------------
    @app.get("/api/jobs")
    def jobs():
        return {"jobs": [studio.job_json(job) for job in studio.jobs.jobs()]}

    @app.get("/api/jobs/{job_id}")
    def job(job_id: int):
        return studio.job_json(studio.jobs.get(job_id))

    @app.post("/api/jobs/{job_id}/cancel")
    def cancel(job_id: int):
        return studio.job_json(studio.jobs.cancel(job_id))

    return app
