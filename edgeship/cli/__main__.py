"""`python -m edgeship.cli`: the same as the `edgeship` command."""

from edgeship.cli import main

main()
