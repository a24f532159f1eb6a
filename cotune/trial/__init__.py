"""The trial side: inside one trial's process, build the workload, train, measure.

Run as ``python -m cotune.trial CONFIG.json --result RESULT.json``. The entry point is
:func:`cotune.trial.train.train_and_measure`; this package's ``__init__`` imports nothing, so
starting the module costs no more than it must before the trial's clock is read.
"""
