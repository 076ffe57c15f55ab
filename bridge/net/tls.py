"""TLS for both listeners, from the certificate, key and CA settings (PEM files).

With a CA configured, clients must present a certificate that chains to it. Both listeners speak
TLS 1.2 or 1.3, and TLS 1.2 with forward-secret AEAD suites only (ECDHE with AES-GCM or
ChaCha20-Poly1305): no static-RSA key exchange, no CBC, no SHA-1 MACs.
"""

from __future__ import annotations

import ssl

from bridge.config import Settings

# OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are all AEAD and configured apart).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!SHA1:!CBC"


def mllp_tls_options(settings: Settings):
    """Twisted TLS options for the MLLP listener, or None for plain TCP."""
    if not settings.mllp_tls_cert:
        return None
    from twisted.internet import ssl as tssl

    with open(settings.mllp_tls_cert, "rb") as f:
        cert_pem = f.read()
    with open(settings.mllp_tls_key or settings.mllp_tls_cert, "rb") as f:
        key_pem = f.read()
    certificate = tssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    options: dict = {}
    if settings.mllp_tls_ca:
        with open(settings.mllp_tls_ca, "rb") as f:
            authority = tssl.Certificate.loadPEM(f.read())
        options = {"trustRoot": tssl.trustRootFromCertificates([authority])}
    return tssl.CertificateOptions(
        privateKey=certificate.privateKey.original,
        certificate=certificate.original,
        raiseMinimumTo=tssl.TLSVersion.TLSv1_2,
        acceptableCiphers=tssl.AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS),
        **options,
    )


def dicom_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """An SSL context for the DICOM listener, or None for plain TCP."""
    if not settings.dicom_tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.load_cert_chain(settings.dicom_tls_cert, settings.dicom_tls_key or None)
    if settings.dicom_tls_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(settings.dicom_tls_ca)
    return context
