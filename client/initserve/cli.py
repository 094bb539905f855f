"""``initserve fetch``: tensors from a server into a ``.safetensors`` file (or ``.pt``), with a progress bar.

    initserve fetch --shape 4096 1024 --scheme kaiming_normal --seed 7 --param mode=fan_out -o w.safetensors
    initserve fetch --spec model.json -o model.safetensors

A spec file (JSON; YAML too when PyYAML is installed) names the tensors of one InitMany call:

    {"seed": 7, "tensors": [
        {"name": "embed.weight", "shape": [32000, 4096], "scheme": "normal", "params": {"std": 0.02}},
        {"name": "head.weight", "shape": [32000, 4096], "scheme": "normal", "dtype": "bfloat16",
         "slices": [{"shard": [0, 1, 4]}]}]}

``seed`` is the base seed: each tensor's seed is ``derive_seed(seed, name)`` unless it gives its own.
``"rng": "philox4x32-10/v1"`` (or ``--rng``) asks for the portable generator for every tensor; ``--local`` then
makes the bytes here and has the server send only their checksums (docs/portable.md).
A slice is ``{"shard": [dim, index, count]}`` or ``{"range": [dim, start, length]}``. The file's metadata
records, per tensor, the scheme, its parameters, the seed used and the server's torch version.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from initserve._calls import DEFAULT_TARGET
from initserve._client import Client
from initserve._errors import InitServeError
from initserve._pipeline import InitResult
from initserve._requests import TensorSpec
from initserve_protocol import dtypes
from initserve_protocol.slices import Range, Shard, Slice

PROGRESS_MIN_BYTES = 64 << 20  # a progress bar (on stderr) for calls of at least this many bytes


class SpecError(ValueError):
    """The spec file or the command line does not describe tensors; the message says where."""


def _value(text: str) -> float | int | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _dtype(name: str, where: str) -> torch.dtype:
    for entry in dtypes.DTYPES:
        if entry.name == name:
            return entry.torch_dtype
    raise SpecError(f"{where}: dtype {name!r} is not one of {dtypes.SUPPORTED_NAMES}")


def _slices(items: Sequence[Any], where: str) -> list[Slice]:
    slices: list[Slice] = []
    for number, item in enumerate(items):
        if isinstance(item, dict) and set(item) == {"shard"} and len(item["shard"]) == 3:
            slices.append(Shard(*item["shard"]))
        elif isinstance(item, dict) and set(item) == {"range"} and len(item["range"]) == 3:
            slices.append(Range(*item["range"]))
        else:
            raise SpecError(f"{where}.slices[{number}]: expected {{'shard': [dim, index, count]}} or "
                            f"{{'range': [dim, start, length]}}, got {item!r}")  # fmt: skip
    return slices


def load_spec(path: Path) -> tuple[int | None, list[TensorSpec], str | None]:
    """(base seed, tensors, generator or None) from a JSON (or, with PyYAML, YAML) spec file."""
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SpecError(f"{path}: YAML spec files need PyYAML (pip install pyyaml); JSON needs nothing") from None
        document = yaml.safe_load(text)
    else:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise SpecError(f"{path}: not JSON: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("tensors"), list):
        raise SpecError(f"{path}: expected an object with a 'tensors' list")
    if set(document) - {"seed", "tensors", "rng"}:
        raise SpecError(
            f"{path}: unknown keys {sorted(set(document) - {'seed', 'tensors', 'rng'})} (known: rng, seed, tensors)"
        )
    rng = document.get("rng")
    if rng is not None and not isinstance(rng, str):
        raise SpecError(f'{path}: rng must be a string, e.g. "philox4x32-10/v1"')
    known = {"name", "shape", "scheme", "params", "seed", "derive", "dtype", "slices"}
    specs = []
    for number, item in enumerate(document["tensors"]):
        where = f"{path}: tensors[{number}]"
        if not isinstance(item, dict) or not {"name", "shape", "scheme"} <= set(item):
            raise SpecError(f"{where}: needs name, shape and scheme")
        if set(item) - known:
            raise SpecError(f"{where}: unknown keys {sorted(set(item) - known)} (known: {sorted(known)})")
        specs.append(
            TensorSpec(
                name=item["name"],
                shape=tuple(item["shape"]),
                scheme=item["scheme"],
                params=item.get("params", {}),
                seed=item.get("seed"),
                derive=item.get("derive"),
                slices=_slices(item.get("slices", []), where),
                dtype=_dtype(item.get("dtype", "float32"), where),
            )
        )
    return document.get("seed"), specs, rng


def _metadata(results: dict[str, InitResult], specs: Sequence[TensorSpec]) -> dict[str, str]:
    described = {}
    for spec in specs:
        result = results[spec.name]
        described[spec.name] = {
            "scheme": spec.scheme,
            "params": dict(spec.params),
            "shape": list(result.header.full_shape or result.header.shape),
            "slices": [[s.dim, s.start, s.length] for s in result.header.slices],
            "seed_used": result.seed if result.seeded else None,
            "base_seed": result.header.base_seed if result.header.HasField("base_seed") else None,
            "generator": result.header.generator or "torch",
        }
    first = next(iter(results.values()), None)
    return {
        "initserve": json.dumps(described, sort_keys=True),
        "torch_version": first.torch_version if first else "",
        "device_fingerprint": first.device.fingerprint if first else "",
    }


def _save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "pt":
        torch.save({"tensors": tensors, "metadata": metadata}, path)
    else:
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata=metadata)


def fetch(args: argparse.Namespace) -> int:
    if args.spec is not None:
        seed, specs, rng = load_spec(args.spec)
        if args.seed is not None:
            seed = args.seed
    else:
        if args.shape is None or args.scheme is None:
            raise SpecError("give --spec FILE, or --shape and --scheme")
        params = {}
        for item in args.param:
            key, sep, value = item.partition("=")
            if not sep:
                raise SpecError(f"--param {item!r}: expected NAME=VALUE")
            params[key] = _value(value)
        seed = args.seed
        dtype = _dtype(args.dtype, "--dtype")
        derive = None if args.name else False  # a named tensor derives its seed from --seed, as fetch does
        specs = [TensorSpec(args.name or "tensor", tuple(args.shape), args.scheme, params, dtype=dtype, derive=derive)]
        rng = None
    rng = args.rng or rng
    fmt = args.format or ("pt" if args.output.suffix == ".pt" else "safetensors")
    with Client(args.target, timeout=args.timeout) as client:
        bar = None
        progress = None
        if not args.quiet:
            from tqdm import tqdm

            def progress(received: int, total: int) -> None:
                nonlocal bar
                if bar is None and total >= PROGRESS_MIN_BYTES:
                    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="fetch")
                if bar is not None:
                    bar.update(received - bar.n)

        try:
            results = client.fetch_many(specs, seed=seed, progress=progress, rng=rng, local=args.local or None)
        finally:
            if bar is not None:
                bar.close()
    tensors = {name: result.tensor for name, result in results.items()}
    _save(tensors, _metadata(results, specs), args.output, fmt)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if not args.quiet:
        print(f"wrote {len(tensors)} tensor(s), {total} bytes, to {args.output} ({fmt})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="initserve", description="initserve: torch.nn.init as a gRPC service.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser("fetch", help="fetch tensors into a .safetensors (or .pt) file")
    fetch_parser.add_argument("--target", default=DEFAULT_TARGET, help=f"server host:port (default {DEFAULT_TARGET})")
    fetch_parser.add_argument("--spec", type=Path, help="a JSON (or YAML) file of named tensors")
    fetch_parser.add_argument("--shape", type=int, nargs="+", help="one tensor's shape")
    fetch_parser.add_argument("--scheme", help="one tensor's scheme, e.g. kaiming_normal")
    fetch_parser.add_argument("--param", action="append", default=[], help="a scheme parameter, NAME=VALUE")
    fetch_parser.add_argument("--dtype", default="float32", help="one tensor's dtype (default float32)")
    fetch_parser.add_argument(
        "--name", help="one tensor's name in the file (default 'tensor'); with --seed, its seed is derived from both"
    )
    fetch_parser.add_argument("--seed", type=int, help="the seed (with --spec: the base seed, overriding the file's)")
    fetch_parser.add_argument(
        "--rng", help='the generator: "torch" (the default) or "philox4x32-10/v1" (with --spec: over the file\'s)'
    )
    fetch_parser.add_argument(
        "--local", action="store_true", help="with the portable generator: make the bytes here, verified"
    )
    fetch_parser.add_argument("-o", "--output", type=Path, required=True, help="the file to write")
    fetch_parser.add_argument("--format", choices=["safetensors", "pt"], help="default: from the file's suffix")
    fetch_parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole call")
    fetch_parser.add_argument("--quiet", action="store_true", help="no progress bar, no summary line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return fetch(args)
    except (SpecError, InitServeError, ValueError, TypeError) as error:
        print(f"initserve: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
