"""The studio: a local web page where a composer builds a song layer by layer.

    pip install -e ".[studio]"
    stage-stack studio songs/          # prints http://127.0.0.1:8765/

`session.Studio` holds the actions (on the library's Song/Arranger API, as the CLI), `jobs`
runs one generation at a time, `app` is the HTTP API and serves `static/` (the page).
"""
