"""Hand-written mutants: the planted bugs mutmut does not generate (flags, constants, deleted calls).

Each is one exact piece of source text and what replaces it; run.py applies one at a time to a copy
and runs the module's own unit tests. A mutant whose text is no longer found is reported as stale.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HandMutant:
    name: str
    path: str
    old: str
    new: str


AUTH = "rstash/auth.py"
FRAMES = "rstash/wire/frames.py"
REPLIES = "rstash/wire/replies.py"
SERVER = "rstash/wire/server.py"
CLIENT = "rstash/wire/client.py"
STORE = "rstash/store.py"
UPLOAD = "rstash/upload.py"

HAND_MUTANTS: list[HandMutant] = [
    # --- auth: secrets out of repr, and the constants of the construction
    HandMutant("auth-secret-in-repr", AUTH, "secret: bytes = field(repr=False)", "secret: bytes"),
    HandMutant("auth-proof-in-repr", AUTH, "proof: bytes = field(repr=False)", "proof: bytes"),
    HandMutant("auth-k_c2s-in-repr", AUTH, "k_c2s: bytes = field(repr=False)", "k_c2s: bytes"),
    HandMutant("auth-k_s2c-in-repr", AUTH, "k_s2c: bytes = field(repr=False)", "k_s2c: bytes"),
    HandMutant("auth-line-mac-15", AUTH, "LINE_MAC_LEN = 16", "LINE_MAC_LEN = 15"),
    HandMutant("auth-key-id-7", AUTH, "KEY_ID_LEN = 8", "KEY_ID_LEN = 7"),
    HandMutant("auth-no-comment-strip", AUTH, "(m.group(2) or \"\").strip()", "(m.group(2) or \"\")"),
    HandMutant("auth-log-name-no-rstrip", AUTH, "{self.comment}\".rstrip()", "{self.comment}\""),
    # --- wire: limits and the characters a line may hold (module constants mutmut leaves alone)
    HandMutant("replies-del-printable", REPLIES, r'rb"[\x20-\x7e]*"', r'rb"[\x20-\x7f]*"'),
    HandMutant("replies-tab-printable", REPLIES, r'rb"[\x20-\x7e]*"', r'rb"[\x09-\x7e]*"'),
    HandMutant("replies-max-line-1025", REPLIES, "MAX_LINE = 1024", "MAX_LINE = 1025"),
    HandMutant("replies-echo-254", REPLIES, "ECHO_LIMIT = 255", "ECHO_LIMIT = 254"),
    HandMutant("replies-code-1xx", REPLIES, r'r"([2-5][0-9]{2}) (.*)\Z"', r'r"([1-5][0-9]{2}) (.*)\Z"'),
    HandMutant("frames-max-data", FRAMES, "MAX_DATA = 1 << 20", "MAX_DATA = (1 << 20) + 1"),
    HandMutant("frames-hello-4097", FRAMES, "FrameType.HELLO: (1, 4096)", "FrameType.HELLO: (1, 4097)"),
    HandMutant("frames-file-4097", FRAMES, "FrameType.FILE: (1, 4096)", "FrameType.FILE: (1, 4097)"),
    HandMutant("frames-end-41", FRAMES, "FrameType.END: (40, 40)", "FrameType.END: (40, 41)"),
    HandMutant("server-no-dry-run-transition", SERVER, "Judged.DRY_RUN_FILE: ServerState.READY,", ""),
    HandMutant("server-no-abort-transition", SERVER, "FrameType.ABORT: ServerState.READY}", "}"),
    HandMutant("client-no-dry-run-transition", CLIENT, "Step.DRY_RUN_FILE: ClientState.READY,", ""),
    HandMutant("client-no-abort-transition", CLIENT, "Step.ABORT: ClientState.READY}", "}"),
    # --- store and upload: flags, constants and calls whose loss no other mutant shows
    HandMutant("store-sweep-blocking-open", STORE,
               "_SWEEP_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC",
               "_SWEEP_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC"),
    HandMutant("store-box-followed", STORE,
               "_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC",
               "_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC"),
    HandMutant("store-temp-re-loose", STORE, "[0-9a-f]{32}", "[0-9a-z]{1,32}"),
    HandMutant("store-sweep-no-identity", STORE, "!= (st.st_dev, st.st_ino):", "!= (now.st_dev, now.st_ino):"),
    HandMutant("store-sweep-stat-follows", STORE,
               "now = os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)",
               "now = os.stat(name, dir_fd=self.dir_fd)"),
    HandMutant("store-sweep-no-dir-fsync", STORE, "        if removed:\n            self._sync_dir()\n", ""),
    HandMutant("store-no-box-lock", STORE, "                fcntl.flock(fd, fcntl.LOCK_EX)\n                self.held",
               "                self.held"),
    HandMutant("store-no-temp-lock", STORE, "                fcntl.flock(fd, fcntl.LOCK_EX)\n                # umask",
               "                # umask"),
    HandMutant("store-no-temp-chmod", STORE, "                os.fchmod(fd, 0o600)\n", ""),
    HandMutant("upload-reserve-65", UPLOAD, "UNKNOWN_RESERVE = 64 * 2**20", "UNKNOWN_RESERVE = 65 * 2**20"),
    HandMutant("upload-rename-998", UPLOAD, "MAX_RENAME = 999", "MAX_RENAME = 998"),
    HandMutant("upload-edquot-not-space", UPLOAD, "frozenset({errno.ENOSPC, errno.EDQUOT})",
               "frozenset({errno.ENOSPC})"),
    HandMutant("upload-link-follows", UPLOAD, "dst_dir_fd=dir_fd,\n                    follow_symlinks=False)",
               "dst_dir_fd=dir_fd,\n                    follow_symlinks=True)"),
    HandMutant("upload-no-identity-check", UPLOAD, "            self._check_identity(final)\n", ""),
    HandMutant("store-no-tmpfile", STORE, "_TMPFILE_FLAGS = getattr(os, \"O_TMPFILE\", 0) | os.O_RDWR",
               "_TMPFILE_FLAGS = os.O_DIRECTORY | os.O_RDWR"),
    HandMutant("upload-candidates-ignore-allow", UPLOAD,
               "check_name(candidate, self.store.allow_names, self.store.deny_names)",
               "check_name(candidate, (), self.store.deny_names)"),
    HandMutant("upload-no-fsync", UPLOAD, "                os.fsync(self._data_fd)\n", "                pass\n"),
    HandMutant("upload-no-fchmod", UPLOAD, "                os.fchmod(self._data_fd, store.file_mode)\n",
               "                pass\n"),
    HandMutant("upload-no-dir-fsync", UPLOAD, "            if sync_dir:\n                store.sync_dir()\n", ""),
    HandMutant("upload-temp-kept", UPLOAD, "                store._unlink_quietly(self.temp_name)\n", ""),
    HandMutant("upload-write-no-abort", UPLOAD,
               "                    self.store._check_limits(self.name, quota_add=0, free_need=0)\n"
               "        except BaseException:\n            self.abort()\n",
               "                    self.store._check_limits(self.name, quota_add=0, free_need=0)\n"
               "        except BaseException:\n            pass\n"),
]
