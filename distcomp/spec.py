"""Task specifications and taskfile parsing.

A taskfile holds one task a line, in either of two formats chosen per line:

* the colon format of the system distcomp replaces, kept byte-compatible:
  ``type:priority:min_dram_gb:min_cpu:params`` where ``params`` is everything after the fourth
  colon (it may contain colons itself);
* JSON Lines: a line starting with ``{`` is one JSON object with the same fields plus the optional
  ``timeout_s``, ``cwd``, ``env`` and ``max_retries``.

Parsing is pure (no I/O besides reading the bytes) so that validation can be all-or-nothing:
the caller gets every good task and every bad line, and decides whether to write anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _json_str
from typing import Any

TASK_TYPES = ("shell", "python")
MAX_LINE_BYTES = 64 * 1024
# Priorities are folded with a sequence number into one exact double (see queue.py), so they
# must stay well inside 2**20.
MAX_PRIORITY = 999_999
MAX_DRAM_GB = 1024 * 1024  # 1 PiB: anything larger is a typo, not a real node
MAX_CPU = 100_000
MAX_RETRIES_LIMIT = 1000
MAX_TIMEOUT_S = 365 * 24 * 3600
DEFAULT_MAX_RETRIES = 3
JSON_FIELDS = frozenset(
    {"type", "priority", "min_dram_gb", "min_cpu", "params", "timeout_s", "cwd", "env",
     "max_retries"}
)


class SpecError(ValueError):
    """A task line that cannot be accepted; the message is the reason shown to the user."""


@dataclass(slots=True)
class TaskSpec:
    """What the user asked for. Everything here is part of the task's identity.

    Not frozen: a frozen dataclass sets each field through ``object.__setattr__``, which made
    building the spec a third of the parse time of a million-line taskfile. Treat it as
    immutable. ``task_id`` is computed on first use, once: a taskfile is validated whole
    before anything is submitted, and the ids are worked out while Redis stores the chunk
    before (see ``Queue.submit``)."""

    type: str
    priority: int
    min_dram_gb: float
    min_cpu: float
    params: str
    timeout_s: float | None = None
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    max_retries: int = DEFAULT_MAX_RETRIES
    _id: str = field(default="", init=False, repr=False, compare=False)

    @property
    def task_id(self) -> str:
        """Stable id: the same content always maps to the same id, so resubmission adds
        nothing."""
        if not self._id:
            self._id = hashlib.sha256(self.canonical().encode()).hexdigest()[:16]
        return self._id

    def canonical(self) -> str:
        """Normalized content: equal for tasks that mean the same thing (``2`` == ``2.0 GB``).

        It is ``json.dumps`` of the fields with sorted keys and no spaces, written out by hand
        because this runs once per submitted task and the generic encoder was half the cost of
        submitting a million tasks; tests/test_spec.py checks it against ``json.dumps``."""
        if self.cwd is None and not self.env and self.timeout_s is None:
            return (f'{{"max_retries":{int(self.max_retries)},"min_cpu":{float(self.min_cpu)!r},'
                    f'"min_dram_gb":{float(self.min_dram_gb)!r},"params":{_json_str(self.params)},'
                    f'"priority":{int(self.priority)},"type":{_json_str(self.type)}}}')
        parts = []
        if self.cwd is not None:
            parts.append('"cwd":' + _json_str(self.cwd))
        if self.env:
            parts.append('"env":' + json.dumps(self.env, sort_keys=True, separators=(",", ":"),
                                               ensure_ascii=False))
        parts += (
            f'"max_retries":{int(self.max_retries)}',
            f'"min_cpu":{float(self.min_cpu)!r}',
            f'"min_dram_gb":{float(self.min_dram_gb)!r}',
            '"params":' + _json_str(self.params),
            f'"priority":{int(self.priority)}',
        )
        if self.timeout_s is not None:
            parts.append(f'"timeout_s":{float(self.timeout_s)!r}')
        parts.append('"type":' + _json_str(self.type))
        return "{" + ",".join(parts) + "}"

    @property
    def mem_mb(self) -> int:
        return math.ceil(self.min_dram_gb * 1024)


@dataclass
class ParseResult:
    tasks: list[TaskSpec]  # duplicates included: the queue counts them when it submits
    errors: list[tuple[int, str]]  # (line number, reason)


def _resource_text(text: str, what: str, limit: int) -> float:
    """A resource field of the colon format: a number (surrounding blanks allowed) in range.
    ``float`` alone is not the test: it reads other scripts' digits and ``1_0``, which the
    priority field (and JSON) refuse."""
    try:
        if not text.isascii() or "_" in text:
            raise ValueError(text)
        number = float(text)
    except ValueError:
        raise SpecError(f"{what} must be a number, got {_shown_text(text)}") from None
    if math.isfinite(number):
        return _in_range(number, what, limit)
    if math.isnan(number) or text.strip().lstrip("+-")[:1].isalpha():
        raise SpecError(f"{what} must be a finite number, got {_shown_text(text)}")
    # Digits too many for a float: what they say is as plain as for any large number.
    raise SpecError(f"{what} must be >= 0, got {_shown_text(text)}" if number < 0 else
                    f"{what} {_shown_text(text)} is larger than any node ({limit:,} at most)")


def _shown_text(text: str) -> str:
    """A field's text for an error message, without its blanks: a line may hold 65,536 bytes
    of it."""
    text = text.strip()
    return repr(text) if len(text) <= 24 else f"{text[:8]!r}... ({len(text)} characters)"


def _priority_text(text: str) -> int:
    """The priority field of the colon format: ASCII digits after at most one sign. ``int``
    alone is not the test: it reads other scripts' digits and refuses thousands of digits.
    A number too long to be a typo of a priority is named by its length, not echoed."""
    digits = text[1:] if text.startswith(("+", "-")) else text
    if not (digits.isascii() and digits.isdecimal()):
        raise SpecError(f"priority must be an integer, got {text!r}")
    if len(digits) > 20:
        raise SpecError(f"priority is out of range (-{MAX_PRIORITY}..{MAX_PRIORITY}): it has "
                        f"{len(digits)} digits")
    return _check_priority(int(text))


def _shown(value: float) -> str:
    """A number for an error message: a JSON integer can have thousands of digits."""
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:8]}... ({len(text.lstrip('-'))} digits)"


def _check_priority(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"priority must be an integer, got {value!r}")
    if not -MAX_PRIORITY <= value <= MAX_PRIORITY:
        raise SpecError(f"priority {_shown(value)} is out of range "
                        f"(-{MAX_PRIORITY}..{MAX_PRIORITY})")
    return value


def _check_resource(value: Any, what: str, limit: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{what} must be a number, got {value!r}")
    # An int is finite however long; math.isfinite would overflow converting a long one.
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"{what} must be a finite number, got {value!r}")
    return _in_range(value, what, limit)


def _in_range(value: float, what: str, limit: int) -> float:
    if value < 0:
        raise SpecError(f"{what} must be >= 0, got {_shown(value)}")
    if value > limit:
        raise SpecError(f"{what} {_shown(value)} is larger than any node ({limit:,} at most)")
    # -0.0 passes the test above; as 0.0 it gives the task the same id as 0 does.
    return float(value) if value else 0.0


def _check_type(value: Any) -> str:
    if value not in TASK_TYPES:
        raise SpecError(f"unknown task type {value!r} (expected one of: {', '.join(TASK_TYPES)})")
    return value


def _check_text(value: str, what: str) -> None:
    """A SpecError if ``value`` cannot be stored: a JSON ``\\ud800`` escape gives a lone
    UTF-16 surrogate, which no UTF-8 text holds. Found only when the task id is hashed or the
    task is sent to Redis, it would stop a submit half-way through the taskfile."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SpecError(f"{what} holds \\u{ord(exc.object[exc.start]):04x}, a lone UTF-16 "
                        f"surrogate that is not a character (write the character itself, or "
                        f"its pair of surrogates)") from None


