"""What the operator and the trainer share about object storage: how an s3:// URI splits into a bucket
and a key and how keys join, so the operator reads and deletes exactly the keys the trainer writes; and
retry with exponential backoff. Pure Python: no boto3 or kubernetes here (both images install it)."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")

S3_SCHEME = "s3://"


def written_by_another(writer_uid: str | None, uid: str | None) -> bool:
    """Whether an object in a run's prefix (a checkpoint's manifest, the progress object) was written for
    another FineTuneJob than ``uid``: a deleted one of the same name whose prefix deletionPolicy Retain kept.
    Not when either side does not say (written before objects named their job, a config without a UID)."""
    return bool(uid and writer_uid and writer_uid != uid)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key``. The key is everything after the bucket's slash, as S3 reads it
    ('?', '#' and ';' are key characters, not URL syntax), without leading slashes. ValueError when the URI
    is not s3:// or names no bucket."""
    if not uri.startswith(S3_SCHEME):
        raise ValueError(f"not an s3:// URI: {uri}")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri}")
    return bucket, key.lstrip("/")


def join_key(prefix: str, key: str) -> str:
    """``key`` under ``prefix`` with one slash between them (either may be empty)."""
    if not prefix:
        return key
    return prefix.rstrip("/") + "/" + key.lstrip("/") if key else prefix


def s3_uri(bucket: str, key: str = "") -> str:
    return f"{S3_SCHEME}{bucket}/{key}" if key else f"{S3_SCHEME}{bucket}"


def backoff_delay(attempt: int, base: float = 1.0, cap: float = 30.0) -> float:
    """Seconds to wait after failed attempt ``attempt`` (0, 1, ...): base, 2 x base, 4 x base, ... at most cap."""
    return min(cap, base * 2**attempt)


def retry(
    fn: Callable[[], T],
    attempts: int,
    *,
    fail: Callable[[Exception], Exception],
    log_retry: Callable[[Exception, float], None],
    give_up: Callable[[Exception], bool] | None = None,
    passthrough: tuple[type[BaseException], ...] = (),
    base_delay: float = 1.0,
    cap: float = 30.0,
) -> T | None:
    """``fn()``, tried up to ``attempts`` times with backoff_delay between tries (``log_retry(error, delay)``
    before each wait). The last failure, or one ``give_up`` says no retry fixes, raises ``fail(error)``;
    ``passthrough`` exceptions are raised as they are, at once. None when ``attempts`` is 0."""
    for attempt in range(attempts):
        try:
            return fn()
        except passthrough:
            raise
        except Exception as e:  # network, 5xx, throttling: back off and try again
            if attempt == attempts - 1 or (give_up is not None and give_up(e)):
                raise fail(e) from None
            delay = backoff_delay(attempt, base_delay, cap)
            log_retry(e, delay)
            time.sleep(delay)  # looked up at call time: tests may patch time.sleep
    return None
