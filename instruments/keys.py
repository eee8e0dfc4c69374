"""Built-in plugin: keys (piano, electric piano, organ, pads)."""

from stage_stack.hookspecs import hookimpl
from stage_stack.registry import Instrument

from . import bundled_expert


@hookimpl
def register_instruments(register):
    register(Instrument(
        name="keys",
        description="Keyboard chords (piano, electric piano, organ): the layer that sets the harmony.",
        default_prompt="electric piano playing the chords",
        default_gain_db=-6.0,  # harmonic bed: sits under drums and bass
        chain_position=20,  # before bass: the keys set the harmony, the bass follows its roots
        license="MIT",
        sources=[bundled_expert("keys")],
    ))
