"""The small-scale reproduction of the KLAL paper's comparison (``python -m studies.reproduce --config ...``).

:mod:`studies.reproduce.pipeline` holds the importable pieces (config, data, training, evaluation);
:mod:`studies.reproduce.run` strings them into stages and writes the report (docs/reproduce.md).
"""
