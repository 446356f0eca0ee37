"""Taskfile parsing: the legacy colon format byte-for-byte, JSON Lines, and every rejection."""

import json

import pytest

from distcomp.spec import MAX_LINE_BYTES, SpecError, TaskSpec, parse_line, parse_taskfile

# The id of `shell:4:2:2:./cachesim PARAM1 PARAM2` since the first release.
PINNED_ID = "4b844f3aefc9d92e"


def test_colon_format_keeps_colons_in_params():
    spec = parse_line(b"shell:4:2:2:./cachesim --trace /mnt/mfs/t1.bin --size 0.1:0.5")
    assert (spec.type, spec.priority, spec.min_dram_gb, spec.min_cpu) == ("shell", 4, 2.0, 2.0)
    assert spec.params == "./cachesim --trace /mnt/mfs/t1.bin --size 0.1:0.5"


def test_decimal_memory_and_zero_cpu():
    spec = parse_line(b"python:0:0.5:0:sim.py --x 1")
    assert spec.min_dram_gb == 0.5 and spec.min_cpu == 0 and spec.mem_mb == 512


def test_comments_blank_lines_and_windows_line_endings():
    result = parse_taskfile(b"# header\r\n\r\nshell:1:0:1:echo a\r\n   \nshell:1:0:1:echo b\r\n")
    assert [t.params for t in result.tasks] == ["echo a", "echo b"]
    assert result.errors == []


def test_json_lines_with_optional_fields():
    spec = parse_line(b'{"type": "shell", "priority": 3, "min_dram_gb": 1, "min_cpu": 2, '
                      b'"params": "make", "timeout_s": 60, "cwd": "/tmp", "env": {"A": "1"}, '
                      b'"max_retries": 0}')
    assert spec.timeout_s == 60 and spec.cwd == "/tmp" and spec.env == {"A": "1"}
    assert spec.max_retries == 0 and spec.priority == 3


def test_id_is_stable_and_normalized():
    a = parse_line(b"shell:4:2:2:echo x")
    b = parse_line(b"  shell : 4 : 2.0 : 2.00 : echo x  ")
    c = parse_line(b'{"type":"shell","priority":4,"min_dram_gb":2,"min_cpu":2,"params":"echo x"}')
    assert a.task_id == b.task_id == c.task_id
    assert parse_line(b"shell:5:2:2:echo x").task_id != a.task_id
    assert len(a.task_id) == 16


def _reference_canonical(spec: TaskSpec) -> str:
    doc = {"type": spec.type, "priority": spec.priority, "min_dram_gb": float(spec.min_dram_gb),
           "min_cpu": float(spec.min_cpu), "params": spec.params,
           "max_retries": spec.max_retries}
    if spec.timeout_s is not None:
        doc["timeout_s"] = float(spec.timeout_s)
    if spec.cwd is not None:
        doc["cwd"] = spec.cwd
    if spec.env:
        doc["env"] = spec.env
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize("line", [
    b"shell:4:2:2:./cachesim PARAM1 PARAM2",
    b"python:-7:0.001:0.25:sim.py --x 'a b' --y \"c\"",
    "shell:999999:1e-7:100000:echo \u00e9\u6f22 \U0001f600 tab\there".encode(),
    b"shell:0:1048576:0:printf '\\\\' \x1b[0m",
    (b'{"type":"shell","params":"make","timeout_s":0.5,"cwd":"/d/\\u00e9","max_retries":0,'
     b'"env":{"Z":"1","A":"\\"q\\"","M":"\\u00e9"},"priority":-3,"min_dram_gb":3,"min_cpu":7}'),
])
def test_canonical_form_is_sorted_compact_json(line):
    """Task ids must not change: the hand-written canonical form equals json.dumps of the
    fields with sorted keys, for unicode, escapes, floats and every optional field."""
    spec = parse_line(line)
    assert spec.canonical() == _reference_canonical(spec)
    assert json.loads(spec.canonical())["params"] == spec.params


def test_task_ids_are_pinned():
    """The id of a given line is part of the contract (resubmitting after an upgrade must
    not queue the task again)."""
    assert parse_line(b"shell:4:2:2:./cachesim PARAM1 PARAM2").task_id == PINNED_ID


def test_repeated_lines_share_one_id():
    result = parse_taskfile(b"shell:1:0:1:echo a\nshell:1:0:1:echo a\nshell:1:0:1:echo b\n")
    ids = [t.task_id for t in result.tasks]
    assert len(ids) == 3 and ids[0] == ids[1] != ids[2]


