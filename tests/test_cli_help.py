"""Every option of the three commands a user runs explains itself in --help."""

from __future__ import annotations

import argparse

import pytest

from blobstore import cli as pack_cli
from blobstore.runtime import cli as run_cli
from blobstore.runtime.serve import cli as serve_cli


def parsers(parser: argparse.ArgumentParser, name: str):
    """The parser and, depth first, every sub-command's, each with its command line name."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from parsers(sub, f"{name} {sub_name}")


COMMANDS = [("blob-pack", pack_cli.build_parser), ("blob-run", run_cli.build_parser),
            ("blob-serve", serve_cli.build_parser)]


@pytest.mark.parametrize("name, build", COMMANDS, ids=[name for name, _ in COMMANDS])
def test_every_option_has_help(name, build):
    undocumented = [f"{command}: {'/'.join(action.option_strings) or action.dest}"
                    for command, parser in parsers(build(), name)
                    for action in parser._actions
                    if not isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                                               argparse._SubParsersAction))
                    and not (action.help or "").strip()]
    assert undocumented == []
