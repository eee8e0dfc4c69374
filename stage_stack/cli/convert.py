"""`stage-stack convert ...`: import upstream checkpoints as expert files."""
from . import cli  # noqa: F401
