"""Errors that reach the user as one clear line instead of a traceback."""


class UsageError(Exception):
    """A bad flag, file or input: the CLI prints it as one line and exits 2."""


def untrusted(whose: str) -> str:
    """What to do about a certificate that did not verify: spec.storage.caBundle covers the S3
    endpoint and the Hub mirror alike."""
    return (
        f"{whose} TLS certificate is not trusted (certificate verify failed): set spec.storage.caBundle to a "
        "ConfigMap holding the CA that signed it"
    )


UNTRUSTED_S3 = untrusted("the S3 endpoint's")


def certificate_untrusted(e: BaseException | None) -> bool:
    """Whether a TLS peer's certificate failed verification, anywhere in the exception's chain
    (botocore and urllib3 wrap the ssl error, some only in their message)."""
    import ssl

    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False
