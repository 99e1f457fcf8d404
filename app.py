"""Chest X-ray model zoo demo (Gradio). Run ``python app.py`` and open http://127.0.0.1:7860.

Hugging Face Spaces imports this file and serves ``demo``.
"""

import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path


def private_temp_dir() -> Path:
    """Gradio's upload and cache folder for this app alone (``GRADIO_TEMP_DIR`` when set): emptied at start,
    so nothing of a patient survives a crash or a restart."""
    if os.environ.get("GRADIO_TEMP_DIR"):
        return Path(os.environ["GRADIO_TEMP_DIR"])
    folder = Path(tempfile.gettempdir()) / f"cxr-demo-gradio-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    return folder


from cxr_demo.memory import MemoryTrimmer, limit_malloc_arenas  # noqa: E402 - standard library only

limit_malloc_arenas()
TEMP_DIR = private_temp_dir()

from cxr_demo.ui import ResultCleaner, build_demo, configure_queue, delete_old_files, launch_kwargs  # noqa: E402 - after the two settings above
from cxr_demo.zoo import Zoo  # noqa: E402

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


def shut_down(*_) -> None:
    """On SIGTERM (a Space or container stopping): stop serving and delete every file the app created."""

    logging.getLogger(__name__).info("shutting down: deleting the app's temporary files")
    demo.close()
    delete_old_files(demo, None)
    if TEMP_DIR.name.startswith("cxr-demo-gradio"):  # our private folder, never a GRADIO_TEMP_DIR given to us
        shutil.rmtree(TEMP_DIR, ignore_errors=True)
    sys.exit(0)


if __name__ == "__main__":
    configure_queue(demo).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        prevent_thread_lock=True,
        **launch_kwargs(demo),
    )
    signal.signal(signal.SIGTERM, shut_down)
    ResultCleaner(demo).start()  # results nobody fetched go 2 minutes after they are made
    trim_every_s = float(os.environ.get("CXR_DEMO_TRIM_EVERY_S", "15"))  # 0: never (for comparisons)
    if trim_every_s > 0:  # freed heap pages back to the system once RSS grew 256 MiB since the last trim
        MemoryTrimmer(trim_every_s, grow_mib=float(os.environ.get("CXR_DEMO_TRIM_GROW_MIB", "256"))).start()
    threading.Thread(target=warm_default_model, name="warm-default-model", daemon=True).start()
    demo.block_thread()
