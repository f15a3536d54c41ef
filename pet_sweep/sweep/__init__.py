"""Optuna: the trial records, the storage, the sampler and pruner, one trial (objective),
one worker's sweep (loop), and the budget its workers share."""
