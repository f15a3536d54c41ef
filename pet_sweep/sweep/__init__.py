"""Optuna: the trial records, the storage, the sampler and pruner, one trial (objective),
one worker's sweep (loop), the budget its workers share, the sweep's parent run in
MLflow (parent), and the cleaning up after a killed process (lifecycle)."""
