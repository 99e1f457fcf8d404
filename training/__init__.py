"""Training, evaluation and publishing of the cxr_demo model zoo (imports cxr_demo, never the reverse)."""
