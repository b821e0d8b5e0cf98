"""`python -m server DB`: serve a database without the pipeline's dependencies installed."""

from saescope.server.cli import main

main()
