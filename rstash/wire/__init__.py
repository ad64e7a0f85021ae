"""The rstash/1 wire protocol, sans I/O (rstash(7) is its specification).

Theory of operation
-------------------
Each side owns a connection object that is *fed* the bytes its peer sent
(``receive_data``; ``b""`` means end of stream) and *asked* for what they
mean (``next_event()`` returns an event or ``NEED_DATA``). What a side wants
to say comes back from a method as bytes for the caller to write. The caller
owns every socket, pipe, file and clock; nothing here blocks, sleeps or reads
the time, so every test runs without a socket.

Client → server is a stream of frames (``frames``); server → client a stream
of printable-ASCII lines ``NNN text`` of at most 1024 bytes (``replies``).
``events`` holds what either side reads; ``server`` and ``client`` are the two
roles, each driven by a literal transition table. A role that raises enters
ERROR and refuses every later call.

Nothing in this package may open a file or socket, read a clock or draw
random bytes: nonces, times and greetings are arguments.
"""

from __future__ import annotations

from ..errors import IntegrityError
from .client import ClientConnection
from .client_table import ClientState, ReplyState
from .events import (
    Abort,
    AuthOk,
    Bye,
    ClientEvent,
    ConnectionClosed,
    Data,
    Done,
    End,
    File,
    FileHeader,
    Go,
    Greeting,
    Hello,
    Receipt,
    ResumeOffer,
    ServerEvent,
    SessionRefused,
    encode_ext,
    encode_file_header,
    hello_without_proof,
    parse_file_header,
    parse_hello,
)
from .frames import (
    EXT_SERVER_ID,
    FLAG_DRY_RUN,
    FRAME_LIMITS,
    MAX_DATA,
    METHOD_HMAC_SHA256,
    METHOD_SSH,
    MODE_INTERACTIVE,
    MODE_PIPE,
    NEED_DATA,
    NO_TID,
    PROTOCOL_VERSION,
    WAIT_SIZE,
    FrameType,
    frame,
)
from .replies import (
    ECHO_LIMIT,
    GO_LINE,
    GREETING_PREFIX,
    MAX_LINE,
    RECEIPT_TEXT,
    SESSION_LINES,
    already_line,
    auth_ok_line,
    bye_line,
    greeting_line,
    integrity_line,
    line,
    pct_decode,
    pct_encode,
    receipt_line,
    resume_line,
    session_line,
    skew_line,
)
from .server import SERVER_TRANSITIONS, ServerConnection, ServerState

__all__ = [
    "ECHO_LIMIT",
    "EXT_SERVER_ID",
    "FLAG_DRY_RUN",
    "FRAME_LIMITS",
    "GO_LINE",
    "GREETING_PREFIX",
    "MAX_DATA",
    "MAX_LINE",
    "METHOD_HMAC_SHA256",
    "METHOD_SSH",
    "MODE_INTERACTIVE",
    "MODE_PIPE",
    "NEED_DATA",
    "NO_TID",
    "PROTOCOL_VERSION",
    "RECEIPT_TEXT",
    "SERVER_TRANSITIONS",
    "SESSION_LINES",
    "WAIT_SIZE",
    "Abort",
    "AuthOk",
    "Bye",
    "ClientConnection",
    "ClientEvent",
    "ClientState",
    "ConnectionClosed",
    "Data",
    "Done",
    "End",
    "File",
    "FileHeader",
    "FrameType",
    "Go",
    "Greeting",
    "Hello",
    "IntegrityError",
    "Receipt",
    "ReplyState",
    "ResumeOffer",
    "ServerConnection",
    "ServerEvent",
    "ServerState",
    "SessionRefused",
    "already_line",
    "auth_ok_line",
    "bye_line",
    "encode_ext",
    "encode_file_header",
    "frame",
    "greeting_line",
    "hello_without_proof",
    "integrity_line",
    "line",
    "parse_file_header",
    "parse_hello",
    "pct_decode",
    "pct_encode",
    "receipt_line",
    "resume_line",
    "session_line",
    "skew_line",
]
