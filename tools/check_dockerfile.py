"""Run the Dockerfile's steps without Docker (no daemon on the development machines) and check the result.

    python tools/check_dockerfile.py            # prints each step, then PASS or the step that failed

It reads ``Dockerfile``, lays out ``WORKDIR`` in a fresh temporary folder with exactly what the ``COPY``
lines copy (so nothing else of the project, and no ``../shared/data`` beside it, just as in the image),
creates a fresh virtual environment for the ``RUN pip install`` lines, starts the ``CMD`` with the ``ENV``
settings, and then checks, through ``gradio_client``, that the app lists its models, offers the shipped
examples and answers ``/predict`` and ``/explain`` (with the radiologist's box) on the first example.

What differs from a real ``docker build``, on purpose and only this:
- ``FROM python:3.11-slim`` is replaced by this machine's ``python3`` (3.11) and its Debian userland;
- ``--index-url https://download.pytorch.org/whl/cpu`` is dropped, because that host is unreachable here;
  pip then takes torch 2.14.1 / torchvision 0.29.1 from the machine's wheel cache (a CUDA build that runs on
  the CPU, ~5.5 GB instead of the image's CPU build);
- ``useradd`` / ``USER`` are skipped (the steps run as the current user), ``EXPOSE`` is informational.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE_INDEX = re.compile(r"--index-url\s+https://download\.pytorch\.org/\S+\s*")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    steps = instructions(ROOT / "Dockerfile")
    base = Path(tempfile.mkdtemp(prefix="dockerfile-check-"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    for var in [v for v in env if v.startswith("CXR_DEMO_")]:
        del env[var]
    workdir = base
    cmd: list[str] | None = None
    for op, args in steps:
        print(f"--- {op} {args[:110]}", flush=True)
        if op == "FROM":
            print(f"    (using {sys.executable}, Python {sys.version.split()[0]})")
        elif op == "WORKDIR":
            workdir = base / args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif op == "COPY":
            parts = [a for a in shlex.split(args) if not a.startswith("--")]
            *sources, dest = parts
            target = workdir / dest
            for src in sources:
                path = ROOT / src
                if path.is_dir():
                    shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, target / path.name if dest.endswith("/") or dest == "." else target)
        elif op == "RUN":
            if "useradd" in args:
                print("    (skipped: runs as the current user)")
                continue
            command = UNREACHABLE_INDEX.sub("", args)
            subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=workdir, env=env, check=True)
        elif op == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", args):
                env[key] = value
        elif op == "CMD":
            import json

            cmd = json.loads(args)
        elif op in ("USER", "EXPOSE"):
            print("    (skipped)")
        else:
            raise SystemExit(f"unknown Dockerfile instruction {op}")
    assert cmd, "the Dockerfile has no CMD"
    port = free_port()
    env.update(GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), HOME=str(base))
    print(f"--- start {cmd} in {workdir} on port {port}", flush=True)
    server = subprocess.Popen(cmd, cwd=workdir, env=env, start_new_session=True)
    try:
        check(f"http://127.0.0.1:{port}/", venv, workdir)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    shutil.rmtree(base, ignore_errors=True)
    print("PASS: the Dockerfile's steps install, start and serve the app")
    return 0


CHECK = r"""
import sys, time
from gradio_client import Client, handle_file
url, workdir = sys.argv[1], sys.argv[2]
for _ in range(240):
    try:
        client = Client(url, verbose=False); break
    except Exception:
        time.sleep(1)
else:
    raise SystemExit("the app did not start within 240 s")
models = client.predict(api_name="/models")
print(f"    /models: {len(models)} models, default {models[0]['name']}")
import glob, os
examples = sorted(glob.glob(os.path.join(workdir, "examples", "*.png")))
assert examples, "no examples shipped in the image"
first = os.path.join(workdir, "examples", "00013118_008.png")
doc, _ = client.predict(handle_file(first), models[0]["name"], "f1", api_name="/predict")
print(f"    /predict on {os.path.basename(first)}: {len(doc['findings'])} findings, "
      f"{sum(r['positive'] for r in doc['findings'])} flagged at f1")
assert len(doc["findings"]) == 14
_, exp, _ = client.predict(handle_file(first), models[0]["name"], "Atelectasis", "gradcam", "", 0.5, 0.5,
                           api_name="/explain")
print(f"    /explain: ground truth from {exp['ground_truth_source']!r}, IoU {exp['iou']}")
assert exp["ground_truth_source"] == "NIH BBox_List_2017.csv" and exp["iou"] is not None
"""


def check(url: str, venv: Path, workdir: Path) -> None:
    subprocess.run([str(venv / "bin" / "python"), "-c", CHECK, url, str(workdir)], check=True)


if __name__ == "__main__":
    sys.exit(main())
