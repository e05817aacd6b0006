"""Build llama.cpp's own server, ``llama-server``: the second real engine of the tests.

    python upstream/build_llama_server.py var/llama.cpp

It compiles the llama.cpp sources vendored in the llama-cpp-python source distribution of the
version the project pins (constraints.txt), so both engines run the same llama.cpp. The sdist is
fetched from the package index at build time (``pip download``), never at run time; the build
lives in ``DEST/build`` and the binary is ``DEST/build/bin/llama-server``. A second run with the
binary present does nothing (``make`` also skips it); a run after an interrupted build resumes
the CMake build where it stopped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pinned_version() -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and name.strip().lower() in ("llama-cpp-python", "llama_cpp_python"):
            return version.strip()
    raise SystemExit("constraints.txt pins no llama-cpp-python")


def main(argv: list[str]) -> int:
    dest = Path(argv[0] if argv else "var/llama.cpp").resolve()
    binary = dest / "build" / "bin" / "llama-server"
    if binary.exists():
        print(f"{binary} is built")
        return 0
    version = pinned_version()
    dest.mkdir(parents=True, exist_ok=True)
    sdist = dest / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--disable-pip-version-check",
                "--no-binary",
                ":all:",
                "--no-deps",
                "--dest",
                str(dest),
                f"llama-cpp-python=={version}",
            ],
            check=True,
        )
    source = dest / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not source.is_dir():
        with tarfile.open(sdist) as archive:
            archive.extractall(dest, filter="data")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    build = dest / "build"
    subprocess.run(
        [
            "cmake",
            "-S",
            str(source),
            "-B",
            str(build),
            *generator,
            "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=OFF",
            "-DLLAMA_CURL=OFF",  # no model downloads: the tests pass the model file
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=ON",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 2)
    subprocess.run(
        ["cmake", "--build", str(build), "--target", "llama-server", "--parallel", jobs],
        check=True,
    )
    print(f"built {binary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
