"""``python -m microsnoop`` (and ``torchrun -m microsnoop``) runs the CLI."""
from .cli import main

main()
