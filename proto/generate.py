"""Generate initserve_protocol.v1's stubs from proto/initserve/v1/initserve.proto (`make proto`, and the image).

protoc names a module after its file's path, so the gRPC stub imports ``initserve.v1.initserve_pb2``; the file keeps
its canonical path (it matches the proto package, initserve.v1) and that one import line is pointed at
``initserve_protocol.v1`` instead. Usage: python proto/generate.py [OUT_DIR], OUT_DIR defaulting to
proto/initserve_protocol/v1.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

from grpc_tools import protoc

PROTO_ROOT = pathlib.Path(__file__).resolve().parent
PROTO = "initserve/v1/initserve.proto"
GENERATED_IMPORT = "from initserve.v1 import initserve_pb2 "
PROTOCOL_IMPORT = "from initserve_protocol.v1 import initserve_pb2 "


def generate(out_dir: pathlib.Path) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        arguments = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={scratch}", f"--pyi_out={scratch}",
                     f"--grpc_python_out={scratch}", str(PROTO_ROOT / PROTO)]  # fmt: skip
        if protoc.main(arguments) != 0:
            raise SystemExit(f"protoc failed on {PROTO}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for generated in sorted((pathlib.Path(scratch) / "initserve" / "v1").glob("initserve_pb2*")):
            text = generated.read_text()
            if generated.name == "initserve_pb2_grpc.py":
                if text.count(GENERATED_IMPORT) != 1:
                    raise SystemExit(f"{generated.name}: expected one line starting {GENERATED_IMPORT!r}")
                text = text.replace(GENERATED_IMPORT, PROTOCOL_IMPORT)
            (out_dir / generated.name).write_text(text)


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT / "initserve_protocol" / "v1")
