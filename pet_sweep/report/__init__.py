"""The report: it only reads a study and its MLflow runs, and loads neither torch nor fastai."""
