"""`python -m saescope.server DB`: serve a database without the pipeline's dependencies."""

from saescope.server.cli import serve

serve()
