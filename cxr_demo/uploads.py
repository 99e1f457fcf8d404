"""Uploads: decoded once, then taken out of Gradio's cache so that no radiograph stays on disk."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from gradio.utils import get_upload_folder

from cxr_demo.images import ImageInputError, XRay, read_xray

# Decoded uploads remembered for concurrent identical requests (see UploadStore): a bounded cache.
RECENT_UPLOAD_BYTES = 16 * 2**20
RECENT_UPLOAD_SECONDS = 60.0


NOT_YOUR_UPLOAD = ("This file is not an upload of this client, or its upload is over a minute old; please upload "
                   "the film again.")
# One upload request may carry at most this many files (the app needs one): more are deleted and refused.
MAX_FILES_PER_UPLOAD = 4


def now() -> float:
    """The remembered uploads' clock (a module function, so tests can drive it)."""
    return time.monotonic()


def client_identity(headers: Mapping[str, str], host: str | None) -> str:
    """Who sent a request: the first X-Forwarded-For address (behind a Space's proxy), else the peer address."""
    forwarded = (headers.get("x-forwarded-for") or "").split(",")[0].strip()
    return forwarded or host or "unknown"


class UploadLedger:
    """Which client uploaded which file (by resolved path), for :data:`RECENT_UPLOAD_SECONDS`.

    A decoded upload that was remembered for identical concurrent requests is handed only to a client that
    uploaded those bytes itself: a path seen in a log and replayed by someone else gets nothing.
    """

    def __init__(self) -> None:
        self._by_path: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    def record(self, paths: list[str], who: str) -> None:
        t = now()
        with self._lock:
            for key in list(self._by_path):
                self._by_path[key] = {w: s for w, s in self._by_path[key].items() if t - s <= RECENT_UPLOAD_SECONDS}
                if not self._by_path[key]:
                    del self._by_path[key]
            for p in paths:
                self._by_path.setdefault(str(Path(p).resolve()), {})[who] = t

    def uploaded(self, key: str, who: str) -> bool:
        with self._lock:
            seen = self._by_path.get(key, {}).get(who)
        return seen is not None and now() - seen <= RECENT_UPLOAD_SECONDS


LEDGER = UploadLedger()

MIB = 2**20


class UploadRate:
    """How many bytes clients may upload: a token bucket per client (:func:`client_identity`) and one for all
    clients together, since an address given in X-Forwarded-For can be forged and the shared bucket bounds what
    forging gets. A request is charged its Content-Length, at least ``min_charge`` (a flood of tiny uploads counts
    too); one without a Content-Length is charged ``min_charge`` before and the rest after (the next ones wait).
    Each bucket holds a minute of its rate. At most ``max_clients`` buckets are remembered (full ones go first)."""

    def __init__(self, client_mib_per_minute: float = 512, total_mib_per_minute: float = 2048,
                 min_charge: int = MIB, max_clients: int = 4096, clock=None) -> None:
        self.client_bytes = client_mib_per_minute * MIB
        self.total_bytes = total_mib_per_minute * MIB
        self.min_charge, self.max_clients = min_charge, max_clients
        self.clock = clock or now
        self._buckets: dict[str, tuple[float, float]] = {}  # who -> (bytes left, when)
        self._lock = threading.Lock()

    def _level(self, who: str, capacity: float, t: float) -> float:
        left, when = self._buckets.get(who, (capacity, t))
        return min(capacity, left + (t - when) * capacity / 60.0)

    def take(self, who: str, nbytes: int | None) -> tuple[float, str | None]:
        """Charge ``who`` for an upload of ``nbytes`` (None: unknown); (0, None) when it may go ahead, else the
        seconds to wait and whose budget ran out (``"client"`` or ``"server"``), nothing charged."""
        cost = max(self.min_charge, nbytes or 0)
        t = self.clock()
        with self._lock:
            mine = self._level(who, self.client_bytes, t)
            everyone = self._level("", self.total_bytes, t)
            if cost > mine:
                return (cost - mine) * 60.0 / self.client_bytes, "client"
            if cost > everyone:
                return (cost - everyone) * 60.0 / self.total_bytes, "server"
            self._buckets[who] = (mine - cost, t)
            self._buckets[""] = (everyone - cost, t)
            if len(self._buckets) > self.max_clients:
                self._forget(t)
        return 0.0, None

    def charge(self, who: str, nbytes: int) -> None:
        """Charge bytes already received (an upload without a Content-Length), even below zero."""
        t = self.clock()
        with self._lock:
            self._buckets[who] = (self._level(who, self.client_bytes, t) - nbytes, t)
            self._buckets[""] = (self._level("", self.total_bytes, t) - nbytes, t)

    def _forget(self, t: float) -> None:
        full = [w for w in self._buckets if w and self._level(w, self.client_bytes, t) >= self.client_bytes]
        for w in full:
            del self._buckets[w]
        while len(self._buckets) > self.max_clients:  # all still refilling: the oldest go
            oldest = min((w for w in self._buckets if w), key=lambda w: self._buckets[w][1])
            del self._buckets[oldest]


