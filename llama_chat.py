#!/usr/bin/env python3
"""llama-chat: a private chat front end for llama.cpp's llama-server, in one file.

Run it with ``python3 llama_chat.py`` and open http://127.0.0.1:3000/. It keeps
every conversation in SQLite (searchable with FTS5), talks to llama-server over
its OpenAI-compatible API, and serves the page in ``index.html`` beside it.
It needs only the Python standard library (3.9+).

It listens on 127.0.0.1 unless told otherwise (``--host``); on any other
address it requires an API key, and makes one up if none is given.
``python3 llama_chat.py --help`` lists every setting.

The sections, in order; each uses only what stands above it:

  Speed-ups           what each saves, and how to undo it
  Errors              ApiError: the contract's error body, for every failure
  Validation          what clients send, checked field by field
  PDF text            a PDF's text, read with the standard library
  Configuration       flags > environment > config.json > defaults; the
                      command registry
  Storage             the database file (one connection a thread, locks,
                      backups), schema and migrations, the search index,
                      conversation trees, projects, Store (the one door to
                      the history), the ledger of every reply's speed,
                      export and import, datasets from the trees
  llama.cpp client    Upstream: connections, props, tokens, templates
  llama-server        found on its usual ports, or started and kept running
  Engine              the replies being made and their turns, titles, the
                      upkeep, start-up and shutdown: what every adapter shares
  Chat                a conversation's settings, its context by tokens,
                      recall and mentions (sources), the next prompt, the
                      reply asked of llama.cpp and relayed
  Generations         replies the server owns: made whoever follows them,
                      followed by any number of clients
  /v1                 the OpenAI-compatible relay, its chats recorded
  Export, import      every format in and out, backups while in use
  HTTP API            a function a route: /api/... over the Engine
  HTTP server         the request head, checks in the order a request meets
                      them, the answer, connection limits and deadlines
  Command line        each command with its arguments
  Main                serve: start-up, the managed llama-server, shutdown
"""

import os
import sys

###############################################################################
# Speed-ups: each says what it saves and how to undo it
###############################################################################

# 0. The way Python reads a script it is given to run leaves much of the memory
# that took with the process for its life; the same text compiled as a module
# (by the import system, or from its cached bytecode in __pycache__) does not.
# So `python3 llama_chat.py` first has Python start again on this file as a
# module (the same process, arguments, streams and environment), before it
# does anything else. Undo: delete this paragraph.
RUN_AS_MODULE = """import importlib.util, sys
path = sys.argv.pop(1)
spec = importlib.util.spec_from_file_location("llama_chat", path)
module = sys.modules["llama_chat"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.argv[0] = path
sys.exit(module.main())"""
if __name__ == "__main__" and __spec__ is None and os.name == "posix" and sys.executable:
    try:
        os.execv(sys.executable, [sys.executable, "-c", RUN_AS_MODULE,
                                  os.path.abspath(__file__), *sys.argv[1:]])
    except OSError:
        pass                         # then it runs as it was started

# 1. OpenSSL costs every process ~5 MB of memory: http.client imports ssl for its
# HTTPS class, and hashlib and hmac load _hashlib. Neither is needed here:
# llama-server is plain http nearly always (TLSConnection imports ssl when it
# is not), and the builtin sha256 and compare_digest serve the rest. So these
# modules load with OpenSSL hidden (a path each of them supports), and later
# imports get the real thing.
_HIDDEN = [name for name in ("ssl", "_ssl", "_hashlib") if name not in sys.modules]
sys.modules.update(dict.fromkeys(_HIDDEN))
import hashlib  # noqa: E402
import hmac  # noqa: E402
import http.client  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
for _name in _HIDDEN:
    del sys.modules[_name]

import argparse  # noqa: E402
import base64
import codecs
import contextlib
import glob
import heapq
import html
import io
import functools
import itertools
import ipaddress
import json
import logging
import math
import queue
import re
import secrets
import selectors
import signal
import socket
import sqlite3
import threading
import time
import traceback
import types
import unicodedata
import urllib.parse
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

__version__ = "1.14.0"
HERE = os.path.dirname(os.path.abspath(__file__))
log = logging.getLogger("llama_chat")


def quick_logging():
    """2. A log line a request: skip what logging gathers for each and this
    never prints (the logging HOWTO's "Optimization" list). Undo: don't call it."""
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


FIRST_READ, READ = 2048, 65536      # bytes a stream's first read takes at most; the others


def body_reader(resp):
    """3. A function that returns the next bytes of a response body, all that have
    arrived (b"" at its end). http.client's read1() stops at every chunk of a
    chunked body, and llama-server sends one token per chunk: decoding the
    chunks here lets one read take a whole burst of tokens. The first read
    takes at most FIRST_READ bytes, so that the first token is passed on
    before a burst behind it is decoded. Undo: use `resp.read1` for every
    body."""
    if not resp.chunked:
        return lambda: resp.read1(READ)
    state = {"buffer": b"", "left": 0, "ended": False,   # left: bytes of chunk, -1: CRLF
             "size": FIRST_READ}

    def read():
        out = []
        while not out and not state["ended"]:
            data = resp.fp.read1(state["size"])
            state["size"] = READ
            if not data:
                break
            buffer, left, at = state["buffer"] + data, state["left"], 0
            while at < len(buffer):            # an offset: reslicing would copy the rest
                if left > 0:                   # of the burst for every token
                    out.append(buffer[at:at + left])
                    at += len(out[-1])
                    left = (left - len(out[-1])) or -1
                elif left < 0:
                    if len(buffer) - at < 2:
                        break
                    left, at = 0, at + 2
                else:
                    line_end = buffer.find(b"\r\n", at)
                    if line_end < 0:
                        break
                    try:
                        left = int(buffer[at:line_end].split(b";")[0], 16)
                    except ValueError:
                        raise ValueError("its chunked stream is malformed") from None
                    at = line_end + 2
                    if left == 0:
                        state["ended"] = True
                        break
            state["buffer"], state["left"] = buffer[at:], left
        return b"".join(out)

    return read


# 4. The HTTP request head is read by RequestHead (section "HTTP server"), not by
# http.server's email parser.


def release_memory():
    """5. Give the C library's freed memory back to the system: after building
    an index, the page cache and token hash it used stay allocated otherwise.
    Linux (glibc) only; elsewhere nothing. Undo: don't call it."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError):
        pass


def steady_malloc():
    """5b. Keep large blocks out of the heap: glibc raises its threshold for
    mapping a block on its own each time such a block is freed, so after a
    migration's CREATE INDEX (its sort buffers) the index build's large
    buffers land in the heap, where what they leave behind cannot be trimmed
    (8 MB of RSS after a first start on 100,000 messages). A fixed threshold
    (128 KiB, glibc's starting one) stops that.
    5c. Two heaps for every thread: glibc gives threads that allocate at
    once heaps of their own (up to 8 a core), each keeping what its threads
    freed. A request a thread, with SQLite's page caches and FTS5's buffers,
    left 16 MB more RSS after 15 s of reads, searches and chats from 8
    clients (60.5 MB, against 44-45 with two heaps). One heap is as good
    there, but the index build's buffers, among everything else's, then stay:
    74.7 MB after a first start on a million messages, against 29.8 with two.
    Python holds its GIL around nearly every allocation anyway. Undo: leave
    out M_ARENA_MAX."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 128 * 1024)       # M_MMAP_THRESHOLD
        libc.mallopt(-8, 2)                # M_ARENA_MAX
    except (ImportError, OSError, AttributeError):
        pass


###############################################################################
# Errors
###############################################################################

class ApiError(Exception):
    """Every failure a client may see: renders the contract's error body."""

    def __init__(self, status, code, message, headers=None, **extra):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}
        self.extra = extra

    def body(self):
        return {"success": False, "error": self.message, "code": self.code, **self.extra}

    def openai_body(self):
        """The same error in OpenAI's shape, as /v1/ answers it."""
        kind = "server_error" if self.status >= 500 else OPENAI_ERROR_TYPES.get(
            self.status, "invalid_request_error")
        details = self.extra.get("details")
        return {"error": {"message": f"{self.message}: {details}" if details else self.message,
                          "type": kind, "code": self.code, "param": self.extra.get("field")}}

    def with_extra(self, **extra):
        self.extra.update(extra)
        return self


OPENAI_ERROR_TYPES = {401: "authentication_error", 403: "permission_error",
                      404: "not_found_error", 429: "rate_limit_error"}


def validation_error(field_name, message):
    return ApiError(400, "VALIDATION_ERROR", message, field=field_name)


def not_found_raised(resource, ident):
    raise not_found(resource, ident)


def not_found(resource, ident):
    return ApiError(404, "NOT_FOUND", f"{resource.capitalize()} not found",
                    resource=resource, id=ident)


def name_taken(name):
    return ApiError(409, "NAME_TAKEN", f"A project named {name!r} exists already", field="name")


BUSY_MS = 10000      # how long a write waits for another, by default (SQLite's busy timeout)


def database_error(e):
    """SQLite could not do it: the database stayed locked past the busy timeout
    (another process writing, a long purge), the disk is full or failing, or
    the file is damaged. Not a bug, so not INTERNAL_ERROR: 503, and what went
    wrong. (Other sqlite3 errors, constraint failures among them, are bugs.)"""
    if not isinstance(e, sqlite3.OperationalError) and type(e) is not sqlite3.DatabaseError:
        log.error("internal error in the database\n%s", traceback.format_exc())
        return ApiError(500, "INTERNAL_ERROR", "Internal server error")   # a bug
    log.warning("database: %s", e)
    if "malformed" in str(e) or "not a database" in str(e):
        return ApiError(503, "DATABASE_ERROR", f"The database file is damaged ({e}); restore "
                        "a backup, or try the sqlite3 shell's .recover")
    if "locked" in str(e) or "busy" in str(e):
        return ApiError(503, "DATABASE_BUSY", "The database stayed busy with another write; "
                        "try again", {"Retry-After": "5"})
    return ApiError(503, "DATABASE_ERROR", f"The database failed: {e}")


def starting(progress):
    return ApiError(503, "STARTING", f"llama-chat is starting: {progress['step']}",
                    {"Retry-After": "2"}, progress=progress)


def search_starting(progress):
    """Search asked for while its index is built (the rest answers meanwhile)."""
    share = progress["done"] * 100 // max(1, progress["total"])
    return ApiError(503, "STARTING", f"search is being prepared: {share}%",
                    {"Retry-After": "2"}, progress={"step": "building the search index",
                                                     **progress})


def shutting_down():
    return ApiError(503, "SHUTTING_DOWN", "llama-chat is shutting down")


def error_text(body):
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message") or err)
        if err:
            return str(err)
    return "no details"


def bad_upstream(what):
    return ApiError(502, "LLAMACPP_ERROR", "llama.cpp server sent an unexpected answer",
                    details=what)


def upstream_error(exc, url):
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, socket.timeout):
        return ApiError(504, "LLAMACPP_TIMEOUT", "llama.cpp server did not answer in time",
                        details=f"No answer from {url} within the configured timeout")
    if isinstance(exc, (OSError, http.client.HTTPException)):
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return ApiError(502, "LLAMACPP_ERROR", "llama.cpp server unavailable",
                        details=f"{url}: {reason}")
    if isinstance(exc, ValueError):
        return bad_upstream(str(exc))
    if isinstance(exc, Exception):
        return bad_upstream(f"reading its answer failed: {type(exc).__name__}")
    raise exc      # KeyboardInterrupt, SystemExit


def upstream_status_error(status, body):
    return ApiError(502, "LLAMACPP_ERROR", "llama.cpp server answered an error",
                    details=f"HTTP {status}: {error_text(body)}", upstream_status=status)


###############################################################################
# Validation of what clients send
###############################################################################


def ascii_number(text, most_digits=18):
    """The whole number `text` writes in ASCII digits, else None. Numbers in
    paths, queries and headers are read only this way: str.isdigit() and
    int() also take '²', '٣', ' 1' and '1_0'."""
    if not isinstance(text, str) or not text or len(text) > most_digits \
            or not text.isascii() or not text.isdigit():
        return None
    return int(text)

# Options llama.cpp may receive, from config.json or a chat request:
# name -> (type, minimum, maximum, name sent to llama.cpp).
MODEL_OPTIONS = {
    "temperature": (float, 0.0, 10.0, "temperature"),
    "top_p": (float, 0.0, 1.0, "top_p"),
    "top_k": (int, 0, 100000, "top_k"),
    "min_p": (float, 0.0, 1.0, "min_p"),
    "num_predict": (int, -1, 1000000, "max_tokens"),
    "max_tokens": (int, -1, 1000000, "max_tokens"),
    "repeat_penalty": (float, 0.0, 10.0, "repeat_penalty"),
    "presence_penalty": (float, -2.0, 2.0, "presence_penalty"),
    "frequency_penalty": (float, -2.0, 2.0, "frequency_penalty"),
    "seed": (int, -1, 2**63 - 1, "seed"),
    "stop": (list, 0, 16, "stop"),
    "thinking": (bool, 0, 1000000, "thinking"),     # on, off, or a budget of tokens
    "recall": ("switch", 0, 1, None),    # llama-chat's own: sources from the history
}


def thinking_fields(value):
    """A reasoning model's thinking as llama-server takes it: on or off (its
    template's enable_thinking), or on within a budget of tokens (its
    reasoning budget; 0: off)."""
    if value is False or value == 0:
        return {"chat_template_kwargs": {"enable_thinking": False}}
    if value is True:
        return {"chat_template_kwargs": {"enable_thinking": True}}
    return {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_budget_tokens": value}


def check_model_options(options, prefix):
    """Validate llama.cpp options by type and range; return them renamed for llama.cpp."""
    if not isinstance(options, dict):
        raise validation_error(prefix, f"{prefix} must be an object")
    out = {}
    for name, value in options.items():
        where = f"{prefix}.{name}"
        if name not in MODEL_OPTIONS:
            raise validation_error(where, f"Unknown option {where}; known: "
                                   + ", ".join(sorted(MODEL_OPTIONS)))
        kind, low, high, upstream = MODEL_OPTIONS[name]
        if value is None:
            continue
        if kind == "switch":                          # llama-chat's, not sent
            if not isinstance(value, bool):
                raise validation_error(where, f"{where} must be true or false")
            continue
        if kind is bool:                              # thinking: true, false or a budget
            if not isinstance(value, bool) and not (
                    isinstance(value, int) and low <= value <= high):
                raise validation_error(where, f"{where} must be true, false or a number of "
                                       f"tokens from {low} to {high}")
            out.update(thinking_fields(value))
            continue
        if kind is list:
            if isinstance(value, str):
                value = [value]
            if (not isinstance(value, list) or len(value) > high
                    or not all(isinstance(s, str) and 0 < len(s) <= 200 for s in value)):
                raise validation_error(where, f"{where} must be a list of at most {high} "
                                       "non-empty strings")
        else:
            ok_types = (int,) if kind is int else (int, float)
            if isinstance(value, bool) or not isinstance(value, ok_types):
                raise validation_error(where, f"{where} must be a {kind.__name__}")
            if not low <= value <= high:
                raise validation_error(where, f"{where} must be between {low} and {high}")
        out[upstream] = value
    return out


def known_fields(body, fields):
    """A field this route does not take is an error, not silently dropped: a
    typo (`temprature`) or a setting in the wrong place would look taken."""
    for name in body:
        if name not in fields:
            where = (f"; sampling settings go in options: {{\"options\": {{\"{name}\": ...}}}}"
                     if name in MODEL_OPTIONS else "")
            raise validation_error(name, f"Unknown field {name!r}; this route takes "
                                   + ", ".join(sorted(fields)) + where)


# The longest text the history keeps in each field, whoever writes it: the
# API refuses longer, an import cuts it (and counts it).
LIMITS = {"content": 200_000, "title": 500, "model": 500, "system_prompt": 100_000,
          "name": 500}


def require_str(body, name, allow_empty=False, max_len=10_000):
    if name not in body or body[name] is None:
        raise validation_error(name, f"Missing required field: {name}")
    value = body[name]
    if not isinstance(value, str):
        raise validation_error(name, f"Field {name} must be a string")
    if not allow_empty and not value.strip():
        raise validation_error(name, f"Field {name} must not be empty")
    if len(value) > max_len:
        raise validation_error(name, f"Field {name} is longer than {max_len} characters")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:            # a lone surrogate, such as "\ud800"
            raise validation_error(name, f"Field {name} is not valid Unicode text") from None
    return value


def require_int(body, name):
    if name not in body or body[name] is None:
        raise validation_error(name, f"Missing required field: {name}")
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise validation_error(name, f"Field {name} must be an integer")
    if not -2**63 <= value < 2**63:          # beyond what SQLite stores
        raise validation_error(name, f"Field {name} is out of range")
    return value


# What an attachment may be, told by its bytes (never by the client's type or
# name): (kind, type). SVG, HTML and anything else are refused: they can
# carry script.
IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
               (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"))
MARKUP = re.compile(rb"\s*(<\?xml|<!doctype|<svg|<html|<script|<!--)", re.I)


def attachment_kind(data, rest=()):
    """(kind, type) of an attachment's bytes, or VALIDATION_ERROR: told by
    its first bytes (data), and for text by every piece of it (rest: the
    pieces after the first, where it comes a piece at a time; left unread
    for the other kinds)."""
    for magic, kind in IMAGE_MAGIC:
        if data.startswith(magic):
            return "image", kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image", "image/webp"
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "audio", "audio/wav"
    if data[:3] == b"ID3" or data[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "audio", "audio/mpeg"
    text = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    if not MARKUP.match(text):
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            for piece in itertools.chain((text,), rest):
                if b"\x00" in piece:
                    break
                decoder.decode(piece)
            else:
                decoder.decode(b"", final=True)
                return "text", "text/plain; charset=utf-8"
        except UnicodeDecodeError:
            pass
    raise validation_error("file", "An attachment is an image (PNG, JPEG, WebP, GIF), audio "
                           "(WAV, MP3), UTF-8 text (code, Markdown, CSV, JSON...) or a PDF "
                           "(kept as its text); this file is none of these (SVG and HTML are "
                           "refused)")


def sound_text(text):
    """Text as SQLite can keep it: a lone surrogate (JSON allows "\\ud800") becomes U+FFFD."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


ATTACHMENT_NAME = re.compile(r"[\x00-\x1f\x7f/\\\\]")
DATA_URL = re.compile(r"data:[\w.+-]+/[\w.+-]+;base64,", re.A)


def attachment_name(raw, kind):
    """A file name as kept: no control characters or slashes, at most 255
    characters; none: named by its kind."""
    name = ATTACHMENT_NAME.sub("", sound_text(raw) if isinstance(raw, str) else "")
    return name.strip()[:255] or {"image": "image", "audio": "audio", "text": "file.txt"}[kind]


def medium(data, name=None):
    """Bytes another program sent or kept as a file: (bytes, kind, type,
    name) if they are of a kind an attachment may be (attachment_kind), else
    None. data may be base64 text, or a data: URL."""
    if not isinstance(data, (str, bytes)) or not data:
        return None
    try:
        if isinstance(data, str):
            head = DATA_URL.match(data)
            data = base64.b64decode(data[head.end():] if head else data, validate=True)
        kind, kind_type = attachment_kind(data)
    except (ValueError, ApiError):
        return None
    return data, kind, kind_type, attachment_name(name, kind) if name else None


ATTACHMENT_ID = re.compile(r"[0-9a-f]{64}\Z")
MAX_ATTACHMENTS = 20             # to one message


def check_attachments(body):
    """A chat's `attachments`: a list of ids (SHA-256 in hex), at most
    MAX_ATTACHMENTS, each once; [] when none."""
    ids = body.get("attachments", [])
    if ids is None:
        return []
    if not isinstance(ids, list) or len(ids) > MAX_ATTACHMENTS or not all(
            isinstance(i, str) and ATTACHMENT_ID.match(i) for i in ids) or len(set(ids)) < len(ids):
        raise validation_error("attachments", f"Field attachments must be a list of at most "
                               f"{MAX_ATTACHMENTS} attachment ids (each once)")
    return ids


def check_conversation_settings(body):
    """The settings of a conversation a body gives: system_prompt (a string;
    null: the config's), options (checked as a chat's are; null: the
    config's), pinned (true or false). Those left out are not there."""
    found = {}
    if "system_prompt" in body:
        found["system_prompt"] = None if body["system_prompt"] is None else require_str(
            body, "system_prompt", allow_empty=True, max_len=LIMITS["system_prompt"])
    if "options" in body:
        if body["options"] is not None:
            check_model_options(body["options"], "options")
            found["options"] = {k: v for k, v in body["options"].items() if v is not None} \
                or None
        else:
            found["options"] = None
    if "pinned" in body:
        if not isinstance(body["pinned"], bool):
            raise validation_error("pinned", "Field pinned must be true or false")
        found["pinned"] = body["pinned"]
    if "project_id" in body:
        found["project_id"] = None if body["project_id"] is None else \
            require_int(body, "project_id")
    return found


SETTINGS_FIELDS = {"system_prompt", "options", "pinned", "project_id"}
PROJECT_FIELDS = {"name", "system_prompt", "options"}


def check_project(body, creating):
    """A project's fields a body gives: name (required to create), and
    system_prompt and options as a conversation takes them."""
    known_fields(body, PROJECT_FIELDS)
    found = check_conversation_settings(body)
    if creating or "name" in body:
        found["name"] = require_str(body, "name", max_len=LIMITS["name"]).strip()
    return found


def query_bool(req, name):
    raw = req.arg(name)
    if raw is None or raw == "":
        return None
    if raw not in ("true", "false"):
        raise validation_error(name, f"Query parameter {name} must be true or false")
    return raw == "true"


def query_int(req, name, default, low, high=None):
    """A query parameter that is a whole number from low (>= 0) up: ASCII digits."""
    raw = req.arg(name)
    if raw is None or raw == "":
        return default
    value = ascii_number(raw, 19)
    negative = raw.startswith("-") and ascii_number(raw[1:], 19) is not None
    if value is None and not negative:
        raise validation_error(name, f"Query parameter {name} must be a whole number "
                               "(ASCII digits)")
    if negative or value < low:
        raise validation_error(name, f"Query parameter {name} must be at least {low}")
    if value >= 2**63:
        raise validation_error(name, f"Query parameter {name} is out of range")
    return min(value, high) if high is not None else value


ISO_DAY = re.compile(r"\d{4}-\d\d-\d\d\Z", re.ASCII)


def query_day(req, name):
    raw = req.arg(name)
    try:
        if raw and ISO_DAY.match(raw) and datetime.strptime(raw, "%Y-%m-%d"):
            return raw
    except ValueError:                    # 2026-02-30
        pass
    if raw:
        raise validation_error(name, f"Query parameter {name} must be an ISO date, as "
                               "2026-12-02 (days are UTC's)")
    return None


###############################################################################
# PDF text: what a PDF holds as text, read with the standard library
###############################################################################

# A PDF attached is kept as its text (an attachment is an image, a sound or
# text): its objects found by their "N G obj" marks (object streams opened),
# each page's content streams (Flate-compressed or plain, forms they draw
# included) read for their text operators, each string decoded by its font's
# ToUnicode map, else, for a simple font, as Windows' Latin-1. What cannot be
# read so (scanned pages, fonts without a map, encryption) is not guessed at.
PDF_TOKEN = re.compile(rb"""
    (?P<space>(?:\s|%[^\r\n]*)+) | (?P<dict><<|>>) | (?P<array>[\[\]]) | (?P<brace>[{}]) |
    (?P<name>/[^\s/<>\[\]()%{}]*) | (?P<hex><[0-9A-Fa-f\s]*>) | (?P<string>\() |
    (?P<number>[+-]?(?:\d+\.?\d*|\.\d+)) | (?P<word>[^\s/<>\[\]()%{}]+) | (?P<other>.)
    """, re.S | re.X)
PDF_OBJECT_MARK = re.compile(rb"(?<![\d.])(\d+)\s+(\d+)\s+obj\b")
PDF_STREAM = re.compile(rb"\s*stream\r?\n")
PDF_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b",
               ord("f"): b"\f"}
PDF_MOST_OBJECTS = 200_000     # a file that claims more is refused, not walked
PDF_MOST_DEPTH = 8             # forms drawn by forms, at most


class PdfName(str):
    """A PDF name (/Font), told apart from a string."""


@dataclass(frozen=True)
class PdfRef:
    number: int


class PdfError(ValueError):
    """A PDF whose text cannot be read; the message says why, to the user."""


def pdf_literal(data, at):
    """A literal string's bytes from just after its "(": (bytes, end)."""
    out, depth = bytearray(), 1
    while at < len(data):
        c = data[at]
        at += 1
        if c == 0x5C:                                   # backslash
            nxt = data[at:at + 1]
            at += 1
            if nxt and nxt[0] in PDF_ESCAPES:
                out += PDF_ESCAPES[nxt[0]]
            elif nxt and nxt in b"01234567":
                digits = re.match(rb"[0-7]{1,3}", data[at - 1:at + 2]).group()
                out.append(int(digits, 8) & 0xFF)
                at += len(digits) - 1
            elif nxt in (b"\r", b"\n"):
                at += nxt == b"\r" and data[at:at + 1] == b"\n"
            else:
                out += nxt
        elif c == 0x28:
            depth += 1
            out.append(c)
        elif c == 0x29:
            depth -= 1
            if depth == 0:
                return bytes(out), at
            out.append(c)
        else:
            out.append(c)
    return bytes(out), at


def pdf_tokens(data, at=0):
    """(kind, value, end) of each token of PDF syntax from `at`."""
    while at < len(data):
        m = PDF_TOKEN.match(data, at)
        kind, raw = m.lastgroup, m.group()
        if kind == "string":
            value, end = pdf_literal(data, m.end())
            yield "string", value, end
            at = end
            continue
        at = m.end()
        if kind == "space":
            continue
        if kind == "hex":
            digits = re.sub(rb"\s", b"", raw[1:-1])
            yield "string", bytes.fromhex((digits + b"0" * (len(digits) % 2)).decode()), at
        elif kind == "name":
            yield "name", PdfName(re.sub(rb"#([0-9A-Fa-f]{2})", lambda x: bytes([int(
                x.group(1), 16)]), raw[1:]).decode("latin-1")), at
        elif kind == "number":
            yield "number", float(raw) if b"." in raw else int(raw), at
        else:
            yield kind, raw, at


def pdf_value(tokens, first):
    """The PDF object that begins with token `first` (a dict, list, name,
    number, string, PdfRef; a word as bytes), reading the rest from tokens."""
    kind, raw, _ = first
    if (kind, raw) not in (("dict", b"<<"), ("array", b"[")):
        return raw
    closer = (kind, b">>" if kind == "dict" else b"]")
    items = []
    for token in tokens:
        if token[:2] == closer:
            break
        items.append(pdf_value(tokens, token))
    items = pdf_refs(items)
    if kind == "array":
        return items
    return {items[k]: items[k + 1] for k in range(0, len(items) - 1, 2)
            if isinstance(items[k], PdfName)}


def pdf_refs(items):
    """A list's "N G R" triples as PdfRefs."""
    out = []
    for item in items:
        if item == b"R" and len(out) >= 2 and all(
                isinstance(x, int) and not isinstance(x, bool) for x in out[-2:]):
            out[-2:] = [PdfRef(out[-2])]
        else:
            out.append(item)
    return out


class PdfDocument:
    """A PDF's objects by number: (dict or value, stream bytes or None)."""

    def __init__(self, data):
        if not data.startswith(b"%PDF-"):
            raise PdfError("this is not a PDF")
        self.objects = {}
        for mark in PDF_OBJECT_MARK.finditer(data):
            if len(self.objects) >= PDF_MOST_OBJECTS:
                raise PdfError("this PDF has too many objects to read")
            self.objects[int(mark.group(1))] = self.parse(data, mark.end())
        for number, (head, stream) in list(self.objects.items()):
            if isinstance(head, dict) and head.get("Type") == "ObjStm" and stream is not None:
                self.unpack(head, number)
        if any(isinstance(h, dict) and h.get("Encrypt") for h, _ in self.objects.values()) \
                or re.search(rb"trailer\s*<<[^>]*?/Encrypt", data):
            raise PdfError("this PDF is encrypted")

    def parse(self, data, at):
        """The object at `at` (after "N G obj"): (value, raw stream or None)."""
        tokens = pdf_tokens(data, at)
        try:
            value = pdf_value(tokens, next(tokens))
        except StopIteration:
            return None, None
        stream = None
        if isinstance(value, dict):
            after = PDF_STREAM.match(data, self.dict_end(data, at))
            if after:
                start = after.end()
                length = value.get("Length")
                if isinstance(length, int) and data[start + length:start + length + 32] \
                        .lstrip().startswith(b"endstream"):
                    stream = data[start:start + length]
                else:
                    end = data.find(b"endstream", start)
                    stream = data[start:end if end >= 0 else len(data)].rstrip(b"\r\n")
        return value, stream

    @staticmethod
    def dict_end(data, at):
        """Where a dict that begins after `at` ends (its closing >>)."""
        depth, i = 0, data.find(b"<<", at)
        while 0 <= i < len(data):
            if data.startswith(b"<<", i):
                depth, i = depth + 1, i + 2
            elif data.startswith(b">>", i):
                depth, i = depth - 1, i + 2
                if depth == 0:
                    return i
            elif data[i] == 0x28:                      # a string may hold << or >>
                i = pdf_literal(data, i + 1)[1]
            else:
                i += 1
        return len(data)

    def unpack(self, head, number):
        """An object stream's objects, each where no object of its number is."""
        data = self.decoded(head, self.objects[number][1])
        first, count = head.get("First"), head.get("N")
        if data is None or not isinstance(first, int) or not isinstance(count, int):
            return
        numbers = [int(n) for n in re.findall(rb"\d+", data[:first])]
        for k in range(0, min(len(numbers), 2 * count) - 1, 2):
            if numbers[k] not in self.objects:
                tokens = pdf_tokens(data, first + numbers[k + 1])
                try:
                    self.objects[numbers[k]] = (pdf_value(tokens, next(tokens)), None)
                except StopIteration:
                    pass

    def get(self, value):
        """A value with a reference followed (to its object's value)."""
        for _ in range(32):
            if not isinstance(value, PdfRef):
                return value
            value = (self.objects.get(value.number) or (None, None))[0]
        return None

    def stream(self, value):
        """The decoded bytes of the stream a reference names, or None."""
        if not isinstance(value, PdfRef) or value.number not in self.objects:
            return None
        head, raw = self.objects[value.number]
        return self.decoded(head, raw) if isinstance(head, dict) and raw is not None else None

    def decoded(self, head, raw):
        filters = self.get(head.get("Filter"))
        filters = filters if isinstance(filters, list) else [filters] if filters else []
        for name in filters:
            if name not in ("FlateDecode", "Fl"):
                return None                 # an image's (DCT...) or one not read here
            try:
                raw = zlib.decompressobj().decompress(raw, 64 << 20)
            except zlib.error:
                return None
        return raw

    def pages(self):
        """Each page's dict, in order (the page tree walked from its root)."""
        roots = [h for h, _ in self.objects.values()
                 if isinstance(h, dict) and h.get("Type") == "Pages" and "Parent" not in h]
        found, seen, stack = [], set(), list(reversed(roots))
        while stack and len(seen) < PDF_MOST_OBJECTS:
            node = self.get(stack.pop())
            if not isinstance(node, dict) or id(node) in seen:
                continue
            seen.add(id(node))
            if node.get("Type") == "Page" or "Kids" not in node:
                found.append(node)
            kids = self.get(node.get("Kids"))
            stack.extend(reversed(kids) if isinstance(kids, list) else ())
        return found or [h for n, (h, _) in sorted(self.objects.items())
                         if isinstance(h, dict) and h.get("Type") == "Page"]

    def inherited(self, page, name):
        for _ in range(64):
            if not isinstance(page, dict):
                return None
            if name in page:
                return self.get(page[name])
            page = self.get(page.get("Parent"))
        return None


def pdf_cmap(data):
    """A ToUnicode CMap: ({code bytes: text}, the code lengths it uses)."""
    found = {}
    tokens = [t for t in pdf_tokens(data)]
    i = 0
    while i < len(tokens):
        kind, raw, _ = tokens[i]
        if kind == "word" and raw == b"beginbfchar":
            i += 1
            while i + 1 < len(tokens) and tokens[i][1] != b"endbfchar":
                if tokens[i][0] == "string" and tokens[i + 1][0] == "string":
                    found[tokens[i][1]] = utf16(tokens[i + 1][1])
                i += 2
        elif kind == "word" and raw == b"beginbfrange":
            i += 1
            while i + 2 < len(tokens) and tokens[i][1] != b"endbfrange":
                low, high = tokens[i][1], tokens[i + 1][1]
                if tokens[i + 2][0] == "array":            # [<d1> <d2> ...]
                    targets, i = [], i + 3
                    while i < len(tokens) and tokens[i][1] != b"]":
                        targets.append(tokens[i][1])
                        i += 1
                    i += 1
                else:
                    targets, i = None, i + 3
                    start = tokens[i - 1][1]
                if not (isinstance(low, bytes) and isinstance(high, bytes)) or \
                        len(low) != len(high) or not low:
                    continue
                a, b = int.from_bytes(low, "big"), int.from_bytes(high, "big")
                for n, code in enumerate(range(a, min(b, a + 65535) + 1)):
                    key = code.to_bytes(len(low), "big")
                    if targets is not None:
                        if n < len(targets) and isinstance(targets[n], bytes):
                            found[key] = utf16(targets[n])
                    elif isinstance(start, bytes) and start:
                        last = int.from_bytes(start[-2:], "big") + n
                        found[key] = utf16(start[:-2] + (last & 0xFFFF).to_bytes(2, "big"))
        i += 1
    return found, sorted({len(k) for k in found}) or [1]


def utf16(data):
    return data.decode("utf-16-be", "replace") if len(data) % 2 == 0 else \
        data.decode("latin-1")


def pdf_number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


class PdfFont:
    """How a font's strings become text (its ToUnicode map, else Latin-1 for
    a simple font; nothing for a composite font without one), and how far
    they move the pen (its widths, in thousandths of its size)."""

    def __init__(self, doc, font):
        font = doc.get(font) if isinstance(doc.get(font), dict) else {}
        cmap = doc.stream(font.get("ToUnicode"))
        self.map, self.lengths = pdf_cmap(cmap) if cmap else ({}, [1])
        self.simple = font.get("Subtype") != "Type0"
        try:
            self.widths, self.default, self.code = pdf_widths(doc, font)
        except (TypeError, ValueError, AttributeError, IndexError):
            self.widths, self.default, self.code = {}, 500, 1 if self.simple else 2

    def text(self, data):
        if not self.map:
            return data.decode("cp1252", "replace") if self.simple else ""
        out, i = [], 0
        while i < len(data):
            for size in self.lengths:
                piece = self.map.get(data[i:i + size])
                if piece is not None:
                    out.append(piece)
                    i += size
                    break
            else:
                i += self.lengths[0]
        return "".join(out)

    def advance(self, data):
        """How far a string moves the pen, in thousandths of the font's size."""
        return sum(self.widths.get(int.from_bytes(data[i:i + self.code], "big"), self.default)
                   for i in range(0, len(data), self.code))


def pdf_widths(doc, font):
    """A font's glyph widths: ({code: width}, the width of others, bytes a code)."""
    if font.get("Subtype") == "Type0":
        kids = doc.get(font.get("DescendantFonts"))
        cid = doc.get(kids[0]) if isinstance(kids, list) and kids else {}
        cid = cid if isinstance(cid, dict) else {}
        found, spec, i = {}, doc.get(cid.get("W")) or [], 0
        while i + 1 < len(spec):
            first, then = spec[i], doc.get(spec[i + 1])
            if isinstance(then, list):            # c [w1 w2 ...]
                found.update((first + k, pdf_number(w)) for k, w in enumerate(then))
                i += 2
            elif i + 2 < len(spec):               # c1 c2 w
                found.update((c, pdf_number(spec[i + 2]))
                             for c in range(first, min(then, first + 65535) + 1))
                i += 3
            else:
                break
        return found, pdf_number(cid.get("DW", 1000)), 2
    first, widths = font.get("FirstChar", 0), doc.get(font.get("Widths")) or []
    described = doc.get(font.get("FontDescriptor"))
    missing = described.get("MissingWidth") if isinstance(described, dict) else None
    return ({first + k: pdf_number(w) for k, w in enumerate(widths)},
            pdf_number(missing) or 500, 1)


def pdf_text(data):
    """The text of a PDF's pages, a blank line between pages; PdfError if it
    holds none that can be read (scanned pages, unmapped fonts, encrypted)."""
    doc = PdfDocument(data)
    pages = [pdf_page_text(doc, page) for page in doc.pages()]
    text = "\n\n".join(p for p in pages if p.strip())
    if not any(c.isalnum() for c in text):
        raise PdfError("this PDF has no extractable text (scanned pages, or fonts it does "
                       "not map to letters): attach its pages as images instead")
    return text


def pdf_page_text(doc, page):
    lines = PdfLines()
    pdf_run(doc, doc.inherited(page, "Resources"), b"".join(
        doc.stream(r) or b"" for r in (lambda c: c if isinstance(c, list) else [c])(
            page.get("Contents"))), lines, 0)
    return lines.text()


class PdfLines:
    """A page's text as its operators place it: a new line where the pen
    moves down or up, a space where it moves right past what was shown
    (more than a quarter of the font's size)."""

    def __init__(self):
        self.lines, self.y, self.x, self.shown = [[]], None, 0.0, 0.0
        self.size, self.font, self.fonts = 12.0, None, {}
        self.quiet = []           # marked content whose ActualText stands for its glyphs

    def text(self):
        return "\n".join(re.sub(r"[ \t]+", " ", "".join(line)).strip()
                         for line in self.lines).strip()

    def show(self, data):
        if self.font is None:
            return
        said = [span for span in self.quiet if span[0] is not None]
        for span in said:
            if not span[1]:
                self.lines[-1].append(span[0])
                span[1] = True
        if not said:
            self.lines[-1].append(self.font.text(data))
        self.shown += self.font.advance(data) * self.size / 1000

    def marked(self, actual_text):
        """Marked content begins; its ActualText (None: none) stands for the
        glyphs it shows, said where the first of them is."""
        self.quiet.append([actual_text, False])

    def marked_end(self):
        if self.quiet:
            said, shown = self.quiet.pop()
            if said is not None and not shown:
                self.lines[-1].append(said)

    def move(self, x, y):
        """The pen to a line's start at (x, y) of text space."""
        if self.y is not None and abs(y - self.y) > 0.01:
            self.lines.append([])
        elif x - (self.x + self.shown) > self.size / 4 and self.lines[-1]:
            self.lines[-1].append(" ")
        self.x, self.y, self.shown = x, y, 0.0

    def next_line(self):
        self.lines.append([])
        self.shown = 0.0


def pdf_run(doc, resources, content, lines, depth):
    """Read a content stream's text operators into lines (PdfLines)."""
    resources = resources if isinstance(resources, dict) else {}
    fonts = doc.get(resources.get("Font"))
    fonts = fonts if isinstance(fonts, dict) else {}
    operands = []
    tokens = pdf_tokens(content)
    for token in tokens:
        kind, op, end = token
        if kind != "word":
            operands.append(pdf_value(tokens, token))
            continue
        last = operands[-1] if operands else None
        if op == b"BI":                                  # an inline image: its data skipped
            stop = re.compile(rb"\sEI(?=\s|$)").search(content, end)
            tokens = pdf_tokens(content, stop.end() if stop else len(content))
        elif op == b"Tf" and len(operands) >= 2 and isinstance(operands[-2], PdfName):
            key = (id(fonts), operands[-2])
            if key not in lines.fonts:
                lines.fonts[key] = PdfFont(doc, fonts.get(operands[-2]))
            lines.font, lines.size = lines.fonts[key], abs(pdf_number(last)) or 12.0
        elif op == b"BT":
            lines.move(0.0, lines.y if lines.y is not None else 0.0)
        elif op in (b"Td", b"TD") and len(operands) >= 2:
            lines.move(lines.x + pdf_number(operands[-2]),
                       (lines.y or 0.0) + pdf_number(operands[-1]))
        elif op == b"Tm" and len(operands) >= 6:
            lines.move(pdf_number(operands[-2]), pdf_number(operands[-1]))
        elif op == b"T*":
            lines.next_line()
        elif op in (b"Tj", b"'", b'"') and isinstance(last, bytes):
            if op != b"Tj":
                lines.next_line()
            lines.show(last)
        elif op == b"TJ" and isinstance(last, list):
            for item in last:
                if isinstance(item, bytes):
                    lines.show(item)
                elif pdf_number(item) < -200:          # a gap as wide as a space
                    lines.lines[-1].append(" ")
                lines.shown -= pdf_number(item) * lines.size / 1000
        elif op in (b"BDC", b"BMC"):
            said = doc.get(last.get("ActualText")) if isinstance(last, dict) else None
            lines.marked((utf16(said[2:]) if said.startswith(b"\xfe\xff") else
                          said.decode("latin-1")) if isinstance(said, bytes) else None)
        elif op == b"EMC":
            lines.marked_end()
        elif op == b"Do" and isinstance(last, PdfName) and depth < PDF_MOST_DEPTH:
            objects = doc.get(resources.get("XObject"))
            ref = objects.get(last) if isinstance(objects, dict) else None
            head = doc.get(ref)
            if isinstance(head, dict) and head.get("Subtype") == "Form":
                pdf_run(doc, doc.get(head.get("Resources")) or resources,
                        doc.stream(ref) or b"", lines, depth + 1)
        operands = []


###############################################################################
# Configuration
###############################################################################

DEFAULT_CONFIG = {
    "host": "127.0.0.1",
    "port": 3000,
    "llamacpp_url": "http://127.0.0.1:8080",
    "db": "llama_chat.db",
    "allowed_hosts": [],
    "max_body_bytes": 1048576,
    "max_import_bytes": 67108864,
    "max_generations": 0,
    "max_attachment_bytes": 20971520,
    "max_image_pixels": 2000000,
    "connections": [],
    "system_prompt": "You are a helpful, concise assistant.",
    "auto_title": "first-line",
    "openai_api": {"record": True},
    "timeouts": {
        "llamacpp_timeout": 600,
        "llamacpp_connect_timeout": 45,
        "first_token_timeout": 1800,
    },
    "model_options": {
        "temperature": 0.1,
        "top_p": 0.95,
        "top_k": 50,
        "min_p": 0.01,
        "num_predict": 4096,
        "repeat_penalty": 1.15,
        "stop": ["\n\nHuman:", "\n\nUser:"],
    },
    "performance": {
        "context_history_limit": 15,
        "num_thread": -1,
        "use_mlock": True,
        "use_mmap": True,
    },
    "response_optimization": {
        "stream": False,
        "keep_alive": "10m",
    },
}
CONFIG_SECTIONS = ("timeouts", "model_options", "performance", "response_optimization")
AUTO_TITLES = ("first-line", "model", "off")



class ConfigError(Exception):
    """A setting that cannot be used; start-up stops with this one line."""


@dataclass(frozen=True)
class Settings:
    host: str = DEFAULT_CONFIG["host"]
    port: int = DEFAULT_CONFIG["port"]
    llamacpp_url: str = DEFAULT_CONFIG["llamacpp_url"]
    db: str = DEFAULT_CONFIG["db"]
    api_key: str = ""
    llamacpp_api_key: str = ""
    system_prompt: str = DEFAULT_CONFIG["system_prompt"]
    auto_title: str = DEFAULT_CONFIG["auto_title"]     # first-line | model | off
    openai_record: bool = True      # openai_api.record: chats through /v1 kept in the history
    allow_remote_media: bool = False   # openai_api.allow_remote_media: llama.cpp may fetch URLs
    timeouts: dict = field(default_factory=lambda: dict(DEFAULT_CONFIG["timeouts"]))
    model_options: dict = field(default_factory=lambda: dict(DEFAULT_CONFIG["model_options"]))
    performance: dict = field(default_factory=lambda: dict(DEFAULT_CONFIG["performance"]))
    response_optimization: dict = field(
        default_factory=lambda: dict(DEFAULT_CONFIG["response_optimization"]))
    allowed_hosts: tuple = ()       # names besides this machine's that Host may carry
    max_body_bytes: int = DEFAULT_CONFIG["max_body_bytes"]
    max_import_bytes: int = DEFAULT_CONFIG["max_import_bytes"]
    max_generations: int = 0        # replies made at once; 0: llama-server's slots, else 4
    max_attachment_bytes: int = DEFAULT_CONFIG["max_attachment_bytes"]
    max_image_pixels: int = DEFAULT_CONFIG["max_image_pixels"]   # the page scales larger down
    connections: tuple = ()         # llama.cpp servers beside llamacpp_url: {name, url, api_key}
    tls_cert: str = ""              # HTTPS: its certificate and key (PEM files); "": HTTP
    tls_key: str = ""
    request_timeout: float = 10.0   # seconds to send a whole request
    header_timeout: float = 5.0     # seconds to idle, then send the request line and headers
    max_connections: int = 200      # served at once; beyond, 503
    connections_per_address: int = 50   # of those, from one client address
    check_up_to_bytes: int = 64 * 2**20   # quick_check a file this size at start (~2 s here)
    index_path: str = os.path.join(HERE, "index.html")
    key_generated: bool = False
    llama_server: str = ""          # a llama-server to start and stop (--llama-server)
    llama_model: str = ""
    llama_models_dir: str = ""
    llama_args: tuple = ()          # its own flags, after --

    def public_config(self):
        return {name: getattr(self, name) for name in CONFIG_SECTIONS}


def is_loopback(host):
    return host in ("localhost", "::1") or host.startswith("127.")


# The command line's commands, each registered with its arguments beside its
# code (section "Command line"): name -> (function, summary, description, arguments).
COMMANDS = {}


def command(name, summary, description, *arguments):
    """Register the function below as the command `name`; `arguments` are
    argument(...)s, as argparse's add_argument takes them."""
    def register(function):
        COMMANDS[name] = (function, summary, description, arguments)
        return function
    return register


def argument(*names, **options):
    return names, options


def build_arg_parser():
    p = argparse.ArgumentParser(
        prog="llama_chat.py",
        description="llama-chat: a private chat UI and API over llama.cpp's llama-server. "
        "Each setting is taken from its flag, else its environment variable, "
        "else config.json, else the default.")
    p.add_argument("--host", help="address to listen on (env LLAMA_CHAT_HOST; default 127.0.0.1)")
    p.add_argument("--port", help="port to listen on (env LLAMA_CHAT_PORT; default 3000)")
    p.add_argument("--llamacpp-url", help="llama-server's base URL (env LLAMACPP_URL or "
                   "LLAMACPP_API_URL; default http://127.0.0.1:8080)")
    p.add_argument("--db", help="SQLite database file (env LLAMA_CHAT_DB; default "
                   "llama_chat.db in the working directory)")
    p.add_argument("--config", help="config file (env LLAMA_CHAT_CONFIG; default config.json "
                   "beside llama_chat.py; optional)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /api/ "
                   "(env LLAMA_CHAT_API_KEY; made up at start when listening beyond loopback)")
    p.add_argument("--llamacpp-api-key", help="the key llama-server was started with "
                   "(env LLAMACPP_API_KEY); sent upstream only, never shown")
    p.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="a name this app is reached by, besides localhost and IP addresses, "
                   "when listening beyond loopback; repeat for more (env "
                   "LLAMA_CHAT_ALLOWED_HOSTS, comma-separated)")
    p.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate "
                   "(PEM; with --tls-key; env LLAMA_CHAT_TLS_CERT)")
    p.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM; env "
                   "LLAMA_CHAT_TLS_KEY)")
    p.add_argument("--max-body-bytes", type=int, metavar="N",
                   help="largest request body accepted (env LLAMA_CHAT_MAX_BODY_BYTES; "
                   "default 1048576)")
    p.add_argument("--llama-server", metavar="PATH", help="start this llama-server and stop "
                   "it with llama-chat (restarted if it exits; its output in DB.llama-server.log); "
                   "give --model or --models-dir, and its own flags after --")
    p.add_argument("--model", metavar="FILE", help="the model the started llama-server loads")
    p.add_argument("--models-dir", metavar="DIR", help="models for the started llama-server "
                   "in router mode")
    p.add_argument("--version", action="version", version="llama-chat " + __version__)
    commands = p.add_subparsers(dest="command", metavar="COMMAND", help="serve (the "
                                "default), " + ", ".join(COMMANDS) + "; each works on the "
                                "database whether a server runs on it or not")
    commands.add_parser("serve", help="serve the page and the API (what no command does)",
                        description="Serve the page and the API.")
    for name, (_, summary, description, arguments) in COMMANDS.items():
        c = commands.add_parser(name, help=summary, description=description)
        for names, options in arguments:
            c.add_argument(*names, **options)
    return p


def read_config_file(path, required):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist")
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}")
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    for name in CONFIG_SECTIONS:
        if not isinstance(data.get(name, {}), dict):
            raise ConfigError(f"config file {path}: '{name}' must be an object")
    return data


def whole_number(value, name, low, high):
    """A setting that is a whole number: an int from config.json, or digits from
    a flag or the environment (never true, 21003.7 or 1e3)."""
    if isinstance(value, str) and ascii_number(value.strip().lstrip("-"), 19) is not None:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be a whole number from {low} to {high}, not {value!r}")
    return value


def text_setting(value, name, allow_empty=False):
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise ConfigError(f"{name} must be a{'' if allow_empty else ' non-empty'} string, "
                          f"not {value!r}")
    return value


def url_setting(url, name="llamacpp_url"):
    """llama.cpp's base URL: http(s), a host, a port that is a number in range."""
    text_setting(url, name)
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
        raise ConfigError(f"{name} must be http:// or https://, a host and an optional "
                          f"port from 1 to 65535, not {url!r}")
    return url.rstrip("/")


def tls_settings(cert, key):
    """HTTPS: a certificate and its key (PEM files), both or neither, each a
    file that can be read."""
    cert, key = cert or "", key or ""
    if bool(cert) != bool(key):
        raise ConfigError("tls_cert and tls_key go together: give both (or neither, for HTTP)")
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        if path and not (isinstance(path, str) and os.path.isfile(path)
                         and os.access(path, os.R_OK)):
            raise ConfigError(f"{name} must be a file that can be read, not {path!r}")
    return {"tls_cert": cert, "tls_key": key}


CONNECTION_NAME = re.compile(r"[\w .:@-]{1,64}\Z")


def connections_setting(found):
    """config.json's `connections` beside llamacpp_url (which is "default"):
    a list of {"name", "url", "api_key"?}, names unique."""
    if not isinstance(found, list):
        raise ConfigError('connections must be a list of {"name", "url", "api_key"}')
    kept, names = [], {"default"}
    for n, c in enumerate(found):
        where = f"connections[{n}]"
        if not isinstance(c, dict) or set(c) - {"name", "url", "api_key"} or not isinstance(
                c.get("name"), str) or not CONNECTION_NAME.match(c["name"]):
            raise ConfigError(f'{where} must be {{"name", "url", "api_key"?}}, its name 1 to 64 '
                              f"letters, digits, spaces or . : @ - _, not {c!r}")
        if c["name"] in names:
            raise ConfigError(f"{where}: the name {c['name']!r} is taken (\"default\" is "
                              "llamacpp_url)")
        names.add(c["name"])
        key = c.get("api_key", "")
        if not isinstance(key, str):
            raise ConfigError(f"{where}.api_key must be text")
        kept.append({"name": c["name"], "url": url_setting(c.get("url"), f"{where}.url"),
                     "api_key": key})
    return tuple(kept)


def database_setting(db):
    text_setting(db, "db")
    if db == ":memory:" or db.startswith("file:"):
        raise ConfigError(f"db must be a file's path, not {db!r}: every connection would get "
                          "a private, empty database")
    return db


def split_extra(argv):
    """(llama-chat's arguments, the started llama-server's: those after --)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        return argv[:argv.index("--")], tuple(argv[argv.index("--") + 1:])
    return argv, ()


def load_settings(argv=None, environ=None):
    """Settings from flags > environment > config.json > defaults, each checked
    for type and range (a ConfigError names the one that is wrong)."""
    environ = os.environ if environ is None else environ
    argv, extra = split_extra(argv)
    args = build_arg_parser().parse_args(argv)
    explicit = args.config or environ.get("LLAMA_CHAT_CONFIG")
    path = explicit or os.path.join(HERE, "config.json")
    conf = read_config_file(path, required=bool(explicit))

    def pick(flag, env_names, key):
        if flag is not None:
            return flag
        for name in env_names:
            if environ.get(name):
                return environ[name]
        return conf.get(key, DEFAULT_CONFIG.get(key, ""))

    sections = {}
    for name in CONFIG_SECTIONS:
        sections[name] = {**DEFAULT_CONFIG[name], **conf.get(name, {})}
    try:
        check_model_options(sections["model_options"], "model_options")
        limit = sections["performance"].get("context_history_limit")
        whole_number(limit, "performance.context_history_limit", 0, 100000)
        whole_number(sections["performance"].get("num_thread"), "performance.num_thread",
                     -1, 4096)
        for section, name, kind, shown in (
                ("performance", "use_mlock", bool, "true or false"),
                ("performance", "use_mmap", bool, "true or false"),
                ("response_optimization", "stream", bool, "true or false"),
                ("response_optimization", "keep_alive", str, "a string, as \"10m\"")):
            if not isinstance(sections[section].get(name), kind):
                raise ConfigError(f"{section}.{name} must be {shown}, "
                                  f"not {sections[section].get(name)!r}")
        for name in ("llamacpp_timeout", "llamacpp_connect_timeout", "first_token_timeout"):
            value = sections["timeouts"].get(name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) \
                    or not 0 < value <= 86400:
                raise ConfigError(f"timeouts.{name} must be a number of seconds from 0 "
                                  f"to 86400, not {value!r}")
        allowed = pick(args.allowed_host, ["LLAMA_CHAT_ALLOWED_HOSTS"], "allowed_hosts")
        if isinstance(allowed, str):
            allowed = allowed.split(",")
        if not isinstance(allowed, list) or not all(isinstance(h, str) for h in allowed):
            raise ConfigError("allowed_hosts must be a list of names")
        system_prompt = text_setting(conf.get("system_prompt", DEFAULT_CONFIG["system_prompt"]),
                                     "system_prompt", allow_empty=True)
        openai_api = conf.get("openai_api", DEFAULT_CONFIG["openai_api"])
        if not isinstance(openai_api, dict) or set(openai_api) - {
                "record", "allow_remote_media"} or not all(
                isinstance(value, bool) for value in openai_api.values()):
            raise ConfigError('openai_api must be an object {"record": true or false, '
                              f'"allow_remote_media": true or false}}, not {openai_api!r}')
        auto_title = conf.get("auto_title", DEFAULT_CONFIG["auto_title"])
        if auto_title not in AUTO_TITLES:
            raise ConfigError(f"auto_title must be one of {', '.join(AUTO_TITLES)}, "
                              f"not {auto_title!r}")
        settings = Settings(
            auto_title=auto_title,
            openai_record=openai_api.get("record", True),
            allow_remote_media=openai_api.get("allow_remote_media", False),
            host=text_setting(pick(args.host, ["LLAMA_CHAT_HOST"], "host"), "host"),
            port=whole_number(pick(args.port, ["LLAMA_CHAT_PORT"], "port"), "port", 0, 65535),
            llamacpp_url=url_setting(pick(args.llamacpp_url, ["LLAMACPP_URL", "LLAMACPP_API_URL"],
                                          "llamacpp_url")),
            db=database_setting(pick(args.db, ["LLAMA_CHAT_DB"], "db")),
            api_key=text_setting(pick(args.api_key, ["LLAMA_CHAT_API_KEY"], "api_key") or "",
                                 "api_key", allow_empty=True),
            llamacpp_api_key=text_setting(pick(args.llamacpp_api_key, ["LLAMACPP_API_KEY"],
                                               "llamacpp_api_key") or "",
                                          "llamacpp_api_key", allow_empty=True),
            system_prompt=system_prompt,
            allowed_hosts=tuple(h.strip().lower() for h in allowed if h.strip()),
            max_body_bytes=whole_number(pick(args.max_body_bytes, ["LLAMA_CHAT_MAX_BODY_BYTES"],
                                             "max_body_bytes"), "max_body_bytes", 1024, 2**31),
            max_import_bytes=whole_number(pick(None, ["LLAMA_CHAT_MAX_IMPORT_BYTES"],
                                               "max_import_bytes"), "max_import_bytes",
                                          1024, 2**40),
            max_generations=whole_number(conf.get("max_generations", 0), "max_generations",
                                         0, 1024),
            max_attachment_bytes=whole_number(
                conf.get("max_attachment_bytes", DEFAULT_CONFIG["max_attachment_bytes"]),
                "max_attachment_bytes", 1024, 2**31),
            max_image_pixels=whole_number(
                conf.get("max_image_pixels", DEFAULT_CONFIG["max_image_pixels"]),
                "max_image_pixels", 0, 2**31),
            connections=connections_setting(conf.get("connections", [])),
            **tls_settings(pick(args.tls_cert, ["LLAMA_CHAT_TLS_CERT"], "tls_cert"),
                           pick(args.tls_key, ["LLAMA_CHAT_TLS_KEY"], "tls_key")),
            llama_server=args.llama_server or "", llama_model=args.model or "",
            llama_models_dir=args.models_dir or "", llama_args=extra,
            **sections,
        )
    except ApiError as e:
        raise ConfigError(f"config file {path}: {e.message}") from None
    except ConfigError as e:
        raise ConfigError(f"{e} (from a flag, the environment or {path})") from None
    return settings


###############################################################################
# Storage: the database file
###############################################################################

# Every connection: foreign keys on, a commit is on disk before it is
# acknowledged, and freed pages are zeroed (writes wait for each other up to
# the busy timeout).
CONNECTION_PRAGMAS = ("PRAGMA foreign_keys = ON", "PRAGMA synchronous = FULL",
                      "PRAGMA secure_delete = ON")


def private_file(path, create=True):
    """A file of llama-chat's (database, backup, log) readable by its owner
    only: created so (0600) if it is missing and `create`, made so if it is
    there. SQLite gives a database's WAL and SHM the database's mode. A file
    that cannot be changed (another owner's, a read-only mount) is left."""
    try:
        if create:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        if os.path.exists(path) and os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
    except OSError:
        pass


def file_uri(path, query=""):
    """File path as an SQLite URI, with `query` (mode=ro, say)."""
    return "file:" + urllib.parse.quote(os.path.abspath(path)) + (f"?{query}" if query else "")


def synced_folder(path):
    """The folder of file path synced, so that a file renamed into it stays
    renamed after a power cut (nothing to do where folders cannot be opened)."""
    try:
        fd = os.open(os.path.dirname(os.path.realpath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


SQLITE_HEADER = b"SQLite format 3\x00"


READ_ONLY_MOUNT = "it is on a read-only mount"


def read_only_reason(path):
    """Why database path cannot be written (None: it can): a read-only mount
    (READ_ONLY_MOUNT: no writer can exist, SQLite may read it as immutable),
    or a file or folder this user may not write."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return READ_ONLY_MOUNT
    except (AttributeError, OSError):        # no statvfs (Windows)
        pass
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return "the file is read-only"
    if not os.access(folder, os.W_OK):
        return "its folder is read-only"
    return None


def presence_lock(path, alone=False):
    """A lock on database file path (flock, apart from SQLite's own locks)
    that every llama-chat with the file open holds shared, so that one that
    needs it alone (restore) can tell: the open file that holds it, None where
    there are no such locks (Windows). alone: exclusive, at once or
    BlockingIOError."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        f = open(path, "r+b")         # writable: turn_lock's locks need that
    except OSError:                   # a file, or a mount, that cannot be written
        f = open(path, "rb")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB if alone else fcntl.LOCK_SH)
    except BaseException:
        f.close()
        raise
    return f


# The presence lock's open file of each database this process has a Store
# of, kept while any of them is open: closing any file of a database drops
# every POSIX lock this process holds on it, SQLite's own among them, so it is
# closed only once the last Store of it is (never by the garbage collector).
PRESENCE = {}                   # real path -> [open file, Stores holding it]
PRESENCE_LOCK = threading.Lock()


def hold_presence(path):
    """This process has database path open: its key for let_go_presence."""
    key = os.path.realpath(path)
    with PRESENCE_LOCK:
        held = PRESENCE.get(key)
        if held is None:
            held = PRESENCE[key] = [presence_lock(path), 0]
        held[1] += 1
    return key


def renew_presence(key, path):
    """The file at path was replaced (Database.replace_file): the presence
    lock taken on the new one, and let go of the old."""
    with PRESENCE_LOCK:
        held = PRESENCE[key]
        old, held[0] = held[0], presence_lock(path)
    if old is not None:
        old.close()


@contextmanager
def made_alone(path):
    """A new, empty file at path (the owner's only), that this process alone
    makes: a second process making it at once gets ConfigError. Removed on
    leaving unless it was renamed away meanwhile."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    f = open(path, "ab")
    try:
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"another llama-chat is making {path} at this moment (a "
                                  "migration): wait for it, then start again") from None
        os.truncate(path, 0)                  # what a start stopped by a power cut left
        private_file(path)
        yield path
    finally:
        with contextlib.suppress(OSError):
            if os.path.exists(path) and os.path.samestat(os.stat(path), os.fstat(f.fileno())):
                os.remove(path)
        f.close()


def let_go_presence(key):
    with PRESENCE_LOCK:
        held = PRESENCE[key]
        held[1] -= 1
        if held[1] == 0:
            del PRESENCE[key]
            if held[0] is not None:
                held[0].close()


# A chat that takes a conversation's turn (Turns) holds a POSIX lock on one
# byte of its database file, at TURN_LOCKS + the conversation's id, far past
# SQLite's own (at 1 GiB): so that chats of two processes on one file take
# turns too. POSIX locks are a process's: those of one process take turns by
# Turns alone.
TURN_LOCKS = 1 << 40


def turn_lock(key, conversation_id, take=True):
    """Take (or let go, take=False) this process's lock on a conversation's
    turns in database `key` (hold_presence's), at once: whether it has it.
    Where there are no such locks it always has."""
    with PRESENCE_LOCK:
        f = PRESENCE[key][0] if key in PRESENCE else None
    if f is None or "+" not in f.mode:
        return True
    import fcntl
    try:
        fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB if take else fcntl.LOCK_UN,
                    1, TURN_LOCKS + conversation_id)
    except (BlockingIOError, PermissionError):          # another process's chat has it
        return False
    except OSError:                                      # a file system without them
        pass
    return True


def used_by_others(path):
    """Whether another llama-chat (a server, a command) has database path
    open. Asked before this process opens it (its own lock would answer)."""
    try:
        lock = presence_lock(path, alone=True)
    except BlockingIOError:
        return True
    except OSError:
        return False
    if lock:
        lock.close()
    return False


def sqlite_runs(sql):
    """Whether this SQLite build runs sql: FTS5 and the JSON functions are
    options a build may leave out."""
    try:
        sqlite3.connect(":memory:").execute(sql)
        return True
    except sqlite3.OperationalError:
        return False


def split_sql(script):
    """Statements of a script, triggers kept whole (they hold semicolons)."""
    statements, current = [], ""
    for line in script.strip().splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return statements

@contextmanager
def added_later(c, trigger):
    """For many messages inserted in transaction `c`: the AFTER INSERT
    trigger `trigger` held off (by a row of writing_in_bulk, which its WHEN
    asks for) until the end of the block, so that the block's end can do its
    work for them all in one statement. Yields the last message id before the
    block (None: there is no such trigger). The row never leaves the
    transaction, which holds the write lock: no other message escapes."""
    if c.execute("SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = ?",
                 (trigger,)).fetchone() is None:
        yield None
        return
    last = c.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0]
    c.execute("INSERT INTO writing_in_bulk (name) VALUES (?)", (trigger,))
    yield last
    c.execute("DELETE FROM writing_in_bulk WHERE name = ?", (trigger,))


def dicts(cursor):
    """A cursor's rows as dicts (twice as fast as dict(sqlite3.Row))."""
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def one(cursor):
    found = dicts(cursor)
    return found[0] if found else None


def now_iso():
    t = datetime.now(timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


# \u-escaped output encodes a third faster than ensure_ascii=False, and the
# bodies are our own plain data (no cycles to check for).
JSON = json.JSONEncoder(check_circular=False)


class RawJSON(str):
    """JSON text made by SQLite, placed in an answer as it is."""


# Columns that hold JSON text (an array made by group_concat): values, not strings.
JSON_COLUMNS = {"sibling_ids", "options", "pinned", "tool_calls", "generating", "attachments",
                "attachments_left_out", "recall"}


@functools.lru_cache(maxsize=None)
def json_fields(columns):
    """ "id, title" -> "'id', id, 'title', title": json_object's arguments."""
    return ", ".join(f"'{name}', json({name})" if name in JSON_COLUMNS else f"'{name}', {name}"
                     for name in map(str.strip, columns.split(",")))


CHECKPOINT_WAIT_MS = 250
GIVE_WAY_STEPS = 1000      # SQLite steps between looks whether a write that gives way is asked to


class Database:
    """One SQLite file: a connection per working thread (from a small pool),
    write transactions, the schema version and backups. `functions` are SQL
    functions each connection gets: (name, argument count, deterministic
    Python function)."""

    def __init__(self, path, functions=(), busy_ms=BUSY_MS, read_only=None):
        self.path = path
        self.read_only = read_only   # why writes are off (None: they are not)
        self.immutable = read_only == READ_ONLY_MOUNT
        self.functions = tuple(functions)
        self.busy_ms = busy_ms
        self.failure = None          # why the last write failed, if it did
        self._working = None         # the connection of a long piece of work under way
        self._giving_way = None      # the connection of a write that gives way to others
        self._given_way = None       # it, once another write interrupted it
        self.last_write = 0.0        # time.monotonic() of the last write's end
        self._local = threading.local()
        self._idle = queue.Queue(maxsize=8)
        self._wal = None             # the journal is a WAL (known from the first write)
        self.replaced = 0            # times the file was replaced (replace_file): its connections
        self._wanting = set()        # threads waiting to begin a write
        self.committed = threading.Event()   # set at each commit of this process's
        self.sql_json = sqlite_runs("SELECT json_object('a', 1)")

    def connect(self, path=None):
        """A connection to the database, or to file `path` with the same
        settings and functions (named as a URI: ATTACH then takes one)."""
        target, uri = self.path, False
        if path:
            target, uri = file_uri(path), True
        elif self.read_only:
            target, uri = file_uri(self.path, "immutable=1" if self.immutable else "mode=ro"), True
        conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False,
                               timeout=self.busy_ms / 1000, uri=uri)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_ms)}")
        for pragma in CONNECTION_PRAGMAS:
            conn.execute(pragma)
        for name, count, function in self.functions:
            conn.create_function(name, count, function, deterministic=True)
        return conn

    # Opening a connection (and SQLite reading the schema) costs about a
    # millisecond, which every new HTTP connection would otherwise pay.
    def conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.replaced != self.replaced:
            conn.close()                  # of the file as it was before it was replaced
            conn = None
        if conn is None:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self.connect()
            self._local.conn, self._local.replaced = conn, self.replaced
        return conn

    def release(self, heavy=False):
        """The calling thread is done with the database: its connection goes
        back. `heavy`: the thread read much of the file (a migration, an index
        build, the ledger's ranking, a purge): its connection is closed
        instead, with the page cache and statements it filled (a few MB each,
        kept otherwise for the life of the process)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            try:
                if heavy or self._local.replaced != self.replaced:
                    raise queue.Full
                self._idle.put_nowait(conn)
            except queue.Full:
                conn.close()

    def close(self):
        """Close the calling thread's connection and the idle ones (the last to
        close checkpoints the WAL into the file)."""
        self.release()
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    @contextmanager
    def write(self, conn=None, gives_way=False, synced=True):
        """A write transaction, BEGIN IMMEDIATE so that the busy timeout applies.
        One that gives way (work that can be done later, as a purge) is
        interrupted by the next write that begins meanwhile: it rolls back
        and raises sqlite3.OperationalError("interrupted"). One not `synced`
        (in WAL mode) commits without waiting for the disk: sync_wal() makes
        it durable, while something else goes on meanwhile."""
        conn = conn or self.conn()
        me, unsynced = threading.get_ident(), False
        try:
            # Wanting first, then looking for a write that gives way: of this
            # and a giving-way write that begins meanwhile (which registers,
            # then looks for one wanting), one always sees the other.
            self._wanting.add(me)
            try:
                other = self._giving_way
                if other is not None and other is not conn:
                    self._given_way = other
                    other.interrupt()
                unsynced = not synced and self.in_wal(conn)
                if unsynced:
                    conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("BEGIN IMMEDIATE")
            finally:
                self._wanting.discard(me)
            if gives_way:
                self._giving_way = conn
                # An interrupt() between its statements is lost (SQLite clears
                # it when the next begins): this stops any of them once asked.
                conn.set_progress_handler(lambda: self._given_way is conn, GIVE_WAY_STEPS)
                if self._wanting:            # a write began to wait meanwhile: it goes first
                    self._given_way = conn
                    conn.set_progress_handler(None, 0)
                    conn.execute("ROLLBACK")
                    raise sqlite3.OperationalError("interrupted")
            try:
                yield conn
            except BaseException:
                conn.set_progress_handler(None, 0)
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.set_progress_handler(None, 0)
            conn.execute("COMMIT")
            self.committed.set()
        except sqlite3.DatabaseError as e:
            if gives_way and self._given_way is conn:
                # Interrupted by another write, whatever SQLite called it
                # (FTS5, interrupted in its table's constructor, says that failed).
                raise sqlite3.OperationalError("interrupted") from e
            if "locked" not in str(e) and "busy" not in str(e) and "interrupt" not in str(e):
                self.failure = str(e)        # disk full, read-only, damaged: for health
            raise
        finally:
            if gives_way:
                self._giving_way = self._given_way = None
            if unsynced:
                conn.execute("PRAGMA synchronous = FULL")
            self.last_write = time.monotonic()
        self.failure = None

    def in_wal(self, conn):
        if self._wal is None:
            self._wal = conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        return self._wal

    def sync_wal(self):
        """Make the commits of write(synced=False) durable: the WAL synced to
        the disk (an fsync of any descriptor of a file syncs what was written
        to it), as SQLite's synchronous = FULL syncs it at each commit."""
        if not self._wal:
            return
        fd = os.open(self.path + "-wal", os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def someone_waits(self):
        """Whether another thread waits to begin a write."""
        return bool(self._wanting)

    def give_way(self, longest=1.0):
        """Between the transactions of a long piece of work (an import): wait
        while another thread waits to write, up to `longest` seconds, so that
        it goes first."""
        ends = time.monotonic() + longest
        while self._wanting and time.monotonic() < ends:
            time.sleep(0.001)

    def write_if_unchanged(self, conn, statement, rows):
        """In conn's read transaction: write rows by statement and commit, if
        nothing was written since the transaction began and no write is under
        way (else nothing: for what is worth keeping but can be made again)."""
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            conn.executemany(statement, rows)
            conn.execute("COMMIT")
        except sqlite3.OperationalError:      # SQLITE_BUSY, or _BUSY_SNAPSHOT: written since
            pass
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_ms)}")

    @contextmanager
    def own_connection(self, path=None):
        """A connection for one long piece of work (a migration, an index build)
        that can be interrupted from another thread, and whose memory (a large
        page cache) goes back when it closes; to file `path`, if given."""
        conn = self.connect(path)
        self._working = conn
        try:
            yield conn
        finally:
            self._working = None
            conn.close()

    def replace_file(self, made):
        """File `made`, whole, takes the database's place, durably (a rename:
        at once, all or nothing); no connection to the file it replaces is
        used again (it may be kept under another name: a backup)."""
        with open(made, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(made, os.path.realpath(self.path))
        synced_folder(self.path)
        self.replaced += 1
        self._wal = None
        self.close()

    def interrupt(self):
        """Stop the long piece of work under way, if any: it rolls back."""
        conn = self._working
        if conn is not None:
            conn.interrupt()

    def checkpoint(self):
        """Write the WAL into the file and empty it: whether that completed (a
        reader's snapshot, or a writer, keeps it from completing; it waits for
        them CHECKPOINT_WAIT_MS at most, since writers wait while it does)."""
        conn = self.conn()
        conn.execute(f"PRAGMA busy_timeout = {CHECKPOINT_WAIT_MS}")   # a TRUNCATE that waits
        try:                                      # for a reader holds every writer back
            return conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_ms)}")

    def user_version(self):
        """The schema version and the names of the tables, read without
        changing the file."""
        conn = self.connect()
        try:
            return conn.execute("PRAGMA user_version").fetchone()[0], {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()

    def backup(self, target, durable=True):
        """A consistent copy of the database into file `target`, while writes
        go on: SQLite's online backup from a read transaction of its own (its
        snapshot: a step-by-step backup would otherwise start again at each
        write of another connection), a megabyte a step with a pause between
        steps so that chats are not held up by the copy."""
        private_file(target)
        source, dest = self.connect(), sqlite3.connect(target)
        try:
            # The copy is made in one go and synced once at its end: no journal,
            # no sync per step (the chats' own syncs would queue behind them).
            dest.execute("PRAGMA journal_mode = OFF")
            dest.execute("PRAGMA synchronous = OFF")
            source.execute("BEGIN")
            source.execute("SELECT count(*) FROM sqlite_master").fetchone()
            with dest:
                source.backup(dest, pages=256, progress=lambda *_: time.sleep(0.004))
            source.execute("COMMIT")
        finally:
            dest.close()
            source.close()
        if durable:                  # not for a copy that is sent and removed
            with open(target, "rb+") as f:
                os.fsync(f.fileno())

    def json_rows(self, columns, query, params, totals="", conn=None):
        """The rows of a query as a JSON array of objects with these columns, and
        the values of `totals`, aggregates over the same rows. SQLite builds the
        JSON in one step: a page of rows costs one call instead of a Python dict
        and an encoding per row (and, under load, a hand-off of the GIL per
        row). Order is the query's: SQLite does not flatten an ordered subquery
        into an aggregate."""
        extra = f", {totals}" if totals else ""
        conn = conn or self.conn()
        if self.sql_json:
            row = conn.execute(
                f"SELECT json_group_array(json_object({json_fields(columns)})){extra} "
                f"FROM ({query})", params).fetchone()
            return RawJSON(row[0]), row[1:]
        rows = dicts(conn.execute(f"SELECT {columns} FROM ({query})", params))
        for row in rows:
            for name in JSON_COLUMNS.intersection(row):
                row[name] = json.loads(row[name]) if row[name] is not None else None
        sums = conn.execute(f"SELECT {totals} FROM ({query})", params).fetchone() \
            if totals else ()
        return RawJSON(JSON.encode(rows)), sums




BACKUP_LOCK = threading.Lock()     # one backup copy at a time: each is the whole file


def backup_copies(db):
    """Where the backup route's temporary copies of db go (beside it: the same
    disk): (folder, name prefix). One left by a crash is removed at the next
    start (it holds text deleted since)."""
    folder, name = os.path.split(os.path.abspath(db.path))
    return folder, f".{name}.backup-"
###############################################################################
# Storage: schema and migrations
###############################################################################

# Version 0 -> 1. The base tables are the original Flask llama-chat's, so its
# database (llamacpp_chat.db) migrates in place by the same steps as a new one.
BASE_TABLES = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    model TEXT NOT NULL,
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    model TEXT,
    timestamp TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    response_time_ms INTEGER,
    estimated_tokens INTEGER,
    FOREIGN KEY (conversation_id) REFERENCES conversations (id) ON DELETE CASCADE
);
"""
NEW_MESSAGE_COLUMNS = {
    "reasoning": "TEXT",
    "prompt_tokens": "INTEGER",
    "tokens_per_second": "REAL",
    "finish_reason": "TEXT",
}
ISO_OF_LEGACY = """replace(substr({column}, 1, 19), ' ', 'T')
    || CASE WHEN length({column}) > 19 THEN substr({column}, 20, 4) ELSE '' END || 'Z'"""
IS_LEGACY_TIME = "{column} GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9] [0-9][0-9]:*'"
ISO_FROM_LEGACY = f"UPDATE {{table}} SET {{column}} = {ISO_OF_LEGACY} WHERE {IS_LEGACY_TIME}"
INDEXES = """
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, id);
CREATE INDEX IF NOT EXISTS conversations_by_activity ON conversations (updated_at DESC, id DESC);
"""
# A conversation's messages go before it does, while its title is still there
# for the search index's delete (a cascade would run after the row is gone).
DELETE_MESSAGES_FIRST = """
CREATE TRIGGER IF NOT EXISTS conversation_removed BEFORE DELETE ON conversations BEGIN
    DELETE FROM messages WHERE conversation_id = old.id;
END;
"""


def migrate_to_1(c):
    """The original app's tables (or none) -> llama-chat 1.0's."""
    for statement in split_sql(BASE_TABLES):
        c.execute(statement)
    have = {row[1] for row in c.execute("PRAGMA table_info(messages)")}
    for column, kind in NEW_MESSAGE_COLUMNS.items():
        if column not in have:
            c.execute(f"ALTER TABLE messages ADD COLUMN {column} {kind}")
    for table, column in (("conversations", "created_at"), ("conversations", "updated_at"),
                          ("messages", "timestamp")):
        c.execute(ISO_FROM_LEGACY.format(table=table, column=column))
    c.execute("UPDATE messages SET finish_reason = 'stop' "
              "WHERE role = 'assistant' AND finish_reason IS NULL")
    for statement in split_sql(INDEXES + DELETE_MESSAGES_FIRST):
        c.execute(statement)


def migrate_to_2(c):
    """Version 1.1's search state kept beside its index goes: the recent index's
    span, the word list and the forget list, and every search trigger. The
    index itself is made anew by SearchIndex.sync (dropping an FTS5 table
    needs FTS5, which this SQLite may lack)."""
    for (name,) in c.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' "
                             "AND name LIKE 'search%'").fetchall():
        c.execute(f"DROP TRIGGER {name}")
    for table in ("search_terms", "search_forget", "search_recent_span"):
        c.execute(f"DROP TABLE IF EXISTS {table}")
    c.execute("DROP VIEW IF EXISTS search_recent_source")


# Version 2 -> 3: conversations become trees. A message has the message it
# answers or follows as its parent (NULL: a first message), and a conversation
# the leaf of the branch it shows. The shape is kept by SQLite: a parent is a
# message of the same conversation made before its child (so the tree has no
# cycle), a message with children cannot be deleted alone (foreign key; the
# tree's delete removes a whole subtree in one statement, since a cascade
# would recurse once per level, and SQLite stops at 1,000 levels), and the
# current message is one of the conversation's own.
TREE_SCHEMA = """
CREATE INDEX IF NOT EXISTS messages_by_parent ON messages (parent_id, conversation_id);
CREATE TRIGGER IF NOT EXISTS message_parent_added AFTER INSERT ON messages
WHEN new.parent_id IS NOT NULL BEGIN
    SELECT RAISE(ABORT, 'a message''s parent must be an earlier message of its conversation')
    WHERE new.parent_id >= new.id OR (SELECT conversation_id FROM messages
                                      WHERE id = new.parent_id) IS NOT new.conversation_id;
END;
CREATE TRIGGER IF NOT EXISTS message_parent_changed AFTER UPDATE OF parent_id, conversation_id
ON messages WHEN new.parent_id IS NOT NULL BEGIN
    SELECT RAISE(ABORT, 'a message''s parent must be an earlier message of its conversation')
    WHERE new.parent_id >= new.id OR (SELECT conversation_id FROM messages
                                      WHERE id = new.parent_id) IS NOT new.conversation_id;
END;
CREATE TRIGGER IF NOT EXISTS conversation_current_changed AFTER UPDATE OF current_message_id
ON conversations WHEN new.current_message_id IS NOT NULL BEGIN
    SELECT RAISE(ABORT, 'a conversation''s current message must be one of its own')
    WHERE (SELECT conversation_id FROM messages WHERE id = new.current_message_id)
          IS NOT new.id;
END;
"""


def migrate_to_3(c):
    """Every conversation a chain: each message follows the one before it."""
    c.execute("ALTER TABLE messages ADD COLUMN parent_id INTEGER REFERENCES messages (id)")
    c.execute("ALTER TABLE messages ADD COLUMN edited_at TEXT")
    c.execute("ALTER TABLE conversations ADD COLUMN current_message_id INTEGER")
    c.execute("""UPDATE messages SET parent_id = (
                     SELECT max(p.id) FROM messages p
                     WHERE p.conversation_id = messages.conversation_id AND p.id < messages.id)""")
    c.execute("""UPDATE conversations SET current_message_id = (
                     SELECT max(id) FROM messages WHERE conversation_id = conversations.id)""")
    for statement in split_sql(TREE_SCHEMA):
        c.execute(statement)


def migrate_to_4(c):
    """Settings of a conversation: its own system prompt and options (NULL: the
    config's), a pin, and whether its title is still to be written after its
    first reply; and the options each reply was made with (JSON)."""
    c.execute("ALTER TABLE conversations ADD COLUMN system_prompt TEXT")
    c.execute("ALTER TABLE conversations ADD COLUMN options TEXT")
    c.execute("ALTER TABLE conversations ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0 "
              "CHECK (pinned IN (0, 1))")
    c.execute("ALTER TABLE conversations ADD COLUMN title_pending INTEGER NOT NULL DEFAULT 0 "
              "CHECK (title_pending IN (0, 1))")
    c.execute("ALTER TABLE messages ADD COLUMN options TEXT")


def message_digest(role, content, tool_calls, tool_call_id):
    """What identifies a message when a client sends it again (the /v1
    endpoint finds the branch a request continues by it): its role, its text
    without the whitespace around it, the calls it makes (id, name and
    arguments of each: clients re-send them with fields added or left out)
    and the call it answers. 63 bits, as an SQLite integer."""
    calls = ""
    if tool_calls:
        try:
            calls = json.dumps([[c.get("id"), (c.get("function") or {}).get("name"),
                                 (c.get("function") or {}).get("arguments")]
                                for c in json.loads(tool_calls) if isinstance(c, dict)])
        except (ValueError, TypeError, AttributeError):
            calls = tool_calls
    key = f"{role}\0{(content or '').strip()}\0{calls}\0{tool_call_id or ''}"
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "big", signed=True)


# Version 4 -> 5: messages of every role an OpenAI client sends (a system
# message inside a conversation, a tool's result), the tool calls a reply
# makes, and each message's digest, kept by SQLite; a conversation's origin
# ("api": made through /v1; an import's source and its id there) and the
# client that made it. The role's CHECK can only go with the table: it is
# made anew, ids kept (the search index refers to them).
MESSAGES_TABLE = """
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
    content TEXT NOT NULL,
    model TEXT,
    timestamp TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    response_time_ms INTEGER,
    estimated_tokens INTEGER,
    reasoning TEXT,
    prompt_tokens INTEGER,
    tokens_per_second REAL,
    finish_reason TEXT,
    parent_id INTEGER REFERENCES messages (id),
    edited_at TEXT,
    options TEXT,
    tool_calls TEXT,
    tool_call_id TEXT,
    digest INTEGER
)"""
DIGEST_SCHEMA = """
CREATE INDEX IF NOT EXISTS messages_first_by_digest ON messages (digest) WHERE parent_id IS NULL;
CREATE TRIGGER IF NOT EXISTS message_digest_added AFTER INSERT ON messages BEGIN
    UPDATE messages SET digest = message_digest(new.role, new.content, new.tool_calls,
                                                new.tool_call_id) WHERE id = new.id;
END;
CREATE TRIGGER IF NOT EXISTS message_digest_changed
AFTER UPDATE OF role, content, tool_calls, tool_call_id ON messages BEGIN
    UPDATE messages SET digest = message_digest(new.role, new.content, new.tool_calls,
                                                new.tool_call_id) WHERE id = new.id;
END;
CREATE UNIQUE INDEX IF NOT EXISTS conversations_by_source ON conversations (source, source_id)
    WHERE source_id IS NOT NULL;
"""


@contextmanager
def messages_bare(c):
    """Every trigger and view (they name the messages table) and the messages
    table's indexes dropped, to be made again on leaving: while the rows are
    poured from one table into another, by SQLite's own recipe for making a
    table anew."""
    saved = [sql for (sql,) in c.execute(
        "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND (type IN ('trigger', 'view') "
        "OR (type = 'index' AND tbl_name = 'messages')) ORDER BY type = 'view' DESC")]
    for kind, name in c.execute("SELECT type, name FROM sqlite_master WHERE type IN "
                                "('trigger', 'view') OR (type = 'index' AND tbl_name = "
                                "'messages' AND sql IS NOT NULL)").fetchall():
        c.execute(f"DROP {kind.upper()} {name}")
    yield
    for sql in saved:
        c.execute(sql)


def table_columns(c, schema, table):
    """The names of table's columns in `schema` ("main", an attached one), in order."""
    return [row[1] for row in c.execute(f"PRAGMA {schema}.table_info({table})")]


def id_sequence(c, table="messages"):
    """The table's row of the id sequence, or None (none yet, or a history
    whose ids were never AUTOINCREMENT's: the file has no sqlite_sequence)."""
    if not c.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").fetchone():
        return None
    return c.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()


def keep_sequence(c, sequence):
    """The messages' id sequence at least `sequence` (a row of it, or None):
    an id once given is not given again."""
    if sequence:
        c.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'messages'",
                  sequence)
        c.execute("INSERT INTO sqlite_sequence (name, seq) SELECT 'messages', ? WHERE NOT "
                  "EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'messages')", sequence)


# The original app never turned SQLite's foreign keys on: deleting a
# conversation left its messages behind. Those a history still holds are not
# carried into the table made anew (it refuses them): what the user deleted
# stays deleted (the backup made first keeps them). (Not `IN (SELECT id ...)`:
# with it SQLite reads the messages by conversation, then sorts them all.)
OF_A_CONVERSATION = "EXISTS (SELECT 1 FROM conversations c WHERE c.id = {m}.conversation_id)"


def left_behind(c, table):
    """Log how many messages of `table` belong to no conversation."""
    count = c.execute(f"SELECT count(*) FROM {table} WHERE NOT "
                      f"{OF_A_CONVERSATION.format(m=table)}").fetchone()[0]
    if count:
        log.warning("%d messages of conversations deleted before (left behind by the original "
                    "app) are not carried over; the backup keeps them", count)


def migrate_to_5(c):
    """The messages table made anew: the old table renamed, the new one
    filled in id order (a parent before its children), the old dropped, the
    id sequence kept."""
    with messages_bare(c):
        sequence = id_sequence(c)
        c.execute("ALTER TABLE messages RENAME TO messages_before_5")
        c.execute(MESSAGES_TABLE)
        new = {row[1] for row in c.execute("PRAGMA table_info(messages)")}
        old = c.execute("PRAGMA table_info(messages_before_5)").fetchall()
        for _, name, kind, *_ in old:
            if name not in new:         # a column of the original app's own: kept
                c.execute(f'ALTER TABLE messages ADD COLUMN "{name}" {kind}')
        names = ", ".join(f'"{row[1]}"' for row in old)
        left_behind(c, "messages_before_5")
        c.execute(f"INSERT INTO messages ({names}, digest) SELECT {names}, "
                  "message_digest(role, content, NULL, NULL) FROM messages_before_5 "
                  f"WHERE {OF_A_CONVERSATION.format(m='messages_before_5')} ORDER BY id")
        c.execute("DROP TABLE messages_before_5")
        keep_sequence(c, sequence)
    c.execute("ALTER TABLE conversations ADD COLUMN source TEXT")
    c.execute("ALTER TABLE conversations ADD COLUMN source_id TEXT")
    c.execute("ALTER TABLE conversations ADD COLUMN client TEXT")
    for statement in split_sql(DIGEST_SCHEMA):
        c.execute(statement)


# Version 5 -> 6: the ledger. Each reply keeps llama.cpp's timings (tokens of
# the prompt it read and of the reply, in how many ms; tokens it found in its
# cache) and the time to its first token, and an index holds what the ledger
# sums and ranks, so that it reads no message's text.
TIMING_COLUMNS = {"prompt_n": "INTEGER", "prompt_ms": "REAL", "cache_n": "INTEGER",
                  "predicted_n": "INTEGER", "predicted_ms": "REAL", "ttft_ms": "REAL"}
LEDGER_INDEX = """CREATE INDEX IF NOT EXISTS messages_ledger ON messages (model, timestamp,
    prompt_tokens, estimated_tokens, tokens_per_second, prompt_n, prompt_ms, predicted_n,
    predicted_ms, ttft_ms) WHERE role = 'assistant'"""


# And each message's tokens as llama.cpp counts them (NULL: not counted yet),
# forgotten by SQLite when its text changes.
TOKENS_FORGOTTEN = """CREATE TRIGGER IF NOT EXISTS message_tokens_changed
AFTER UPDATE OF content ON messages WHEN new.token_count IS NOT NULL BEGIN
    UPDATE messages SET token_count = NULL WHERE id = new.id;
END"""


def migrate_to_6(c):
    for column, kind in TIMING_COLUMNS.items():
        c.execute(f"ALTER TABLE messages ADD COLUMN {column} {kind}")
    c.execute("ALTER TABLE messages ADD COLUMN token_count INTEGER")
    c.execute(LEDGER_INDEX)
    c.execute(TOKENS_FORGOTTEN)


# Version 6 -> 7: the ledger kept as it goes. Ranking every reply at each
# read takes as long as the history is long. Instead SQLite keeps, per model
# and day, the sums (ledger_days), and forgets a day's percentiles
# (ledger_ranks, filled by the ledger as it reads) when one of its replies
# comes, changes (a continue, a moved time) or goes: a read ranks only the
# days changed since the last, from their replies (the replies' index leads
# with their time, so that a day is read alone). A model's percentiles over
# all its days, which every reply would make wrong, come from a histogram per
# metric (ledger_buckets): buckets 1/LEDGER_STEPS of e (3%) wide, each with
# its count and its values' sum; a percentile is the mean of the bucket it
# falls in, the exact value where the bucket holds one value, else within 3%.
LEDGER_STEPS = 32
LEDGER_TABLES = """
CREATE TABLE ledger_days (
    model TEXT NOT NULL, day TEXT NOT NULL, replies INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    tps_n INTEGER NOT NULL, tps_sum REAL NOT NULL, pps_n INTEGER NOT NULL, pps_sum REAL NOT NULL,
    PRIMARY KEY (model, day)) WITHOUT ROWID;
CREATE TABLE ledger_ranks (
    grouping TEXT NOT NULL, model TEXT NOT NULL, day TEXT NOT NULL,
    tps_p50 REAL, pps_p50 REAL, ttft_p50 REAL, ttft_p95 REAL,
    PRIMARY KEY (grouping, model, day)) WITHOUT ROWID;
CREATE TABLE ledger_buckets (
    model TEXT NOT NULL, metric TEXT NOT NULL, bucket INTEGER NOT NULL,
    n INTEGER NOT NULL, total REAL NOT NULL,
    PRIMARY KEY (model, metric, bucket)) WITHOUT ROWID;
CREATE INDEX messages_ledger_by_time ON messages (timestamp, model, prompt_tokens,
    estimated_tokens, tokens_per_second, prompt_n, prompt_ms, predicted_n, predicted_ms,
    ttft_ms) WHERE role = 'assistant';
"""
# A reply's figures as the ledger counts them, from row {r} (new, old, messages):
# generation speed from llama.cpp's timings, else the stored figure.
LEDGER_VALUES = """coalesce({r}.model, '') AS model, substr({r}.timestamp, 1, 10) AS day,
    coalesce({r}.prompt_tokens, 0) AS pt, coalesce({r}.estimated_tokens, 0) AS ct,
    CASE WHEN {r}.predicted_ms > 0 THEN {r}.predicted_n * 1000.0 / {r}.predicted_ms
         ELSE {r}.tokens_per_second END AS tps,
    CASE WHEN {r}.prompt_ms > 0 THEN {r}.prompt_n * 1000.0 / {r}.prompt_ms END AS pps,
    {r}.ttft_ms AS ttft"""
# A metric's bucket: all of 0 and below (and what is no number) in the lowest.
# SQLite's ln and floor (since 3.35; where a build leaves them out, Python's
# stand in), so that a program of another language may change a reply's figures.
LEDGER_BUCKET = f"""CASE WHEN typeof(v) IN ('integer', 'real') AND v > 0
    THEN CAST(floor(ln(v) * {LEDGER_STEPS}) AS INTEGER) ELSE -2147483648 END"""
MATH_FUNCTIONS = [] if sqlite_runs("SELECT ln(2), floor(2.5)") else [
    ("ln", 1, lambda v: math.log(v) if isinstance(v, (int, float)) and v > 0 else None),
    ("floor", 1, lambda v: math.floor(v) if isinstance(v, (int, float)) else None)]
# Rows {rows} (each a reply's LEDGER_VALUES) counted {sign} times (1: added,
# -1: taken away) into the day's sums and the model's histograms.
LEDGER_ADD = """
INSERT INTO ledger_days (model, day, replies, prompt_tokens, completion_tokens,
                         tps_n, tps_sum, pps_n, pps_sum)
    SELECT model, day, {sign} * count(*), {sign} * sum(pt), {sign} * sum(ct),
           {sign} * count(tps), {sign} * total(tps), {sign} * count(pps), {sign} * total(pps)
    FROM ({rows}) WHERE true GROUP BY model, day
    ON CONFLICT DO UPDATE SET replies = replies + excluded.replies,
        prompt_tokens = prompt_tokens + excluded.prompt_tokens,
        completion_tokens = completion_tokens + excluded.completion_tokens,
        tps_n = tps_n + excluded.tps_n, tps_sum = tps_sum + excluded.tps_sum,
        pps_n = pps_n + excluded.pps_n, pps_sum = pps_sum + excluded.pps_sum;
INSERT INTO ledger_buckets (model, metric, bucket, n, total)
    SELECT model, metric, {bucket}, {sign} * count(*), {sign} * total(v) FROM (
        SELECT model, m.column1 AS metric,
               CASE m.column1 WHEN 'tps' THEN tps WHEN 'pps' THEN pps ELSE ttft END AS v
        FROM ({rows}), (VALUES ('tps'), ('pps'), ('ttft')) AS m)
    WHERE v IS NOT NULL GROUP BY model, metric, {bucket}
    ON CONFLICT DO UPDATE SET n = n + excluded.n, total = total + excluded.total;
"""
# The percentiles a reply's change makes wrong: of its model and day, and of
# its day. A day or bucket left with no reply goes.
LEDGER_FORGET = """
DELETE FROM ledger_ranks WHERE (grouping, model, day) IN (
    SELECT 'model,day', model, day FROM ({rows}) UNION ALL SELECT 'day', '', day FROM ({rows}));
"""
LEDGER_EMPTIED = """
DELETE FROM ledger_days WHERE replies = 0 AND (model, day) IN (SELECT model, day FROM ({rows}));
DELETE FROM ledger_buckets WHERE n = 0 AND model IN (SELECT model FROM ({rows}));
"""


def ledger_change(row, sign):
    """The statements that count one reply's row (new or old) in or out."""
    rows = f"SELECT {LEDGER_VALUES.format(r=row)} WHERE {row}.role = 'assistant'"
    return (LEDGER_ADD.format(rows=rows, sign=sign, bucket=LEDGER_BUCKET)
            + LEDGER_FORGET.format(rows=rows)
            + (LEDGER_EMPTIED.format(rows=rows) if sign < 0 else ""))


LEDGER_TRIGGERS = f"""
CREATE TRIGGER ledger_reply_added AFTER INSERT ON messages
WHEN new.role = 'assistant' BEGIN {ledger_change("new", 1)} END;
CREATE TRIGGER ledger_reply_removed AFTER DELETE ON messages
WHEN old.role = 'assistant' BEGIN {ledger_change("old", -1)} END;
CREATE TRIGGER ledger_reply_changed AFTER UPDATE OF role, model, timestamp, prompt_tokens,
    estimated_tokens, tokens_per_second, prompt_n, prompt_ms, predicted_n, predicted_ms, ttft_ms
ON messages WHEN old.role = 'assistant' OR new.role = 'assistant' BEGIN
    {ledger_change("old", -1)} {ledger_change("new", 1)} END;
"""


def migrate_to_7(c):
    c.execute("DROP INDEX IF EXISTS messages_ledger")
    for statement in split_sql(LEDGER_TABLES):
        c.execute(statement)
    for statement in split_sql(LEDGER_ADD.format(sign=1, bucket=LEDGER_BUCKET, rows=(
            f"SELECT {LEDGER_VALUES.format(r='messages')} FROM messages "
            "WHERE role = 'assistant'"))):
        c.execute(statement)
    for statement in split_sql(LEDGER_TRIGGERS):
        c.execute(statement)


# Version 7 -> 8: a conversation's identity. Each has a random UUID, given
# by SQLite to every conversation made (whoever makes it) and carried by
# exports, so that importing a file twice, or into the database it came
# from, skips what is already there. And an import's conversations are
# marked until it ends: what an import that never ended (a kill, a crash)
# wrote is removed at the next start, so that a file is imported whole or
# not at all while chats go on between its transactions.
UUID_SQL = ("lower(hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' || "
            "substr(hex(randomblob(2)), 2) || '-' || substr('89AB', 1 + (random() & 3), 1) || "
            "substr(hex(randomblob(2)), 2) || '-' || hex(randomblob(6)))")
IDENTITY_SCHEMA = f"""
CREATE UNIQUE INDEX conversations_by_uuid ON conversations (uuid);
CREATE TRIGGER conversation_uuid_given AFTER INSERT ON conversations
WHEN new.uuid IS NULL BEGIN
    UPDATE conversations SET uuid = {UUID_SQL} WHERE id = new.id;
END;
CREATE TABLE import_pending (
    conversation_id INTEGER PRIMARY KEY REFERENCES conversations (id) ON DELETE CASCADE,
    run TEXT NOT NULL);
"""


def migrate_to_8(c):
    c.execute("ALTER TABLE conversations ADD COLUMN uuid TEXT")
    c.execute(f"UPDATE conversations SET uuid = {UUID_SQL}")
    for statement in split_sql(IDENTITY_SCHEMA):
        c.execute(statement)


# Version 8 -> 9: a reply is a row from the moment it is asked for, its text
# written as it comes; `generating` names the process making it ("pid:token",
# RUN) until it ends, so that a start can tell the replies a crash left.
# And an import that inserts many messages at once turns their one-by-one
# triggers off by a row of writing_in_bulk, inside its own transaction,
# never by dropping and making them again: a change of the schema under
# another connection's feet made its next write fail ("no such table") now
# and then, while chats went on beside an import.
GENERATING_INDEX = """CREATE INDEX messages_generating ON messages (generating)
    WHERE generating IS NOT NULL"""
IN_BULK = "NOT EXISTS (SELECT 1 FROM writing_in_bulk WHERE name = '{trigger}')"
BULK_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS writing_in_bulk (name TEXT PRIMARY KEY);
DROP TRIGGER ledger_reply_added;
CREATE TRIGGER ledger_reply_added AFTER INSERT ON messages
WHEN new.role = 'assistant' AND {IN_BULK.format(trigger="ledger_reply_added")}
BEGIN {ledger_change("new", 1)} END;
"""


# And what changed, for every page open on any device (/api/events): a row
# a change, written by SQLite in the transaction that makes it, whoever
# writes (the page's API, /v1, an import, the command line, another
# process). Ids only, never text; the oldest are trimmed as it grows.
CHANGES_SCHEMA = f"""
CREATE TABLE changes (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, action TEXT NOT NULL,
                      conversation_id INTEGER NOT NULL, id INTEGER NOT NULL);
CREATE TRIGGER change_conversation_created AFTER INSERT ON conversations BEGIN
    INSERT INTO changes (kind, action, conversation_id, id)
        VALUES ('conversation', 'created', new.id, new.id);
END;
CREATE TRIGGER change_conversation_updated AFTER UPDATE OF title, model, system_prompt, options,
    pinned, current_message_id ON conversations BEGIN
    INSERT INTO changes (kind, action, conversation_id, id)
        VALUES ('conversation', 'updated', new.id, new.id);
END;
CREATE TRIGGER change_conversation_deleted AFTER DELETE ON conversations BEGIN
    INSERT INTO changes (kind, action, conversation_id, id)
        VALUES ('conversation', 'deleted', old.id, old.id);
END;
CREATE TRIGGER change_message_created AFTER INSERT ON messages
WHEN NOT EXISTS (SELECT 1 FROM writing_in_bulk) BEGIN
    INSERT INTO changes (kind, action, conversation_id, id)
        VALUES ('message', 'created', new.conversation_id, new.id);
    INSERT INTO changes (kind, action, conversation_id, id)
        SELECT 'generation', 'started', new.conversation_id, new.id
        WHERE new.generating IS NOT NULL;
END;
CREATE TRIGGER change_message_updated AFTER UPDATE OF content, reasoning, generating,
    finish_reason ON messages
WHEN new.generating IS NULL OR old.generating IS NULL BEGIN
    INSERT INTO changes (kind, action, conversation_id, id)
        VALUES ('message', 'updated', new.conversation_id, new.id);
    INSERT INTO changes (kind, action, conversation_id, id)
        SELECT 'generation', CASE WHEN new.generating IS NULL THEN 'finished' ELSE 'started' END,
               new.conversation_id, new.id
        WHERE (old.generating IS NULL) IS NOT (new.generating IS NULL);
END;
CREATE TRIGGER change_message_deleted AFTER DELETE ON messages BEGIN
    INSERT INTO changes (kind, action, conversation_id, id)
        VALUES ('message', 'deleted', old.conversation_id, old.id);
    INSERT INTO changes (kind, action, conversation_id, id)
        SELECT 'generation', 'finished', old.conversation_id, old.id
        WHERE old.generating IS NOT NULL;
END;
"""


# And attachments: stored once each (their id is the SHA-256 of their bytes),
# in this file, so that a backup carries them; a message links to its own in
# order, each link with the attachment as the API shows it (its JSON, made
# once: attachments never change). One no message links to goes with the last
# link (secure_delete zeroes its pages).
ATTACHMENT_SCHEMA = """
CREATE TABLE attachments (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('image', 'audio', 'text')),
    type TEXT NOT NULL, name TEXT NOT NULL, bytes INTEGER NOT NULL, data BLOB NOT NULL,
    made_at TEXT NOT NULL);
CREATE TABLE message_attachments (
    message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    position INTEGER NOT NULL, attachment_id TEXT NOT NULL REFERENCES attachments (id),
    name TEXT NOT NULL, shown TEXT NOT NULL, PRIMARY KEY (message_id, position));
CREATE INDEX message_attachments_by_attachment ON message_attachments (attachment_id);
CREATE TRIGGER attachment_let_go AFTER DELETE ON message_attachments
WHEN NOT EXISTS (SELECT 1 FROM message_attachments WHERE attachment_id = old.attachment_id)
BEGIN
    DELETE FROM attachments WHERE id = old.attachment_id;
END;
"""


CHANGES_KEPT = 10000         # rows of the changes table kept; older ones are trimmed


def migrate_to_9(c):
    c.execute("ALTER TABLE messages ADD COLUMN generating TEXT")
    c.execute(GENERATING_INDEX)
    for statement in split_sql(BULK_SCHEMA + CHANGES_SCHEMA + ATTACHMENT_SCHEMA):
        c.execute(statement)


# Version 9 -> 10: a reply keeps which of its question's attachments its
# model could not take (a JSON array of their ids; NULL: none), so that the
# page says so whenever it shows the reply, not only as it comes. And the
# attachments are indexed by age: the start's sweep of unsent uploads reads
# that index, not every attachment's row (made_at comes after the bytes: a
# row read to it reads them all, 500 MB of photos into the page cache).
def migrate_to_10(c):
    c.execute("ALTER TABLE messages ADD COLUMN attachments_left_out TEXT")
    c.execute("CREATE INDEX attachments_by_age ON attachments (made_at)")


# Version 10 -> 11: the share of each model's prompts llama.cpp served from
# its cache, per day: of the replies whose timings say both (cache_n, the
# tokens it found cached; prompt_n, those it read), their sums, kept by
# SQLite beside the ledger's (a table of its own: the ledger's triggers stay
# as version 7 made them).
LEDGER_CACHE_VALUES = """coalesce({r}.model, '') AS model, substr({r}.timestamp, 1, 10) AS day,
    {r}.cache_n AS cached, {r}.prompt_n AS read"""
LEDGER_CACHE_ADD = """
INSERT INTO ledger_cache (model, day, replies, cached, read)
    SELECT model, day, {sign} * count(*), {sign} * sum(cached), {sign} * sum(read)
    FROM ({rows}) WHERE true GROUP BY model, day
    ON CONFLICT DO UPDATE SET replies = replies + excluded.replies,
        cached = cached + excluded.cached, read = read + excluded.read;
"""
LEDGER_CACHE_KNOWN = ("{r}.role = 'assistant' AND typeof({r}.cache_n) = 'integer' "
                      "AND typeof({r}.prompt_n) = 'integer'")


def ledger_cache_change(row, sign):
    """The statements that count one reply's row (new or old) in or out of
    the cache's sums."""
    rows = (f"SELECT {LEDGER_CACHE_VALUES.format(r=row)} "
            f"WHERE {LEDGER_CACHE_KNOWN.format(r=row)}")
    return LEDGER_CACHE_ADD.format(rows=rows, sign=sign) + (
        "" if sign > 0 else "DELETE FROM ledger_cache WHERE replies = 0;")


LEDGER_CACHE_SCHEMA = f"""
CREATE TABLE ledger_cache (
    model TEXT NOT NULL, day TEXT NOT NULL, replies INTEGER NOT NULL,
    cached INTEGER NOT NULL, read INTEGER NOT NULL,
    PRIMARY KEY (model, day)) WITHOUT ROWID;
CREATE TRIGGER ledger_cache_added AFTER INSERT ON messages
WHEN {LEDGER_CACHE_KNOWN.format(r="new")} BEGIN {ledger_cache_change("new", 1)} END;
CREATE TRIGGER ledger_cache_removed AFTER DELETE ON messages
WHEN {LEDGER_CACHE_KNOWN.format(r="old")} BEGIN {ledger_cache_change("old", -1)} END;
CREATE TRIGGER ledger_cache_changed AFTER UPDATE OF role, model, timestamp, prompt_n, cache_n
ON messages WHEN {LEDGER_CACHE_KNOWN.format(r="old")} OR {LEDGER_CACHE_KNOWN.format(r="new")}
BEGIN {ledger_cache_change("old", -1)} {ledger_cache_change("new", 1)} END;
"""


def migrate_to_11(c):
    for statement in split_sql(LEDGER_CACHE_SCHEMA):
        c.execute(statement)
    for statement in split_sql(LEDGER_CACHE_ADD.format(sign=1, rows=(
            f"SELECT {LEDGER_CACHE_VALUES.format(r='messages')} FROM messages "
            f"WHERE {LEDGER_CACHE_KNOWN.format(r='messages')}"))):
        c.execute(statement)


# Version 11 -> 12: a reply keeps the sources recalled for it from the rest
# of the history ([{n, message_id, conversation_id, title, snippet}], JSON;
# NULL: none), so that its [n] links open them whenever it is shown. Not
# exported: the ids are this database's.
def migrate_to_12(c):
    c.execute("ALTER TABLE messages ADD COLUMN recall TEXT")


# Version 12 -> 13: projects. A project has a name (one project a name), a
# system prompt and options, which its conversations' replies are made with
# where the conversation sets none; a conversation is in at most one. A
# project deleted leaves its conversations, in none. Its changes are told as
# a conversation's are (kind 'project'; conversation_id 0), and so is a
# conversation moved between projects.
PROJECT_SCHEMA = """
CREATE TABLE projects (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, system_prompt TEXT,
    options TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
ALTER TABLE conversations ADD COLUMN project_id INTEGER
    REFERENCES projects (id) ON DELETE SET NULL;
CREATE INDEX conversations_by_project ON conversations (project_id)
    WHERE project_id IS NOT NULL;
DROP TRIGGER change_conversation_updated;
CREATE TRIGGER change_conversation_updated AFTER UPDATE OF title, model, system_prompt, options,
    pinned, current_message_id, project_id ON conversations BEGIN
    INSERT INTO changes (kind, action, conversation_id, id)
        VALUES ('conversation', 'updated', new.id, new.id);
END;
CREATE TRIGGER change_project_created AFTER INSERT ON projects BEGIN
    INSERT INTO changes (kind, action, conversation_id, id)
        VALUES ('project', 'created', 0, new.id);
END;
CREATE TRIGGER change_project_updated AFTER UPDATE ON projects BEGIN
    INSERT INTO changes (kind, action, conversation_id, id)
        VALUES ('project', 'updated', 0, new.id);
END;
CREATE TRIGGER change_project_deleted AFTER DELETE ON projects BEGIN
    INSERT INTO changes (kind, action, conversation_id, id)
        VALUES ('project', 'deleted', 0, old.id);
END;
"""


def migrate_to_13(c):
    for statement in split_sql(PROJECT_SCHEMA):
        c.execute(statement)


# Each entry turns version N into N + 1, inside one transaction with the rest
# of the start-up work; a database is backed up before the first of them runs.
MIGRATIONS = [migrate_to_1, migrate_to_2, migrate_to_3, migrate_to_4, migrate_to_5,
              migrate_to_6, migrate_to_7, migrate_to_8, migrate_to_9, migrate_to_10,
              migrate_to_11, migrate_to_12, migrate_to_13]
SCHEMA_VERSION = len(MIGRATIONS)

# The history's two tables as SCHEMA_VERSION leaves them, every column once,
# with the lists it is in: "listed" (a conversation in GET /api/conversations),
# "shown" (a conversation or a message as the API answers it), "exported"
# (llama-chat's export, which import reads back). Every list of columns
# below is derived from these, and test_the_schema_is_as_declared holds them
# to the tables a new database and a migrated one have. A column in no list
# is kept by SQLite (triggers) for the server's own use.
CONVERSATION_TABLE = {
    "id": "listed shown exported",
    "uuid": "exported",
    "title": "listed shown exported",
    "model": "listed shown exported",
    "created_at": "listed shown exported",
    "updated_at": "listed shown exported",
    "system_prompt": "listed shown exported",
    "options": "listed shown exported",
    "pinned": "listed shown exported",
    "current_message_id": "shown exported",
    "source": "listed shown exported",
    "source_id": "shown exported",
    "client": "shown exported",
    "title_pending": "shown",
    "project_id": "listed shown",    # exported as its project: {"name", "system_prompt", "options"}
}
MESSAGE_TABLE = {
    "id": "shown exported",
    "conversation_id": "shown",
    "parent_id": "shown exported",
    **dict.fromkeys(("role", "content", "reasoning", "model", "timestamp", "edited_at",
                     "response_time_ms", "estimated_tokens", "prompt_tokens",
                     "tokens_per_second", "finish_reason", "options", "tool_calls",
                     "tool_call_id", *TIMING_COLUMNS), "shown exported"),
    "attachments_left_out": "shown exported",    # ids the reply's model did not take
    "recall": "shown",           # the sources recalled for the reply (ids of this database)
    "generating": "shown",       # shown as true or false; the process making it kept
    "digest": "",                # message_digest(), kept by DIGEST_SCHEMA's triggers
    "token_count": "",           # llama.cpp's count, forgotten when the text changes
}


def columns_in(table, where):
    """The columns of a table that are in one of its lists, in order."""
    return tuple(name for name, lists in table.items() if where in lists.split())


def selected(names, **read_as):
    """A SELECT's list of these columns, some read as an expression."""
    return ", ".join(f"{read_as[name]} AS {name}" if name in read_as else name
                     for name in names)


def put_conversation(c, **values):
    """Insert a conversation (in the caller's transaction): its id. The one
    INSERT of a conversation: the page's, /v1's, an import's, a fork's."""
    return c.execute(f"INSERT INTO conversations ({', '.join(values)}) VALUES "
                     f"({', '.join('?' * len(values))})", tuple(values.values())).lastrowid


PINNED_JSON = "CASE WHEN pinned THEN 'true' ELSE 'false' END"    # a JSON boolean
GENERATING_JSON = "CASE WHEN m.generating IS NULL THEN 'false' ELSE 'true' END"
# The leaf a conversation shows: its current message while that is one of its
# own, else its newest message (a leaf: a child is newer than its parent).
CURRENT_SQL = """coalesce(
    (SELECT m.id FROM messages m WHERE m.id = c.current_message_id
                                   AND m.conversation_id = c.id),
    (SELECT max(m.id) FROM messages m WHERE m.conversation_id = c.id))"""


###############################################################################
# Storage: the original app's history migrated in one pass
###############################################################################

# Migrations 1, 3 and 5 each rewrite every message of the original app's
# history (times made ISO, each message the child of the one before, the
# table made anew): 18 s of the 23 a million messages took, during which no
# chat could begin. So from schema 0 the chain runs on an empty table of the
# same shape in the history's place (it makes every table, column, index and
# trigger, and the conversations' changes), and the messages are then poured
# in once as the chain would have left them. A history with triggers or
# views of its own (not the original app's) takes the chain.
#
# The original app's history as it made it (its two tables, an index of
# messages by conversation, no journal left beside it) is migrated into a new
# file, then renamed over it: the original file itself, never written, is the
# backup (a hard link to it, made first), and the messages are written once,
# with no journal, instead of copied for the backup, written to the WAL with
# the old table's pages zeroed, and written from the WAL into the file. A
# stop half-way leaves the file as it was and the new one is removed.
# Elsewhere (no hard links on the disk, a table of its own, Windows) it is
# migrated in place.
ROWS_AS_MIGRATED = {
    "timestamp": f"CASE WHEN {IS_LEGACY_TIME.format(column='timestamp')} "
                 f"THEN {ISO_OF_LEGACY.format(column='timestamp')} ELSE timestamp END",
    "finish_reason": "CASE WHEN role = 'assistant' THEN coalesce({finish_reason}, 'stop') "
                     "ELSE {finish_reason} END",
    "parent_id": "(SELECT max(p.id) FROM {source} p "
                 "WHERE p.conversation_id = o.conversation_id AND p.id < o.id)",
    "digest": "message_digest(role, content, NULL, NULL)",
}
ORIGINAL_TABLES = {"conversations", "messages"}
MIGRATING_SUFFIX = ".migrating"      # the new file, beside the database, while it is made


def message_indexes(c, schema):
    """The SQL of the indexes made on table messages of `schema`."""
    return [sql for (sql,) in c.execute(f"SELECT sql FROM {schema}.sqlite_master WHERE type = "
                                        "'index' AND tbl_name = 'messages' AND sql IS NOT NULL")]


def takes_one_pass(c, schema="main"):
    """Is the history in `schema` of the original app's shape: a messages
    table and no triggers or views of its own?"""
    return c.execute(f"SELECT 1 FROM {schema}.sqlite_master WHERE type = 'table' "
                     "AND name = 'messages'").fetchone() is not None and not c.execute(
        f"SELECT 1 FROM {schema}.sqlite_master WHERE type IN ('trigger', 'view')").fetchone()


def original_poured(c, source, indexes, sequence, drop=False):
    """The messages of table `source` (the original app's, read only) into the
    empty messages table the chain made, each as migration 5 would have left
    it, but those of no conversation (`drop`: the table dropped then); then
    the original's `indexes` made, the id sequence kept at least `sequence`
    and each conversation's current message its newest."""
    schema, table = source.split(".")
    have = set(table_columns(c, schema, table))
    names = table_columns(c, "main", "messages")
    values = [ROWS_AS_MIGRATED.get(name, f'"{name}"' if name in have else "NULL").format(
        finish_reason="finish_reason" if "finish_reason" in have else "NULL", source=source)
        for name in names]
    left_behind(c, source)
    with messages_bare(c):
        c.execute(f"""INSERT INTO main.messages ({', '.join(f'"{n}"' for n in names)})
                      SELECT {', '.join(values)} FROM {source} o
                      WHERE {OF_A_CONVERSATION.format(m='o')} ORDER BY id""")
        if drop:
            c.execute(f"DROP TABLE {source}")
        keep_sequence(c, sequence)
    for sql in indexes:                                 # the original app's own, as 5 keeps them
        c.execute(sql)
    c.execute("UPDATE conversations SET current_message_id = "
              "(SELECT max(id) FROM messages WHERE conversation_id = conversations.id)")


def migrate_original_to_5(c):
    """Schema 0 -> 5, each message written once, in place."""
    if not takes_one_pass(c):
        for migrate in MIGRATIONS[:5]:
            migrate(c)
        return
    table = c.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
                      ).fetchone()[0]
    indexes = message_indexes(c, "main")
    sequence = id_sequence(c)
    c.execute("ALTER TABLE messages RENAME TO messages_original")     # its indexes with it
    c.execute("CREATE INDEX messages_original_parents ON messages_original (conversation_id, id)")
    c.execute(table)                                    # the same table, empty
    for migrate in MIGRATIONS[:5]:
        migrate(c)
    original_poured(c, "main.messages_original", indexes, sequence, drop=True)


def migrate_original_anew(c):
    """Schema 0 -> 5 into a new file (c's main database) from the original
    app's, attached as `original` (read only): its tables made as they are,
    the conversations copied, and the messages poured once."""
    tables = c.execute("SELECT name, sql FROM original.sqlite_master WHERE type = 'table' "
                       "AND name NOT LIKE 'sqlite_%' ORDER BY name").fetchall()
    for _, sql in tables:
        c.execute(sql)
    c.execute("INSERT INTO main.conversations SELECT * FROM original.conversations")
    c.execute("DELETE FROM sqlite_sequence")
    c.execute("INSERT INTO sqlite_sequence SELECT * FROM original.sqlite_sequence")
    for (sql,) in c.execute("SELECT sql FROM original.sqlite_master WHERE type = 'index' "
                            "AND tbl_name != 'messages' AND sql IS NOT NULL").fetchall():
        c.execute(sql)
    sequence = id_sequence(c)
    for migrate in MIGRATIONS[:5]:
        migrate(c)
    original_poured(c, "original.messages", message_indexes(c, "original"), sequence)


def anew_possible(db):
    """Can the history at db (of schema 0) be migrated into a new file: is it
    the original app's as it made it, with no journal beside it (whatever
    SQLite would still have to apply) and an index of messages by
    conversation (each message's parent is looked up by it, read only)? Not
    on Windows, where a file that is open cannot be renamed over."""
    if os.name == "nt":
        return False
    if any(os.path.exists(db.path + end) and os.path.getsize(db.path + end)
           for end in ("-wal", "-journal")):
        return False
    conn = db.connect()
    try:
        tables = {name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
        by_conversation = any(
            conn.execute(f"PRAGMA index_info({name})").fetchone()[2] == "conversation_id"
            for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' "
                                        "AND tbl_name = 'messages'"))
        sequenced = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'"
                                 ).fetchone() is not None
        return tables == ORIGINAL_TABLES and by_conversation and sequenced and \
            takes_one_pass(conn)
    finally:
        conn.close()


def linked_backup(db, version):
    """migration_backup's file made as a second name of the database's own
    (a hard link: nothing copied), for a migration into a new file that
    leaves this one as it is; None where the disk has no hard links."""
    path, partial = f"{db.path}.v{version}.bak", f"{db.path}.v{version}.bak.partial"
    with contextlib.suppress(OSError):
        os.remove(partial)
    try:
        os.link(os.path.realpath(db.path), partial)
    except (OSError, AttributeError):
        return None
    os.replace(partial, path)
    if os.path.exists(partial):     # the backup was this file already (a start stopped
        os.remove(partial)          # half-way): a rename onto the same file does nothing
    synced_folder(path)
    return path


def migration_steps(version, anew=False):
    """(the version it leaves, migration) from `version` to SCHEMA_VERSION;
    `anew`: from schema 0 into a new file (migrate_original_anew)."""
    if version == 0:
        yield 5, migrate_original_anew if anew else migrate_original_to_5
        version = 5
    for number, migrate in enumerate(MIGRATIONS[version:], version + 1):
        yield number, migrate


###############################################################################
# Storage: the search index
###############################################################################

# FTS5's unicode61 tokenizer finds words between separators and folds case
# and Latin accents. Three kinds of text need more, and get it from the form
# of the text that is indexed (and queried): search_form().
# - Chinese and Japanese have no spaces: a sentence would be one token, found
#   only by its start. Each Han, kana or CJK-symbol character is made a token
#   of its own, and a query's run of them is searched as a phrase, so any two
#   or more adjacent characters find the text. Its cost: a character is an
#   entry of the index as a word is, and a two-character query is a phrase
#   whose two entries are common (README has the figure). FTS5's trigram
#   tokenizer was the other way: substring rather than word matches for every
#   script, no accent folding in this SQLite, and LIKE for queries of one or
#   two characters.
# - Greek accents (tonos, dialytika) are kept by unicode61: they are taken off,
#   so that `κοσμ` finds `κόσμε` as `cafe` finds `café`.
# - Emoji and other symbols are separators to unicode61, so unsearchable: each
#   is indexed as a private-use character of its own (a token to FTS5).
# Text with none of these (all ASCII text) is indexed as it is. The form is
# computed by SQL function search_form() in the index's view and triggers,
# so it cannot fall out of step with the text: a connection without the
# function (the sqlite3 shell) can read everything, but writing messages
# fails there rather than corrupt the index.
CJK = ("\u2e80-\u2fdf\u3005\u3007\u3021-\u3029\u3038-\u303b\u3041-\u30ff\u31f0-\u31ff"
       "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f")
GREEK = "\u0370-\u03ff\u1f00-\u1fff"
NEEDS_FORM = re.compile(f"[{CJK}{GREEK}]|[^\\x00-\\x7f\\w\\s]")
IS_CJK = re.compile(f"[{CJK}]")
IS_GREEK = re.compile(f"[{GREEK}]")
# A token, as unicode61 sees one: letters, digits and private-use characters.
TOKEN = re.compile(r"(?:[^\W_]|[\ue000-\uf8ff\U000f0000-\U0010fffd])+")


def search_form(text, origins=None):
    """The text as the index holds it (see above). With `origins`, a list:
    filled with the index in `text` of each character of the form."""
    if text is None or text.isascii() or not NEEDS_FORM.search(text):
        if origins is not None:
            origins.extend(range(len(text or "")))
        return text
    out, greek = [], False
    for i, c in enumerate(text):
        if IS_CJK.match(c):
            piece = f" {c} "
        elif IS_GREEK.match(c):
            piece, greek = unicodedata.normalize("NFD", c)[0], True
        elif unicodedata.combining(c) and greek:     # an accent written apart
            piece = ""
        elif unicodedata.category(c) == "So":
            piece = f" {chr(0xF0000 + (ord(c) & 0xFFFF))} "
        else:
            piece = c
        greek = greek and (piece == "" or IS_GREEK.match(c) is not None)
        out.append(piece)
        if origins is not None:
            origins.extend([i] * len(piece))
    return "".join(out)


def fold(word):
    """A token as unicode61 with remove_diacritics 2 compares it: lower case,
    accents off Latin letters."""
    word = word.lower()
    if word.isascii():
        return word
    bases = (unicodedata.normalize("NFD", c)[0] for c in word)
    return "".join(base if base.isascii() else c for base, c in zip(bases, word))


@dataclass
class Query:
    """What a user's search text asks for: `match`, an FTS5 expression (None
    when nothing is left to search), and `phrases`, each a list of folded
    tokens, the last token of the last phrase a prefix if `prefix`."""
    match: object
    phrases: list
    prefix: bool
    words: list         # the text's runs of letters and digits, as typed (for LIKE)


def search_query(text):
    """User text -> quoted FTS5 phrases joined by AND.

    Nothing the user types is FTS5 syntax: tokens are pulled out of the text
    ("quoted phrases" kept together) and each phrase is double-quoted. The last
    token also matches as a prefix ("learn"* finds learning) unless it is one
    character (it would match most of the index; a CJK character is a whole
    token anyway)."""
    if text.count('"') % 2:
        text += '"'
    phrases = []
    for quoted, bare in re.findall(r'"([^"]*)"|([^\s"]+)', text):
        tokens = TOKEN.findall(search_form(quoted or bare))
        if tokens:
            phrases.append(tokens)
    if not phrases:
        return Query(None, [], False, [])
    prefix = len(phrases[-1][-1]) > 1
    match = " AND ".join('"' + " ".join(p) + '"' for p in phrases) + ("*" if prefix else "")
    return Query(match, [[fold(t) for t in p] for p in phrases], prefix, TOKEN.findall(text))


def highlight_spans(content, query):
    """[start, end] of each match of the query's phrases in content, as FTS5
    matches them (tokens of the search form, folded)."""
    origins = []
    form = search_form(content, origins)
    tokens = [(fold(m.group()), m.start(), m.end()) for m in TOKEN.finditer(form)]
    spans = []
    for n, phrase in enumerate(query.phrases):
        prefix = query.prefix and n == len(query.phrases) - 1
        size = len(phrase)
        for k in range(len(tokens) - size + 1):
            if all(tokens[k + j][0] == phrase[j] for j in range(size - 1)) and (
                    tokens[k + size - 1][0].startswith(phrase[-1]) if prefix
                    else tokens[k + size - 1][0] == phrase[-1]):
                spans.append((origins[tokens[k][1]], origins[tokens[k + size - 1][2] - 1] + 1))
    merged = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def ascii_pattern(query):
    """highlight_spans for ASCII text, as one regular expression. Each phrase
    begins with its first word, then looks behind it for a letter or digit:
    begun with the look-behind, it would be tried at every character (the
    literal first lets the search skip to where the word is)."""
    phrases = []
    for n, phrase in enumerate(query.phrases):
        first = re.escape(phrase[0])
        words = r"[\W_]+".join([first + rf"(?<![a-z0-9]{first})", *map(re.escape, phrase[1:])])
        phrases.append(words + (r"[a-z0-9]*" if query.prefix and n == len(query.phrases) - 1
                                else ""))
    return re.compile(r"(?:" + "|".join(phrases) + r")(?![a-z0-9])", re.IGNORECASE | re.ASCII)


def like_spans(content, terms):
    """The LIKE fallback's matches: the words holding a term (case-insensitive)."""
    lowered = [t.lower() for t in terms]
    return [list(m.span()) for m in TOKEN.finditer(content)
            if any(t in m.group().lower() for t in lowered)]


def snippet(content, spans, width=160):
    """Plain text around the first match, with [start, end] offsets (in code
    points) of the matches in it."""
    begin = max(0, spans[0][0] - width // 4) if spans else 0
    if begin:
        space = content.find(" ", begin, spans[0][0])
        begin = space + 1 if space >= 0 else begin
    end = min(len(content), begin + width)
    lead = "…" if begin else ""
    text = lead + content[begin:end] + ("…" if end < len(content) else "")
    shift = len(lead) - begin
    return text, [[a + shift, b + shift] for a, b in spans if a >= begin and b <= end]


# One row per message, holding its conversation's title too, so that every
# word of a query may match in either. External content (a view over the
# tables), kept in step by triggers inside the writing transaction. A prefix
# index of 2 to 8 characters: a prefix is then looked up like a word. Without
# one, FTS5 gathers every entry of every word that starts with it before it
# can rank any, and then once more for bm25's word statistics: the cost of a
# common prefix such as `pyth` grows with the whole history, and so does a
# whole word as the query's last (`python` is searched as `python*`). Longer
# prefixes, words mostly rarer, are still gathered that way.
#
# A history opened without its index (the original app's, or one used by a
# SQLite without FTS5) is indexed in the background while everything else
# answers (SearchIndex.build_some, Store.build_index): search_unbuilt holds
# the range of message ids not indexed yet, its progress beside, and the
# triggers leave those messages alone (the build reads each one's text as
# it is when it comes to it). A message added meanwhile is indexed by its
# trigger: ids are AUTOINCREMENT's, above every id there was.
BM25 = "bm25(2.0, 1.0)"     # title words weigh double
SEARCH_PREFIXES = "2 3 4 5 6 7 8"
UNBUILT = "EXISTS (SELECT 1 FROM search_unbuilt WHERE {id} BETWEEN first AND last)"
SEARCH_SCHEMA = f"""
CREATE TABLE search_unbuilt (first INTEGER NOT NULL, last INTEGER NOT NULL,
    done INTEGER NOT NULL, total INTEGER NOT NULL);
CREATE VIEW search_source AS
    SELECT m.id AS id, search_form(c.title) AS title, search_form(m.content) AS content
    FROM messages m JOIN conversations c ON c.id = m.conversation_id;
CREATE VIRTUAL TABLE search_fts USING fts5(
    title, content, content='search_source', content_rowid='id', prefix='{SEARCH_PREFIXES}',
    tokenize='unicode61 remove_diacritics 2');
CREATE TABLE search_purge (due INTEGER PRIMARY KEY);
CREATE TRIGGER search_message_added AFTER INSERT ON messages
WHEN NOT EXISTS (SELECT 1 FROM writing_in_bulk WHERE name = 'search_message_added') BEGIN
    INSERT INTO search_fts (rowid, title, content)
        SELECT new.id, search_form(c.title), search_form(new.content)
        FROM conversations c WHERE c.id = new.conversation_id;
END;
CREATE TRIGGER search_message_removed AFTER DELETE ON messages
WHEN NOT {UNBUILT.format(id="old.id")} BEGIN
    INSERT INTO search_fts (search_fts, rowid, title, content)
        SELECT 'delete', old.id, search_form(c.title), search_form(old.content)
        FROM conversations c WHERE c.id = old.conversation_id;
    INSERT OR IGNORE INTO search_purge (due) SELECT 1 WHERE old.content != '';
END;
CREATE TRIGGER search_message_changed AFTER UPDATE OF content ON messages
WHEN NOT {UNBUILT.format(id="old.id")} BEGIN
    INSERT INTO search_fts (search_fts, rowid, title, content)
        SELECT 'delete', old.id, search_form(c.title), search_form(old.content)
        FROM conversations c WHERE c.id = old.conversation_id;
    INSERT INTO search_fts (rowid, title, content)
        SELECT new.id, search_form(c.title), search_form(new.content)
        FROM conversations c WHERE c.id = new.conversation_id;
    INSERT OR IGNORE INTO search_purge (due)
        SELECT 1 WHERE substr(new.content, 1, length(old.content)) IS NOT old.content;
END;
CREATE TRIGGER search_title_changed AFTER UPDATE OF title ON conversations
WHEN old.title IS NOT new.title BEGIN
    INSERT INTO search_fts (search_fts, rowid, title, content)
        SELECT 'delete', m.id, search_form(old.title), search_form(m.content)
        FROM messages m WHERE m.conversation_id = old.id AND NOT {UNBUILT.format(id="m.id")};
    INSERT INTO search_fts (rowid, title, content)
        SELECT m.id, search_form(new.title), search_form(m.content)
        FROM messages m WHERE m.conversation_id = new.id AND NOT {UNBUILT.format(id="m.id")};
    INSERT OR IGNORE INTO search_purge (due) SELECT 1 WHERE NOT old.title_pending;
END;
"""
# Text attachments, indexed with their message: a row each link of a text
# attachment to a message (rowid: the message's id * ATTACHED_ROWS + its
# position), in an index of their own, so that a history older than them
# keeps its message index as it is. A link removed takes its row out before
# the attachment itself can go (attachment_let_go).
ATTACHED_ROWS = 1024       # more than the attachments a message may have (MAX_ATTACHMENTS)
ATTACHED_SEARCH_SCHEMA = f"""
CREATE VIEW attached_text AS
    SELECT l.message_id * {ATTACHED_ROWS} + l.position AS id,
           search_form(CAST(a.data AS TEXT)) AS content
    FROM message_attachments l JOIN attachments a ON a.id = l.attachment_id
    WHERE a.kind = 'text';
CREATE VIRTUAL TABLE attached_fts USING fts5(
    content, content='attached_text', content_rowid='id', prefix='{SEARCH_PREFIXES}',
    tokenize='unicode61 remove_diacritics 2');
CREATE TRIGGER attached_text_added AFTER INSERT ON message_attachments
WHEN (SELECT kind FROM attachments WHERE id = new.attachment_id) = 'text' BEGIN
    INSERT INTO attached_fts (rowid, content)
        SELECT new.message_id * {ATTACHED_ROWS} + new.position, search_form(CAST(data AS TEXT))
        FROM attachments WHERE id = new.attachment_id;
END;
CREATE TRIGGER attached_text_removed BEFORE DELETE ON message_attachments
WHEN (SELECT kind FROM attachments WHERE id = old.attachment_id) = 'text' BEGIN
    INSERT INTO attached_fts (attached_fts, rowid, content)
        SELECT 'delete', old.message_id * {ATTACHED_ROWS} + old.position,
               search_form(CAST(data AS TEXT))
        FROM attachments WHERE id = old.attachment_id;
    INSERT OR IGNORE INTO search_purge (due) VALUES (1);
END;
"""
SEARCH_LIMIT_DEFAULT, SEARCH_LIMIT_MAX = 50, 200
# How many messages a word is in, counted up to a number (?): a count that
# stops there costs no more at a million messages than at a thousand.
DOCUMENTS_UP_TO = "SELECT count(*) FROM (SELECT 1 FROM search_fts WHERE search_fts MATCH ? LIMIT ?)"
# A search narrowed to a project: its condition on a message's id (`{id}`).
IN_PROJECT = """AND {id} IN (SELECT m.id FROM conversations c JOIN messages m
                             ON m.conversation_id = c.id WHERE c.project_id = ?)"""
RANK_WINDOW = 300         # a query ranks this many of its newest matches (more for a long page)
BUILD_BATCH = 2000        # messages indexed in one transaction of the background build
CONVERSATION_COLUMNS = ", ".join(columns_in(CONVERSATION_TABLE, "listed"))
CONVERSATION_SELECT = selected(columns_in(CONVERSATION_TABLE, "listed"), pinned=PINNED_JSON)
CONVERSATION_SHOWN = selected(columns_in(CONVERSATION_TABLE, "shown"), pinned=PINNED_JSON,
                              current_message_id=CURRENT_SQL)
TITLE_ONLY_SPARE = 4       # results read for each shown, for the title-only ones left out
RESULT_COLUMNS = """m.conversation_id AS id, m.id AS message_id, m.conversation_id, m.role,
    m.content, m.timestamp,
    m.response_time_ms, m.estimated_tokens, c.title, c.model, c.updated_at"""


def like_containing(text):
    """A LIKE pattern (ESCAPE '\\') for text anywhere: its % and _ are text."""
    return "%" + re.sub(r"([\\%_])", r"\\\1", text) + "%"


def like_where(terms):
    """Without FTS5: every word a substring of the message m or its title
    (conversation c): the SQL condition and its parameters."""
    escaped = [like_containing(t) for t in terms]
    return (" AND ".join(["(m.content LIKE ? ESCAPE '\\' OR c.title LIKE ? ESCAPE '\\')"]
                         * len(terms)), [p for e in escaped for p in (e, e)])


def object_name(statement):
    return re.match(r"CREATE (?:VIEW|VIRTUAL TABLE|TABLE|TRIGGER) (\w+)", statement).group(1)


def same_sql(a, b):
    return " ".join(a.rstrip(";").split()) == " ".join((b or "").rstrip(";").split())


def search_result(row, text, highlights):
    """A row of RESULT_COLUMNS made a result (in place)."""
    row["snippet"], row["highlights"] = text, highlights
    return row


class Progress:
    """How far the start-up work is: read by /api/health and the terminal."""

    def __init__(self):
        self.step, self.done, self.total = "opening the database", 0, 0
        self.cancelled = False

    def set(self, step, done=0, total=0):
        """Report a step; raise if the work was asked to stop meanwhile."""
        if self.cancelled:
            raise sqlite3.OperationalError("interrupted")
        self.step, self.done, self.total = step, done, total

    def as_dict(self):
        return {"step": self.step, "done": self.done, "total": self.total}


class SearchIndex:
    """Full-text search over messages and titles: FTS5 where SQLite has it,
    else LIKE. The index is derived from the tables by SQLite itself."""

    def __init__(self, db, use_fts=None):
        self.db = db
        self.fts = sqlite_runs("CREATE VIRTUAL TABLE t USING fts5(x)") if use_fts is None \
            else use_fts

    def sync(self, c):
        """Make the search schema what SEARCH_SCHEMA says (a database of
        another version, or one used meanwhile by a SQLite without FTS5, has
        another, or none): drop what differs, create it, and mark every
        message to be indexed (build_some). Without FTS5, drop the triggers so
        that writes still work. True if the index is to be built."""
        self.sync_attached(c)
        have = dict(c.execute("SELECT name, sql FROM sqlite_master WHERE name LIKE 'search%' "
                              "AND type IN ('table', 'view', 'trigger')"))
        triggers = [n for n, sql in have.items() if sql.startswith("CREATE TRIGGER")]
        if not self.fts:
            for name in triggers:
                c.execute(f"DROP TRIGGER {name}")
            return False
        wanted = split_sql(SEARCH_SCHEMA)
        if self.in_step(have):
            return False
        if all(same_sql(s, have.get(object_name(s))) if not s.startswith("CREATE TRIGGER")
               else object_name(s) in have for s in wanted):
            # Only triggers' words differ (what marks text to purge, say): the
            # index itself is in step, so it is kept, not built again. Triggers
            # that are missing (a SQLite without FTS5 wrote meanwhile) mean
            # messages it never saw: it is built again.
            for statement in wanted:
                if not same_sql(statement, have.get(object_name(statement))):
                    c.execute(f"DROP TRIGGER IF EXISTS {object_name(statement)}")
                    c.execute(statement)
            return False
        for name in triggers:
            c.execute(f"DROP TRIGGER {name}")
        for kind in ("VIEW", "VIRTUAL TABLE", "TABLE"):
            for name, sql in c.execute("SELECT name, sql FROM sqlite_master "
                                       "WHERE name LIKE 'search%' AND sql LIKE ?",
                                       (f"CREATE {kind} %",)).fetchall():
                if kind != "TABLE" or not re.match(r"search_\w+_(data|idx|content|docsize|"
                                                   r"config)$", name):
                    c.execute(f"DROP {'TABLE' if kind != 'VIEW' else 'VIEW'} {name}")
        for statement in wanted:
            c.execute(statement)
        c.execute("INSERT INTO search_fts (search_fts, rank) VALUES ('rank', ?)", (BM25,))
        c.execute("INSERT INTO search_unbuilt (first, last, done, total) "
                  "SELECT min(id), max(id), 0, count(*) FROM messages HAVING count(*)")
        return True

    def sync_attached(self, c):
        """The same for text attachments' index (ATTACHED_SEARCH_SCHEMA): made
        again, and every link of a text attachment indexed, unless it is as
        declared (without FTS5: its triggers dropped, so that writes work)."""
        if not c.execute("SELECT 1 FROM sqlite_master WHERE name = 'message_attachments'"
                         ).fetchone():
            return                          # a schema before attachments (a test makes one)
        have = dict(c.execute("SELECT name, sql FROM sqlite_master WHERE name LIKE 'attached%' "
                              "AND type IN ('table', 'view', 'trigger')"))
        wanted = split_sql(ATTACHED_SEARCH_SCHEMA)
        if self.fts and all(same_sql(s, have.get(object_name(s))) for s in wanted):
            return
        for name, sql in have.items():
            if sql.startswith("CREATE TRIGGER"):
                c.execute(f"DROP TRIGGER {name}")
        if not self.fts:
            return
        c.execute("DROP TABLE IF EXISTS attached_fts")
        c.execute("DROP VIEW IF EXISTS attached_text")
        for statement in wanted:
            c.execute(statement)
        c.execute("INSERT INTO attached_fts (attached_fts) VALUES ('rebuild')")

    def in_step(self, have=None):
        """Is the search schema the one SEARCH_SCHEMA says (or no FTS5 here)?"""
        if have is None:
            have = dict(self.db.conn().execute(
                "SELECT name, sql FROM sqlite_master WHERE name LIKE 'search%'"))
        return not self.fts or all(same_sql(s, have.get(object_name(s)))
                                   for s in split_sql(SEARCH_SCHEMA))

    def unbuilt(self):
        """How far the index's build is ({"done", "total"} messages), or None
        when every message is indexed."""
        if not self.fts:
            return None
        found = self.db.conn().execute("SELECT done, total FROM search_unbuilt").fetchone()
        return {"done": found[0], "total": found[1]} if found else None

    def build_some(self, c):
        """Index the next BUILD_BATCH messages not indexed yet, in transaction
        `c` (the others' writes go on between two): True while some are left."""
        found = c.execute("SELECT first, last FROM search_unbuilt").fetchone()
        if found is None:
            return False
        first, last = found
        upto, count = c.execute("SELECT max(id), count(*) FROM (SELECT id FROM messages WHERE "
                                "id BETWEEN ? AND ? ORDER BY id LIMIT ?)",
                                (first, last, BUILD_BATCH)).fetchone()
        if count:
            c.execute("INSERT INTO search_fts (rowid, title, content) SELECT id, title, content "
                      "FROM search_source WHERE id BETWEEN ? AND ?", (first, upto))
        if not count or upto >= last:
            c.execute("DELETE FROM search_unbuilt")
            return False
        c.execute("UPDATE search_unbuilt SET first = ?, done = done + ?", (upto + 1, count))
        return True

    @contextmanager
    def bulk(self, c):
        """Many messages inserted in transaction `c` (an import): indexed
        together at its end, by one statement, instead of one by one by
        their trigger, each a statement of its own."""
        with added_later(c, "search_message_added") as last:
            yield
            if last is not None:
                c.execute("INSERT INTO search_fts (search_fts, rank) VALUES ('hashsize', 33554432)")
                c.execute("INSERT INTO search_fts (rowid, title, content) SELECT id, title, "
                          "content FROM search_source WHERE id > ?", (last,))
                c.execute("INSERT INTO search_fts (search_fts, rank) VALUES ('hashsize', 1048576)")

    def search(self, text, limit, project=None):
        """The best `limit` results for `text`; of project `project`'s
        conversations only, if given."""
        query = search_query(text)
        if query.match is None:
            return []
        within = ("", ()) if project is None else (IN_PROJECT, (project,))
        if not self.fts:
            return self._search_like(query, limit, within)
        # bm25 costs microseconds a row: a word found in most of a million
        # messages would take seconds to rank in full. So rank the newest
        # RANK_WINDOW matches (FTS5 walks them newest first, cheaply), or as
        # many as the page may need, keep the best ids, and read and snip
        # only the page of results: their rows are read a page at a time, as
        # they are needed (a page needs more than `limit` only where
        # title-only matches are left out).
        wanted = limit * TITLE_ONLY_SPARE
        hits = self.db.conn().execute(
            f"""SELECT id, score FROM
                   (SELECT rowid AS id, rank AS score FROM search_fts
                    WHERE search_fts MATCH ? {within[0].format(id="rowid")}
                    ORDER BY rowid DESC LIMIT ?)
                ORDER BY score, id DESC LIMIT ?""",
            (query.match, *within[1], max(RANK_WINDOW, wanted), wanted)).fetchall()
        attached = sorted(self._attached_hits(query, limit, within), key=lambda r: r["score"])
        return self._page(query, limit, heapq.merge(
            self._rows_of(hits, limit), attached, key=lambda r: r["score"]))

    def _rows_of(self, hits, step):
        """The result rows of `hits` ([id, score], best first), in that
        order, read `step` at a time (one whose message is gone meanwhile
        left out)."""
        for at in range(0, len(hits), step):
            page = hits[at:at + step]
            rows = dicts(self.db.conn().execute(
                f"""SELECT {RESULT_COLUMNS} FROM messages m
                    JOIN conversations c ON c.id = m.conversation_id
                    WHERE m.id IN ({", ".join("?" * len(page))})""", [id for id, _ in page]))
            by_id = {r["message_id"]: r for r in rows}
            for id, score in page:
                row = by_id.get(id)
                if row is not None:
                    row["score"] = score
                    yield row

    @staticmethod
    def _page(query, limit, rows):
        """The first `limit` results of rows (best first), snipped. A match
        in a conversation's title only (each message row holds the title) is
        the conversation's: shown once, by its best-ranked message."""
        pattern = ascii_pattern(query)
        found, titled = [], set()
        for r in rows:
            text = r.pop("text", None) or r["content"]
            spans = [list(m.span()) for m in pattern.finditer(text)] \
                if text.isascii() else highlight_spans(text, query)
            if not spans:
                if r["conversation_id"] in titled:
                    continue
                titled.add(r["conversation_id"])
            del r["score"]
            found.append(search_result(r, *snippet(text, spans)))
            if len(found) == limit:
                break
        return found

    def _attached_hits(self, query, limit, within):
        """Matches in text attachments, as results of the message they are
        attached to (`attachment`: {id, name}; `text`: the attachment's, to
        snip), each with its score."""
        rows = dicts(self.db.conn().execute(
            f"""SELECT {RESULT_COLUMNS}, hits.score, l.attachment_id, l.name AS attachment_name,
                       CAST(a.data AS TEXT) AS text
               FROM (SELECT rowid AS id, rank AS score FROM attached_fts
                     WHERE attached_fts MATCH ? {within[0].format(id=f"rowid / {ATTACHED_ROWS}")}
                     ORDER BY rank LIMIT ?) AS hits
               JOIN message_attachments l ON l.message_id = hits.id / {ATTACHED_ROWS}
                                         AND l.position = hits.id % {ATTACHED_ROWS}
               JOIN attachments a ON a.id = l.attachment_id
               JOIN messages m ON m.id = l.message_id
               JOIN conversations c ON c.id = m.conversation_id""",
            (query.match, *within[1], limit)))
        for r in rows:
            r["attachment"] = {"id": r.pop("attachment_id"), "name": r.pop("attachment_name")}
        return rows

    def _search_like(self, query, limit, within):
        """Without FTS5: every word as a substring of the message or its title
        (SQLite's LIKE ignores the case of ASCII letters only)."""
        terms = query.words
        if not terms:
            return []
        where, params = like_where(terms)
        rows = dicts(self.db.conn().execute(
            f"""SELECT {RESULT_COLUMNS}
                FROM messages m JOIN conversations c ON c.id = m.conversation_id
                WHERE {where} {within[0].format(id="m.id")} ORDER BY m.id DESC LIMIT ?""",
            (*params, *within[1], limit)))
        return [search_result(r, *snippet(r["content"], like_spans(r["content"], terms)))
                for r in rows]

    def conversations_matching(self, text, conn):
        """The ids of the conversations a message (or title) of which matches
        `text`, read through `conn`."""
        query = search_query(text)
        if query.match is None or not (self.fts or query.words):
            return set()
        if self.fts:
            return {r[0] for r in conn.execute(
                "SELECT DISTINCT m.conversation_id FROM search_fts JOIN messages m "
                "ON m.id = search_fts.rowid WHERE search_fts MATCH ?", (query.match,))}
        where, params = like_where(query.words)
        return {r[0] for r in conn.execute(
            f"SELECT DISTINCT m.conversation_id FROM messages m JOIN conversations c "
            f"ON c.id = m.conversation_id WHERE {where}", params)}

    def best_matches(self, words, leave_out, limit, common, most):
        """Messages that match the most telling of `words` (folded tokens),
        best (bm25) first, but those of `leave_out` (ids), with their
        conversation's title; and the words looked up. ([], []) without
        FTS5 or while the index is built. A word in `common` messages or
        more tells little and costs much to rank (bm25 reads every match):
        the `most` rarest of the others are looked up, any of them; where
        every word is common, the newest messages with all of them (bm25
        would count every message each is in). So the cost is bounded
        whatever the history's size."""
        if not self.fts or self.unbuilt() or not words:
            return [], []
        conn = self.db.conn()
        counted = sorted((conn.execute(DOCUMENTS_UP_TO, (f'"{w}"', common)).fetchone()[0], w)
                         for w in words)
        rare = [w for n, w in counted if 0 < n < common][:most]
        used = rare or [w for n, w in counted if n]
        if not used:
            return [], []
        order = "rank" if rare else "id DESC"
        return dicts(conn.execute(
            f"""SELECT m.id AS message_id, m.conversation_id, m.content, m.role,
                       m.timestamp, c.title
                FROM (SELECT rowid AS id{', rank' if rare else ''} FROM search_fts
                      WHERE search_fts MATCH ?
                      AND rowid NOT IN (SELECT value FROM json_each(?))
                      ORDER BY {order} LIMIT ?) AS hits
                JOIN messages m ON m.id = hits.id
                JOIN conversations c ON c.id = m.conversation_id
                ORDER BY hits.{order}""", ((" OR " if rare else " AND ").join(
                    f'"{w}"' for w in used), JSON.encode(sorted(leave_out)), limit))), used

    def purge_due(self):
        """Was text deleted or replaced since the last purge (perhaps by a run
        that stopped)? SEARCH_SCHEMA's triggers mark it: a message deleted, a
        message's text changed other than by adding to its end (a continued
        reply), a title renamed other than the first one given."""
        return self.fts and bool(self.db.conn().execute(
            "SELECT 1 FROM search_purge LIMIT 1").fetchone())

    def purge(self, stopping):
        """Make deleted and edited text unrecoverable from the file: FTS5 keeps
        old tokens in old index segments until they are merged ('optimize'),
        and the file keeps old pages until a checkpoint has written the new
        ones over them (secure_delete zeroes what is freed). A reader's
        snapshot holds the checkpoint back: it is tried again each second
        until it completes (or `stopping` is set: the mark stays, and the next
        start purges). Readers go on meanwhile; a writer interrupts the merge
        (it rolls back, and is to be tried again when writes have paused).
        Whether it completed."""
        if self.fts:
            with self.db.write(gives_way=True) as c:
                c.execute("INSERT INTO search_fts (search_fts) VALUES ('optimize')")
                c.execute("INSERT INTO attached_fts (attached_fts) VALUES ('optimize')")
        while not self.db.checkpoint():
            if stopping.wait(1):
                return False
        if self.fts:
            with self.db.write() as c:
                c.execute("DELETE FROM search_purge")
        return True

    def check(self):
        """FTS5's own check that the index matches the tables; raises if not."""
        if self.fts:
            self.db.conn().execute("INSERT INTO search_fts (search_fts, rank) "
                                   "VALUES ('integrity-check', 1)")
            self.db.conn().execute("INSERT INTO attached_fts (attached_fts, rank) "
                                   "VALUES ('integrity-check', 1)")


###############################################################################
# Storage: conversation trees
###############################################################################

# A conversation's messages are a tree (TREE_SCHEMA): a branch is the path
# from a first message down to a leaf, and the conversation shows one, the
# branch of its current message. Every query here walks the tree by index
# (messages_by_parent, and the primary key upwards), so its cost is that of
# the branch, not of the history.

MESSAGE_COLUMNS = ", ".join(              # as shown: with its siblings' ids, its attachments
    f"{name}, sibling_ids" if name == "parent_id" else name
    for name in columns_in(MESSAGE_TABLE, "shown")) + ", attachments"
# The ids of message m's siblings, itself included, ascending: JSON text.
SIBLINGS_SQL = """(SELECT '[' || group_concat(id) || ']' FROM (
    SELECT s.id FROM messages s WHERE s.parent_id IS m.parent_id
                                  AND s.conversation_id = m.conversation_id ORDER BY s.id))"""
# A message as shown, read from messages m: each column, with its siblings'
# ids and whether it is being generated.
ATTACHMENTS_SQL = """(SELECT '[' || coalesce(group_concat(shown, ', '), '') || ']' FROM (
    SELECT shown FROM message_attachments a WHERE a.message_id = m.id ORDER BY a.position))"""
MESSAGE_READ = ", ".join(
    f"{SIBLINGS_SQL} AS sibling_ids" if name == "sibling_ids" else
    f"{GENERATING_JSON} AS generating" if name == "generating" else
    f"{ATTACHMENTS_SQL} AS attachments" if name == "attachments" else f"m.{name}"
    for name in MESSAGE_COLUMNS.split(", "))


def path_sql(start="?"):
    """The path from message `start` (an SQL expression) up to the root, at
    most ? messages long."""
    return f"""WITH RECURSIVE path(id, parent_id, depth) AS (
    SELECT id, parent_id, 1 FROM messages WHERE id = {start}
    UNION ALL SELECT m.id, m.parent_id, path.depth + 1 FROM messages m
              JOIN path ON m.id = path.parent_id WHERE path.depth < ?)"""


PATH_SQL = path_sql()
# The path from a conversation's current message (?) up.
CURRENT_PATH_SQL = path_sql(f"(SELECT {CURRENT_SQL} FROM conversations c WHERE c.id = ?)")
# Message ? and every message below it.
SUBTREE_SQL = """WITH RECURSIVE below(id) AS (
    SELECT ? UNION ALL SELECT m.id FROM messages m JOIN below ON m.parent_id = below.id)"""
# From message ? down along the newest child at each step: its max is the leaf.
NEWEST_CHILDREN_SQL = """WITH RECURSIVE down(id) AS (
    SELECT ? UNION ALL SELECT (SELECT max(m.id) FROM messages m WHERE m.parent_id = down.id)
                       FROM down WHERE down.id IS NOT NULL)"""
WHOLE_PATH = 2**62
MISSING = object()      # no such conversation
CURRENT = object()      # a new message's parent: the conversation's current message


# A fork's own, not copied from its source (a fork is made here, wherever its
# source came from): the rest of a conversation's columns (its model, and its
# settings) are.
FORK_MARK = " (fork)"     # after the source's title, for a fork given none
FORK_FRESH = {"id", "title", "created_at", "updated_at", "current_message_id", "source",
              "source_id", "client", "uuid"}


class Tree:
    """Branches of conversations: reading them, and the changes that keep
    every branch but the one deleted. Each change is one transaction."""

    def __init__(self, db):
        self.db = db

    @staticmethod
    def current(c, conversation_id):
        """The current leaf of a conversation (None when it has no messages),
        MISSING when there is no such conversation."""
        row = c.execute(f"SELECT {CURRENT_SQL} FROM conversations c WHERE c.id = ?",
                        (conversation_id,)).fetchone()
        return MISSING if row is None else row[0]

    @staticmethod
    def leaf_along_newest(c, message_id):
        return c.execute(f"{NEWEST_CHILDREN_SQL} SELECT max(id) FROM down",
                         (message_id,)).fetchone()[0]

    @staticmethod
    def newest_leaf(c, message_id):
        return c.execute(f"{SUBTREE_SQL} SELECT max(id) FROM below", (message_id,)).fetchone()[0]

    def message(self, message_id, conversation_id=None):
        """One message's row (None if there is none, or it is of another
        conversation than the one given)."""
        found = one(self.db.conn().execute(
            "SELECT id, conversation_id, parent_id, role, content, model, response_time_ms, "
            "estimated_tokens, prompt_tokens, tokens_per_second, finish_reason "
            "FROM messages WHERE id = ?", (message_id,)))
        if found and conversation_id is not None and found["conversation_id"] != conversation_id:
            return None
        return found

    def path(self, message_id, limit=WHOLE_PATH):
        """The last `limit` messages of the branch from the root to this one."""
        return dicts(self.db.conn().execute(
            f"""{PATH_SQL} SELECT m.id, m.role, m.content, m.tool_calls, m.tool_call_id,
                m.token_count FROM path JOIN messages m USING (id) ORDER BY m.id""",
            (message_id, limit)))

    def first(self, message_id, count):
        """The first `count` messages of the branch from the root to this one."""
        return dicts(self.db.conn().execute(
            f"""{PATH_SQL} SELECT m.id, m.role, m.content, m.tool_calls, m.tool_call_id,
                m.token_count FROM path JOIN messages m USING (id) ORDER BY m.id LIMIT ?""",
            (message_id, WHOLE_PATH, count)))

    def depth(self, message_id):
        """How many messages the branch from the root to this one holds."""
        return self.db.conn().execute(f"{PATH_SQL} SELECT count(*) FROM path",
                                      (message_id, WHOLE_PATH)).fetchone()[0]

    def branch(self, conversation_id, everything=False):
        """The current branch of a conversation, as a JSON array of messages
        (every message of it, with `everything`)."""
        if everything:
            query = (f"SELECT {MESSAGE_READ} FROM messages m "
                     f"WHERE m.conversation_id = ? ORDER BY m.id")
            return self.db.json_rows(MESSAGE_COLUMNS, query, (conversation_id,))[0]
        query = (f"""{CURRENT_PATH_SQL}
                     SELECT {MESSAGE_READ} FROM messages m
                     WHERE m.id IN (SELECT id FROM path) ORDER BY m.id""")
        return self.db.json_rows(MESSAGE_COLUMNS, query, (conversation_id, WHOLE_PATH))[0]

    def edit(self, message_id, content):
        """Change a message's text in place (its children stay); the search
        index follows by trigger. The time of the edit, or None if there is
        no such message."""
        now = now_iso()
        with self.db.write() as c:
            owner = self.owner(c, message_id)
            if owner is None:
                return None
            c.execute("UPDATE messages SET content = ?, edited_at = ? WHERE id = ?",
                      (content, now, message_id))
            c.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, owner))
            return now

    def delete(self, message_id):
        """Delete a message and everything below it, in one statement. If the
        current branch went through it, the current message becomes the
        newest leaf below its newest remaining sibling, else its parent.
        (conversation id, deleted ids ascending, current message), or None."""
        with self.db.write() as c:
            row = c.execute("SELECT conversation_id, parent_id FROM messages WHERE id = ?",
                            (message_id,)).fetchone()
            if row is None:
                return None
            conversation_id, parent_id = row
            deleted = [r[0] for r in c.execute(f"{SUBTREE_SQL} SELECT id FROM below ORDER BY id",
                                               (message_id,))]
            current = self.current(c, conversation_id)
            c.execute(f"{SUBTREE_SQL} DELETE FROM messages WHERE id IN (SELECT id FROM below)",
                      (message_id,))
            if current in deleted:
                sibling = c.execute(
                    "SELECT max(id) FROM messages WHERE parent_id IS ? AND conversation_id = ?",
                    (parent_id, conversation_id)).fetchone()[0]
                current = self.newest_leaf(c, sibling) if sibling is not None else parent_id
            c.execute("UPDATE conversations SET current_message_id = ?, updated_at = ? "
                      "WHERE id = ?", (current, now_iso(), conversation_id))
            return conversation_id, deleted, current

    def fork(self, source, message_id, title=None):
        """A new conversation holding copies of the branch from the root to
        this message of conversation `source`, with the source's model and
        settings: its id, or None if the message is not one of the source's."""
        now = now_iso()
        with self.db.write() as c:
            if self.owner(c, message_id) != source:
                return None
            kept = [name for name in CONVERSATION_TABLE if name not in FORK_FRESH]
            settings = one(c.execute(f"SELECT {', '.join(kept)}, title FROM conversations "
                                     "WHERE id = ?", (source,)))
            mark = settings.pop("title")[:LIMITS["title"] - len(FORK_MARK)] + FORK_MARK
            conversation_id = put_conversation(c, title=mark if title is None else title,
                                               created_at=now, updated_at=now, **settings)
            names = ", ".join(name for name in MESSAGE_TABLE
                              if name not in ("id", "conversation_id", "parent_id"))
            parent = None
            for (old_id,) in c.execute(f"{PATH_SQL} SELECT id FROM path ORDER BY id",
                                       (message_id, WHOLE_PATH)).fetchall():
                parent = c.execute(
                    f"""INSERT INTO messages (conversation_id, parent_id, {names})
                        SELECT ?, ?, {names} FROM messages WHERE id = ?""",
                    (conversation_id, parent, old_id)).lastrowid
            c.execute("UPDATE conversations SET current_message_id = ? WHERE id = ?",
                      (parent, conversation_id))
            return conversation_id

    @staticmethod
    def follow(c, digests, where, params=()):
        """The deepest message of a branch whose path from its root has these
        digests (message_digest), first to last, among the roots that `where`
        admits (an SQL condition on the root m and its conversation c): (its
        id, how many of the digests matched, its conversation), or None. The
        newest such branch, if several match as deep. Roots are found by
        their own index, each step down by the parent's."""
        if not digests:
            return None
        wanted = ", ".join(f"({depth}, {int(d)})" for depth, d in enumerate(digests, 1))
        return c.execute(
            f"""WITH RECURSIVE wanted(depth, digest) AS (VALUES {wanted}),
                walk(id, depth) AS (
                    SELECT m.id, 1 FROM messages m JOIN conversations c ON c.id = m.conversation_id
                    WHERE m.parent_id IS NULL AND m.digest = {int(digests[0])} AND ({where})
                    UNION ALL
                    SELECT m.id, walk.depth + 1 FROM walk
                    JOIN wanted ON wanted.depth = walk.depth + 1
                    JOIN messages m ON m.parent_id = walk.id AND m.digest = wanted.digest)
                SELECT walk.id, walk.depth, m.conversation_id
                FROM walk JOIN messages m ON m.id = walk.id
                ORDER BY walk.depth DESC, walk.id DESC LIMIT 1""", params).fetchone()

    @staticmethod
    def owner(c, message_id):
        row = c.execute("SELECT conversation_id FROM messages WHERE id = ?",
                        (message_id,)).fetchone()
        return row[0] if row else None


###############################################################################
# Storage: projects
###############################################################################

PROJECT_LIST = """SELECT p.id, p.name, p.system_prompt, p.options, p.created_at, p.updated_at,
    (SELECT count(*) FROM conversations c WHERE c.project_id = p.id) AS conversations
    FROM projects p"""


def project_row(row):
    if row is not None and row["options"] is not None:
        row["options"] = json.loads(row["options"])
    return row


class Projects:
    """Projects: a name, a system prompt and options that a conversation in
    one is made with where it sets none (reply_settings). Each change is one
    transaction; a name is one project's (CONFLICT otherwise)."""

    def __init__(self, db):
        self.db = db

    def all(self):
        return [project_row(r) for r in dicts(self.db.conn().execute(
            PROJECT_LIST + " ORDER BY p.name COLLATE NOCASE, p.id"))]

    def get(self, project_id):
        if project_id is None:
            return None
        return project_row(one(self.db.conn().execute(PROJECT_LIST + " WHERE p.id = ?",
                                                      (project_id,))))

    def named(self, c, name):
        found = c.execute("SELECT id FROM projects WHERE name = ?", (name,)).fetchone()
        return found[0] if found else None

    def put(self, c, name, system_prompt=None, options=None):
        """A new project in transaction c: its id; CONFLICT if the name is taken."""
        if self.named(c, name) is not None:
            raise name_taken(name)
        now = now_iso()
        return c.execute("INSERT INTO projects (name, system_prompt, options, created_at, "
                         "updated_at) VALUES (?, ?, ?, ?, ?)",
                         (name, system_prompt, None if options is None else JSON.encode(options),
                          now, now)).lastrowid

    def create(self, name, system_prompt=None, options=None):
        with self.db.write() as c:
            return self.put(c, name, system_prompt, options)

    def update(self, project_id, **fields):
        """Change a project's name, system_prompt and/or options: what
        changed; None if there is no such project."""
        with self.db.write() as c:
            if not c.execute("SELECT 1 FROM projects WHERE id = ?", (project_id,)).fetchone():
                return None
            if "name" in fields and c.execute("SELECT 1 FROM projects WHERE name = ? AND id != ?",
                                              (fields["name"], project_id)).fetchone():
                raise name_taken(fields["name"])
            stored = {k: JSON.encode(v) if k == "options" and v is not None else v
                      for k, v in fields.items()}
            c.execute(f"UPDATE projects SET {', '.join(f'{n} = ?' for n in stored)}, "
                      "updated_at = ? WHERE id = ?", (*stored.values(), now_iso(), project_id))
        return fields

    def delete(self, project_id):
        """Delete a project; its conversations stay, in no project. Whether it was."""
        with self.db.write() as c:
            return c.execute("DELETE FROM projects WHERE id = ?", (project_id,)).rowcount == 1

    @staticmethod
    def require(c, project_id):
        """NOT_FOUND unless project_id (not None) is a project's."""
        if project_id is not None and not c.execute("SELECT 1 FROM projects WHERE id = ?",
                                                    (project_id,)).fetchone():
            raise not_found("project", project_id)


###############################################################################
# Storage: conversations and messages
###############################################################################

def conversation_stats(groups):
    """(role, count, length, tokens, response ms, timed replies) per role, as
    STATS_SQL sums them -> (summary, by_role), as the reference shows them."""
    groups = sorted(groups, reverse=True)
    by_role = [{"role": role, "count": count, "avg_length": round(length / count, 1),
                "total_tokens": tokens or 0,
                "avg_response_time": round(ms / timed, 1) if timed else None}
               for role, count, length, tokens, ms, timed in groups]
    assistant = next((g for g in groups if g[0] == "assistant"), (None, 0, 0, 0, 0, 0))
    return stats_summary(sum(r["count"] for r in by_role), assistant[1], assistant[4],
                         assistant[5], sum(r["total_tokens"] for r in by_role)), by_role


def stats_summary(messages, replies, reply_ms, timed_replies, tokens):
    return {"total_messages": messages, "assistant_messages": replies or 0,
            "avg_response_time": round(reply_ms / timed_replies, 1) if timed_replies else None,
            "total_tokens": tokens or 0}


STATS_SQL = """SELECT role, count(*), sum(length(content)), sum(estimated_tokens),
                      sum(response_time_ms), count(response_time_ms)
               FROM messages WHERE conversation_id = ? GROUP BY role"""
# stats_summary's arguments, summed over a page of messages as it is read
SUMMARY_SQL = """count(*), sum(role = 'assistant'),
                 sum(CASE WHEN role = 'assistant' THEN response_time_ms END),
                 count(CASE WHEN role = 'assistant' THEN response_time_ms END),
                 sum(estimated_tokens)"""


def stored_settings(settings):
    """Settings of a conversation as its columns hold them (options as JSON,
    the pin as 0 or 1); those left out are not there."""
    out = dict(settings)
    if "options" in out:
        out["options"] = JSON.encode(out["options"]) if out["options"] is not None else None
    if "pinned" in out:
        out["pinned"] = int(bool(out["pinned"]))
    return out


def migration_backup(db, version):
    """The copy of a database of schema `version` made before it is migrated:
    one per version (a start interrupted and made again replaces it, as the
    file is still of that version), written aside and renamed when whole, so
    that a failed copy never stands under the backup's name."""
    path, partial = f"{db.path}.v{version}.bak", f"{db.path}.v{version}.bak.partial"
    try:
        db.backup(partial)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise
    finally:
        db.release()
    return path


def process_alive(pid):
    """Whether process pid runs (on Windows, where signal 0 would end it: yes)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                       # another user's: it runs
        pass
    try:                                  # killed, not yet reaped: a zombie runs nothing
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def remove_unfinished_imports(c):
    """The conversations of imports whose process ended before they did (a
    kill, a crash), removed in transaction c."""
    for (run,) in c.execute("SELECT DISTINCT run FROM import_pending").fetchall():
        pid = ascii_number(run.split(":")[0], 10)
        if pid is None or (pid != os.getpid() and not process_alive(pid)):
            removed = c.execute("DELETE FROM conversations WHERE id IN (SELECT "
                                "conversation_id FROM import_pending WHERE run = ?)",
                                (run,)).rowcount
            log.warning("removed %d conversations of an import that did not end", removed)


UNSENT_ATTACHMENT_DAYS = 1    # an upload no message took is removed at a start after this


def iso_ago(seconds):
    """The time `seconds` ago, as now_iso() writes times."""
    then = datetime.fromtimestamp(time.time() - seconds, timezone.utc)
    return then.strftime("%Y-%m-%dT%H:%M:%S.") + f"{then.microsecond // 1000:03d}Z"


# This process's mark on the replies it is making (messages.generating): its
# pid, and a token, since a process started again may be given the same pid
# (the first process of a container always is).
RUN = f"{os.getpid()}:{secrets.token_hex(6)}"


def interrupted_replies(c):
    """Replies left being made by a process that is gone (a kill, a crash, a
    power cut), in transaction c: kept with the text they had, marked
    "interrupted" (Continue takes them up); one that had no text yet is
    removed."""
    for (run,) in c.execute("SELECT DISTINCT generating FROM messages "
                            "WHERE generating IS NOT NULL").fetchall():
        pid = ascii_number(run.split(":")[0], 10)
        if run == RUN or (pid is not None and pid != os.getpid() and process_alive(pid)):
            continue
        c.execute("DELETE FROM messages WHERE generating = ? AND content = '' AND "
                  "reasoning IS NULL AND NOT EXISTS (SELECT 1 FROM messages k "
                  "WHERE k.parent_id = messages.id)", (run,))
        kept = c.execute("UPDATE messages SET generating = NULL, finish_reason = 'interrupted' "
                         "WHERE generating = ?", (run,)).rowcount
        log.warning("%d replies were being made when llama-chat stopped: kept as interrupted",
                    kept)


def blob_pieces(conn, ident, size=1 << 20):
    """An attachment's bytes, a piece at a time, never whole in memory: read
    through SQLite's incremental blob I/O (Python 3.11+), opened for each
    piece so that no read is held open between them; else with substr()
    (which has SQLite read the whole value for each piece)."""
    at = 0
    while True:
        if hasattr(conn, "blobopen"):
            row = conn.execute("SELECT rowid FROM attachments WHERE id = ?", (ident,)).fetchone()
            if row is None:
                return
            with conn.blobopen("attachments", "data", row[0], readonly=True) as blob:
                blob.seek(at)
                piece = blob.read(size)
        else:
            row = conn.execute("SELECT substr(data, ?, ?) FROM attachments WHERE id = ?",
                               (at + 1, size, ident)).fetchone()
            piece = bytes(row[0]) if row and row[0] else b""
        if not piece:
            return
        yield piece
        at += len(piece)


class Upload:
    """A file as it comes (f.read, a piece at a time): hashed, counted and
    kept in a temporary file (in memory up to 1 MiB), its kind told by its
    bytes as they are read (attachment_kind): never whole in memory. What
    is refused is refused before the rest is read. close() when done."""
    PIECE = 1 << 16

    def __init__(self, f):
        import tempfile
        self.spool = tempfile.SpooledTemporaryFile(max_size=1 << 20)
        self.digest, self.size = hashlib.sha256(), 0
        try:
            pieces = self._read(f)
            first = next(pieces, b"")
            if not first:
                raise validation_error("file", "The body is the file to attach, and it is empty")
            if first.startswith(b"%PDF-"):
                for _ in pieces:
                    pass
                self.pdf_as_text()
            else:
                self.kind, self.type = attachment_kind(first, pieces)
                for _ in pieces:
                    pass
        except BaseException:
            self.close()
            raise
        self.ident = self.digest.hexdigest()

    def pdf_as_text(self):
        """A PDF is kept as its text (pdf_text: read whole, as a PDF must be),
        or refused with the reason it has none to read."""
        import tempfile
        try:
            text = pdf_text(b"".join(self.pieces())).encode()
        except PdfError as e:
            raise validation_error("file", f"This PDF cannot be attached: {e}") from None
        except (RecursionError, MemoryError, zlib.error, TypeError, ValueError, KeyError,
                AttributeError, IndexError):       # a file damaged past what is foreseen
            raise validation_error("file", "This PDF cannot be attached: it cannot be read "
                                   "here") from None
        self.spool.close()
        self.spool = tempfile.SpooledTemporaryFile(max_size=1 << 20)
        self.spool.write(text)
        self.digest, self.size = hashlib.sha256(text), len(text)
        self.kind, self.type = "text", "text/plain; charset=utf-8"

    def _read(self, f):
        while piece := f.read(self.PIECE):
            self.digest.update(piece)
            self.size += len(piece)
            self.spool.write(piece)
            yield piece

    def pieces(self, size=1 << 20):
        self.spool.seek(0)
        while piece := self.spool.read(size):
            yield piece

    def close(self):
        self.spool.close()


class Store:
    """History in SQLite: conversations and messages, as plain dicts. Knows
    nothing of HTTP. `open()` brings the file to this version (migrations,
    the search index); until then only Database and SearchIndex may be used."""

    def __init__(self, path, use_fts=None, open_now=True, busy_ms=BUSY_MS):
        self.read_only = read_only_reason(path)
        self.db = Database(path, [("search_form", 1, search_form),
                                  ("message_digest", 4, message_digest),
                                  *MATH_FUNCTIONS], busy_ms, self.read_only)
        self.index = SearchIndex(self.db, use_fts)
        self.tree = Tree(self.db)
        self.projects = Projects(self.db)
        self.backup_path = None
        self.damage = None           # what quick_check found wrong, if anything
        self.progress = Progress()
        if not self.read_only:
            for name in (path, path + "-wal", path + "-shm"):
                private_file(name, create=name == path)
        try:
            with open(path, "rb") as f:
                head = f.read(len(SQLITE_HEADER))
        except OSError as e:
            raise ConfigError(f"database {path} cannot be read: {e.strerror}") from None
        if head and head != SQLITE_HEADER:
            raise ConfigError(f"{path} is not an SQLite database (it begins {head[:8]!r})")
        self.presence = hold_presence(path)
        self.version, tables = self.db.user_version()
        if self.version > SCHEMA_VERSION:
            raise ConfigError(f"database {path} is of a newer llama-chat "
                              f"(schema {self.version}; this one knows {SCHEMA_VERSION})")
        if tables and "conversations" not in tables:
            raise ConfigError(f"{path} is another program's SQLite database (its tables: "
                              f"{', '.join(sorted(tables)[:6])}), not llama-chat's")
        self.is_new = not tables
        self.ready = False
        if open_now:
            self.open()

    def open(self, build_later=False):
        """Migrate, all in one transaction: a stop half-way (interrupt())
        leaves the file as it was (the original app's history is migrated
        into a new file that then takes its place); then build the search
        index where needed, or, `build_later`, leave that to build_index
        (the server's, while the rest answers). A database made before is
        backed up first. One that cannot be written is read as it is, if it
        is of this version."""
        db = self.db
        if self.read_only:
            if self.version < SCHEMA_VERSION or not self.index.in_step():
                raise ConfigError(f"database {db.path} cannot be written ({self.read_only}) "
                                  f"and is of schema {self.version}, or its search index is not "
                                  f"this version's: copy it where it can be, and open it there")
            log.warning("database %s cannot be written (%s): search and export work, writes "
                        "are off", db.path, self.read_only)
            db.release()
            self.progress.set("ready")
            self.ready = True
            return
        started, anew = time.monotonic(), False
        if self.version == 0 and not self.is_new and anew_possible(db):
            with made_alone(os.path.realpath(db.path) + MIGRATING_SUFFIX) as made:
                self._unchanged(db.user_version()[0])      # before its backup is named
                self.progress.set("backing up the database before migrating it")
                self.backup_path = linked_backup(db, 0)
                if self.backup_path:
                    log.info("kept %s as %s (a second name of the file, not a copy) and "
                             "migrating it into a new file", db.path, self.backup_path)
                    self._migrate(made)
                    db.replace_file(made)
                    anew = True
            if anew:                       # (made_alone's lock on it let go first)
                renew_presence(self.presence, db.path)
        if self.version < SCHEMA_VERSION and not self.is_new:
            self._unchanged(db.user_version()[0])          # before a backup is made of it
            self.progress.set("backing up the database before migrating it")
            self.backup_path = migration_backup(db, self.version)
            log.info("backed up %s to %s before migrating it", db.path, self.backup_path)
        db.conn().execute("PRAGMA journal_mode = WAL")
        db.release()
        if not anew:
            self._migrate()
        if self.index.unbuilt():
            log.info("opened %s in %.2f s; its search index is to be built%s", db.path,
                     time.monotonic() - started, ": in the background" if build_later else "")
            if not build_later:
                self.progress.set("building the search index")
                self.build_index(threading.Event())
        self.progress.set("ready")
        self.ready = True

    def _unchanged(self, version):
        """Raise ConfigError unless the file is of the version this Store read
        when it opened it (`version`: read now, on a connection of its own):
        another llama-chat started at the same moment may have migrated it,
        or put a new file in its place."""
        if version != self.version:
            raise ConfigError(f"database {self.db.path} was migrated by another llama-chat "
                              "while this one started: start again")

    def _migrate(self, made=None):
        """The migrations this file needs and the start's tidying, in one
        transaction; `made`: from schema 0, into that new file (whole when
        this returns; removed by the caller otherwise), the original
        attached read only."""
        db = self.db
        with db.own_connection(made) as conn:
            conn.execute("PRAGMA cache_size = -131072")  # 128 MiB while building: ~20% faster
            if made:                      # no journal: the file is made whole or not kept
                conn.execute("PRAGMA journal_mode = OFF")
                conn.execute("PRAGMA synchronous = OFF")     # synced once, by replace_file
                conn.execute("ATTACH ? AS original", (file_uri(db.path, "mode=ro"),))
            with db.write(conn) as c:
                if not self.is_new:
                    self._unchanged(c.execute(f"PRAGMA {'original' if made else 'main'}."
                                              "user_version").fetchone()[0])
                for number, migrate in migration_steps(self.version, made is not None):
                    self.progress.set(f"migrating the database to schema {number}")
                    migrate(c)
                    c.execute(f"PRAGMA user_version = {number}")
                remove_unfinished_imports(c)
                interrupted_replies(c)
                c.execute("DELETE FROM changes WHERE seq <= (SELECT max(seq) FROM changes) - ?",
                          (CHANGES_KEPT,))       # kept by a page's listener, or here
                c.execute("DELETE FROM attachments WHERE made_at < ? AND NOT EXISTS (SELECT 1 "
                          "FROM message_attachments l WHERE l.attachment_id = attachments.id)",
                          (iso_ago(UNSENT_ATTACHMENT_DAYS * 86400),))
                self.index.sync(c)
            if made:
                conn.execute("DETACH original")
        self.version = SCHEMA_VERSION

    def build_index(self, stopping):
        """Index the messages the search index lacks (SearchIndex.unbuilt), a
        batch a transaction, each giving way to any other write (a chat's goes
        first). Whether it completed: `stopping` set leaves the rest to the
        next start."""
        db, started = self.db, time.monotonic()
        while True:
            db.give_way()
            try:
                with db.write(gives_way=True) as c:
                    if not self.index.build_some(c):
                        break
            except sqlite3.OperationalError as e:
                if "interrupted" not in str(e):
                    raise
            if stopping.is_set():
                return False
        # The build went through the WAL (some 40 MB for 100,000 messages):
        # into the file with it now, not at the first chat's commit.
        db.checkpoint()
        log.info("built the search index in %.1f s", time.monotonic() - started)
        return True

    def quick_to_open(self):
        """Is open() a matter of milliseconds: a new file, or one of this
        version with its search index in step?"""
        if self.is_new:
            return True
        quick = self.version == SCHEMA_VERSION and self.index.in_step()
        self.db.release()
        return quick

    def interrupt(self):
        """Stop open() (from another thread): it rolls back what it did."""
        self.progress.cancelled = True
        self.db.interrupt()

    def release(self, heavy=False):
        self.db.release(heavy)

    def close(self):
        self.db.close()
        if self.presence:
            let_go_presence(self.presence)
            self.presence = None

    def health(self):
        """Can the database be read and written? If not, why."""
        problem = None
        try:
            self.db.conn().execute("SELECT 1 FROM conversations LIMIT 1").fetchall()
        except sqlite3.Error as e:
            problem = f"cannot be read: {e}"
        folder = os.path.dirname(os.path.abspath(self.db.path))
        if problem:
            pass
        elif self.read_only:
            return {"ok": True, "fts5": self.index.fts, "read_only": self.read_only}
        elif not os.access(self.db.path, os.W_OK) or not os.access(folder, os.W_OK):
            problem = "cannot be written: the file or its folder is read-only"
        elif self.damage:
            problem = f"is damaged: {self.damage}"
        elif self.db.failure:
            problem = f"cannot be written: {self.db.failure}"
        building = None if problem else self.index.unbuilt()
        return {"ok": not problem, "fts5": self.index.fts,
                **({"search_index": {"building": True, **building}} if building else {}),
                **({"error": "the database " + problem} if problem else {})}

    def check_integrity(self, whole=False):
        """SQLite's quick_check of the whole file (or, `whole`, its
        integrity_check, which also reads every index), on a connection of its
        own (it reads every page): None when it is sound, else what is wrong."""
        with self.db.own_connection() as conn:
            found = [r[0] for r in conn.execute(
                f"PRAGMA {'integrity_check' if whole else 'quick_check'}(5)")]
        self.damage = None if found == ["ok"] else "; ".join(found)
        return self.damage

    def holds(self):
        """What the history holds: conversations (and how many came through
        /v1), messages by role, the first and the last time."""
        c = self.db.conn()
        conversations, first, last, api = c.execute(
            "SELECT count(*), min(created_at), max(updated_at), "
            "coalesce(sum(source = 'api'), 0) FROM conversations").fetchone()
        roles = dict(c.execute("SELECT role, count(*) FROM messages GROUP BY role").fetchall())
        return {"conversations": conversations, "api": api, "roles": roles, "first": first,
                "last": last}

    # Conversations
    def list_conversations(self, limit=None, offset=0, pinned=None, titled=None, project=None):
        """Conversations, newest activity first, as JSON: pinned or not,
        with `titled` in their title (ASCII letters of any case), in project
        `project`, if given."""
        where, params = ["1"], []
        if pinned is not None:
            where.append(f"pinned = {int(pinned)}")
        if titled:
            where.append("title LIKE ? ESCAPE '\\'")
            params.append(like_containing(titled))
        if project is not None:
            where.append("project_id = ?")
            params.append(project)
        return self.db.json_rows(
            CONVERSATION_COLUMNS, f"""SELECT {CONVERSATION_SELECT} FROM conversations
               WHERE {' AND '.join(where)} ORDER BY updated_at DESC, id DESC LIMIT ? OFFSET ?""",
            (*params, -1 if limit is None else limit, offset))[0]

    def get_conversation(self, conversation_id):
        found = one(self.db.conn().execute(
            f"SELECT {CONVERSATION_SHOWN} FROM conversations c WHERE id = ?",
            (conversation_id,)))
        if found:
            found["pinned"] = found["pinned"] == "true"
            found["title_pending"] = bool(found["title_pending"])
            found["options"] = json.loads(found["options"]) if found["options"] else None
        return found

    def create_conversation(self, title, model, title_pending=False, **settings):
        """A new conversation; `settings`: system_prompt, options (a dict),
        pinned, project_id (NOT_FOUND unless a project's)."""
        now = now_iso()
        with self.db.write() as c:
            Projects.require(c, settings.get("project_id"))
            return put_conversation(c, title=title, model=model, created_at=now,
                                    updated_at=now, title_pending=int(title_pending),
                                    **stored_settings(settings))

    def rename_conversation(self, conversation_id, title):
        return self.update_conversation(conversation_id, title=title) is not None

    def update_conversation(self, conversation_id, title=None, show=None, **settings):
        """Rename a conversation, show the branch through message `show`,
        and/or change its settings (system_prompt, options, pinned,
        project_id), in one transaction: what changed, None if there is no
        such conversation; NOT_FOUND (and nothing done) if `show` is not one
        of its messages or project_id no project's."""
        changed = {}
        stored = stored_settings(settings)
        with self.db.write() as c:
            if not c.execute("SELECT 1 FROM conversations WHERE id = ?",
                             (conversation_id,)).fetchone():
                return None
            Projects.require(c, settings.get("project_id"))
            if show is not None:
                if self.tree.owner(c, show) != conversation_id:
                    raise not_found("message", show)
                changed["current_message_id"] = self.tree.leaf_along_newest(c, show)
            if title is not None:
                changed.update(title=title, title_pending=0, updated_at=now_iso())
            columns = {**changed, **stored}
            if columns:
                c.execute(f"UPDATE conversations SET {', '.join(f'{n} = ?' for n in columns)} "
                          "WHERE id = ?", (*columns.values(), conversation_id))
        for name in ("updated_at", "title_pending"):
            changed.pop(name, None)
        return {**changed, **settings}

    def title_if_pending(self, conversation_id, title):
        """Give a conversation made without a title this one, unless a client
        has titled it meanwhile. Whether it was given."""
        with self.db.write() as c:
            return c.execute("UPDATE conversations SET title = ?, title_pending = 0 "
                             "WHERE id = ? AND title_pending = 1",
                             (title, conversation_id)).rowcount == 1

    def first_question(self, conversation_id):
        row = self.db.conn().execute(
            "SELECT content FROM messages WHERE conversation_id = ? AND role = 'user' "
            "ORDER BY id LIMIT 1", (conversation_id,)).fetchone()
        return row[0] if row else None

    def delete_conversations(self, ids):
        """Delete these conversations in one transaction: the ids deleted."""
        with self.db.write() as c:
            return [i for i in sorted(set(ids))
                    if c.execute("DELETE FROM conversations WHERE id = ?", (i,)).rowcount]

    def delete_conversation(self, conversation_id):
        with self.db.write() as c:
            return c.execute("DELETE FROM conversations WHERE id = ?",
                             (conversation_id,)).rowcount == 1

    # Messages
    def messages(self, conversation_id, everything=False):
        """The current branch of a conversation (every message, with
        `everything`) as JSON, and the summary of the stats of all of them."""
        totals = self.db.conn().execute(f"SELECT {SUMMARY_SQL} FROM messages "
                                        "WHERE conversation_id = ?", (conversation_id,))
        return self.tree.branch(conversation_id, everything), stats_summary(*totals.fetchone())

    def add_message(self, conversation_id, role, content, model=None, parent=CURRENT,
                    **metrics):
        """Store one message under `parent` (a message of the conversation, None
        for a first message, or CURRENT: the conversation's current one), make
        it current and move its conversation to the top. Its id; None if the
        conversation or the parent is gone."""
        now = now_iso()
        with self.db.write() as c:
            parent = self.placed(c, conversation_id, parent)
            if parent is MISSING:
                return None
            return self.put_message(c, conversation_id, parent, role, content, model, now,
                                    **metrics)

    def placed(self, c, conversation_id, parent):
        """Where a new message of the conversation goes: `parent` (a message of
        it, None: a first message, CURRENT: its current one), or MISSING if
        the conversation or the parent is gone."""
        current = self.tree.current(c, conversation_id)
        if current is MISSING or parent is CURRENT:
            return current
        if parent is not None and self.tree.owner(c, parent) != conversation_id:
            return MISSING
        return parent

    def ask(self, conversation_id, content, model=None, parent=CURRENT, reply_options=None,
            attachments=(), synced=True, **columns):
        """A question and the row of its reply, to be made by this process, in
        one transaction (one synced commit; not `synced`: Database.sync_wal()
        is to follow): (question id, reply id), or None if the conversation or
        the parent is gone."""
        now = now_iso()
        with self.db.write(synced=synced) as c:
            parent = self.placed(c, conversation_id, parent)
            if parent is MISSING:
                return None
            question = self.put_message(c, conversation_id, parent, "user", content, model,
                                        now, **columns)
            self.link(c, question, attachments)
            return question, self.put_message(c, conversation_id, question, "assistant", "",
                                              model, now, generating=RUN,
                                              options=reply_options)

    @staticmethod
    def put_message(c, conversation_id, parent_id, role, content, model, now, **columns):
        """Insert a message (in the caller's transaction), make it current and
        move its conversation to the top: its id. A reply stored whole names
        the conversation's model; one only begun does not (yet)."""
        fields = dict(conversation_id=conversation_id, parent_id=parent_id, role=role,
                      content=content, model=model, timestamp=now, **columns)
        message_id = c.execute(
            f"INSERT INTO messages ({', '.join(fields)}) VALUES "
            f"({', '.join('?' * len(fields))})", tuple(fields.values())).lastrowid
        names = role == "assistant" and not columns.get("generating")
        c.execute("UPDATE conversations SET updated_at = ?, model = coalesce(?, model), "
                  "current_message_id = ? WHERE id = ?",
                  (now, model if names else None, message_id, conversation_id))
        return message_id

    @staticmethod
    def change_conversation(c, conversation_id, **values):
        """Set these columns of a conversation (in the caller's transaction):
        its row as it is then, or None if there is none."""
        if values:
            c.execute(f"UPDATE conversations SET {', '.join(f'{n} = ?' for n in values)} "
                      "WHERE id = ?", (*values.values(), conversation_id))
        return one(c.execute("SELECT * FROM conversations WHERE id = ?", (conversation_id,)))

    @staticmethod
    def conversation_named(c, name):
        """The conversation a client names (X-Conversation-Id): by its id, its
        UUID, or the client's own id for one made through /v1; None if none."""
        number = ascii_number(name)
        found = (number is not None and c.execute("SELECT id FROM conversations WHERE id = ?",
                                                  (number,)).fetchone()) or \
            c.execute("SELECT id FROM conversations WHERE uuid = ?", (name.lower(),)).fetchone() \
            or c.execute("SELECT id FROM conversations WHERE source = 'api' AND source_id = ?",
                         (name,)).fetchone()
        return found[0] if found else None

    # A reply being made: its row from the start, its text as it comes
    def start_reply(self, conversation_id, parent_id, model, continued=None, **columns):
        """The row of a reply being made, marked as this process's (RUN): a
        new message under parent_id, made current, or (`continued`, an id)
        the reply it continues, its branch made current. Its id; None if what
        it goes under is gone, or the reply continued is being made already."""
        now = now_iso()
        with self.db.write() as c:
            if continued is not None:
                if not c.execute("UPDATE messages SET generating = ? WHERE id = ? AND "
                                 "generating IS NULL", (RUN, continued)).rowcount:
                    return None
                c.execute("UPDATE conversations SET updated_at = ?, current_message_id = ? "
                          "WHERE id = ?", (now, self.tree.leaf_along_newest(c, continued),
                                           conversation_id))
                return continued
            if self.tree.owner(c, parent_id) != conversation_id:
                return None
            return self.put_message(c, conversation_id, parent_id, "assistant", "", model, now,
                                    generating=RUN, **columns)

    def keep_partial(self, message_id, content, reasoning):
        """A reply's text so far, while it is being made."""
        with self.db.write() as c:
            c.execute("UPDATE messages SET content = ?, reasoning = ? WHERE id = ? AND "
                      "generating IS NOT NULL", (content, reasoning or None, message_id))

    def finish_reply(self, message_id, content, reasoning, **columns):
        """A reply's text and columns as it ended, no longer being made: its
        row, or None if it is gone (deleted meanwhile)."""
        with self.db.write() as c:
            counted = columns.pop("token_count", None)
            if not c.execute(
                    f"UPDATE messages SET content = ?, reasoning = ?, generating = NULL"
                    f"{''.join(f', {name} = ?' for name in columns)} WHERE id = ?",
                    (content, reasoning or None, *columns.values(), message_id)).rowcount:
                return None
            if counted is not None:     # after the text: a change of text forgets a count
                c.execute("UPDATE messages SET token_count = ? WHERE id = ?",
                          (counted, message_id))
            row = one(c.execute("SELECT * FROM messages WHERE id = ?", (message_id,)))
            c.execute("UPDATE conversations SET model = coalesce(nullif(?, ''), model) "
                      "WHERE id = ?", (row["model"], row["conversation_id"]))
            return row

    # Attachments
    def put_attachment(self, data, kind, kind_type, name):
        """Store an attachment's bytes (or an Upload's), once whoever sends
        them again: its row as the API shows it (the name it was first given)."""
        with self.db.write() as c:
            return self.stored_attachment(c, data, kind, kind_type, name)

    @staticmethod
    def stored_attachment(c, data, kind, kind_type, name=None):
        """The one INSERT of an attachment (in the caller's transaction): its
        bytes stored unless they are already, its row as the API shows it.
        data: bytes, or an Upload. The bytes are written a piece at a time
        through SQLite's incremental blob I/O (Python 3.11+), never bound to
        the statement: a bound value stays in the statement SQLite caches
        until its next use, a photo's worth of memory for each pooled
        connection. Unnamed, it is named by its kind and id
        ("image-1a2b3c4d.png")."""
        upload = data if isinstance(data, Upload) else None
        ident = upload.ident if upload else hashlib.sha256(data).hexdigest()
        size = upload.size if upload else len(data)
        pieces = upload.pieces() if upload else (
            memoryview(data)[at:at + (1 << 20)] for at in range(0, size, 1 << 20))
        whole = None if hasattr(c, "blobopen") else b"".join(pieces)
        name = name or f"{kind}-{ident[:8]}.{kind_type.split('/')[1].split(';')[0]}"
        added = c.execute(
            "INSERT OR IGNORE INTO attachments (id, kind, type, name, bytes, data, made_at) "
            "VALUES (?, ?, ?, ?, ?, coalesce(?, zeroblob(?)), ?)",
            (ident, kind, kind_type, name, size, whole, size, now_iso()))
        if whole is None and added.rowcount == 1:
            with c.blobopen("attachments", "data", added.lastrowid) as blob:
                for piece in pieces:
                    blob.write(piece)
        return one(c.execute("SELECT id, name, type, bytes, kind FROM attachments WHERE id = ?",
                             (ident,)))

    @staticmethod
    def link(c, message_id, attachments):
        """These attachments (rows as the API shows them) the message's, in order."""
        c.executemany("INSERT INTO message_attachments (message_id, position, attachment_id, "
                      "name, shown) VALUES (?, ?, ?, ?, ?)",
                      [(message_id, i, a["id"], a["name"], JSON.encode(a))
                       for i, a in enumerate(attachments)])

    @classmethod
    def attach(cls, c, message_id, media):
        """Keep these (bytes, kind, type, name) as the message's attachments,
        in order, each stored once (in the caller's transaction); a name of
        None: the one it was first given."""
        cls.link(c, message_id, [{**row, "name": name or row["name"]} for row, name in (
            (cls.stored_attachment(c, data, kind, kind_type, name), name)
            for data, kind, kind_type, name in media)])

    def attachment(self, ident):
        """An attachment as the API shows it ({id, name, type, bytes, kind}), or None."""
        return one(self.db.conn().execute(
            "SELECT id, name, type, bytes, kind FROM attachments WHERE id = ?", (ident,)))

    def let_go_of_pages(self):
        """After an attachment's bytes are written or read: this thread's
        connection drops its page cache (which would keep a photo's pages,
        up to cache_size, for the connection's life) and the C library
        gives the memory back."""
        self.db.conn().execute("PRAGMA shrink_memory")
        release_memory()

    def attachment_bytes(self, ident):
        """An attachment's bytes, whole (for what is made whole: a Markdown export)."""
        return b"".join(blob_pieces(self.db.conn(), ident))

    def attachment_pieces(self, ident):
        """An attachment's bytes, a piece at a time (never whole in memory)."""
        return blob_pieces(self.db.conn(), ident)

    def attached(self, message_ids):
        """The attachments of these messages, with their bytes, in order:
        {message id: [{id, name, type, bytes, kind, data}]}."""
        found = {}
        for start in range(0, len(message_ids), 500):
            ids = message_ids[start:start + 500]
            for row in dicts(self.db.conn().execute(
                    f"SELECT l.message_id, a.id, l.name, a.type, a.bytes, a.kind, a.data "
                    f"FROM message_attachments l JOIN attachments a ON a.id = l.attachment_id "
                    f"WHERE l.message_id IN ({', '.join('?' * len(ids))}) "
                    f"ORDER BY l.message_id, l.position", ids)):
                found.setdefault(row.pop("message_id"), []).append(row)
        return found

    def interrupt_orphans(self):
        """Replies whose process has gone since this one started, kept as
        interrupted (interrupted_replies), if there are any."""
        if self.db.conn().execute("SELECT 1 FROM messages WHERE generating IS NOT NULL "
                                  "AND generating != ? LIMIT 1", (RUN,)).fetchone():
            with self.db.write() as c:
                interrupted_replies(c)

    def replies_being_made(self):
        """Every reply being made on this file, oldest first."""
        return dicts(self.db.conn().execute(
            "SELECT id AS message_id, conversation_id, model, timestamp AS started_at, "
            "length(content) + coalesce(length(reasoning), 0) AS content_chars "
            "FROM messages WHERE generating IS NOT NULL ORDER BY id"))

    def abandon_reply(self, message_id):
        """A reply that ended before it made anything: its row removed, and
        the branch shown as it was before (its question, or the reply it was
        to stand beside); a continued reply is left as it was."""
        with self.db.write() as c:
            row = one(c.execute("SELECT conversation_id, parent_id, content, reasoning FROM "
                                "messages WHERE id = ?", (message_id,)))
            if row is None:
                return
            c.execute("UPDATE messages SET generating = NULL, finish_reason = "
                      "coalesce(finish_reason, 'error') WHERE id = ?", (message_id,))
            if row["content"] or row["reasoning"] or c.execute(
                    "SELECT 1 FROM messages WHERE parent_id = ?", (message_id,)).fetchone():
                return
            c.execute("DELETE FROM messages WHERE id = ?", (message_id,))
            shown = row["parent_id"] if row["parent_id"] is None else \
                self.tree.leaf_along_newest(c, row["parent_id"])   # as before it began
            c.execute("UPDATE conversations SET current_message_id = coalesce(?, "
                      "current_message_id) WHERE id = ? AND (current_message_id = ? OR "
                      "current_message_id IS NULL)", (shown, row["conversation_id"], message_id))

    def message_row(self, message_id):
        """A message's row as stored now (text so far, whether it is being
        made and by whom), or None."""
        return one(self.db.conn().execute("SELECT * FROM messages WHERE id = ?",
                                          (message_id,)))

    def note_change(self, kind, action):
        """A change that is no row of the history (a model list's), for
        every open page: a row of the changes table, as triggers write them."""
        with self.db.write() as c:
            c.execute("INSERT INTO changes (kind, action, conversation_id, id) "
                      "VALUES (?, ?, 0, 0)", (kind, action))

    def keep_token_counts(self, counts):
        """Store messages' token counts ({id: tokens}), counted once."""
        with self.db.write() as c:
            c.executemany("UPDATE messages SET token_count = ? WHERE id = ?",
                          [(n, i) for i, n in counts.items()])

    def stats(self, conversation_id):
        return conversation_stats(self.db.conn().execute(STATS_SQL, (conversation_id,)))

    def search(self, text, limit, project=None):
        return self.index.search(text, limit, project)


###############################################################################
# Storage: an older history, read while it is migrated
###############################################################################

# The original app's database of a million messages takes ~18 s to migrate
# (the messages table made anew, trees, the ledger). Meanwhile the history as
# it was is read from the snapshot SQLite keeps for a reader while a write
# goes on (WAL): the conversation list and a conversation's messages answer at
# once, in the API's shapes, what the older schema lacks given its default.
# Only versions before trees (the original app's, llama-chat 1.0's and
# 1.1's): a conversation is then its messages in order. The rest answers 503
# STARTING until the migration ends.
READABLE_BEFORE = 3          # schema versions below this are read while migrated
OLDER_TIMES = {"created_at", "updated_at", "timestamp", "edited_at"}
OLDER_DEFAULTS = {"pinned": "0", "generating": "NULL"}


def older_select(have, names, table):
    """A SELECT list of `names` from an older `table` that has the columns
    `have`: each as it is (times in ISO form), or its default."""
    out = []
    for name in names:
        if name not in have:
            out.append(f"{OLDER_DEFAULTS.get(name, 'NULL')} AS {name}")
        elif name in OLDER_TIMES:
            column = f"{table}.{name}"
            out.append(f"CASE WHEN {IS_LEGACY_TIME.format(column=column)} THEN "
                       f"{ISO_OF_LEGACY.format(column=column)} ELSE {column} END AS {name}")
        else:
            out.append(f"{table}.{name} AS {name}")
    return ", ".join(out)


class OlderHistory:
    """What the conversation list and a conversation answer while an older
    database is migrated, read on a connection of each call's own (a reader
    sees the history as it was before the migration's write)."""

    def __init__(self, db):
        self.db = db

    @contextmanager
    def reading(self):
        conn = self.db.connect()
        try:
            have = {table: set(table_columns(conn, "main", table))
                    for table in ("conversations", "messages")}
            yield conn, have
        finally:
            conn.close()

    def list_conversations(self, limit=None, offset=0, pinned=None):
        if pinned:
            return []                        # nothing is pinned before version 4
        with self.reading() as (conn, have):
            listed = older_select(have["conversations"], columns_in(CONVERSATION_TABLE, "listed"),
                                  "conversations")
            return [self.shown_conversation(r) for r in dicts(conn.execute(
                f"SELECT {listed} FROM conversations ORDER BY updated_at DESC, id DESC "
                "LIMIT ? OFFSET ?", (-1 if limit is None else limit, offset)))]

    def conversation(self, conversation_id):
        """(conversation, messages, stats summary), or None if there is none."""
        with self.reading() as (conn, have):
            shown = older_select(have["conversations"], columns_in(CONVERSATION_TABLE, "shown"),
                                 "conversations")
            found = one(conn.execute(f"SELECT {shown} FROM conversations WHERE id = ?",
                                     (conversation_id,)))
            if found is None:
                return None
            names = [n for n in MESSAGE_COLUMNS.split(", ")
                     if n not in ("sibling_ids", "attachments")]
            messages = dicts(conn.execute(
                f"SELECT {older_select(have['messages'], names, 'messages')} FROM messages "
                "WHERE conversation_id = ? ORDER BY id", (conversation_id,)))
            summary, _ = conversation_stats(conn.execute(STATS_SQL, (conversation_id,)))
        parent = None
        for m in messages:                   # each follows the one before it
            m.update(parent_id=parent, sibling_ids=[m["id"]], attachments=[],
                     generating=False, finish_reason=m["finish_reason"] or (
                         "stop" if m["role"] == "assistant" else None))
            parent = m["id"]
        found = self.shown_conversation(found)
        found.update(current_message_id=parent, title_pending=False)
        return found, messages, summary

    @staticmethod
    def shown_conversation(row):
        row["pinned"] = bool(row["pinned"])
        return row


###############################################################################
# Storage: chats while an older history is migrated
###############################################################################

# A chat sent while an older history is migrated (those OlderHistory reads)
# is answered at once: it goes into a history of its own beside the database
# (MEANWHILE_SUFFIX), made new, whose ids follow the older history's. A
# conversation of the older history is copied into it before its first chat
# there (as OlderHistory reads it, its ids kept). Once the migration has
# committed, what is new there is written into the database in one
# transaction and the file removed, and a reply still being made goes on into
# the database (Handover); a file left by a stop is written in at the next
# start.
MEANWHILE_SUFFIX = ".meanwhile"
# What a chat changes of a conversation that was copied: merged back.
MEANWHILE_CHANGED = ("updated_at", "model", "current_message_id", "title", "title_pending")


def meanwhile_path(db):
    return os.path.realpath(db.path) + MEANWHILE_SUFFIX


def meanwhile_store(db):
    """The history beside database `db` for chats while it is migrated,
    made if there is none: its ids begin after the older history's."""
    conn = db.connect()
    try:
        last = {}
        for table in ("conversations", "messages"):
            last[table] = max(conn.execute(f"SELECT coalesce(max(id), 0) FROM {table}")
                              .fetchone()[0], (id_sequence(conn, table) or (0,))[0])
    finally:
        conn.close()
    store = Store(meanwhile_path(db))
    with store.db.write() as c:
        for table, seq in last.items():
            c.execute("INSERT OR IGNORE INTO sqlite_sequence (name, seq) SELECT ?, 0 WHERE NOT "
                      "EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = ?)", (table, table))
            c.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = ?", (seq, table))
    return store


def put_rows(c, table, rows):
    """Insert what of each dict of `rows` table has columns for (in c's
    transaction; the rows alike)."""
    if rows:
        names = [n for n in table_columns(c, "main", table) if n in rows[0]]
        c.executemany(f"INSERT INTO {table} ({', '.join(names)}) VALUES "
                      f"({', '.join('?' * len(names))})", ([r[n] for n in names] for r in rows))


def borrowed(store, older, conversation_id):
    """Conversation `conversation_id` of the older history, copied into the
    meanwhile `store` unless it is there already: False if neither has it."""
    if store.get_conversation(conversation_id) is not None:
        return True
    found = older.conversation(conversation_id)
    if found is None:
        return False
    conversation, messages, _ = found
    with store.db.write() as c:
        if c.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone():
            return True                          # copied by another chat meanwhile
        put_rows(c, "conversations", [{**conversation, "current_message_id": None}])
        put_rows(c, "messages", [{**m, "generating": None} for m in messages])
        c.execute("UPDATE conversations SET current_message_id = ?, updated_at = ? WHERE id = ?",
                  (conversation["current_message_id"], conversation["updated_at"],
                   conversation_id))
    return True


def merge_meanwhile(store):
    """What chats wrote beside the database while it was migrated, written
    into it in one transaction (a reply a stop left being made kept as
    interrupted), then that file removed: how many messages."""
    path = meanwhile_path(store.db)
    if not os.path.exists(path):
        return 0
    conn = store.db.connect()
    merged = 0
    try:
        conn.execute("ATTACH ? AS meanwhile", (file_uri(path),))
        if not conn.execute("SELECT 1 FROM meanwhile.sqlite_master WHERE name = 'messages'"
                            ).fetchone():
            conn.execute("DETACH meanwhile")        # made empty (a stop as it was made)
        else:
            merged = merged_in(conn, store.db)
    except sqlite3.Error as e:
        raise sqlite3.Error(f"the chats made while it was migrated ({path}) could not be "
                            f"written into it: {e}; move that file away to start without "
                            "them") from None
    finally:
        conn.close()
    try:
        for end in ("-wal", "-shm", ""):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path + end)
    except OSError as e:                 # (Windows, while a connection to it is open)
        log.warning("%s is left (empty; removed at the next start): %s", path, e)
    log.info("%d messages written while the database was migrated merged into it", merged)
    return merged


def merged_in(conn, db):
    """The merge of the history attached to conn as `meanwhile` into db, in
    one transaction: how many messages."""
    with db.write(conn) as c:
        shared = {table: [n for n in table_columns(c, "main", table)
                          if n in table_columns(c, "meanwhile", table)]
                  for table in ("conversations", "messages")}
        names = {table: ", ".join(found) for table, found in shared.items()}
        current_later = ", ".join("NULL" if n == "current_message_id" else n   # (its messages
                                  for n in shared["conversations"])           # are not in yet)
        c.execute(f"""INSERT INTO main.conversations ({names['conversations']})
            SELECT {current_later} FROM meanwhile.conversations
            WHERE id NOT IN (SELECT id FROM main.conversations)""")
        merged = c.execute(f"INSERT INTO main.messages ({names['messages']}) SELECT "
                           f"{names['messages']} FROM meanwhile.messages WHERE id NOT IN "
                           "(SELECT id FROM main.messages) ORDER BY id").rowcount
        changed = ", ".join(MEANWHILE_CHANGED)
        c.execute(f"""UPDATE main.conversations SET ({changed}) = (
            SELECT {changed} FROM meanwhile.conversations s WHERE s.id = conversations.id)
            WHERE id IN (SELECT s.id FROM meanwhile.conversations s
                         JOIN main.conversations m USING (id)
                         WHERE s.updated_at IS NOT m.updated_at
                            OR s.current_message_id IS NOT m.current_message_id)""")
        interrupted_replies(c)
        for table in ("messages", "conversations"):      # merged: never again, whatever
            c.execute(f"DELETE FROM meanwhile.{table}")  # becomes of the file
    conn.execute("DETACH meanwhile")
    return merged


class Handover:
    """The store of the chats made while an older history is migrated: the
    meanwhile store, then (hand_to), once the migration has committed, the
    database's own, what was written meanwhile merged into it. Each call of
    a Store method is whole on one of them: a reply being made goes on into
    the database."""

    def __init__(self, store):
        self._store, self._lock = store, threading.RLock()

    def __getattr__(self, name):
        found = getattr(self._store, name)
        if not callable(found):
            return found                  # db, tree, index: the store's of this moment

        def held(*args, **kwargs):
            with self._lock:
                return getattr(self._store, name)(*args, **kwargs)
        return held

    def hand_to(self, store):
        with self._lock:
            self._store.close()           # (its WAL written into the file)
            merge_meanwhile(store)
            self._store = store


###############################################################################
# Storage: the ledger of every reply's speed
###############################################################################

# The replies between two times, by the replies' index, as the ledger counts them.
LEDGER_REPLIES = f"""SELECT {LEDGER_VALUES.format(r="messages")} FROM messages
    INDEXED BY messages_ledger_by_time
    WHERE role = 'assistant' AND timestamp >= ? AND timestamp <= ?"""
# The p-th percentile of a metric per group, by nearest rank.
LEDGER_RANKED = """SELECT {names}, '{metric}_p{p}' AS what, v FROM (
    SELECT {names}, v, row_number() OVER (PARTITION BY {names} ORDER BY v) AS i,
           count(*) OVER (PARTITION BY {names}) AS n
    FROM (SELECT {names}, {metric} AS v FROM rows WHERE {metric} IS NOT NULL))
    WHERE i = max(1, (n * {p} + 99) / 100)"""
LEDGER_PERCENTILES = (("tps", 50), ("pps", 50), ("ttft", 50), ("ttft", 95))
RANK_COLUMNS = tuple(f"{metric}_p{p}" for metric, p in LEDGER_PERCENTILES)
# A model's percentiles of all time, from its histograms: the bucket where the
# count of values up to it first reaches the rank.
LEDGER_BUCKET_RANKS = f"""SELECT model, metric || '_p' || p, total / n FROM (
        SELECT model, metric, n, total,
               sum(n) OVER (PARTITION BY model, metric ORDER BY bucket
                            ROWS UNBOUNDED PRECEDING) AS upto,
               sum(n) OVER (PARTITION BY model, metric) AS count
        FROM ledger_buckets)
    JOIN ({" UNION ALL ".join(f"SELECT '{m}' AS metric, {p} AS p"
                               for m, p in LEDGER_PERCENTILES)}) USING (metric)
    WHERE upto >= max(1, (count * p + 99) / 100) AND upto - n < max(1, (count * p + 99) / 100)"""
# Each model's times to first token in bins of 2 ** LEDGER_BIN_SHIFT buckets
# (28% wide), for a chart.
LEDGER_BIN_SHIFT = 3
LEDGER_HISTOGRAM = f"""SELECT model, bucket >> {LEDGER_BIN_SHIFT} AS bin, sum(n)
    FROM ledger_buckets WHERE metric = 'ttft' GROUP BY model, bin ORDER BY model, bin"""
LEDGER_SUMS = """SELECT {names}, sum(replies), sum(prompt_tokens), sum(completion_tokens),
    sum(pps_sum) / nullif(sum(pps_n), 0), sum(tps_sum) / nullif(sum(tps_n), 0)
    FROM ledger_days WHERE day BETWEEN ? AND ? GROUP BY {names} ORDER BY {names}"""
LEDGER_CACHE_SUMS = """SELECT {names}, sum(replies), sum(cached), sum(read) FROM ledger_cache
    WHERE day BETWEEN ? AND ? GROUP BY {names}"""


def ledger_ranked(conn, group, first, last):
    """Percentiles per group of the replies of days first..last, ranked in SQL."""
    names = ", ".join(group)
    ranked = " UNION ALL ".join(LEDGER_RANKED.format(names=names, metric=m, p=p)
                                for m, p in LEDGER_PERCENTILES)
    found = {}
    for row in conn.execute(f"WITH rows AS ({LEDGER_REPLIES}) {ranked}", (first, last + "~")):
        key, (what, value) = row[:len(group)], row[len(group):]
        found.setdefault(key, dict.fromkeys(RANK_COLUMNS))[what] = value
    return found


def ledger_ranks(db, conn, group, since, until, keys):
    """The percentiles of the groups `keys`: per day, those SQLite kept, and
    the days changed since ranked anew and kept (if nothing was written
    meanwhile); per model, from its histograms, or over a range of days from
    its replies."""
    grouping = ",".join(group)
    if grouping == "model":
        if since or until:
            return ledger_ranked(conn, group, since or "", until or "~")
        ranks = {}
        for model, what, value in conn.execute(LEDGER_BUCKET_RANKS):
            ranks.setdefault((model,), dict.fromkeys(RANK_COLUMNS))[what] = value
        return ranks
    ranks = {tuple(row[:len(group)]): dict(zip(RANK_COLUMNS, row[len(group):]))
             for row in conn.execute(
                 f"SELECT {', '.join(group)}, {', '.join(RANK_COLUMNS)} FROM ledger_ranks "
                 "WHERE grouping = ? AND day BETWEEN ? AND ?",
                 (grouping, since or "", until or "~"))}
    missing = [key for key in keys if key not in ranks]
    if missing:
        days = [key[-1] for key in missing]
        found = ledger_ranked(conn, group, min(days), max(days))
        fresh = {key: found.get(key, dict.fromkeys(RANK_COLUMNS)) for key in missing}
        ranks.update(fresh)
        db.write_if_unchanged(conn, f"INSERT OR REPLACE INTO ledger_ranks (grouping, model, "
                              f"day, {', '.join(RANK_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                              [(grouping, *[dict(zip(group, key)).get(name, "")
                                            for name in ("model", "day")],
                                *[value[c] for c in RANK_COLUMNS])
                               for key, value in fresh.items()])
    return ranks


def ledger(db, group, since, until):
    """Replies grouped by `group` ("model", "day" or both) between two ISO
    days (or None): counts, tokens, speeds (mean and p50) and time to first
    token (p50 and p95; per model of all days, its histogram too). One read
    transaction: sums and ranks agree."""
    conn = db.conn()
    conn.execute("BEGIN")
    try:
        found = []
        sums = conn.execute(LEDGER_SUMS.format(names=", ".join(group)),
                            (since or "", until or "~")).fetchall()
        ranks = ledger_ranks(db, conn, group, since, until,
                             [row[:len(group)] for row in sums])
        cache = {row[:len(group)]: row[len(group):] for row in conn.execute(
            LEDGER_CACHE_SUMS.format(names=", ".join(group)), (since or "", until or "~"))}
        for row in sums:
            key, (replies, prompt, completion, pps, tps) = row[:len(group)], row[len(group):]
            rank = ranks.get(key) or dict.fromkeys(RANK_COLUMNS)
            found.append({**dict(zip(group, key)), "replies": replies,
                          "prompt_tokens": prompt, "completion_tokens": completion,
                          "prompt_tokens_per_second": {"mean": rounded(pps),
                                                       "p50": rounded(rank["pps_p50"])},
                          "tokens_per_second": {"mean": rounded(tps),
                                                "p50": rounded(rank["tps_p50"])},
                          "ttft_ms": {"p50": rounded(rank["ttft_p50"]),
                                      "p95": rounded(rank["ttft_p95"])},
                          "prompt_cache": prompt_cache(*cache.get(key, (0, 0, 0)))})
        if group == ("model",) and not (since or until):
            ledger_histograms(conn, found)
        return found
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def prompt_cache(replies, cached, read):
    """Of the replies whose timings told it: how many, the prompt tokens
    llama.cpp found in its cache and read, and the cached share (0..1)."""
    return {"replies": replies, "cached_tokens": cached, "read_tokens": read,
            "share": round(cached / (cached + read), 3) if cached + read else None}


def ledger_histograms(conn, groups):
    """Each model's ttft_ms "histogram": [{"under": ms, "replies": n}], bins
    28% wide from its histogram of all days (0 for a time of 0)."""
    bins = {}
    for model, b, n in conn.execute(LEDGER_HISTOGRAM):
        under = 0 if b < -(1 << 27) else round(
            math.exp(((b + 1) << LEDGER_BIN_SHIFT) / LEDGER_STEPS), 1)
        bins.setdefault(model, []).append({"under": under, "replies": n})
    for g in groups:
        g["ttft_ms"]["histogram"] = bins.get(g["model"], [])


@contextmanager
def ledger_bulk(c):
    """Many replies inserted in transaction `c` (an import): counted into the
    ledger together at its end, by one statement per table, instead of one by
    one by their trigger."""
    with added_later(c, "ledger_reply_added") as last:
        yield
        if last is not None:
            rows = (f"SELECT {LEDGER_VALUES.format(r='messages')} FROM messages "
                    f"WHERE id > {int(last)} AND role = 'assistant'")
            for statement in split_sql(LEDGER_ADD.format(sign=1, bucket=LEDGER_BUCKET,
                                                         rows=rows)
                                       + LEDGER_FORGET.format(rows=rows)):
                c.execute(statement)


def rounded(value):
    return round(value, 1) if value is not None else None


###############################################################################
# Storage: the history whole, out (export) and in (import)
###############################################################################

EXPORT_VERSION = 1
# What an export holds of a conversation and of each of its messages.
EXPORT_CONVERSATION_COLUMNS = ", ".join(columns_in(CONVERSATION_TABLE, "exported"))
EXPORT_CONVERSATION = selected(columns_in(CONVERSATION_TABLE, "exported"), pinned=PINNED_JSON)
EXPORT_MESSAGE_COLUMNS = ", ".join(columns_in(MESSAGE_TABLE, "exported"))
EXPORT_BATCH = 200           # conversations read at a time


# Each message's attachments as the API shows them ([] when none), and the
# attachments of a conversation's messages, each once.
EXPORT_MESSAGE_READ = EXPORT_MESSAGE_COLUMNS + f", {ATTACHMENTS_SQL} AS attachments"
CONVERSATION_ATTACHMENTS = """SELECT DISTINCT a.id, a.name, a.type FROM messages m
    JOIN message_attachments l ON l.message_id = m.id JOIN attachments a ON a.id = l.attachment_id
    WHERE m.conversation_id = ? ORDER BY a.id"""
EXPORT_PROJECT = """SELECT json_object('name', p.name, 'system_prompt', p.system_prompt,
    'options', json(p.options)) FROM conversations c JOIN projects p ON p.id = c.project_id
    WHERE c.id = ?"""
BASE64_PIECE = 3 << 18       # bytes of an attachment read at a time: 1 MiB of base64


def exported(conn, db, conversation_id):
    """One conversation and every message of every branch, as llama-chat's
    export's JSON text, a piece at a time: {"conversation": ..., "messages":
    [...]}, and "attachments": {id: {name, type, data (base64)}} when its
    messages have any (an attachment's data streamed, never whole in memory)."""
    conversation, _ = db.json_rows(EXPORT_CONVERSATION_COLUMNS,
                                   f"SELECT {EXPORT_CONVERSATION} FROM conversations "
                                   "WHERE id = ?", (conversation_id,), conn=conn)
    messages, _ = db.json_rows(EXPORT_MESSAGE_COLUMNS + ", attachments",
                               f"SELECT {EXPORT_MESSAGE_READ} FROM messages m "
                               "WHERE conversation_id = ? ORDER BY id", (conversation_id,),
                               conn=conn)
    project = conn.execute(EXPORT_PROJECT, (conversation_id,)).fetchone()
    if project:                 # its project, by name: an import finds it or makes it
        conversation = f'{conversation[:-2]}, "project": {project[0]}}}]'
    yield f'{{"conversation": {conversation[1:-1]}, "messages": {messages}'
    attached = conn.execute(CONVERSATION_ATTACHMENTS, (conversation_id,)).fetchall()
    for n, (ident, name, kind) in enumerate(attached):
        yield (', "attachments": {' if n == 0 else ", ") + \
            f'"{ident}": {{"name": {JSON.encode(name)}, "type": {JSON.encode(kind)}, "data": "'
        for piece in blob_pieces(conn, ident, BASE64_PIECE):
            yield base64.b64encode(piece).decode()
        yield '"}'
    yield "}}" if attached else "}"


def export_all(db, form):
    """Everything, as `form` ("json" or "jsonl"), a piece at a time (bytes):
    memory does not grow with the history. One read transaction: the
    export is of one moment, while chats go on."""
    conn = db.connect()
    try:
        conn.execute("BEGIN")
        if form == "json":
            yield b'{"format": "llama-chat", "version": %d, "conversations": [\n' \
                % EXPORT_VERSION
        last, first = 0, True
        while True:
            ids = [r[0] for r in conn.execute("SELECT id FROM conversations WHERE id > ? "
                                              "ORDER BY id LIMIT ?", (last, EXPORT_BATCH))]
            if not ids:
                break
            for i in ids:
                if not first and form == "json":
                    yield b",\n"
                for piece in exported(conn, db, i):
                    yield piece.encode()
                if form == "jsonl":
                    yield b"\n"
                first = False
            last = ids[-1]
        if form == "json":
            yield b"\n]}\n"
    finally:
        conn.close()


def conversation_export(db, conversation_id):
    """One conversation as llama-chat's JSON, a piece at a time (bytes), in
    one read transaction; nothing if there is none."""
    conn = db.connect()
    try:
        conn.execute("BEGIN")
        if not conn.execute("SELECT 1 FROM conversations WHERE id = ?",
                            (conversation_id,)).fetchone():
            return
        yield f'{{"format": "llama-chat", "version": {EXPORT_VERSION}, '.encode()
        pieces = exported(conn, db, conversation_id)
        yield next(pieces)[1:].encode()
        for piece in pieces:
            yield piece.encode()
    finally:
        conn.close()


def export_one(db, conversation_id):
    """One conversation as llama-chat's JSON (bytes), or None if there is none."""
    return b"".join(conversation_export(db, conversation_id)) or None


# What import writes of a message (its conversation and parent aside).
MESSAGE_IMPORT_COLUMNS = tuple(name for name in columns_in(MESSAGE_TABLE, "exported")
                               if name not in ("id", "parent_id"))
TIME_AT = MESSAGE_IMPORT_COLUMNS.index("timestamp")
# How long an import inserts rows in one transaction. Its end (indexing the
# rows for search and the ledger in one statement each, and the commit) takes
# about twice as long again: a chat that waits for the write lock waits for
# both. A writer of the same process that waits ends the inserting at once;
# one of another process cannot be seen waiting: where another llama-chat has
# the file open (a command line import while a server runs), transactions are
# shorter, with a pause between them long enough for that server's writers,
# who wait in SQLite's busy handler (it looks again after ever longer sleeps),
# to find the lock free. A command-line import with the file to itself is one
# transaction: each costs the search index a segment.
IMPORT_HOLD = 0.025
IMPORT_HOLD_SHARED = 0.015
IMPORT_PAUSE_SHARED = 0.03


class ImportWriter:
    """A file's conversations written into a store in short transactions
    (IMPORT_HOLD of inserts), giving way between them to any write waiting, so
    that chats go on during an import of any size. All or nothing: what it
    writes is marked (import_pending) until finish(); undo() removes it, and
    so does the next start after a crash (Store.open). With the file to
    itself (company "none"), it writes in one transaction instead."""

    def __init__(self, store, counts, progress=None, company="server"):
        self.db, self.index, self.projects = store.db, store.index, store.projects
        self.run = f"{os.getpid()}:{secrets.token_hex(6)}"
        self.counts, self.progress = counts, progress
        self.hold, self.pause = (IMPORT_HOLD_SHARED, IMPORT_PAUSE_SHARED) \
            if company == "other processes" else (IMPORT_HOLD, 0)
        self.whole = contextlib.ExitStack() if company == "none" else None
        self.c = None
        self.projects_made = []      # by this import: gone again with it, if it is undone

    def write(self, conversations):
        """Store these conversations. Each transaction's commit is not synced
        (SQLite's synchronous = NORMAL): one lost with the power is lost with
        its marks, and the import is then undone at the next start; the
        commit that ends the import (finish) is synced, and all with it."""
        if self.whole is not None:
            if self.c is None:
                self.c = self.whole.enter_context(self.db.write())
                self.whole.enter_context(self.index.bulk(self.c))
                self.whole.enter_context(ledger_bulk(self.c))
            for _ in self.work(conversations):
                pass
            return
        work = self.work(conversations)
        done = not conversations
        self.db.conn().execute("PRAGMA synchronous = NORMAL")
        try:
            while not done:
                with self.db.write() as self.c, self.index.bulk(self.c), ledger_bulk(self.c):
                    ends = time.monotonic() + self.hold
                    done = True
                    for _ in work:
                        if time.monotonic() > ends or self.db.someone_waits():
                            done = False
                            break
                time.sleep(self.pause)
                self.db.give_way()
        finally:
            self.db.conn().execute("PRAGMA synchronous = FULL")

    def work(self, conversations):
        """Stores conversations a step at a time (a yield between steps) in
        self.c, the transaction of the moment."""
        now = now_iso()
        for conv in conversations:
            if self.c.execute("SELECT 1 FROM conversations WHERE uuid = ?",
                              (conv.uuid,)).fetchone() or self.c.execute(
                    "SELECT 1 FROM conversations WHERE source = ? AND source_id = ?",
                    (conv.source, conv.source_id)).fetchone():
                self.counts["skipped"] += 1
                continue
            created = conv.created_at or now
            project = conv.project and self.projects.named(self.c, conv.project["name"])
            if conv.project and project is None:
                project = self.projects.put(self.c, **conv.project)
                self.projects_made.append(project)
            cid = put_conversation(
                self.c, title=conv.title, model=conv.model, created_at=created,
                updated_at=conv.updated_at or created, system_prompt=conv.system_prompt,
                options=conv.options, pinned=int(conv.pinned), source=conv.source,
                source_id=conv.source_id, client=conv.client, uuid=conv.uuid,
                project_id=project)
            self.c.execute("INSERT INTO import_pending (conversation_id, run) VALUES (?, ?)",
                           (cid, self.run))
            ids = {}
            for m in conv.messages:
                yield
                values = [m[name] for name in MESSAGE_IMPORT_COLUMNS]
                values[TIME_AT] = values[TIME_AT] or created    # its time, else the chat's
                ids[m["key"]] = self.c.execute(
                    f"INSERT INTO messages (conversation_id, parent_id, "
                    f"{', '.join(MESSAGE_IMPORT_COLUMNS)}) VALUES (?, ?, "
                    f"{', '.join('?' * len(MESSAGE_IMPORT_COLUMNS))})",
                    (cid, ids.get(m["parent"]), *values)).lastrowid
                if m["media"]:
                    Store.attach(self.c, ids[m["key"]], m["media"])
                    self.counts["attachments"] += len(m["media"])
            current = ids.get(conv.current)
            self.c.execute("UPDATE conversations SET current_message_id = ? WHERE id = ?",
                           (current if current is not None else max(ids.values()), cid))
            self.counts["conversations"] += 1
            self.counts["messages"] += len(ids)
            if self.progress:
                self.progress(self.counts)
            yield

    def finish(self):
        if self.whole is not None:
            if self.c is not None:
                self.c.execute("DELETE FROM import_pending WHERE run = ?", (self.run,))
            self.whole.close()                   # commits
            return
        with self.db.write() as c:
            c.execute("DELETE FROM import_pending WHERE run = ?", (self.run,))

    def undo(self):
        """Remove what this import wrote, a few conversations a transaction
        (in one transaction: roll it back)."""
        if self.whole is not None:
            self.whole.__exit__(RuntimeError, RuntimeError("undone"), None)
            return
        while True:
            with self.db.write() as c:
                ids = [r[0] for r in c.execute("SELECT conversation_id FROM import_pending "
                                               "WHERE run = ? LIMIT 20", (self.run,))]
                for i in ids:
                    c.execute("DELETE FROM conversations WHERE id = ?", (i,))
                if not ids:
                    c.execute("DELETE FROM projects WHERE id IN (SELECT value FROM json_each(?)) "
                              "AND NOT EXISTS (SELECT 1 FROM conversations "
                              "WHERE project_id = projects.id)", (JSON.encode(self.projects_made),))
            if not ids:
                return
            self.db.give_way()


###############################################################################
# Storage: datasets from the trees
###############################################################################

# Regenerating a reply leaves its siblings in the tree, and the branch a user
# kept shows which they preferred: a preference dataset (format=preference:
# a line per reply on a shown branch that has siblings, {"prompt": messages
# up to its question, "chosen": it, "rejected": its siblings}) and a
# fine-tuning one (format=sft: a line per conversation's shown branch,
# {"messages": [...]}). Messages are {"role", "content"}: text, never
# reasoning (a reply's tool calls and a tool result's call id too, as an
# OpenAI client sends them); the system prompt the conversation (else its
# project) sets comes first. Replies being made, and conversations with no
# reply, are left out.
DATASET_FORMATS = ("preference", "sft")
DATASET_BRANCH = f"""{CURRENT_PATH_SQL}
    SELECT m.id, m.parent_id, m.role, m.content, m.model, m.timestamp, m.tool_calls,
           m.tool_call_id FROM path
    JOIN messages m ON m.id = path.id WHERE m.generating IS NULL ORDER BY path.depth DESC"""
DATASET_SIBLINGS = """SELECT content FROM messages WHERE parent_id = ? AND id != ?
    AND role = 'assistant' AND generating IS NULL AND content != '' ORDER BY id"""
DATASET_ROLES = ("system", "user", "assistant", "tool")
DATASET_JSON = json.JSONEncoder(ensure_ascii=False, check_circular=False)


@dataclass
class DatasetFilter:
    """Which of the history a dataset holds: conversations with a message
    that matches `q` (a search), in `project`; replies of `model`, made
    from day `since` to day `until` (ISO days, UTC; a conversation's branch
    counts by its last reply)."""
    q: str = None
    model: str = None
    since: str = None
    until: str = None
    project: int = None

    def conversations(self, conn, index):
        """SQL and its parameters: the ids of the conversations to read."""
        where, params = [], []
        if self.project is not None:
            where.append("project_id = ?")
            params.append(self.project)
        if self.q is not None:
            where.append("id IN (SELECT value FROM json_each(?))")
            params.append(JSON.encode(sorted(index.conversations_matching(self.q, conn))))
        return (f"SELECT id, system_prompt, project_id FROM conversations WHERE id > ? "
                f"{''.join(' AND ' + w for w in where)} ORDER BY id LIMIT {EXPORT_BATCH}",
                params)

    def takes(self, reply):
        day = (reply["timestamp"] or "")[:10]
        return ((self.model is None or reply["model"] == self.model)
                and (self.since is None or day >= self.since)
                and (self.until is None or day <= self.until))


def dataset_message(m):
    message = {"role": m["role"], "content": m["content"]}
    if m.get("tool_calls"):
        message["tool_calls"] = json.loads(m["tool_calls"])
    if m.get("tool_call_id"):
        message["tool_call_id"] = m["tool_call_id"]
    return message


def dataset_lines(conn, form, conversation, branch, which):
    """The lines (dicts) one conversation's shown branch gives."""
    system = conversation["system_prompt"] or conversation["project_prompt"]
    head = [{"role": "system", "content": system}] if system else []
    shown = [m for m in branch if m["role"] in DATASET_ROLES]
    replies = [m for m in shown if m["role"] == "assistant"]
    if form == "sft":
        if replies and which.takes(replies[-1]):
            yield {"messages": head + [dataset_message(m) for m in shown]}
        return
    for at, m in enumerate(shown):
        if m["role"] != "assistant" or not which.takes(m):
            continue
        rejected = [{"role": "assistant", "content": text} for (text,) in conn.execute(
            DATASET_SIBLINGS, (m["parent_id"], m["id"]))]
        if rejected:
            yield {"prompt": head + [dataset_message(p) for p in shown[:at]],
                   "chosen": dataset_message(m), "rejected": rejected}


def dataset(db, index, form, which):
    """A dataset as JSONL, a line at a time (bytes), in one read transaction."""
    conn = db.connect()
    try:
        conn.execute("BEGIN")
        sql, params = which.conversations(conn, index)
        last = 0
        while True:
            batch = dicts(conn.execute(sql, (last, *params)))
            if not batch:
                break
            prompts = dict(conn.execute(
                "SELECT id, system_prompt FROM projects WHERE id IN (SELECT value FROM "
                "json_each(?))", (JSON.encode([c["project_id"] for c in batch
                                               if c["project_id"]]),)))
            for conversation in batch:
                conversation["project_prompt"] = prompts.get(conversation["project_id"])
                branch = dicts(conn.execute(DATASET_BRANCH, (conversation["id"], WHOLE_PATH)))
                for line in dataset_lines(conn, form, conversation, branch, which):
                    yield DATASET_JSON.encode(line).encode() + b"\n"
            last = batch[-1]["id"]
    finally:
        conn.close()


###############################################################################
# llama.cpp client
###############################################################################

class TLSConnection(http.client.HTTPConnection):
    """HTTPS to llama.cpp, verified against the system's certificates."""
    default_port = 443

    def connect(self):
        super().connect()
        import ssl
        self.sock = ssl.create_default_context().wrap_socket(self.sock,
                                                             server_hostname=self.host)


class Media:
    """An attachment's bytes in a request to llama.cpp, as a base64 string
    (after `prefix`: "data:image/png;base64," or nothing): request_json
    writes it in as base64 bytes, never through JSON's escaping, and str()
    is that string for whoever shows the request."""
    __slots__ = ("prefix", "data")

    def __init__(self, prefix, data):
        self.prefix, self.data = prefix, data

    def __str__(self):
        return self.prefix + base64.b64encode(self.data).decode()


def request_json(body):
    """A request's body as JSON: bytes, or where it carries Media, a list of
    bytes (the JSON around each medium, and the medium's base64: a 5 MB
    photo is neither escaped nor copied into one string)."""
    media, mark = [], secrets.token_hex(8)     # a mark no text of the request holds

    def placeholder(value):
        if not isinstance(value, Media):
            raise TypeError(f"{type(value).__name__} is not JSON")
        media.append(value)
        return f"{mark}{len(media) - 1}"
    text = json.dumps(body, default=placeholder)
    if not media:
        return text.encode()
    first, *rest = text.split(f'"{mark}')
    out = [first.encode()]
    for piece in rest:                       # "N" then the JSON after the medium
        number, after = piece.split('"', 1)
        medium = media[int(number)]
        out += [b'"' + medium.prefix.encode(), base64.b64encode(medium.data),
                b'"' + after.encode()]
    return out


def json_or_none(raw):
    try:
        return json.loads(raw)
    except ValueError:          # UnicodeDecodeError included
        return None


IDLE_UPSTREAM_CONNECTIONS = 4
CONTEXT_SECONDS = 60


# What a chat template adds to each message at least (its role's markers:
# some 4 to 7 tokens in ChatML's and Llama 3's templates; measured for each
# model where llama-server can: message_overhead).
MESSAGE_OVERHEAD = 8


class Upstream:
    """llama-server over HTTP: no proxy, no redirects, separate connect and
    read timeouts. `name`: its connection's ("default": llamacpp_url)."""

    def __init__(self, settings, name="default", url=None, api_key=None):
        self.name = name
        self.url = url or settings.llamacpp_url
        parts = urllib.parse.urlsplit(self.url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.base = parts.path.rstrip("/")
        self.connect_timeout = settings.timeouts["llamacpp_connect_timeout"]
        self.read_timeout = settings.timeouts["llamacpp_timeout"]
        # llama.cpp reads the whole prompt before its first token: minutes on a
        # Pi. That wait has a limit of its own (the wait between tokens is
        # read_timeout); where it is not set, it is read_timeout.
        self.first_token_timeout = max(settings.timeouts.get("first_token_timeout", 0),
                                       self.read_timeout)
        self.headers = {"Accept": "application/json", "User-Agent": "llama-chat/" + __version__}
        key = settings.llamacpp_api_key if api_key is None else api_key
        if key:
            self.headers["Authorization"] = "Bearer " + key
        self._idle = []          # connections kept open for the next request
        self._contexts = {}      # model -> (n_ctx or None, when asked)
        self._listed = None      # the model list as last seen
        self._launch_contexts = {}   # router model -> the -c it is started with
        self._counted = {}       # (model, text) -> tokens, for texts counted each chat
        self.slots = None        # llama-server's total_slots, as /props last said
        self._takes = {}         # model -> what it takes beside text, as /props said
        self._overheads = {}     # model -> its template's tokens a message (message_overhead)

    def open(self, method, path, body=None, connect_timeout=None, read_timeout=None,
             attach=None):
        """Send a request; return (connection, response). Raises ApiError.
        `attach` is given the connection once the request is out. A connection
        kept from an earlier answer goes first (no connect, and
        no new thread in llama-server), unless llama.cpp has closed it (seen
        before use); one that fails before any answer all the same (closed as
        the request went out) is replaced and the request sent again."""
        while True:
            conn = self._kept()
            reused = conn is not None
            try:
                conn = self._send(conn, method, path, body, connect_timeout, read_timeout)
                if attach is not None:       # sent: from now on it may be cut short
                    attach(conn)
                return conn, conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                if conn is not None:
                    conn.close()
                if not reused:
                    raise upstream_error(e, self.url) from None
            except BaseException as e:
                if conn is not None:
                    conn.close()
                raise upstream_error(e, self.url) from None

    def send(self, method, path, body=None):
        """Send a request on a new connection and return it: the answer is read
        later, with answer(). Raises ApiError."""
        try:
            return self._send(None, method, path, body)
        except BaseException as e:
            raise upstream_error(e, self.url) from None

    def answer(self, conn):
        """The response to what send() sent, once its headers are in. Raises ApiError."""
        try:
            return conn.getresponse()
        except BaseException as e:
            conn.close()
            raise upstream_error(e, self.url) from None

    def _send(self, conn, method, path, body, connect_timeout=None, read_timeout=None):
        """`body`: JSON-able, or bytes sent as they are (a client's, relayed)."""
        headers = dict(self.headers)
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else request_json(body)
            headers["Content-Type"] = "application/json"
            if isinstance(data, list):
                headers["Content-Length"] = str(sum(map(len, data)))
        if conn is None:
            cls = TLSConnection if self.https else http.client.HTTPConnection
            conn = cls(self.host, self.port, timeout=connect_timeout or self.connect_timeout)
        try:
            if conn.sock is None:
                conn.connect()
            conn.sock.settimeout(read_timeout or self.read_timeout)
            conn.request(method, self.base + path, body=data, headers=headers)
            return conn
        except BaseException:
            conn.close()
            raise

    def _kept(self):
        """A kept connection that llama.cpp has not closed (a closed one reads
        as ready: its end of file), or None."""
        while self._idle:
            try:
                conn = self._idle.pop()                  # pop: atomic
            except IndexError:
                return None
            with selectors.DefaultSelector() as ready:
                ready.register(conn.sock, selectors.EVENT_READ)
                if not ready.select(0):
                    return conn
            conn.close()
        return None

    def done_with(self, conn, resp):
        """Keep a connection whose answer was read to its end for the next request."""
        if resp.isclosed() and not resp.will_close and conn.sock is not None \
                and len(self._idle) < IDLE_UPSTREAM_CONNECTIONS:
            self._idle.append(conn)
        else:
            conn.close()

    def call(self, method, path, body=None, connect_timeout=None, read_timeout=None):
        """A whole request: (status, parsed JSON or None)."""
        conn, resp = self.open(method, path, body, connect_timeout, read_timeout)
        try:
            raw = resp.read()
        except BaseException as e:
            conn.close()
            raise upstream_error(e, self.url) from None
        self.done_with(conn, resp)
        return resp.status, json_or_none(raw)

    def health(self):
        """Does llama.cpp answer? `state`: ok, loading (a model, 503), error (it
        answered another error) or down (no answer); how to start it."""
        started = time.monotonic()
        try:
            status, body = self.call("GET", "/health", connect_timeout=2, read_timeout=3)
            error = None if status == 200 else f"llama.cpp answered {status}: {error_text(body)}"
            state = "ok" if status == 200 else "loading" if status == 503 and \
                "loading" in error_text(body).lower() else "error"
            if state == "ok":
                error = self.key_refused()
                state = "error" if error else state
        except ApiError as e:
            state, error = "down", e.extra.get("details", e.message)
        result = {"ok": state == "ok", "state": state, "url": self.url,
                  "latency_ms": round((time.monotonic() - started) * 1000, 1),
                  "start_hint": self.start_hint()}
        if error:
            result["error"] = error
        return result

    def key_refused(self):
        """llama-server answers /health without its key: ask a route that needs
        it, so that health does not say ok while every chat fails with 401.
        Why the key is refused, or None."""
        status, body = self.call("GET", "/v1/models", connect_timeout=2, read_timeout=5)
        if status not in (401, 403):
            return None
        given = "the key given with --llamacpp-api-key is not one it takes" if \
            "Authorization" in self.headers else "it needs a key: give it with " \
            "--llamacpp-api-key or LLAMACPP_API_KEY"
        return f"llama.cpp refused llama-chat ({status}: {error_text(body)}): {given}"

    def start_hint(self):
        """The llama-server command that would answer at the configured URL."""
        host = "" if is_loopback(self.host) else f" --host {self.host}"
        return f"llama-server -m model.gguf{host} --port {self.port}"

    def models(self):
        """[{"name", "status"?}] from /models (router mode) or /v1/models."""
        wait = min(30, self.read_timeout)
        status, body = self.call("GET", "/models", read_timeout=wait)
        if status == 404:
            status, body = self.call("GET", "/v1/models", read_timeout=wait)
        if status != 200:
            raise upstream_status_error(status, body)
        entries = body.get("data") if isinstance(body, dict) else None
        if not isinstance(entries, list):
            raise bad_upstream("its model list has no 'data' array")
        models = []
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                continue
            state = entry.get("status")
            failure = state.get("failed") and state.get("exit_code") \
                if isinstance(state, dict) else None
            if isinstance(state, dict):
                state = state.get("value")
            if state is None:               # a single model: llama-server names its file
                models.append({"name": os.path.basename(entry["id"]) if entry["id"].endswith(
                    ".gguf") else entry["id"]})
            else:
                models.append({"name": entry["id"], "status": str(state)})
                if failure is not None:
                    models[-1]["exit_code"] = failure
                n_ctx = launch_context(entry["status"].get("args")
                                       if isinstance(entry["status"], dict) else None)
                if n_ctx:
                    self._launch_contexts[entry["id"]] = n_ctx
            architecture = entry.get("architecture")
            said = architecture.get("input_modalities") if isinstance(architecture, dict) \
                else None
            if isinstance(said, list):      # a router's: known before the model loads
                self._takes.setdefault(entry["id"], frozenset(
                    kind for kind in ("image", "audio") if kind in said))
        if models != self._listed:           # a model loaded, unloaded or swapped:
            self._contexts.clear()           # its context may be another now
            self._overheads.clear()
            self._listed = models
        return models

    def optional(self, path, body):
        """POST to an endpoint llama-server may lack (its version, its build):
        the parsed answer, or None when it is missing or fails."""
        try:
            status, answer = self.call("POST", path, body, read_timeout=30)
        except ApiError:
            return None
        return answer if status == 200 and isinstance(answer, dict) else None

    def input_tokens(self, body):
        """How many tokens llama.cpp counts in a chat request, its template
        included (/v1/chat/completions/input_tokens), or None."""
        answer = self.optional("/v1/chat/completions/input_tokens", body)
        count = answer.get("input_tokens") if answer else None
        return count if isinstance(count, int) and not isinstance(count, bool) else None

    def templated(self, messages, model=None):
        """The chat as the model's template writes it (/apply-template), or None."""
        answer = self.optional("/apply-template", {"messages": messages,
                                                   **({"model": model} if model else {})})
        prompt = answer.get("prompt") if answer else None
        return prompt if isinstance(prompt, str) else None

    def token_count(self, text, model=None):
        """The tokens llama.cpp makes of a text (/tokenize), or None. Texts
        counted again and again (system prompts) are remembered."""
        key = (model, text)
        if key in self._counted:
            return self._counted[key]
        answer = self.optional("/tokenize", {"content": text, **({"model": model} if model
                                                                 else {})})
        tokens = answer.get("tokens") if answer else None
        count = len(tokens) if isinstance(tokens, list) else None
        if count is not None and len(text) < 20_000:
            if len(self._counted) >= 64:
                self._counted.clear()
            self._counted[key] = count
        return count

    def message_overhead(self, model=None):
        """What the model's chat template adds to each message, in tokens:
        measured once (a question and a reply templated, /apply-template, less
        their own tokens, a message's share rounded up, and one more), at
        least MESSAGE_OVERHEAD (also where it cannot be measured). Gemma 3's
        adds 14: counted as 8, a full context passed n_ctx, and llama.cpp
        cut the prompt's beginning itself."""
        if model not in self._overheads:
            found = MESSAGE_OVERHEAD
            pair = [{"role": "user", "content": "Hello there"},
                    {"role": "assistant", "content": "Hi"}]
            templated = self.templated(pair, model)
            whole = self.token_count(templated, model) if templated else None
            parts = [self.token_count(m["content"], model) for m in pair]
            if whole is not None and None not in parts:
                found = max(MESSAGE_OVERHEAD, -(-(whole - sum(parts)) // 2) + 1)
            self._overheads[model] = found
        return self._overheads[model]

    def context_of(self, model=None):
        """context_size(), asked again when the model list changes (models()
        forgets them) and at least every CONTEXT_SECONDS (a llama-server
        restarted with another -c lists the same model)."""
        now = time.monotonic()
        found = self._contexts.get(model)
        if found is None or now - found[1] > CONTEXT_SECONDS:
            found = self._contexts[model] = (self.context_size(model), now)
        return found[0]

    def context_size(self, model=None):
        """The model's context in tokens (n_ctx of /props, per slot), or None.
        In router mode /props of a model not loaded would load it: asked with
        autoload=false, its context is then read from the arguments it is
        started with (-c, as /models lists them), where they say it."""
        try:
            status, body = self.call("GET", props_path(model), read_timeout=30)
            if status == 200:
                self.props_read(model, body)
            n_ctx = body["default_generation_settings"]["n_ctx"] if status == 200 else None
        except (ApiError, KeyError, TypeError, AttributeError):
            n_ctx = None
        if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and n_ctx > 0:
            return n_ctx
        return self._launch_contexts.get(model)

    def props_read(self, model, body):
        """What /props tells beside a model's settings, noted whoever read it:
        its slots, and what the model takes beside text (`modalities`)."""
        slots = body.get("total_slots") if isinstance(body, dict) else None
        if isinstance(slots, int) and not isinstance(slots, bool) and slots > 0:
            self.slots = slots
        said = body.get("modalities") if isinstance(body, dict) else None
        if isinstance(said, dict):
            self._takes[model] = frozenset(
                kind for kind, name in (("image", "vision"), ("audio", "audio"))
                if said.get(name) is True)

    def known_context(self, model):
        """A model's context as already known (a router's -c; /props read): no request."""
        found = self._contexts.get(model)
        return (found[0] if found else None) or self._launch_contexts.get(model)

    def takes(self, model=None):
        """What a model takes beside text ("image", "audio"), as llama-server's
        /props `modalities` said when last read; None when it has not said."""
        return self._takes.get(model)

    def defaults(self, model=None):
        """llama-server's own sampling defaults (GET /props; in router mode, of
        one model, and only if it is loaded), under the names of
        model_options; {} where it has none."""
        status, body = self.call("GET", props_path(model), read_timeout=30)
        if status != 200:
            raise upstream_status_error(status, body)
        self.props_read(model, body)
        try:
            params = body["default_generation_settings"]["params"]
        except (KeyError, TypeError):
            return {}
        found = {}
        for name, theirs in PROPS_NAMES.items():
            value = params.get(theirs) if isinstance(params, dict) else None
            if isinstance(value, float):
                value = round(value, 4)              # float32 noise: 0.800000011920929
            if isinstance(value, (int, float, list)) and not isinstance(value, bool):
                found[name] = value
        return found


def props_path(model):
    """/props, of one model in router mode: never loading it to answer."""
    return "/props" + (f"?model={urllib.parse.quote(model)}&autoload=false" if model else "")


def launch_context(args):
    """The context size in a router model's arguments (-c N, --ctx-size N), or None."""
    if not isinstance(args, list):
        return None
    for flag, value in zip(args, args[1:]):
        if flag in ("-c", "--ctx-size") and isinstance(value, str):
            n = ascii_number(value, 9)
            return n if n else None
    return None


# Several llama.cpp servers: each one's model list kept and asked again in
# the background, so that neither a chat's way to its model nor the page's
# list ever waits on a server that is slow or gone.
MODEL_LIST_SECONDS = 30      # a list older than this is asked again when it is used
MODEL_LIST_WAIT = 2.0        # the most the first /api/models waits for lists never read
MODEL_LIST_SLOW_MS = 1000    # a server that took longer (or timed out) is not waited for
MODEL_WATCH_SECONDS = 1.0    # how often a router is asked while a model of it loads
MODEL_WATCH_MOST = 900       # ... for at most this long


class Connections:
    """Every llama.cpp server llama-chat reaches: the first ("default") is
    llamacpp_url, the one llama-chat may start; the others config.json's
    `connections`. A model goes to the first that lists it; a model no list
    names (or none: the server's own) to the default. `changed` is called
    when a list changes (a model loaded, a server gone or back)."""

    def __init__(self, settings, changed=None):
        self.all = [Upstream(settings)] + [
            Upstream(settings, c["name"], c["url"], c.get("api_key", ""))
            for c in settings.connections]
        self.default = self.all[0]
        self.changed = changed or (lambda: None)
        self.lock = threading.Lock()
        self.known = {u.name: {"models": None, "state": "unknown", "error": None,
                               "failure": None, "latency_ms": None, "at": 0.0}
                      for u in self.all}
        self.asking = {}               # name -> the thread asking it now
        self.watching = set()          # names of routers watched while a model loads

    def named(self, name):
        return next((u for u in self.all if u.name == name), None)

    def for_model(self, model):
        """The connection that serves `model` (the first that lists it), else
        the default. Lists older than MODEL_LIST_SECONDS are asked again
        meanwhile, without waiting for them."""
        if len(self.all) == 1:
            return self.default
        self.refresh()
        if model:
            for u in self.all:
                listed = self.known[u.name]["models"]
                if listed and any(m["name"] == model for m in listed):
                    return u
        return self.default

    def refresh(self, wait=0.0, force=False):
        """Ask again each list older than MODEL_LIST_SECONDS (force: every
        one not being asked now), each in a thread of its own; wait up to
        `wait` seconds for those this call asked, but for a server slow to
        answer the last time (MODEL_LIST_SLOW_MS: a timeout, a machine that
        drops packets) or still not answering an earlier ask: its list stays
        as it was until it answers. One that refused at once is waited for:
        it may be up now."""
        now = time.monotonic()
        with self.lock:
            started = []
            for u in self.all:
                if u.name in self.asking or (
                        not force and now - self.known[u.name]["at"] < MODEL_LIST_SECONDS):
                    continue
                thread = threading.Thread(target=self.ask, args=(u,), daemon=True,
                                          name=f"models of {u.name}")
                self.asking[u.name] = thread
                started.append((u, thread))
        for _, thread in started:
            thread.start()
        ends = time.monotonic() + wait
        for u, thread in started:
            took = self.known[u.name]["latency_ms"]
            if took is None or took < MODEL_LIST_SLOW_MS:
                thread.join(max(0.0, ends - time.monotonic()))

    def ask(self, u):
        """Read one connection's model list (in its own thread)."""
        started = time.monotonic()
        try:
            models, state, error = u.models(), "ok", None
        except ApiError as e:              # no answer (down), or an error answered
            models, error, failure = None, e.extra.get("details", e.message), e
            state = "error" if "upstream_status" in e.extra else "down"
        else:
            failure = None
        with self.lock:
            before = self.known[u.name]
            after = {"models": models if models is not None else before["models"],
                     "state": state, "error": error, "failure": failure, "at": time.monotonic(),
                     "latency_ms": round((time.monotonic() - started) * 1000, 1)}
            self.known[u.name] = after
            self.asking.pop(u.name, None)
        if (before["models"], before["state"]) != (after["models"], after["state"]):
            self.changed()

    def models(self):
        """Every connection's models, the first connection's of a name only:
        {name, connection, available, status?, n_ctx?, input_modalities?}."""
        found, seen = [], set()
        for u in self.all:
            known = self.known[u.name]
            for m in known["models"] or ():
                if m["name"] in seen:
                    continue
                seen.add(m["name"])
                entry = {**m, "connection": u.name, "available": known["state"] == "ok"}
                n_ctx = u.known_context(m["name"])
                if n_ctx:
                    entry["n_ctx"] = n_ctx
                takes = u.takes(m["name"])
                if takes is not None:
                    entry["input_modalities"] = ["text", *sorted(takes)]
                found.append(entry)
        return found

    def status_of(self, model):
        """A model's status on its router as last listed ("loaded",
        "unloaded", "loading", "sleeping"...), else None."""
        u = self.for_model(model) if model else None
        listed = self.known[u.name]["models"] if u else None
        return next((m.get("status") for m in listed or () if m["name"] == model), None)

    def states(self):
        """Each connection's state as last read: {name, url, state, latency_ms, models, error?}."""
        return [{"name": u.name, "url": u.url, "state": self.known[u.name]["state"],
                 "latency_ms": self.known[u.name]["latency_ms"],
                 "models": len(self.known[u.name]["models"] or ()),
                 **({"error": self.known[u.name]["error"]} if self.known[u.name]["error"]
                    else {})} for u in self.all]

    def watch(self, u):
        """Ask a router's list every MODEL_WATCH_SECONDS while a model of it
        is loading (after a load or unload is asked), so every page hears
        when it is ready or failed."""
        with self.lock:
            if u.name in self.watching:
                return
            self.watching.add(u.name)

        def watching():
            try:
                ends = time.monotonic() + MODEL_WATCH_MOST
                while time.monotonic() < ends:
                    time.sleep(MODEL_WATCH_SECONDS)
                    self.ask(u)
                    listed = self.known[u.name]["models"] or ()
                    if not any(m.get("status") in ("loading", "unloading") for m in listed):
                        return
            finally:
                with self.lock:
                    self.watching.discard(u.name)
        threading.Thread(target=watching, daemon=True, name=f"watching {u.name}").start()


# model_options names -> llama-server's /props names
PROPS_NAMES = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
               "min_p": "min_p", "num_predict": "n_predict", "repeat_penalty": "repeat_penalty",
               "seed": "seed", "stop": "stop", "presence_penalty": "presence_penalty",
               "frequency_penalty": "frequency_penalty"}


AUDIO_FORMATS = {"audio/wav": "wav", "audio/mpeg": "mp3"}


def message_parts(m, takes=None, left_out=None, media=str):
    """A user message with attachments as the content list llama.cpp's web UI
    sends: each text file, then each image and audio file the model takes
    (takes None: unknown, all; the others' ids go into left_out), then the
    typed text; media(Media) is how an image or sound is written (str: as
    its base64 text; as it is: for request_json). A message without
    attachments: its text."""
    attachments = m.get("attachments") or ()
    if not attachments:
        return m["content"]
    parts = []
    for kind in ("text", "image", "audio"):
        for a in attachments:
            if a["kind"] != kind:
                continue
            if kind != "text" and takes is not None and kind not in takes:
                if left_out is not None and a["id"] not in left_out:
                    left_out.append(a["id"])
                continue
            data = bytes(a["data"])
            if kind == "text":
                parts.append({"type": "text", "text": f"--- File: {a['name']} ---\n"
                              + data.decode("utf-8", "replace").lstrip("\ufeff")})
            elif kind == "image":
                parts.append({"type": "image_url", "image_url": {
                    "url": media(Media(f"data:{a['type']};base64,", data))}})
            else:
                parts.append({"type": "input_audio", "input_audio": {
                    "data": media(Media("", data)),
                    "format": AUDIO_FORMATS.get(a["type"], "wav")}})
    if m["content"]:
        parts.append({"type": "text", "text": m["content"]})
    return parts


def joined(first, second):
    """Two turns' contents as one (text, or a content list if either is one)."""
    if isinstance(first, str) and isinstance(second, str):
        return first + "\n\n" + second
    as_parts = [c if isinstance(c, list) else [{"type": "text", "text": c}]
                for c in (first, second)]
    return as_parts[0] + as_parts[1]


def context_messages(system_prompt, history, takes=None, left_out=None, media=str):
    """The messages llama.cpp sees: system prompt, then history with roles
    alternating and starting with the user (chat templates such as Gemma's
    refuse anything else; a failed turn leaves two user messages in a row).
    Tool calls, their results and system messages (a conversation recorded
    from /v1 has them) go as they came. media: as message_parts takes it."""
    turns = []
    for m in history:
        if not turns and m["role"] != "user":
            continue
        plain = m["role"] in ("user", "assistant") and not m.get("tool_calls")
        content = message_parts(m, takes, left_out, media) if m["role"] == "user" \
            else m["content"]
        if plain and turns and turns[-1]["role"] == m["role"] and "tool_calls" not in turns[-1]:
            turns[-1]["content"] = joined(turns[-1]["content"], content)
            continue
        turn = {"role": m["role"], "content": content}
        if m.get("tool_calls"):
            turn["tool_calls"] = json.loads(m["tool_calls"])
        if m.get("tool_call_id") is not None:
            turn["tool_call_id"] = m["tool_call_id"]
        turns.append(turn)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + turns


def estimate_tokens(text):
    return max(1, round(len(text) / 4)) if text else 0


def reply_timings(timings, ttft_ms=None):
    """llama.cpp's timings of a reply (and its time to first token) as the
    columns that keep them; a value of the wrong type is left out."""
    timings = timings if isinstance(timings, dict) else {}
    found = {}
    for name, kind in TIMING_COLUMNS.items():
        value = ttft_ms if name == "ttft_ms" else timings.get(name)
        ok = (int,) if kind == "INTEGER" else (int, float)
        found[name] = value if isinstance(value, ok) and not isinstance(value, bool) \
            and value >= 0 else None
    return found


def read_metrics(usage, timings, text, elapsed_ms):
    """Token counts from usage, else timings, else an estimate from the text."""
    usage = usage if isinstance(usage, dict) else {}
    timings = timings if isinstance(timings, dict) else {}

    def count(*values):
        return next((v for v in values if isinstance(v, int) and not isinstance(v, bool)), None)

    completion = count(usage.get("completion_tokens"), timings.get("predicted_n"))
    prompt = count(usage.get("prompt_tokens"), timings.get("prompt_n"))
    estimated = completion if completion is not None else estimate_tokens(text)
    total = count(usage.get("total_tokens"))
    if total is None and prompt is not None:
        total = prompt + estimated
    speed = timings.get("predicted_per_second")
    if not isinstance(speed, (int, float)) or isinstance(speed, bool):
        speed = estimated / (elapsed_ms / 1000) if elapsed_ms > 0 and estimated else None
    return {
        "completion_tokens": estimated,
        "prompt_tokens": prompt,
        "total_tokens": total,
        "tokens_per_second": round(speed, 1) if speed is not None else None,
    }


###############################################################################
# llama-server found, or started and kept running
###############################################################################


NEW_DEFAULT_PORT = 9931          # llama-server's default port in newer llama.cpp


def answers_as_llamacpp(port, timeout=0.5):
    """Does something on this loopback port answer /health as llama-server does?"""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("GET", "/health")
        resp = conn.getresponse()
        body = json_or_none(resp.read(4096))
        conn.close()
    except (OSError, http.client.HTTPException):
        return False
    return isinstance(body, dict) and ("status" in body or "error" in body)


def discover_llamacpp(settings, ports=(8080, NEW_DEFAULT_PORT)):
    """With llama.cpp's URL left at its default: when nothing answers there
    but llama-server answers on its newer default port, use that one."""
    if settings.llamacpp_url != DEFAULT_CONFIG["llamacpp_url"] or settings.llama_server:
        return settings
    usual, newer = ports
    if answers_as_llamacpp(usual) or not answers_as_llamacpp(newer):
        return settings
    log.info("nothing answers on port %d, but llama-server does on %d (its newer default): "
             "using http://127.0.0.1:%d", usual, newer, newer)
    return replace(settings, llamacpp_url=f"http://127.0.0.1:{newer}")


def free_loopback_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# llama-server's own flags whose value is a secret: never shown or printed.
SECRET_FLAGS = ("--api-key", "--api-key-file", "--hf-token", "-hft", "--ssl-key-file")
LOG_LIMIT = 10 * 2**20       # the started llama-server's log: rotated to .1 past this size


def shown_command(command):
    """A command line as it may be shown: the values of SECRET_FLAGS hidden."""
    shown, hide = [], False
    for word in command:
        name, equals, _ = word.partition("=")
        if hide:
            shown.append("***")
        elif equals and name in SECRET_FLAGS:
            shown.append(name + "=***")
        else:
            shown.append(word)
        hide = not hide and word in SECRET_FLAGS
    return " ".join(shown)


def linux_libc():
    """The C library, where prctl can tie a child's life to ours (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return None


def die_with_parent(libc, parent):
    """In a child between fork and exec: the kernel sends it SIGKILL when the
    thread that started it ends, kill -9 of llama-chat included (if llama-chat
    is gone already, the child goes at once). Without libc (not Linux),
    nothing: the pid file stands in."""
    if libc is not None:
        libc.prctl(1, signal.SIGKILL)               # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)


def command_of(pid):
    """The command line of process pid, as words, or None if it is not there."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [w.decode(errors="replace") for w in f.read().split(b"\0") if w]
    except FileNotFoundError:
        return None
    except OSError:
        pass
    import subprocess
    try:
        out = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True,
                             text=True, timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


class ManagedLlamaServer:
    """llama-server as llama-chat's child (--llama-server): started on its
    loopback port, started again with a back-off (1 s, doubling to 30 s;
    again 1 s after a minute of running) whenever it exits, its output
    relayed into a log file beside the database (0600, rotated past
    LOG_LIMIT), and stopped with llama-chat (SIGTERM, then SIGKILL after
    5 s). It dies with llama-chat even when llama-chat is killed: on Linux by
    the kernel (die_with_parent), elsewhere the next start stops the one
    its pid file names, if that process still runs the same program.
    llama-chat never touches a process it did not start."""

    def __init__(self, settings):
        port = urllib.parse.urlsplit(settings.llamacpp_url).port
        model = ["-m", settings.llama_model] if settings.llama_model else \
            ["--models-dir", settings.llama_models_dir]
        self.command = [settings.llama_server, *model, "--host", "127.0.0.1",
                        "--port", str(port), *settings.llama_args]
        self.log_path = os.path.abspath(settings.db) + ".llama-server.log"
        self.pid_path = os.path.abspath(settings.db) + ".llama-server.pid"
        self.proc, self.restarts, self.stopping = None, 0, threading.Event()
        self.last_exit, self.last_line = None, ""
        self._lock = threading.Lock()
        self._libc = linux_libc()

    def start(self):
        self.stop_orphan()
        self._spawn()
        log.info("started llama-server (pid %d): %s; its output goes to %s", self.proc.pid,
                 shown_command(self.command), self.log_path)
        threading.Thread(target=self._watch, daemon=True).start()

    def stop_orphan(self):
        """The llama-server a llama-chat that was killed left running, if its
        pid file names a process that still runs this same program."""
        try:
            with open(self.pid_path) as f:
                pid = ascii_number(f.read().strip())
        except OSError:
            return
        words = command_of(pid) if pid else None
        if words and os.path.basename(words[0]) == os.path.basename(self.command[0]) \
                and pid != os.getpid():
            log.warning("stopping llama-server (pid %d), left running by a llama-chat "
                        "that was stopped without stopping it", pid)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
                for _ in range(50):
                    time.sleep(0.1)
                    os.kill(pid, 0)
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.remove(self.pid_path)

    def _spawn(self):
        import subprocess
        with self._lock:
            self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=functools.partial(
                                             die_with_parent, self._libc, os.getpid()))
            self.started = time.monotonic()
        private_file(self.pid_path)
        with open(self.pid_path, "w") as f:
            f.write(f"{self.proc.pid}\n")
        threading.Thread(target=self._keep_log, args=(self.proc.stdout,), daemon=True).start()

    def _keep_log(self, output):
        """Relay the child's output into the log, rotating it past LOG_LIMIT."""
        private_file(self.log_path)
        out = open(self.log_path, "ab")
        try:
            for line in output:
                if line.strip():
                    self.last_line = line.decode(errors="replace").strip()[:500]
                if out.tell() + len(line) > LOG_LIMIT:
                    out.close()
                    os.replace(self.log_path, self.log_path + ".1")
                    private_file(self.log_path)
                    out = open(self.log_path, "ab")
                out.write(line)
                out.flush()
        except (OSError, ValueError) as e:
            log.warning("llama-server's log could not be written: %s", e)
        finally:
            out.close()
            output.close()

    def _watch(self):
        delay = 1
        while not self.stopping.is_set():
            code = self.proc.wait()
            if self.stopping.is_set():
                return
            self.last_exit = code
            delay = 1 if time.monotonic() - self.started > 60 else delay
            log.warning("llama-server exited (status %s: %s); starting it again in %d s "
                        "(see %s)", code, self.last_line or "it printed nothing", delay,
                        self.log_path)
            if self.stopping.wait(delay):
                return
            try:
                self._spawn()
            except OSError as e:
                log.error("llama-server cannot be started again: %s", e)
                return
            self.restarts += 1
            delay = min(delay * 2, 30)

    def stop(self):
        self.stopping.set()
        with self._lock:
            proc = self.proc
        if proc is None or proc.poll() is not None:
            self._forget()
            return
        proc.terminate()
        try:
            proc.wait(5)
        except Exception:                   # subprocess.TimeoutExpired
            proc.kill()
            proc.wait()
        self._forget()
        log.info("stopped llama-server (pid %d)", proc.pid)

    def _forget(self):
        with contextlib.suppress(OSError):
            os.remove(self.pid_path)

    def as_dict(self):
        alive = self.proc is not None and self.proc.poll() is None
        return {"pid": self.proc.pid if alive else None, "running": alive,
                "restarts": self.restarts, "log": self.log_path,
                "command": shown_command(self.command), "last_exit": self.last_exit,
                "last_log_line": self.last_line}


###############################################################################
# Engine: the replies being made, titles and upkeep, for every adapter
###############################################################################


def shut(sock):
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Generation:
    """One reply llama.cpp is generating, plain or streamed, for another thread
    to cut short: shutdown, or the deletion of its conversation or of the
    messages it `depends_on`. Shutting its socket wakes the reply wherever it
    waits; `reason` says why, for the client. `client` is the socket of the
    client that asked for a stream."""

    message_id = None        # the reply's row, for one the server owns (OwnedReply)

    def __init__(self, conversation_id, client=None, depends_on=()):
        self.conversation_id, self.client = conversation_id, client
        self.depends_on = frozenset(depends_on)
        self.conn = self.reason = None
        self._lock = threading.Lock()

    def attach(self, conn):
        with self._lock:
            self.conn = conn
            if self.reason is not None:
                shut(conn.sock)

    def cancel(self, reason):
        with self._lock:
            self.reason = self.reason or reason
            if self.conn is not None:
                shut(self.conn.sock)

    def close(self):
        with self._lock:
            if self.conn is not None:
                shut(self.conn.sock)
                self.conn.close()


TURN_POLL_SECONDS = 0.02     # how often a chat asks for a turn another process has


class Turns:
    """Chats into one conversation that go under what it shows (a question
    with no parent_id, a continue) take turns in the order they came: each
    begins once the one before has stored its reply, so that questions sent
    at once (two tabs, two devices, a script's batch) read Q1 A1 Q2 A2 on the
    shown branch, and continues of one reply do not interleave. Chats of
    other processes on the same file take turns with these (turn_lock).
    `database`: hold_presence's key of the file."""

    def __init__(self, database):
        self.database = database
        self._changed = threading.Condition()
        self._queues = {}            # conversation id -> [tickets given, tickets done]

    def take(self, conversation_id):
        """Wait for this conversation's turn: the function that ends it."""
        with self._changed:
            queue = self._queues.setdefault(conversation_id, [0, 0])
            ticket = queue[0]
            queue[0] += 1
            while queue[1] != ticket:
                self._changed.wait()
        while not turn_lock(self.database, conversation_id):   # another process's turn
            time.sleep(TURN_POLL_SECONDS)
        ended = []

        def end():
            with self._changed:
                if ended:
                    return
                ended.append(True)
                turn_lock(self.database, conversation_id, take=False)
                queue[1] += 1
                if queue[1] == queue[0]:
                    del self._queues[conversation_id]
                self._changed.notify_all()
        return end


TITLE_MAX = 60
UNTITLED = "New chat"
TITLE_PROMPT = ("Write a title of at most six words for the conversation below, in its "
                "language. Answer with the title alone: no quotes, no punctuation at the end.")


def first_line_title(text):
    """A conversation's title from its first question: the first line, at
    most TITLE_MAX characters, cut at a word."""
    line = next((l.strip() for l in text.splitlines() if l.strip()), "")
    line = " ".join(line.split())
    if len(line) <= TITLE_MAX:
        return line or UNTITLED
    cut = line[:TITLE_MAX - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > TITLE_MAX // 2 else cut).rstrip(" ,.;:") + "…"


FOLLOWER_BATCHES = 1000      # batches a follower may fall behind before it is let go


class Follower:
    """A client following a reply: the batches of (id, event) it has still to
    send, at most FOLLOWER_BATCHES. One that falls further behind is let go:
    its stream ends, and it comes back with Last-Event-ID."""

    def __init__(self):
        self.batches = queue.Queue(FOLLOWER_BATCHES)
        self.let_go = False

    def put(self, batch):
        try:
            self.batches.put_nowait(batch)
            return True
        except queue.Full:
            self.let_go = True
            return False


CHANGES_POLL_SECONDS = 1.0   # how often changes other processes make are looked for


def told(rows):
    """Rows of the changes table as the events /api/events tells: in order,
    each once; nothing of a conversation deleted in the same batch but that."""
    gone = {cid for kind, action, cid, _ in rows if kind == "conversation" and action == "deleted"}
    events = {}
    for kind, action, cid, ident in rows:
        if cid in gone and kind != "conversation":
            continue
        if kind in ("conversation", "project"):
            event = {"type": kind, "action": action, "id": ident}
        elif kind == "models":                 # a model list changed: ask /api/models
            event = {"type": kind, "action": action}
        elif kind == "message":
            event = {"type": kind, "action": action, "conversation_id": cid, "id": ident}
        else:
            event = {"type": kind, "action": action, "conversation_id": cid, "message_id": ident}
        events[(kind, action, cid, ident)] = event
    return list(events.values())


class Changes:
    """What changed in the history (the changes table, which SQLite's
    triggers keep for every writer), told to every listener: read by one
    thread at once after a commit of this process, and every
    CHANGES_POLL_SECONDS when PRAGMA data_version says another process wrote.
    A listener that falls behind is let go (its page listens again)."""

    def __init__(self, db, stopping):
        self.db, self.stopping = db, stopping
        self.listeners = set()
        self._lock = threading.Lock()
        self._reading = False

    def listen(self):
        """A Follower told every change committed from now on."""
        follower = Follower()
        with self._lock:
            if not self._reading:
                conn = self.db.connect()      # where the telling begins: now, not when
                try:                          # the thread first runs on a busy machine
                    last = conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]
                except BaseException:
                    conn.close()
                    raise
                threading.Thread(target=self._read, args=(conn, last), daemon=True,
                                 name="changes").start()
                self._reading = True
            self.listeners.add(follower)
        return follower

    def leave(self, follower):
        with self._lock:
            self.listeners.discard(follower)

    def _read(self, conn, last):
        try:
            version = None
            while not self.stopping.is_set():
                self.db.committed.wait(CHANGES_POLL_SECONDS)
                self.db.committed.clear()
                now = conn.execute("PRAGMA data_version").fetchone()[0]
                if now == version:
                    continue
                version = now
                rows = conn.execute("SELECT seq, kind, action, conversation_id, id FROM changes "
                                    "WHERE seq > ? ORDER BY seq", (last,)).fetchall()
                if not rows:
                    continue
                if rows[-1][0] // CHANGES_KEPT != last // CHANGES_KEPT:
                    with self.db.write(conn) as c:
                        c.execute("DELETE FROM changes WHERE seq <= ?",
                                  (rows[-1][0] - CHANGES_KEPT,))
                last = rows[-1][0]
                events = told([row[1:] for row in rows])
                with self._lock:
                    self.listeners = {f for f in self.listeners if f.put(events)}
        except sqlite3.Error as e:
            log.warning("changes are not told: %s", e)
        finally:
            conn.close()
            with self._lock:
                self._reading = False


# A purge that gave way to a write is tried again once no write came for this long.
PURGE_PAUSE_SECONDS = 5


class Engine:
    """What the page's API, the /v1 relay and the command line share: the
    settings, the store, the llama.cpp client, the replies being made and
    their turns, titles, and the upkeep (the ledger's ranking, the purge of
    deleted text) from start-up to shutdown. The adapters below use it;
    it knows nothing of them."""

    def __init__(self, settings, store=None, connections=None):
        self.settings = settings
        self.store = store or Store(settings.db, open_now=False)
        self.connections = connections or Connections(settings, changed=self.models_changed)
        self.tickets, self.tickets_lock = {}, threading.Lock()   # downloads by ticket
        self.upstream = self.connections.default       # llamacpp_url's: the one it may start
        self.stopping = threading.Event()
        self.ready = threading.Event()     # the store is open: every route answers
        self.older = None                  # OlderHistory, while an older database migrates
        self.meanwhile = None              # the Engine of chats meanwhile (chats_meanwhile)
        self.meanwhile_open = True         # chats go to it (until the migration commits)
        self.startup_error = None          # why opening the store failed, if it did
        self.managed = None                # the llama-server started here, if one was
        self._lock = threading.Lock()
        self.generations = set()       # every reply llama.cpp is making for us
        self.turns = Turns(self.store.presence)   # of chats under what a conversation shows
        self.changes = Changes(self.store.db, self.stopping)   # told to every open page
        self._purge = {"running": False, "again": False}
        self._ranking = threading.Lock()

    def start(self):
        """Open the store: at once when that is quick, else (a migration or an
        index build can take minutes) while the server already answers:
        /api/health with the progress, the rest of /api/ with STARTING."""
        folder, prefix = backup_copies(self.store.db)
        for leftover in glob.glob(os.path.join(folder, glob.escape(prefix) + "*")):
            with contextlib.suppress(OSError):
                os.remove(leftover)
                log.info("removed %s, a backup copy left by a stop mid-download", leftover)
        if self.store.ready or self.store.quick_to_open():
            self._open_store()
        else:
            if not self.store.is_new and self.store.version < READABLE_BEFORE:
                self.older = OlderHistory(self.store.db)   # read meanwhile
                if os.path.exists(meanwhile_path(self.store.db)):   # chats a stop left
                    self._chats_meanwhile()
            threading.Thread(target=self._open_store, daemon=True).start()

    def _open_store(self):
        try:
            if not self.store.ready:
                self.store.open(build_later=True)
            if not self.store.read_only:
                self._merge_meanwhile()
            if self.store.index.purge_due() and not self.store.read_only:
                self.purge_soon()
            self.rank_ledger_soon()
            if self.store.index.unbuilt() and not self.store.read_only:
                threading.Thread(target=self._build_index, daemon=True,
                                 name="search-index").start()
            if os.path.getsize(self.store.db.path) <= self.settings.check_up_to_bytes:
                threading.Thread(target=self._check_store, daemon=True).start()
        except (sqlite3.Error, OSError) as e:
            self.startup_error = str(e)
        except BaseException as e:         # a bug: logged, and the app stops
            log.error("opening the database failed\n%s", traceback.format_exc())
            self.startup_error = f"{type(e).__name__}: {e}"
        finally:
            self.store.release(heavy=True)
            release_memory()             # what a migration's sorts and caches left
            self.ready.set()
            self.older = self.meanwhile = None

    @contextmanager
    def chats_meanwhile(self, making=False):
        """For one request while an older history is migrated: the Engine
        that serves chats meanwhile (its store a Handover of meanwhile_store),
        made by the first request `making` something; None where there is
        none, or, `making`, once the migration has committed (a chat then
        waits for the start's end)."""
        with self._lock:
            if self.meanwhile is None and making and self.meanwhile_open:
                self._chats_meanwhile()
            side = self.meanwhile if self.meanwhile_open or not making else None
        try:
            yield side
        finally:
            if side is not None:
                side.store.release()

    def _chats_meanwhile(self):
        side = self.meanwhile = Engine(self.settings, Handover(meanwhile_store(self.store.db)),
                                       self.connections)
        side.upstream, side.stopping, side.managed = self.upstream, self.stopping, self.managed
        side.turns = self.turns              # a conversation's chats take turns before and after
        side.ready.set()

    def _merge_meanwhile(self):
        """Once the migration has committed: what the chats made meanwhile
        wrote (or a stopped process left) merged into the store, the replies
        still being made going on into it, among this engine's; a chat waits
        for the start's end from now."""
        with self._lock:
            self.meanwhile_open = False
            side = self.meanwhile
        if side is None:
            merge_meanwhile(self.store)
            return
        side.store.hand_to(self.store)
        with side._lock, self._lock:
            self.generations |= side.generations
            side.generations = self.generations
            self.meanwhile = None

    def _build_index(self):
        try:
            self.store.build_index(self.stopping)
        except sqlite3.Error as e:
            log.warning("building the search index failed (the next start goes on): %s", e)
        finally:
            self.store.release(heavy=True)
            release_memory()

    def _check_store(self):
        try:
            damage = self.store.check_integrity()
        except sqlite3.Error as e:
            damage = self.store.damage = str(e)
        release_memory()             # what the check read of the file
        if damage:
            log.error("database %s is damaged: %s. Restore a backup, or try the sqlite3 "
                      "shell's .recover", self.store.db.path, damage)

    def rank_ledger_soon(self):
        """Rank the ledger's days that changed (all of them after a migration,
        an import's), in the background, so that the page need not wait."""
        def rank():
            if self._ranking.acquire(blocking=False):
                try:
                    for group in (("model", "day"), ("day",)):
                        ledger(self.store.db, group, None, None)
                except sqlite3.Error as e:
                    log.warning("ranking the ledger failed: %s", e)
                finally:
                    self._ranking.release()
                    self.store.db.release(heavy=True)
        threading.Thread(target=rank, daemon=True).start()

    def purge_if_due(self):
        """Purge if a write marked text to purge (SEARCH_SCHEMA's triggers do)."""
        if self.store.index.purge_due():
            self.purge_soon()

    def purge_soon(self):
        """Purge deleted text in the background, once for any number of deletes."""
        with self._lock:
            if self._purge["running"]:
                self._purge["again"] = True
                return
            self._purge["running"] = True
        threading.Thread(target=self._purge_loop, daemon=True).start()

    def _purge_loop(self):
        while True:
            try:
                self.store.index.purge(self.stopping)
            except sqlite3.Error as e:
                if "interrupted" not in str(e):
                    log.warning("purging deleted text failed: %s", e)
                else:                       # it gave way to a write: again, once they pause
                    with self._lock:
                        self._purge["again"] = True
                    while time.monotonic() - self.store.db.last_write < PURGE_PAUSE_SECONDS:
                        if self.stopping.wait(0.25):
                            break           # the next start purges (search_purge says so)
            finally:
                self.store.release(heavy=True)
            with self._lock:
                if not self._purge["again"] or self.stopping.is_set():
                    self._purge["running"] = False
                    return
                self._purge["again"] = False

    def upstream_for(self, model):
        """The llama.cpp server that serves `model` (Connections.for_model)."""
        return self.connections.for_model(model)

    def models_changed(self):
        """A model list changed (a model loaded, a server gone or back): every
        open page hears of it (/api/events)."""
        try:
            self.store.note_change("models", "changed")
        except sqlite3.Error as e:           # read-only: the pages ask again themselves
            log.info("a change of the model lists is not told: %s", e)

    def write_title(self, conversation_id, reply, model=None):
        """Title a conversation made without one, after its first reply: by
        its first line, or (auto_title "model") by llama.cpp in the
        background, the first line on any failure. Never fails the chat."""
        question = self.store.first_question(conversation_id) or ""
        fallback = first_line_title(question)
        if self.settings.auto_title != "model":
            self._give_title(conversation_id, fallback)
            return
        threading.Thread(target=self._title_by_model, args=(conversation_id, question, reply,
                                                           fallback, model), daemon=True).start()

    def _title_by_model(self, conversation_id, question, reply, fallback, model=None):
        title = fallback
        try:
            status, body = self.upstream_for(model).call("POST", "/v1/chat/completions", {
                **({"model": model} if model else {}),
                "messages": [{"role": "system", "content": TITLE_PROMPT},
                             {"role": "user", "content": f"{question[:2000]}\n\n---\n\n"
                                                         f"{reply[:1000]}"}],
                "max_tokens": 24, "temperature": 0.2, "stream": False,
                "reasoning_format": "none",
                "chat_template_kwargs": {"enable_thinking": False}}, read_timeout=60)
            if status != 200:
                raise upstream_status_error(status, body)
            text = body["choices"][0]["message"]["content"]
            line = first_line_title(re.sub(r"<think>.*?</think>", "", text, flags=re.S)
                                    .strip().strip("\"'*#").strip())
            if line and line != UNTITLED:
                title = line
        except Exception as e:               # noqa: BLE001 (a title never fails a chat)
            log.info("conversation %d: llama.cpp gave no title (%s); using the first line",
                     conversation_id, e)
        self._give_title(conversation_id, title)
        self.store.release()

    def _give_title(self, conversation_id, title):
        try:
            self.store.title_if_pending(conversation_id, title)
        except sqlite3.Error as e:
            log.warning("conversation %d: its title could not be stored: %s",
                        conversation_id, e)

    def generation_started(self, turn, client=None):
        """A reply a client waits for (/v1's): ended by that client too."""
        return self.admitted(Generation(turn.conversation_id, client, turn.depends_on))

    def admitted(self, generation):
        """Count a reply being made among this server's."""
        with self._lock:
            self.generations.add(generation)
        return generation

    def generation_of(self, message_id):
        """The reply being made by this server as message `message_id`, or None."""
        with self._lock:
            return next((g for g in self.generations if g.message_id == message_id), None)

    @property
    def generation_limit(self):
        """How many replies /api/chat makes at once: max_generations, else
        llama-server's slots (its /props), else 4."""
        return self.settings.max_generations or self.upstream.slots or 4

    def room_for_a_reply(self):
        """Refuse a chat, 429 BUSY, while generation_limit replies are being made."""
        with self._lock:
            running = sum(1 for g in self.generations if g.message_id is not None)
        if running >= self.generation_limit:
            raise ApiError(429, "BUSY", f"{running} replies are being made, as many as "
                           "llama-server has slots for; try again when one is done",
                           {"Retry-After": "2"})

    def generation_ended(self, generation):
        with self._lock:
            self.generations.discard(generation)

    @property
    def active_streams(self):
        side = self.meanwhile
        return len(self.generations) + (side.active_streams if side is not None else 0)

    def cancel(self, reason, conversation_id=None, messages=()):
        """Cut short the replies being made (those of one conversation, or
        under one of these messages): each ends with `reason`."""
        with self._lock:
            found = [g for g in self.generations
                     if (conversation_id is None and not messages)
                     or g.conversation_id == conversation_id
                     or not g.depends_on.isdisjoint(messages)]
        for generation in found:
            generation.cancel(reason)

    def stop_streams(self, wait=4.0):
        """Ask every reply to end (closing llama.cpp's side wakes a relay blocked
        reading it), then wait for them to store what they have."""
        self.stopping.set()
        self.cancel(shutting_down())
        side = self.meanwhile
        if side is not None:
            side.cancel(shutting_down())
        deadline = time.monotonic() + wait
        while self.active_streams and time.monotonic() < deadline:
            time.sleep(0.05)


###############################################################################
# Settings of a conversation: what its next reply is made with
###############################################################################

def setting_layers(settings, conversation, project=None, request_options=None):
    """Where a reply's settings may come from, first to last: (its name, its
    system prompt or None, its options or None). The first that gives one
    wins, name by name."""
    project = project or {}
    return [("chat", None, request_options),
            ("conversation", conversation.get("system_prompt"), conversation.get("options")),
            ("project", project.get("system_prompt"), project.get("options")),
            ("config", settings.system_prompt, settings.model_options)]


def reply_settings(settings, conversation, request_options=None, project=None):
    """(system prompt, options by the names of model_options) for a reply:
    the request's options, else the conversation's, else its project's,
    else the config's, name by name; the system prompt likewise."""
    layers = setting_layers(settings, conversation, project, request_options)
    options = {}
    for _, _, given in reversed(layers):
        options.update(given or {})
    return next(s for _, s, _ in layers if s is not None), options


def effective_settings(settings, conversation, project=None):
    """What the next reply is made with, each part with where it comes from."""
    layers = setting_layers(settings, conversation, project)
    system_prompt, options = reply_settings(settings, conversation, project=project)
    return {
        "system_prompt": {"value": system_prompt,
                          "from": next(n for n, s, _ in layers if s is not None)},
        "options": {name: {"value": value,
                           "from": next(n for n, _, o in layers if o and name in o)}
                    for name, value in options.items()},
    }


###############################################################################
# Context by tokens: as much of the branch as fits the model
###############################################################################

def counted_text(m):
    """What of a message is counted as its tokens: its text files as they
    are sent (message_parts), then its text. An attachment's bytes are in
    `data` where they have been read."""
    files = [f"--- File: {a['name']} ---\n" + bytes(a["data"]).decode("utf-8", "replace")
             .lstrip("\ufeff") for a in m.get("attachments") or ()
             if a["kind"] == "text" and a.get("data") is not None]
    return "\n".join(files + [m["content"]]) if files else m["content"]


def counted_tokens(engine, messages, model):
    """Each message's tokens (counted_text): stored, else counted by
    llama.cpp (/tokenize, once: the count is kept in its row). False if
    llama.cpp cannot count."""
    counts = {}
    for m in messages:
        if m.get("token_count") is None:
            n = engine.upstream_for(model).token_count(counted_text(m), model)
            if n is None:
                return False
            m["token_count"] = n
            if m.get("id") is not None:          # a question not yet stored is not kept
                counts[m["id"]] = n
    if counts:
        try:
            engine.store.keep_token_counts(counts)
        except sqlite3.Error as e:
            log.warning("token counts could not be kept: %s", e)
    return True


def question_tokens(engine, text, model):
    """A new question's tokens, counted before it is stored (in the same
    INSERT, not a write of its own after), where its count will be used."""
    upstream = engine.upstream_for(model)
    if upstream.context_of(model) is None:
        return None
    return upstream.token_count(text, model)


# llama-server keeps the prompt it last read (cache_prompt): a turn that sends
# the same beginning again pays only for what is new. A window that slid by a
# message a turn would change the beginning every turn, and llama.cpp would
# read the whole history again each time: minutes on a Pi. So what is left
# out grows in steps (half the message limit, two thirds of the token
# budget), and the turns between two steps send the same beginning.
def stepped_window(earlier, limit):
    """How many of a branch's `earlier` messages go with a chat, at most
    `limit`: all while they fit; then the oldest left out half the limit at
    a time (each turn adds two messages: a step of a quarter would move the
    first kept every turn), so the first kept moves every few turns. The
    step is even (half the limit, rounded up to pairs): a window of a
    question and reply a turn begins with a question."""
    if earlier <= limit:
        return earlier
    step = max(2, -(-limit // 4) * 2)
    return max(0, earlier - -(-(earlier - limit) // step) * step)


STEP_OF_BUDGET = 2 / 3       # of the token budget, left out at a step
FIRST_SHARE = 4              # the first exchange is kept if it takes at most 1/4 of the budget


def stepped_start(costs, budget):
    """Where the exchanges (their token costs, oldest first) that go begin:
    0 when all fit the budget; else the first of the places where what was
    left out before it reaches each next multiple of a step (two thirds of
    the budget: places fixed by the oldest exchanges alone), from which the
    rest fits; None if from none of them. Between two steps each turn sends
    the last one's prompt and adds to it; a step makes llama.cpp read what
    is kept (a third of the budget) again, once in the turns it takes to
    fill two thirds: on average half as much again as each turn adds (with
    steps of half the budget: twice)."""
    step = max(1, int(budget * STEP_OF_BUDGET))
    rest, left_out, mark = sum(costs), 0, 0
    for i, cost in enumerate([*costs, 0]):
        if left_out >= mark:                       # a place where a step ends
            if rest <= budget:
                return i
            mark = (left_out // step + 1) * step
        rest, left_out = rest - cost, left_out + cost
    return None


def exchanges(messages):
    """A branch's messages as exchanges: a question and what answered it (the
    replies, tool calls and results up to the next question); what comes
    before the first question is an exchange of its own."""
    found = []
    for m in messages:
        if m["role"] == "user" or not found:
            found.append([])
        found[-1].append(m)
    return found


FIRST_EXCHANGE_MOST = 4      # messages of a branch's first exchange kept while the rest steps


def windowed_history(tree, leaf, earlier, limit, own=0):
    """What of the branch up to `leaf` a chat sends, and whether it begins
    with the branch's first question: its `own` last messages and, of the
    `earlier` ones before them, what stepped_window keeps within `limit`.
    Where that leaves some out, the branch's first exchange (its first
    question and what answered it) goes first, within the limit: what the
    conversation is about stays, and with it a beginning llama.cpp's prompt
    cache still holds after a step."""
    kept = stepped_window(earlier, limit)
    if kept == earlier:
        return (tree.path(leaf, kept + own) if kept + own else []), True
    parts = exchanges(tree.first(leaf, FIRST_EXCHANGE_MOST + 1))
    first = parts[0] if len(parts) > 1 else []      # whole: another begins after it
    if not first or first[0]["role"] != "user" or len(first) < 2 or len(first) * 2 > limit:
        return tree.path(leaf, kept + own), False
    kept = stepped_window(earlier - len(first), limit - len(first))
    return first + tree.path(leaf, kept + own), True


def fit_context(engine, turn, branch_length):
    """Leave out of the turn's history what would not fit the model's context:
    n_ctx (llama-server's /props) less the reply's max_tokens (at most a
    quarter of n_ctx: a default of 4096 would leave no room in a small
    context) and the system prompt. The turn's own messages always go; then
    whole exchanges: an exchange too long for the context ever to go and an
    unanswered question are left out; of the rest, the branch's first
    exchange, where the history begins with it and it takes at most a
    quarter of the budget, and the newest from where stepped_start says
    (the oldest left out two thirds of the budget at a time, so that
    llama.cpp's prompt cache serves the turns between). Where
    llama.cpp cannot say n_ctx or count, the history stays as the message
    limit made it (and an overflow is still retried with fewer).
    turn.context says what was done."""
    upstream = engine.upstream_for(turn.model or None)
    n_ctx = upstream.context_of(turn.model or None)
    history = turn.history
    if n_ctx is None or not counted_tokens(engine, history, turn.model or None):
        return
    system, overhead = 0, upstream.message_overhead(turn.model or None)
    if turn.system_prompt:
        system = upstream.token_count(turn.system_prompt, turn.model or None)
        if system is None:
            return
        system += overhead
    wanted = turn.options.get("max_tokens")
    reserve = min(wanted if isinstance(wanted, int) and wanted > 0 else 0, n_ctx // 4)
    budget = n_ctx - reserve - system
    own = history[len(history) - turn.own_messages:] if turn.own_messages else []
    used = sum(m["token_count"] + overhead for m in own)
    sendable = []
    for e in exchanges(history[:len(history) - len(own)]):
        cost = sum(m["token_count"] + overhead for m in e)
        if e[0]["role"] == "user" and len(e) > 1 and used + cost <= budget:
            sendable.append((e, cost))
    pinned = []           # the branch's first exchange, kept while the rest steps
    if turn.begins_at_root and sendable and sendable[0][0][0] is history[0] and \
            sendable[0][1] * FIRST_SHARE <= budget - used:
        pinned = [sendable.pop(0)]
        used += pinned[0][1]
    start = stepped_start([cost for _, cost in sendable], budget - used)
    kept = [m for e, _ in pinned for m in e]
    for e, cost in sendable[start:] if start is not None else ():
        kept += e
        used += cost
    turn.history = kept + own                 # what llama.cpp is sent begins with a question
    turn.context = {"n_ctx": n_ctx, "prompt_tokens": used + system,
                    "messages_sent": len(turn.history),
                    "messages_left_out": branch_length - len(turn.history)}


###############################################################################
# Recall: the rest of the history as numbered sources for a reply
###############################################################################

# With the option `recall` on (a chat's, its conversation's or config.json's),
# the question's words (not its stop words) are looked up in the whole
# history but the branch the reply goes on (FTS5, bm25); the best matches'
# passages, cut at sentence or paragraph bounds around the match, go with the
# system prompt as numbered sources, within an eighth of the context; the
# reply keeps which (its `recall`), and the page links each [n] to its message.
RECALL_SHARE = 8             # the sources take at most 1/RECALL_SHARE of the context
RECALL_CONTEXT = 4096        # tokens, where llama.cpp does not say its context
RECALL_CANDIDATES = 12       # best matches read, to choose the sources from
RECALL_SOURCES = 5
RECALL_PASSAGE = 700         # characters of a source, at most
RECALL_WORDS = 24            # of the question, at most, looked up
RECALL_COMMON = 1000         # a word in this many messages or more tells little: left out
RECALL_RARE_WORDS = 8        # the rarest words of a question looked up, at most
SOURCE_MARKS = 16            # tokens a source takes beside its passage: its number, title
STOP_WORDS = frozenset("""
a about above after again all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from
further had has have having he her here hers him his how i if in into is it its itself
just me more most my no nor not now of off on once only or other our ours out over own
same she should so some such than that the their theirs them then there these they this
those through to too under until up very was we were what when where which while who
whom why will with would you your yours tell know remember said say""".split())
RECALL_INSTRUCTION = (
    "Passages from the user's earlier conversations follow, numbered. Where one helps to "
    "answer, use it and cite it as [1], [2] and so on; leave out those that do not help.")
MENTIONED = " (a conversation the user mentions)"    # after its title, for a mention's source
SENTENCE_END = re.compile(r"[.!?。！？]\s+|\n\s*")


def recall_query(question):
    """The question's words to look up: a Query whose match is any of them."""
    words = []
    for m in TOKEN.finditer(search_form(question) or ""):
        word = fold(m.group())
        if (len(word) > 1 or not word.isascii()) and word not in STOP_WORDS \
                and word not in words:
            words.append(word)
    words = words[:RECALL_WORDS]
    return Query(" OR ".join(f'"{w}"' for w in words) if words else None,
                 [[w] for w in words], False, words)


def passage(content, spans, size):
    """At most `size` characters of content around its first match: from
    the start of its sentence or paragraph (or, that far before, a word's),
    to the end of a sentence or paragraph where one ends within, else of a
    word; never mid-word."""
    at = spans[0][0] if spans else 0
    bounds = [m.end() for m in SENTENCE_END.finditer(content)]
    start = max((b for b in bounds if b <= at), default=0)
    if at - start > size // 2:                   # a long sentence: from a word before
        start = content.rfind(" ", 0, at - size // 4) + 1
    if len(content) - start <= size:
        return ("…" if start else "") + content[start:].strip()
    end = max((b for b in bounds if start < b <= start + size), default=0)
    if end - start < size // 3:
        end = content.rfind(" ", start, start + size)
        end = end if end > at else start + size
    return ("…" if start else "") + content[start:end].strip() + "…"


def recalled(engine, model, question, branch, after=0):
    """The sources for a reply to `question` whose branch holds the ids
    `branch`, numbered from after + 1; [] when nothing matches."""
    query = recall_query(question)
    if query.match is None:
        return []
    n_ctx = engine.upstream_for(model or None).context_of(model or None) or RECALL_CONTEXT
    left = n_ctx // RECALL_SHARE
    sources = []
    rows, used = engine.store.index.best_matches(query.words, branch, RECALL_CANDIDATES,
                                                 RECALL_COMMON, RECALL_RARE_WORDS)
    query = Query(None, [[w] for w in used], False, used)     # the passage is cut around them
    pattern = ascii_pattern(query)
    for row in rows:
        content = row["content"]
        spans = [list(m.span()) for m in pattern.finditer(content)] if content.isascii() \
            else highlight_spans(content, query)
        if not spans:              # its conversation's title matched, not what it says
            continue
        text = passage(content, spans, min(RECALL_PASSAGE, (left - SOURCE_MARKS) * 4))
        cost = estimate_tokens(text) + SOURCE_MARKS
        if not text.strip("…") or cost > left:
            continue
        left -= cost
        sources.append({"n": after + len(sources) + 1, "message_id": row["message_id"],
                        "conversation_id": row["conversation_id"], "title": row["title"],
                        "snippet": text})
        if len(sources) == RECALL_SOURCES:
            break
    return sources


def with_sources(system_prompt, sources):
    """The system prompt with the sources after it (as a continue sends
    them again: the reply's own, kept)."""
    if not sources:
        return system_prompt
    block = RECALL_INSTRUCTION + "\n\n" + "\n\n".join(
        f"[{s['n']}] “{s['title']}”{MENTIONED if s.get('mention') else ''}: {s['snippet']}"
        for s in sources)
    return (system_prompt + "\n\n" + block) if system_prompt else block


###############################################################################
# Mentions: conversations the user names, as sources
###############################################################################

# A chat may name other conversations (`mentions`: their ids; the page's @):
# each one's shown branch, as much of it as fits (its newest messages), goes
# with the system prompt as a numbered source before any recalled ones, and
# is named in the reply's `recall` (with "mention": true).
MENTIONS_MOST = 3
MENTION_SHARE = 4            # mentioned conversations take at most 1/MENTION_SHARE of the context
SPEAKERS = {"user": "User", "assistant": "Assistant", "tool": "Tool", "system": "System"}


def check_mentions(body, conversation_id):
    """The conversation ids a chat mentions (VALIDATION_ERROR unless a list
    of at most MENTIONS_MOST ids, none this conversation's)."""
    found = body.get("mentions")
    if found is None:
        return []
    if not isinstance(found, list) or len(found) > MENTIONS_MOST or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 < i < 2**63 for i in found):
        raise validation_error("mentions", f"Field mentions must be a list of at most "
                               f"{MENTIONS_MOST} conversation ids")
    if conversation_id in found:
        raise validation_error("mentions", "A conversation cannot mention itself")
    return list(dict.fromkeys(found))


def transcript(messages, size):
    """The newest of these messages that fit in `size` characters, as
    "User: ..." lines, with "…" where older ones were left out."""
    lines, used = [], 0
    for m in reversed(messages):
        line = f"{SPEAKERS.get(m['role'], m['role'])}: {m['content'].strip()}"
        if used + len(line) > size:
            if not lines:                      # the newest alone is longer: its end
                lines.append("…" + line[len(line) - size + 1:])
            break
        lines.append(line)
        used += len(line) + 1
    cut = len(lines) < len(messages)
    return ("…\n" if cut and lines and not lines[-1].startswith("…") else "") + \
        "\n".join(reversed(lines))


def mentioned(engine, model, conversations):
    """The sources the mentioned conversations give: each its shown branch,
    within its share of the context."""
    store = engine.store
    if not conversations:
        return []
    n_ctx = engine.upstream_for(model or None).context_of(model or None) or RECALL_CONTEXT
    share = (n_ctx // MENTION_SHARE) // len(conversations) - SOURCE_MARKS
    sources = []
    for c in conversations:
        branch = [m for m in json.loads(store.tree.branch(c["id"])) if m["content"].strip()]
        if not branch:
            continue
        sources.append({"n": len(sources) + 1, "message_id": branch[-1]["id"],
                        "conversation_id": c["id"], "title": c["title"],
                        "snippet": transcript(branch, max(share, 0) * 4), "mention": True})
    return sources


###############################################################################
# The next prompt: what a chat would send, for the inspector
###############################################################################

def next_prompt(engine, conversation, question=None, model=None):
    """What the conversation's next chat would send llama.cpp (with
    `question` as its new message, if given), chosen as a chat chooses it:
    the messages and options, the model, what was left out, and, where
    llama-server can say, their tokens, the model's context and the
    templated text."""
    system_prompt, asked = reply_settings(
        engine.settings, conversation,
        project=engine.store.projects.get(conversation.get("project_id")))
    options = check_model_options(asked, "options")
    leaf = conversation.get("current_message_id")
    total = engine.store.tree.depth(leaf) if leaf is not None else 0
    history, at_root = windowed_history(engine.store.tree, leaf, total, engine.settings.performance[
        "context_history_limit"]) if leaf is not None else ([], True)
    attached = engine.store.attached([m["id"] for m in history if m["role"] == "user"])
    for m in history:
        m["attachments"] = attached.get(m["id"], [])
    if question is not None:
        history = history + [{"id": None, "role": "user", "content": question,
                              "token_count": None}]
        total += 1
    model = model or conversation.get("model") or None
    sources = recalled(engine, model, question, {m["id"] for m in history if m["id"]}) \
        if question and asked.get("recall") else []
    system_prompt = with_sources(system_prompt, sources)
    turn = types.SimpleNamespace(model=model, history=history, system_prompt=system_prompt,
                                 options=options, own_messages=1 if question else 0,
                                 context=None, begins_at_root=at_root)
    fit_context(engine, turn, total)
    left_out, upstream = [], engine.upstream_for(model)
    messages = context_messages(system_prompt, turn.history, upstream.takes(model),
                                left_out)
    body = {"messages": messages, **options, **({"model": model} if model else {})}
    sent = len(messages) - (1 if system_prompt else 0)
    return {"model": model, "messages": messages, "options": options, "messages_sent": sent,
            "messages_left_out": total - sent, "attachments_left_out": left_out,
            "prompt_tokens": upstream.input_tokens(body),
            "n_ctx": upstream.context_of(model), "connection": upstream.name,
            "prompt": upstream.templated(messages, model), "recall": sources}


###############################################################################
# Chat: shared by the plain and the streaming answer
###############################################################################


class AsItCame:
    """A reply's text as llama.cpp sends it."""

    def take(self, piece):
        return piece


class WithoutEcho(AsItCame):
    """A continued reply's new text. llama-server sends the text it was given
    to continue (the prefill) again before the new text; what could still be
    that echo is held back, and dropped once it is whole. A server that sends
    only the new text loses nothing: the first piece that is not the start of
    the old text is passed on, with what was held. What is still held when the
    reply ends is the echo, or a part of it, and is dropped."""

    def __init__(self, old):
        self.old, self.held, self.decided = old, "", False

    def take(self, piece):
        if self.decided:
            return piece
        self.held += piece
        if self.old.startswith(self.held):
            return ""                          # perhaps the echo: wait for more
        self.decided = True
        for echo in (self.old, self.old.rstrip()):
            if self.held.startswith(echo):
                return self.held[len(echo):]
        return self.held


@dataclass
class ChatTurn:
    conversation_id: int
    model: str
    user_message_id: int   # the question the reply answers
    parent_id: int         # where the reply goes: the question (or what a reply continues)
    continued: dict        # the reply being continued (its row before), or None
    system_prompt: str
    history: list          # the branch up to the question (and the reply continued)
    options: dict          # checked, named as llama.cpp names them
    started: float = 0.0
    asked_options: dict = None    # the same, as model_options names them: stored with the reply
    title_pending: bool = False   # the conversation is titled after this reply
    context: dict = None          # n_ctx, prompt_tokens, messages_sent, messages_left_out
    message_id: int = None        # the reply's row, when it was made with the question
    takes: frozenset = None       # what the model takes beside text (None: unknown, all)
    left_out: list = field(default_factory=list)   # attachments the model does not take
    recall: list = None           # the sources recalled for it (None: none)
    unsynced: bool = False        # its question's commit is not yet synced (Database.sync_wal)
    begins_at_root: bool = False  # history begins with the branch's first question

    def payload(self, skip=0):
        """llama.cpp's request, leaving out the oldest `skip` messages. It is
        always streamed (the reply is the server's, its text kept as it
        comes, whether the client asked for a stream or not), with the
        progress of reading the prompt."""
        body = {"messages": context_messages(self.system_prompt, self.history[skip:],
                                             self.takes, self.left_out, media=lambda m: m),
                "stream": True, "stream_options": {"include_usage": True},
                "return_progress": True, "cache_prompt": True, "reasoning_control": True,
                **self.options}
        if self.model:
            body["model"] = self.model
        return body

    @property
    def depends_on(self):
        """The messages whose deletion ends this reply."""
        return {self.parent_id, self.continued and self.continued["id"]} - {None}

    def text_filter(self):
        return WithoutEcho(self.continued["content"]) if self.continued else AsItCame()

    @property
    def own_messages(self):
        """How many of the history's last messages no overflow may leave out."""
        return 2 if self.continued else 1


# Where a reply goes: at most one of these (none: a new question under the
# conversation's current message). "user_message_id" is the retry of version
# 1, a regenerate of that question.
PLACEMENTS = ("parent_id", "regenerate", "continue", "user_message_id")
CHAT_FIELDS = {"conversation_id", "message", "model", "stream", "options", "attachments",
               "recall", "mentions", *PLACEMENTS}


def chat_placement(body):
    """(name, message id) of the placement the chat asks for, or (None, None).
    A parent_id of null (a new first message) counts; the others' nulls do not."""
    given = [name for name in PLACEMENTS
             if name in body and (body[name] is not None or name == "parent_id")]
    if len(given) > 1:
        raise validation_error(given[1], f"Send one of {', '.join(PLACEMENTS[:3])} at most "
                               f"(got {' and '.join(given)})")
    if not given:
        return None, None
    name = given[0]
    if name != "parent_id" and "message" in body:
        raise validation_error("message", f"A chat with {name} takes no message: it answers "
                               "or continues one that is stored")
    if name == "parent_id" and body[name] is None:
        return name, None
    return name, require_int(body, name)


def takes_turns(body):
    """The conversation whose turns a chat takes (None: it branches where it
    says, and waits for nothing)."""
    if not isinstance(body, dict) or isinstance(body.get("conversation_id"), bool) or \
            not isinstance(body.get("conversation_id"), int) or \
            not 0 < body["conversation_id"] < 2**53:     # none such: start_chat refuses it
        return None
    placement = [name for name in PLACEMENTS if body.get(name) is not None or
                 (name == "parent_id" and name in body)]
    return body["conversation_id"] if placement in ([], ["continue"]) else None


def start_chat(engine, body):
    """Validate, store the user's message (committed) where it goes, and build
    llama.cpp's request from the branch it is on: never a message of another
    branch. A regenerate or continue stores nothing before llama.cpp answers."""
    known_fields(body, CHAT_FIELDS)
    conversation_id = require_int(body, "conversation_id")
    placement, target_id = chat_placement(body)
    attachments = check_attachments(body)
    if attachments and placement not in (None, "parent_id"):
        raise validation_error("attachments", "Attachments go with a new message")
    message = require_str(body, "message", allow_empty=bool(attachments),
                          max_len=LIMITS["content"]) if placement in (None, "parent_id") else None
    # A new question names its model (the reference's rule); a regenerate or
    # continue may leave it out: the reply's own model, else the conversation's.
    model = require_str(body, "model", allow_empty=True, max_len=LIMITS["model"]) \
        if message is not None or body.get("model") is not None else None
    options = body.get("options") or {}
    check_model_options(options, "options")
    mentions = check_mentions(body, conversation_id)
    if "recall" in body:                        # as options.recall: this chat's
        if not isinstance(body["recall"], bool):
            raise validation_error("recall", "Field recall must be true or false")
        options = {**options, "recall": body["recall"]}
    store = engine.store
    conversation = store.get_conversation(conversation_id)
    if conversation is None:
        raise not_found("conversation", conversation_id)
    attachments = [store.attachment(i) or not_found_raised("attachment", i) for i in attachments]
    mentions = [store.get_conversation(i) or not_found_raised("conversation", i)
                for i in mentions]
    system_prompt, asked = reply_settings(engine.settings, conversation, options,
                                          store.projects.get(conversation["project_id"]))
    upstream_options = check_model_options(asked, "options")
    target = None
    if target_id is not None:
        target = store.tree.message(target_id, conversation_id)
        if target is None:
            raise not_found("message", target_id)
    if model is None:
        model = (target["role"] == "assistant" and target["model"]) or conversation["model"] or ""
    continued = reply_id = None
    if message is not None:
        parent = target_id if placement == "parent_id" else CURRENT
        asked_at = store.ask(conversation_id, message, model or None, parent=parent, synced=False,
                             reply_options=JSON.encode(asked) if asked is not None else None,
                             attachments=attachments,
                             estimated_tokens=estimate_tokens(message),
                             token_count=question_tokens(engine, counted_text({
                                 "content": message, "attachments": [
                                     {**a, "data": store.attachment_bytes(a["id"])}
                                     if a["kind"] == "text" else a for a in attachments]}),
                                 model or None))
        if asked_at is None:
            if store.get_conversation(conversation_id) is None:
                raise not_found("conversation", conversation_id)
            raise not_found("message", target_id)
        question, reply_id = asked_at
        last = parent_id = question
    elif placement == "continue":
        if target["role"] != "assistant":
            raise validation_error("continue", "continue takes a reply (an assistant message)")
        continued = store.message_row(target["id"])      # the whole row: its timings too
        last, question = target["id"], target["parent_id"]
        parent_id = question
    else:
        if placement == "user_message_id" and target["role"] != "user":
            raise validation_error("user_message_id", "user_message_id must be a user message")
        # What a reply answers: a question, or a tool's result (a conversation
        # recorded from /v1); past failed replies a migrated chain holds.
        answers = ("user", "tool")
        question = target["id"] if target["role"] in answers else target["parent_id"]
        while question is not None:
            above = store.tree.message(question)
            if above["role"] in answers:
                break
            question = above["parent_id"]
        if question is None:
            raise validation_error(placement, "That reply answers no question")
        last = parent_id = question
    title_pending = conversation["title_pending"] and not continued
    if title_pending and message is not None and engine.settings.auto_title != "model":
        engine.write_title(conversation_id, "")   # from the question, even if llama.cpp fails
        title_pending = False
    own = 2 if continued else 1
    earlier = store.tree.depth(last) - own
    history, at_root = windowed_history(store.tree, last, earlier,
                                        engine.settings.performance["context_history_limit"], own)
    attached = store.attached([m["id"] for m in history if m["role"] == "user"])
    for m in history:
        m["attachments"] = attached.get(m["id"], [])
    sources = None
    if continued:                               # the sources it was made with, again
        sources = json.loads(continued["recall"]) if continued["recall"] else None
        system_prompt = with_sources(system_prompt, sources)
    elif mentions or asked.get("recall"):
        sources = mentioned(engine, model, mentions)
        if asked.get("recall"):
            asking = next((m["content"] for m in history if m["id"] == question), "")
            sources += recalled(engine, model, asking, {m["id"] for m in history}, len(sources))
        system_prompt = with_sources(system_prompt, sources)
    turn = ChatTurn(conversation_id, model, question, parent_id, continued, system_prompt,
                    history, upstream_options, time.monotonic(),
                    asked, title_pending, message_id=reply_id, recall=sources or None,
                    unsynced=message is not None, begins_at_root=at_root)
    try:
        fit_context(engine, turn, earlier + own)
        turn.takes = engine.upstream_for(model or None).takes(model or None)   # as /props said
    except BaseException:
        if reply_id is not None:                 # its row goes, with nothing made
            store.abandon_reply(reply_id)
        raise
    return turn


def context_overflow(status, body):
    err = body.get("error") if isinstance(body, dict) else None
    if status != 400 or not isinstance(err, dict):
        return False
    return err.get("type") == "exceed_context_size_error" or \
        "context size" in str(err.get("message", ""))


def fewer_messages(turn, skip, conn, resp):
    """llama.cpp refused the chat. If it said the history is longer than the
    model's context, how many of the oldest messages to leave out next time
    (half of those left each time, until only the question is left); else
    the refusal, as an error."""
    try:
        body = json_or_none(resp.read(65536))
    except (OSError, http.client.HTTPException):
        body = None
    finally:
        conn.close()
    older = len(turn.history) - turn.own_messages - skip
    if not (context_overflow(resp.status, body) and older > 0):
        raise upstream_status_error(resp.status, body)
    skip += (older + 1) // 2
    log.info("conversation %d: history too long for the model's context; "
             "sending the last %d messages", turn.conversation_id, len(turn.history) - skip)
    return skip


def continued_metrics(before, metrics, elapsed_ms, finish, timings=None):
    """A continued reply's columns, for the whole of it: the times and the
    tokens of both parts added (llama.cpp's predicted_n and predicted_ms too,
    so that the ledger's tokens/s is of the whole), the speed over both
    (tokens per second of generating), the prompt of the first (its timings
    too, where it has them), the end of the last."""
    timings = timings or {}
    summed = {name: (before[name] or 0) + timings[name]
              if before[name] is not None and timings.get(name) is not None
              else before[name] if before[name] is not None else timings.get(name)
              for name in ("predicted_n", "predicted_ms")}
    first = {name: before[name] if before[name] is not None else timings.get(name)
             for name in ("prompt_n", "prompt_ms", "cache_n", "ttft_ms")}
    old_tokens, new_tokens = before["estimated_tokens"] or 0, metrics["completion_tokens"] or 0
    old_speed, new_speed = before["tokens_per_second"], metrics["tokens_per_second"]
    speed = new_speed or old_speed
    if old_speed and new_speed and old_tokens + new_tokens:
        speed = round((old_tokens + new_tokens)
                      / (old_tokens / old_speed + new_tokens / new_speed), 1)
    return {"response_time_ms": (before["response_time_ms"] or 0) + elapsed_ms,
            "estimated_tokens": old_tokens + new_tokens,
            "prompt_tokens": before["prompt_tokens"] if before["prompt_tokens"] is not None
            else metrics["prompt_tokens"],
            "tokens_per_second": speed, "finish_reason": finish, **summed, **first}


def store_reply(engine, turn, message_id, text, reasoning, finish_reason, metrics, elapsed_ms,
                timings):
    """Store the reply as it ended (a continued one: the whole of it): the
    stored (text, reasoning, response ms, metrics), or NOT_FOUND if it was
    deleted meanwhile."""
    if turn.continued:
        before = turn.continued
        columns = continued_metrics(before, metrics, elapsed_ms, finish_reason, timings)
        text, reasoning = before["content"] + text, (before["reasoning"] or "") + reasoning
        columns["attachments_left_out"] = before["attachments_left_out"]
        columns["recall"] = before["recall"]
    else:
        columns = dict(response_time_ms=elapsed_ms, estimated_tokens=metrics["completion_tokens"],
                       prompt_tokens=metrics["prompt_tokens"],
                       tokens_per_second=metrics["tokens_per_second"],
                       finish_reason=finish_reason, **timings,
                       token_count=metrics["completion_tokens"]
                       if metrics["completion_tokens"] is not None
                       and metrics["prompt_tokens"] is not None else None,
                       attachments_left_out=JSON.encode(turn.left_out) if turn.left_out
                       else None, recall=JSON.encode(turn.recall) if turn.recall else None)
    row = engine.store.finish_reply(message_id, text, reasoning, **columns)
    if row is None:
        if engine.store.get_conversation(turn.conversation_id) is None:
            raise not_found("conversation", turn.conversation_id)
        raise not_found("message", message_id)
    prompt = row["prompt_tokens"]
    total = prompt + row["estimated_tokens"] if prompt is not None and \
        row["estimated_tokens"] is not None else None
    return (row["content"], row["reasoning"] or "", row["response_time_ms"],
            {"completion_tokens": row["estimated_tokens"], "prompt_tokens": prompt,
             "total_tokens": total, "tokens_per_second": row["tokens_per_second"]})


def finish_chat(engine, turn, message_id, text, reasoning, finish_reason, usage, timings,
                first_at=None):
    """Store the reply and return the answer's fields. `first_at`: when its
    first token came."""
    elapsed_ms = round((time.monotonic() - turn.started) * 1000)
    ttft = round((first_at - turn.started) * 1000, 1) if first_at else None
    text, reasoning, elapsed_ms, metrics = store_reply(
        engine, turn, message_id, text, reasoning, finish_reason,
        read_metrics(usage, timings, text, elapsed_ms), elapsed_ms,
        reply_timings(timings, ttft))
    if turn.title_pending:
        engine.write_title(turn.conversation_id, text, turn.model)
    answer = {
        "response": text,
        "model": turn.model,
        "response_time_ms": elapsed_ms,
        "estimated_tokens": metrics["completion_tokens"],
        "metrics": metrics,
        "finish_reason": finish_reason,
        "conversation_id": turn.conversation_id,
        "message_id": message_id,
        "user_message_id": turn.user_message_id,
        "parent_id": turn.parent_id,
    }
    if turn.context is not None:
        answer["context"] = {**turn.context, "prompt_tokens": metrics["prompt_tokens"]
                             if metrics["prompt_tokens"] is not None
                             else turn.context["prompt_tokens"]}
    if turn.left_out:
        answer.setdefault("context", {})["attachments_left_out"] = list(turn.left_out)
    if turn.recall:
        answer["recall"] = turn.recall
    if reasoning:
        answer["reasoning"] = reasoning
    return answer


def finish_reason(choice):
    """How llama.cpp says a reply ended, as the history keeps it: cut by the
    token limit, ended in tool calls, or stopped."""
    reason = choice.get("finish_reason")
    return reason if reason in ("length", "tool_calls") else "stop"


###############################################################################
# Streaming: relaying llama.cpp's tokens as they come
###############################################################################

SSE_JSON = json.JSONEncoder(ensure_ascii=False, check_circular=False)   # small, many
json_string = json.encoder.encode_basestring      # a str as a JSON string, in C


def sse_line(event):
    """One event as its SSE line. Tokens, the bulk of a stream, skip the encoder."""
    if len(event) == 2 and "content" in event:
        content = json_string(event["content"])
        return f'data: {{"type": "{event["type"]}", "content": {content}}}\n\n'
    return f"data: {SSE_JSON.encode(event)}\n\n"


def sse_batch(events):
    return "".join(map(sse_line, events)).encode()


SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-store",
               "X-Accel-Buffering": "no"}


@dataclass
class EventStream:
    """An answer sent as it is made: 200, these headers, then each batch the
    generator `events` yields, as encode(batch) makes it (None: a keep-alive),
    until the connection closes. A `whole` one (a file: an export) is sent
    in chunks, ended by the last chunk only when the generator ends well: one
    that fails part-way is a download the client sees broken, never one that
    looks whole."""
    events: object   # generator of batches (None: a keep-alive)
    close: object    # called once the answer is over, however it ended
    headers: dict = field(default_factory=lambda: dict(SSE_HEADERS))
    encode: object = sse_batch
    whole: bool = False


@dataclass
class Answer:
    """An answer of bytes as they are: the page, or llama.cpp's own answer relayed."""
    body: bytes
    headers: dict
    status: int = 200


class ClientGone(Exception):
    """The browser or script that asked for a stream went away."""


KEEPALIVE_SECONDS = 15


def request_stream(engine, turn, generation):
    """Ask llama.cpp for the streamed reply; return its response once it answers
    200. llama-server sends nothing, not even headers, until it has read the
    prompt, which can take minutes: meanwhile this yields None every
    KEEPALIVE_SECONDS (a keep-alive for the client), and watches the client's
    socket (one that leaves ends the request at once, and llama.cpp's work on
    it) and for a reason to stop. The relay's own thread waits: a thread of
    its own cost a millisecond of hand-offs before the first token."""
    skip, upstream = 0, engine.upstream_for(turn.model or None)
    while True:
        conn = upstream.send("POST", "/v1/chat/completions", turn.payload(skip))
        resp = yield from await_answer(engine, upstream, conn, generation)
        if resp.status == 200:
            return resp
        skip = fewer_messages(turn, skip, conn, resp)


def await_answer(engine, upstream, conn, generation):
    """The response to the request sent on `conn` (to `upstream`), once its headers are in;
    meanwhile yield None every KEEPALIVE_SECONDS, and raise ClientGone when
    the client leaves, or the reason the reply was stopped for."""
    generation.attach(conn)
    started = last_sent = time.monotonic()
    with selectors.DefaultSelector() as waiting:
        waiting.register(conn.sock, selectors.EVENT_READ, "llama.cpp")
        if generation.client is not None:
            waiting.register(generation.client, selectors.EVENT_READ, "client")
        while True:
            ready = {key.data for key, _ in waiting.select(0.25)}
            if "client" in ready:
                if client_left(generation.client):
                    raise ClientGone()
                waiting.unregister(generation.client)     # it sent more: not ours
            if "llama.cpp" in ready:
                break
            stopped = why_stopped(engine, generation)
            if stopped:
                raise stopped
            now = time.monotonic()
            if now - started >= upstream.first_token_timeout:
                raise upstream_error(socket.timeout(), upstream.url)
            if now - last_sent >= KEEPALIVE_SECONDS:
                last_sent = now
                yield None
    try:
        return upstream.answer(conn)
    except ApiError as e:
        raise why_stopped(engine, generation) or e from None


def client_left(sock):
    """Has the client closed its side (its socket reads as ended)?"""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def why_stopped(engine, generation):
    """The error a reply cut short from another thread ends with, or None."""
    if generation.reason is not None:
        return generation.reason
    return shutting_down() if engine.stopping.is_set() else None


def parse_events(complete):
    """Whole lines of llama-server's SSE stream -> (chunks, whether [DONE] came).
    Decoded once, and the burst's events read by one json.loads as an array:
    a call per event would cost more than reading it."""
    try:
        lines = complete.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise bad_upstream(f"its stream is not UTF-8: {e}") from None
    payloads, done = [], False
    for raw in lines:
        if raw.startswith("data: {"):              # nearly every line: one event
            payloads.append(raw[6:])
            continue
        if not raw:                                # and a blank line after each
            continue
        line = raw.strip()
        if not line or line.startswith(":"):      # blank, or a keep-alive comment
            continue
        if line.startswith("error:"):
            line = "data:" + line[6:]
        if not line.startswith("data:"):
            raise bad_upstream(f"it sent a line that is not an event: {line[:80]!r}")
        payload = line[5:].strip()
        if payload == "[DONE]":
            done = True
            break
        payloads.append(payload)
    try:
        chunks = json.loads("[" + ",".join(payloads) + "]")
    except ValueError:
        chunks = None
    if chunks is None or len(chunks) != len(payloads):   # find the event at fault
        chunks = [read_event(payload) for payload in payloads]
    for chunk in chunks:
        if not isinstance(chunk, dict):
            raise bad_upstream("it sent an event that is not an object")
    return chunks, done


def read_event(payload):
    try:
        return json.loads(payload)
    except ValueError as e:
        raise bad_upstream(f"a stream event cannot be read: {e}") from None


def upstream_batches(engine, turn, generation):
    """What llama.cpp streams: None for a keep-alive while it reads the prompt,
    then a list of chunks per read (whatever has arrived, so a fast model
    costs one write per batch, not per token), then "done" or "cut"."""
    read = body_reader((yield from request_stream(engine, turn, generation)))
    pending = b""
    while True:
        try:
            data = read()
        except Exception as e:
            data, error = b"", e
        else:
            error = None
        stopped = why_stopped(engine, generation)
        if stopped:
            raise stopped
        if error is not None:
            raise upstream_error(error, engine.upstream_for(turn.model or None).url)
        if not data:
            break
        complete, newline, pending = (pending + data).rpartition(b"\n")
        chunks, done = parse_events(complete) if newline else ([], False)
        if chunks:
            yield chunks
        if done:
            yield "done"
            return
    yield "cut"


class Relay:
    """What one streamed reply has gathered so far."""

    def __init__(self, text_filter):
        self.text, self.reasoning = [], []
        self.usage = self.timings = self.finish = self.model = self.completion = None
        self.first_at = None         # when the first token reached the client
        self.tool_calls = {}         # index -> the call, its arguments joined
        self.text_filter = text_filter

    def take(self, chunk):
        """Events to relay for one chunk from llama.cpp."""
        if "error" in chunk:
            raise ApiError(502, "LLAMACPP_ERROR", "llama.cpp server answered an error",
                           details=error_text(chunk))
        self.usage = chunk.get("usage") or self.usage
        self.timings = chunk.get("timings") or self.timings
        self.model = chunk.get("model") or self.model
        if isinstance(chunk.get("id"), str):
            self.completion = chunk["id"]        # llama.cpp's id of it: for answer_now
        events = []
        progress = chunk.get("prompt_progress")      # llama-server's, asked with return_progress
        if isinstance(progress, dict) and all(
                isinstance(progress.get(n), int) and not isinstance(progress.get(n), bool)
                for n in ("processed", "total")):
            events.append({"type": "progress", "processed": progress["processed"],
                           "total": progress["total"]})
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("tool_calls"), list):
                self.take_tool_calls(delta["tool_calls"])
            if isinstance(delta, dict):
                piece = delta.get("reasoning_content")
                if piece and isinstance(piece, str):
                    events.append({"type": "reasoning", "content": piece})
                piece = delta.get("content")
                if piece and isinstance(piece, str):
                    piece = self.text_filter.take(piece)
                if piece and isinstance(piece, str):
                    events.append({"type": "delta", "content": piece})
            if choice.get("finish_reason"):
                self.finish = finish_reason(choice)
        return events

    def take_tool_calls(self, pieces):
        """A stream's tool calls come in pieces: the first of each with its id
        and name, the arguments in parts after."""
        for piece in pieces:
            if not isinstance(piece, dict):
                continue
            call = self.tool_calls.setdefault(piece.get("index", len(self.tool_calls)), {
                "type": "function", "function": {"name": "", "arguments": ""}})
            if piece.get("id"):
                call["id"] = piece["id"]
            function = piece.get("function") if isinstance(piece.get("function"), dict) else {}
            for name in ("name", "arguments"):
                if isinstance(function.get(name), str):
                    call["function"][name] += function[name]

    def calls(self):
        """The tool calls, whole, in order (None: there were none)."""
        return list(self.tool_calls.values()) or None     # in the order they began

    def keep(self, events):
        """These events reached the client: they are part of what gets stored."""
        for event in events:
            if event["type"] in ("delta", "reasoning"):
                if self.first_at is None:
                    self.first_at = time.monotonic()
                (self.reasoning if event["type"] == "reasoning" else self.text).append(
                    event["content"])


###############################################################################
# Generations: replies the server makes, followed by any number of clients
###############################################################################

FLUSH_SECONDS = 1.0          # a reply's text so far reaches the database this often
# A burst from llama.cpp (a fast model, a stub) would have the reply's thread
# parse all of it, holding a core and Python, while the thread that writes
# to the client waits to run, the first token with it. So after the first
# text is handed out, the reply's thread waits until a follower has written
# it, this long at most.
FIRST_HANDOFF_S = 0.005


def stopped_by_request():
    return ApiError(409, "STOPPED", "The reply was stopped")


class OwnedReply(Generation):
    """A reply /api/chat asked for, made by the server whoever asked and
    whoever follows: a thread of its own reads llama.cpp's stream, keeps the
    text in memory and in the database (at least every FLUSH_SECONDS), and
    hands each batch of events to every follower. It ends when llama.cpp
    ends it, or by a stop, the deletion of what it goes under, or shutdown;
    never because a client left."""

    def __init__(self, engine, turn, message_id, end_turn):
        super().__init__(turn.conversation_id, None, turn.depends_on | {message_id})
        self.message_id = message_id
        self.engine, self.turn, self.end_turn = engine, turn, end_turn
        self.started_at = now_iso()
        self.relay = Relay(turn.text_filter())
        self.sent = 0                # characters of reasoning and text so far: an event's id
        self.followers = set()
        self.last = None             # the batch it ended with (done, or error)
        self.failure = None          # the ApiError it ended with, if it failed
        self.ended = threading.Event()
        self.first_written = threading.Event()   # a follower has written what it had
        self._follow = threading.Lock()
        self._flushed = time.monotonic()

    def begin(self, here=False):
        """Make the reply in a thread of its own, or (`here`: a client that
        waits for the whole answer, and reads nothing before it) in this one,
        which then goes on to the end whether that client stays or not."""
        if here:
            self.run()
        else:
            threading.Thread(target=self.run, daemon=True,
                             name=f"reply {self.message_id}").start()
        return self

    # Followers
    def follow(self, start=0):
        """A Follower given what was made from character `start` on (replayed
        as one batch), then every batch as it comes."""
        follower = Follower()
        with self._follow:
            follower.put(self.replay(start))
            if self.last is not None:
                follower.put(self.last)
            else:
                self.followers.add(follower)
        return follower

    def unfollow(self, follower):
        with self._follow:
            self.followers.discard(follower)

    def replay(self, start):
        """What was made from character `start` on: the reasoning, then the
        text (a thinking model sends its reasoning first)."""
        reasoning, text = "".join(self.relay.reasoning), "".join(self.relay.text)
        batch = []
        if start < len(reasoning):
            batch.append((len(reasoning), {"type": "reasoning", "content": reasoning[start:]}))
        if start < len(reasoning) + len(text):
            batch.append((self.sent, {"type": "delta",
                                      "content": text[max(0, start - len(reasoning)):]}))
        return batch

    def publish(self, events):
        """Keep these events' text and hand them to every follower, at once
        for all: a follower's replay and what follows it never overlap."""
        with self._follow:
            self.relay.keep(events)
            batch = []
            for event in events:
                if event["type"] in ("delta", "reasoning"):
                    self.sent += len(event["content"])
                batch.append((self.sent, event))
            self.followers = {f for f in self.followers if f.put(batch)}

    def end(self, event):
        """Tell every follower how it ended; from then on it is not being
        made (answer-now, stop and follow see the stored reply)."""
        self.engine.generation_ended(self)
        with self._follow:
            self.last = [(self.sent, event)]
            for follower in self.followers:
                follower.put(self.last)
            self.followers = set()

    # The reply
    def run(self):
        engine, turn, relay = self.engine, self.turn, self.relay
        try:
            for item in upstream_batches(engine, turn, self):
                if item == "cut" and not relay.finish:
                    raise bad_upstream("the stream ended before the reply was complete")
                if isinstance(item, list):
                    events, failure = [], None
                    for chunk in item:
                        try:
                            events.extend(relay.take(chunk))
                        except ApiError as e:       # keep what came before it first
                            failure = e
                            break
                    if events:
                        first = not self.sent
                        if first:
                            self.first_written.clear()   # a progress batch's, before
                        self.publish(events)
                        if first and self.sent and self.followers:
                            self.first_written.wait(FIRST_HANDOFF_S)
                    if failure:
                        raise failure
                    self.flush()
            self.end({"type": "done", **self.store(relay.finish or "stop")})
        except ApiError as e:
            self.fail(e)
        except Exception:                          # a bug: the reply ends, and says so
            log.error("reply %d failed\n%s", self.message_id, traceback.format_exc())
            self.fail(ApiError(500, "INTERNAL_ERROR", "Internal server error"))
        finally:
            self.close()
            engine.generation_ended(self)
            engine.store.release()
            self.end_turn()
            self.ended.set()

    def flush(self):
        """The text so far into the database, once FLUSH_SECONDS have passed."""
        now = time.monotonic()
        if now - self._flushed < FLUSH_SECONDS:
            return
        self._flushed = now
        text, reasoning = "".join(self.relay.text), "".join(self.relay.reasoning)
        if self.turn.continued:
            before = self.turn.continued
            text, reasoning = before["content"] + text, (before["reasoning"] or "") + reasoning
        try:
            self.engine.store.keep_partial(self.message_id, text, reasoning)
        except sqlite3.DatabaseError as e:
            database_error(e)                      # logged; the end stores it all

    def store(self, reason):
        try:
            return finish_chat(self.engine, self.turn, self.message_id,
                               "".join(self.relay.text), "".join(self.relay.reasoning), reason,
                               self.relay.usage, self.relay.timings, self.relay.first_at)
        except sqlite3.DatabaseError as e:
            raise database_error(e) from None

    def fail(self, e):
        """End with ApiError e: what was made is kept ("aborted" when stopped
        or at shutdown, else "error"); a reply that made nothing leaves no row
        (stopped before its first token too: an error event, STOPPED)."""
        relay, stored = self.relay, None
        if e.code == "STOPPED" and (relay.text or relay.reasoning):
            try:
                self.end({"type": "done", **self.store("aborted")})
                return
            except ApiError as failure:
                e = failure
        elif (relay.text or relay.reasoning) and e.code != "NOT_FOUND" \
                and not e.code.startswith("DATABASE_"):
            try:
                stored = self.store("aborted" if e.code == "SHUTTING_DOWN" else "error")[
                    "message_id"]
            except ApiError:                       # gone meanwhile, or the database failed
                pass
        if stored is None and e.code != "NOT_FOUND":
            try:
                self.engine.store.abandon_reply(self.message_id)
            except sqlite3.DatabaseError as failure:
                database_error(failure)
        event = {"type": "error", "error": e.message, "code": e.code,
                 "user_message_id": self.turn.user_message_id, "message_id": stored}
        if e.code == "NOT_FOUND":                  # the conversation went, with its messages
            event = {"type": "error", "error": e.message, "code": e.code, **e.extra}
        else:
            e.extra.update(user_message_id=self.turn.user_message_id, message_id=stored)
        if "details" in e.extra:
            event["details"] = e.extra["details"]
        self.failure = e
        self.end(event)


def sse_numbered(batch):
    """(id, event) pairs as SSE, each with its id line."""
    return "".join(f"id: {n}\n" + sse_line(event) for n, event in batch).encode()


def start_reply(engine, turn, end_turn, here=False, follower=None):
    """The reply's row (made with its question, or now), then the reply made
    (OwnedReply.begin; `follower`, a list, is given one that follows it from
    before it begins): its OwnedReply."""
    if turn.message_id is not None:
        return made_reply(engine, turn, turn.message_id, end_turn, here, follower)
    try:
        message_id = engine.store.start_reply(
            turn.conversation_id, turn.parent_id, turn.model or None,
            continued=turn.continued["id"] if turn.continued else None,
            options=None if turn.continued or turn.asked_options is None
            else JSON.encode(turn.asked_options))
    except sqlite3.DatabaseError as e:
        raise database_error(e).with_extra(user_message_id=turn.user_message_id) from None
    if message_id is None:
        if turn.continued:
            raise validation_error("continue", "That reply is being made already")
        if engine.store.get_conversation(turn.conversation_id) is None:
            raise not_found("conversation", turn.conversation_id)
        raise not_found("message", turn.parent_id)
    return made_reply(engine, turn, message_id, end_turn, here, follower)


# A new question's commit is synced while llama.cpp reads its prompt, not
# before llama.cpp is asked: the first token costs the longer of the two, not
# both. Nothing of the reply reaches the client before the question is on
# the disk, so a reply seen is a question kept.
def sync_question(engine, turn, reply):
    """The question's commit made durable (ChatTurn.unsynced); `reply` ends
    if the disk fails (one made here has ended: it stays as it was stored)."""
    try:
        engine.store.db.sync_wal()
    except OSError as e:
        error = database_error(sqlite3.OperationalError(
            f"the database could not be synced: {e.strerror}"))
        reply.cancel(error)
        reply.ended.wait(10)
        raise error.with_extra(user_message_id=turn.user_message_id) from None
    turn.unsynced = False


def made_reply(engine, turn, message_id, end_turn, here, follower):
    reply = engine.admitted(OwnedReply(engine, turn, message_id, end_turn))
    if follower is not None:
        follower.append(reply.follow(0))       # every event, from the first token on
    return reply.begin(here)


def followed(reply, start=0, first=None, follower=None):
    """The batches a client following a reply sends (None: a keep-alive):
    `first`, what was made from character `start` on, then each batch as it
    comes, to the last. A client that leaves changes nothing for the reply."""
    follower = follower or reply.follow(start)
    try:
        if first:
            yield first
        while True:
            try:
                batch = follower.batches.get(timeout=KEEPALIVE_SECONDS)
            except queue.Empty:
                yield None
                continue
            try:                             # what else came meanwhile: one write for all
                while batch[-1:] == [] or batch[-1][1]["type"] not in ("done", "error"):
                    batch = batch + follower.batches.get_nowait()
            except queue.Empty:
                pass
            if batch:
                yield batch
                reply.first_written.set()
                if batch[-1][1]["type"] in ("done", "error"):
                    return
            if follower.let_go and follower.batches.empty():
                return                          # too slow: it comes back with Last-Event-ID
    except ClientGone:
        pass
    finally:
        reply.unfollow(follower)


def stored_answer(row):
    """The fields of a chat's answer (its "done"), for a reply as stored."""
    prompt, tokens = row["prompt_tokens"], row["estimated_tokens"]
    answer = {"response": row["content"], "model": row["model"] or "",
              "response_time_ms": row["response_time_ms"], "estimated_tokens": tokens,
              "metrics": {"completion_tokens": tokens, "prompt_tokens": prompt,
                          "total_tokens": prompt + tokens if prompt is not None
                          and tokens is not None else None,
                          "tokens_per_second": row["tokens_per_second"]},
              "finish_reason": row["finish_reason"], "conversation_id": row["conversation_id"],
              "message_id": row["id"], "user_message_id": row["parent_id"],
              "parent_id": row["parent_id"]}
    if row["reasoning"]:
        answer["reasoning"] = row["reasoning"]
    return answer


OTHERS_POLL_SECONDS = 0.5    # how often a reply another process makes is read again


def stored_reply_events(engine, row, start=0):
    """The batches for a reply this server is not making: as stored, from
    character `start` on, then `done`. One that another process is making
    (on the same file) is read again every OTHERS_POLL_SECONDS until it ends."""
    sent = start
    while True:
        reasoning, text = row["reasoning"] or "", row["content"]
        batch = []
        if sent < len(reasoning):
            batch.append((len(reasoning), {"type": "reasoning", "content": reasoning[sent:]}))
        if sent < len(reasoning) + len(text):
            batch.append((len(reasoning) + len(text), {
                "type": "delta", "content": text[max(0, sent - len(reasoning)):]}))
        sent = max(sent, len(reasoning) + len(text))
        if row["generating"] is None:
            yield batch + [(sent, {"type": "done", **stored_answer(row)})]
            return
        if batch:
            yield batch
        time.sleep(OTHERS_POLL_SECONDS)
        engine.store.interrupt_orphans()           # its process gone meanwhile: interrupted
        row = engine.store.message_row(row["id"])
        engine.store.release()
        if row is None:
            yield [(sent, {"type": "error", "error": "The message was deleted",
                           "code": "NOT_FOUND"})]
            return


###############################################################################
# Answer now: a reply's reasoning ended early, at the user's word
###############################################################################

# llama-server (since its reasoning control) ends a running completion's
# reasoning when asked (POST /v1/chat/completions/control, action
# reasoning_end; every chat is sent with reasoning_control armed), and the
# model goes on to its answer. A server without it: the reply is stopped and
# continued with thinking off, its reasoning kept and, as always, not sent.
CONTROL_PATH = "/v1/chat/completions/control"


def answer_now(engine, reply):
    """End `reply`'s reasoning: "reasoning_end" (llama-server did it),
    "continued" (stopped and continued without thinking), or None (its
    reasoning is over: it is answering already)."""
    relay = reply.relay
    if relay.text or relay.calls():
        return None
    model = reply.turn.model or None
    if relay.completion is not None:
        upstream = engine.upstream_for(model)
        status, answer = upstream.call("POST", CONTROL_PATH, {
            "id": relay.completion, "action": "reasoning_end",
            **({"model": model} if model else {})}, read_timeout=10)
        if status == 200 and isinstance(answer, dict) and answer.get("success") is True:
            return "reasoning_end"
    reply.cancel(stopped_by_request())
    reply.ended.wait(10)
    body = {"conversation_id": reply.conversation_id, "continue": reply.message_id,
            "options": {"thinking": False}, **({"model": model} if model else {})}
    end_turn = engine.turns.take(takes_turns(body))
    try:
        start_reply(engine, start_chat(engine, body), end_turn)
    except BaseException:
        end_turn()
        raise
    return "continued"


###############################################################################
# The OpenAI-compatible endpoint: /v1 relayed to llama.cpp, its chats recorded
###############################################################################

# A client's request goes to llama.cpp as it came, and llama.cpp's answer back
# as it came; a chat is recorded on the way (unless asked not to): the
# request's new messages before llama.cpp is asked, its reply after, on the
# branch the request continues.

# How an OpenAI client's roles are stored; a message of another role is
# relayed, not recorded.
STORED_ROLES = {"system": "system", "developer": "system", "user": "user",
                "assistant": "assistant", "tool": "tool", "function": "tool"}
RECORD_OFF = {"off", "false", "no", "0"}
# A request's sampling fields -> the model_options names a reply's options are kept by.
ASKED_NAMES = {upstream: name for name, (_, _, _, upstream) in MODEL_OPTIONS.items()
               if name != "max_tokens"}
ASKED_NAMES["max_completion_tokens"] = "num_predict"


# A /v1 request's media come as base64 text: a phone's photo is 20 MB of it in
# one JSON string. Parsed as it is, that text is copied three times over
# (decoded to a str, cut after its data: prefix, made bytes again) before it
# is decoded: 100 MB for one photo. So each long base64 string is lifted out
# of the body's bytes first (the body itself is relayed as it came), decoded
# from them in place, and the JSON is parsed without it: a Lifted string
# stands in its place, its bytes beside it.
LIFTABLE = re.compile(rb'"((?:data:[\w.+-]+/[\w.+-]+;base64,)?)([A-Za-z0-9+/]{4096,}={0,2})"',
                      re.A)


class Lifted(str):
    """Where a medium was in a /v1 request (lifted_json): its bytes in .data."""
    data = b""


def lifted_json(req):
    """A /v1 request's body as JSON, its long base64 strings (data: URLs,
    input_audio data) lifted out: Lifted strings in their places."""
    import binascii
    found, pieces, at, mark = {}, [], 0, secrets.token_hex(8)
    raw = req.body
    for n, m in enumerate(LIFTABLE.finditer(raw)):
        try:
            data = binascii.a2b_base64(memoryview(raw)[m.start(2):m.end(2)])
        except binascii.Error:
            continue                       # not base64 after all: parsed as it is
        key = f"{m.group(1).decode()}{mark}-{n}"
        found[key] = data
        pieces += [raw[at:m.start()], f'"{key}"'.encode()]
        at = m.end()
    if not found:
        return req.json()
    return put_back(req.json(b"".join(pieces + [raw[at:]])), found)


def put_back(value, found):
    """A parsed value with each string `found` names a Lifted with its bytes.
    (A function of the module's: one nested in lifted_json, calling itself,
    would be a reference cycle holding the photo until the next collection.)"""
    if isinstance(value, dict):
        for k, v in value.items():
            value[k] = put_back(v, found)
    elif isinstance(value, list):
        value[:] = [put_back(v, found) for v in value]
    elif isinstance(value, str) and value in found:
        lifted = Lifted(value)
        lifted.data = found[value]
        return lifted
    return value


def kept_medium(part):
    """An image or sound a content part gives as data (an image_url data URL,
    input_audio data, or what lifted_json lifted of them): (bytes, kind,
    type, None), kept as an attachment; else None."""
    if not isinstance(part, dict):
        return None
    raw = None
    if part.get("type") == "image_url" and isinstance(part.get("image_url"), dict):
        url = part["image_url"].get("url")
        raw = url if isinstance(url, str) and DATA_URL.match(url) else None
    elif part.get("type") == "input_audio" and isinstance(part.get("input_audio"), dict):
        raw = part["input_audio"].get("data")
    found = medium(raw.data if isinstance(raw, Lifted) else raw) if isinstance(raw, str) \
        else None
    return found if found and found[1] != "text" else None


def stored_text(content, kept=()):
    """A message's content as the history keeps it: its text; of a list of
    content parts, the text of each, and for each other part its type in
    brackets, but for the parts at the places `kept` names (the images and
    sounds kept as its attachments: kept_medium)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return sound_text(content)
    if isinstance(content, list):
        pieces = []
        for at, part in enumerate(content):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            elif isinstance(part, str):
                pieces.append(part)
            elif at in kept:
                pass                               # kept as an attachment
            elif isinstance(part, dict):
                pieces.append(f"[{part.get('type') or 'part'}]")
        return sound_text("\n".join(pieces))
    return sound_text(json.dumps(content, ensure_ascii=False))


def openai_messages(body):
    """(system prompt, messages as stored) of a chat request: the system
    messages before the first other one make the system prompt ("" if none).
    VALIDATION_ERROR unless `messages` is a list of objects."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise validation_error("messages", "messages must be a non-empty list of messages")
    system, sent = [], []
    for m in messages:
        if not isinstance(m, dict):
            raise validation_error("messages", "each of messages must be an object")
        role = STORED_ROLES.get(m.get("role"))
        if role is None:
            continue
        content = m.get("content")
        media = {at: kept_medium(part) for at, part in enumerate(content)} \
            if role == "user" and isinstance(content, list) else {}
        media = dict([(at, found) for at, found in media.items() if found]   # decoded once
                     [:MAX_ATTACHMENTS])           # any more: named in the text
        text = stored_text(content, media)
        if role == "system" and not sent:
            system.append(text)
            continue
        calls = m.get("tool_calls") if role == "assistant" else None
        call_id = m.get("tool_call_id", m.get("name")) if role == "tool" else None
        sent.append({"role": role, "content": text,
                     "media": list(media.values()),
                     "tool_calls": sound_text(json.dumps(calls, ensure_ascii=False))
                     if isinstance(calls, list) and calls else None,
                     "tool_call_id": sound_text(str(call_id)) if call_id is not None else None})
    return "\n\n".join(system), sent


@dataclass
class Exchange:
    """Where one chat through /v1 is recorded (conversation_id None: it is not)."""
    conversation_id: int = None
    parent_id: int = None         # the request's last message, stored: the reply goes under it
    title_pending: bool = False
    model: str = None
    asked: dict = None            # the request's sampling fields, by model_options names
    started: float = 0.0
    first_at: float = None        # when a stream's first piece came

    @property
    def depends_on(self):
        return {self.parent_id} - {None}


def asked_options(body):
    asked = {ASKED_NAMES[name]: value for name, value in body.items() if name in ASKED_NAMES}
    return asked or None


def api_conversation(engine, c, headers, system, model, now, source_id=None):
    """A conversation made through /v1 in transaction c: its id."""
    return put_conversation(
        c, title=UNTITLED, model=model or "", created_at=now, updated_at=now,
        title_pending=int(engine.settings.auto_title != "off"), system_prompt=system,
        source="api", source_id=source_id,
        client=sound_text(headers.get("User-Agent", "")[:500]) or None)


def wanted_conversation(engine, c, headers, system, model, now):
    """The conversation X-Conversation-Id names: one of ours by its id or
    UUID; else the client's own id for it (llama.cpp's web UI sends
    `<uuid>::<model>` under that name), kept as its source_id: found, or
    made. (its id, whether it was made)"""
    raw = sound_text(headers.get("X-Conversation-Id").strip())[:LIMITS["name"]]
    found = Store.conversation_named(c, raw)
    if found is not None:
        return found, False
    return api_conversation(engine, c, headers, system, model, now, raw), True


def record_question(engine, headers, body):
    """Store what the request adds to the history, in one transaction: under
    the deepest message of the branch it repeats (in the conversation
    X-Conversation-Id names, else in one made through /v1 with the same
    system prompt; the named one's current message if none), or in a new
    conversation. A request of one question (and a system prompt) opens a
    new conversation unless it names one: two that open with the same words
    are two conversations. Where its reply goes, as an Exchange."""
    system, sent = openai_messages(body)
    model = body.get("model") if isinstance(body.get("model"), str) else None
    model = sound_text(model) if model else None
    digests = [message_digest(m["role"], m["content"], m["tool_calls"], m["tool_call_id"])
               for m in sent]
    named = headers.get("X-Conversation-Id")
    now = now_iso()
    store = engine.store
    with store.db.write() as c:
        if named is not None:
            conversation_id, made = wanted_conversation(engine, c, headers, system, model, now)
            found = None if made else Tree.follow(c, digests, "m.conversation_id = ?",
                                                  (conversation_id,))
            parent, depth = found[:2] if found else (Tree.current(c, conversation_id), 0)
            if system and not made:
                Store.change_conversation(c, conversation_id, system_prompt=system)
        else:
            opening = len(sent) == 1 and sent[0]["role"] == "user"
            found = None if opening else Tree.follow(
                c, digests, "c.source = 'api' AND c.system_prompt IS ?", (system,))
            if found:
                parent, depth, conversation_id = found
            else:
                parent, depth = None, 0
                conversation_id = api_conversation(engine, c, headers, system, model, now)
        for m in sent[depth:]:
            parent = Store.put_message(c, conversation_id, parent, m["role"], m["content"],
                                       model, now, tool_calls=m["tool_calls"],
                                       tool_call_id=m["tool_call_id"],
                                       estimated_tokens=estimate_tokens(m["content"]))
            Store.attach(c, parent, m["media"])
        if depth == len(sent):                 # nothing new: a regenerate of the branch
            Store.change_conversation(c, conversation_id, current_message_id=parent,
                                      updated_at=now)
        pending = Store.change_conversation(c, conversation_id)["title_pending"]
    if any(m["media"] for m in sent):
        store.let_go_of_pages()
    return Exchange(conversation_id, parent, bool(pending), model, asked_options(body),
                    time.monotonic())


def record_reply(engine, exchange, relay, finish):
    """Store the reply a Relay gathered, under the request's last message;
    never fails the answer (a failure is logged)."""
    text, reasoning, calls = "".join(relay.text), "".join(relay.reasoning), relay.calls()
    if exchange.conversation_id is None or not (text or reasoning or calls):
        return
    elapsed_ms = round((time.monotonic() - exchange.started) * 1000)
    metrics = read_metrics(relay.usage, relay.timings, text, elapsed_ms)
    ttft = round((exchange.first_at - exchange.started) * 1000, 1) if exchange.first_at \
        else None
    model = relay.model if isinstance(relay.model, str) else exchange.model
    if model and "/" in model:            # llama-server's model path: named as /api/models does
        model = os.path.basename(model) or model
    try:
        stored = engine.store.add_message(
            exchange.conversation_id, "assistant", sound_text(text), model or None,
            parent=exchange.parent_id, reasoning=sound_text(reasoning) or None,
            response_time_ms=elapsed_ms, estimated_tokens=metrics["completion_tokens"],
            prompt_tokens=metrics["prompt_tokens"], tokens_per_second=metrics["tokens_per_second"],
            finish_reason=finish, options=JSON.encode(exchange.asked) if exchange.asked else None,
            tool_calls=sound_text(json.dumps(calls, ensure_ascii=False)) if calls else None,
            **reply_timings(relay.timings, ttft))
    except sqlite3.DatabaseError as e:
        database_error(e)                          # logged
        return
    if stored is not None and exchange.title_pending:
        engine.write_title(exchange.conversation_id, text, exchange.model)


def take_plain(relay, raw):
    """Gather a whole (not streamed) chat answer's reply into a Relay: what finish it had."""
    body = json_or_none(raw)
    choice = (body.get("choices") or [None])[0] if isinstance(body, dict) else None
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        return "error"
    relay.usage, relay.timings, relay.model = body.get("usage"), body.get("timings"), \
        body.get("model")
    for name, kept in (("content", relay.text), ("reasoning_content", relay.reasoning)):
        if isinstance(message.get(name), str):
            kept.append(message[name])
    if isinstance(message.get("tool_calls"), list):
        relay.tool_calls = dict(enumerate(c for c in message["tool_calls"] if isinstance(c, dict)))
    return finish_reason(choice)


def as_they_came(data):
    return data


def answered(waiting):
    """Run a generator that yields keep-alives to its end: what it returns."""
    while True:
        try:
            next(waiting)
        except StopIteration as end:
            return end.value


CHAT_PATH = "/v1/chat/completions"


def relay_to_llamacpp(engine, req, exchange, model=None):
    """Send the request as it came to the llama.cpp server that serves `model`
    and answer what it answers: its status, Content-Type and body, a stream
    as it arrives; a chat's reply recorded on the way. While llama.cpp reads the prompt (it
    answers nothing meanwhile), a client that leaves ends the request."""
    query = urllib.parse.urlencode(req.query, doseq=True)
    path = req.path + (f"?{query}" if query else "")
    generation = engine.generation_started(exchange, req.client)
    handed_over, upstream = False, engine.upstream_for(model)
    try:
        conn = upstream.send(req.method, path,
                             None if req.method in ("GET", "HEAD") else req.body)
        try:
            resp = answered(await_answer(engine, upstream, conn, generation))
        except ClientGone:
            raise ApiError(499, "CLIENT_GONE", "The client went away before llama.cpp "
                           "answered") from None
        kind = resp.getheader("Content-Type") or "application/json"
        headers = {"Content-Type": kind}
        if exchange.conversation_id is not None:
            headers["X-Conversation-Id"] = str(exchange.conversation_id)
        if resp.status == 200 and kind.startswith("text/event-stream"):
            handed_over = True

            def close():
                generation.close()
                engine.generation_ended(generation)
            return EventStream(relayed_stream(engine, upstream, exchange, generation, resp),
                               close, headers, as_they_came)
        try:
            raw = resp.read()
        except BaseException as e:
            conn.close()
            raise why_stopped(engine, generation) or \
                upstream_error(e, upstream.url) from None
        upstream.done_with(conn, resp)
        if resp.status == 200 and exchange.conversation_id is not None:
            relay = Relay(AsItCame())
            record_reply(engine, exchange, relay, take_plain(relay, raw))
        return Answer(raw, headers, resp.status)
    except BaseException:
        generation.close()                 # llama.cpp's request too, if it was sent
        raise
    finally:
        if not handed_over:
            engine.generation_ended(generation)


def record_stream(engine, exchange, received, ended):
    """Store the reply of a stream from the bytes received: `ended` "done"
    ([DONE] came), "cut" (the stream ended without it), "aborted" or "error".
    Read once, at the end: parsing each event as it passed would slow the
    stream (its client, llama.cpp and llama-chat share the machine's cores)."""
    if exchange.conversation_id is None:
        return
    relay, finish = Relay(AsItCame()), None
    try:
        chunks, done = parse_events(b"".join(received).rpartition(b"\n")[0])
        for chunk in chunks:
            relay.keep(relay.take(chunk))
    except ApiError:                         # llama.cpp's error event, or not an event
        finish = "error"
    else:
        if ended in ("done", "cut"):
            finish = relay.finish or ("stop" if done or ended == "done" else "error")
    record_reply(engine, exchange, relay, ended if ended in ("aborted", "error") else finish)


DONE_EVENT = b"data: [DONE]"


def relayed_stream(engine, upstream, exchange, generation, resp):
    """llama.cpp's stream passed on read by read, as it came, and recorded
    when it ends, as it ended (stop or length; aborted when the client left
    or llama-chat stopped; error when llama.cpp failed or cut it short): a
    reply that ends with [DONE] is stored before [DONE] is passed on, since
    the client's next request may repeat it. A stop of our own (shutdown,
    the conversation deleted) ends the stream with an error event in
    OpenAI's shape."""
    read = body_reader(resp)
    received, recorded = [], False          # what reached the client
    try:
        while True:
            try:
                data = read()
            except Exception as e:
                raise why_stopped(engine, generation) or upstream_error(e, upstream.url) \
                    from None
            stopped = why_stopped(engine, generation)
            if stopped:
                raise stopped
            if not data:
                break
            exchange.first_at = exchange.first_at or time.monotonic()
            end = data.find(DONE_EVENT) if not recorded else -1
            if end >= 0:
                if end:
                    yield data[:end]             # the last tokens at once, then the record
                    received.append(data[:end])
                recorded = True
                record_stream(engine, exchange, received, "done")
                data = data[end:]
            yield data
            if not recorded:
                received.append(data)
        if not recorded:
            recorded = True
            record_stream(engine, exchange, received, "cut")
    except ClientGone:
        if not recorded:
            record_stream(engine, exchange, received, "aborted")
    except ApiError as e:
        if not recorded and e.code != "NOT_FOUND":
            record_stream(engine, exchange, received,
                          "aborted" if e.code == "SHUTTING_DOWN" else "error")
        try:
            yield f"data: {JSON.encode(e.openai_body())}\n\n".encode()
        except ClientGone:
            pass


def recording(engine, req):
    return engine.settings.openai_record and req.headers.get(
        "X-LlamaChat-Record", "").strip().lower() not in RECORD_OFF


def remote_media(value):
    """The first media URL in a request that llama-server would fetch itself
    (it downloads any that starts with "http"), else None: an image_url (a
    string or {"url"}), an input_audio's data or url, a source {"type": "url"}."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            image, audio = item.get("image_url"), item.get("input_audio")
            for url in (image.get("url") if isinstance(image, dict) else image,
                        *((audio.get("data"), audio.get("url")) if isinstance(audio, dict)
                          else ()),
                        item.get("url") if item.get("type") == "url" else None):
                if isinstance(url, str) and url.lstrip()[:4].lower() == "http":
                    return url
            stack.extend(item.values())
    return None


def refuse_remote_media(engine, body):
    """No fetches on a client's behalf: llama-server would fetch a media URL
    from wherever it points (any client, or any page, could make it reach
    this machine's network), unless openai_api.allow_remote_media says so."""
    url = None if engine.settings.allow_remote_media else remote_media(body)
    if url is not None:
        raise validation_error("messages", "Media given by URL is not fetched: send it as a "
                               "data: URL (base64), or set openai_api.allow_remote_media "
                               f"(this one: {url[:200]})")


def with_project_settings(engine, req, conversation_id):
    """A request recorded into a conversation of a project is sent with
    what it leaves out that the conversation, else its project, sets: the
    system prompt (when it sends no system message) and each option. Any
    other request goes as it came."""
    conversation = engine.store.get_conversation(conversation_id)
    project = conversation and engine.store.projects.get(conversation["project_id"])
    if not project:
        return
    body = req.json()
    added = {}
    for name, value in {**(project["options"] or {}), **(conversation["options"] or {})}.items():
        added.update(check_model_options({name: value}, "options"))
    added = {k: v for k, v in added.items() if k not in body}
    prompt = conversation["system_prompt"] or project["system_prompt"]
    if prompt and not any(isinstance(m, dict) and m.get("role") in ("system", "developer")
                          for m in body["messages"]):
        added["messages"] = [{"role": "system", "content": prompt}, *body["messages"]]
    if added:
        req.body = JSON.encode({**body, **added}).encode()


def v1_chat(engine, req):
    body = lifted_json(req)
    refuse_remote_media(engine, body)
    model = body.get("model") if isinstance(body.get("model"), str) else None
    if not recording(engine, req):
        openai_messages(body)                  # a chat must have messages all the same
        return relay_to_llamacpp(engine, req, Exchange(), model)
    exchange = record_question(engine, req.headers, body)
    del body                                   # its media are not kept twice meanwhile
    with_project_settings(engine, req, exchange.conversation_id)
    return relay_to_llamacpp(engine, req, exchange, model)


v1_chat.body_up_to = "max_attachment_bytes"    # its media, as data URLs
v1_chat.waits_for_start = True                  # (api_chat says why)


def v1_relay(engine, req):
    """Every other /v1/ route llama-server offers (models, completions,
    embeddings, responses...): relayed, not recorded."""
    if req.body:
        try:
            body = json.loads(req.body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            body = None                        # llama.cpp says what is wrong with it
        refuse_remote_media(engine, body)
    model = body.get("model") if isinstance(body, dict) and isinstance(
        body.get("model"), str) else None
    return relay_to_llamacpp(engine, req, Exchange(), model)


def v1_models(engine, req):
    """Every connection's models, in OpenAI's list (the default's alone: its
    own answer, relayed)."""
    if len(engine.connections.all) == 1:
        return relay_to_llamacpp(engine, req, Exchange())
    engine.connections.refresh(wait=MODEL_LIST_WAIT)
    return {"object": "list", "data": [
        {"id": m["name"], "object": "model", "owned_by": m["connection"]}
        for m in engine.connections.models()]}


###############################################################################
# Export, import, backup
###############################################################################


def export_markdown(conversation, messages, read=None):
    """The current branch as Markdown: the title, then each message under its
    role, model and time, with its attachments (read(id): their bytes):
    images inline as data URLs, text files fenced, sounds named."""
    lines = [f"# {conversation['title']}", ""]
    if conversation.get("system_prompt"):
        lines += ["_System prompt:_ " + conversation["system_prompt"], ""]
    for m in messages:
        about = " · ".join(x for x in (m["role"].capitalize(), m.get("model"),
                                       m.get("timestamp")) if x)
        lines += [f"## {about}", ""]
        if m.get("reasoning"):
            lines += ["<details><summary>Reasoning</summary>", "", m["reasoning"], "",
                      "</details>", ""]
        for a in m.get("attachments") or ():
            lines += [markdown_attachment(a, read(a["id"]) if read else b""), ""]
        lines += [m["content"], ""]
        for call in m.get("tool_calls") or ():
            function = call.get("function") or {} if isinstance(call, dict) else {}
            lines += [f"`{function.get('name')}({function.get('arguments')})`", ""]
    return "\n".join(lines).encode()


def markdown_attachment(a, data):
    """An attachment in Markdown: an image inline, a text file fenced, a sound named."""
    name = re.sub(r"[\[\]()`*_]", "", a["name"]) or a["kind"]
    if a["kind"] == "image" and data:
        return f"![{name}](data:{a['type']};base64,{base64.b64encode(data).decode()})"
    if a["kind"] == "text" and data:
        text = data.decode("utf-8", "replace").removeprefix("\ufeff")
        fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", text)), default=0))
        return f"**{name}**\n\n{fence}\n{text.rstrip()}\n{fence}"
    return f"_{a['kind'].capitalize()}: {name} ({a['bytes']:,} bytes)_"


# A conversation to show someone: its shown branch as one HTML file that
# runs nothing and fetches nothing (inline CSS, images as data URLs). Its
# Markdown is made HTML here, every text escaped before any tag is added.
SHARED_CSS = """body{font:16px/1.5 system-ui,sans-serif;max-width:46rem;margin:2rem auto;
padding:0 1rem;color:#1d2127;background:#fff}h1{font-size:1.4rem}.m{border:1px solid #d9dde3;
border-radius:10px;padding:.6rem 1rem;margin:1rem 0}.user{background:#e8f0fe;border:0}
.who{font-size:.8rem;color:#5d6470}pre{background:#f3f4f6;padding:.6rem;overflow:auto;
border-radius:6px}code{font-family:ui-monospace,monospace;font-size:.9em}
img{max-width:100%;border-radius:6px}details{color:#5d6470}.kw{color:#8250df}.str{color:#0a7d32}
.com{color:#6e7781}@media (prefers-color-scheme:dark){body{background:#16181d;color:#e6e8eb}
.m{border-color:#343944}.user{background:#1e2a44}pre{background:#23262d}}"""
CODE_WORDS = re.compile(
    r"\b(def|class|return|if|elif|else|for|while|in|import|from|as|with|try|except|finally|"
    r"raise|lambda|yield|async|await|function|const|let|var|new|this|fn|pub|struct|impl|use|"
    r"match|int|char|void|public|private|static|true|false|True|False|None|null)\b")


def highlighted(code):
    """Code escaped, its strings, comments and common keywords marked."""
    out, at = [], 0
    for m in re.finditer(r'("(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\')|((?:#|//)[^\n]*)', code):
        out.append(CODE_WORDS.sub(r'<span class="kw">\1</span>', html.escape(code[at:m.start()])))
        kind = "str" if m.group(1) else "com"
        out.append(f'<span class="{kind}">{html.escape(m.group())}</span>')
        at = m.end()
    out.append(CODE_WORDS.sub(r'<span class="kw">\1</span>', html.escape(code[at:])))
    return "".join(out)


def inline_html(text):
    """A line's Markdown: `code`, **bold**, *emphasis*, [links](http...) (the
    text escaped first; a link only to http(s), never a script)."""
    pieces = re.split(r"(`[^`]+`)", text)
    out = []
    for n, piece in enumerate(pieces):
        if n % 2:
            out.append(f"<code>{html.escape(piece[1:-1])}</code>")
            continue
        piece = html.escape(piece)
        piece = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", piece)
        piece = re.sub(r"(?<![*\w])\*(?!\s)(.+?)(?<!\s)\*(?![*\w])", r"<em>\1</em>", piece)
        piece = re.sub(r"\[([^\]]+)\]\((https?://[^\s)\"<>]+)\)",
                       r'<a href="\2" rel="noreferrer">\1</a>', piece)
        out.append(piece)
    return "".join(out)


LIST_MARK = re.compile(r"^\s*([-*+]|\d+[.)])\s+")


def markdown_html(text):
    """Markdown as HTML: fenced code (highlighted), headings, lists, quotes,
    paragraphs, and inline_html within them."""
    out = []
    for n, block in enumerate(re.split(r"^```[^\n]*\n(.*?)^```[ \t]*$", text, flags=re.S | re.M)):
        if n % 2:
            out.append(f"<pre><code>{highlighted(block.rstrip(chr(10)))}</code></pre>")
            continue
        for para in re.split(r"\n\s*\n", block.strip()):
            lines = para.split("\n")
            if not para.strip():
                continue
            heading = re.match(r"(#{1,6})\s+(.*)", para)
            if heading and len(lines) == 1:
                level = min(len(heading.group(1)) + 1, 6)
                out.append(f"<h{level}>{inline_html(heading.group(2))}</h{level}>")
            elif all(re.match(r"\s*([-*+]|\d+[.)])\s", line) for line in lines):
                tag = "ol" if re.match(r"\s*\d", lines[0]) else "ul"
                items = "".join(f"<li>{inline_html(LIST_MARK.sub('', x))}</li>" for x in lines)
                out.append(f"<{tag}>{items}</{tag}>")
            elif all(line.startswith(">") for line in lines):
                out.append("<blockquote>" + "<br>".join(
                    inline_html(line[1:].strip()) for line in lines) + "</blockquote>")
            else:
                out.append("<p>" + "<br>".join(inline_html(line) for line in lines) + "</p>")
    return "\n".join(out)


def export_html(conversation, messages, read=None):
    """The shown branch as one self-contained HTML file (bytes): no script,
    nothing fetched; images inline, text files folded, reasoning collapsed."""
    parts = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
             f'<meta name="viewport" content="width=device-width, initial-scale=1">'
             f'<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
             f'style-src \'unsafe-inline\'; img-src data:">'
             f"<title>{html.escape(conversation['title'])}</title><style>{SHARED_CSS}</style>"
             f"</head><body><h1>{html.escape(conversation['title'])}</h1>"]
    for m in messages:
        about = " · ".join(x for x in (m["role"].capitalize(), m.get("model"),
                                       m.get("timestamp")) if x)
        parts.append(f'<div class="m {html.escape(m["role"])}"><div class="who">'
                     f"{html.escape(about)}</div>")
        if m.get("reasoning"):
            parts.append(f"<details><summary>Reasoning</summary>"
                         f"{markdown_html(m['reasoning'])}</details>")
        for a in m.get("attachments") or ():
            data = read(a["id"]) if read else b""
            name = html.escape(a["name"])
            if a["kind"] == "image" and data:
                parts.append(f'<img alt="{name}" src="data:{html.escape(a["type"])};base64,'
                             f'{base64.b64encode(data).decode()}">')
            elif a["kind"] == "text" and data:
                text = html.escape(data.decode("utf-8", "replace"))
                parts.append(f"<details><summary>{name}</summary><pre><code>{text}</code></pre>"
                             "</details>")
            else:
                parts.append(f"<p><em>{a['kind'].capitalize()}: {name}</em></p>")
        parts.append(markdown_html(m["content"]) if m["role"] == "assistant" else
                     "<p>" + html.escape(m["content"]).replace("\n", "<br>") + "</p>")
        parts.append("</div>")
    parts.append("</body></html>\n")
    return "".join(parts).encode()


def download_name(title, extension):
    """A file name for a download: the title's letters and digits, else the date."""
    stem = re.sub(r"[^\w-]+", "-", unicodedata.normalize("NFKD", title or "")
                  .encode("ascii", "ignore").decode()).strip("-")[:60]
    return f"{stem or 'llama-chat-' + now_iso()[:10]}.{extension}"


def attachment(name, kind):
    return {"Content-Type": kind, "Content-Disposition": f'attachment; filename="{name}"',
            "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


# Reading a file to import: JSON read a piece at a time, so that a 500 MB
# export never sits in memory whole: only the item being read does. A value
# cut by the end of a piece is read again with at least as much more, so that
# a long value costs time in proportion to its length, not to its square.
READ_PIECE = 1 << 20
MAX_ITEM_CHARS = 64 << 20       # one conversation of a file, read whole


class JsonPieces:
    """JSON values read one after another from a binary file (a JSONL file,
    or one value), and the elements of an array one by one. Errors say
    where in the file (line and column) they are."""

    def __init__(self, f):
        self.f, self.text, self.at, self.ended = f, "", 0, False
        self.lines, self.column = 1, 1        # where self.text begins in the file
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.raw = json.JSONDecoder()

    def more(self, size=READ_PIECE):
        if self.ended:
            return False
        data = self.f.read(size)
        self.ended = not data
        try:
            added = self.decoder.decode(data, final=self.ended)
        except UnicodeDecodeError as e:
            raise ValueError(f"the file is not UTF-8 text ({e.reason}) after {self.where()}") \
                from None
        if not added:
            return bool(data)
        read = self.text[:self.at]
        newlines = read.count("\n")
        self.lines += newlines
        self.column = (self.at - read.rfind("\n")) if newlines else self.column + self.at
        self.text, self.at = self.text[self.at:] + added, 0
        return bool(data)

    def where(self, at=None):
        """Line and column in the file of position `at` of the text held."""
        before = self.text[:self.at if at is None else at]
        newlines = before.count("\n")
        column = len(before) - before.rfind("\n") if newlines else self.column + len(before)
        return f"line {self.lines + newlines:,}, column {column:,}"

    def peek(self):
        """The next character that is not white space ("" at the end)."""
        while True:
            while self.at < len(self.text) and self.text[self.at] in " \t\r\n":
                self.at += 1
            if self.at < len(self.text):
                return self.text[self.at]
            if not self.more():
                return ""

    def take(self, char):
        if self.peek() != char:
            raise ValueError(f"expected {char!r} at {self.where()}")
        self.at += 1

    def value(self):
        """The next whole value; a value cut by the end of a piece waits for more."""
        self.peek()
        while True:
            try:
                value, end = self.raw.raw_decode(self.text, self.at)
            except json.JSONDecodeError as e:
                if self.grow():
                    continue
                raise ValueError(f"the JSON ends early or is broken at {self.where(e.pos)}: "
                                 f"{e.msg}") from None
            if end == len(self.text) and not self.ended and not isinstance(value, (dict, list)):
                self.grow()                      # a number may go on in the next piece
                continue
            self.at = end
            return value

    def grow(self):
        """More of the file for a value not whole yet: as much again as is held."""
        held = len(self.text) - self.at
        if held > MAX_ITEM_CHARS:
            raise ValueError(f"one item of the file, at {self.where()}, is longer than "
                             f"{MAX_ITEM_CHARS:,} characters")
        return self.more(max(READ_PIECE, held))

    def elements(self):
        """The elements of the array that comes next."""
        self.take("[")
        if self.peek() == "]":
            self.at += 1
            return
        while True:
            yield self.value()
            char = self.peek()
            if char not in (",", "]"):
                raise ValueError(f"the JSON array is broken at {self.where()}")
            self.at += 1
            if char == "]":
                return


def json_items(f, seen):
    """The items of a JSON file: the elements of a top-level array, the
    conversations of llama-chat's export of everything (the members before
    them read first), or each top-level value (one object, or JSONL).
    seen["array"] is set when the file holds an array (an empty one is an
    empty import, not an error)."""
    reader = JsonPieces(f)
    while True:
        char = reader.peek()
        if char == "":
            return
        if char == "[":
            seen["array"] = True
            yield from reader.elements()
        elif char == "{":
            reader.take("{")
            head, streamed = {}, False
            while reader.peek() not in ("}", ""):
                key = reader.value()
                reader.take(":")
                if key == "conversations" and head.get("format") == "llama-chat" \
                        and reader.peek() == "[":
                    streamed = seen["array"] = True
                    for item in reader.elements():
                        yield {"format": "llama-chat", **item} if isinstance(item, dict) else item
                else:
                    head[key] = reader.value()
                if reader.peek() == ",":
                    reader.at += 1
            reader.take("}")
            if not streamed:
                yield head
        else:
            raise ValueError(f"the file holds no JSON object or array (at {reader.where()})")


@dataclass
class Imported:
    """A conversation from another program, ready to check and store: messages in
    an order where each comes after its parent, by their keys there."""
    source: str
    source_id: str
    title: object
    created_at: object = None
    updated_at: object = None
    model: object = ""
    system_prompt: object = None
    options: object = None        # a dict, as the API takes it
    pinned: bool = False
    current: object = None        # the key of the message shown
    messages: list = field(default_factory=list)    # dicts: key, parent, role, content...
    client: object = None
    uuid: object = None           # its id in llama-chat, where it comes from one
    project: object = None        # {"name", "system_prompt", "options"}: found by name, or made


def iso_time(value, unit=1.0):
    """A time as llama-chat keeps it: text as it is (checked on import); a
    number of seconds (unit 1) or milliseconds (unit 0.001) since 1970
    converted; else None."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        try:
            moment = datetime.fromtimestamp(value * unit, timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return None


def in_tree_order(nodes, parent_of):
    """Keys of `nodes` (a dict) with each parent before its children (roots:
    no parent, or one that is missing); a cycle's members come out as roots."""
    children, roots = {}, []
    for key in nodes:
        parent = parent_of(key)
        (children.setdefault(parent, []) if parent in nodes and parent != key
         else roots).append(key)
    order, seen, stack = [], set(), list(reversed(roots))
    while stack or len(seen) < len(nodes):
        if not stack:                     # what a cycle left unreached
            stack = [next(k for k in nodes if k not in seen)]
        key = stack.pop()
        if key in seen:
            continue
        seen.add(key)
        order.append(key)
        stack.extend(reversed(children.get(key, [])))
    return order


def tree_messages(nodes, parent_of, message_of, current):
    """Imported messages of a tree of `nodes`: message_of(node) is a message
    dict (role, content, ...) or None for a node that holds none (a root, a
    hidden system message), whose children then hang from its parent; a
    leading system message becomes the system prompt. (messages, system
    prompt, the key of the message shown)."""
    kept, moved, system = [], {}, None
    for key in in_tree_order(nodes, parent_of):
        parent = parent_of(key)
        parent = moved.get(parent, parent) if parent in nodes else None
        message = message_of(nodes[key])
        if message is not None and message["role"] == "system" and not message["content"]:
            message = None                     # an empty system message (a tree's root)
        if message is not None and message["role"] == "system" and parent is None \
                and system is None:
            system, message = message["content"], None
        if message is None:
            moved[key] = parent
            continue
        kept.append({"key": key, "parent": parent, **message})
    while current in moved:
        current = moved[current]
    return kept, system, current


def attachment_note(extra):
    """An attachment of llama.cpp's web UI that is not kept as one (a video,
    an MCP resource, a file of a kind llama-chat does not keep), named in its
    message's text with the text it carries."""
    kind = extra_kind(extra)
    name = extra.get("name") if isinstance(extra.get("name"), str) else "unnamed"
    note = f"\n\n[{kind}: {name}]"
    if isinstance(extra.get("content"), str) and kind not in ("image", "audio", "video"):
        note += "\n" + extra["content"]
    return note


def extra_kind(extra):
    """The kind of an attachment of llama.cpp's web UI: its type, of the
    current names (IMAGE, AUDIO, TEXT, PDF, VIDEO) or older ones (imageFile,
    textFile, context...), as image, audio, text, pdf, video..."""
    kind = extra.get("type") if isinstance(extra.get("type"), str) else "attachment"
    return {"context": "text"}.get(kind, kind).lower().removesuffix("file") or "attachment"


def extra_medium(extra):
    """An attachment of llama.cpp's web UI as one of llama-chat's (medium), or
    None: an image (base64Url), a sound (base64Data), a text file or a
    PDF's text (content)."""
    kind, name = extra_kind(extra), extra.get("name")
    if kind == "image":
        data = extra.get("base64Url")
    elif kind == "audio":
        data = extra.get("base64Data")
    elif kind in ("text", "pdf") and isinstance(extra.get("content"), str):
        data = sound_text(extra["content"]).encode()
    else:
        return None
    found = medium(data, name if isinstance(name, str) else None) \
        if isinstance(data, (str, bytes)) and data else None
    return found if found and (found[1] == "text") == (kind in ("text", "pdf")) else None


def from_llamacpp(conv, messages):
    """llama.cpp's web UI: a conversation (id, name, currNode, lastModified,
    pinned) and its messages (id, parent, type, role, content,
    reasoningContent or thinking, timestamp in ms, model, timings, toolCalls
    (a list, or JSON text), toolCallId, extra: attachments)."""
    nodes = {str(m.get("id")): m for m in messages if isinstance(m, dict)}

    def message_of(m):
        role = STORED_ROLES.get(m.get("role"))
        if role is None or m.get("type") == "root":
            return None
        content, media = stored_text(m.get("content")), []
        for extra in m.get("extra") if isinstance(m.get("extra"), list) else ():
            if isinstance(extra, dict):
                found = extra_medium(extra)
                if found:
                    media.append(found)
                else:
                    content += attachment_note(extra)
        timings = m.get("timings") if isinstance(m.get("timings"), dict) else {}
        made, took = timings.get("predicted_n"), timings.get("predicted_ms")
        speed = round(made / took * 1000, 1) if all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
            for v in (made, took)) else None
        return {"role": role, "content": content,
                "reasoning": m.get("reasoningContent") or m.get("thinking") or None,
                "model": m.get("model"), "timestamp": iso_time(m.get("timestamp"), 0.001),
                "estimated_tokens": made, "prompt_tokens": timings.get("prompt_n"),
                "tokens_per_second": speed, "tool_calls": m.get("toolCalls"),
                "tool_call_id": m.get("toolCallId"), "media": media,
                **{name: timings.get(name) for name in TIMING_COLUMNS if name != "ttft_ms"}}
    kept, system, current = tree_messages(
        nodes, lambda k: str(nodes[k].get("parent")) if nodes[k].get("parent") else None,
        message_of, str(conv.get("currNode")))
    when = iso_time(conv.get("lastModified"), 0.001)
    return Imported("llama.cpp-webui", str(conv.get("id")), conv.get("name"), when, when,
                    system_prompt=system, pinned=conv.get("pinned") is True, current=current,
                    messages=kept)


# Open WebUI keeps a reply's reasoning in its text: <details type="reasoning"
# ...><summary>Thought for 3 seconds</summary> and the reasoning's lines,
# quoted ("> ") and HTML-escaped, then </details>.
OPEN_WEBUI_REASONING = re.compile(
    r'<details type="reasoning"[^>]*>\s*(?:<summary>.*?</summary>)?(.*?)</details>\s*', re.S)


def open_webui_reasoning(text):
    """A reply's text of Open WebUI without its reasoning, and the reasoning."""
    found = []

    def taken(match):
        import html
        lines = html.unescape(match.group(1)).strip("\n").split("\n")
        found.append("\n".join(re.sub(r"^> ?", "", line) for line in lines).strip())
        return ""
    if "<details" not in text:
        return text, None
    rest = OPEN_WEBUI_REASONING.sub(taken, text)
    return (rest.strip() if found else text), "\n\n".join(r for r in found if r) or None


def from_open_webui(chat):
    """Open WebUI: a chat {id, title, created_at, updated_at (seconds), pinned,
    chat: {models, params.system or system, history: {messages by id with
    parentId, currentId}}}; a reply's reasoning inside its text."""
    body = chat.get("chat") if isinstance(chat.get("chat"), dict) else {}
    history = body.get("history") if isinstance(body.get("history"), dict) else {}
    messages = history.get("messages") if isinstance(history.get("messages"), dict) else {}
    nodes = {str(k): v for k, v in messages.items() if isinstance(v, dict)}

    def message_of(m):
        role = STORED_ROLES.get(m.get("role"))
        if role is None:
            return None
        info = m.get("usage") if isinstance(m.get("usage"), dict) else {}
        media, files = [], ""
        for f in m.get("files") if isinstance(m.get("files"), list) else ():
            found = medium(f["url"], f.get("name") if isinstance(f.get("name"), str) else None) \
                if isinstance(f, dict) and isinstance(f.get("url"), str) and \
                DATA_URL.match(f["url"]) else None
            if found:
                media.append(found)
            elif isinstance(f, dict):
                files += f"\n\n[file: {stored_text(f.get('name') or f.get('type') or 'unnamed')}]"
        text, reasoning = stored_text(m.get("content")), None
        if role == "assistant":
            text, reasoning = open_webui_reasoning(text)
        return {"role": role, "content": text + files, "reasoning": reasoning, "media": media,
                "model": m.get("model"), "timestamp": iso_time(m.get("timestamp")),
                "estimated_tokens": info.get("completion_tokens"),
                "prompt_tokens": info.get("prompt_tokens")}
    kept, system, current = tree_messages(
        nodes, lambda k: str(nodes[k].get("parentId")) if nodes[k].get("parentId") else None,
        message_of, str(history.get("currentId")))
    params = body.get("params") if isinstance(body.get("params"), dict) else {}
    system = params.get("system") or body.get("system") or system
    models = body.get("models") if isinstance(body.get("models"), list) else []
    return Imported("open-webui", str(chat.get("id") or body.get("id")),
                    chat.get("title") or body.get("title"),
                    iso_time(chat.get("created_at")), iso_time(chat.get("updated_at")),
                    model=models[0] if models else "", system_prompt=system or None,
                    pinned=chat.get("pinned") is True, current=current, messages=kept)


def chatgpt_text(content, asset=None):
    """ChatGPT's content of a message as text, and its thoughts (reasoning).
    asset(part): an image part's file as an attachment (medium), or None; a
    part it gives is left out of the text."""
    if not isinstance(content, dict):
        return "", None
    kind = content.get("content_type")
    if kind == "code":
        return f"```{content.get('language') or ''}\n{stored_text(content.get('text'))}\n```", None
    if kind == "execution_output":
        return f"```\n{stored_text(content.get('text'))}\n```", None
    if kind == "thoughts":
        thoughts = [t for t in content.get("thoughts") or () if isinstance(t, dict)]
        return "", "\n\n".join(stored_text(t.get("content") or t.get("summary")) for t in thoughts)
    if kind == "reasoning_recap":
        return "", None
    if kind == "tether_browsing_display":          # what a search or a page gave
        return stored_text(content.get("result") or content.get("summary")), None
    if kind == "tether_quote":
        return "\n".join(stored_text(content.get(k)) for k in ("title", "url", "text")
                         if isinstance(content.get(k), str) and content[k]), None
    parts = []
    for part in content.get("parts") or ([content["text"]] if "text" in content else ()):
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict) and not (asset and asset(part)):
            kind = part.get("content_type") or "attachment"
            parts.append(stored_text(part.get("text")) if isinstance(part.get("text"), str)
                         else f"[{kind}]")
    return sound_text("\n".join(p for p in parts if p)), None


def from_chatgpt(conversation, assets=None):
    """ChatGPT's conversations.json: {title, create_time, update_time (seconds),
    mapping: {node: {message, parent, children}}, current_node}. Thoughts go
    to the reply that follows them as its reasoning; the custom instructions
    (a hidden node) become the system prompt; memory notes are left out (they
    are ChatGPT's, not the conversation's), and so are messages with no text.
    assets(pointer): the file a ZIP holds for an image's asset_pointer
    (medium), or None."""
    mapping = conversation.get("mapping") if isinstance(conversation.get("mapping"), dict) else {}
    nodes = {str(k): v for k, v in mapping.items() if isinstance(v, dict)}
    thoughts = {}

    def parent_of(key):
        parent = nodes[key].get("parent")
        return str(parent) if parent is not None else None

    def message_of(node):
        m = node.get("message") if isinstance(node.get("message"), dict) else None
        if m is None:
            return None
        content = m.get("content") if isinstance(m.get("content"), dict) else {}
        kind = content.get("content_type")
        if kind == "user_editable_context":
            text = "\n\n".join(content[k] for k in ("user_profile", "user_instructions")
                               if isinstance(content.get(k), str) and content[k].strip())
            return {"role": "system", "content": sound_text(text)} if text else None
        author = m.get("author") if isinstance(m.get("author"), dict) else {}
        role = STORED_ROLES.get(author.get("role"))
        media = []

        def asset(part):
            pointer = part.get("asset_pointer")
            found = assets(pointer) if assets and isinstance(pointer, str) else None
            if found:
                media.append(found)
            return found
        text, reasoning = chatgpt_text(content, asset)
        metadata = m.get("metadata") if isinstance(m.get("metadata"), dict) else {}
        if reasoning is not None:
            thoughts[id(node)] = reasoning
        if role is None or not (text.strip() or media) or (
                role == "system" and metadata.get("is_visually_hidden_from_conversation")):
            return None
        return {"role": role, "content": text, "model": metadata.get("model_slug"),
                "timestamp": iso_time(m.get("create_time")), "media": media}
    kept, system, current = tree_messages(nodes, parent_of, message_of,
                                          str(conversation.get("current_node")))
    # Thoughts: to the first reply below them.
    by_key = {m["key"]: m for m in kept}
    for key, node in nodes.items():
        if id(node) in thoughts and thoughts[id(node)]:
            below = [c for c in (node.get("children") or ()) if str(c) in nodes]
            while below:
                child = str(below.pop(0))
                if child in by_key and by_key[child]["role"] == "assistant":
                    by_key[child]["reasoning"] = thoughts[id(node)]
                    break
                below = [c for c in (nodes[child].get("children") or ()) if str(c) in nodes] \
                    + below
    ident = conversation.get("conversation_id") or conversation.get("id")
    return Imported("chatgpt", str(ident), conversation.get("title"),
                    iso_time(conversation.get("create_time")),
                    iso_time(conversation.get("update_time")), system_prompt=system,
                    current=current, messages=kept)


def from_llama_chat(item):
    """llama-chat's own export: {"conversation", "messages"} (ids and parents as here)."""
    c = item.get("conversation")
    if not isinstance(c, dict) or not isinstance(item.get("messages"), list):
        raise ValueError("a llama-chat conversation has 'conversation' and 'messages'")
    nodes = {m.get("id"): m for m in item["messages"] if isinstance(m, dict)}

    def message_of(m):
        role = m.get("role") if m.get("role") in ("system", "user", "assistant", "tool") \
            else None
        if role is None:
            return None
        media = [medium((files.get(a.get("id")) or {}).get("data"), a.get("name"))
                 for a in m.get("attachments") or () if isinstance(a, dict)] \
            if isinstance(m.get("attachments"), list) else []
        return {**{name: m.get(name) for name in MESSAGE_CHECKS}, "role": role,
                "media": [found for found in media if found]}
    files = {k: v for k, v in item["attachments"].items() if isinstance(v, dict)} \
        if isinstance(item.get("attachments"), dict) else {}
    kept, _, current = tree_messages(nodes, lambda k: nodes[k].get("parent_id"), message_of,
                                     c.get("current_message_id"))
    source = c.get("source") if c.get("source") not in (None, "api") else "llama-chat"
    ident = c.get("source_id") if c.get("source") not in (None, "api") else c.get("id")
    return Imported(source, str(ident), c.get("title"), c.get("created_at"),
                    c.get("updated_at"), c.get("model") or "", c.get("system_prompt"),
                    c.get("options"), c.get("pinned") is True, current, kept, c.get("client"),
                    c.get("uuid"), c.get("project"))


EXPECTED = ("llama-chat's JSON or JSONL export; llama.cpp's web UI export (JSONL, ZIP or "
            "JSON); Open WebUI's chat export; ChatGPT's conversations.json or its ZIP")


def conversations_in(items, assets=None):
    """(format, Imported) for each conversation in a file's items; ValueError
    on one that none of the formats explains (assets: a ZIP's images, for
    ChatGPT's: zip_assets). llama.cpp's web UI's JSONL is
    a session line followed by its message lines (each message under
    "message"); a line of another type there is of a later version, and left."""
    session = None
    for n, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise ValueError(f"item {n:,} of the file is not an object; expected {EXPECTED}")
        kind = item.get("type")
        if kind == "session":
            if session:
                yield "llama.cpp-webui", from_llamacpp(*session)
            session = (item, [])
            continue
        if kind == "message" and not ("conversation" in item and "messages" in item):
            if session is None or not isinstance(item.get("message"), dict):
                raise ValueError(f"item {n:,} of the file is a message line " + (
                    "with no message object" if session else "before any session line")
                    + " (llama.cpp's web UI JSONL)")
            session[1].append(item["message"])
            continue
        if session and isinstance(kind, str):
            continue
        if session:
            yield "llama.cpp-webui", from_llamacpp(*session)
            session = None
        if "conversation" in item and "messages" in item:
            yield "llama-chat", from_llama_chat(item)
        elif isinstance(item.get("conv"), dict):
            messages = item.get("messages")
            yield "llama.cpp-webui", from_llamacpp(item["conv"], messages
                                                   if isinstance(messages, list) else [])
        elif isinstance(item.get("mapping"), dict):
            yield "chatgpt", from_chatgpt(item, assets)
        elif isinstance(item.get("chat"), dict) and "history" in item["chat"]:
            yield "open-webui", from_open_webui(item)
        else:
            raise ValueError(f"item {n:,} of the file is a conversation of no format known "
                             f"here (its fields: {', '.join(map(str, list(item)[:8]))}); "
                             f"expected {EXPECTED}")
    if session:
        yield "llama.cpp-webui", from_llamacpp(*session)


ZIP_MAGIC = b"PK\x03\x04"


def zip_assets(archive, members, inflated_limit):
    """The images of a ChatGPT ZIP, by their asset pointers: assets(pointer)
    (file-service://file-ID or sediment://file_ID) is the member whose name
    starts with ID (ChatGPT names them "file-ID-photo.jpg"), read as an
    attachment (medium), or None."""
    import zipfile
    import zlib
    by_id = {}
    for info in members:
        base = info.filename.rsplit("/", 1)[-1]
        head = re.match(r"(file[-_][A-Za-z0-9]+)[-.]?", base)
        if head and (inflated_limit is None or info.file_size <= inflated_limit):
            by_id.setdefault(head.group(1), (info, base[head.end():] or base))

    def assets(pointer):
        found = by_id.get(pointer.rsplit("://", 1)[-1])
        if found is None:
            return None
        try:
            with archive.open(found[0]) as member:
                return medium(member.read(), found[1])
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError,
                RuntimeError):          # a member that cannot be read: no image
            return None
    return assets


def file_conversations(f, inflated_limit, seen):
    """(format, Imported) for each conversation of a file to import: JSON,
    JSONL or a ZIP of them, told apart by content. A ZIP's members are read,
    never written anywhere (a path such as ../x goes nowhere): ChatGPT's
    conversations.json if it has one, else every .json and .jsonl in it, if
    they inflate to inflated_limit bytes at most (None: any size). zipfile
    reads a member up to the size the ZIP gives it, never past (a member
    that holds more fails its CRC check there)."""
    start = f.read(4)
    f.seek(0)
    if start != ZIP_MAGIC:
        yield from conversations_in(json_items(f, seen))
        return
    import zipfile
    import zlib
    try:
        archive = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"the ZIP file cannot be read: {e}") from None
    members = [i for i in archive.infolist() if not i.is_dir()]
    chosen = [i for i in members if i.filename.rsplit("/", 1)[-1] == "conversations.json"] or \
        [i for i in members if i.filename.lower().endswith((".json", ".jsonl"))]
    if not chosen:
        raise ValueError(f"the ZIP holds no .json or .jsonl file; expected {EXPECTED}")
    assets = zip_assets(archive, [i for i in members if i not in chosen], inflated_limit)
    declared = sum(i.file_size for i in chosen)
    if inflated_limit is not None and declared > inflated_limit:
        raise ValueError(f"the ZIP inflates to {declared:,} bytes, more than the "
                         f"{inflated_limit:,} an import takes (max_import_bytes)")
    for info in chosen:
        try:
            with archive.open(info) as member:
                yield from conversations_in(json_items(member, seen), assets)
        except (ValueError, zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError,
                RuntimeError) as e:
            raise ValueError(f"{info.filename} in the ZIP: {e}") from None


# An imported value is stored as the API would store it: each field of a
# conversation and of a message is checked by its kind (and, for text, the
# API's limits); a value that does not fit is cut or left out, and counted.
ISO_TIME = re.compile(r"\d{4}-\d\d-\d\d(?:[T ]\d\d:\d\d(?::\d\d(?:\.\d{1,9})?)?)?"
                      r"(?:Z|[+-]\d\d:?\d\d)?\Z", re.ASCII)
UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z",
                       re.ASCII | re.IGNORECASE)
CONVERSATION_CHECKS = {"title": ("text", LIMITS["title"]), "model": ("name", LIMITS["model"]),
                       "system_prompt": ("text", LIMITS["system_prompt"]),
                       "options": ("options",), "created_at": ("time",),
                       "updated_at": ("time",), "client": ("name", LIMITS["name"]),
                       "uuid": ("uuid",), "project": ("project",)}
MESSAGE_CHECKS = {"content": ("text", LIMITS["content"]),
                  "reasoning": ("text", LIMITS["content"]), "model": ("name", LIMITS["model"]),
                  "timestamp": ("time",), "edited_at": ("time",), "response_time_ms": ("count",),
                  "estimated_tokens": ("count",), "prompt_tokens": ("count",),
                  "tokens_per_second": ("amount",), "finish_reason": ("finish",),
                  "options": ("options",), "tool_calls": ("calls",),
                  "tool_call_id": ("name", LIMITS["name"]),
                  "attachments_left_out": ("ids",),
                  **{name: ("count",) if kind == "INTEGER" else ("amount",)
                     for name, kind in TIMING_COLUMNS.items()}}
FINISH_REASONS = {"stop", "length", "aborted", "error", "interrupted", "tool_calls",
                  "content_filter"}


def checked_value(check, value):
    """(the value as it is stored, why it was changed: None if it was not)."""
    kind = check[0]
    if value is None:
        return None, None
    if kind in ("text", "name"):
        if not isinstance(value, str):
            return None, "is not text"
        value = sound_text(value)
        if len(value) <= check[1]:
            return value, None
        return (value[:check[1]], f"is longer than {check[1]:,} characters: cut") \
            if kind == "text" else (None, f"is longer than {check[1]:,} characters")
    if kind == "time":
        return (value, None) if isinstance(value, str) and ISO_TIME.match(value) else \
            (None, "is not an ISO time")
    if kind == "uuid":
        return (value.lower(), None) if isinstance(value, str) and UUID_TEXT.match(value) \
            else (None, "is not a UUID")
    if kind in ("count", "amount"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0 <= value <= 2**53:               # NaN is not either
            return None, "is not a number from 0 to 2**53"
        if kind == "count" and value != int(value):
            return None, "is not a whole number"
        return (int(value) if kind == "count" else value), None
    if kind == "ids":
        return (JSON.encode(value), None) if isinstance(value, list) and value and all(
            isinstance(i, str) and ATTACHMENT_ID.match(i) for i in value) else \
            (None, "is not a list of attachment ids")
    if kind == "attachments":
        return None, f"are more than {MAX_ATTACHMENTS}: the first {MAX_ATTACHMENTS} kept"
    if kind == "project":
        name = value.get("name") if isinstance(value, dict) else None
        if not isinstance(name, str) or not sound_text(name).strip():
            return None, "has no name: left out"
        prompt, why = checked_value(("text", LIMITS["system_prompt"]), value.get("system_prompt"))
        options, why = checked_value(("options",), value.get("options")) if why is None \
            else (None, why)
        return {"name": sound_text(name).strip()[:LIMITS["name"]], "system_prompt": prompt,
                "options": options and json.loads(options)}, \
            why and f"{why} (its system_prompt or options)"
    if kind == "finish":
        return (value, None) if isinstance(value, str) and value in FINISH_REASONS else \
            (None, "is not a finish reason: " + ", ".join(sorted(FINISH_REASONS)))
    if kind == "options":
        if not isinstance(value, dict):
            return None, "is not an object"
        try:
            check_model_options(value, "options")
        except ApiError as e:
            return None, f"left out ({e.message})"
        kept = {k: v for k, v in value.items() if v is not None}
        return (JSON.encode(kept) if kept else None), None
    if isinstance(value, str):                         # calls: JSON text, "" for none
        if not value.strip():
            return None, None
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            return None, "is not JSON"
    if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
        return None, "is not a list of calls"
    return (JSON.encode(value) if value else None), None


class Coercions:
    """Values of a file stored otherwise than it gave them: counted, and the
    first few said, for the import's answer."""
    SHOWN = 5

    def __init__(self):
        self.count, self.said = 0, []

    def checked(self, checks, found, where):
        """found's fields by `checks`, as stored (those it does not give: None)."""
        row = dict.fromkeys(checks)
        for name, value in found.items():
            check = checks.get(name)
            if check is None or value is None:
                continue
            row[name], why = checked_value(check, value)
            if why:
                self.count += 1
                if len(self.said) < self.SHOWN:
                    self.said.append(f"{where}: {name} {why}")
        return row


def checked_conversation(conv, where, coercions):
    """An imported conversation as it is stored (Imported, its messages rows
    of MESSAGE_CHECKS): every field checked, coerced where it must be."""
    row = coercions.checked(CONVERSATION_CHECKS, vars(conv), where)
    messages = []
    for m in conv.messages:
        checked = coercions.checked(MESSAGE_CHECKS, m, f"{where}, message {m['key']}")
        checked["content"] = checked["content"] or ""
        if m["role"] == "assistant":
            checked["finish_reason"] = checked["finish_reason"] or "stop"
        else:
            checked["finish_reason"] = None
        media = m.get("media") or ()
        if len(media) > MAX_ATTACHMENTS:
            coercions.checked({"attachments": ("attachments",)}, {"attachments": media},
                              f"{where}, message {m['key']}")
        messages.append({"key": m["key"], "parent": m["parent"], "role": m["role"], **checked,
                         "media": media[:MAX_ATTACHMENTS]})
    row.update(title=(row["title"] or "").strip() or UNTITLED, model=row["model"] or "",
               source=sound_text(conv.source)[:LIMITS["name"]],
               source_id=sound_text(conv.source_id)[:LIMITS["name"]], messages=messages)
    return replace(conv, **row)
# Conversations are read and checked, outside any transaction, until they
# hold this many messages or characters of text, then written: the larger, the
# fewer transactions (each costs the search index a segment).
IMPORT_READ = (16000, 8 << 20)


# While an import reads and checks a file in the server, its thread would
# hold Python's GIL for 5 ms at a time (the default switch interval) whenever
# another thread wants it: a chat, which wants it back after each of its
# waits on a socket or SQLite, would take ~100 ms instead of ~5. So the
# interval is 0.5 ms while any import runs.
BRISK_SWITCHING = {"imports": 0, "interval": None}
BRISK_LOCK = threading.Lock()


@contextmanager
def brisk_switching():
    with BRISK_LOCK:
        if BRISK_SWITCHING["imports"] == 0:
            BRISK_SWITCHING["interval"] = sys.getswitchinterval()
            sys.setswitchinterval(0.0005)
        BRISK_SWITCHING["imports"] += 1
    try:
        yield
    finally:
        with BRISK_LOCK:
            BRISK_SWITCHING["imports"] -= 1
            if BRISK_SWITCHING["imports"] == 0:
                sys.setswitchinterval(BRISK_SWITCHING["interval"])


def import_file(store, f, progress=None, inflated_limit=None, company="server"):
    """Store every conversation of a file: read and checked a part at a time,
    outside any transaction; written by an ImportWriter, all of it or, when it
    fails part-way, nothing. A conversation already there (the same uuid, or
    source and source_id) is skipped; one with no message is not imported.
    company: who else may write meanwhile: "server" (its chats: the import
    is in one), "other processes" (a server: the import is a command's) or
    "none". The counts, the values coerced, and the format(s)."""
    counts = {"conversations": 0, "messages": 0, "attachments": 0, "skipped": 0, "empty": 0}
    formats, seen, coercions = [], {}, Coercions()
    writer = ImportWriter(store, counts, progress, company)
    pending, count, size, n = [], 0, 0, 0
    try:
        try:
            for form, conv in file_conversations(f, inflated_limit, seen):
                n += 1
                if form not in formats:
                    formats.append(form)
                checked = checked_conversation(
                    conv, f"conversation {n:,} ({conv.source_id})", coercions)
                if not checked.messages:
                    counts["empty"] += 1
                    continue
                pending.append(checked)
                count += len(checked.messages)
                size += sum(len(m["content"]) + len(m["reasoning"] or "")
                            + sum(len(found[0]) for found in m["media"])
                            for m in checked.messages)
                if count >= IMPORT_READ[0] or size >= IMPORT_READ[1]:
                    writer.write(pending)
                    pending, count, size = [], 0, 0
            writer.write(pending)
        except (ValueError, TypeError, AttributeError, KeyError, RecursionError) as e:
            raise validation_error("file", f"The file cannot be imported: {e}") from None
        except EOFError as e:
            raise validation_error("file", f"The file ends early: {e}") from None
        if not formats and not seen.get("array"):
            raise validation_error("file", f"The file holds no conversation; expected "
                                   f"{EXPECTED}")
        writer.finish()
    except BaseException:
        writer.undo()
        raise
    return {**counts, "coerced": coercions.count,
            **({"coercions": coercions.said} if coercions.said else {}),
            "format": ", ".join(formats) or "none"}


class BackupCopy:
    """A consistent copy of the database (SQLite's online backup: writers go on
    meanwhile) in a temporary file, made before any answer goes out, so a
    failure (a full disk) is an error and never a download that ends early.
    At most one is made at a time. remove() when the download ends, however."""

    def __init__(self, db):
        if not BACKUP_LOCK.acquire(blocking=False):
            raise ApiError(503, "BUSY", "A backup is being made; try again when it is done",
                           {"Retry-After": "10"})
        import tempfile
        folder, prefix = backup_copies(db)
        self.path, self.held = None, True
        try:
            handle, self.path = tempfile.mkstemp(prefix=prefix, dir=folder)
            os.close(handle)
            db.backup(self.path, durable=False)
            self.size = os.path.getsize(self.path)
        except (OSError, sqlite3.Error) as e:
            self.remove()
            need = os.path.getsize(db.path) if os.path.exists(db.path) else 0
            raise ApiError(503, "DATABASE_ERROR", f"The backup could not be made ({e}): it "
                           f"needs {need:,} bytes free in {folder}, where the copy is made "
                           "before it is sent") from None
        finally:
            db.release()

    def pieces(self):
        with open(self.path, "rb") as f:
            while piece := f.read(READ_PIECE):
                yield piece

    def remove(self):
        if self.path:
            with contextlib.suppress(OSError):
                os.remove(self.path)
        if self.held:
            self.held = False
            BACKUP_LOCK.release()


###############################################################################
# HTTP API
###############################################################################

@dataclass
class Request:
    method: str
    path: str
    query: dict
    headers: object
    body: bytes = b""
    params: dict = field(default_factory=dict)
    client: object = None        # the client's socket

    def json(self, raw=None):
        """The body (or `raw`, read from it) as a JSON object, else INVALID_JSON."""
        try:
            data = json.loads((self.body if raw is None else raw).decode("utf-8"))
        except RecursionError:
            raise ApiError(400, "INVALID_JSON", "Request body is nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, "INVALID_JSON", f"Request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "INVALID_JSON", "Request body must be a JSON object")
        return data

    def arg(self, name):
        values = self.query.get(name)
        return values[-1] if values else None


class Created(dict):
    """A dict answered with 201."""


def path_id(req, resource):
    raw = req.params["id"]
    number = ascii_number(raw)
    if number is None:
        raise not_found(resource, raw)
    return number


def existing_conversation(engine, req):
    conversation_id = path_id(req, "conversation")
    conversation = engine.store.get_conversation(conversation_id)
    if conversation is None:
        raise not_found("conversation", conversation_id)
    return conversation


def api_health(engine, req):
    llamacpp = engine.upstream.health()
    if engine.managed:
        llamacpp["managed"] = engine.managed.as_dict()
    connections = engine.connections
    others = {}
    if len(connections.all) > 1:            # each as last read, asked again if stale
        connections.refresh()
        others = {"connections": connections.states()}
    if not engine.ready.is_set():
        return {"status": "starting", "version": __version__,
                "progress": engine.store.progress.as_dict(), "llamacpp": llamacpp,
                "database": {"ok": False, "fts5": engine.store.index.fts, "error": "opening"},
                **others}
    database = engine.store.health()
    return {"status": "ok" if llamacpp["ok"] and database["ok"] else "degraded",
            "version": __version__, "llamacpp": llamacpp, "database": database, **others}


def api_models(engine, req):
    """Every connection's models, each asked now (up to MODEL_LIST_WAIT for
    one that answers; one seen down answers from what it last listed)."""
    connections = engine.connections
    connections.refresh(wait=MODEL_LIST_WAIT, force=True)
    models = connections.models()
    failure = connections.known["default"]["failure"]
    if len(connections.all) == 1 and failure is not None:
        failure.extra.update(models=[], count=0, llamacpp_url=engine.settings.llamacpp_url)
        raise failure
    found = {"models": [m["name"] for m in models if m["available"]], "count": len(models),
             "details": models, "llamacpp_url": engine.settings.llamacpp_url}
    if len(connections.all) > 1:
        found["connections"] = connections.states()
    if engine.managed:
        found["managed"] = "default"        # the connection llama-chat started
    return found


def api_model_load(engine, req):
    """Load (or unload) a model of a llama-server router: asked of the
    connection that lists it; its status then told to every open page as it
    changes (loading, loaded, failed)."""
    body = req.json()
    known_fields(body, {"model"})
    model = require_str(body, "model", max_len=LIMITS["model"])
    upstream = engine.upstream_for(model)
    action = "unload" if req.path.endswith("/unload") else "load"
    status, answer = upstream.call("POST", f"/models/{action}", {"model": model},
                                   read_timeout=30)
    if status in (404, 405, 501):
        raise validation_error("model", f"{upstream.name}'s server does not {action} models "
                               "(it is not a llama-server in router mode)")
    if status != 200:
        raise upstream_status_error(status, answer)
    engine.connections.watch(upstream)
    return {"model": model, "connection": upstream.name, "action": action}


def api_model_defaults(engine, req):
    model = req.arg("model") or None
    if model is not None and len(model) > 500:
        raise validation_error("model", "Query parameter model is longer than 500 characters")
    return {"model": model, "defaults": engine.upstream_for(model).defaults(model)}


def api_config(engine, req):
    """The public settings, and what a new conversation's replies are made with."""
    settings = engine.settings
    return {**settings.public_config(), "max_attachment_bytes": settings.max_attachment_bytes,
            "max_image_pixels": settings.max_image_pixels,
            "effective": effective_settings(settings, {})}


def api_list_conversations(engine, req):
    limit = query_int(req, "limit", None, 0)
    offset = query_int(req, "offset", 0, 0)
    pinned = query_bool(req, "pinned")
    titled = req.arg("q")
    if titled is not None and len(titled) > LIMITS["title"]:
        raise validation_error("q", f"Query parameter q is longer than {LIMITS['title']} "
                               "characters")
    return {"conversations": engine.store.list_conversations(
        limit, offset, pinned, titled, query_int(req, "project", None, 1))}


def older_list_conversations(engine, req, page=None):
    """The conversation list while an older database is migrated (OlderHistory):
    the request's page, or `page` (limit, offset)."""
    if req.arg("q") or req.arg("project"):
        raise starting(engine.store.progress.as_dict())
    limit, offset = page or (query_int(req, "limit", None, 0), query_int(req, "offset", 0, 0))
    return {"conversations": engine.older.list_conversations(limit, offset,
                                                            query_bool(req, "pinned")),
            "starting": engine.store.progress.as_dict()}


def api_create_conversation(engine, req):
    body = req.json()
    known_fields(body, {"title", "model", *SETTINGS_FIELDS})
    settings = check_conversation_settings(body)
    untitled = body.get("title") is None
    title = UNTITLED if untitled else require_str(body, "title", max_len=LIMITS["title"]).strip()
    model = require_str(body, "model", allow_empty=True, max_len=LIMITS["model"])
    pending = untitled and engine.settings.auto_title != "off"
    return Created(conversation_id=engine.store.create_conversation(title, model, pending,
                                                                 **settings))


def api_delete_conversations(engine, req):
    body = req.json()
    known_fields(body, {"ids"})
    ids = body.get("ids")
    if not isinstance(ids, list) or not ids or len(ids) > 10_000 or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 < i < 2**63 for i in ids):
        raise validation_error("ids", "Field ids must be a list of 1 to 10,000 conversation ids")
    deleted = engine.store.delete_conversations(ids)
    for conversation_id in deleted:
        engine.cancel(not_found("conversation", conversation_id), conversation_id)
    if deleted:
        engine.purge_soon()
    gone = set(deleted)
    return {"deleted": deleted, "not_found": sorted({i for i in ids if i not in gone})}


def api_get_conversation(engine, req):
    branches = req.arg("branches")
    if branches not in (None, "current", "all"):
        raise validation_error("branches", "Query parameter branches must be all or current")
    conversation = existing_conversation(engine, req)
    conversation.pop("title_pending")
    messages, summary = engine.store.messages(conversation["id"], branches == "all")
    return {"conversation": conversation, "messages": messages, "stats": summary,
            "effective": effective_settings(
                engine.settings, conversation,
                engine.store.projects.get(conversation["project_id"]))}


def older_get_conversation(engine, req):
    """A conversation while an older database is migrated (OlderHistory)."""
    conversation_id = path_id(req, "conversation")
    found = engine.older.conversation(conversation_id)
    if found is None:
        raise not_found("conversation", conversation_id)
    conversation, messages, summary = found
    conversation.pop("title_pending")
    return {"conversation": conversation, "messages": messages, "stats": summary,
            "effective": effective_settings(engine.settings, conversation),
            "starting": engine.store.progress.as_dict()}


def api_update_conversation(engine, req):
    conversation_id = path_id(req, "conversation")
    body = req.json()
    known_fields(body, {"title", "current_message_id", *SETTINGS_FIELDS})
    if not body:
        raise validation_error("title", "Send a title, a current_message_id or settings")
    title = require_str(body, "title", max_len=LIMITS["title"]).strip() if "title" in body else None
    show = require_int(body, "current_message_id") if "current_message_id" in body else None
    changed = engine.store.update_conversation(conversation_id, title, show,
                                            **check_conversation_settings(body))
    if changed is None:
        raise not_found("conversation", conversation_id)
    engine.purge_if_due()                       # a title renamed: the old one purged
    return changed


def api_delete_conversation(engine, req):
    conversation_id = path_id(req, "conversation")
    if not engine.store.delete_conversation(conversation_id):
        raise not_found("conversation", conversation_id)
    engine.cancel(not_found("conversation", conversation_id), conversation_id)
    engine.purge_soon()
    return {}


def api_projects(engine, req):
    return {"projects": engine.store.projects.all()}


def api_create_project(engine, req):
    fields = check_project(req.json(), creating=True)
    return Created(project_id=engine.store.projects.create(**fields))


def api_update_project(engine, req):
    project_id = path_id(req, "project")
    body = req.json()
    if not body:
        raise validation_error("name", "Send a name, a system_prompt or options")
    changed = engine.store.projects.update(project_id, **check_project(body, creating=False))
    if changed is None:
        raise not_found("project", project_id)
    return changed


def api_delete_project(engine, req):
    project_id = path_id(req, "project")
    if not engine.store.projects.delete(project_id):
        raise not_found("project", project_id)
    return {}


def api_edit_message(engine, req):
    message_id = path_id(req, "message")
    body = req.json()
    known_fields(body, {"content"})
    content = require_str(body, "content", max_len=LIMITS["content"])
    edited_at = engine.store.tree.edit(message_id, content)
    if edited_at is None:
        raise not_found("message", message_id)
    engine.purge_if_due()                       # the text it had: purged like deleted text
    return {"message_id": message_id, "content": content, "edited_at": edited_at}


def api_delete_message(engine, req):
    message_id = path_id(req, "message")
    done = engine.store.tree.delete(message_id)
    if done is None:
        raise not_found("message", message_id)
    conversation_id, deleted, current = done
    engine.cancel(not_found("message", message_id), messages=deleted)
    engine.purge_soon()
    return {"deleted": deleted, "conversation_id": conversation_id,
            "current_message_id": current}


def api_fork(engine, req):
    conversation = existing_conversation(engine, req)
    body = req.json()
    known_fields(body, {"message_id", "title"})
    message_id = require_int(body, "message_id")
    title = None if body.get("title") is None else \
        require_str(body, "title", max_len=LIMITS["title"]).strip()
    forked = engine.store.tree.fork(conversation["id"], message_id, title)
    if forked is None:
        raise not_found("message", message_id)
    return Created(conversation_id=forked)


# A chat sent while the history is migrated (a first start on a database of
# another version) waits for it, up to START_WAIT_S, rather than answer 503:
# the question is kept, and the answer comes, once the migration commits. (An
# older history's is answered at once meanwhile: WHILE_MIGRATING.)
START_WAIT_S = 120


def api_chat(engine, req):
    body = req.json()
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise validation_error("stream", "Field stream must be true or false")
    stream = stream or "text/event-stream" in req.headers.get("Accept", "")
    queued = takes_turns(body)
    end_turn = engine.turns.take(queued) if queued is not None else lambda: None
    try:
        engine.room_for_a_reply()
        turn = start_chat(engine, body)
        follower = [] if stream else None
        reply = start_reply(engine, turn, end_turn, here=not stream,     # it ends the turn
                            follower=follower)
        if turn.unsynced:            # while llama.cpp reads the prompt (a plain chat: after)
            sync_question(engine, turn, reply)
    except BaseException:
        end_turn()                                 # one that never began (a second end: none)
        raise
    if stream:
        start = [(0, {"type": "start", "conversation_id": turn.conversation_id,
                      "user_message_id": turn.user_message_id,
                      "message_id": reply.message_id, "parent_id": turn.parent_id,
                      **model_loading(engine, turn.model)})]
        return EventStream(followed(reply, 0, start, follower[0]), lambda: None,
                           encode=sse_numbered)
    reply.ended.wait()
    if reply.failure is not None:
        raise reply.failure
    return {name: value for name, value in reply.last[0][1].items() if name != "type"}


api_chat.waits_for_start = True


def model_loading(engine, model):
    """{"model_status": ...} when a router lists the model as not loaded
    (llama-server loads it for the chat: the page says so, rather than
    seeming to hang), its list then watched until it is; else {}."""
    status = engine.connections.status_of(model)
    if status in (None, "loaded"):
        return {}
    engine.connections.watch(engine.upstream_for(model))
    return {"model_status": status}


def api_stop(engine, req):
    """Stop a reply being made, from any client: what it made is kept."""
    message_id = path_id(req, "message")
    reply = engine.generation_of(message_id)
    if reply is None:
        row = engine.store.message_row(message_id)
        if row is None:
            raise not_found("message", message_id)
        return {"message_id": message_id, "stopped": False,
                "generating": row["generating"] is not None}
    reply.cancel(stopped_by_request())
    reply.ended.wait(10)
    return {"message_id": message_id, "stopped": True, "generating": False}


def api_answer_now(engine, req):
    """End a reply's reasoning so that its model answers now (answer_now)."""
    message_id = path_id(req, "message")
    reply = engine.generation_of(message_id)
    if reply is None:
        if engine.store.message_row(message_id) is None:
            raise not_found("message", message_id)
        raise ApiError(409, "NOT_GENERATING", "That reply is not being made (it has ended)")
    return {"message_id": message_id, "answer_now": answer_now(engine, reply)}


def api_follow(engine, req):
    """A reply as SSE from character ?from= (or Last-Event-ID) on: what was
    made so far, then live to its end."""
    message_id = path_id(req, "message")
    start = req.headers.get("Last-Event-ID")
    start = ascii_number(start.strip()) if start is not None else \
        query_int(req, "from", 0, 0)
    if start is None:
        raise validation_error("Last-Event-ID", "Last-Event-ID must be a whole number")
    reply = engine.generation_of(message_id)
    if reply is not None:
        return EventStream(followed(reply, start), lambda: None, encode=sse_numbered)
    row = engine.store.message_row(message_id)
    if row is None or row["role"] != "assistant":
        raise not_found("message", message_id)
    return EventStream(stored_reply_events(engine, row, start), lambda: None,
                       encode=sse_numbered)


def api_events(engine, req):
    """What changes in the history, as it changes (SSE), for as long as the
    client listens: a comment at once, then events, a comment every
    KEEPALIVE_SECONDS."""
    follower = engine.changes.listen()

    def events():
        try:
            yield None
            while True:
                try:
                    yield follower.batches.get(timeout=KEEPALIVE_SECONDS)
                except queue.Empty:
                    yield None
                if follower.let_go and follower.batches.empty():
                    return                      # too far behind: its page listens again
        except ClientGone:
            pass
        finally:
            engine.changes.leave(follower)
    return EventStream(events(), lambda: None)


def api_generations(engine, req):
    """The replies being made on this database (by this server or another)."""
    engine.store.interrupt_orphans()
    rows = engine.store.replies_being_made()
    for row in rows:
        reply = engine.generation_of(row["message_id"])
        if reply is not None:
            row["content_chars"] = reply.sent
    return {"generations": rows}


def api_stats(engine, req):
    conversation = existing_conversation(engine, req)
    summary, by_role = engine.store.stats(conversation["id"])
    return {"summary": summary, "by_role": by_role}


def api_search(engine, req):
    q = req.arg("q")
    if q is None or not q.strip():
        raise validation_error("q", "Missing required query parameter: q")
    if len(q) > 1000:
        raise validation_error("q", "Query parameter q is longer than 1000 characters")
    limit = query_int(req, "limit", SEARCH_LIMIT_DEFAULT, 1, SEARCH_LIMIT_MAX)
    project = query_int(req, "project", None, 1)
    building = engine.store.index.unbuilt()
    if building:
        raise search_starting(building)
    results = engine.store.search(q, limit, project)
    return {"results": results, "query": q, "count": len(results)}


def api_prompt(engine, req):
    conversation = existing_conversation(engine, req)
    question = req.arg("message")
    if question is not None and len(question) > LIMITS["content"]:
        raise validation_error("message", "Query parameter message is longer than "
                               f"{LIMITS['content']} characters")
    model = req.arg("model") or None
    if model is not None and len(model) > 500:
        raise validation_error("model", "Query parameter model is longer than 500 characters")
    return next_prompt(engine, conversation, question, model)


def export_format(req, allowed):
    form = req.arg("format") or "json"
    if form not in allowed:
        raise validation_error("format", f"Query parameter format must be one of "
                               f"{', '.join(allowed)}")
    return form


def api_export_conversation(engine, req):
    conversation = existing_conversation(engine, req)
    form = export_format(req, ("json", "md", "html"))
    if form in ("md", "html"):
        messages = json.loads(engine.store.tree.branch(conversation["id"]))
        made = (export_markdown if form == "md" else export_html)(
            conversation, messages, engine.store.attachment_bytes)
        headers = attachment(download_name(conversation["title"], form),
                             "text/markdown; charset=utf-8" if form == "md"
                             else "text/html; charset=utf-8")
        if form == "html":      # opened where it came from, it runs nothing either
            headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline';" \
                " img-src data:; sandbox"
        return Answer(made, headers)
    return EventStream(conversation_export(engine.store.db, conversation["id"]), lambda: None,
                       attachment(download_name(conversation["title"], "json"),
                                  "application/json"), as_they_came, whole=True)


DATASET_ARGS = ("q", "model", "since", "until", "project")


def dataset_filter(engine, req):
    """The narrowing of a dataset a request's query gives (DatasetFilter)."""
    q, model = req.arg("q"), req.arg("model")
    for name, value, most in (("q", q, 1000), ("model", model, LIMITS["model"])):
        if value is not None and len(value) > most:
            raise validation_error(name, f"Query parameter {name} is longer than {most} "
                                   "characters")
    if q is not None:
        building = engine.store.index.unbuilt()
        if building:
            raise search_starting(building)
    return DatasetFilter(q or None, model or None, query_day(req, "since"),
                         query_day(req, "until"), query_int(req, "project", None, 1))


def api_export(engine, req):
    form = export_format(req, ("json", "jsonl", *DATASET_FORMATS))
    if form in DATASET_FORMATS:
        return EventStream(
            dataset(engine.store.db, engine.store.index, form, dataset_filter(engine, req)),
            lambda: None, attachment(f"llama-chat-{form}-{now_iso()[:10]}.jsonl",
                                     "application/x-ndjson"), as_they_came, whole=True)
    narrowed = [name for name in DATASET_ARGS if req.arg(name)]
    if narrowed:
        raise validation_error(narrowed[0], f"Query parameter {narrowed[0]} narrows the "
                               f"datasets ({', '.join(DATASET_FORMATS)}), not format={form}")
    kind = "application/json" if form == "json" else "application/x-ndjson"
    return EventStream(export_all(engine.store.db, form), lambda: None,
                       attachment(f"llama-chat-{now_iso()[:10]}.{form}", kind), as_they_came,
                       whole=True)


def api_import(engine, req):
    try:
        with brisk_switching():
            return import_file(engine.store, io.BytesIO(req.body),
                               inflated_limit=engine.settings.max_import_bytes)
    finally:
        release_memory()           # the index's buffers and the file's pieces
        engine.rank_ledger_soon()


api_import.takes_file = True               # any type of body,
api_import.body_up_to = "max_import_bytes"  # up to this


def api_upload_attachment(engine, req):
    """A file as the body (?name= its name), read a piece at a time: stored
    once, told apart by its bytes; 201 with it as the API shows it."""
    upload = Upload(req.body)
    try:
        return Created({"attachment": engine.store.put_attachment(
            upload, upload.kind, upload.type, attachment_name(req.arg("name"), upload.kind))})
    finally:
        upload.close()
        engine.store.let_go_of_pages()


api_upload_attachment.takes_file = True                   # any type of body,
api_upload_attachment.body_up_to = "max_attachment_bytes"  # up to this,
api_upload_attachment.reads_body = True                    # read by the handler as it comes


ATTACHMENT_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age="
                      "31536000, immutable", "Content-Security-Policy": "default-src 'none'; "
                      "sandbox", "Referrer-Policy": "no-referrer"}


def api_attachment(engine, req):
    """An attachment's bytes, with its type, as nothing that runs."""
    raw = req.params["id"]
    found = engine.store.attachment(raw) if ATTACHMENT_ID.match(raw) else None
    if found is None:
        raise not_found("attachment", raw)
    headers = {"Content-Type": found["type"], **ATTACHMENT_HEADERS,
               "Content-Disposition": "inline; filename*=UTF-8''"
               + urllib.parse.quote(found["name"], safe="")}   # its name, if saved
    return EventStream(engine.store.attachment_pieces(found["id"]), lambda: None,
                       headers=headers, encode=bytes, whole=True)


def api_backup(engine, req):
    copy = BackupCopy(engine.store.db)
    return EventStream(copy.pieces(), copy.remove, {**attachment(
        f"llama-chat-{now_iso()[:10]}.db", "application/vnd.sqlite3"),
        "Content-Length": str(copy.size)}, as_they_came)


api_export.copies_history = api_backup.copies_history = True   # refused to other origins


# A download the page's browser makes itself (a navigation, streamed to disk
# however large) cannot carry the API key in a header. So the page asks for
# a ticket (with its key), and the browser fetches the download by it: one
# use, within a minute, for one of these routes only.
TICKET_SECONDS = 60
TICKETED = (r"/api/export", r"/api/backup", r"/api/conversations/[^/]+/export")


def api_download_ticket(engine, req):
    body = req.json()
    known_fields(body, {"path"})
    path = require_str(body, "path", max_len=500)
    parts = urllib.parse.urlsplit(path)
    if parts.scheme or parts.netloc or not any(re.fullmatch(pattern, parts.path)
                                               for pattern in TICKETED):
        raise validation_error("path", "path must be a download: /api/export, /api/backup "
                               "or /api/conversations/{id}/export (with its query)")
    ticket = secrets.token_urlsafe(24)
    with engine.tickets_lock:
        now = time.monotonic()
        engine.tickets = {t: v for t, v in engine.tickets.items() if v[1] > now}
        engine.tickets[ticket] = (path, now + TICKET_SECONDS)
    return Created({"url": f"/api/downloads/{ticket}", "expires_in": TICKET_SECONDS})


def api_download(engine, req):
    """The download a ticket is for (once), answered as its own route answers."""
    with engine.tickets_lock:
        found = engine.tickets.pop(req.params["id"], None)
    if found is None or found[1] < time.monotonic():
        raise not_found("download", req.params["id"])
    parts = urllib.parse.urlsplit(found[0])
    handler, params = match_route("GET", parts.path)
    return handler(engine, replace(req, path=parts.path, params=params,
                                   query=urllib.parse.parse_qs(parts.query)))


api_download.ticketed = True            # no key: the ticket is one
api_download.copies_history = True      # and never for another origin


LEDGER_GROUPS = {"model": ("model",), "day": ("day",), "model,day": ("model", "day"),
                 "day,model": ("model", "day")}
def api_ledger(engine, req):
    group = req.arg("group") or "model"
    if group not in LEDGER_GROUPS:
        raise validation_error("group", "Query parameter group must be model, day or model,day")
    since, until = query_day(req, "since"), query_day(req, "until")
    return {"group": group, "since": since, "until": until,
            "groups": ledger(engine.store.db, LEDGER_GROUPS[group], since, until)}


MISSING_PAGE = b"""<!doctype html><meta charset="utf-8"><title>llama-chat</title>
<p>index.html is missing beside llama_chat.py, so there is no page to show.
The API still works: see <code>/api/health</code>.</p>"""
INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.S)


def page_headers(html):
    """The page's security headers, with its inline script and style allowed by hash."""
    hashes = {b"script": [], b"style": []}
    for kind, content in INLINE.findall(html):
        digest = base64.b64encode(hashlib.sha256(content).digest()).decode()
        hashes[kind].append(f"'sha256-{digest}'")
    script = " ".join(hashes[b"script"]) or "'none'"
    style = " ".join(hashes[b"style"]) or "'none'"
    csp = ("default-src 'none'; "
           f"script-src {script}; style-src {style}; "
           "connect-src 'self'; img-src 'self' data: blob:; media-src blob:; base-uri 'none'; "
           "manifest-src 'self'; worker-src 'self'; form-action 'none'; "
           "frame-ancestors 'none'; object-src 'none'")
    return {
        "Content-Type": "text/html; charset=utf-8",
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-cache",
    }


class PageCache:
    """index.html with its headers, read again only when the file changes."""

    def __init__(self):
        self._pages = {}             # path -> (mtime, Answer)

    def answer(self, path):
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            return Answer(MISSING_PAGE, page_headers(MISSING_PAGE))
        kept = self._pages.get(path)
        if kept is None or kept[0] != mtime:
            with open(path, "rb") as f:
                html = f.read()
            kept = self._pages[path] = (mtime, Answer(html, page_headers(html)))
        return kept[1]


PAGES = PageCache()




def page_index(engine, req):
    return PAGES.answer(engine.settings.index_path)


# The page as an app on a phone's home screen: its manifest, its icon (drawn
# here: a speech bubble on the page's blue), and a service worker that keeps
# the page's shell for a start without the network. The history is the
# server's: the worker never answers /api/ or /v1/, and it asks the network
# for the page first, so that a new version of it reaches users at the next
# load.
THEME = "#2563eb"
MANIFEST = {"name": "llama-chat", "short_name": "llama-chat", "start_url": "/",
            "scope": "/", "display": "standalone", "background_color": "#ffffff",
            "theme_color": THEME, "description": "A private chat over your llama.cpp server",
            "icons": [{"src": "/icon.svg", "sizes": "any", "type": "image/svg+xml"},
                      {"src": "/icon-192.png", "sizes": "192x192", "type": "image/png"},
                      {"src": "/icon-512.png", "sizes": "512x512", "type": "image/png",
                       "purpose": "any maskable"}]}
ICON_SVG = f"""<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 512 512">
<rect width="512" height="512" rx="96" fill="{THEME}"/>
<ellipse cx="256" cy="236" rx="160" ry="120" fill="#fff"/>
<path d="M170 320 L140 410 L250 340 Z" fill="#fff"/></svg>""".encode()
SHELL_PATHS = ("/", "/manifest.webmanifest", "/icon.svg", "/icon-192.png", "/icon-512.png")
SERVICE_WORKER = f"""// llama-chat's service worker: the page's shell, to start without the network.
const SHELL = "llama-chat-shell";
const PATHS = {json.dumps(list(SHELL_PATHS))};
self.addEventListener("install", (e) => {{
  e.waitUntil(caches.open(SHELL).then((c) => c.addAll(PATHS)).then(() => self.skipWaiting()));
}});
self.addEventListener("activate", (e) => e.waitUntil(self.clients.claim()));
self.addEventListener("fetch", (e) => {{
  const url = new URL(e.request.url);
  if (e.request.method !== "GET" || url.origin !== location.origin) return;
  if (url.pathname.startsWith("/api/") || url.pathname.startsWith("/v1/")) return;  // the server's
  const page = e.request.mode === "navigate" || url.pathname === "/index.html";
  if (!page && !PATHS.includes(url.pathname)) return;
  const key = page ? "/" : url.pathname;
  e.respondWith(fetch(e.request).then((answer) => {{      // the network first: updates reach users
    if (answer.ok) {{
      const copy = answer.clone();
      caches.open(SHELL).then((c) => c.put(key, copy));
    }}
    return answer;
  }}).catch(() => caches.match(key).then((kept) => kept || Response.error())));
}});
""".encode()


def in_triangle(x, y, a, b, c):
    """Is point (x, y) inside the triangle a b c (either way round)?"""
    def side(p, q):
        return (x - q[0]) * (p[1] - q[1]) - (p[0] - q[0]) * (y - q[1])
    d1, d2, d3 = side(a, b), side(b, c), side(c, a)
    return not ((d1 < 0 or d2 < 0 or d3 < 0) and (d1 > 0 or d2 > 0 or d3 > 0))


def icon_png(size):
    """The icon as a PNG of size x size: the page's blue, rounded, and a
    white speech bubble (drawn point by point, the standard library's zlib
    for the file)."""
    scale, (r, g, b) = size / 512, (0x25, 0x63, 0xEB)
    rows = []
    for y in range(size):
        row = bytearray(b"\x00")
        py = (y + 0.5) / scale
        for x in range(size):
            px = (x + 0.5) / scale
            cx, cy = min(max(px, 96), 416), min(max(py, 96), 416)   # corners of radius 96
            inside = (px - cx) ** 2 + (py - cy) ** 2 <= 96 ** 2
            bubble = ((px - 256) / 160) ** 2 + ((py - 236) / 120) ** 2 <= 1 or in_triangle(
                px, py, (170, 320), (140, 410), (250, 340))            # the bubble's tail
            row += bytes((255, 255, 255, 255)) if inside and bubble else \
                bytes((r, g, b, 255)) if inside else bytes(4)
        rows.append(bytes(row))

    def chunk(kind, data):
        return (len(data).to_bytes(4, "big") + kind + data
                + (zlib.crc32(kind + data) & 0xFFFFFFFF).to_bytes(4, "big"))
    header = size.to_bytes(4, "big") * 2 + bytes((8, 6, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(
        b"IDAT", zlib.compress(b"".join(rows), 9)) + chunk(b"IEND", b"")


ICONS = {}                   # size -> the PNG, drawn once


def page_manifest(engine, req):
    return Answer(JSON.encode(MANIFEST).encode(), {
        "Content-Type": "application/manifest+json", "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff"})


def page_icon(engine, req):
    if req.path.endswith(".svg"):
        data, kind = ICON_SVG, "image/svg+xml"
    else:
        size = 192 if "192" in req.path else 512
        if size not in ICONS:
            ICONS[size] = icon_png(size)
        data, kind = ICONS[size], "image/png"
    return Answer(data, {"Content-Type": kind, "Cache-Control": "no-cache",
                         "X-Content-Type-Options": "nosniff",
                         "Content-Security-Policy": "default-src 'none'; sandbox"})


def page_service_worker(engine, req):
    return Answer(SERVICE_WORKER, {"Content-Type": "text/javascript; charset=utf-8",
                                   "Cache-Control": "no-cache", "Service-Worker-Allowed": "/",
                                   "X-Content-Type-Options": "nosniff"})


V1_PATH = r"/v1(?:/[\w-][\w.-]*)+"    # no segment that starts with a dot
ROUTES = [
    ("GET", r"/", page_index),
    ("GET", r"/index\.html", page_index),
    ("GET", r"/manifest\.webmanifest", page_manifest),
    ("GET", r"/sw\.js", page_service_worker),
    ("GET", r"/icon\.svg", page_icon),
    ("GET", r"/icon-192\.png", page_icon),
    ("GET", r"/icon-512\.png", page_icon),
    ("GET", r"/api/health", api_health),
    ("GET", r"/api/models", api_models),
    ("GET", r"/api/models/defaults", api_model_defaults),
    ("POST", r"/api/models/load", api_model_load),
    ("POST", r"/api/models/unload", api_model_load),
    ("GET", r"/api/config", api_config),
    ("GET", r"/api/conversations", api_list_conversations),
    ("POST", r"/api/conversations", api_create_conversation),
    ("GET", r"/api/conversations/(?P<id>[^/]+)", api_get_conversation),
    ("PUT", r"/api/conversations/(?P<id>[^/]+)", api_update_conversation),
    ("DELETE", r"/api/conversations/(?P<id>[^/]+)", api_delete_conversation),
    ("POST", r"/api/conversations/delete", api_delete_conversations),
    ("POST", r"/api/conversations/(?P<id>[^/]+)/fork", api_fork),
    ("GET", r"/api/projects", api_projects),
    ("POST", r"/api/projects", api_create_project),
    ("PUT", r"/api/projects/(?P<id>[^/]+)", api_update_project),
    ("DELETE", r"/api/projects/(?P<id>[^/]+)", api_delete_project),
    ("PUT", r"/api/messages/(?P<id>[^/]+)", api_edit_message),
    ("DELETE", r"/api/messages/(?P<id>[^/]+)", api_delete_message),
    ("POST", r"/api/chat", api_chat),
    ("POST", r"/api/messages/(?P<id>[^/]+)/stop", api_stop),
    ("POST", r"/api/messages/(?P<id>[^/]+)/answer-now", api_answer_now),
    ("GET", r"/api/messages/(?P<id>[^/]+)/stream", api_follow),
    ("GET", r"/api/generations", api_generations),
    ("POST", r"/api/attachments", api_upload_attachment),
    ("GET", r"/api/attachments/(?P<id>[^/]+)", api_attachment),
    ("GET", r"/api/events", api_events),
    ("GET", r"/api/stats/(?P<id>[^/]+)", api_stats),
    ("GET", r"/api/search", api_search),
    ("GET", r"/api/conversations/(?P<id>[^/]+)/export", api_export_conversation),
    ("GET", r"/api/export", api_export),
    ("POST", r"/api/import", api_import),
    ("GET", r"/api/backup", api_backup),
    ("POST", r"/api/downloads", api_download_ticket),
    ("GET", r"/api/downloads/(?P<id>[^/]+)", api_download),
    ("GET", r"/api/ledger", api_ledger),
    ("GET", r"/api/conversations/(?P<id>[^/]+)/prompt", api_prompt),
    ("POST", r"/v1/chat/completions", v1_chat),
    ("GET", r"/v1/models", v1_models),
    ("GET", V1_PATH, v1_relay),
    ("POST", V1_PATH, v1_relay),
]
COMPILED_ROUTES = [(m, re.compile(p + r"\Z"), h) for m, p, h in ROUTES]


def match_route(method, path):
    """(handler, params) or raise 404/405."""
    allowed = []
    for route_method, pattern, handler in COMPILED_ROUTES:
        found = pattern.match(path)
        if found:
            if route_method == method or (method == "HEAD" and route_method == "GET"):
                return handler, found.groupdict()
            allowed.append(route_method)
    if allowed:
        allow = ", ".join(sorted(set(allowed + (["HEAD"] if "GET" in allowed else []))))
        raise ApiError(405, "METHOD_NOT_ALLOWED", f"{method} is not allowed on {path}",
                       headers={"Allow": allow})
    raise ApiError(404, "NOT_FOUND", f"No such path: {path}", resource="path", id=path)


###############################################################################
# HTTP API: while an older history is migrated
###############################################################################

# During the migration of an older history the list and a conversation are
# read from it as it was (OlderHistory); a chat is answered at once by the
# Engine of chats meanwhile (Engine.chats_meanwhile), and so is what follows
# from one: a conversation made for it, read, listed with the others, its
# reply stopped, hurried or followed. Once the migration has committed, a new
# chat waits for the start's end (a moment) instead. Settings and models need
# no history. The rest answers 503 STARTING.

def making_meanwhile(handler):
    """`handler` (a chat, a new conversation) by the Engine of chats meanwhile;
    a chat into a conversation of the older history copies it there first."""
    def answer(engine, req):
        with engine.chats_meanwhile(making=True) as side:
            if side is not None:
                if handler is api_chat:
                    body = req.json()
                    mentions = body.get("mentions")
                    for ident in [body.get("conversation_id"),
                                  *(mentions if isinstance(mentions, list) else ())]:
                        if type(ident) is int and 0 < ident < 2**63:
                            borrowed(side.store, engine.older, ident)
                return handler(side, req)
        if not engine.ready.wait(START_WAIT_S):
            raise starting(engine.store.progress.as_dict())
        return handler(engine, req)
    return answer


def of_meanwhile(handler):
    """`handler` (a reply stopped, hurried, followed; those being made) by the
    Engine of chats meanwhile, if a chat made one."""
    def answer(engine, req):
        with engine.chats_meanwhile() as side:
            if side is None:
                raise starting(engine.store.progress.as_dict())
            return handler(side, req)
    return answer


def meanwhile_conversation(engine, req):
    """A conversation while an older history is migrated: as the chats
    meanwhile left it, else as it was."""
    with engine.chats_meanwhile() as side:
        if side is not None and side.store.get_conversation(path_id(req, "conversation")):
            return {**api_get_conversation(side, req),
                    "starting": engine.store.progress.as_dict()}
    return older_get_conversation(engine, req)


def meanwhile_conversations(engine, req):
    """The conversation list while an older history is migrated: those the
    chats meanwhile made or continued, as they left them, among the rest."""
    with engine.chats_meanwhile() as side:
        if side is None or query_bool(req, "pinned"):
            return older_list_conversations(engine, req)    # (nothing is pinned meanwhile)
        made = json.loads(side.store.list_conversations())
    limit, offset = query_int(req, "limit", None, 0), query_int(req, "offset", 0, 0)
    ids = {c["id"] for c in made}
    found = older_list_conversations(engine, req, (None if limit is None else limit + offset, 0))
    listed = sorted([c for c in found["conversations"] if c["id"] not in ids] + made,
                    key=lambda c: (c["updated_at"], c["id"]), reverse=True)[offset:]
    found["conversations"] = listed if limit is None else listed[:limit]
    return found


WHILE_MIGRATING = {
    api_list_conversations: meanwhile_conversations,
    api_get_conversation: meanwhile_conversation,
    api_chat: making_meanwhile(api_chat),
    api_create_conversation: making_meanwhile(api_create_conversation),
    **{handler: of_meanwhile(handler)
       for handler in (api_stop, api_answer_now, api_follow, api_generations)},
    **{handler: handler for handler in (api_models, api_model_defaults, api_config)},
}


###############################################################################
# HTTP server
###############################################################################


class Headers(dict):
    """A request's headers: lower-cased name -> its values, in order."""

    def add(self, name, value):
        self.setdefault(name.lower(), []).append(value)

    def get(self, name, default=None):
        values = dict.get(self, name.lower())
        return values[0] if values else default

    def get_all(self, name, default=None):
        return dict.get(self, name.lower(), default)

    def __contains__(self, name):
        return dict.__contains__(self, name.lower())


MAX_REQUEST_LINE = 8192
MAX_HEADER_BYTES = 65536
MAX_HEADERS = 100
HTTP_VERSION = re.compile(r"HTTP/([0-9]{1,10})\.([0-9]{1,10})")
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")     # an RFC 9110 token


class BodyFile:
    """A request's body as its handler reads it, as it comes (a route whose
    `reads_body` is set): at most Content-Length bytes of the connection."""

    def __init__(self, rfile, length):
        self.rfile, self.left = rfile, length

    def read(self, size=-1):
        size = self.left if size < 0 else min(size, self.left)
        data = self.rfile.read(size) if size else b""
        if len(data) != size:
            raise ApiError(400, "INVALID_JSON", "Request body ended early")
        self.left -= size
        return data


class RequestHead:
    """HTTP/1.x's request line and headers (RFC 9112), read here rather than
    by http.server, whose email parser costs more than the rest of answering
    a list (speed-up 4). Anything ambiguous is refused: folded lines, lines
    without a colon, names that are not tokens, differing Content-Lengths.
    Undo: leave this class out of Handler's bases (http.server then parses,
    into an email.message.Message)."""

    def parse_request(self):
        self.command, self.request_version = None, self.default_request_version
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        if len(self.raw_requestline) > MAX_REQUEST_LINE:
            self.requestline, self.request_version, self.command = "", "HTTP/1.1", ""
            return self.refuse(414, "Request line too long")
        words = self.requestline.split()
        if not words:
            return False
        if len(words) != 3:
            return self.refuse(400, f"Bad request syntax ({self.requestline!r})")
        version = HTTP_VERSION.fullmatch(words[2])
        if not version:
            return self.refuse(400, f"Bad request version ({words[2]!r})")
        self.request_version = words[2]
        number = int(version[1]), int(version[2])
        if number >= (2, 0):
            return self.refuse(505, f"Invalid HTTP version ({words[2][5:]})")
        self.close_connection = number < (1, 1)
        self.command, self.path = words[0], words[1]
        if self.path.startswith("//"):       # as http.server does: no open redirects
            self.path = "/" + self.path.lstrip("/")
        self.headers = headers = Headers()
        size = count = 0
        while True:
            line = self.rfile.readline(MAX_HEADER_BYTES + 1)
            size, count = size + len(line), count + 1
            if size > MAX_HEADER_BYTES or count > MAX_HEADERS + 1:
                return self.refuse(431, "Request headers too large")
            if line in (b"\r\n", b"\n", b""):
                break
            name, colon, value = line.decode("iso-8859-1").partition(":")
            if not colon or not HEADER_NAME.fullmatch(name):
                return self.refuse(400, "Malformed header line")
            headers.add(name, value.strip())
        lengths = set(headers.get_all("Content-Length") or ())
        if len(lengths) > 1:
            return self.refuse(400, "Conflicting Content-Length headers")
        connection = headers.get("Connection", "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        if (headers.get("Expect", "").lower() == "100-continue"
                and self.request_version >= "HTTP/1.1" and self.may_continue()):
            return self.handle_expect_100()
        return True

    def may_continue(self):
        """Is a body announced with Expect: 100-continue welcome? (If not, no
        100 goes out, and the request is answered without reading it.)"""
        return True

    def refuse(self, code, message):
        self.send_error(code, message)
        return False

# HEAD on /api/ and /v1/: the route exists and the request passed every check
# the GET would meet, and nothing more (never a backup or an export made).
HEAD_ANSWER = Answer(b"", {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})
BUSY = json.dumps({"success": False, "error": "Too many connections; try again shortly",
                   "code": "SERVICE_UNAVAILABLE"}).encode()
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                 b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(BUSY), BUSY))
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")


def escape_log(text):
    text = str(text)
    if text.isprintable() and "\\" not in text:
        return text
    return CONTROL.sub(lambda m: "\\x%02x" % ord(m.group()), text)


def is_ip_literal(name):
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return False


def host_name(host_header):
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def encode_answer(payload):
    """An answer's JSON body; RawJSON values go in as they are."""
    if not any(isinstance(value, RawJSON) for value in payload.values()):
        return JSON.encode(payload)
    return "{" + ", ".join(f"{json_string(name)}: "
                           f"{value if isinstance(value, RawJSON) else JSON.encode(value)}"
                           for name, value in payload.items()) + "}"


class Handler(RequestHead, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"   # answer even a broken request line with headers
    server_version = "llama-chat"
    sys_version = ""
    timeout = 30          # a socket's backstop; the request deadline (10 s) comes first
    engine = None            # set by make_server

    def setup(self):
        super().setup()
        # Headers and body go out in two writes; without this, Nagle's algorithm
        # holds the body until the client's delayed ACK (40 ms per request).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(self.connection, "do_handshake"):     # HTTPS: in this thread, in time
            timeout = self.connection.gettimeout()
            self.connection.settimeout(self.engine.settings.header_timeout)
            self.connection.do_handshake()
            self.connection.settimeout(timeout)

    def version_string(self):
        return self.server_version

    def handle_one_request(self):
        # Deadlines (see Server): a short one for the request line and headers,
        # from waiting for the first byte (a client that idles or trickles them
        # holds a slot before any key is checked), then one for the body.
        settings = self.engine.settings
        self.server.watch(self.connection, min(settings.header_timeout,
                                               settings.request_timeout))
        self.body_read = False
        try:
            super().handle_one_request()
        finally:
            self.server.unwatch(self.connection)

    def parse_request(self):
        parsed = super().parse_request()
        if parsed:
            self.server.watch(self.connection, self.engine.settings.request_timeout)
        return parsed


    def do_GET(self):
        self.dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def dispatch(self):
        try:
            result = self.answer()
        except ApiError as e:
            result = e
        except sqlite3.DatabaseError as e:
            result = database_error(e)
            if "malformed" in str(e):          # damage found by a request: health says so
                self.engine.store.damage = str(e)
        except Exception:
            log.error("internal error on %s %s\n%s", self.command, escape_log(self.path),
                      traceback.format_exc())
            result = ApiError(500, "INTERNAL_ERROR", "Internal server error")
        if not self.body_read:
            # Answered before its body was read (a refusal, HEAD): that body
            # must never be read as the next request, which would pass no check.
            self.close_connection = True
        try:
            if isinstance(result, ApiError):
                self.send_json(result.status, result.openai_body() if self.path.startswith(
                    "/v1/") else result.body(), result.headers)
            elif isinstance(result, EventStream):
                self.send_stream(result)
            elif isinstance(result, Answer):
                self.send(result.status, result.body, result.headers)
            else:
                self.send_json(201 if isinstance(result, Created) else 200,
                               {"success": True, **result})
        except OSError:          # the client hung up before its answer was written
            self.close_connection = True
            log.info("%s went away before the answer to %s %s", self.address_string(),
                     self.command, escape_log(self.path))

    def answer(self):
        """The request checked, read and handled: what its handler returned."""
        engine = self.engine
        parts = urllib.parse.urlsplit(self.path)
        path = parts.path
        self.check_host()
        api = path.startswith(("/api/", "/v1/"))
        try:
            handler, params, missing = *match_route(self.command, path), None
        except ApiError as e:                     # said after the key is checked
            handler, params, missing = None, {}, e
        if api and not getattr(handler, "ticketed", False):   # a ticket is its own key
            self.check_auth()
        if missing is not None:
            raise missing
        if api:
            self.check_origin(handler)
        waiting = False
        if not engine.ready.is_set() and api and handler is not api_health:
            older = engine.older and WHILE_MIGRATING.get(handler)
            waiting = older is None and getattr(handler, "waits_for_start", False)
            if older is None and not waiting:
                raise starting(engine.store.progress.as_dict())
            handler = older or handler
        if self.command == "HEAD" and api:
            return HEAD_ANSWER                    # headers only: never the GET's work
        body = self.read_body(handler)
        if waiting and not engine.ready.wait(START_WAIT_S):   # (its body read: no deadline)
            raise starting(engine.store.progress.as_dict())
        if isinstance(body, BodyFile):            # read by the handler, under the deadline
            result = handler(engine, Request(self.command, path, urllib.parse.parse_qs(
                parts.query), self.headers, body, params, self.connection))
            self.body_read = body.left == 0
            self.server.unwatch(self.connection)
            return result
        self.body_read = True
        self.server.unwatch(self.connection)      # read in full: no deadline now
        return handler(engine, Request(self.command, path, urllib.parse.parse_qs(parts.query),
                                    self.headers, body, params, self.connection))

    def handle(self):
        try:
            super().handle()
        finally:
            self.engine.store.release()   # this thread's connection ends with its client's

    # Checks, in the order a request meets them
    def body_limit(self, handler):
        """The largest body a route takes: its `body_up_to` setting, else max_body_bytes."""
        settings = self.engine.settings
        return getattr(settings, getattr(handler, "body_up_to", "max_body_bytes"))

    def may_continue(self):
        length = ascii_number(self.headers.get("Content-Length", ""), 30)
        try:
            handler, _ = match_route(self.command, urllib.parse.urlsplit(self.path).path)
        except ApiError:
            handler = None
        return length is not None and length <= self.body_limit(handler)

    def check_host(self):
        """Against DNS rebinding: the Host must name this machine. Beyond
        loopback, IP addresses and the names the user allowed pass too."""
        hosts = self.headers.get_all("Host") or []
        name = host_name(hosts[0]) if len(hosts) == 1 else ""
        if name in self.server.host_names:
            return
        if not is_loopback(self.engine.settings.host) and is_ip_literal(name):
            return
        raise ApiError(403, "FORBIDDEN", "Host header must name this machine "
                       "(localhost, 127.0.0.1 or [::1], or a name given with --allowed-host)")

    def check_auth(self):
        key = self.engine.settings.api_key
        if not key:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), key.encode()):
            raise ApiError(401, "UNAUTHORIZED", "API key required: send "
                           "'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": 'Bearer realm="llama-chat"'})

    def check_origin(self, handler):
        """A browser says where a request comes from: any other origin than this
        server's is refused for every write, and for the reads that copy the
        whole history (a page elsewhere could otherwise make the server copy
        it again and again with no-cors GETs). Other reads are answered
        without CORS headers, so another origin's page cannot read them.
        Clients that send neither header (curl, scripts) are not browsers."""
        if self.command in ("GET", "HEAD") and not getattr(handler, "copies_history", False):
            return
        origin = self.headers.get("Origin")
        site = self.headers.get("Sec-Fetch-Site")
        host = self.headers.get("Host", "")
        if (site is not None and site.lower() not in ("same-origin", "none")) or (
                origin is not None and origin.lower() not in (
                    f"http://{host}".lower(), f"https://{host}".lower())):
            raise ApiError(403, "FORBIDDEN", "Requests from another origin are refused")

    def read_body(self, handler=None):
        takes_file = getattr(handler, "takes_file", False)
        if "Transfer-Encoding" in self.headers:
            self.close_connection = True
            raise ApiError(411, "LENGTH_REQUIRED",
                           "Send the body with Content-Length, not Transfer-Encoding")
        raw = self.headers.get("Content-Length")
        if raw is None:
            if self.command in ("POST", "PUT") and not takes_file:
                self.require_json_type()
            return BodyFile(self.rfile, 0) if getattr(handler, "reads_body", False) else b""
        length, limit = ascii_number(raw, 30), self.body_limit(handler)
        if length is None:
            self.close_connection = True
            raise ApiError(400, "VALIDATION_ERROR", "Content-Length is not a number",
                           field="Content-Length")
        if length > limit:
            self.close_connection = True
            raise ApiError(413, "PAYLOAD_TOO_LARGE", f"Request body is larger than {limit} bytes"
                           + ("; the command line imports a file of any size: python3 "
                              "llama_chat.py import FILE (or raise max_import_bytes)"
                              if handler is api_import else f" (raise "
                              f"{handler.body_up_to} in config.json)"
                              if hasattr(handler, "body_up_to") else ""))
        if getattr(handler, "reads_body", False):
            return BodyFile(self.rfile, length)
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            self.close_connection = True
            raise ApiError(400, "INVALID_JSON", "Request body ended early")
        if self.command in ("POST", "PUT") and not takes_file:
            self.require_json_type()
        return body

    def require_json_type(self):
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE",
                           "POST and PUT bodies must be sent as Content-Type: application/json")

    # Writing
    def send(self, status, body, headers):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if body or self.command != "HEAD":    # HEAD of an API route: its length unknown
            self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        # end_headers(), with the body in the same write: one send() per answer.
        self._headers_buffer.append(b"\r\n")
        if self.command != "HEAD":
            self._headers_buffer.append(body)
        self.flush_headers()

    def send_json(self, status, payload, headers=None):
        body = encode_answer(payload).encode()
        self.send(status, body, {"Content-Type": "application/json; charset=utf-8",
                                 "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                                 **(headers or {})})

    def send_stream(self, stream):
        self.close_connection = True
        chunked = stream.whole and self.request_version != "HTTP/1.0"
        encode = (lambda batch: b"%x\r\n%s\r\n" % (len(data := stream.encode(batch)), data)) \
            if chunked else stream.encode
        try:
            self.send_response(200)
            for name, value in stream.headers.items():
                self.send_header(name, value)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.flush()
            try:
                self.relay(stream.events, encode)
            except (sqlite3.Error, OSError) as e:
                log.error("%s %s failed part-way: %s (the client sees its download broken)",
                          self.command, escape_log(self.path), e)
                return
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        finally:
            stream.events.close()
            stream.close()

    def relay(self, events, encode):
        gone = False
        for batch in events:
            if gone:
                continue
            data = b": keep-alive\n\n" if batch is None else encode(batch)
            try:
                self.wfile.write(data)
                self.wfile.flush()
            except OSError:
                gone = True
                try:
                    events.throw(ClientGone())
                except StopIteration:
                    pass

    def send_error(self, code, message=None, explain=None):
        """Protocol errors (bad request line, 414, 431, 501) in the same JSON body."""
        codes = {400: "BAD_REQUEST", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED",
                 408: "REQUEST_TIMEOUT", 414: "URI_TOO_LONG",
                 431: "REQUEST_HEADER_FIELDS_TOO_LARGE", 501: "NOT_IMPLEMENTED",
                 505: "HTTP_VERSION_NOT_SUPPORTED"}
        self.close_connection = True
        try:
            self.send_json(code, {"success": False,
                                  "error": message or self.responses.get(code, ("Error",))[0],
                                  "code": codes.get(code, "BAD_REQUEST")})
        except OSError:
            pass

    def log_message(self, fmt, *args):
        log.info("%s %s", self.address_string(), escape_log(fmt % args))


LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]"}


def tls_context(settings):
    """HTTPS as the standard ssl module serves it (TLS 1.2 at least), from
    the certificate and key given. Each connection's handshake is made in its
    own thread, under the header deadline (Handler.setup), never in the
    loop that accepts connections."""
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"tls_cert and tls_key cannot be used: {e}") from None
    return context


class Server(ThreadingHTTPServer):
    """A thread per connection, at most max_connections at once and at most
    connections_per_address of them from one client address (so that one
    client holding connections open cannot take every slot), and a watchdog
    that cuts off connections whose request is not in before its deadline."""
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, engine):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        handler = type("BoundHandler", (Handler,), {"engine": engine})
        self.engine = engine
        self.host_names = LOOPBACK_NAMES | set(engine.settings.allowed_hosts)
        if not is_loopback(engine.settings.host):
            name = socket.gethostname().lower()
            self.host_names |= {name, name + ".local", engine.settings.host.lower()}
        self.by_address = {}                 # client address -> connections open
        self._deadlines = {}
        self._guard = threading.Lock()
        self._closed = threading.Event()     # before binding: a failed bind closes at once
        super().__init__(address, handler)
        if engine.settings.tls_cert:
            self.socket = tls_context(engine.settings).wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False)
        threading.Thread(target=self._watchdog, daemon=True).start()

    def process_request(self, request, client_address):
        settings, address = self.engine.settings, client_address[0]
        with self._guard:
            held = self.by_address.get(address, 0)
            full = self.connections >= settings.max_connections or \
                held >= settings.connections_per_address
            if not full:
                self.by_address[address] = held + 1
        if not full:
            return super().process_request(request, client_address)
        try:
            request.settimeout(1)
            request.sendall(BUSY_RESPONSE)
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._guard:
                held = self.by_address.pop(client_address[0]) - 1
                if held:
                    self.by_address[client_address[0]] = held

    @property
    def connections(self):
        """Connections being served: the sum over addresses, kept in one place."""
        return sum(self.by_address.values())

    def watch(self, sock, seconds):
        with self._guard:
            self._deadlines[sock] = time.monotonic() + seconds

    def unwatch(self, sock):
        with self._guard:
            self._deadlines.pop(sock, None)

    def _watchdog(self):
        while not self._closed.wait(0.25):
            now = time.monotonic()
            with self._guard:
                late = [s for s, deadline in self._deadlines.items() if deadline < now]
                for sock in late:
                    del self._deadlines[sock]
            for sock in late:
                shut(sock)

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], OSError):   # a client that went away mid-answer
            return
        log.error("error serving %s\n%s", client_address[0], traceback.format_exc())

    def server_close(self):
        self._closed.set()
        super().server_close()


def make_server(settings, store=None):
    """A server listening already, its store opening in the background."""
    server = Server((settings.host, settings.port), Engine(settings, store))
    server.engine.start()
    return server


###############################################################################
# Command line: each command with its arguments
###############################################################################


class CommandError(Exception):
    """A command failed: one line on stderr, exit status 1."""


def history_store(settings, create=False):
    if not create and not os.path.exists(settings.db):
        raise CommandError(f"no database at {settings.db} (give --db)")
    try:
        return Store(settings.db)
    except sqlite3.Error as e:
        raise CommandError(f"database {settings.db} cannot be opened: {e}") from None


def output_to(args):
    if not args.output or args.output == "-":
        return contextlib.nullcontext(sys.stdout.buffer)
    try:
        return open(args.output, "wb")
    except OSError as e:
        raise CommandError(f"cannot write {args.output}: {e.strerror}") from None


@command("search", "search the history", "Search the history as /api/search does.",
         argument("query"),
         argument("--limit", type=int, default=20, help="at most this many (default 20)"),
         argument("--project", type=int, metavar="ID", help="in this project's conversations"),
         argument("--json", action="store_true", help="the results as JSON"))
def command_search(settings, args):
    store = history_store(settings)
    results = store.search(args.query, max(1, min(args.limit, SEARCH_LIMIT_MAX)), args.project)
    if args.json:
        print(json.dumps({"query": args.query, "count": len(results), "results": results},
                         ensure_ascii=False, indent=2))
        return
    for r in results:
        print(f"{r['conversation_id']}\t{r['message_id']}\t{r['role']}\t{r['title']}\t"
              + " ".join(r["snippet"].split()))


@command("export", "export conversations",
         "Export every conversation (or one) to a file or to standard output.",
         argument("--conversation", type=int, metavar="ID", help="only this one"),
         argument("--format", choices=("json", "jsonl", "md", *DATASET_FORMATS),
                  default="json", help="json (default), jsonl (everything), md (one "
                  "conversation), preference or sft (datasets from the trees, JSONL)"),
         argument("-q", metavar="TEXT", help="a dataset: conversations that match this search"),
         argument("--model", help="a dataset: replies of this model"),
         argument("--since", metavar="DAY", help="a dataset: replies from this day (ISO, UTC)"),
         argument("--until", metavar="DAY", help="a dataset: replies up to this day"),
         argument("--project", type=int, metavar="ID",
                  help="a dataset: conversations of this project"),
         argument("-o", "--output", metavar="FILE", help="write here (default: stdout)"))
def command_export(settings, args):
    store = history_store(settings)
    if args.format == "md" and args.conversation is None:
        raise CommandError("--format md exports one conversation: give --conversation ID")
    narrowing = {name: getattr(args, name) for name in DATASET_ARGS}
    if args.format in DATASET_FORMATS:
        for name in ("since", "until"):
            if narrowing[name] is not None and not ISO_DAY.match(narrowing[name]):
                raise CommandError(f"--{name} must be an ISO day, as 2026-12-02")
        with output_to(args) as out:
            for line in dataset(store.db, store.index, args.format, DatasetFilter(**narrowing)):
                out.write(line)
        return
    if any(v is not None for v in narrowing.values()):
        raise CommandError("-q, --model, --since, --until and --project narrow the datasets "
                           f"(--format {' or '.join(DATASET_FORMATS)})")
    with output_to(args) as out:
        if args.conversation is None:
            for piece in export_all(store.db, args.format):
                out.write(piece)
            return
        conversation = store.get_conversation(args.conversation)
        if conversation is None:
            raise CommandError(f"no conversation {args.conversation}")
        pieces = [export_markdown(conversation, json.loads(store.tree.branch(
            args.conversation)), store.attachment_bytes)] if args.format == "md" else \
            conversation_export(
            store.db, args.conversation)
        for piece in pieces:
            out.write(piece)


# The command line imports a file of any size; a ZIP may inflate to this many
# times its size, or max_import_bytes if that is more.
ZIP_RATIO = 64


def import_line(name, done):
    """What the command line says of a file imported."""
    extra = "".join(f", {done[k]} {k}" for k in ("empty", "coerced") if done[k])
    return (f"{name}: imported {done['conversations']} conversations, {done['messages']} "
            f"messages, {done['skipped']} skipped{extra} ({done['format']})"
            + "".join(f"\n  coerced: {line}" for line in done.get("coercions", ())))


@command("import", "import history files",
         "Import files of llama-chat, llama.cpp's web UI, Open WebUI or ChatGPT (JSON, JSONL "
         "or ZIP), each in one transaction; what was imported before is skipped.",
         argument("files", nargs="+", metavar="FILE"))
def command_import(settings, args):
    """Each file in one import of its own, all of them tried: a line each
    (imported, or why not), exit 1 if any failed."""
    company = "other processes" if os.path.exists(settings.db) and \
        used_by_others(settings.db) else "none"
    store = history_store(settings, create=True)
    shown = sys.stderr.isatty()
    failed = 0
    for name in args.files:
        def progress(counts):
            if shown:
                print(f"\r{name}: {counts['conversations']:,} conversations, "
                      f"{counts['messages']:,} messages", end="", file=sys.stderr, flush=True)
        try:
            with open(name, "rb") as f:
                limit = max(settings.max_import_bytes, ZIP_RATIO * os.fstat(f.fileno()).st_size)
                done = import_file(store, f, progress, limit, company)
        except (OSError, ApiError, sqlite3.Error) as e:
            failed += 1
            why = e.message if isinstance(e, ApiError) else getattr(e, "strerror", None) or e
            print(f"{name}: not imported: {why} (nothing of it was stored)")
            continue
        finally:
            if shown:
                print("\r\033[K", end="", file=sys.stderr)
        print(import_line(name, done))
    if failed:
        raise CommandError(f"{failed} of {len(args.files)} files not imported")


@command("backup", "copy the database consistently",
         "Copy the database with SQLite's online backup, safe while chats are written.",
         argument("file", metavar="FILE"))
def command_backup(settings, args):
    store = history_store(settings)
    try:
        store.db.backup(args.file)
    except (sqlite3.Error, OSError) as e:
        raise CommandError(f"cannot back up to {args.file}: {e}") from None
    print(f"backed up {settings.db} to {args.file}")


def existing_database(path):
    """A file that is there and not empty, or CommandError (a check or a
    restore of an empty download would otherwise make a new database)."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise CommandError(f"{path}: {e.strerror}") from None
    if size == 0:
        raise CommandError(f"{path} is empty (0 bytes): not a database")


def checked_database(path):
    """SQLite's integrity check and the search index's of the llama-chat
    database at path, changing nothing (an older one is not migrated): what
    was checked, or CommandError saying what is wrong."""
    existing_database(path)
    try:
        store = Store(path, open_now=False)
    except sqlite3.DatabaseError as e:
        raise CommandError(f"{path} is damaged: {e}") from None
    try:
        try:
            damage = store.check_integrity(whole=True)
        except sqlite3.DatabaseError as e:
            damage = str(e)
        if damage:
            raise CommandError(f"{path} is damaged: {damage}")
        if store.version < SCHEMA_VERSION:
            return f"SQLite's integrity check; schema {store.version}, migrated when opened"
        if store.read_only:
            return "SQLite's integrity check; the search index's needs a file it can write"
        if store.index.fts and store.index.in_step():
            building = store.index.unbuilt()
            if building:
                return (f"SQLite's integrity check; the search index is being built "
                        f"({building['done']} of {building['total']} messages)")
            try:
                store.index.check()
            except sqlite3.Error as e:
                raise CommandError(f"{path} is damaged: search index: {e}") from None
            return "SQLite's integrity check and the search index's"
        return "SQLite's integrity check"
    finally:
        store.close()


@command("check", "check the database and its search index",
         "Run SQLite's integrity check and the search index's, changing nothing (a file "
         "that is not llama-chat's is refused).")
def command_check(settings, args):
    print(f"{settings.db}: ok ({checked_database(settings.db)})")


@command("restore", "put a backup in the database's place",
         "Check a backup, move the database (and its -wal and -shm) aside, never deleting "
         "them, and put the backup in its place. Refused while a server or a command has "
         "the database open.",
         argument("file", metavar="BACKUP"))
def command_restore(settings, args):
    """The backup checked, copied beside the database, the database and its
    -wal and -shm moved aside (kept, with the time in their names), the copy
    put in its place: a -wal of the old file is never replayed into it."""
    backup, target = args.file, settings.db
    beside = [backup + suffix for suffix in ("-wal", "-shm") if not os.path.exists(backup + suffix)]
    what = checked_database(backup)
    lock = None
    if os.path.exists(target):
        try:
            lock = presence_lock(target, alone=True)
        except BlockingIOError:
            raise CommandError(f"{target} is open in a llama-chat (a server or a command): "
                               "stop it first") from None
        except OSError as e:
            raise CommandError(f"{target}: {e.strerror}") from None
    try:
        partial = target + ".restoring"
        try:
            Database(backup, read_only=read_only_reason(backup) or "a backup").backup(partial)
            aside = f"{target}.before-restore-{now_iso()[:19].replace(':', '')}"
            moved = []
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(target + suffix):
                    os.rename(target + suffix, aside + suffix)
                    moved.append(aside + suffix)
            os.replace(partial, target)
        except (OSError, sqlite3.Error) as e:
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise CommandError(f"cannot restore {backup} to {target}: {e}") from None
    finally:
        if lock:
            lock.close()
        for made in beside:             # SQLite's files beside the backup, made by reading it
            if os.path.exists(made) and (made.endswith("-shm") or os.path.getsize(made) == 0):
                with contextlib.suppress(OSError):
                    os.remove(made)
    print(f"restored {backup} ({what}: ok) to {target}"
          + (f"; what was there is kept as {', '.join(moved)}" if moved else ""))


@command("stats", "what the history holds", "Count conversations and messages.")
def command_stats(settings, args):
    held = history_store(settings).holds()
    roles = held["roles"]
    print(f"database      {settings.db} ({os.path.getsize(settings.db) / 2**20:.1f} MiB)\n"
          f"conversations {held['conversations']:,} ({held['api']:,} through /v1)\n"
          f"messages      {sum(roles.values()):,} ("
          + ", ".join(f"{n:,} {r}" for r, n in sorted(roles.items())) + ")\n"
          f"from {held['first'] or '-'} to {held['last'] or '-'}")


###############################################################################
# Main
###############################################################################

def prepare_settings(settings):
    """Beyond loopback with no key: make one up (the page takes it from the URL).
    A llama-server to start: checked, and given a loopback URL (its port that
    of --llamacpp-url, or a free one when that is the default)."""
    if not is_loopback(settings.host) and not settings.api_key:
        settings = replace(settings, api_key=kept_key(settings.db + ".key"), key_generated=True)
    if settings.llama_server:
        if not (os.path.isfile(settings.llama_server)
                and os.access(settings.llama_server, os.X_OK)):
            raise ConfigError(f"--llama-server {settings.llama_server} is not an executable file")
        if bool(settings.llama_model) == bool(settings.llama_models_dir):
            raise ConfigError("--llama-server needs --model FILE or --models-dir DIR (one)")
        if settings.llama_model and not os.path.isfile(settings.llama_model):
            raise ConfigError(f"--model {settings.llama_model} is not a file")
        if settings.llama_models_dir and not os.path.isdir(settings.llama_models_dir):
            raise ConfigError(f"--models-dir {settings.llama_models_dir} is not a folder")
        parts = urllib.parse.urlsplit(settings.llamacpp_url)
        if not is_loopback(parts.hostname or ""):
            raise ConfigError("--llama-server starts llama-server on this machine: "
                              f"--llamacpp-url must be a loopback address, not {parts.hostname}")
        port = parts.port if settings.llamacpp_url != DEFAULT_CONFIG["llamacpp_url"] \
            else free_loopback_port()
        settings = replace(settings, llamacpp_url=f"http://127.0.0.1:{port}")
    return settings


def kept_key(path):
    """The key made up for a start beyond loopback, kept in `path` (0600) and
    used again at the next start, so that phones keep working."""
    try:
        with open(path) as f:
            key = f.read().strip()
        if re.fullmatch(r"[\w-]{20,200}", key):
            private_file(path, create=False)
            return key
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ConfigError(f"the key file {path} cannot be read: {e.strerror}") from None
    key = secrets.token_urlsafe(24)
    try:
        private_file(path)
        with open(path, "w") as f:
            f.write(key + "\n")
    except OSError as e:
        raise ConfigError(f"the key file {path} cannot be written: {e.strerror}") from None
    return key


def report_llamacpp(engine):
    state = engine.upstream.health()
    if state["ok"]:
        log.info("llama.cpp at %s answers (%.0f ms)", state["url"], state["latency_ms"])
    elif engine.managed:                  # started here: it answers once its model is loaded
        log.info("llama-server at %s is starting (%s); /api/health says when it answers",
                 state["url"], state.get("error"))
    else:
        log.warning("llama.cpp at %s does not answer yet (%s); start it with: %s",
                    state["url"], state.get("error"), state["start_hint"])


def urls_to_open(host, port, scheme="http"):
    """Where the page can be opened: the address listened on, or, for all of
    this machine's (0.0.0.0, ::), its host name and each address that others
    can reach, then loopback."""
    def url(name):
        return f"{scheme}://[{name}]:{port}/" if ":" in name else f"{scheme}://{name}:{port}/"
    if host not in ("0.0.0.0", "::", ""):
        return [url(host)]
    name = socket.gethostname()
    try:
        found = {info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET)}
    except OSError:
        found = set()
    addresses = sorted((found | interface_addresses()) - {""},
                       key=lambda a: tuple(int(part) for part in a.split(".")))
    return [url(name)] + [url(a) for a in addresses if not is_loopback(a)] + [url("127.0.0.1")]


def interface_addresses():
    """The IPv4 address of each network interface (Linux; elsewhere none)."""
    found = set()
    try:
        import fcntl
        import struct
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            for _, interface in socket.if_nameindex():
                try:
                    packed = fcntl.ioctl(probe.fileno(), 0x8915,      # SIOCGIFADDR
                                         struct.pack("256s", interface[:15].encode()))
                    found.add(socket.inet_ntoa(packed[20:24]))
                except OSError:
                    continue                  # an interface without an IPv4 address
    except (ImportError, OSError, AttributeError):
        pass
    return found


def report_progress(engine):
    """The start-up work's progress on the terminal: one line updated in place,
    or a log line every 5 s when the output is not a terminal."""
    tty, last = sys.stderr.isatty(), ""
    shown_at = time.monotonic()
    while not engine.ready.wait(0.5 if tty else 5):
        p = engine.store.progress
        line = p.step + (f": {p.done:,} of {p.total:,}" if p.total else "") + " ..."
        if tty:
            print(f"\r{line:<72}", end="", file=sys.stderr, flush=True)
        elif line != last or time.monotonic() - shown_at >= 5:
            log.info("%s", line)
        last, shown_at = line, time.monotonic()
    if tty and last:
        print("\r" + " " * 72 + "\r", end="", file=sys.stderr, flush=True)


def when_open(engine, server):
    """Once the store is open: say so, or stop the app if it could not be."""
    engine.ready.wait()
    if engine.startup_error:
        if not engine.stopping.is_set():
            log.error("database %s cannot be opened: %s", engine.settings.db, engine.startup_error)
        server.failed = not engine.stopping.is_set()
        threading.Thread(target=server.shutdown, daemon=True).start()
        return
    log.info("database %s (%s)", os.path.abspath(engine.settings.db),
             "FTS5 search" if engine.store.index.fts
             else "no FTS5 in this SQLite: search uses LIKE")
    if engine.store.backup_path:
        log.info("migrated the database; the copy from before is %s", engine.store.backup_path)


def main(argv=None):
    args = build_arg_parser().parse_args(split_extra(argv)[0])
    if args.command in COMMANDS:
        try:
            COMMANDS[args.command][0](load_settings(argv), args)
        except ConfigError as e:
            print(f"llama-chat: {e}", file=sys.stderr)
            return 2
        except (CommandError, sqlite3.Error) as e:
            print(f"llama-chat {args.command}: {e}", file=sys.stderr)
            return 1
        except BrokenPipeError:            # | head
            return 0
        return 0
    return serve(argv)


def serve(argv):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    quick_logging()
    steady_malloc()
    try:
        settings = discover_llamacpp(prepare_settings(load_settings(argv)))
        server = make_server(settings)
    except ConfigError as e:
        print(f"llama-chat: {e}", file=sys.stderr)
        return 2
    except sqlite3.Error as e:
        print(f"llama-chat: database {settings.db} cannot be opened: {e}", file=sys.stderr)
        return 2
    except OSError as e:          # a port in use, a host name that does not resolve
        print(f"llama-chat: cannot listen on {settings.host}:{settings.port}: "
              f"{e.strerror or e}", file=sys.stderr)
        return 1
    engine = server.engine
    server.failed = False
    if settings.llama_server:
        try:
            engine.managed = ManagedLlamaServer(settings)
            engine.managed.start()
        except OSError as e:
            print(f"llama-chat: cannot start {settings.llama_server}: {e.strerror or e}",
                  file=sys.stderr)
            server.server_close()
            return 1
    urls = urls_to_open(settings.host, server.server_address[1],
                        "https" if settings.tls_cert else "http")
    if settings.key_generated:
        print("llama-chat listens beyond this machine, so /api/ needs a key (kept in "
              f"{os.path.abspath(settings.db)}.key for the next start; delete that file for a "
              "new key). Open one of:\n"
              + "\n".join(f"  {u}#token={settings.api_key}" for u in urls), flush=True)
    else:
        print(f"llama-chat {__version__}: open {urls[0]}"
              + "".join(f"\n  or {u}" for u in urls[1:]), flush=True)
    threading.Thread(target=report_progress, args=(engine,), daemon=True).start()
    threading.Thread(target=when_open, args=(engine, server), daemon=True).start()
    threading.Thread(target=report_llamacpp, args=(engine,), daemon=True).start()

    def stop(signum, frame):
        log.info("stopping (signal %d)", signum)
        engine.stopping.set()
        if not engine.ready.is_set():
            engine.store.interrupt()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        engine.stop_streams()
        server.server_close()
        if engine.managed:
            engine.managed.stop()
        if not engine.ready.wait(30):
            log.warning("the database is still being opened; stopping anyway")
        elif engine.startup_error and engine.stopping.is_set():
            log.info("stopped before the database was ready: it is as it was before, "
                     "and the next start begins again")
        try:
            engine.store.db.checkpoint()
        except sqlite3.Error as e:
            log.warning("WAL checkpoint failed: %s", e)
    return 1 if server.failed else 0


if __name__ == "__main__":
    sys.exit(main())
