"""The CLI run in-process for the tests (pytest puts tests/ on sys.path, so tests import this module)."""
import contextlib
import io

from ctrecon.cli import main


def run_cli(args):
    """``ctrecon ARGS`` in-process: (exit code, stdout, stderr). ``main`` always ends in SystemExit."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            return exc.code, out.getvalue(), err.getvalue()
    raise AssertionError(f"ctrecon {' '.join(map(str, args))} returned without exiting")
