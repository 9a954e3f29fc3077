"""Logging set-up: text for people, JSON for machines, secrets masked in both.

Loggers are named per concern, as Tornado does: ``backstream.server``,
``backstream.client``, ``backstream.access`` (one line per relayed request),
``backstream.auth``. Messages use ``key=value`` pairs so that both formats stay
greppable. Whatever a line says, secret header values, credentials and query
tokens (``redact``) are masked by a filter on the handler, the last place every
line passes through, Tornado's included.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from . import redact
from .errors import ConfigError


def _without_detail(error: BaseException) -> str:
    """Tornado's parse errors quote what they refused ("Invalid header value 'a=b'"):
    keep their words, drop the quoted value, which may be a cookie."""
    return re.split(r"""['"]""", str(error), maxsplit=1)[0].rstrip(" :")


class MaskingFilter(logging.Filter):
    """Masks secrets in the fully formatted message of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("tornado.") and isinstance(record.args, tuple):
            record.args = tuple(
                _without_detail(a) if isinstance(a, Exception) else a for a in record.args
            )
        # Keep the formatted text, so the formatter does not format it again.
        record.msg, record.args = redact.current().mask_text(record.getMessage()), None
        return True


class _SecondCache:
    """One strftime per second instead of one per line: the access log is on the hot path."""

    def __init__(self, fmt: str, convert: Any) -> None:
        self.fmt, self.convert = fmt, convert
        self.second, self.text = -1, ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self.second:
            self.second, self.text = second, time.strftime(self.fmt, self.convert(second))
        return self.text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``msg``."""

    def __init__(self) -> None:
        super().__init__()
        self._stamp = _SecondCache("%Y-%m-%dT%H:%M:%S", time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": f"{self._stamp(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = redact.current().mask_text(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self._stamp = _SecondCache("%Y-%m-%d %H:%M:%S", time.localtime)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return f"{self._stamp(record.created)},{int(record.msecs):03d}"

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return redact.current().mask_text(super().formatException(ei))


LEVELS = ("debug", "info", "warning", "error")


def setup_logging(level: str = "info", fmt: str = "text", output: str = "stderr") -> None:
    """Route every backstream and Tornado logger to one handler."""
    handler: logging.Handler
    if output == "stderr":
        handler = logging.StreamHandler(sys.stderr)
    elif output == "stdout":
        handler = logging.StreamHandler(sys.stdout)
    else:
        try:
            handler = logging.FileHandler(output, encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot open log output {output!r}: {e.strerror}") from None
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(MaskingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # No caller, thread or process lookups per record (logging HOWTO, "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Tornado's access log duplicates ours; its other loggers stay useful.
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    if level != "debug":
        logging.getLogger("tornado.curl_httpclient").setLevel(logging.INFO)