@pytest.mark.parametrize("bad", [b"\xff\xfe", b"a\0b"])
def test_a_file_that_is_not_clean_utf8_parses_line_by_line_alike(bad):
    """A valid UTF-8 file is decoded once; any other goes line by line. Both paths must
    accept and reject the same lines with the same reasons and line numbers."""
    lines = [b"shell:1:0:1:echo \xc3\xa9", b"# c", b"bad line", b"  shell : 2 : 0.5 : 0 : x  \r",
             b'{"type":"python","params":"a.py","cwd":"/tmp"}',
             b"shell:1:0:1:" + b"x" * MAX_LINE_BYTES, b"", b"python:1:0:1:a 'b"]
    clean = parse_taskfile(b"\n".join(lines))
    dirty = parse_taskfile(b"\n".join([*lines, b"shell:1:0:1:" + bad]))
    assert [t.task_id for t in dirty.tasks] == [t.task_id for t in clean.tasks]
    assert len(clean.tasks) == 3
    assert dirty.errors[:-1] == clean.errors
    assert [n for n, _ in clean.errors] == [3, 6, 8]
    assert dirty.errors[-1][0] == len(lines) + 1


@pytest.mark.parametrize("line, reason", [
    (b"bash:1:0:1:echo", "unknown task type 'bash' (expected one of: shell, python)"),
    (b"shell:1:0:1", "expected type:priority:min_dram_gb:min_cpu:params, found 4 field(s)"),
    (b"shell:1:0:1:   ", "params is empty: nothing to run"),
    (b"shell:1:-2:1:echo", "min_dram_gb must be >= 0, got -2.0"),
    (b'{"type":"shell","params":"x","min_cpu":-1}', "min_cpu must be >= 0, got -1"),
    (b"shell:1: 1 x :1:echo", "min_dram_gb must be a number, got '1 x'"),
    (b"python:1:0:1:a 'b", "python params cannot be split into arguments: No closing quotation"),
    (b"shell:1:two:1:echo", "min_dram_gb must be a number, got 'two'"),
    (b"shell:1:nan:1:echo", "min_dram_gb must be a finite number, got 'nan'"),
    (b"shell:1:1:inf:echo", "min_cpu must be a finite number, got 'inf'"),
    (b"shell:1:1e12:1:echo",
     "min_dram_gb 1000000000000.0 is larger than any node (1,048,576 at most)"),
    # Too many digits for a float: a large number, not an infinite one, and not echoed whole.
    (b"shell:1:" + b"9" * 400 + b":1:echo",
     "min_dram_gb '99999999'... (400 characters) is larger than any node (1,048,576 at most)"),
    (b"shell:1:1:-1e400:echo", "min_cpu must be >= 0, got '-1e400'"),
    (b"shell:1:-Infinity:1:echo", "min_dram_gb must be a finite number, got '-Infinity'"),
    (b"shell:1:" + b"x" * 400 + b":1:echo",
     "min_dram_gb must be a number, got 'xxxxxxxx'... (400 characters)"),
    (b"shell:1.5:1:1:echo", "priority must be an integer, got '1.5'"),
    (b"shell:99999999:1:1:echo", "priority 99999999 is out of range (-999999..999999)"),
    (b'{"type": "shell", "params": 5}', "params must be a string, got int"),
    (b'{"type": "shell", "params": "x", "priority": "high"}',
     "priority must be an integer, got 'high'"),
    (b'{"type": "shell", "params": "x", "min_cpu": true}', "min_cpu must be a number, got True"),
    (b'{"type": "shell", "params": "x", "colour": 1}', "unknown field(s): 'colour'"),
    (b'{"type": "shell"}', "missing field 'params'"),
    (b'{"type": "shell", "params": "x"', "invalid JSON"),
    # json.loads keeps the last of a repeated key: this queued a python task.
    (b'{"type": "shell", "params": "x", "type": "python"}', "field 'type' given twice"),
    (b'{"type": "shell", "params": "x", "env": {"A": "1", "A": "2"}}', "field 'A' given twice"),
    # Was "expected type:priority:min_dram_gb:min_cpu:params, found 1 field(s)".
    (b'["shell", "echo x"]', "a JSON task must be an object"),
    (b"shell:1:0:1:echo \xff\xfe", "not valid UTF-8 (byte 0xff at column 18)"),
    (b"shell:1:0:1:echo \x00", "line contains a NUL byte"),
    # Accepted, then every attempt failed at the spawn: "illegal environment variable name".
    (b'{"type": "shell", "params": "x", "env": {"A=B": "x"}}', "env must be an object"),
    (b'{"type": "shell", "params": "x", "max_retries": 1001}',
     "max_retries must be an integer from 0 to 1000"),
])
def test_rejections_say_why(line, reason):
    with pytest.raises(SpecError) as exc:
        parse_line(line)
    assert str(exc.value).startswith(reason)


