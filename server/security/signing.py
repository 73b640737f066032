"""Signed models: verify an OpenSSF model-signing signature before loading.

The signature is a Sigstore bundle made by ``model_signing`` (``model_signing
sign key --private_key ...`` or the library's ``signing.Config``) over the
model directory's files. The server verifies it with the public key before it
reads any weight; a missing, unreadable or bad signature (a file changed,
added or removed, a different key) refuses to load, with the reason and the
file it names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from autoglm_server.errors import ModelLoadError

DEFAULT_SIGNATURE_NAME = "model.sig"


def verify_model(model_dir: str, signature: str | None, public_key: str) -> None:
    """Raise ModelLoadError unless ``signature`` verifies ``model_dir`` with ``public_key``."""
    model_dir = os.path.abspath(model_dir)
    sig = Path(signature).absolute() if signature else Path(model_dir) / DEFAULT_SIGNATURE_NAME
    if not os.path.isdir(model_dir):
        raise ModelLoadError(f"model signature: {model_dir} is not a local model directory")
    if not sig.is_file():
        raise ModelLoadError(f"model signature: {sig} is missing")
    if not os.path.isfile(public_key):
        raise ModelLoadError(f"model signature: public key {public_key} is missing")
    try:
        from model_signing import hashing, verifying
    except ImportError as exc:  # the server extra pins it
        raise ModelLoadError(f"model signature: model-signing is not installed ({exc})") from None
    # The signature file itself (and our own caches) are not part of the signed model.
    ignored = [sig, Path(model_dir) / ".cache"]
    try:
        config: Any = verifying.Config()  # type: ignore[no-untyped-call]
        hashes: Any = hashing.Config()  # type: ignore[no-untyped-call]
        config.use_elliptic_key_verifier(public_key=public_key).set_hashing_config(
            hashes.set_ignored_paths(paths=ignored, ignore_git_paths=True)
        ).verify(model_dir, sig)
    except Exception as exc:  # ValueError from model_signing names the file and the reason
        detail = str(exc).strip().replace("\n", " ") or type(exc).__name__
        raise ModelLoadError(
            f"model signature: {sig} does not verify {model_dir}: {detail}"
        ) from None
