"""guarded-serving: guarded, explained, fairness-monitored model serving on BentoML."""

__version__ = "0.1.0"