@pytest.mark.parametrize("line, reason", [
    ("shell:²:1:1:echo x".encode(), "priority must be an integer, got '²'"),
    ("shell:٣:1:1:echo x".encode(), "priority must be an integer, got '٣'"),
    (b"shell:+-5:1:1:echo x", "priority must be an integer, got '+-5'"),
    (b"shell:" + b"9" * 5000 + b":1:1:echo x",
     "priority is out of range (-999999..999999): it has 5000 digits"),
    (b'{"type": "shell", "params": "x", "priority": ' + b"9" * 5000 + b"}",
     "invalid JSON: a number has too many digits"),
    (b'{"type": "shell", "params": "x", "env": ' + b"[" * 30000 + b"]" * 30000 + b"}",
     "invalid JSON: arrays or objects nested too deeply"),
    (b'{"a": ' + b"[" * 60000, "invalid JSON: arrays or objects nested too deeply"),
])
def test_lines_that_crashed_the_parser_are_rejected(line, reason):
    with pytest.raises(SpecError) as exc:
        parse_line(line)
    assert str(exc.value) == reason
    assert parse_taskfile(line + b"\n").errors == [(1, reason)]


SURROGATE = ("holds \\ud800, a lone UTF-16 surrogate that is not a character (write the "
             "character itself, or its pair of surrogates)")


@pytest.mark.parametrize("line, reason", [
    (b'{"type":"shell","params":"echo \\ud800"}', "params " + SURROGATE),
    (b'{"type":"shell","params":"x","cwd":"/d/\\ud800"}', "cwd " + SURROGATE),
    (b'{"type":"shell","params":"x","env":{"A\\ud800":"1"}}', "an env variable name " + SURROGATE),
    (b'{"type":"shell","params":"x","env":{"A":"\\ud800"}}', "env variable 'A' " + SURROGATE),
    (b'{"type":"shell","params":"x","min_dram_gb":1' + b"0" * 400 + b"}",
     "min_dram_gb 10000000... (401 digits) is larger than any node (1,048,576 at most)"),
    (b'{"type":"shell","params":"x","min_cpu":-1' + b"0" * 400 + b"}",
     "min_cpu must be >= 0, got -1000000... (401 digits)"),
    (b'{"type":"shell","params":"x","timeout_s":1' + b"0" * 400 + b"}",
     "timeout_s 10000000... (401 digits) is larger than any node (31,536,000 at most)"),
    (b'{"type":"shell","params":"x","priority":1' + b"0" * 400 + b"}",
     "priority 10000000... (401 digits) is out of range (-999999..999999)"),
    (b'{"type":"shell","params":"x","a\\nb":1,"c\\"":2}',
     "unknown field(s): 'a\\nb', 'c\"'"),
    (b"shell:0:1_0:1:x", "min_dram_gb must be a number, got '1_0'"),
    ("shell:0:1:\u0663:x".encode(), "min_cpu must be a number, got '\u0663'"),
    ("shell:0:\uff11:1:x".encode(), "min_dram_gb must be a number, got '\uff11'"),
    (b'{"type":"shell","params":"x","timeout_s":0}', "timeout_s must be > 0 (omit it for no timeout)"),
])
def test_values_that_crashed_the_submit_or_slipped_through_are_one_line_errors(line, reason):
    """A lone surrogate passed parsing, then failed hashing the id after earlier chunks were
    stored; a 401-digit integer overflowed math.isfinite; a key with a newline broke the
    FILE:LINE format; the resource fields read '1_0' and other scripts' digits."""
    with pytest.raises(SpecError) as exc:
        parse_line(line)
    assert str(exc.value) == reason
    assert "\n" not in reason
    assert parse_taskfile(line + b"\n").errors == [(1, reason)]


