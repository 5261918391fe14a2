"""The demo: a private bus, spectrumd on demo/config.json, two guests started and stopped.

Both instances run one application from one shared root image (Debian's
python3-minimal, made by scripts/mkimage.sh and cached). Run by ``make
demo``; exits 0 when both guests printed their application's output
(python3's answer included) and stopped gracefully. Everything it starts it
ends, by pid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "demo" / "config.json"
INSTANCES = ("work-shell", "home-shell")
GUEST_OUTPUT = "network:"
# What python3, which only the image holds, prints: sha256(b"spectrum").
PYTHON_OUTPUT = "python3: sha256(spectrum) = " + hashlib.sha256(b"spectrum").hexdigest()


def ctl(address: str, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "spectrumd.cli", "--bus", address, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if r.returncode != 0:
        raise SystemExit(f"spectrumctl {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def wait_for_output(address: str, name: str, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = ctl(address, "logs", name)
        if GUEST_OUTPUT in log:
            return log
        time.sleep(0.5)
    raise SystemExit(f"{name} printed nothing within {timeout:.0f}s")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="spectrum-demo.", dir="/tmp"))
    # The demo's bridges and taps live in a namespace of its own, never the host's.
    netns = f"spectrum-demo-{os.getpid()}"
    bus = daemon = None
    try:
        image = json.loads(CONFIG.read_text())["applications"]["shell"]["root_image"]
        step(f"building the application's root image {image} (cached)")
        subprocess.run(
            ["sh", str(ROOT / "scripts" / "mkimage.sh"), "--packages", "python3-minimal", image],
            check=True,
        )
        step(f"creating the network namespace {netns}")
        subprocess.run(["ip", "netns", "add", netns], check=True)
        step("starting a private D-Bus daemon")
        bus = subprocess.Popen(
            [
                "dbus-daemon",
                "--session",
                "--nofork",
                "--nopidfile",
                f"--address=unix:path={work}/bus",
                "--print-address=1",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert bus.stdout is not None
        address = bus.stdout.readline().strip()
        print(address)

        step(f"starting spectrumd with {CONFIG.relative_to(ROOT)}")
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "spectrumd",
                "--bus",
                address,
                "--config",
                str(CONFIG),
                "--state-dir",
                str(work / "state"),
                "--netns",
                netns,
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for _ in range(100):
            try:
                ctl(address, "list")
                break
            except SystemExit:
                time.sleep(0.1)
        print(ctl(address, "list"), end="")

        for name in INSTANCES:
            step(f"spectrumctl start {name}")
            t0 = time.monotonic()
            ctl(address, "start", name)
            print(f"{name}: VMM running after {time.monotonic() - t0:.2f}s")

        step("spectrumctl list")
        print(ctl(address, "list"), end="")
        step(f"the network's bridge and tap, in {netns}")
        print(
            subprocess.run(
                ["ip", "-n", netns, "-br", "link"], capture_output=True, text=True
            ).stdout,
            end="",
        )

        for name in INSTANCES:
            step(f"output of {name} (spectrumctl logs {name})")
            log = wait_for_output(address, name)
            for line in log.splitlines():
                if line.strip():
                    print(f"  {line}")
            if PYTHON_OUTPUT not in log:
                raise SystemExit(f"{name} did not print python3's answer from its image")
            print(ctl(address, "status", name), end="")

        for name in INSTANCES:
            step(f"spectrumctl stop {name}")
            t0 = time.monotonic()
            ctl(address, "stop", name)
            print(f"{name}: stopped in {time.monotonic() - t0:.2f}s")
            print(ctl(address, "status", name), end="")

        step("spectrumctl list")
        print(ctl(address, "list"), end="")
        print("\ndemo finished")
        return 0
    finally:
        for proc in (daemon, bus):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        subprocess.run(["ip", "netns", "delete", netns], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
