"""The build job: one streaming pass over a source into every feature's accumulators, then the
analysis and the evaluation, written to a database (`job`)."""
