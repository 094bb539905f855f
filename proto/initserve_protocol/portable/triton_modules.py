"""Triton's C modules built ahead of time, so the GPU kernel runs on a host with no C compiler (a server image).

Triton compiles one small C extension (``cuda_utils``: its CUDA driver binding and kernel launcher) the first
time a process touches a GPU, with the host's C compiler and Python's headers. A slim, read-only server image has
neither, so there the kernel's first use raises and placement falls back to the elementwise path (the same bytes,
slower). Instead, the image's build stage, which may have a compiler, runs

    python -m initserve_protocol.portable.triton_modules DIR

which lets Triton compile exactly what it compiles on a GPU host (its own sources, flags and headers) against a
stub ``libcuda.so.1`` whose functions do nothing (the real driver is the host's, mounted at run time and found
by the dynamic loader), and keeps each module in DIR under its name and its source's SHA-256, with
``manifest.json``. The image's DIR is its environment's own, :data:`INSTALLED` under ``sys.prefix``.

A process then calls :func:`use` (the server calls :func:`use_installed` at start, or ``use`` given
``--triton-modules DIR``): Triton's build hook, ``triton.knobs.build.impl``, hands Triton the module built from
the same source instead of compiling it. A source that DIR does not hold (another Triton) is a RuntimeError
naming the module and the rebuild command, never a compile.

Triton 3.7 or later: an earlier one also compiles a C launcher for each kernel signature at its first launch
(``__triton_launcher``), which nothing built ahead of time can hold, so :func:`build` and :func:`use` refuse it
(TritonModulesError) rather than leave every kernel to fail there.

Triton still needs a writable cache directory at run time (``TRITON_CACHE_DIR``, else ``~/.triton/cache``): it
copies the module there and writes each compiled kernel there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
INSTALLED = Path("share", "initserve", "triton-modules")  # an environment's own modules, under its sys.prefix
STUB_LIBRARY = "libcuda.so.1"  # the name Triton links its module against (-l:libcuda.so.1)
FIRST_TRITON = (3, 7)  # the first Triton whose only C module is cuda_utils (3.6 compiles a launcher per kernel)

__all__ = ["INSTALLED", "MANIFEST", "TritonModulesError", "build", "use", "use_installed"]


class TritonModulesError(ValueError):
    """A directory of Triton modules that cannot serve this process: no manifest, another Triton's, or a Triton
    before :data:`FIRST_TRITON`."""


def release(version: str) -> tuple[int, ...]:
    """A Triton version's (major, minor): "3.7.1" gives (3, 7)."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def _check_version(version: str) -> None:
    if release(version) < FIRST_TRITON:
        raise TritonModulesError(
            f"Triton {version} compiles a C launcher for each kernel at its first launch, which cannot be built "
            f"ahead of time; Triton's modules are built for Triton {'.'.join(map(str, FIRST_TRITON))} or later"
        )


def _source_digest(source_path: str) -> str:
    return hashlib.sha256(Path(source_path).read_bytes()).hexdigest()


def _module_file(name: str, digest: str) -> str:
    return f"{name}-{digest[:16]}{sysconfig.get_config_var('EXT_SUFFIX')}"


def _compiler() -> str:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("building Triton's modules needs a C compiler (gcc or clang on PATH, or CC)")
    return compiler