def _check_params(value: Any) -> str:
    if not isinstance(value, str):
        raise SpecError(f"params must be a string, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise SpecError("params is empty: nothing to run")
    if "\0" in value:
        raise SpecError("params contains a NUL byte")
    return value


def _check_python_params(spec: TaskSpec) -> TaskSpec:
    """``python`` params are split like a shell would; catch unbalanced quotes at submit time."""
    if spec.type == "python":
        try:
            shlex.split(spec.params)
        except ValueError as exc:
            raise SpecError(f"python params cannot be split into arguments: {exc}") from None
    return spec


def parse_colon_line(line: str) -> TaskSpec:
    parts = line.split(":", 4)
    if len(parts) < 5:
        raise SpecError(
            f"expected type:priority:min_dram_gb:min_cpu:params, found {len(parts)} field(s)"
        )
    ttype, prio, dram, cpu, params = parts
    ttype = ttype.strip()
    # This runs once per line of a taskfile that may have millions: few calls, positional.
    spec = TaskSpec(
        ttype if ttype == "shell" else _check_type(ttype),
        _priority_text(prio.strip()),
        _resource_text(dram, "min_dram_gb", MAX_DRAM_GB),
        _resource_text(cpu, "min_cpu", MAX_CPU),
        _check_params(params),
    )
    return spec if ttype == "shell" else _check_python_params(spec)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose key repeats is refused: json.loads keeps the last one silently, and
    `{"type": "shell", ..., "type": "python"}` queued a python task."""
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise SpecError(f"field {key!r} given twice")
        doc[key] = value
    return doc


def parse_json_line(line: str) -> TaskSpec:
    try:
        doc = json.loads(line, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise SpecError(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    except SpecError:
        raise
    except ValueError:  # what json.loads raises besides: an integer over Python's digit limit
        raise SpecError("invalid JSON: a number has too many digits") from None
    except RecursionError:
        raise SpecError("invalid JSON: arrays or objects nested too deeply") from None
    if not isinstance(doc, dict):
        raise SpecError("a JSON task must be an object")
    unknown = sorted(set(doc) - JSON_FIELDS)
    if unknown:
        # repr: a name may hold a newline or a quote, which would break the FILE:LINE format
        raise SpecError(f"unknown field(s): {', '.join(map(repr, unknown))}")
    for required in ("type", "params"):
        if required not in doc:
            raise SpecError(f"missing field {required!r}")
    timeout = doc.get("timeout_s")
    if timeout is not None:
        timeout = _check_resource(timeout, "timeout_s", MAX_TIMEOUT_S)
        if timeout == 0:
            raise SpecError("timeout_s must be > 0 (omit it for no timeout)")
    cwd = doc.get("cwd")
    if cwd is not None and (not isinstance(cwd, str) or not cwd or "\0" in cwd):
        raise SpecError("cwd must be a non-empty string")
    # Only JSON can spell a lone surrogate: the colon format is decoded as strict UTF-8.
    if isinstance(doc["params"], str):
        _check_text(doc["params"], "params")
    if cwd is not None:
        _check_text(cwd, "cwd")
    env = doc.get("env", {})
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and k and "=" not in k and "\0" not in k
        and isinstance(v, str) and "\0" not in v
        for k, v in env.items()
    ):
        raise SpecError("env must be an object mapping variable names to strings")
    for k, v in env.items():
        _check_text(k, "an env variable name")
        _check_text(v, f"env variable {k!r}")
    retries = doc.get("max_retries", DEFAULT_MAX_RETRIES)
    if isinstance(retries, bool) or not isinstance(retries, int) or not (
        0 <= retries <= MAX_RETRIES_LIMIT
    ):
        raise SpecError(f"max_retries must be an integer from 0 to {MAX_RETRIES_LIMIT}")
    return _check_python_params(TaskSpec(
        type=_check_type(doc["type"]),
        priority=_check_priority(doc.get("priority", 0)),
        min_dram_gb=_check_resource(doc.get("min_dram_gb", 0), "min_dram_gb", MAX_DRAM_GB),
        min_cpu=_check_resource(doc.get("min_cpu", 1), "min_cpu", MAX_CPU),
        params=_check_params(doc["params"]),
        timeout_s=timeout,
        cwd=cwd,
        env=dict(sorted(env.items())),
        max_retries=retries,
    ))


def _too_long(n_bytes: int) -> SpecError:
    return SpecError(f"line is {n_bytes} bytes, longer than the {MAX_LINE_BYTES} byte limit")


def parse_line(raw: bytes) -> TaskSpec | None:
    """Parse one line (without its newline). Returns None for blank lines and comments."""
    # A CRLF line's CR is its line ending, not one of its bytes.
    if len(raw) - raw.endswith(b"\r") > MAX_LINE_BYTES:
        raise _too_long(len(raw) - raw.endswith(b"\r"))
    if b"\0" in raw:
        raise SpecError("line contains a NUL byte (is this a binary file?)")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"not valid UTF-8 (byte {exc.object[exc.start]:#04x} at column "
                        f"{exc.start + 1})") from None
    return _parse_decoded(line)


def _parse_text_line(line: str) -> TaskSpec | None:
    """``parse_line`` for a line of a file already known to be valid UTF-8 without NULs."""
    line = line.removesuffix("\r")
    if len(line) > MAX_LINE_BYTES // 4 and len(line.encode()) > MAX_LINE_BYTES:
        raise _too_long(len(line.encode()))
    return _parse_decoded(line)


def _parse_decoded(line: str) -> TaskSpec | None:
    line = line.removesuffix("\r")
    if "\r" in line:
        # A file with old Mac (CR) line endings reads as one line: say so rather than run
        # the lines as one task or report a strange field.
        raise SpecError("line contains a carriage return (CR): convert CR line endings to LF, "
                        "e.g. with `tr '\\r' '\\n'`")
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    if line.startswith(("{", "[")):
        return parse_json_line(line)
    return parse_colon_line(line)


def parse_taskfile(data: bytes) -> ParseResult:
    """Parse and validate a whole taskfile. Tasks that repeat within the file are returned
    as often as they appear; ``Queue.submit`` stores each once."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    elif data.startswith((b"\xff\xfe", b"\xfe\xff")):
        # PowerShell's `>` and Notepad's "Unicode": every line would be "a NUL byte".
        reason = ("the file is UTF-16 text: save it as UTF-8 (iconv -f UTF-16 -t UTF-8 FILE > "
                  "NEW, or your editor's encoding menu)")
        return ParseResult([], [(1, reason)])
    # A file that is valid UTF-8 without NUL bytes (nearly every file) is decoded once instead
    # of line by line; any other file goes line by line so each error names its line.
    text = None
    if b"\0" not in data:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            pass
    parse: Callable[[Any], TaskSpec | None] = parse_line if text is None else _parse_text_line
    lines: list[Any] = data.split(b"\n") if text is None else text.split("\n")
    tasks: list[TaskSpec] = []
    errors: list[tuple[int, str]] = []
    for lineno, raw in enumerate(lines, start=1):
        try:
            spec = parse(raw)
        except SpecError as exc:
            errors.append((lineno, str(exc)))
            continue
        if spec is not None:
            tasks.append(spec)
    return ParseResult(tasks=tasks, errors=errors)
