"""The ``tileseg`` command line (installed as the ``tilesegment.cli`` package)."""
