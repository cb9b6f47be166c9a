"""TLS for the gRPC and HTTP listeners: the settings from the command line -> one `ssl.SSLContext`.

    gRPC (tritonserver's flags):  --grpc-use-ssl BOOL  --grpc-use-ssl-mutual BOOL
                                  --grpc-server-cert FILE  --grpc-server-key FILE  --grpc-root-cert FILE
    HTTP (ours, the same shape):  --http-use-ssl BOOL  --http-use-ssl-mutual BOOL
                                  --http-server-cert FILE  --http-server-key FILE  --http-root-cert FILE

As in Triton, `--*-use-ssl-mutual true` implies `--*-use-ssl`, and the certificate flags are ignored
while TLS is off. With mutual TLS every client must present a certificate that verifies against the
root certificate(s); without it no client certificate is asked for. The context is server-side,
TLS 1.2 at least, AEAD ciphers only on TLS 1.2 (what HTTP/2 asks, RFC 9113 9.2.2), no renegotiation,
no compression, and ALPN "h2" for gRPC, "http/1.1" for HTTP. The metrics listener stays plain HTTP.

Every problem with the files is a `TlsError` whose message names the flag and the file, raised
before anything listens (`app.py` logs it and exits 1). The same settings travel to the
`--frontend-workers` processes as a dict (`to_dict` / `from_dict`), which build their own contexts.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("fuserve")

ALPN = {"grpc": "h2", "http": "http/1.1"}
# TLS 1.2 suites: ECDHE/DHE with AES-GCM or ChaCha20-Poly1305 (TLS 1.3 suites are OpenSSL's defaults)
_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"


class TlsError(Exception):
    """A TLS setting that cannot be served; the message names the flag and the file."""


@dataclass(frozen=True)
class TlsSettings:
    protocol: str  # "grpc" or "http": the flags' prefix and the ALPN protocol
    use_ssl: bool = False
    mutual: bool = False
    server_cert: str | None = None
    server_key: str | None = None
    root_cert: str | None = None

    @property
    def enabled(self) -> bool:
        return self.use_ssl or self.mutual  # Triton: --grpc-use-ssl-mutual preempts --grpc-use-ssl

    def flag(self, name: str) -> str:
        return f"--{self.protocol}-{name}"

    def label(self) -> str:
        """For the start-up log line: '' (plain), ', TLS' or ', mutual TLS'."""
        return ", mutual TLS" if self.mutual else ", TLS" if self.use_ssl else ""

    def ignored(self) -> list[str]:
        """The certificate flags given while TLS is off (Triton ignores them; we say so)."""
        if self.enabled:
            return []
        given = (("server-cert", self.server_cert), ("server-key", self.server_key), ("root-cert", self.root_cert))
        return [self.flag(name) for name, value in given if value]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TlsSettings:
        return cls(**data)


def settings_from_args(args: Any, protocol: str) -> TlsSettings:
    """The parsed `--<protocol>-use-ssl...` flags (argparse dests `<protocol>_use_ssl`, ...)."""
    def get(name: str) -> Any:
        return getattr(args, f"{protocol}_{name}", None)

    return TlsSettings(protocol, use_ssl=bool(get("use_ssl")), mutual=bool(get("use_ssl_mutual")),
                       server_cert=get("server_cert"), server_key=get("server_key"), root_cert=get("root_cert"))


def _read(settings: TlsSettings, name: str, path: str | None, required_by: str) -> bytes:
    if not path:
        raise TlsError(f"{required_by} needs {settings.flag(name)} FILE")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TlsError(f"{settings.flag(name)}: cannot read '{path}': {exc.strerror or exc}") from None


def _encrypted_key(settings: TlsSettings) -> bytes:
    # called by OpenSSL instead of prompting on the terminal for a pass phrase
    raise TlsError(f"{settings.flag('server-key')}: '{settings.server_key}' is encrypted with a pass phrase; "
                   "give an unencrypted PEM key")


def server_context(settings: TlsSettings) -> ssl.SSLContext | None:
    """The listener's context, or None when TLS is off. Raises TlsError."""
    if not settings.enabled:
        return None
    required_by = settings.flag("use-ssl-mutual" if settings.mutual else "use-ssl")
    cert = _read(settings, "server-cert", settings.server_cert, required_by)
    key = _read(settings, "server-key", settings.server_key, required_by)
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise TlsError(f"{settings.flag('server-cert')}: '{settings.server_cert}' holds no PEM certificate")
    if b"PRIVATE KEY-----" not in key:
        raise TlsError(f"{settings.flag('server-key')}: '{settings.server_key}' holds no PEM private key")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols([ALPN[settings.protocol]])
    try:
        ctx.load_cert_chain(settings.server_cert or "", settings.server_key, password=lambda: _encrypted_key(settings))
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            raise TlsError(f"{settings.flag('server-key')}: '{settings.server_key}' does not match the certificate "
                           f"in {settings.flag('server-cert')} '{settings.server_cert}'") from None
        raise TlsError(f"cannot load {settings.flag('server-cert')} '{settings.server_cert}' with "
                       f"{settings.flag('server-key')} '{settings.server_key}': {exc.reason or exc}") from None

    if settings.mutual or settings.root_cert:  # as Triton, a root cert given without mutual is read, not used
        root = _read(settings, "root-cert", settings.root_cert, settings.flag("use-ssl-mutual"))
        try:
            ctx.load_verify_locations(cadata=root.decode("ascii", errors="replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise TlsError(f"{settings.flag('root-cert')}: '{settings.root_cert}' holds no usable PEM "
                           f"certificate: {getattr(exc, 'reason', None) or exc}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED if settings.mutual else ssl.CERT_NONE
    return ctx


def server_contexts(settings: Iterable[TlsSettings]) -> dict[str, ssl.SSLContext]:
    """protocol -> context for each listener with TLS on; a warning for each certificate flag given
    while its TLS is off. Raises TlsError. Used by the scheduler process and by each frontend worker."""
    out = {}
    for s in settings:
        for flag in s.ignored():
            log.warning("%s is ignored: %s and %s are false", flag, s.flag("use-ssl"), s.flag("use-ssl-mutual"))
        ctx = server_context(s)
        if ctx is not None:
            out[s.protocol] = ctx
    return out
