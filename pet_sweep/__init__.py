"""pet-sweep: Optuna sweeps of fastai fine-tunes (fastbook chapter 5), every trial logged to MLflow."""

__version__ = "0.1.0"
