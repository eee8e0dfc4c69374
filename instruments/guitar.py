"""Built-in plugin: guitar."""

from stage_stack.hookspecs import hookimpl
from stage_stack.registry import Instrument

from . import bundled_expert


@hookimpl
def register_instruments(register):
    register(Instrument(
        name="guitar",
        description="Rhythm or lead guitar over the existing parts.",
        default_prompt="clean electric guitar strumming the chords",
        default_gain_db=-6.0,
        chain_position=40,
        license="MIT",
        sources=[bundled_expert("guitar")],
    ))
