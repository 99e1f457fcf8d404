"""Chest X-ray model zoo demo (Gradio). Run ``python app.py`` and open http://127.0.0.1:7860.

Hugging Face Spaces imports this file and serves ``demo``.
"""

import logging
import os
import threading

from cxr_demo.ui import build_demo, launch_kwargs
from cxr_demo.zoo import Zoo

logging.basicConfig(level=os.environ.get("CXR_DEMO_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

zoo = Zoo()
demo = build_demo(zoo)


def warm_default_model() -> None:
    """Load the default model (and the CAM library) in the background once the page is up, so the
    first request does not pay for them; models stay lazily loaded otherwise."""
    try:
        if zoo.names:
            zoo.model(zoo.names[0])
            zoo.ood(zoo.names[0])
        import pytorch_grad_cam  # noqa: F401
    except Exception:  # a broken checkpoint is reported when it is asked for, not here
        logging.getLogger(__name__).exception("warming the default model failed")


if __name__ == "__main__":
    demo.queue(default_concurrency_limit=1).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        prevent_thread_lock=True,
        **launch_kwargs(),
    )
    threading.Thread(target=warm_default_model, name="warm-default-model", daemon=True).start()
    demo.block_thread()