def build(directory: Path) -> dict[str, Any]:
    """Compile Triton's C modules into ``directory`` (created) and write its manifest; returns the manifest.

    Runs Triton's own CUDA driver set-up, so it must run in a fresh process (Triton caches the driver's
    library search): the module's command line does."""
    import triton
    from triton import knobs
    from triton.backends.nvidia import driver
    from triton.runtime import build as triton_build

    _check_version(triton.__version__)
    directory.mkdir(parents=True, exist_ok=True)
    modules: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="initserve-triton-") as scratch:
        stub_dir = Path(scratch, "stub")
        stub_dir.mkdir()

        def compile_module(name: str, src: str, srcdir: str, library_dirs: list, include_dirs: list, libraries: list):
            knobs.build.impl = None  # Triton's own compile (its flags and headers), then this hook again
            try:
                return triton_build._build(name, src, srcdir, library_dirs, include_dirs, libraries, [])
            finally:
                knobs.build.impl = record

        def record(name: str, src: str, srcdir: str, library_dirs: list, include_dirs: list, libraries: list) -> str:
            _write_stub(stub_dir, ())
            built = compile_module(name, src, srcdir, library_dirs, include_dirs, libraries)
            symbols = _driver_symbols(built)
            if symbols:  # again, against a stub that defines them, or the linker drops it (--as-needed)
                _write_stub(stub_dir, symbols)
                built = compile_module(name, src, srcdir, library_dirs, include_dirs, libraries)
                if STUB_LIBRARY not in _needed_libraries(built):
                    raise RuntimeError(f"Triton's {name} calls the CUDA driver but does not load {STUB_LIBRARY}")
            digest = _source_digest(src)
            kept = _module_file(name, digest)
            shutil.copyfile(built, directory / kept)
            modules.append({"name": name, "source_sha256": digest, "file": kept})
            return built

        knobs.cache.dir = str(Path(scratch, "cache"))  # an empty cache: every module is compiled, none reused
        knobs.nvidia.libcuda_path = str(stub_dir)
        knobs.build.impl = record
        try:
            driver.CudaUtils()
        except ImportError:  # loading it here, where there is no CUDA driver: expected once it is built
            if not modules:
                raise
        finally:
            knobs.build.impl = None
    if not modules:
        raise RuntimeError(f"Triton {triton.__version__} compiled no C module; nothing to keep")
    manifest = {"triton": triton.__version__, "modules": modules}  # each file's name carries its Python ABI
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _write_stub(stub_dir: Path, symbols: tuple[str, ...] | list[str]) -> None:
    """A ``libcuda.so.1`` in ``stub_dir`` that defines these functions (as no-ops: it is only linked against)."""
    source = stub_dir / "stub.c"
    source.write_text("".join(f"void {symbol}(void) {{}}\n" for symbol in symbols) or "/* nothing */\n")
    subprocess.run(
        [
            _compiler(),
            "-shared",
            "-fPIC",
            f"-Wl,-soname,{STUB_LIBRARY}",
            "-o",
            str(stub_dir / STUB_LIBRARY),
            str(source),
        ],
        check=True,
    )


def _driver_symbols(module: str) -> list[str]:
    """The CUDA driver functions (``cu`` and a capital) a built module leaves undefined."""
    listing = subprocess.run(["nm", "-D", "--undefined-only", module], check=True, capture_output=True, text=True)
    names = (line.split()[-1].split("@")[0] for line in listing.stdout.splitlines() if line.strip())
    return sorted({name for name in names if re.fullmatch(r"cu[A-Z]\w*", name)})


def _needed_libraries(module: str) -> list[str]:
    """The shared libraries a built module names to the dynamic loader (its DT_NEEDED entries)."""
    listing = subprocess.run(["readelf", "-d", module], check=True, capture_output=True, text=True)
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", listing.stdout)


def use(directory: Path) -> bool:
    """Have Triton take its C modules from ``directory`` (made by :func:`build`) instead of compiling them, for
    the rest of this process. False, and nothing changed, where Triton does not import (nothing to compile); a
    directory without a readable manifest, or one built for another Triton, or a Triton before
    :data:`FIRST_TRITON`, is a TritonModulesError."""
    try:
        import triton
        from triton import knobs
    except ImportError:
        return False
    _check_version(triton.__version__)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        built = {
            (module["name"], module["source_sha256"]): directory / module["file"] for module in manifest["modules"]
        }
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TritonModulesError(f"{directory} holds no Triton modules ({MANIFEST}: {error})") from None
    if manifest.get("triton") != triton.__version__:
        raise TritonModulesError(
            f"the Triton modules in {directory} are for Triton {manifest.get('triton')}, this is Triton "
            f"{triton.__version__}"
        )
    knobs.build.impl = _serve(directory, built, triton.__version__)
    return True


def use_installed(prefix: str = sys.prefix) -> Path | None:
    """:func:`use` the modules built into this environment (``prefix / INSTALLED``, as the server image's build
    does), if it holds them: their directory, or None (none built: Triton compiles where it can)."""
    directory = Path(prefix) / INSTALLED
    if not (directory / MANIFEST).is_file():
        return None
    return directory if use(directory) else None


def _serve(directory: Path, built: dict[tuple[str, str], Path], version: str) -> Callable[..., str]:
    def serve(name: str, src: str, srcdir: str, library_dirs: list, include_dirs: list, libraries: list) -> str:
        digest = _source_digest(src)
        module = built.get((name, digest))
        if module is None or not module.is_file():
            raise RuntimeError(
                f"Triton {version} would compile its C module {name!r} (source sha256 {digest[:16]}), which the "
                f"modules in {directory} do not include; rebuild them with this Triton "
                f"(python -m initserve_protocol.portable.triton_modules {directory})"
            )
        return str(module)

    return serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m initserve_protocol.portable.triton_modules",
        description="Compile Triton's C modules (with this host's C compiler) into DIR, for hosts without one.",
    )
    parser.add_argument("directory", type=Path, metavar="DIR")
    args = parser.parse_args(argv)
    manifest = build(args.directory)
    for module in manifest["modules"]:
        print(f"{args.directory / module['file']}: Triton {manifest['triton']}'s {module['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
