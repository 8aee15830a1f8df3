"""Small denoisers: toy architectures for tests and smoke runs, and (later) trained references."""
