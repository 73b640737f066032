"""A stock KServe v2 client against the server.

The stubs are generated from the published KServe schema (data/), not ours,
and used unmodified in a separate interpreter, as a v2 user would: both files
define package ``inference``, so they can't share one descriptor pool.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from server_helpers import ServerProcess

DATA = Path(__file__).parent / "data"

CLIENT = r"""
import json, struct, sys
import grpc
import kserve_grpc_predict_v2_pb2 as pb
import kserve_grpc_predict_v2_pb2_grpc as pb_grpc

stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(sys.argv[1]))
out = {}
out["live"] = stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
out["ready"] = stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
out["model_ready"] = stub.ModelReady(pb.ModelReadyRequest(name="tiny"), timeout=10).ready
out["other_ready"] = stub.ModelReady(pb.ModelReadyRequest(name="nope"), timeout=10).ready
out["server"] = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10).name
md = stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"), timeout=10)
out["metadata"] = {
    "name": md.name,
    "versions": list(md.versions),
    "inputs": [[t.name, t.datatype, list(t.shape)] for t in md.inputs],
    "outputs": [[t.name, t.datatype, list(t.shape)] for t in md.outputs],
}

def request(raw):
    req = pb.ModelInferRequest(model_name="tiny", id="req-1")
    tensor = req.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    data = "Hello, world!".encode()
    if raw:  # tritonclient's encoding
        req.raw_input_contents.append(struct.pack("<I", len(data)) + data)
    else:
        tensor.contents.bytes_contents.append(data)
    req.parameters["max_tokens"].int64_param = 5
    req.parameters["temperature"].string_param = "0"
    req.parameters["ignore_eos"].bool_param = True
    req.outputs.add(name="text_output")
    return req

def summary(resp):
    params = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in resp.parameters.items()}
    if resp.raw_output_contents:
        raw = resp.raw_output_contents[0]
        (n,) = struct.unpack_from("<I", raw)
        texts = [raw[4 : 4 + n].decode()]
    else:
        texts = [b.decode() for b in resp.outputs[0].contents.bytes_contents]
    return {
        "id": resp.id,
        "model": [resp.model_name, resp.model_version],
        "outputs": [[o.name, o.datatype, list(o.shape)] for o in resp.outputs],
        "texts": texts,
        "params": params,
    }

out["infer"] = summary(stub.ModelInfer(request(raw=False), timeout=30))
out["infer_raw"] = summary(stub.ModelInfer(request(raw=True), timeout=30))
bad = request(raw=False)
bad.inputs[0].datatype = "FP32"
try:
    stub.ModelInfer(bad, timeout=30)
    out["bad"] = None
except grpc.RpcError as exc:
    out["bad"] = [exc.code().name, exc.details()]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def v2_result(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("kserve-stubs")
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{DATA}",
            f"--python_out={out}", f"--grpc_python_out={out}",
            "kserve_grpc_predict_v2.proto",
        ],
        check=True,
        timeout=60,
    )  # fmt: skip
    (out / "client.py").write_text(CLIENT)
    proc = subprocess.run(
        [sys.executable, str(out / "client.py"), server.target],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=out,
        env={**os.environ, "PYTHONPATH": str(out)},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def test_v2_readiness_and_metadata(v2_result: dict[str, Any]) -> None:
    assert v2_result["live"] and v2_result["ready"] and v2_result["model_ready"]
    assert not v2_result["other_ready"]
    assert v2_result["server"] == "autoglm"
    assert v2_result["metadata"] == {
        "name": "tiny",
        "versions": ["local"],
        "inputs": [["text_input", "BYTES", [1]]],
        "outputs": [["text_output", "BYTES", [1]]],
    }


@pytest.mark.parametrize("key", ["infer", "infer_raw"])
def test_v2_model_infer(v2_result: dict[str, Any], key: str) -> None:
    result = v2_result[key]
    assert result["id"] == "req-1"
    assert result["model"] == ["tiny", "local"]
    assert result["outputs"] == [["text_output", "BYTES", [1]]]
    (text,) = result["texts"]
    assert isinstance(text, str)
    assert result["params"]["finish_reason"] == "length"
    assert result["params"]["completion_tokens"] == 5
    assert result["params"]["prompt_tokens"] > 0


def test_v2_greedy_is_repeatable(v2_result: dict[str, Any]) -> None:
    # temperature "0" arrived as a string parameter and made decoding greedy
    assert v2_result["infer"]["texts"] == v2_result["infer_raw"]["texts"]


def test_v2_bad_input_names_the_field(v2_result: dict[str, Any]) -> None:
    code, details = v2_result["bad"]
    assert code == "INVALID_ARGUMENT"
    assert details.startswith("inputs[0].datatype: ")


TRITON_CLIENT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tc

client = tc.InferenceServerClient(sys.argv[1])
out = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready("tiny"),
    "index": client.get_model_repository_index(as_json=True),
    "config": client.get_model_config("tiny", as_json=True),
    "metadata": client.get_model_metadata("tiny", as_json=True),
}
text = tc.InferInput("text_input", [1], "BYTES")
text.set_data_from_numpy(np.array([b"Hello"], dtype=object))
result = client.infer(
    "tiny", [text], outputs=[tc.InferRequestedOutput("text_output")],
    parameters={"max_tokens": 3, "ignore_eos": True, "temperature": 0.0},
)
out["text"] = result.as_numpy("text_output")[0].decode()
out["params"] = {k: v for k, v in result.get_response(as_json=True).get("parameters", {}).items()}
print(json.dumps(out))
"""


def test_tritonclient_works_unmodified(server: ServerProcess, tmp_path: Path) -> None:
    """Triton's own client (a separate interpreter: it defines package ``inference`` too).

    tritonclient is in the dev extra (its base install, without the ``[grpc]``
    extra that pins protobuf < 7; it uses our grpcio and protobuf), so this runs
    in CI rather than being skipped.
    """
    (tmp_path / "client.py").write_text(TRITON_CLIENT)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "client.py"), server.target],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["live"] and out["ready"] and out["model_ready"]
    assert out["index"]["models"] == [{"name": "tiny", "version": "local", "state": "READY"}]
    config = out["config"]["config"]
    assert config["name"] == "tiny"
    assert config["input"] == [{"name": "text_input", "data_type": "TYPE_STRING", "dims": ["1"]}]
    assert config["output"] == [{"name": "text_output", "data_type": "TYPE_STRING", "dims": ["1"]}]
    assert out["metadata"]["inputs"] == [
        {"name": "text_input", "datatype": "BYTES", "shape": ["1"]}
    ]
    assert isinstance(out["text"], str)
