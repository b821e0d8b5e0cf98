"""`python -m saescope.cli`: the `saescope` command."""

from saescope.cli import main

main()