UPLOAD_RATE = UploadRate()


def too_many_uploads(wait_s: float, whose: str, rate: UploadRate) -> str:
    """The sentence of a 429 answer to an upload."""
    if whose == "server":
        return (f"This server is receiving more uploads than it can take right now; try again in {math.ceil(wait_s)} "
                "s.")
    return (f"Too many uploads from this address: at most {rate.client_bytes / MIB:.0f} MiB a minute (each upload "
            f"counts at least {rate.min_charge / MIB:.0f} MiB). Try again in {math.ceil(wait_s)} s.")


class UploadGuard:
    """ASGI middleware on Gradio's upload route: refuses a client over its upload rate before anything is read
    (:data:`UPLOAD_RATE`; 429 with a sentence and Retry-After), records who uploaded each file (:data:`LEDGER`)
    and refuses a request carrying more than :data:`MAX_FILES_PER_UPLOAD` files (they are deleted once Gradio
    has stored them; the answer is 413 with a sentence)."""

    def __init__(self, app, max_files: int = MAX_FILES_PER_UPLOAD, rate: UploadRate | None = None) -> None:
        self.app = app
        self.max_files = max_files
        self.rate = rate  # None: the module's UPLOAD_RATE, looked up per request

    async def refuse(self, send, status: int, text: str, extra_headers: list | None = None) -> None:
        data = text.encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(data)).encode())] + (extra_headers or [])})
        await send({"type": "http.response.body", "body": data, "more_body": False})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].rstrip("/").endswith("/upload"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        who = client_identity(headers, (scope.get("client") or (None,))[0])
        rate = self.rate or UPLOAD_RATE
        try:
            declared = int(headers["content-length"]) if "content-length" in headers else None
        except ValueError:
            declared = None
        wait_s, whose = rate.take(who, declared)
        if whose is not None:
            await self.refuse(send, 429, too_many_uploads(wait_s, whose, rate),
                              [(b"retry-after", str(math.ceil(wait_s)).encode())])
            return
        received = 0

        async def receive_counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        start: dict = {}
        body: list[bytes] = []
        stored: list[str] = []

        async def send_checked(message):
            if message["type"] == "http.response.start":
                start.update(message)  # held back until the body says how many files were stored
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            body.append(message.get("body", b""))
            if message.get("more_body"):
                return
            data = b"".join(body)
            paths = []
            if start.get("status") == 200:
                try:
                    paths = [p for p in json.loads(data) if isinstance(p, str)]
                except (ValueError, TypeError):
                    paths = []
            if len(paths) > self.max_files:
                stored.extend(paths)
                data = (f"At most {self.max_files} files per upload request; this one carried {len(paths)} and "
                        "none was kept.").encode()
                start.update(status=413, headers=[(b"content-type", b"text/plain; charset=utf-8"),
                                                  (b"content-length", str(len(data)).encode())])
            elif paths:
                LEDGER.record(paths, who)
            await send(start)
            await send({"type": "http.response.body", "body": data, "more_body": False})

        await self.app(scope, receive if declared is not None else receive_counted, send_checked)
        if declared is None and received > rate.min_charge:
            rate.charge(who, received - rate.min_charge)
        # Gradio moves the files into place in background work that may end after the response: look for them
        # a few times (the client has its 413 already).
        # The content-hash folder is left for ResultCleaner (see UploadStore.discard).
        for attempt in range(20):
            for p in stored:
                Path(p).unlink(missing_ok=True)
            if attempt >= 4 and not any(Path(p).exists() for p in stored):
                break
            await asyncio.sleep(0.25)


class UploadStore:
    """Decodes uploads and deletes them from Gradio's cache as soon as they are decoded.

    The decoded image lives on in the browser session's ``gr.State`` (the UI's predict, explain and
    compare reuse it); an API call decodes its own upload and leaves nothing behind. Only files inside
    Gradio's upload folder are deleted, never an example image's cached copy (clicking the example
    again must work): ``kept`` gives those copies' paths (the app's :func:`~cxr_demo.ui.kept_files`). An upload
    is told from them by its path, not its name: a film uploaded under an example's name is a patient's film
    and goes like any other.

    Gradio stores an upload under a folder named by the sha256 of its bytes, so two requests that send
    the same file at once share one path: the first to finish would delete the other's file. Decoded
    uploads are therefore remembered in memory for ``recent_seconds`` after their last use (at most
    ``recent_bytes`` of pixels, oldest dropped first), keyed by that content-addressed path; a request
    whose file is gone or was just decoded reuses the decoded image instead of failing (or decoding it
    again).
    """

    def __init__(self, kept: Callable[[], Iterable[str]] = frozenset, recent_bytes: int = RECENT_UPLOAD_BYTES,
                 recent_seconds: float = RECENT_UPLOAD_SECONDS) -> None:
        self.kept = kept
        self.recent_bytes = recent_bytes
        self.recent_seconds = recent_seconds
        self._recent: OrderedDict[str, tuple[float, XRay]] = OrderedDict()
        self._lock = threading.Lock()

    def _upload_key(self, path: str) -> str | None:
        """The resolved path of a file in Gradio's upload folder (content-addressed), else None (also for an
        example film's kept copy)."""
        p = Path(path).resolve()
        cache = Path(get_upload_folder()).resolve()
        if cache not in p.parents or p in {Path(k).resolve() for k in self.kept()}:
            return None
        return str(p)

    def discard(self, path: str | None) -> None:
        """Delete an uploaded file from Gradio's cache.

        Its folder (named by the sha256 of the file's bytes) stays: a request uploading the same file at this
        moment may be between Gradio's ``mkdir(exist_ok=True)`` of that folder and its move of the file into it,
        and removing the folder then fails that upload (FileExistsError or FileNotFoundError, a 500). The
        periodic :class:`~cxr_demo.ui.ResultCleaner` removes folders that have stayed empty for minutes."""
        if not path or self._upload_key(path) is None:
            return
        Path(path).resolve().unlink(missing_ok=True)

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

    def take(self, path: str | None, state: XRay | None, who: str | None = None) -> XRay:
        """The image to analyse: a fresh upload (decoded, then deleted), else the session's decoded one.

        ``who`` (the client, :func:`client_identity`; None outside a server) must have uploaded the file itself
        to be handed a remembered decode of it.

        Raises:
            ImageInputError: nothing uploaded, or the file is not a readable chest X-ray.
        """
        key = self._upload_key(path) if path else None
        if key is not None and who is not None and not LEDGER.uploaded(key, who):
            raise ImageInputError(NOT_YOUR_UPLOAD)
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
