"""`python -m streamvln.rl`: the streamvln-rl command."""

from .cli import main

main()
