"""`python -m streamvln.dagger` (and `torchrun -m streamvln.dagger`): the streamvln-dagger command."""

from .cli import main

main()
