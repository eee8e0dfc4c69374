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
        chain_position=20,  # after drums, so it can lock to the kick
        license="MIT",
        sources=[bundled_expert("bass")],
    ))
