"""What kubetune reads from the Hugging Face Hub (or a mirror) without huggingface_hub: a model's
config.json, for the operator (a model outside the catalog) and for `kubetune estimate` alike. Below
both: it imports neither kubernetes nor kopf nor the estimator. Bodies from outside are read capped."""

from __future__ import annotations

# What is read from outside is small (a progress JSON, a config.json): a larger body is refused unread
# rather than held in memory, whatever the endpoint serves.
MAX_BODY_BYTES = 1 << 20


def read_capped(stream, what: str, limit: int = MAX_BODY_BYTES) -> bytes:
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{what} is larger than {limit // 1024} KiB, more than a real one holds: not read")
    return data


HUB = "https://huggingface.co"


def hub_endpoint(value: str | None, name: str) -> str | None:
    """A Hub mirror setting (``name``: the flag or variable it came from), checked: huggingface_hub
    joins paths onto it, so it must be a bare http(s) base URL."""
    from urllib.parse import urlparse

    from kubetune.errors import UsageError

    if not value:
        return None
    u = urlparse(value)
    if u.scheme not in ("http", "https") or not u.netloc or u.query or u.fragment:
        raise UsageError(f"{name} must be an http(s) URL such as https://hf-mirror.internal, got {value!r}")
    return value.rstrip("/")


def read_hub_config(
    uri: str, token: str | None, hub: str | None, *, cli: bool = False, ca_pem: str | None = None
) -> str:
    """config.json of hf://org/name[@revision] from the Hub or a mirror. ``cli``: the refusal names
    what `kubetune estimate` reads (the HF_TOKEN and HF_ENDPOINT variables), not the operator's
    spec.model.tokenSecret and --hf-endpoint. ``ca_pem`` (spec.storage.caBundle) is trusted beside
    the public roots: a mirror signed by a private CA."""
    import ssl
    import urllib.error
    import urllib.request

    from kubetune.errors import certificate_untrusted, untrusted

    # as huggingface_hub cleans HF_TOKEN in the trainer: a token from `--from-file` ends with a newline
    token = (token or "").replace("\r", "").replace("\n", "").strip() or None
    if token is not None and not token.isprintable():
        raise ValueError(
            f"the token in {'HF_TOKEN' if cli else 'spec.model.tokenSecret'} holds control characters: "
            "store the token alone, on one line"
        )
    name, _, rev = uri[len("hf://") :].partition("@")
    where = "the Hugging Face Hub" if not hub else f"the Hub mirror {hub} ({'HF_ENDPOINT' if cli else '--hf-endpoint'})"
    url = f"{hub or HUB}/{name}/resolve/{rev or 'main'}/config.json"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    ctx = None
    if ca_pem:
        ctx = ssl.create_default_context()
        ctx.load_verify_locations(cadata=ca_pem)
    try:
        with urllib.request.urlopen(req, timeout=5, context=ctx) as r:  # noqa: S310 (the Hub or the operator's mirror)
            return read_capped(r, f"config.json of {name}").decode()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            if token:
                why = (
                    f"the token in {'HF_TOKEN' if cli else 'spec.model.tokenSecret'} has no access to it: "
                    "accept the model's licence on the Hub with that account"
                )
            else:
                why = "it is gated or private: " + (
                    "set HF_TOKEN to a token with access"
                    if cli
                    else "set spec.model.tokenSecret to a Secret holding an HF_TOKEN with access"
                )
            raise ValueError(f"{where} refused its config.json (HTTP {e.code}): {why}") from None
        if e.code == 404:
            raise ValueError(
                f"{where} has no config.json for {name} at revision {rev or 'main'}: check "
                "the repository name and revision"
            ) from None
        raise ValueError(f"{where} did not serve its config.json (HTTP {e.code})") from None
    except OSError as e:
        if certificate_untrusted(e):
            fix = (
                "its TLS certificate is not trusted (certificate verify failed): point SSL_CERT_FILE at a bundle "
                "holding the CA that signed it"
                if cli
                else untrusted("its")
            )
            raise ValueError(f"{where} did not serve its config.json: {fix}") from None
        raise ValueError(f"{where} did not serve its config.json ({e})") from None
