"""`python -m stage_stack ...` (and `accelerate launch -m stage_stack ...`) runs the CLI."""

from .cli import main

if __name__ == "__main__":
    main()
