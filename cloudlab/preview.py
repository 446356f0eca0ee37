"""Print the request RSpec that profile.py makes, without the portal.

    .venv/bin/python cloudlab/preview.py --nodeCount 3 --hardwareType m510 > request.xml

The options are the profile's parameters as geni-lib reads them outside the portal (`--help`
lists them; a boolean is false only when empty, `--bestEffort=`). With GENILIB_PORTAL_MODE=1 and
GENILIB_PORTAL_PARAMS_PATH=params.json it reads them from a JSON object, as the portal passes
them. Parameters the profile refuses print geni-lib's JSON list of errors on stderr, and the exit
status is 100 + their number. tests/test_profile.py runs the profile this way.

Needs geni-lib from PyPI (in the `test` extras: `pip install -e '.[test]'`). Its newest release,
0.9.9.4, still has Python 2 code that the portal's own Python 3 geni-lib no longer has: `print x`
statements in geni/portal.py (in its interactive prompt and its dict binding, neither of which
the profile reaches) keep that module from compiling, and Request.writeXML writes bytes to the
stream it is given. So this compiles geni/portal.py with exactly those statements turned into
print() calls and gives it a stdout that takes bytes, as Python 2's did. Everything else is
geni-lib's own code, unchanged; a geni-lib whose portal.py compiles is used as it is.
"""

import importlib.util
import re
import runpy
import sys
from pathlib import Path

PROFILE = Path(__file__).resolve().parent / "profile.py"


def load_portal_module() -> None:
    spec = importlib.util.find_spec("geni.portal")
    source = Path(spec.origin).read_text(encoding="utf-8")
    try:
        code = compile(source, spec.origin, "exec")
    except SyntaxError:
        source = re.sub(r"^(\s*)print (.+)$", r"\1print(\2)", source, flags=re.MULTILINE)
        code = compile(source, spec.origin, "exec")
    portal = importlib.util.module_from_spec(spec)
    sys.modules["geni.portal"] = portal
    exec(code, portal.__dict__)  # noqa: S102 (geni-lib's own geni/portal.py, compiled above)
    sys.modules["geni"].portal = portal


class BytesOrTextStdout:
    """stdout for geni-lib's writeXML (bytes) and argparse's --help (text) alike."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, data) -> int:
        if isinstance(data, bytes):
            self._stream.flush()
            return self._stream.buffer.write(data)
        return self._stream.write(data)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main() -> None:
    load_portal_module()
    sys.argv = [str(PROFILE), *sys.argv[1:]]
    sys.stdout = BytesOrTextStdout(sys.stdout)
    runpy.run_path(str(PROFILE), run_name="__main__")


if __name__ == "__main__":
    main()
