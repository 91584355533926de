"""weightship: move open-weight models to where they run, verifying every byte."""

__version__ = "0.1.0"
