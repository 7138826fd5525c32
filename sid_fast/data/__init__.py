"""Data: the bundled digits set (scikit-learn's handwritten digits as an array file) of the embedded default."""
