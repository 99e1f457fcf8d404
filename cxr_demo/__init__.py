"""cxr_demo: a chest X-ray model zoo and its Gradio demo (research use, not for diagnosis)."""

__version__ = "0.1.0"

INTENDED_USE = "Research demo, not for diagnostic use."
