"""Every command-line option of every entry point says its default in ``--help`` (flags and required options
excepted), and every entry point that draws progress bars takes --quiet (a researcher reads the defaults
before a long run, not the source)."""

import argparse
import contextlib
import io

import pytest

from jaxrecover import cli
from jaxrecover.studies import STUDIES

FLAGS = (argparse._HelpAction, argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction,
         argparse._VersionAction)


def _parsers(argv_main):
    """The parsers ``main(["--help"])`` builds (argparse's parse_args recorded, then --help exits)."""
    seen = []
    original = argparse.ArgumentParser.parse_args

    def record(self, *args, **kwargs):
        seen.append(self)
        return original(self, *args, **kwargs)

    argparse.ArgumentParser.parse_args = record
    try:
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
            argv_main()
    finally:
        argparse.ArgumentParser.parse_args = original
    return seen


ENTRY_POINTS = {
    "train": lambda: cli.train_main(["--help"]),
    "evaluate": lambda: cli.evaluate_main(["--help"]),
    "serve": lambda: cli.serve_main(["--help"]),
    "audit": lambda: cli.main(["audit", "--help"]),
    "demo": lambda: cli.demo_main(["--help"]),
    **{f"study {name}": (lambda n=name: cli.main(["study", n, "--help"])) for name in STUDIES},
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_option_shows_its_default(entry):
    parsers = _parsers(ENTRY_POINTS[entry])
    assert parsers, entry
    missing = []
    for p in parsers:
        shows_defaults = isinstance(p.formatter_class, type) and issubclass(p.formatter_class,
                                                                           argparse.ArgumentDefaultsHelpFormatter)
        for action in p._actions:
            if isinstance(action, FLAGS) or not action.option_strings or action.required or shows_defaults:
                continue
            if "default" not in (action.help or "") and "(paper:" not in (action.help or ""):
                missing.append(action.option_strings[0])
    assert not missing, f"{entry}: --help does not show the default of {missing}"


@pytest.mark.parametrize("entry", sorted(set(ENTRY_POINTS) - {"serve"}))
def test_every_long_running_entry_point_takes_quiet(entry):
    options = {o for p in _parsers(ENTRY_POINTS[entry]) for a in p._actions for o in a.option_strings}
    assert "--quiet" in options, entry
