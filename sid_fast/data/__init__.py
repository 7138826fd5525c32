"""Data: the bundled digits set (scikit-learn's handwritten digits) used by the embedded default."""
