"""Built-in plugin: keys (piano, electric piano, organ, pads)."""

from stage_stack.hookspecs import hookimpl
from stage_stack.registry import Instrument

from . import bundled_expert


@hookimpl
def register_instruments(register):
    register(Instrument(
        name="keys",
        description="Keyboard chords (piano, electric piano, organ) voiced over the bass line.",
        default_prompt="electric piano playing the chords",
        default_gain_db=-6.0,  # harmonic bed: sits under drums and bass
        chain_position=30,
        license="MIT",
        sources=[bundled_expert("keys")],
    ))
