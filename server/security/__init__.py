"""The pod's own security: API keys with per-key limits, TLS, signed models.

- :mod:`.keys`: keys from a mounted file (re-read when it changes), each with
  a name, an optional tenant, a priority cap, scopes and token-bucket limits;
  the checks both front ends call, and per-key metrics.
- :mod:`.tls`: server credentials for gRPC and an ``ssl.SSLContext`` for
  HTTP from a ``kubernetes.io/tls`` Secret mount, optional mTLS, reloaded on
  rotation.
- :mod:`.signing`: OpenSSF model signing: the model loads only when its
  signature verifies.
"""
