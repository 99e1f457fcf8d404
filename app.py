"""Chest X-ray model zoo demo (Gradio). Run ``python app.py`` and open http://127.0.0.1:7860.

Hugging Face Spaces imports this file and serves ``demo``.
"""

import logging
import os

from cxr_demo.ui import build_demo, launch_kwargs

logging.basicConfig(level=os.environ.get("CXR_DEMO_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

demo = build_demo()

if __name__ == "__main__":
    demo.queue(default_concurrency_limit=1).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        **launch_kwargs(),
    )
