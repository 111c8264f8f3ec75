"""Evaluation: one engine for every caller, and the pieces it is made of, one concern per module.

=========================  ========================================================================================
:mod:`klal.eval.engine`    the one loop over (method x rows) and :func:`~klal.eval.engine.evaluate` (``evaluate.py``)
:mod:`klal.eval.config`    the evaluation (``EvalConfig``) and its method rows (``MethodSpec``)
:mod:`klal.eval.cli`       ``evaluate.py`` / ``klal evaluate``
:mod:`klal.eval.attention` per-sample attention grids of captured query tokens, teacher-forced answer scores, and the
                           teacher-forced attention as a method (what the study and the demo measure)
:mod:`klal.eval.generate`  greedy answers to dataset rows, with the one decoder (:mod:`klal.decode`)
:mod:`klal.eval.answers`   answer normalisation and :func:`~klal.eval.answers.answer_correct`
:mod:`klal.eval.scores`    per-sample scores: pointing game, evidence mass, target KL, box IoU
:mod:`klal.eval.metrics`   the torchmetrics classes and :class:`~klal.eval.metrics.GroundingMetrics` (DDP-synced sums)
:mod:`klal.eval.report`    the markdown table, gallery PNGs, the range check and file-name slugs
=========================  ========================================================================================

Callers: ``evaluate.py`` (:func:`~klal.eval.engine.evaluate`), the :class:`~klal.callbacks.GroundingProbes`
callback, the reproduction study (``studies/reproduce``) and the demo (``studies/demo.py``) all run
:func:`~klal.eval.engine.run_method`. Evidence cells come from :func:`klal.data.targets.evidence_cells`, beside the
training target maps. Submodules are imported on use, so ``import klal.eval`` loads nothing heavy.

Public benchmarks (docs/benchmarks.md): :mod:`klal.eval.benchmark_scores` scores one answer as V*, TextVQA, POPE or
RefCOCO score it, :mod:`klal.eval.benchmarks` per method and task (with reference rows and the paper-shaped table), and
:mod:`klal.eval.html_report` writes ``report.html``, one card per sample, to browse in a browser.
"""
