"""The embedded demo: the committed demo language model (`model/`, reproduced by
`language_model`), its corpus (`corpus`), and the demo SAE and database (`builder`).

    saescope demo --data data/demo          # builds what is missing, then serves
"""
