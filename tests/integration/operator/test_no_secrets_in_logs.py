"""No secret of an AutoGLMDeployment in the operator's log, at debug level.

The operator never sees a prompt or an output (the servers do; their own tests
grep their logs). What it does see is the custom resource, and through it the
names of Secrets and literal values a user may put in ``server.env``. This test
runs the operator with ``kopf run --debug`` (kopf's and our debug lines, JSON),
reconciles an object that uses every secret-bearing field (an env value from a
Secret, a literal env value, envFrom a Secret, API keys, TLS) through creation,
an update and deletion, and greps the whole log for unique markers:

- the Secrets' values: the operator must never have them (its chart grants no
  access to Secrets; here it runs as the admin, so the test shows it does not
  read them either: the audit log has no request of the operator for Secrets);
- the literal env value: it must reach the Deployment (shown) but not the log.

The session's operator is stopped meanwhile, so that this one does all the work.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from operator_helpers import Kube, OperatorProcess, agd, deployment_of, start_operator

pytestmark = pytest.mark.k8s

MARK = uuid.uuid4().hex[:12]
SECRET_ENV = f"hf_secretenv{MARK}"  # in Secret hf-token, referenced by env valueFrom
SECRET_ENVFROM = f"envfrom{MARK}"  # in Secret extra-env, referenced by envFrom
API_KEY = f"apikey{MARK}"  # in Secret keys, spec.server.auth.apiKeysSecret
TLS_KEY = f"tlskey{MARK}"  # in Secret tls (tls.key)
LITERAL = f"literal{MARK}"  # a plain env value in the spec itself
MARKERS = {
    "Secret value (env valueFrom)": SECRET_ENV,
    "Secret value (envFrom)": SECRET_ENVFROM,
    "API key": API_KEY,
    "TLS private key": TLS_KEY,
    "literal env value": LITERAL,
}


@pytest.fixture(scope="module")
def debug_operator(
    cluster: Any, crd: Path, operator: OperatorProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator at debug level, alone: the session's one is stopped meanwhile."""
    operator.stop()
    log_path = tmp_path_factory.mktemp("debug-operator") / "operator.log"
    op = start_operator(
        cluster.kubeconfig, log_path, ["--standalone", "--all-namespaces", "--debug"], 4.0
    )
    try:
        yield op
    finally:
        op.stop()
        operator.restart()


def secret(name: str, data: dict[str, str], type_: str = "Opaque") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "type": type_,
        "stringData": data,
    }


def spec() -> dict[str, Any]:
    return {
        "model": {"source": "hf://THUDM/glm-4-9b-chat-hf@main"},
        "server": {
            "auth": {"apiKeysSecret": "keys"},
            "tls": {"secretName": "tls"},
            "env": [
                {
                    "name": "HF_TOKEN",
                    "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}},
                },
                {"name": "EXTRA_SETTING", "value": LITERAL},
            ],
            "envFrom": [{"secretRef": {"name": "extra-env"}}],
        },
    }


def audit_log(cluster: Any) -> Path | None:
    """The API server's JSON audit log: the local control plane's, or AUTOGLM_AUDIT_LOG."""
    if hasattr(cluster, "workdir"):
        path = Path(cluster.workdir) / "logs" / "audit.log"
    else:
        path = Path(os.environ.get("AUTOGLM_AUDIT_LOG", "/nonexistent"))
    return path if path.is_file() else None


def test_no_secret_value_or_literal_env_value_in_the_debug_log(
    debug_operator: OperatorProcess, kube: Kube, cluster: Any
) -> None:
    audit = audit_log(cluster)
    offset = audit.stat().st_size if audit else 0
    keys = json.dumps({"keys": [{"name": "ci", "key": API_KEY}]})
    for obj in (
        secret("hf-token", {"token": SECRET_ENV}),
        secret("extra-env", {"OTHER_TOKEN": SECRET_ENVFROM}),
        secret("keys", {"keys.json": keys}),
        secret("tls", {"tls.crt": "not a certificate", "tls.key": TLS_KEY}, "kubernetes.io/tls"),
    ):
        assert kube.apply(obj).returncode == 0
    body = agd("secretive", spec())
    applied = kube.apply(body)
    assert applied.returncode == 0, applied.stderr
    kube.wait_ready("secretive", timeout=120)

    # The operator did handle the literal value: it is in the Deployment it wrote.
    name = deployment_of("secretive", body["spec"])
    dep = kube.get("deployment", name)
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["EXTRA_SETTING"]["value"] == LITERAL
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}

    # An update (a new revision) and a deletion: more of the operator's paths log.
    body["spec"]["replicas"] = 2
    body["spec"]["server"]["env"][1]["value"] = LITERAL + "x"
    assert kube.apply(body).returncode == 0
    kube.wait_ready("secretive", timeout=120)
    kube.run("delete", "agd", "secretive", "--wait=true", "--timeout=60s")

    log = debug_operator.log_path.read_text(errors="replace")
    lines = log.splitlines()
    severities = {json.loads(line).get("severity") for line in lines if line.startswith("{")}
    assert "debug" in severities, "the log is not at debug level: the check would be vacuous"
    assert "secretive" in log  # the log does speak of the object
    found = {what: marker for what, marker in MARKERS.items() if marker in log}
    assert found == {}, f"in the operator's log: {sorted(found)}"

    # The operator never asked for a Secret (the admin credentials would let it).
    if audit is not None:
        with audit.open() as f:
            f.seek(offset)
            reads = [
                e
                for e in map(json.loads, f)
                if (e.get("objectRef") or {}).get("resource") == "secrets"
                and e["userAgent"].startswith(("kopf/", "OpenAPI-Generator/"))
            ]
        assert reads == [], [(e["verb"], e["objectRef"]) for e in reads]
        # ... while kubectl's writes of them are there: the audit log does list Secrets.
        with audit.open() as f:
            f.seek(offset)
            ours = [
                e
                for e in map(json.loads, f)
                if (e.get("objectRef") or {}).get("resource") == "secrets"
                and (e.get("objectRef") or {}).get("namespace") == kube.namespace
            ]
        assert ours, "no request for this test's Secrets in the audit log"
