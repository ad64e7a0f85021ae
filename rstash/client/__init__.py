"""rstash-send's machinery (rstash-send(1)), below its command line.

- ``options``: the frozen, typed options every part reads;
- ``destinations``: ``rstash://`` and ``ssh://`` destinations and the ssh command line;
- ``connect``: reaching a server (TCP, ``--proxy-command``, ssh) as one byte stream;
- ``sources``: what is sent (files, stdin, ``--from-command``);
- ``session``: the session driver and its one streaming loop, for both
  interactive and pipe mode, and the per-file results;
- ``profiles``: send.toml, its checks and its ``[dest.NAME]`` tables.

Nothing here parses the command line or decides the retry policy (``rstash.send``
does). Only ``profiles`` imports pydantic (and rstash.config's wording of
problems), and only ``rstash.send`` imports it, when a profile is used.
"""
