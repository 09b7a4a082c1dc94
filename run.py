#!/usr/bin/env python3
"""The project's entry script: `python3 run.py demo`, `python3 run.py test`
(and `python3 run.py bench` for the benchmarks, `python3 run.py lint` for the
linters).

Extra arguments go to the command: `python3 run.py test -k pool`,
`python3 run.py demo --store /tmp/store`. `python3 run.py test --fast` is the
fast lane: every test not marked `slow` (subprocess servers, real kills,
benchmarks, full-size models).

Each command creates (or reuses) the virtual environment `.venv` beside this
file, installs what lora_ckpt needs into it, and runs in it. It needs nothing
but Python 3.10+ with the venv module and pip.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".lora_ckpt-install-stamp"


# tfimm's metadata says Python < 3.11, but it is pure Python and works on 3.11
# with TF 2.21 + tf_keras: it is installed on its own, ignoring that bound.
def _tfimm_requirement() -> str:
    """The tfimm pin, read from setup.cfg: the one place it is written."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    requirements = config["options"]["install_requires"].splitlines()
    return next(r.strip() for r in requirements if r.strip().startswith("tfimm"))


TFIMM = _tfimm_requirement()

# Each command is one or more steps; extra arguments go to every step.
COMMANDS = {
    # Test files spread over up to 4 processes (pytest-xdist), a file's tests in
    # one: its module fixtures (a server, a Ray cluster) start once. `-n 0` runs
    # everything in this process.
    "test": [
        [
            str(PYTHON),
            "-m",
            "pytest",
            "-q",
            "-n",
            "auto",
            "--maxprocesses",
            "4",
            "--dist",
            "loadfile",
            "tests",
        ]
    ],
    "demo": [[str(PYTHON), "-m", "lora_ckpt.cli", "demo"]],
    "bench": [[str(PYTHON), str(ROOT / "benchmarks" / "run.py")]],
    # ruff's settings live in pyproject.toml.
    "lint": [
        [str(PYTHON), "-m", "ruff", "check", "."],
        [str(PYTHON), "-m", "ruff", "format", "--check", "."],
    ],
}
# Optional dependencies each command needs (setup.cfg extras).
EXTRAS = {"test": "test,scale,train", "demo": "test", "bench": "test,bench,scale", "lint": "test"}
# System packages each command needs (Debian names, installed with apt-get where
# it exists, as root, as on CI): the console's browser tests drive Debian's
# Chromium through its chromedriver. Without them those tests skip, saying why.
APT = {"test": ["chromium", "chromium-driver"]}
APT_STAMP = VENV / ".lora_ckpt-apt-stamp"
# Options run.py itself understands, per command, and what they become.
OPTIONS = {"test": {"--fast": ["-m", "not slow"]}}


def _install_fingerprint(extras: str) -> str:
    digest = hashlib.sha256((TFIMM + extras).encode())
    for name in ("setup.cfg", "setup.py"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def _pip(*args: str) -> None:
    subprocess.run([str(PYTHON), "-m", "pip", "install", "--quiet", *args], check=True)


def ensure_environment(extras: str) -> None:
    """Creates .venv and installs the project (with ``extras``) into it, unless already done."""
    if not PYTHON.exists():
        print(f"Creating virtual environment in {VENV} ...", flush=True)
        venv.create(VENV, with_pip=True)
    fingerprint = _install_fingerprint(extras)
    if STAMP.exists() and STAMP.read_text() in (
        fingerprint,
        _install_fingerprint("test,bench,scale"),
    ):
        return
    print(
        "Installing lora_ckpt and its dependencies (first run takes a few minutes) ...", flush=True
    )
    _pip("--ignore-requires-python", "--no-deps", TFIMM)
    _pip("-e", f"{ROOT}[{extras}]")
    STAMP.write_text(fingerprint)


def _apt_installed(package: str) -> bool:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
    )
    return result.returncode == 0 and result.stdout.strip() == "install ok installed"


def ensure_system_packages(command: str) -> None:
    """Installs ``APT[command]`` with apt-get if missing, once: an attempt that
    failed (no network, no root) is not repeated until the list changes; what
    needs them then skips with the reason."""
    packages = APT.get(command, [])
    if not packages or shutil.which("apt-get") is None or shutil.which("dpkg-query") is None:
        return
    missing = [p for p in packages if not _apt_installed(p)]
    if not missing:
        return
    attempt = " ".join(packages)
    if APT_STAMP.exists() and APT_STAMP.read_text() == attempt:
        return  # tried before and failed: said so then
    APT_STAMP.write_text(attempt)
    if os.geteuid() != 0:
        print(
            f"Not root: install {' '.join(missing)} with `sudo apt-get install -y "
            f"{' '.join(missing)}` for the browser tests (they skip without them).",
            flush=True,
        )
        return
    print(f"Installing {' '.join(missing)} with apt-get (the browser tests) ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for step in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        if subprocess.run(step, env=env).returncode:
            print(f"`{' '.join(step)}` failed: the browser tests will skip.", flush=True)
            return


def main(argv) -> int:
    if len(argv) < 2 or argv[1] not in COMMANDS:
        print(f"usage: python3 run.py {{{'|'.join(COMMANDS)}}} [args...]", file=sys.stderr)
        return 2
    command, extra = argv[1], []
    for arg in argv[2:]:
        extra += OPTIONS.get(command, {}).get(arg, [arg])
    ensure_environment(EXTRAS[command])
    ensure_system_packages(command)
    # Level 3: TensorFlow's C++ ERROR lines on a machine without a GPU (a failed
    # cuInit) are noise; its real errors raise in Python.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"))
    for step in COMMANDS[command]:
        returncode = subprocess.run(step + extra, cwd=ROOT, env=env).returncode
        if returncode:
            return returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
