"""The hooks a stage-stack plugin can implement.

A plugin is a module (or any object) with functions decorated by `stage_stack.hookimpl` whose
names are the hooks below. Plugins come from three places (see `stage_stack.plugins`): the
built-in modules in `stage_stack.instruments`, packages exposing an entry point in the group
`stage_stack`, and `*.py` files in a plugins directory. A hook implementation may take any subset
of the hook's arguments, by name.

    import stage_stack
    from stage_stack.registry import Instrument, PathSource

    @stage_stack.hookimpl
    def register_instruments(register):
        register(Instrument(name="strings", description="...", sources=[PathSource(path="...")]))
"""

from __future__ import annotations

import pluggy

PROJECT = "stage_stack"  # the pluggy project name and the entry-point group

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_instruments(register):
    """Register instruments.

    Call `register(instrument)` once per `stage_stack.registry.Instrument` this plugin provides:
    its name, description, default prompt, default mix gain (dB), suggested chain position and
    the sources of its expert weights. Two plugins registering the same name is a conflict that
    the user's registry.yaml settles with `instruments: NAME: plugin: PLUGIN`.
    """


@hookspec
def register_commands(cli):
    """Add commands to the `stage-stack` command line.

    `cli` is a click group: decorate functions with `@cli.command()` or `@cli.group()`. A plugin
    command cannot replace a built-in one (the built-in wins and the clash is reported).
    """
