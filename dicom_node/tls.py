"""TLS for DICOM connections (PS3.15 Annex B; BCP 195): the ``ssl.SSLContext`` of the Storage SCP's TLS port and of
TLS export destinations, built from the ``[tls]`` section.

Both sides: TLS 1.2 or later (``minimum_version``); for TLS 1.2 only BCP 195's suites, forward-secret (ECDHE, DHE)
with AEAD ciphers (AES-GCM, ChaCha20-Poly1305: ``TLS12_CIPHERS``); TLS 1.3's own suites as OpenSSL offers them;
compression and renegotiation off. The node's certificate and private key
(``tls.certificate``, ``tls.private_key``) are its server certificate and the client certificate it presents to a
PACS. ``tls.ca_bundle`` holds the CAs that sign the peers' certificates: the clients of the TLS port (verified when
presented, required with ``tls.require_client_certificate``) and the PACS of a ``tls = true`` destination (always
verified, host name included: the certificate must name the host the destination is configured with). A file that is
missing or does not load is a ``ConfigError`` naming its key, raised when ``serve`` starts, never mid-association.

``handshake_failure`` turns an ``ssl.SSLError`` into a short reason for a log line (OpenSSL's reason code, the
verification message): never a library's whole exception text.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

from ai.safe_text import escape

from .config import ConfigError, TlsSettings

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"
"""OpenSSL's names for the TLS 1.2 suites allowed (``set_ciphers`` leaves TLS 1.3's suites alone)."""


def _load(key: str, path: Path | None, action: Callable[[], None]) -> None:
    if path is None:
        raise ConfigError(f"{key}: must name a PEM file for TLS")
    if not path.is_file():
        raise ConfigError(f"{key}: {escape(str(path), 300)} does not exist or is not a file")
    try:
        action()
    except ssl.SSLError as exc:
        raise ConfigError(f"{key}: {escape(str(path), 300)} could not be loaded (no PEM certificate in it: "
                          f"{handshake_failure(exc)})") from None
    except OSError as exc:
        raise ConfigError(f"{key}: {escape(str(path), 300)} could not be read ({escape(exc.strerror or 'error')})") \
            from None


def _harden(context: ssl.SSLContext) -> None:
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def _load_identity(context: ssl.SSLContext, tls: TlsSettings) -> None:
    """The node's certificate and key. The certificate file is parsed on its own first, so that a failure of
    ``load_cert_chain`` names the right key: then it is the private key (unreadable, encrypted, or not the
    certificate's)."""
    certificate, key = tls.certificate, tls.private_key
    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _load("tls.certificate", certificate, lambda: scratch.load_verify_locations(cafile=str(certificate)))
    if key is not None and key.is_file():
        try:
            context.load_cert_chain(str(certificate), str(key), password=_no_password)
        except (ssl.SSLError, ValueError):
            raise ConfigError(f"tls.private_key: {escape(str(key), 300)} could not be loaded (not an unencrypted "
                              "PEM private key, or not the key of tls.certificate)") from None
        return
    _load("tls.private_key", key, lambda: None)


def _no_password() -> str:
    raise ValueError("the private key is encrypted")  # never prompt on the terminal


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """The TLS port's context: the node's certificate; client certificates verified against ``tls.ca_bundle``
    (required with ``tls.require_client_certificate``, else verified when presented)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context)
    _load_identity(context, tls)
    if tls.ca_bundle is not None:
        bundle = tls.ca_bundle
        _load("tls.ca_bundle", bundle, lambda: context.load_verify_locations(cafile=str(bundle)))
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    elif tls.require_client_certificate:  # the configuration's own check says this first
        raise ConfigError("tls.ca_bundle: must name the CA bundle that signs client certificates")
    return context


class RecordingSSLSocket(ssl.SSLSocket):
    """An ``SSLSocket`` that keeps the error its handshake failed with on its context (``RecordingContext``):
    pynetdicom's requestor swallows it, and the exporter wants the reason for its error text."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except ssl.SSLError as exc:
            context = self.context
            if isinstance(context, RecordingContext):
                context.handshake_error = exc
            raise


class RecordingContext(ssl.SSLContext):
    """A client context that remembers the last handshake error of its sockets (one context per association)."""

    sslsocket_class = RecordingSSLSocket
    handshake_error: ssl.SSLError | None = None


def client_context(tls: TlsSettings) -> RecordingContext:
    """A context for one association to a ``tls = true`` destination: the PACS certificate verified against
    ``tls.ca_bundle`` (else the system's CAs) and its host name checked; the node's certificate presented.

    Built per association (a millisecond): certificates replaced on disk are used from the next association on,
    and the handshake error is that association's."""
    context = RecordingContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    _harden(context)
    _load_identity(context, tls)
    if tls.ca_bundle is not None:
        bundle = tls.ca_bundle
        _load("tls.ca_bundle", bundle, lambda: context.load_verify_locations(cafile=str(bundle)))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return context


def check_files(tls: TlsSettings, server: bool, client: bool) -> None:
    """Raise ``ConfigError`` (naming the key) unless the contexts that will be needed can be built."""
    if server:
        server_context(tls)
    if client:
        client_context(tls)


def handshake_failure(exc: BaseException) -> str:
    """A short, escaped reason for a failed handshake or load: OpenSSL's reason code and, for a certificate that
    did not verify, the verification message (no peer data beyond what the certificate check says)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = f"{exc.reason or 'CERTIFICATE_VERIFY_FAILED'}: {exc.verify_message or 'verification failed'}"
    elif isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or type(exc).__name__)
    elif isinstance(exc, TimeoutError):
        reason = "timed out"
    elif isinstance(exc, OSError):
        reason = f"{type(exc).__name__}" + (f" ({exc.strerror})" if exc.strerror else "")
    else:
        reason = type(exc).__name__
    return escape(reason, 200)
