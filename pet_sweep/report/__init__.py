"""The report: it only reads a study and its MLflow runs, and loads neither torch nor fastai.

`read` opens the stores and hands plain records to `analysis` (the study), which reads each
trial with `verdicts` and puts numbers on its doubt with `stats`; `render` writes the text,
Markdown and HTML, `figures` the plots (the report's, and each trial's own while it trains).
"""
