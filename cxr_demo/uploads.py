"""Uploads: decoded once, then taken out of Gradio's cache so that no radiograph stays on disk."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path

from gradio.utils import get_upload_folder

from cxr_demo.images import XRay, read_xray

# Decoded uploads remembered for concurrent identical requests (see UploadStore): a bounded cache.
RECENT_UPLOAD_BYTES = 16 * 2**20
RECENT_UPLOAD_SECONDS = 60.0


def now() -> float:
    """The remembered uploads' clock (a module function, so tests can drive it)."""
    return time.monotonic()


class UploadStore:
    """Decodes uploads and deletes them from Gradio's cache as soon as they are decoded.

    The decoded image lives on in the browser session's ``gr.State`` (the UI's predict, explain and
    compare reuse it); an API call decodes its own upload and leaves nothing behind. Only files inside
    Gradio's upload folder are deleted, never an example image's cached copy (clicking the example
    again must work).

    Gradio stores an upload under a folder named by the sha256 of its bytes, so two requests that send
    the same file at once share one path: the first to finish would delete the other's file. Decoded
    uploads are therefore remembered in memory for ``recent_seconds`` after their last use (at most
    ``recent_bytes`` of pixels, oldest dropped first), keyed by that content-addressed path; a request
    whose file is gone or was just decoded reuses the decoded image instead of failing (or decoding it
    again).
    """

    def __init__(self, example_names: set[str], recent_bytes: int = RECENT_UPLOAD_BYTES,
                 recent_seconds: float = RECENT_UPLOAD_SECONDS) -> None:
        self.example_names = example_names
        self.recent_bytes = recent_bytes
        self.recent_seconds = recent_seconds
        self._recent: OrderedDict[str, tuple[float, XRay]] = OrderedDict()
        self._lock = threading.Lock()

    def _upload_key(self, path: str) -> str | None:
        """The resolved path of a file in Gradio's upload folder (content-addressed), else None."""
        p = Path(path).resolve()
        cache = Path(get_upload_folder()).resolve()
        if cache not in p.parents or p.name in self.example_names:
            return None
        return str(p)

    def discard(self, path: str | None) -> None:
        """Delete an uploaded file (and its per-upload folder when empty) from Gradio's cache."""
        if not path or self._upload_key(path) is None:
            return
        p = Path(path).resolve()
        p.unlink(missing_ok=True)
        try:
            p.parent.rmdir()  # Gradio puts each upload in a folder named by its hash
        except OSError:
            pass  # not empty or already gone

    def _recall(self, key: str) -> XRay | None:
        """A remembered decoded upload; each use keeps it another ``recent_seconds`` (clients sending the
        same file without pause keep deleting each other's copies, so it must outlive its first decode)."""
        t = now()
        with self._lock:
            while self._recent and t - next(iter(self._recent.values()))[0] > self.recent_seconds:
                self._recent.popitem(last=False)
            hit = self._recent.pop(key, None)
            if hit is None:
                return None
            self._recent[key] = (t, hit[1])  # most recently used last
            return hit[1]

    def _remember(self, key: str, xray: XRay) -> None:
        size = xray.pixels.nbytes
        if size > self.recent_bytes:
            return
        with self._lock:
            self._recent.pop(key, None)
            self._recent[key] = (now(), xray)
            while sum(x.pixels.nbytes for _, x in self._recent.values()) > self.recent_bytes:
                self._recent.popitem(last=False)

    def recent_count(self) -> int:
        """How many decoded uploads are remembered (for tests and monitoring)."""
        with self._lock:
            return len(self._recent)

    def take(self, path: str | None, state: XRay | None) -> XRay:
        """The image to analyse: a fresh upload (decoded, then deleted), else the session's decoded one.

        Raises:
            ImageInputError: nothing uploaded, or the file is not a readable chest X-ray.
        """
        key = self._upload_key(path) if path else None
        if key is not None:
            recent = self._recall(key)
            if recent is not None:
                self.discard(path)
                return recent
        if path and Path(path).is_file():
            try:
                xray = read_xray(path)
                if key is not None:
                    self._remember(key, xray)
                return xray
            finally:
                self.discard(path)
        if state is not None and (not path or Path(path).name == state.name):
            return state
        return read_xray(path)  # raises the sentence for a missing upload
