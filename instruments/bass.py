"""Built-in plugin: bass."""

from stage_stack.hookspecs import hookimpl
from stage_stack.registry import Instrument

from . import bundled_expert


@hookimpl
def register_instruments(register):
    register(Instrument(
        name="bass",
        description="Bass line that follows the chord roots and the drums' rhythm.",
        default_prompt="warm electric bass following the chord roots",
        default_gain_db=-3.0,
        chain_position=30,  # after drums and keys: locks to the kick, follows the chord roots
        license="MIT",
        sources=[bundled_expert("bass")],
    ))
