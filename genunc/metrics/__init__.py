"""Sample-quality metrics, per modality."""
