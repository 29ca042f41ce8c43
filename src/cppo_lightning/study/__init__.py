"""``cppo study``: several methods x seeds on one config, trained, evaluated and compared alike.

:mod:`~cppo_lightning.study.command` runs it, :mod:`~cppo_lightning.study.settings` resolves the
methods and checks that a rerun shares the study's settings, :mod:`~cppo_lightning.study.runs`
reads one run's folder, :mod:`~cppo_lightning.study.report` holds the arithmetic and the tables,
:mod:`~cppo_lightning.study.plots` draws. See docs/study.md.
"""
