"""Built-in plugin: drums."""

from stage_stack.hookspecs import hookimpl
from stage_stack.registry import Instrument

from . import bundled_expert


@hookimpl
def register_instruments(register):
    register(Instrument(
        name="drums",
        description="Drum kit (kick, snare, hi-hats, fills) that locks to the context's beat or a click.",
        default_prompt="tight drum kit groove, punchy kick and snare",
        default_gain_db=-2.0,
        chain_position=10,  # first: every later layer follows the groove
        pitched=False,  # no chords to hear in it
        license="MIT",
        sources=[bundled_expert("drums")],
    ))