def test_a_character_outside_the_bmp_written_as_its_surrogate_pair_is_accepted():
    spec = parse_line(b'{"type":"shell","params":"echo \\ud83d\\ude00"}')
    assert spec.params == "echo \U0001f600"
    assert spec.task_id == parse_line("shell:0:0:1:echo \U0001f600".encode()).task_id


@pytest.mark.parametrize("zero, negative_zero", [
    (b"shell:0:0:0:echo z", b"shell:0:-0:-0.0:echo z"),
    (b'{"type":"shell","params":"echo z","min_dram_gb":0,"min_cpu":0}',
     b'{"type":"shell","params":"echo z","min_dram_gb":-0.0,"min_cpu":-0.0}'),
])
def test_minus_zero_is_zero_and_the_same_task(zero, negative_zero):
    a, b = parse_line(zero), parse_line(negative_zero)
    assert a.task_id == b.task_id and (b.min_dram_gb, b.min_cpu) == (0.0, 0.0)
    assert "-0" not in b.canonical()


CR_REASON = ("line contains a carriage return (CR): convert CR line endings to LF, e.g. with "
             "`tr '\\r' '\\n'`")


@pytest.mark.parametrize("data", [
    b"shell:1:1:1:echo a\rshell:1:1:1:echo b\r",
    b"shell:1:1:1:echo a\rshell:1:1:1:echo b\r\n\xff\n",  # not UTF-8: parsed line by line
])
def test_cr_line_endings_are_refused_not_merged(data):
    result = parse_taskfile(data)
    assert result.tasks == []
    assert result.errors[0] == (1, CR_REASON)


def test_overlong_line_rejected():
    with pytest.raises(SpecError, match="longer than the 65536 byte limit"):
        parse_line(b"shell:1:0:1:" + b"x" * MAX_LINE_BYTES)


def test_a_crlf_lines_cr_does_not_count_toward_its_length():
    """A line of exactly the limit was refused with CRLF endings and taken with LF."""
    line = b"shell:1:0:1:" + b"x" * (MAX_LINE_BYTES - 12)
    for data in (line + b"\n", line + b"\r\n", line + b"\r\n\xff\n"):
        result = parse_taskfile(data)
        assert [t.params for t in result.tasks] == ["x" * (MAX_LINE_BYTES - 12)], data[-4:]
    result = parse_taskfile(b"x" + line + b"\r\n")
    too_long = f"line is {MAX_LINE_BYTES + 1} bytes, longer than the {MAX_LINE_BYTES} byte limit"
    assert result.errors == [(1, too_long)]


def test_every_bad_line_reported_with_its_number():
    result = parse_taskfile(b"shell:1:0:1:ok\nbad line\nshell:1:0:1:ok2\nshell:x:0:1:y\n")
    assert [n for n, _ in result.errors] == [2, 4]
    assert len(result.tasks) == 2


def test_python_params_must_split_like_a_shell():
    with pytest.raises(SpecError, match="python params cannot be split into arguments"):
        parse_line(b'python:0:0:1:script.py "unbalanced')
    assert parse_line(b'shell:0:0:1:echo "unbalanced').params == 'echo "unbalanced'


def test_a_utf16_file_is_one_error_saying_how_to_save_it():
    """PowerShell's `>` writes UTF-16: every line was refused as holding a NUL byte, with
    nothing saying why. A UTF-8 byte-order mark is fine: it is dropped."""
    text = "shell:0:0:1:echo a\nshell:0:0:1:echo b\n"
    for encoded in (text.encode("utf-16"), text.encode("utf-16-be").join([b"\xfe\xff", b""])):
        parsed = parse_taskfile(encoded)
        assert parsed.tasks == []
        assert parsed.errors == [(1, ("the file is UTF-16 text: save it as UTF-8 (iconv -f "
                                      "UTF-16 -t UTF-8 FILE > NEW, or your editor's encoding "
                                      "menu)"))]
    assert len(parse_taskfile(b"\xef\xbb\xbf" + text.encode()).tasks) == 2


def test_a_fraction_of_a_mib_is_a_whole_mib_not_none():
    """0.0004 GB is 0.41 MiB: cut to 0, the task declared no memory at all."""
    assert TaskSpec("shell", 0, 0.0004, 1, "x").mem_mb == 1
    assert TaskSpec("shell", 0, 0, 1, "x").mem_mb == 0
