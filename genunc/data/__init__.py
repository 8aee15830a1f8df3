"""Data sets genunc reads from installed packages (QM9 from qm9pack, digits from scikit-learn)."""
