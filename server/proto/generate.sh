#!/usr/bin/env bash
# Regenerate the committed Python code for the protos in this folder.
#
#   server/proto/generate.sh            # rewrite the committed files
#   server/proto/generate.sh OUT_DIR    # write them under OUT_DIR instead (the
#                                       # unit test compares the two)
#
# Needs grpcio-tools (the [dev] extra pins it). PYTHON picks the interpreter.
#
# Two fix-ups after protoc, both deliberate:
# 1. protoc writes imports as if the proto root were on sys.path
#    ("from autoglm.v1 import ..."); they are rewritten to the package
#    autoglm_server.proto, so nothing is added to sys.path.
# 2. grpcio-tools 1.85 stamps the code with its own versions: protobuf 7.35.1
#    (ValidateProtobufRuntimeVersion refuses older runtimes) and grpcio 1.85.1
#    (the _pb2_grpc module raises on older grpcio). The code uses nothing newer
#    than protobuf 5.29 / grpcio 1.72.2, the floors in pyproject.toml, so the
#    stamps are lowered to those floors. GPU images often ship an older
#    protobuf, and the client must import there.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here}"
python="${PYTHON:-python3}"
mkdir -p "$out"

protos=(autoglm/v1/autoglm.proto grpc_predict_v2.proto)

(cd "$here" && "$python" -m grpc_tools.protoc -I . \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" "${protos[@]}")

"$python" - "$out" <<'PY'
import pathlib
import re
import sys

out = pathlib.Path(sys.argv[1])
PROTOBUF_FLOOR = (5, 29, 0)
GRPC_FLOOR = "1.72.2"

for path in sorted(out.rglob("*_pb2.py")):
    text = path.read_text()
    text, n = re.subn(
        r"(ValidateProtobufRuntimeVersion\(\n\s+_runtime_version\.Domain\.PUBLIC,\n)"
        r"\s+\d+,\n\s+\d+,\n\s+\d+,\n",
        lambda m: m.group(1) + "".join(f"    {v},\n" for v in PROTOBUF_FLOOR),
        text,
    )
    assert n == 1, f"{path}: protobuf version stamp not found"
    path.write_text(text)

for path in sorted(out.rglob("*_pb2_grpc.py")):
    text = path.read_text()
    text = re.sub(r"^from autoglm\.v1 import ", "from autoglm_server.proto.autoglm.v1 import ",
                  text, flags=re.M)
    text = re.sub(r"^import (\w+_pb2) as ", r"from autoglm_server.proto import \1 as ",
                  text, flags=re.M)
    text, n = re.subn(r"^GRPC_GENERATED_VERSION = '[^']*'",
                      f"GRPC_GENERATED_VERSION = '{GRPC_FLOOR}'", text, flags=re.M)
    assert n == 1, f"{path}: grpc version stamp not found"
    path.write_text(text)
PY
