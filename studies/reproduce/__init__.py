"""The small-scale reproduction of the KLAL paper's comparison (``python -m studies.reproduce --config ...``).

:mod:`studies.reproduce.pipeline` holds the importable pieces (config, data, training, evaluation);
:mod:`studies.reproduce.run` strings them into stages and writes the report (docs/reproduce.md);
:mod:`studies.reproduce.protocol` holds the rules a study must pass before it runs (confirmatory configs committed
before their results, pilots off the confirmatory data), :mod:`studies.reproduce.baselines` the reference rows and the
answers' tokenization, and :mod:`studies.reproduce.stats` the tests over seeds and over test items.
"""
