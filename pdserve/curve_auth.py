"""CURVE authentication and encryption of the internal tcp:// sockets, keyed by the cluster secret.

Across nodes every ZeroMQ socket is tcp, and anyone who reaches a port could otherwise send
`Shutdown` or write KV pages. Every process of a cluster derives the same two Curve25519 key
pairs from the shared secret (`security.cluster_secret` or `$PDSERVE_CLUSTER_SECRET`): binding
sockets are CURVE servers with the server pair; connecting sockets are clients that must know
the server public key. That key is derived from the secret and never sent (not in a handshake,
a spec or a log), so a peer without the secret cannot finish the CURVE handshake and no frame of
its reaches a receive loop. ipc:// sockets within a node stay plain: the socket folder is 0700.

The launcher calls `set_cluster_secret` for its own sockets and hands the secret to its children
in their environment (`child_env`); a child reads it from there on first use.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import zmq
from zmq.utils import z85

from pdserve import env
from pdserve.config.topology_sections import check_cluster_secret

_KDF_ITERATIONS = 200_000  # ~0.05 s once per process; slows guessing a weak secret offline
_KDF_SALT = b"pdserve-cluster-curve-v1"

_process_secret: str | None = None  # set_cluster_secret(); None: $PDSERVE_CLUSTER_SECRET


@dataclass(frozen=True)
class CurveKeys:
    """Z85-encoded Curve25519 keys (40 bytes each), the same in every process of one cluster."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes


@functools.lru_cache(maxsize=4)
def keys_from_secret(secret: str) -> CurveKeys:
    """The cluster's key pairs, derived deterministically from `secret`."""
    check_cluster_secret(secret, "the cluster secret")
    master = hashlib.pbkdf2_hmac("sha256", secret.encode(), _KDF_SALT, _KDF_ITERATIONS)
    server_secret = z85.encode(hashlib.sha256(master + b"/server").digest())
    client_secret = z85.encode(hashlib.sha256(master + b"/client").digest())
    return CurveKeys(
        server_public=zmq.curve_public(server_secret),
        server_secret=server_secret,
        client_public=zmq.curve_public(client_secret),
        client_secret=client_secret,
    )


def set_cluster_secret(secret: str | None) -> None:
    """This process's cluster secret (None: fall back to `$PDSERVE_CLUSTER_SECRET`)."""
    global _process_secret
    if secret is not None:
        check_cluster_secret(secret, "the cluster secret")
    _process_secret = secret


def cluster_keys() -> CurveKeys | None:
    """The keys for this process's tcp sockets; None when no secret is set (one node)."""
    secret = _process_secret or env.cluster_secret()
    return keys_from_secret(secret) if secret else None


def child_env(secret: str | None) -> dict[str, str]:
    """Environment entries that give a child process `secret` (nothing when None)."""
    return {env.CLUSTER_SECRET_VAR: secret} if secret else {}


def secure_server(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make `sock` (before it binds) accept only CURVE clients that hold the cluster secret."""
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public
    sock.curve_server = True


def secure_client(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make `sock` (before it connects) a CURVE client of the cluster's servers."""
    sock.curve_secretkey = keys.client_secret
    sock.curve_publickey = keys.client_public
    sock.curve_serverkey = keys.server_public
