"""argparse's help layout for rstash-send and rstash-recv, without its cost at start-up.

argparse makes a help formatter inside every ``add_argument()`` (to check
metavars), and its formatter asks shutil for the terminal width; shutil
imports bz2 and lzma. Both programs start once per transfer or connection,
so the width is taken here from ``COLUMNS`` or the terminal directly. This
module must never import anything but argparse and os.
"""

from __future__ import annotations

import argparse
import os


class HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        try:
            width = int(os.environ.get("COLUMNS", "")) or os.get_terminal_size(1).columns
        except (ValueError, OSError):
            width = 80
        super().__init__(prog, width=max(width - 2, 40))


def parser(prog: str, usage: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """An argument parser laid out by :class:`HelpFormatter`."""
    return argparse.ArgumentParser(prog=prog, usage=usage, formatter_class=HelpFormatter,
                                   description=description, epilog=epilog)
