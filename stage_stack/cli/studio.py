"""`stage-stack studio`: the local web page (stage_stack.studio); needs `pip install -e ".[studio]"`."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import click

from . import cli
from .arrange import arranger_options, make_arranger, user_errors

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_local(host: str) -> bool:
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@cli.command()
@click.argument("songs_dir", required=False, default="songs", type=click.Path(file_okay=False, path_type=Path))
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Any address but the loopback needs --token.")
@click.option("--token", help="A secret every request must carry (required for a non-local --host).")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
@click.option("--max-upload-mb", type=click.IntRange(1, 2000), default=200, show_default=True)
@arranger_options
@click.pass_context
def studio(ctx, songs_dir, port, host, token, open_browser, max_upload_mb, experts, device_map, max_memory, dtype,
           quiet):
    """Serve the studio for the songs in SONGS_DIR (default ./songs): build, audition, pick, export."""
    try:
        import uvicorn

        from ..studio.app import create_app
        from ..studio.session import Studio
    except ImportError as e:
        raise click.ClickException(f"the studio needs its extra ({e.name} is missing): pip install -e \".[studio]\" "
                                   "(or pip install \"stage-stack[studio]\")") from None
    if not is_local(host) and not token:
        raise click.ClickException(f"--host {host} makes the studio reachable from other machines; set a secret "
                                   "with --token TOKEN (every request must then carry it), or use --host 127.0.0.1")
    with user_errors():
        arranger = make_arranger(ctx, experts, device_map, max_memory, dtype)
        app = create_app(Studio(songs_dir, arranger, max_upload_bytes=max_upload_mb * 1024 * 1024), token=token,
                         allowed_hosts=LOCAL_HOSTS if is_local(host) else None)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    click.echo(f"stage-stack studio: songs in {Path(songs_dir).resolve()}\n  open {url}\n  Ctrl-C stops it "
               "(a layer being generated is not kept; the song stays as it was)")
    if open_browser:
        import threading
        import webbrowser

        threading.Timer(1.0, webbrowser.open, [url]).start()
    uvicorn.run(app, host=host, port=port, log_level="warning")
