"""Tests for llama-chat: the app in-process on port 0 over a temp-file database,
against a stub llama.cpp server that answers the way llama-server does.

Run: python3 -m pytest -q
"""

import base64
import errno
import contextlib
import gc
import hashlib
import http.client
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import textwrap
import types
import urllib.parse
import uuid
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import llama_chat

HERE = os.path.dirname(os.path.abspath(__file__))
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z$")
MODEL = "qwen2.5-0.5b-instruct-q4_0.gguf"


###############################################################################
# Stub llama.cpp server
###############################################################################

class Stub:
    """What the stub answers; tests change these fields."""

    def __init__(self):
        self.reply = "Machine learning lets computers learn patterns from data."
        self.reasoning = ""
        self.mode = "ok"          # ok | stall | error500 | garbage | cut | error_chunk | no_usage
        self.token_delay = 0.0
        self.hold_at = None       # a token's index: the reply waits there until `go` is set
                                  # (sending keep-alive comments)
        self.go = threading.Event()
        self.stall = 0.0
        self.router = False
        self.router_status = "loaded"     # of the first model, in router mode
        self.second_status = "unloaded"   # of the second, which POST /models/load loads
        self.load_delay = 0.3             # seconds a load takes
        self.props_asked = []             # the paths of GET /props, as asked
        self.context_chars = 0    # > 0: refuse prompts longer than this, as llama-server does
        self.no_models_route = False
        self.models_error = False         # /models and /v1/models answer 500
        self.loading = False      # /health answers 503 "Loading model", as while one loads
        self.finish_reason = "stop"   # "length": as when max_tokens cut the reply
        self.titles = "ok"            # title requests: ok | fail (500) | slow (1 s)
        self.echo_prefill = False     # send a last assistant message again first, as
                                      # llama-server does when it continues one
        self.tool_calls = None        # a list: the reply calls these tools instead
        self.prompt_tools = True      # /tokenize, /apply-template, .../input_tokens
        self.tokenized = []           # what /tokenize was asked to count
        self.template_words = 0       # what /apply-template adds to each message, in words
        self.n_ctx = 4096             # of /props
        self.total_slots = 64         # of /props: replies llama-server makes at once
        self.modalities = {"vision": True, "audio": True}   # of /props: what the model takes
        self.progress_steps = 0       # prompt_progress chunks sent before the first token
        self.progress_delay = 0.0
        self.reasoning_control = True  # POST /v1/chat/completions/control (else 404, older)
        self.controls = []            # what it was asked
        self.armed = set()            # completion ids asked with reasoning_control: true
        self.reasoning_ended = threading.Event()   # a control ended the reasoning
        self.completions = 0
        self.api_key = None           # as llama-server --api-key: all but /health need it
        self.sent = []                # the body bytes of the last answer, write by write
        self.requests = []
        self.open_streams = 0
        self.connections = []     # the server side of every connection made to the stub
        self.lock = threading.Lock()

    def tokens(self):
        return re.findall(r"\s*\S+\s*", self.reply)


class StubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    stub = None

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.stub.lock:
            self.stub.connections.append(self.connection)

    def log_message(self, *args):
        pass

    def send_json(self, status, body):
        data = json.dumps(body).encode()
        self.stub.sent = [data]
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def key_refused(self):
        """llama-server's key check: every route but /health and /v1/health."""
        key = self.stub.api_key
        if key is None or self.path in ("/health", "/v1/health") or \
                self.headers.get("Authorization") == f"Bearer {key}":
            return False
        self.send_json(401, {"error": {"message": "Invalid API Key",
                                       "type": "authentication_error", "code": 401}})
        return True

    def do_GET(self):
        stub = self.stub
        if self.key_refused():
            return
        if self.path.startswith("/props"):
            stub.props_asked.append(self.path)
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            model = query.get("model")
            loaded = {"gemma-3-270m": stub.router_status == "loaded"}
            if stub.router and model and query.get("autoload") == ["false"] and not loaded.get(
                    model[0], False):
                return self.send_json(400, {"error": {"code": 400, "type": "invalid_request_error",
                                                      "message": "model is not loaded"}})
            self.send_json(200, {"total_slots": stub.total_slots, "modalities": stub.modalities,
                                 "default_generation_settings": {"n_ctx": stub.n_ctx, "params": {
                "temperature": 0.800000011920929 if not model else 0.6, "top_k": 40,
                "n_predict": -1, "seed": 4294967295, "samplers": ["top_k"]}}})
        elif self.path == "/health" and stub.loading:
            self.send_json(503, {"error": {"code": 503, "message": "Loading model",
                                           "type": "unavailable_error"}})
        elif self.path == "/health":
            self.send_json(200, {"status": "ok"})
        elif self.path in ("/models", "/v1/models") and stub.models_error:
            self.send_json(500, {"error": {"code": 500, "message": "lists nothing today"}})
        elif self.path == "/models" and stub.no_models_route:
            self.send_json(404, {"error": {"code": 404, "message": "File Not Found"}})
        elif self.path == "/models" and stub.router:
            self.send_json(200, {"data": [
                {"id": "gemma-3-270m", "object": "model",
                 "status": {"value": stub.router_status}},
                {"id": "qwen3-0.6b", "object": "model", "status": {
                    "value": stub.second_status, "args": ["llama-server", "-m", "qwen3.gguf", "-c", "8192",
                                                  "--port", "0"]},
                 "architecture": {"input_modalities": ["text"],       # no projector
                                  "output_modalities": ["text"]}},
            ]})
        elif self.path in ("/models", "/v1/models"):
            self.send_json(200, {"models": [{"name": "/srv/models/" + MODEL}], "object": "list",
                                 "data": [{"id": "/srv/models/" + MODEL, "object": "model",
                                           "owned_by": "llamacpp"}]})
        else:
            self.send_json(404, {"error": {"code": 404, "message": "File Not Found"}})

    def do_POST(self):
        stub = self.stub
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        if self.key_refused():
            return
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):          # as llama-server answers it
            return self.send_json(400, {"error": {"code": 400, "type": "invalid_request_error",
                                                  "message": "invalid JSON"}})
        if self.path in ("/tokenize", "/apply-template", "/v1/chat/completions/input_tokens"):
            return self.prompt_tool(body)
        if self.path in ("/models/load", "/models/unload"):
            return self.load(body)
        if self.path == "/v1/chat/completions/control":      # llama-server's reasoning_end
            stub.controls.append(body)
            if not stub.reasoning_control:                    # an older llama-server
                return self.send_json(404, {"error": {"code": 404, "message": "File Not Found",
                                                      "type": "not_found_error"}})
            armed = body.get("id") in stub.armed
            stub.reasoning_ended.set()
            return self.send_json(200, {"success": armed, **({} if armed else {
                "message": "reasoning control not enabled for this completion"})})
        with stub.lock:
            stub.requests.append({"body": body, "headers": dict(self.headers), "raw": raw,
                                  "path": self.path})
        if stub.stall:
            time.sleep(stub.stall)
        if self.path != "/v1/chat/completions" or not isinstance(body, dict):  # an echo
            return self.send_json(200, {"object": "echo", "path": self.path, "body": body})
        if stub.router and body.get("model") not in ("gemma-3-270m", "qwen3-0.6b"):
            return self.send_json(400, {"error": {"code": 400, "type": "invalid_request_error",
                                                  "message": "model name is missing from the "
                                                  "request" if not body.get("model") else
                                                  f"model '{body['model']}' not found"}})
        if body["messages"][0]["content"] == llama_chat.TITLE_PROMPT and stub.titles != "ok":
            if stub.titles == "slow":
                time.sleep(1)
            else:
                return self.send_json(500, {"error": {"code": 500, "message": "no titles"}})
        prompt = sum(len(str(m.get("content") or "")) for m in body["messages"])
        if stub.context_chars and prompt > stub.context_chars:
            return self.send_json(400, {"error": {
                "code": 400, "type": "exceed_context_size_error", "n_prompt_tokens": prompt,
                "n_ctx": stub.context_chars, "message": f"request ({prompt} tokens) exceeds the "
                f"available context size ({stub.context_chars} tokens), try increasing it"}})
        if stub.mode == "error500":
            return self.send_json(500, {"error": {"code": 500, "message": "model crashed",
                                                  "type": "server_error"}})
        if stub.mode == "garbage":
            data = b"<html>I am not llama.cpp</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return self.wfile.write(data)
        if body.get("stream"):
            return self.stream(body)
        tokens = stub.tokens()
        message = {"role": "assistant", "content": self.prefill(body) + stub.reply}
        if stub.reasoning:
            message["reasoning_content"] = stub.reasoning
        if stub.tool_calls:
            message = {"role": "assistant", "content": None, "tool_calls": stub.tool_calls}
        answer = {"choices": [{"finish_reason": "tool_calls" if stub.tool_calls
                               else stub.finish_reason, "index": 0, "message": message}],
                  "object": "chat.completion", "model": body.get("model", "x"),
                  "timings": {"prompt_n": 21, "predicted_n": len(tokens),
                              "predicted_per_second": 42.5, "prompt_ms": 30.0, "cache_n": 3,
                              "predicted_ms": len(tokens) * 20.0}}
        if stub.mode == "no_counts":
            del answer["timings"]
        if stub.mode not in ("no_usage", "no_counts"):
            answer["usage"] = {"completion_tokens": len(tokens), "prompt_tokens": 21,
                               "total_tokens": 21 + len(tokens)}
        self.send_json(200, answer)

    def load(self, body):
        """A router's POST /models/load and /models/unload (of its second
        model): loading, then loaded after load_delay; 404 when not a router."""
        stub = self.stub
        with stub.lock:
            stub.requests.append({"body": body, "headers": dict(self.headers), "path": self.path})
        if not stub.router:
            return self.send_json(404, {"error": {"code": 404, "message": "File Not Found"}})
        if body.get("model") != "qwen3-0.6b":
            return self.send_json(400, {"error": {"code": 400, "message": "model not found"}})
        if self.path.endswith("/unload"):
            stub.second_status = "unloaded"
        else:
            stub.second_status = "loading"
            threading.Timer(stub.load_delay, lambda: setattr(stub, "second_status",
                                                             "loaded")).start()
        self.send_json(200, {"success": True})

    def prompt_tool(self, body):
        """llama-server's /tokenize (a token a word here), /apply-template and
        /v1/chat/completions/input_tokens; 404 without prompt_tools."""
        stub = self.stub
        if not stub.prompt_tools:
            return self.send_json(404, {"error": {"code": 404, "message": "File Not Found"}})
        if self.path == "/tokenize":
            with stub.lock:
                stub.tokenized.append(body["content"])
            return self.send_json(200, {"tokens": list(range(len(body["content"].split())))})
        turns = [f"<{m['role']}>{m['content']}" + " <mark>" * stub.template_words
                 for m in body["messages"]]
        self.send_json(200, {"prompt": "\n".join(turns) + "\n<assistant>"}
                       if self.path == "/apply-template" else
                       {"input_tokens": sum(len(t.split()) + 3 for t in turns)})

    def prefill(self, body):
        last = body["messages"][-1]
        return last["content"] if self.stub.echo_prefill and last["role"] == "assistant" else ""

    def chunk(self, data):
        if data:
            self.stub.sent.append(data)
        if self.stub.mode == "unchunked":        # a body that ends when the connection does
            self.wfile.write(data)
        else:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def event(self, obj):
        self.chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def stream(self, body):
        stub = self.stub
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if stub.mode == "unchunked":
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with stub.lock:
            stub.open_streams += 1
            stub.sent = []
        tokens = [] if stub.tool_calls else stub.tokens()
        with stub.lock:
            stub.completions += 1
            completion = f"chatcmpl-stub{stub.completions}"
        if body.get("reasoning_control"):
            stub.armed.add(completion)
        stub.reasoning_ended.clear()
        event = self.event
        self.event = lambda obj: event({"id": completion, **obj})   # in every chunk, as there
        try:
            self.event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": None},
                                     "finish_reason": None}], "object": "chat.completion.chunk"})
            if body.get("return_progress"):       # as llama-server: a chunk per batch read
                for done in range(1, stub.progress_steps + 1):
                    self.event({"choices": [{"index": 0, "delta": {}}], "prompt_progress": {
                        "total": 100 * stub.progress_steps, "cache": 0, "processed": 100 * done,
                        "time_ms": 10.0 * done}})
                    time.sleep(stub.progress_delay)
            self.chunk(b": keep-alive\n\n")
            thinks = (body.get("chat_template_kwargs") or {}).get("enable_thinking") is not False
            for piece in re.findall(r"\S+\s*", stub.reasoning if thinks else ""):
                if stub.reasoning_ended.is_set():
                    break                             # answer now: on to the answer
                self.event({"choices": [{"index": 0, "delta": {"reasoning_content": piece},
                                         "finish_reason": None}]})
                if stub.token_delay:
                    time.sleep(stub.token_delay)
            if tokens:                            # the echo comes with the first token
                tokens[0] = self.prefill(body) + tokens[0]
            for i, token in enumerate(tokens):
                if stub.mode == "cut" and i == 3:
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if stub.mode == "error_chunk" and i == 3:
                    self.event({"error": {"code": 500, "message": "out of memory"}})
                    return
                if stub.mode == "stall_mid" and i == 3:
                    time.sleep(3)
                if i == stub.hold_at:             # kept alive: the app's read timeout
                    deadline = time.monotonic() + 30  # would end a silent reply
                    while not stub.go.wait(0.3) and time.monotonic() < deadline:
                        self.chunk(b": keep-alive\n\n")
                self.event({"choices": [{"index": 0, "delta": {"content": token},
                                         "finish_reason": None}]})
                if stub.token_delay:
                    time.sleep(stub.token_delay)
            for i, call in enumerate(stub.tool_calls or ()):   # in pieces, as llama-server
                function = call["function"]
                self.event({"choices": [{"index": 0, "finish_reason": None, "delta": {
                    "tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                    "function": {"name": function["name"], "arguments": ""}}]}}]})
                for part in re.findall(r".{1,5}", function["arguments"], re.S):
                    self.event({"choices": [{"index": 0, "finish_reason": None, "delta": {
                        "tool_calls": [{"index": i, "function": {"arguments": part}}]}}]})
            timings = {"prompt_n": 21, "predicted_n": len(tokens), "predicted_per_second": 42.5,
                       "prompt_ms": 30.0, "cache_n": 3, "predicted_ms": len(tokens) * 20.0}
            last = {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"
                                 if stub.tool_calls else stub.finish_reason}]}
            if stub.mode != "no_counts":
                last["timings"] = timings
            self.event(last)
            if (body.get("stream_options") or {}).get("include_usage") and \
                    stub.mode not in ("no_usage", "no_counts"):
                self.event({"choices": [], "usage": {
                    "completion_tokens": len(tokens), "prompt_tokens": 21,
                    "total_tokens": 21 + len(tokens)}, "timings": timings})
            self.chunk(b"data: [DONE]\n\n")
            self.chunk(b"")
            self.close_connection = True    # as llama-server does after every stream
        except OSError:
            pass
        finally:
            with stub.lock:
                stub.open_streams -= 1


def serve(server):
    # shutdown() waits for the loop's next poll: at 0.05 s, teardowns took a third of the run
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01},
                              daemon=True)
    thread.start()
    return thread


def stop(server):
    server.shutdown()
    server.server_close()


class StubServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128    # socketserver's 5 drops connects when 20 streams start


@pytest.fixture
def stub():
    state = Stub()
    handler = type("Handler", (StubHandler,), {"stub": state})
    server = StubServer(("127.0.0.1", 0), handler)
    serve(server)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    stop(server)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


###############################################################################
# The app under test
###############################################################################

class Client:
    def __init__(self, server):
        self.server = server
        self.port = server.server_address[1]
        self.engine = server.engine

    def request(self, method, path, body=None, headers=None, raw=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        hdrs = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        conn.close()
        try:
            parsed = json.loads(payload) if payload else None
        except ValueError:
            parsed = payload
        return resp.status, resp.headers, parsed

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def new_conversation(self, title="Test chat", model=MODEL):
        status, _, body = self.post("/api/conversations", {"title": title, "model": model})
        assert status == 201, body
        return body["conversation_id"]

    def chat(self, conversation_id, message="Explain machine learning", **extra):
        return self.post("/api/chat", {"conversation_id": conversation_id, "message": message,
                                       "model": MODEL, **extra})

    def put(self, path, body=None, **kw):
        return self.request("PUT", path, body, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)

    def stream(self, conversation_id, message="Explain machine learning", read=None, **extra):
        """Open a streamed chat; return (response, connection)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        body = {"conversation_id": conversation_id, "message": message, "model": MODEL,
                "stream": True, **extra}
        if message is None:
            del body["message"]
        conn.request("POST", "/api/chat", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        sock = conn.sock
        return conn.getresponse(), sock


def read_events(resp):
    events = []
    for line in resp:
        line = line.strip()
        if line.startswith(b"data: "):
            events.append(json.loads(line[6:]))
    return events


def start_app(tmp_path, llamacpp_url, store=None, **overrides):
    settings = llama_chat.Settings(
        host="127.0.0.1", port=0, llamacpp_url=llamacpp_url, db=str(tmp_path / "chat.db"),
        timeouts={"llamacpp_timeout": 2, "llamacpp_connect_timeout": 2})
    settings = replace(settings, **overrides)
    server = llama_chat.make_server(settings, store)
    serve(server)
    assert server.engine.ready.wait(30) and not server.engine.startup_error, server.engine.startup_error
    return server


@pytest.fixture
def launch(tmp_path):
    """Start apps on this test's temporary folder: launch(llamacpp_url, store=None,
    **settings); each is stopped when the test ends, however it ends."""
    started = []

    def start(llamacpp_url, store=None, **overrides):
        started.append(start_app(tmp_path, llamacpp_url, store, **overrides))
        return started[-1]

    yield start
    for server in started:
        server.engine.stopping.set()
        stop(server)


@pytest.fixture
def client(tmp_path, stub):
    server = start_app(tmp_path, stub.url)
    yield Client(server)
    server.engine.stopping.set()
    stop(server)


@pytest.fixture
def down_client(tmp_path):
    """The app with nothing listening where llama.cpp should be."""
    server = start_app(tmp_path, f"http://127.0.0.1:{free_port()}")
    yield Client(server)
    stop(server)


def rows(client, sql, *args):
    conn = sqlite3.connect(client.engine.settings.db)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


###############################################################################
# Configuration
###############################################################################

def test_shipped_config_equals_builtin_defaults():
    with open(os.path.join(HERE, "config.json")) as f:
        assert json.load(f) == llama_chat.DEFAULT_CONFIG


def test_api_config_shows_the_four_sections_and_the_attachment_limits(client):
    status, _, body = client.get("/api/config")
    assert status == 200
    expected = {k: llama_chat.DEFAULT_CONFIG[k] for k in (
        *llama_chat.CONFIG_SECTIONS, "max_attachment_bytes", "max_image_pixels")}
    expected["timeouts"] = {"llamacpp_timeout": 2, "llamacpp_connect_timeout": 2}  # the fixture's
    effective = body.pop("effective")             # what a new conversation's replies take
    assert body == {"success": True, **expected}
    assert effective["system_prompt"]["from"] == "config"
    assert effective["options"]["stop"]["value"] == \
        llama_chat.DEFAULT_CONFIG["model_options"]["stop"]


@pytest.mark.parametrize("argv, env, conf, expected", [
    ([], {}, {}, 3000),
    ([], {}, {"port": 4000}, 4000),
    ([], {"LLAMA_CHAT_PORT": "5000"}, {"port": 4000}, 5000),
    (["--port", "6000"], {"LLAMA_CHAT_PORT": "5000"}, {"port": 4000}, 6000),
])
def test_settings_precedence_flag_env_config_default(tmp_path, argv, env, conf, expected):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(conf))
    settings = llama_chat.load_settings(argv + ["--config", str(path)], env)
    assert settings.port == expected


def test_settings_read_llamacpp_url_from_either_variable(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{}")
    old = llama_chat.load_settings(["--config", str(path)], {"LLAMACPP_API_URL": "http://h:1"})
    new = llama_chat.load_settings(["--config", str(path)], {"LLAMACPP_URL": "http://h:2/",
                                                             "LLAMACPP_API_URL": "http://h:1"})
    assert (old.llamacpp_url, new.llamacpp_url) == ("http://h:1", "http://h:2")


def test_config_file_sections_merge_over_defaults(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model_options": {"temperature": 0.7},
                                "performance": {"context_history_limit": 3}}))
    settings = llama_chat.load_settings(["--config", str(path)], {})
    assert settings.model_options["temperature"] == 0.7
    assert settings.model_options["top_k"] == 50
    assert settings.performance["context_history_limit"] == 3


def test_missing_default_config_runs_on_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(llama_chat, "HERE", str(tmp_path))
    settings = llama_chat.load_settings([], {})
    assert settings.public_config() == {k: llama_chat.DEFAULT_CONFIG[k]
                                        for k in llama_chat.CONFIG_SECTIONS}


@pytest.mark.parametrize("content, words", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"model_options": {"temperature": "hot"}}', "temperature must be a float"),
    ('{"model_options": {"bogus": 1}}', "Unknown option"),
    ('{"timeouts": {"llamacpp_timeout": -1}}', "llamacpp_timeout"),
    ('{"port": "eighty"}', "port must be a whole number"),
])
def test_broken_config_stops_start_up_with_one_clear_line(tmp_path, content, words):
    path = tmp_path / "broken.json"
    path.write_text(content)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "llama_chat.py"),
                           "--config", str(path), "--db",
                           str(tmp_path / "x.db")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("conf, argv, words", [
    ({"port": True}, [], "port must be a whole number"),
    ({"port": 21003.7}, [], "port must be a whole number"),
    ({"port": 70000}, [], "port must be a whole number from 0 to 65535"),
    ({"host": 5}, [], "host must be a non-empty string"),
    ({"llamacpp_url": "http://h:abc"}, [], "llamacpp_url must be"),
    ({"llamacpp_url": "http://h:70000"}, [], "llamacpp_url must be"),
    ({"llamacpp_url": "http://"}, [], "llamacpp_url must be"),
    ({"llamacpp_url": "ftp://h"}, [], "llamacpp_url must be"),
    ({"db": 5}, [], "db must be a non-empty string"),
    ({}, ["--db", ""], "db must be a non-empty string"),
    ({}, ["--db", ":memory:"], "db must be a file's path"),
    ({"timeouts": {"llamacpp_timeout": 1e999}}, [], "timeouts.llamacpp_timeout"),
    ({"timeouts": {"llamacpp_connect_timeout": True}}, [], "llamacpp_connect_timeout"),
    ({"max_body_bytes": 10.5}, [], "max_body_bytes must be a whole number"),
    ({"model_options": {"temperature": float("nan")}}, [], "temperature must be between"),
    ({"performance": {"context_history_limit": 2.5}}, [], "context_history_limit"),
    ({"system_prompt": ["a"]}, [], "system_prompt must be a string"),
    ({"api_key": 12345}, [], "api_key must be a string"),
    ({"db": None}, [], "db must be a non-empty string"),
    ({"host": None}, [], "host must be a non-empty string"),
    ({"port": None}, [], "port must be a whole number"),
    ({}, ["--port", "\u00b3"], "port must be a whole number"),
    ({}, ["--port", "\u0663\u0660\u0660\u0660"], "port must be a whole number"),
    ({"max_body_bytes": None}, [], "max_body_bytes must be a whole number"),
    ({"performance": {"num_thread": 2.5}}, [], "performance.num_thread must be a whole number"),
    ({"performance": {"use_mlock": "yes"}}, [], "performance.use_mlock must be true or false"),
    ({"performance": {"use_mmap": 1}}, [], "performance.use_mmap must be true or false"),
    ({"response_optimization": {"stream": None}}, [], "response_optimization.stream must be"),
    ({"response_optimization": {"keep_alive": 600}}, [], "response_optimization.keep_alive"),
    ({"openai_api": {"record": "no"}}, [], "openai_api must be an object"),
    ({"openai_api": {"recrd": True}}, [], "openai_api must be an object"),
    ({"auto_title": None}, [], "auto_title must be one of"),
    ({"allowed_hosts": [1]}, [], "allowed_hosts must be a list of names"),
])
def test_every_setting_is_checked_for_type_and_range(tmp_path, conf, argv, words):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(conf))
    with pytest.raises(llama_chat.ConfigError) as raised:
        llama_chat.load_settings(["--config", str(path), *argv], environ={})
    assert words in str(raised.value)


def test_the_public_config_is_always_json(client):
    status, _, body = client.request("GET", "/api/config")
    assert status == 200 and json.loads(json.dumps(body, allow_nan=False)) == body


@pytest.mark.parametrize("host", ["nonexistent.invalid", "127.0.0.1"])
def test_a_failure_to_listen_is_one_line_and_exit_1(tmp_path, host):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, os.path.join(HERE, "llama_chat.py"), "--host", host,
                               "--port", str(port), "--db", str(tmp_path / "x.db")],
                              capture_output=True, text=True, timeout=30)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"llama-chat: cannot listen on {host}:{port}: ")


def test_help_explains_every_setting():
    out = subprocess.run([sys.executable, os.path.join(HERE, "llama_chat.py"), "--help"],
                         capture_output=True, text=True, timeout=30).stdout
    for flag, env in [("--host", "LLAMA_CHAT_HOST"), ("--port", "LLAMA_CHAT_PORT"),
                      ("--llamacpp-url", "LLAMACPP_URL"), ("--db", "LLAMA_CHAT_DB"),
                      ("--config", "LLAMA_CHAT_CONFIG"), ("--api-key", "LLAMA_CHAT_API_KEY"),
                      ("--llamacpp-api-key", "LLAMACPP_API_KEY")]:
        assert flag in out and env in out


###############################################################################
# Storage: migrations, durability, the page
###############################################################################

FLASK_SCHEMA = """
CREATE TABLE conversations (id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT NOT NULL,
    model TEXT NOT NULL, model_file TEXT, created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id INTEGER NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')), content TEXT NOT NULL, model TEXT,
    model_file TEXT, timestamp TIMESTAMP DEFAULT CURRENT_TIMESTAMP, response_time_ms INTEGER,
    estimated_tokens INTEGER,
    FOREIGN KEY (conversation_id) REFERENCES conversations (id) ON DELETE CASCADE);
CREATE INDEX idx_messages_conversation ON messages(conversation_id);
CREATE INDEX idx_conversations_updated ON conversations(updated_at DESC);
CREATE INDEX idx_messages_timestamp ON messages(timestamp);
"""


def make_flask_db(path, conversations=3, per_conversation=4, texts=None):
    """The original app's database; `texts`: what its messages say, in turn
    (else a line naming each)."""
    conn = sqlite3.connect(path)
    conn.executescript(FLASK_SCHEMA)
    for c in range(conversations):
        conn.execute("INSERT INTO conversations (title, model, model_file, created_at, updated_at)"
                     " VALUES (?, 'old.gguf', 'old.gguf', '2025-06-08 10:30:00', ?)",
                     (f"Old chat {c}", f"2025-06-08 11:{c:02d}:00"))
        for m in range(per_conversation):
            role = "user" if m % 2 == 0 else "assistant"
            conn.execute("INSERT INTO messages (conversation_id, role, content, model, timestamp,"
                         " response_time_ms, estimated_tokens) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (c + 1, role, next(texts) if texts
                          else f"legacy message {c}-{m} about volcanoes", "old.gguf",
                          "2025-06-08 10:31:15", 900 if role == "assistant" else None, 10))
    conn.commit()
    conn.close()


@contextlib.contextmanager
def migrating(tmp_path, stub, monkeypatch, changed=None, made=make_flask_db):
    """The app started on the original app's database (or one `made` by that
    function of a path; `changed` by that function of a connection to it
    first), its migration held at migration 3 until the `held` event it
    yields with is set."""
    path = str(tmp_path / "llamacpp_chat.db")
    made(path)
    if changed:
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            changed(conn)
    held, reached = threading.Event(), threading.Event()
    to_3 = llama_chat.migrate_to_3

    def held_migration(c):
        if not reached.is_set():             # the database's (not the chats' meanwhile)
            reached.set()
            held.wait(20)
        to_3(c)
    monkeypatch.setattr(llama_chat, "MIGRATIONS", [*llama_chat.MIGRATIONS[:2], held_migration,
                                                   *llama_chat.MIGRATIONS[3:]])
    settings = llama_chat.Settings(host="127.0.0.1", port=0, llamacpp_url=stub.url, db=path)
    server = llama_chat.make_server(settings)
    serve(server)
    try:
        assert reached.wait(20)
        yield server, held
    finally:
        held.set()
        server.engine.stopping.set()
        stop(server)


def test_an_original_database_is_read_while_it_is_migrated(tmp_path, stub, monkeypatch):
    """The list and a conversation answer from the history as it was while
    the migration runs (here held at migration 3); the rest waits for it."""
    with migrating(tmp_path, stub, monkeypatch) as (server, held):
        c = Client(server)
        status, _, body = c.get("/api/conversations")
        assert status == 200 and body["starting"]["step"].startswith("migrating")
        listed = body["conversations"]
        assert [x["title"] for x in listed] == ["Old chat 2", "Old chat 1", "Old chat 0"]
        assert listed[0]["updated_at"] == "2025-06-08T11:02:00Z" and listed[0]["pinned"] is False
        assert set(listed[0]) == set(llama_chat.columns_in(llama_chat.CONVERSATION_TABLE,
                                                            "listed"))
        assert [x["id"] for x in c.get("/api/conversations?limit=1&offset=1")[2][
            "conversations"]] == [2]
        assert c.get("/api/conversations?pinned=true")[2]["conversations"] == []  # none yet
        assert len(c.get("/api/conversations?pinned=false")[2]["conversations"]) == 3
        body = c.get("/api/conversations/1")[2]
        messages = body["messages"]
        assert [m["parent_id"] for m in messages] == [None] + [m["id"] for m in messages[:-1]]
        assert messages[0]["timestamp"] == "2025-06-08T10:31:15Z"
        assert [m["finish_reason"] for m in messages] == [None, "stop", None, "stop"]
        assert body["conversation"]["current_message_id"] == messages[-1]["id"]
        assert body["stats"]["total_messages"] == 4 and body["effective"]["system_prompt"][
            "from"] == "config"
        assert c.get("/api/conversations/9")[0] == 404
        for path_, code in (("/api/search?q=volcanoes", "STARTING"),
                            ("/api/conversations?q=old", "STARTING")):
            assert c.get(path_)[2]["code"] == code
        assert c.put("/api/conversations/1", {"title": "x"})[0] == 503   # no writes meanwhile
        assert c.get("/api/models")[0] == 200 and c.get("/api/config")[0] == 200   # no history
        assert c.get("/api/generations")[2]["code"] == "STARTING"    # none made meanwhile yet
        status, _, asked = c.chat(1, "hi 火山")          # but a chat is answered at once
        assert status == 200 and asked["response"] and not server.engine.ready.is_set()
        assert (asked["user_message_id"], asked["message_id"]) == (13, 14)   # after the 12
        shown = c.get("/api/conversations/1")[2]
        assert [m["content"] for m in shown["messages"]][-3:] == [
            "legacy message 0-3 about volcanoes", "hi 火山", asked["response"]]
        assert shown["messages"][-2]["parent_id"] == 4 and shown["starting"]["step"]
        assert shown["conversation"]["current_message_id"] == 14
        assert [x["title"] for x in c.get("/api/conversations")[2]["conversations"]] == [
            "Old chat 0", "Old chat 2", "Old chat 1"]            # moved to the top
        assert [x["id"] for x in c.get("/api/conversations?limit=1&offset=1")[2][
            "conversations"]] == [3]
        assert c.get("/api/conversations?pinned=true")[2]["conversations"] == []
        status, _, mentioning = c.chat(1, "as we said there?", mentions=[3])  # read as it was
        assert status == 200 and mentioning["recall"][0]["conversation_id"] == 3
        assert "legacy message 2-3" in stub.requests[-1]["body"]["messages"][0]["content"]
        held.set()
        assert server.engine.ready.wait(30) and server.engine.older is None
        merged = c.get("/api/conversations/1")[2]
        assert [(m["id"], m["parent_id"], m["content"]) for m in merged["messages"][-4:]] == [
            (13, 4, "hi 火山"), (14, 13, asked["response"]), (15, 14, "as we said there?"),
            (16, 15, mentioning["response"])]
        assert merged["conversation"]["title"] == "Old chat 0"
        assert merged["conversation"]["current_message_id"] == 16
        assert len(c.get("/api/conversations/3")[2]["messages"]) == 4      # only read
        assert merged["messages"][-1]["predicted_n"] == 8            # its timings kept
        assert "starting" not in c.get("/api/conversations")[2]
        assert [x["id"] for x in c.get("/api/conversations")[2]["conversations"]] == [1, 3, 2]
        assert not os.path.exists(server.engine.store.db.path + ".meanwhile")
        assert c.chat(1, "and again")[2]["user_message_id"] == 17      # the ids go on


def test_a_conversation_made_during_a_migration_takes_ids_after_the_older_history_s(
        tmp_path, stub, monkeypatch):
    """Made and chatted in while the original app's history is migrated:
    its ids follow the older history's sequences (not only its largest ids:
    the last conversation was deleted), the list shows it first, and once
    the migration is done it is in the database as it was, found by search."""
    def last_deleted(conn):
        conn.execute("DELETE FROM messages WHERE conversation_id = 3")
        conn.execute("DELETE FROM conversations WHERE id = 3")
    with migrating(tmp_path, stub, monkeypatch, last_deleted) as (server, held):
        c = Client(server)
        status, _, made = c.post("/api/conversations", {"model": MODEL})
        assert status == 201 and made["conversation_id"] == 4
        resp, _ = c.stream(4, "Tell me about 火山 meanwhile")
        events = read_events(resp)
        assert events[0]["type"] == "start" and events[-1]["type"] == "done"
        assert (events[0]["user_message_id"], events[0]["message_id"]) == (13, 14)
        listed = c.get("/api/conversations")[2]["conversations"]
        assert [(x["id"], x["title"]) for x in listed] == [
            (4, "Tell me about 火山 meanwhile"), (2, "Old chat 1"), (1, "Old chat 0")]
        assert c.get("/api/conversations?limit=1&offset=2")[2]["conversations"][0]["id"] == 1
        assert c.get("/api/generations")[2]["generations"] == []
        assert c.get("/api/search?q=volcanoes")[2]["code"] == "STARTING"
        assert c.post("/api/chat", {"conversation_id": 4, "regenerate": 14, "model": MODEL})[
            2]["message_id"] == 15
        assert c.post("/api/chat", {"conversation_id": 4, "continue": 14, "model": MODEL})[
            2]["message_id"] == 14            # the first reply shown again: not the newest
        held.set()
        assert server.engine.ready.wait(30) and not server.engine.startup_error
        shown = c.get("/api/conversations/4")[2]
        assert [(m["id"], m["parent_id"], m["sibling_ids"]) for m in shown["messages"]] == [
            (13, None, [13]), (14, 13, [14, 15])]
        assert shown["conversation"]["current_message_id"] == 14
        assert shown["messages"][0]["content"] == "Tell me about 火山 meanwhile"
        assert shown["conversation"]["title"] == "Tell me about 火山 meanwhile"
        q = urllib.parse.quote("火山")
        wait_for(lambda: c.get(f"/api/search?q={q}")[0] == 200, 15, "the index built")
        assert c.get(f"/api/search?q={q}")[2]["results"][0]["message_id"] == 13
        assert c.post("/api/conversations", {"model": MODEL})[2]["conversation_id"] == 5


def test_a_reply_made_during_a_migration_goes_on_into_the_database(tmp_path, stub, monkeypatch):
    """The migration committed while a reply made meanwhile is still coming:
    the start ends at once, and that reply goes on into the database (shown
    as being made, stopped like any other), with the chats after it."""
    with migrating(tmp_path, stub, monkeypatch) as (server, held):
        c = Client(server)
        stub.reply = " ".join(f"w{i}" for i in range(12))
        stub.hold_at = 3
        resp, _ = c.stream(1, "a slow one")
        start = json.loads(next(line for line in resp if line.startswith(b"data: "))[6:])
        wait_for(lambda: stub.open_streams == 1, 5, "the reply begun")
        held.set()
        assert server.engine.ready.wait(15) and not server.engine.startup_error
        assert not os.path.exists(server.engine.store.db.path + ".meanwhile")
        being_made = c.get("/api/generations")[2]["generations"]
        assert [g["message_id"] for g in being_made] == [start["message_id"]]
        shown = c.get("/api/conversations/1")[2]["messages"][-1]
        assert shown["id"] == start["message_id"] and shown["generating"] is True
        stub.hold_at = None
        later = c.chat(2, "after the commit")               # not held: answered meanwhile
        assert later[0] == 200 and later[2]["user_message_id"] == start["message_id"] + 1
        assert stub.open_streams == 1
        queued = []                                          # its own conversation: its turn
        behind = threading.Thread(target=lambda: queued.append(c.chat(1, "queued behind it")))
        behind.start()
        time.sleep(0.3)
        assert queued == []
        stopped = c.post(f"/api/messages/{start['message_id']}/stop", {})
        assert stopped[0] == 200 and stopped[2]["stopped"] is True
        stub.go.set()
        behind.join(15)
        assert queued[0][2]["parent_id"] == queued[0][2]["user_message_id"]
        messages = c.get("/api/conversations/1")[2]["messages"]
        kept = messages[-3]
        assert kept["id"] == start["message_id"] and kept["finish_reason"] == "aborted"
        assert kept["content"].strip() == "w0 w1 w2" and kept["generating"] is False
        assert messages[-2]["content"] == "queued behind it" and messages[-2]["parent_id"] == \
            start["message_id"]
        assert read_events(resp)[-1]["type"] == "done"


def test_a_reply_made_during_a_migration_ends_in_the_database(tmp_path, stub, monkeypatch):
    with migrating(tmp_path, stub, monkeypatch) as (server, held):
        c = Client(server)
        stub.hold_at = 3
        resp, _ = c.stream(1, "a slow one")
        wait_for(lambda: stub.open_streams == 1, 5, "the reply begun")
        held.set()
        assert server.engine.ready.wait(15) and server.engine.active_streams == 1
        stub.go.set()
        done = read_events(resp)[-1]
        assert done["type"] == "done" and done["finish_reason"] == "stop"
        wait_for(lambda: server.engine.active_streams == 0, 5, "the reply ended")
        kept = c.get("/api/conversations/1")[2]
        assert kept["messages"][-1]["content"] == stub.reply
        assert kept["conversation"]["current_message_id"] == kept["messages"][-1]["id"]
        assert rows(c, "SELECT count(*) FROM messages WHERE generating IS NOT NULL") == [(0,)]


def test_a_reply_that_ends_while_its_store_is_handed_over_ends_in_the_database(
        tmp_path, stub, monkeypatch):
    with migrating(tmp_path, stub, monkeypatch) as (server, held):
        c = Client(server)
        stub.hold_at = 3
        resp, _ = c.stream(1, "ends while merged")
        wait_for(lambda: stub.open_streams == 1, 5, "the reply begun")
        merged, real_merge = threading.Event(), llama_chat.merge_meanwhile

        def slow_handover(store):
            count = real_merge(store)
            merged.set()
            time.sleep(0.5)                  # merged, not yet handed over
            return count
        monkeypatch.setattr(llama_chat, "merge_meanwhile", slow_handover)
        held.set()
        assert merged.wait(15)
        stub.go.set()                        # its end is stored meanwhile: after the handover
        assert read_events(resp)[-1]["type"] == "done"
        assert server.engine.ready.wait(15)
        wait_for(lambda: server.engine.active_streams == 0, 5, "the reply ended")
        kept = c.get("/api/conversations/1")[2]["messages"][-1]
        assert kept["content"] == stub.reply and kept["generating"] is False


def test_a_title_asked_during_a_migration_is_given_in_the_database(tmp_path, stub, monkeypatch):
    with migrating(tmp_path, stub, monkeypatch) as (server, held):
        server.engine.settings = replace(server.engine.settings, auto_title="model")
        stub.titles = "slow"                                   # a second
        c = Client(server)
        made = c.post("/api/conversations", {"model": MODEL})[2]["conversation_id"]
        assert c.chat(made, "Why is the sky blue?")[0] == 200
        held.set()
        assert server.engine.ready.wait(30) and not server.engine.startup_error
        wait_for(lambda: c.get(f"/api/conversations/{made}")[2]["conversation"]["title"] ==
                 stub.reply, 10, "the title given, in the database")


def test_chats_made_during_a_stopped_migration_are_kept_for_the_next_start(
        tmp_path, stub, monkeypatch):
    """A stop (as SIGTERM's) during the migration rolls it back; what was
    chatted meanwhile stays beside the database, and the next start writes
    it in: a reply a crash left being made kept as interrupted."""
    with migrating(tmp_path, stub, monkeypatch) as (server, held):
        c = Client(server)
        asked = c.chat(3, "asked before a stop")[2]
        made = c.post("/api/conversations", {"title": "Made meanwhile", "model": MODEL})[2]
        half = c.chat(made["conversation_id"], "cut short")[2]
        path = server.engine.store.db.path
        server.engine.stopping.set()
        server.engine.store.interrupt()
        held.set()
        assert server.engine.ready.wait(30) and "interrupted" in server.engine.startup_error
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0   # as it was
    beside = llama_chat.Store(path + ".meanwhile")          # (its triggers need its functions)
    with beside.db.write() as c:                             # as if the process had died
        c.execute("UPDATE messages SET generating = '999999:gone', content = 'half' "
                  "WHERE id = ?", (half["message_id"],))
    beside.close()
    go_on, to_5 = threading.Event(), llama_chat.migrate_original_anew
    monkeypatch.setattr(llama_chat, "migrate_original_anew",
                        lambda c: (go_on.wait(20), to_5(c)))
    server = llama_chat.make_server(llama_chat.Settings(
        host="127.0.0.1", port=0, llamacpp_url=stub.url, db=path))
    serve(server)
    try:
        c = Client(server)
        assert [x["id"] for x in c.get("/api/conversations")[2]["conversations"]][:2] == [
            made["conversation_id"], 3]                      # shown while it migrates again
        assert c.get("/api/conversations/3")[2]["messages"][-1]["content"] == asked["response"]
        again = c.chat(2, "asked at the second start")[2]          # its ids after the first's
        assert again["user_message_id"] == half["message_id"] + 1
        go_on.set()
        assert server.engine.ready.wait(30) and not server.engine.startup_error
        assert [m["content"] for m in c.get("/api/conversations/3")[2]["messages"]][-2:] == [
            "asked before a stop", asked["response"]]
        cut = c.get(f"/api/conversations/{made['conversation_id']}")[2]
        assert cut["conversation"]["title"] == "Made meanwhile"
        assert [(m["content"], m["finish_reason"]) for m in cut["messages"]] == [
            ("cut short", None), ("half", "interrupted")]
        assert [m["content"] for m in c.get("/api/conversations/2")[2]["messages"]][-2:] == [
            "asked at the second start", again["response"]]
        assert not os.path.exists(path + ".meanwhile")
    finally:
        stop(server)


def test_a_chat_during_the_migration_of_llama_chat_1_1_s_history(tmp_path, stub, monkeypatch):
    """Schema 2 is migrated in place (not into a new file): a chat meanwhile
    reads the history as it was, from under the migration's write."""
    with migrating(tmp_path, stub, monkeypatch, made=make_schema_2_db) as (server, held):
        c = Client(server)
        asked = c.chat(2, "and now?")[2]
        assert (asked["user_message_id"], asked["message_id"]) == (8, 9)
        assert [m["content"] for m in stub.requests[-1]["body"]["messages"][-3:]] == [
            "hi 火山", "熔岩", "and now?"]
        held.set()
        assert server.engine.ready.wait(30) and not server.engine.startup_error
        assert [(m["id"], m["parent_id"]) for m in c.get("/api/conversations/2")[2][
            "messages"]] == [(2, None), (5, 2), (8, 5), (9, 8)]


def test_chats_merged_after_a_migration_are_never_merged_again(tmp_path, stub, monkeypatch):
    """Where the file of the chats made meanwhile cannot be removed (Windows,
    while a connection to it is open), the start goes on, and what it holds
    is not written in again over what changed since."""
    with migrating(tmp_path, stub, monkeypatch) as (server, held):
        c = Client(server)
        assert c.chat(1, "meanwhile")[0] == 200
        beside = server.engine.store.db.path + ".meanwhile"
        real_remove = os.remove

        def refused(path):
            if path.startswith(beside):
                raise PermissionError(13, "in use", path)
            real_remove(path)
        monkeypatch.setattr(os, "remove", refused)
        held.set()
        assert server.engine.ready.wait(30) and not server.engine.startup_error
        assert os.path.exists(beside)
        assert c.put("/api/conversations/1", {"title": "Renamed since"})[0] == 200
        monkeypatch.setattr(os, "remove", real_remove)
        assert llama_chat.merge_meanwhile(server.engine.store) == 0
        assert not os.path.exists(beside)
        shown = c.get("/api/conversations/1")[2]
        assert shown["conversation"]["title"] == "Renamed since"
        assert [m["content"] for m in shown["messages"]].count("meanwhile") == 1


def test_a_v1_chat_waits_for_the_migration_only_so_long(tmp_path, stub, monkeypatch):
    with migrating(tmp_path, stub, monkeypatch) as (server, held):
        c = Client(server)
        monkeypatch.setattr(llama_chat, "START_WAIT_S", 0.2)
        status, _, body = c.post("/v1/chat/completions", {"model": MODEL, "messages": [
            {"role": "user", "content": "too soon"}]})
        assert (status, body["error"]["code"]) == (503, "STARTING")
        server.engine.meanwhile_open = False         # as in the moment the migration commits
        assert c.chat(1, "too soon")[2]["code"] == "STARTING"      # (not served meanwhile)
        assert c.post("/api/conversations", {"model": MODEL})[2]["code"] == "STARTING"
        monkeypatch.setattr(llama_chat, "START_WAIT_S", 30)
        asked = []
        relayed = threading.Thread(target=lambda: asked.append(c.post(
            "/v1/chat/completions", {"model": MODEL, "messages": [
                {"role": "user", "content": "asked through /v1 meanwhile"}]})))
        relayed.start()
        time.sleep(0.3)
        assert asked == []
        held.set()
        relayed.join(30)
        assert asked[0][0] == 200 and asked[0][2]["choices"][0]["message"]["content"]
        assert rows(c, "SELECT content FROM messages WHERE content LIKE '%soon%' OR content "
                       "LIKE '%meanwhile%'") == [("asked through /v1 meanwhile",)]  # not "too soon"


def test_a_database_with_trees_is_not_read_while_it_is_migrated(tmp_path, stub, monkeypatch):
    path = str(tmp_path / "v3.db")
    schema_2_db(path, lambda c: c.execute(
        "INSERT INTO conversations (title, model) VALUES ('tree', 'm')"), version=3)
    go_on, real_open = threading.Event(), llama_chat.Store.open

    def slow_open(self, build_later=False):
        go_on.wait(15)
        real_open(self, build_later)
    monkeypatch.setattr(llama_chat.Store, "open", slow_open)
    server = llama_chat.make_server(llama_chat.Settings(
        host="127.0.0.1", port=0, llamacpp_url=stub.url, db=path))
    serve(server)
    try:
        c = Client(server)
        assert server.engine.older is None
        assert c.get("/api/conversations")[2]["code"] == "STARTING"   # its branches: later
        go_on.set()
        assert server.engine.ready.wait(10)
        assert [x["title"] for x in c.get("/api/conversations")[2]["conversations"]] == ["tree"]
    finally:
        go_on.set()
        stop(server)


def test_original_flask_database_migrates(tmp_path, stub, launch):
    path = str(tmp_path / "llamacpp_chat.db")
    make_flask_db(path)
    server = launch(stub.url, db=path)
    c = Client(server)
    listed = c.get("/api/conversations")[2]["conversations"]
    assert [x["title"] for x in listed] == ["Old chat 2", "Old chat 1", "Old chat 0"]
    assert listed[0]["updated_at"] == "2025-06-08T11:02:00Z"
    body = c.get("/api/conversations/1")[2]
    assert len(body["messages"]) == 4
    assert body["messages"][0]["timestamp"] == "2025-06-08T10:31:15Z"
    assert body["messages"][1]["finish_reason"] == "stop"
    wait_for(lambda: c.get("/api/search?q=volcanoes")[0] == 200, 10, "the index built")
    assert c.get("/api/search?q=volcanoes")[2]["count"] == 12
    assert c.chat(1, "new question")[0] == 200
    assert c.get("/api/conversations")[2]["conversations"][0]["id"] == 1
    backup = server.engine.store.backup_path
    assert backup and sqlite3.connect(backup).execute(
        "SELECT count(*) FROM messages").fetchone()[0] == 12
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == llama_chat.SCHEMA_VERSION
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 14
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def original_app_history(path, schema=None, extra=""):
    """The original app's database as its users have it: conversations
    written in turn (their messages' ids interleaved), times as it wrote
    them (some with milliseconds, some already ISO), a conversation left
    empty, its newest message deleted (the id sequence beyond every id), a
    conversation deleted as it deleted one (its foreign keys off: the
    messages stay behind)."""
    schema = schema or FLASK_SCHEMA
    conn = sqlite3.connect(path)
    conn.executescript(schema + extra)
    has_file = "model_file" in schema
    for c in range(4):
        conn.execute("INSERT INTO conversations (title, model, created_at, updated_at) VALUES "
                     "(?, 'old.gguf', '2025-06-08 10:30:00', ?)", (f"Chat {c}", f"2025-06-0{c + 1} "
                                                                    "11:00:00.250"))
    times = ["2025-06-08 10:31:15", "2025-06-08 10:31:16.5", "2025-06-08T10:31:17Z",
             "2025-06-08 10:31:18.123456"]
    for m in range(24):
        c, role = m % 3 + 1, ("user", "assistant")[m // 3 % 2]
        conn.execute("INSERT INTO messages (conversation_id, role, content, model, timestamp, "
                     "response_time_ms, estimated_tokens) VALUES (?, ?, ?, 'old.gguf', ?, ?, ?)",
                     (c, role, f"  message {m} of chat {c}: über 火山 {m % 5}  ", times[m % 4],
                      900 + m if role == "assistant" else None, m))
        if has_file and m % 2:
            conn.execute("UPDATE messages SET model_file = 'old.gguf' WHERE id = ?", (m + 1,))
    conn.execute("DELETE FROM messages WHERE id = 24")
    conn.execute("DELETE FROM conversations WHERE id = 3")     # 7 of its messages stay
    conn.commit()
    conn.close()


def history_dump(path):
    """Every table's rows and the whole schema (SQL text of each object, by
    name), but what SQLite makes at random: conversations' UUIDs."""
    conn = sqlite3.connect(path)
    schema = {name: " ".join((sql or "").split()) for name, sql in conn.execute(
        "SELECT name, sql FROM sqlite_master")}
    rows = {}
    for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND sql "
                                 "NOT LIKE 'CREATE VIRTUAL%'").fetchall():   # FTS5's: its shadows
        columns = [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]
        picked = ", ".join(f'"{c}"' for c in columns if (table, c) != ("conversations", "uuid"))
        rows[table] = sorted(conn.execute(f'SELECT {picked} FROM "{table}"').fetchall(), key=repr)
    conn.close()
    return schema, rows


def without_hard_links(*args, **kwargs):
    raise OSError(errno.EPERM, "Operation not permitted")     # as on a FAT disk


@pytest.mark.parametrize("way", ["into a new file", "in place"])
@pytest.mark.parametrize("variant", ["original app", "before model_file", "a view of its own",
                                     "no history"])
def test_the_original_apps_history_migrates_in_one_pass_to_what_the_chain_makes(
        tmp_path, monkeypatch, variant, way):
    """Schema 0 -> 5 in one pass (into a new file, or in place where the disk
    has no hard links) leaves every table, row and schema object as
    migrations 1 to 5 one after another do."""
    schema, extra = FLASK_SCHEMA, ""
    if variant == "before model_file":
        schema = schema.replace(" model_file TEXT,", "")
    if variant == "a view of its own":
        extra = "CREATE VIEW recent AS SELECT * FROM messages WHERE id > 10;"
    paths = [str(tmp_path / name) for name in ("chain.db", "one_pass.db")]
    for path in paths:
        if variant != "no history":
            original_app_history(path, schema, extra)
    passes = []
    real_steps = llama_chat.migration_steps

    def chain(version, anew=False):
        passes.append("chain")
        return enumerate(llama_chat.MIGRATIONS[version:], version + 1)
    monkeypatch.setattr(llama_chat, "migration_steps", chain)
    with monkeypatch.context() as m:
        m.setattr(os, "link", without_hard_links)          # the chain: in place
        llama_chat.Store(paths[0]).close()
    monkeypatch.setattr(llama_chat, "migration_steps", real_steps)
    if way == "in place":
        monkeypatch.setattr(os, "link", without_hard_links)
    rewrites = []
    real_5 = llama_chat.migrate_to_5
    monkeypatch.setattr(llama_chat, "MIGRATIONS", [
        *llama_chat.MIGRATIONS[:4], lambda c: rewrites.append(c.execute(
            "SELECT count(*) FROM messages").fetchone()[0]) or real_5(c),
        *llama_chat.MIGRATIONS[5:]])
    before = open(paths[1], "rb").read() if variant != "no history" else None
    store = llama_chat.Store(paths[1])
    store.close()
    assert passes == ["chain"]
    if variant != "no history":
        # into a new file: the original file is the backup, as it was
        assert (open(store.backup_path, "rb").read() == before) == (
            way == "into a new file" and variant != "a view of its own")
        assert not os.path.samefile(store.backup_path, paths[1])
    assert not [n for n in os.listdir(tmp_path) if n.endswith((".migrating", ".partial"))]
    # the one pass ran migration 5 on an empty table (or, with a view of its
    # own, on the history: the chain)
    assert rewrites == [23 if variant == "a view of its own" else 0]
    chained, one_pass = history_dump(paths[0]), history_dump(paths[1])
    assert one_pass[0] == chained[0]
    assert one_pass[1] == chained[1]
    if variant != "no history":
        assert len(one_pass[1]["messages"]) == 16
        # the newest message (24) was deleted: its id is not given again
        assert dict(one_pass[1]["sqlite_sequence"])["messages"] == 24


@pytest.mark.parametrize("version", [0, 2])
def test_messages_the_original_app_left_behind_are_not_carried_over(tmp_path, caplog, version):
    """The original app deleted a conversation but not its messages (its
    foreign keys off): a history holding such messages opens (from the
    original app's schema in one pass; from 1.1's, which kept them, by the
    chain), without them; the backup keeps them, and the log says so."""
    path = str(tmp_path / "llamacpp_chat.db")
    original_app_history(path)
    if version:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN")
        for migrate in llama_chat.MIGRATIONS[:version]:
            migrate(conn)
        conn.execute(f"PRAGMA user_version = {version}")
        conn.execute("COMMIT")
        conn.close()
    caplog.set_level("WARNING", logger="llama_chat")
    store = llama_chat.Store(path)
    assert rows_of(store, "SELECT count(*), count(DISTINCT conversation_id) FROM messages") == [
        (16, 2)]
    assert rows_of(store, "PRAGMA foreign_key_check") == []
    assert [c["title"] for c in json.loads(store.list_conversations())] == [
        "Chat 3", "Chat 1", "Chat 0"]
    assert any("7 messages of conversations deleted before" in r.getMessage()
               for r in caplog.records)
    assert sqlite3.connect(store.backup_path).execute(
        "SELECT count(*) FROM messages").fetchone() == (23,)


# The whole schema a database of this version has: every table of the
# history (FTS5's own shadow tables aside) with its columns and their types.
SCHEMA = {
    "conversations": {
        "id": "INTEGER", "title": "TEXT", "model": "TEXT", "created_at": "TIMESTAMP",
        "updated_at": "TIMESTAMP", "current_message_id": "INTEGER", "system_prompt": "TEXT",
        "options": "TEXT", "pinned": "INTEGER", "title_pending": "INTEGER", "source": "TEXT",
        "source_id": "TEXT", "client": "TEXT", "uuid": "TEXT", "project_id": "INTEGER"},
    "projects": {"id": "INTEGER", "name": "TEXT", "system_prompt": "TEXT", "options": "TEXT",
                 "created_at": "TEXT", "updated_at": "TEXT"},
    "messages": {
        "id": "INTEGER", "conversation_id": "INTEGER", "role": "TEXT", "content": "TEXT",
        "model": "TEXT", "timestamp": "TIMESTAMP", "response_time_ms": "INTEGER",
        "estimated_tokens": "INTEGER", "reasoning": "TEXT", "prompt_tokens": "INTEGER",
        "tokens_per_second": "REAL", "finish_reason": "TEXT", "parent_id": "INTEGER",
        "edited_at": "TEXT", "options": "TEXT", "tool_calls": "TEXT", "tool_call_id": "TEXT",
        "digest": "INTEGER", "prompt_n": "INTEGER", "prompt_ms": "REAL", "cache_n": "INTEGER",
        "predicted_n": "INTEGER", "predicted_ms": "REAL", "ttft_ms": "REAL",
        "token_count": "INTEGER", "generating": "TEXT", "attachments_left_out": "TEXT",
        "recall": "TEXT"},
    "import_pending": {"conversation_id": "INTEGER", "run": "TEXT"},
    "ledger_buckets": {"model": "TEXT", "metric": "TEXT", "bucket": "INTEGER",
                       "n": "INTEGER", "total": "REAL"},
    "ledger_cache": {"model": "TEXT", "day": "TEXT", "replies": "INTEGER",
                     "cached": "INTEGER", "read": "INTEGER"},
    "ledger_days": {"model": "TEXT", "day": "TEXT", "replies": "INTEGER",
                    "prompt_tokens": "INTEGER", "completion_tokens": "INTEGER",
                    "tps_n": "INTEGER", "tps_sum": "REAL", "pps_n": "INTEGER",
                    "pps_sum": "REAL"},
    "ledger_ranks": {"grouping": "TEXT", "model": "TEXT", "day": "TEXT", "tps_p50": "REAL",
                     "pps_p50": "REAL", "ttft_p50": "REAL", "ttft_p95": "REAL"},
    "search_fts": {"title": "", "content": ""},
    "search_purge": {"due": "INTEGER"},
    "search_unbuilt": {"first": "INTEGER", "last": "INTEGER", "done": "INTEGER",
                       "total": "INTEGER"},
    "writing_in_bulk": {"name": "TEXT"},
    "changes": {"seq": "INTEGER", "kind": "TEXT", "action": "TEXT", "conversation_id": "INTEGER",
                "id": "INTEGER"},
    "attachments": {"id": "TEXT", "kind": "TEXT", "type": "TEXT", "name": "TEXT",
                    "bytes": "INTEGER", "data": "BLOB", "made_at": "TEXT"},
    "message_attachments": {"message_id": "INTEGER", "position": "INTEGER",
                            "attachment_id": "TEXT", "name": "TEXT", "shown": "TEXT"},
    "attached_fts": {"content": ""},
}


def schema_of(path):
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
            "AND name NOT LIKE 'search_fts_%' AND name NOT LIKE 'attached_fts_%'")]
        return {t: {r[1]: r[2] for r in conn.execute(f"PRAGMA table_info({t})")}
                for t in tables}
    finally:
        conn.close()


def test_messages_written_without_the_search_triggers_are_indexed_at_the_next_start(tmp_path):
    path = str(tmp_path / "no-fts-meanwhile.db")
    store = llama_chat.Store(path)
    cid = store.create_conversation("t", "m")
    store.add_message(cid, "user", "indexed volcano")
    store.close()
    conn = sqlite3.connect(path)                  # as a SQLite without FTS5 leaves it
    conn.create_function("message_digest", 4, llama_chat.message_digest)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' "
                                "AND name LIKE 'search%'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    conn.execute("INSERT INTO messages (conversation_id, role, content) "
                 "VALUES (?, 'user', 'unseen glacier')", (cid,))
    conn.commit()
    conn.close()
    store = llama_chat.Store(path)
    assert [r["content"] for r in store.search("glacier", 5)] == ["unseen glacier"]
    assert [r["content"] for r in store.search("volcano", 5)] == ["indexed volcano"]
    store.close()


def test_a_write_that_gives_way_yields_to_one_that_began_waiting_as_it_began(tmp_path):
    """A write that begins while a giving-way one is between its BEGIN and
    saying it gives way would otherwise wait for all of it (a purge's
    merge: seconds): the giving-way one finds it waiting, and rolls back."""
    store = llama_chat.Store(str(tmp_path / "g.db"))
    db = store.db
    db._wanting.add(-1)                        # another thread, beginning its write
    with pytest.raises(sqlite3.OperationalError, match="interrupted"):
        with db.write(gives_way=True) as c:
            c.execute("INSERT INTO conversations (title, model) VALUES ('x', 'm')")
    db._wanting.discard(-1)
    assert db._giving_way is None and not db.conn().in_transaction
    with db.write(gives_way=True) as c:        # alone, it goes on
        c.execute("INSERT INTO conversations (title, model) VALUES ('y', 'm')")
    assert [r[0] for r in db.conn().execute("SELECT title FROM conversations")] == ["y"]
    store.close()


def test_a_connection_that_read_much_is_closed_not_kept(tmp_path):
    """A background job's connection (a build, a purge, the ledger's
    ranking) holds the page cache it filled: it is closed when let go, where
    a request's goes back to be used again."""
    store = llama_chat.Store(str(tmp_path / "h.db"))
    db = store.db

    def used(heavy):
        found = {}

        def job():
            found["conn"] = db.conn()
            db.release(heavy)
        worker = threading.Thread(target=job)
        worker.start()
        worker.join()
        return found["conn"]
    kept = used(False)
    assert db._idle.qsize() == 1 and kept.execute("SELECT 1").fetchone() == (1,)
    closed = used(True)                     # it took the kept one, and closed it
    assert closed is kept and db._idle.qsize() == 0
    with pytest.raises(sqlite3.ProgrammingError):
        closed.execute("SELECT 1")
    store.close()


def test_the_schema_is_as_declared(tmp_path):
    """A new database and one migrated from the original app's have the
    tables and columns SCHEMA states; the module declares each
    table's columns once, and every list of them is drawn from that."""
    new = str(tmp_path / "new.db")
    llama_chat.Store(new).close()
    old = str(tmp_path / "llamacpp_chat.db")
    make_flask_db(old)
    llama_chat.Store(old).close()
    assert schema_of(new) == SCHEMA
    kept = {t: {**columns, **({"model_file": "TEXT"} if t in ("conversations", "messages")
                              else {})} for t, columns in SCHEMA.items()}
    assert schema_of(old) == kept           # the original app's own column is kept
    assert list(llama_chat.CONVERSATION_TABLE) == sorted(
        SCHEMA["conversations"], key=list(llama_chat.CONVERSATION_TABLE).index)
    assert set(llama_chat.CONVERSATION_TABLE) == set(SCHEMA["conversations"])
    assert set(llama_chat.MESSAGE_TABLE) == set(SCHEMA["messages"])
    exported = llama_chat.columns_in(llama_chat.MESSAGE_TABLE, "exported")
    assert llama_chat.EXPORT_MESSAGE_COLUMNS.split(", ") == list(exported)
    assert set(exported) == set(SCHEMA["messages"]) - {"conversation_id", "digest",
                                                       "token_count", "generating", "recall"}
    # import reads back what export writes, each value checked
    assert set(llama_chat.MESSAGE_IMPORT_COLUMNS) == set(exported) - {"id", "parent_id"}
    assert set(llama_chat.MESSAGE_CHECKS) == set(llama_chat.MESSAGE_IMPORT_COLUMNS) - {"role"}
    assert "title_pending" not in llama_chat.EXPORT_CONVERSATION_COLUMNS


def test_database_pragmas(client):
    conn = client.engine.store.db.conn()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2      # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    assert conn.execute("PRAGMA user_version").fetchone()[0] == llama_chat.SCHEMA_VERSION


def test_newer_database_is_refused_untouched(tmp_path):
    path = tmp_path / "future.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE later (x)")
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(llama_chat.ConfigError, match="newer llama-chat"):
        llama_chat.Store(str(path))
    assert path.read_bytes() == before and not os.path.exists(str(path) + "-wal")
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("delete",)


def test_sigkill_loses_no_acknowledged_write(tmp_path, stub):
    port = free_port()
    db = tmp_path / "kill.db"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "llama_chat.py"), "--port",
                             str(port), "--db", str(db), "--llamacpp-url", stub.url],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdout.readline()                   # "llama-chat ...: open http://..."
    acknowledged, stop_writing = [], threading.Event()
    lock = threading.Lock()

    def writer(n):
        i = 0
        while not stop_writing.is_set():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("POST", "/api/conversations", json.dumps(
                    {"title": f"w{n}-{i}", "model": "m"}), {"Content-Type": "application/json"})
                resp = conn.getresponse()
                if resp.status == 201:
                    cid = json.loads(resp.read())["conversation_id"]
                    with lock:
                        acknowledged.append((cid, f"w{n}-{i}"))
                conn.close()
            except OSError:
                return
            i += 1

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(acknowledged) >= 200, "the app acknowledged too few writes in 30 s"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stop_writing.set()
    for t in threads:
        t.join()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = dict(conn.execute("SELECT id, title FROM conversations"))
    assert all(stored.get(cid) == title for cid, title in acknowledged)


def test_page_is_served_with_security_headers(client):
    status, headers, body = client.get("/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "'unsafe-inline'" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["X-Frame-Options"] == "DENY"
    assert "Python" not in headers["Server"]


def test_page_missing_still_leaves_the_api(tmp_path, stub, launch):
    server = launch(stub.url, index_path=str(tmp_path / "nope.html"))
    c = Client(server)
    status, _, body = c.get("/")
    assert status == 200 and b"index.html is missing" in body
    assert c.get("/api/conversations")[0] == 200


def test_keep_alive_serves_many_requests_on_one_connection(client):
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=10)
    sockets = set()
    for _ in range(3):
        conn.request("GET", "/api/conversations")
        sockets.add(conn.sock.getsockname())   # http.client reconnects silently if closed
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["success"] is True
        assert not resp.will_close
    assert len(sockets) == 1
    conn.close()


###############################################################################
# Search
###############################################################################

@pytest.fixture
def corpus(client):
    store = client.engine.store
    ml = store.create_conversation("AI Development Discussion", MODEL)
    cook = store.create_conversation("Recipe Ideas", MODEL)
    store.add_message(ml, "user", "What is machine learning?")
    store.add_message(ml, "assistant", "Machine learning is a subset of artificial "
                      "intelligence where computers are learning from data.", MODEL,
                      response_time_ms=1250, estimated_tokens=156, finish_reason="stop")
    store.add_message(cook, "user", "How long do I boil an egg?")
    store.add_message(cook, "assistant", "Boil the egg for seven minutes; learning to "
                      "cook takes time.", MODEL, finish_reason="stop")
    return {"ml": ml, "cook": cook}


def test_search_ranks_by_relevance_not_by_age(client):
    store = client.engine.store
    cid = store.create_conversation("notes", MODEL)
    filler = " ".join(f"filler{i}" for i in range(60))
    weak_old = store.add_message(cid, "user", f"one zebra among {filler}")
    strong = store.add_message(cid, "user", "zebra zebra zebra")
    weak_new = store.add_message(cid, "user", f"{filler} and a zebra")
    found = [r["message_id"] for r in client.get("/api/search?q=zebra")[2]["results"]]
    assert found[0] == strong and set(found) == {weak_old, strong, weak_new}


def test_search_returns_reference_fields_ranked(client, corpus):
    status, _, body = client.get("/api/search?q=machine%20learning")
    assert status == 200
    assert body["query"] == "machine learning" and body["count"] == len(body["results"]) == 2
    top = body["results"][0]
    assert top["id"] == corpus["ml"] and top["title"] == "AI Development Discussion"
    assert set(top) >= {"id", "title", "model", "updated_at", "content", "role", "timestamp",
                        "response_time_ms", "estimated_tokens", "message_id", "snippet",
                        "highlights"}
    for r in body["results"]:
        marked = [r["snippet"][s:e].lower() for s, e in r["highlights"]]
        assert marked and all(m.startswith(("machine", "learn")) for m in marked)


def test_search_last_word_is_a_prefix(client, corpus):
    body = client.get("/api/search?q=learn")[2]
    assert {r["id"] for r in body["results"]} == {corpus["ml"], corpus["cook"]}


def test_search_needs_every_word(client, corpus):
    body = client.get("/api/search?q=egg%20learning")[2]
    assert [r["id"] for r in body["results"]] == [corpus["cook"]]


def test_search_matches_titles(client, corpus):
    body = client.get("/api/search?q=recipe%20seven")[2]
    assert body["count"] == 1 and body["results"][0]["title"] == "Recipe Ideas"
    assert body["results"][0]["content"].startswith("Boil the egg")


def test_search_reads_past_a_page_of_title_only_matches(client):
    """A conversation whose title matches is shown once however many of its
    messages rank first: the page is filled from the matches after them."""
    store = client.engine.store
    titled = store.create_conversation("zebra notes", MODEL)
    for n in range(5):
        store.add_message(titled, "user", f"note {n}")
    other = store.create_conversation("animals", MODEL)
    stripes = store.add_message(other, "user", "a zebra has stripes, the long way round")
    body = client.get("/api/search?q=zebra&limit=2")[2]
    assert [r["id"] for r in body["results"]] == [titled, other]
    assert body["results"][1]["message_id"] == stripes

def test_search_ranks_the_newest_matches_or_as_many_as_its_page_needs(client, monkeypatch):
    """bm25 orders the newest RANK_WINDOW matches, or limit * TITLE_ONLY_SPARE
    where a page may need more: an older, better match outside them waits."""
    monkeypatch.setattr(llama_chat, "RANK_WINDOW", 6)
    store = client.engine.store
    cid = store.create_conversation("fruit", MODEL)
    best = store.add_message(cid, "user", "kiwi kiwi kiwi kiwi")
    for n in range(5):
        store.add_message(cid, "user", f"a kiwi and {n} other things said at some length")

    def first(limit):
        return client.get(f"/api/search?q=kiwi&limit={limit}")[2]["results"][0]["message_id"]
    assert first(1) == best                                  # the 6th newest: ranked
    store.add_message(cid, "user", "a kiwi and more things said at some length")
    assert first(1) != best                                  # the 7th: left out
    assert first(2) == best                                  # a page of 2 ranks 8


def test_search_leaves_out_a_match_whose_message_went_after_ranking(client):
    """The ranking and the rows are read apart: a message deleted between
    them is left out, the others kept in their order."""
    store = client.engine.store
    cid = store.create_conversation("fruit", MODEL)
    kept = [store.add_message(cid, "user", f"kiwi number {n}") for n in range(2)]
    rows = list(store.index._rows_of([(kept[1], -2.0), (kept[1] + 99, -1.5), (kept[0], -1.0)], 2))
    assert [(r["message_id"], r["score"]) for r in rows] == [(kept[1], -2.0), (kept[0], -1.0)]


def test_search_follows_renames_and_deletes(client, corpus):
    client.request("PUT", f"/api/conversations/{corpus['cook']}", {"title": "Kitchen"})
    assert client.get("/api/search?q=recipe")[2]["count"] == 0
    assert client.get("/api/search?q=kitchen")[2]["count"] == 1     # the conversation, once
    client.request("DELETE", f"/api/conversations/{corpus['cook']}")
    assert client.get("/api/search?q=kitchen")[2]["count"] == 0


@pytest.mark.parametrize("q", [
    '"', '"machine', 'machine"', '""', "AND", "OR", "NOT", "machine AND", "NEAR(machine",
    "NEAR(a b, 1)", "*", "machine*", "-learning", "title:machine", "content:x", "(((", ")",
    "'; DROP TABLE messages; --", "^machine", "machine + learning", "{title}: x", "a:b:c",
    "\u0000", "💥", "ﬁ", "%", "_", "\\", "machine NOT learning", "learning -cook",
])
def test_hostile_search_queries_never_fail(client, corpus, q):
    status, _, body = client.get("/api/search?" + urllib.parse.urlencode({"q": q}))
    assert status == 200, body
    assert body["query"] == q and isinstance(body["results"], list)
    assert rows(client, "SELECT count(*) FROM messages")[0][0] == 4


def test_search_words_are_words_not_operators(client, corpus):
    client.engine.store.add_message(corpus["ml"], "user", "a machine without the other word")
    # As FTS5 syntax this would find that message; as words (not* among them), nothing.
    assert client.get("/api/search?q=machine%20NOT%20learning")[2]["count"] == 0
    assert client.get("/api/search?q=minutes%20-egg")[2]["count"] == 1


@pytest.mark.parametrize("query, field", [("", "q"), ("q=", "q"), ("q=%20", "q"),
                                          ("q=x&limit=0", "limit"), ("q=x&limit=abc", "limit")])
def test_search_parameter_errors(client, query, field):
    status, _, body = client.get("/api/search?" + query)
    assert (status, body["code"], body["field"]) == (400, "VALIDATION_ERROR", field)


# What a user of each script types, and must find while typing it: (text
# stored, query, found). Runs of two or more CJK characters anywhere in a
# sentence; Greek without its accents; emoji.
SCRIPT_SEARCHES = [
    ("Café déjà vu, naïve Straße", "cafe", True),
    ("Café déjà vu, naïve Straße", "dej", True),
    ("Café déjà vu, naïve Straße", "stra", True),
    ("Café déjà vu, naïve Straße", "naï", True),
    ("καλημέρα κόσμε", "καλη", True),
    ("καλημέρα κόσμε", "κοσμ", True),
    ("καλημέρα κόσμε", "κόσμε", True),
    ("ΚΑΛΗΜΈΡΑ ΚΌΣΜΕ", "καλημερα", True),
    ("йогурт и чай", "йог", True),
    ("йогурт и чай", "чай", True),
    ("йогурт и чай", "ЙОГУРТ", True),
    ("안녕하세요 여러분", "안녕", True),
    ("안녕하세요 여러분", "여러분", True),
    ("がっこう ぱん", "がっ", True),
    ("がっこう ぱん", "っこう", True),
    ("私は東京の学校に行きます", "東京", True),
    ("私は東京の学校に行きます", "学校に", True),
    ("私は東京の学校に行きます", "京都", False),
    ("我喜欢机器学习和深度学习", "我喜欢", True),
    ("我喜欢机器学习和深度学习", "机器", True),
    ("我喜欢机器学习和深度学习", "学习", True),
    ("我喜欢机器学习和深度学习", "深度学", True),
    ("我喜欢机器学习和深度学习", "习机", False),
    ("我喜欢机器学习和深度学习", "机器 深度", True),
    ("我喜欢机器学习和深度学习", "学习 python", False),
    ("GPU加速的深度学习 with PyTorch", "gpu加速", True),
    ("GPU加速的深度学习 with PyTorch", "pytor", True),
    ("GPU加速的深度学习 with PyTorch", "加速 pytorch", True),
    ("party tonight 🎉🔥 bring snacks", "🔥", True),
    ("party tonight 🎉🔥 bring snacks", "🎉 snacks", True),
    ("party tonight 🎉🔥 bring snacks", "🍕", False),
    ("party tonight 🎉🔥 bring snacks", "tonight", True),
]


@pytest.fixture(scope="module", params=[True, False], ids=["fts5", "like"])
def script_store(request, tmp_path_factory):
    """Every text of SCRIPT_SEARCHES in one store, with FTS5 and with LIKE."""
    store = llama_chat.Store(str(tmp_path_factory.mktemp("scripts") / "s.db"),
                             use_fts=request.param)
    cid = store.create_conversation("words", MODEL)
    for text in dict.fromkeys(t for t, _, _ in SCRIPT_SEARCHES):
        store.add_message(cid, "user", text)
    store.add_message(cid, "user", "something else entirely")
    yield store
    store.close()


@pytest.mark.parametrize("text, q, found", SCRIPT_SEARCHES)
def test_search_finds_prefixes_and_runs_in_every_script(script_store, text, q, found):
    if not script_store.index.fts:   # LIKE: each word a substring, the case of ASCII ignored
        ascii_lower = lambda s: "".join(c.lower() if c.isascii() else c for c in s)  # noqa
        words = re.findall(r"[^\W_]+", q)
        found = bool(words) and all(ascii_lower(w) in ascii_lower(text) for w in words)
    results = [r for r in script_store.search(q, 50) if r["content"] == text]
    assert len(results) == (1 if found else 0), q
    if found and script_store.index.fts:
        r = results[0]
        assert r["highlights"], r
        for a, b in r["highlights"]:
            assert r["snippet"][a:b].strip() == r["snippet"][a:b] != ""


@pytest.mark.parametrize("content, query, marked", [
    ("Plain ASCII: Learning machines learn; machine-learning relearn MACHINE.",
     "machine learn", ["Learning", "learn", "machine", "learning", "MACHINE"]),
    ("Café déjà vu: Learning machines learn; machine-learning relearn MACHINE.",
     "machine learn", ["Learning", "learn", "machine", "learning", "MACHINE"]),
    ("the machine learning course and machine code", '"machine learning"',
     ["machine learning"]),
    ("我喜欢机器学习和深度学习", "学习", ["学习", "学习"]),
    ("καλημέρα κόσμε", "κοσμ", ["κόσμε"]),
    ("party 🎉🔥 time", "🔥", ["🔥"]),
])
def test_highlights_mark_what_the_index_matched(content, query, marked):
    q = llama_chat.search_query(query)
    spans = llama_chat.highlight_spans(content, q)
    assert [content[a:b] for a, b in spans] == marked
    if content.isascii():         # the regular expression used for ASCII text agrees
        assert [list(m.span()) for m in llama_chat.ascii_pattern(q).finditer(content)] == spans


def test_the_ascii_expression_agrees_with_the_index_on_random_text():
    """Words glued to letters, digits, underscores and punctuation on either
    side, in any case: the expression marks what highlight_spans marks."""
    rng = random.Random(28)
    pieces = ["learn", "Learning", "machine", "MACHINE", "ma", "x", "9", "_", "-", " ", ".",
              "relearn", "learn2", "é", "machines"]
    for query in ("learn", "machine learn", '"machine learning"', "ma x", "learn 9"):
        q = llama_chat.search_query(query)
        for _ in range(300):
            content = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
            if content.isascii():
                assert [list(m.span()) for m in llama_chat.ascii_pattern(q).finditer(
                    content)] == llama_chat.highlight_spans(content, q), (query, content)


def test_search_form_origins_map_back_to_the_text():
    text = "Ὁ κόσμος e\u0301 我喜欢 🎉 plain"
    origins = []
    form = llama_chat.search_form(text, origins)
    assert len(origins) == len(form) and origins == sorted(origins)
    assert llama_chat.search_form(text) == form
    assert "ο κοσμος" in form.lower() and " 我  喜  欢 " in form


def test_search_limit_defaults_and_caps(client):
    store = client.engine.store
    cid = store.create_conversation("many", MODEL)
    for i in range(260):
        store.add_message(cid, "user", f"needle number {i}")
    assert client.get("/api/search?q=needle")[2]["count"] == 50
    assert client.get("/api/search?q=needle&limit=7")[2]["count"] == 7
    assert client.get("/api/search?q=needle&limit=100000")[2]["count"] == 200


def test_search_without_fts5_falls_back_to_like(tmp_path, stub, launch):
    store = llama_chat.Store(str(tmp_path / "like.db"), use_fts=False)
    server = launch(stub.url, store=store)
    c = Client(server)
    cid = store.create_conversation("Recipes", MODEL)
    store.add_message(cid, "user", "100% of eggs_boiled are learning")
    body = c.get("/api/search?q=learn%20eggs")[2]
    assert body["count"] == 1
    r = body["results"][0]
    assert [r["snippet"][s:e] for s, e in r["highlights"]] == ["eggs", "learning"]
    assert c.get("/api/search?q=%25")[2]["count"] == 0
    assert c.get("/api/health")[2]["database"] == {"ok": True, "fts5": False}


def test_search_query_quotes_everything():
    q = llama_chat.search_query
    assert q('NEAR(a "b c" -dd').match == '"NEAR a" AND "b c" AND "dd"*'
    assert q("vitamin c").match == '"vitamin" AND "c"'     # no one-letter prefix
    assert q('"unbalanced').match == '"unbalanced"*'
    assert q("机器学习 GPU加速").match == '"机 器 学 习" AND "GPU 加 速"'
    assert q("*** ---").match is None


def test_search_matches_a_prefix_with_many_words(client):
    store = client.engine.store
    cid = store.create_conversation("words", MODEL)
    store.add_message(cid, "user", " ".join(f"pre{i}x" for i in range(60)))
    store.add_message(cid, "user", "prefix")
    assert client.get("/api/search?q=pre")[2]["count"] == 2
    assert client.get("/api/search?q=pre5")[2]["count"] == 1
    assert client.get("/api/search?q=pr")[2]["count"] == 2      # the 2-letter prefix index


def rows_of(store, sql, *args):
    return store.db.conn().execute(sql, args).fetchall()


def assert_index_in_step(store):
    """FTS5's own check of the index against the tables passes, and every
    message is found by each of its words."""
    store.index.check()
    for mid, content in rows_of(store, "SELECT id, content FROM messages"):
        for word in set(llama_chat.TOKEN.findall(content)[:3]):
            assert mid in {r["message_id"] for r in store.search(f'"{word}"', 200)}, word


def test_the_index_keeps_in_step_with_every_write(tmp_path):
    store = llama_chat.Store(str(tmp_path / "step.db"))
    a = store.create_conversation("alpha topic", MODEL)
    b = store.create_conversation("βήτα 主题", MODEL)
    ids = [store.add_message((a, b)[i % 2], "user", f"common word{i} 机器{i} κόσμε🎉")
           for i in range(12)]
    assert_index_in_step(store)
    store.rename_conversation(a, "gamma topic")
    deleted = store.tree.delete(ids[7])[1]            # and the two below it
    assert deleted == [ids[7], ids[9], ids[11]]
    with store.db.write() as c:
        c.execute("UPDATE messages SET content = 'changed text 学习' WHERE id = ?", (ids[-2],))
    assert store.tree.edit(ids[2], "edited in place 学习") is not None
    assert_index_in_step(store)
    assert [r["message_id"] for r in store.search("学习", 10)] == [ids[-2], ids[2]]
    assert not store.search("word7", 10) and not store.search("word11", 10)
    assert store.search("gamma", 50) and not store.search("alpha", 50)
    store.delete_conversation(b)
    assert store.index.purge_due()
    store.index.purge(threading.Event())
    assert not store.index.purge_due()
    assert_index_in_step(store)
    assert not store.search("主题", 10) and not store.search("βήτα", 10)


def test_a_purge_left_unfinished_runs_at_the_next_start(tmp_path, stub, launch):
    path = tmp_path / "crash.db"
    store = llama_chat.Store(str(path))
    cid = store.create_conversation("gone", MODEL)
    store.add_message(cid, "user", "leftoverword")
    store.delete_conversation(cid)                    # and the app stops before purging
    store.close()
    server = launch(stub.url, db=str(path))
    deadline = time.monotonic() + 10
    while (server.engine.store.index.purge_due() or server.engine._purge["running"]) \
            and time.monotonic() < deadline:         # merged, then checkpointed
        time.sleep(0.05)
    assert not server.engine.store.index.purge_due()
    server.engine.store.close()
    assert b"leftoverword" not in path.read_bytes()


def test_a_write_interrupts_a_purge_which_runs_again_once_writes_pause(client, monkeypatch):
    """A purge at a million messages takes seconds; a chat sent meanwhile is
    written at once (the purge rolls back) and the purge is done afterwards."""
    monkeypatch.setattr(llama_chat, "PURGE_PAUSE_SECONDS", 0.3)
    merge = llama_chat.SearchIndex.purge
    merges = []

    def a_long_merge_first(index, stopping):
        merges.append(time.monotonic())
        if len(merges) == 1:              # a merge that would never end by itself
            with index.db.write(gives_way=True) as c:
                c.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) "
                          "SELECT count(*) FROM n").fetchone()
        return merge(index, stopping)
    monkeypatch.setattr(llama_chat.SearchIndex, "purge", a_long_merge_first)
    gone = client.new_conversation(title="quokkarian plans")
    client.chat(gone, "a quokkarian secret")
    kept = client.new_conversation()
    assert client.delete(f"/api/conversations/{gone}")[0] == 200
    deadline = time.monotonic() + 10
    while not merges and time.monotonic() < deadline:
        time.sleep(0.01)
    status, _, body = client.chat(kept, "written while the purge runs")
    assert status == 200, body
    while client.engine._purge["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(merges) == 2 and merges[1] - merges[0] >= 0.3     # once the writes paused
    assert not client.engine.store.index.purge_due()
    client.engine.store.close()
    path = client.engine.settings.db
    for name in (path, path + "-wal"):
        if os.path.exists(name):
            assert b"quokkarian" not in open(name, "rb").read()


def test_a_write_that_gives_way_gives_way_when_asked_between_its_statements(client):
    """Asked while none of its statements runs (SQLite then drops an
    interrupt), a write that gives way still stops at its next statement."""
    db, began, ended = client.engine.store.db, threading.Event(), {}

    def giving_way():
        try:
            with db.write(gives_way=True) as c:
                began.set()
                time.sleep(0.5)                       # between statements when asked
                c.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                          "LIMIT 30000000) SELECT count(*) FROM n").fetchone()
                ended["outcome"] = "ran to its end"
        except sqlite3.OperationalError as e:
            ended["outcome"] = str(e)
        finally:
            db.release()
    work = threading.Thread(target=giving_way)
    work.start()
    began.wait(5)
    written = client.new_conversation("written meanwhile")
    work.join(30)
    assert ended == {"outcome": "interrupted"}
    assert client.get(f"/api/conversations/{written}")[0] == 200


# Version 1.1's search schema beside its index: a word list, a forget list and
# a second, recent index, with their triggers (one of the recent ones here).
SEARCH_SCHEMA_1_1 = """
CREATE VIEW search_source AS
    SELECT m.id AS id, c.title AS title, m.content AS content
    FROM messages m JOIN conversations c ON c.id = m.conversation_id;
CREATE VIRTUAL TABLE search_fts USING fts5(
    title, content, content='search_source', content_rowid='id',
    tokenize='unicode61 remove_diacritics 2');
CREATE VIRTUAL TABLE search_vocab USING fts5vocab(search_fts, 'row');
CREATE TABLE search_terms (term TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE search_forget (term TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TRIGGER search_message_added AFTER INSERT ON messages BEGIN
    INSERT INTO search_fts (rowid, title, content)
        SELECT new.id, c.title, new.content FROM conversations c WHERE c.id = new.conversation_id;
END;
CREATE TRIGGER search_title_changed AFTER UPDATE OF title ON conversations
WHEN old.title IS NOT new.title BEGIN
    INSERT INTO search_fts (search_fts, rowid, title, content)
        SELECT 'delete', m.id, old.title, m.content FROM messages m WHERE m.conversation_id = old.id;
    INSERT INTO search_fts (rowid, title, content)
        SELECT m.id, new.title, m.content FROM messages m WHERE m.conversation_id = new.id;
END;
CREATE TABLE search_recent_span (floor INTEGER NOT NULL, size INTEGER NOT NULL,
                                 step INTEGER NOT NULL);
INSERT INTO search_recent_span VALUES (0, 20000, 200);
CREATE VIEW search_recent_source AS
    SELECT id, title, content FROM search_source WHERE id > (SELECT floor FROM search_recent_span);
CREATE VIRTUAL TABLE search_recent USING fts5(
    title, content, content='search_recent_source', content_rowid='id',
    tokenize='unicode61 remove_diacritics 2');
CREATE TRIGGER search_recent_added AFTER INSERT ON messages BEGIN
    INSERT INTO search_recent (rowid, title, content)
        SELECT new.id, c.title, new.content FROM conversations c, search_recent_span r
        WHERE c.id = new.conversation_id AND new.id > r.floor;
END;
"""


def make_1_1_db(path, conversations=4, per_conversation=5):
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    llama_chat.migrate_to_1(conn)
    for statement in llama_chat.split_sql(SEARCH_SCHEMA_1_1):
        conn.execute(statement)
    for c in range(conversations):
        conn.execute("INSERT INTO conversations (title, model) VALUES (?, 'm')", (f"chat {c}",))
        for m in range(per_conversation):
            conn.execute("INSERT INTO messages (conversation_id, role, content) VALUES "
                         "(?, 'user', ?)", (c + 1, f"message {c}-{m} about 火山 volcanoes"))
    conn.execute("INSERT INTO search_terms SELECT term FROM search_vocab")
    conn.execute("PRAGMA user_version = 1")
    conn.execute("COMMIT")
    conn.close()


def test_a_1_1_database_migrates_to_one_index(tmp_path):
    path = str(tmp_path / "v11.db")
    make_1_1_db(path)
    store = llama_chat.Store(path)
    assert store.backup_path and rows_of(store, "PRAGMA user_version") == [
        (llama_chat.SCHEMA_VERSION,)]
    names = {r[0] for r in rows_of(store, "SELECT name FROM sqlite_master WHERE name LIKE "
                                          "'search%' AND name NOT LIKE 'search_fts_%'")}
    assert names == {"search_source", "search_fts", "search_purge", "search_unbuilt",
                     "search_message_added",
                     "search_message_removed", "search_message_changed", "search_title_changed"}
    assert rows_of(store, "SELECT count(*) FROM messages") == [(20,)]
    assert len(store.search("volcanoes", 50)) == len(store.search("火山", 50)) == 20
    assert len(store.search("vo", 50)) == 20
    assert_index_in_step(store)
    backup = sqlite3.connect(store.backup_path)
    assert backup.execute("PRAGMA user_version").fetchone() == (1,)
    assert backup.execute("SELECT count(*) FROM search_terms").fetchone()[0] > 0


def test_an_index_of_1_10s_prefixes_is_built_again_with_longer_ones(tmp_path, monkeypatch):
    """1.10 indexed prefixes of 2-5 characters; a whole word typed last (a
    prefix of 6-8) is looked up in the index now: an older index is made
    again, and finds what it found."""
    path = str(tmp_path / "prefixes.db")
    for name in ("SEARCH_SCHEMA", "ATTACHED_SEARCH_SCHEMA"):
        monkeypatch.setattr(llama_chat, name, getattr(llama_chat, name).replace(
            f"prefix='{llama_chat.SEARCH_PREFIXES}'", "prefix='2 3 4 5'"))
    store = llama_chat.Store(path)
    cid = store.create_conversation("Languages", MODEL)
    for text in ("pythonic code", "a python script", "pythons are snakes", "nothing else"):
        store.add_message(cid, "user", text)
    store.close()
    monkeypatch.undo()
    again = llama_chat.Store(path)
    assert "prefix='2 3 4 5 6 7 8'" in rows_of(
        again, "SELECT sql FROM sqlite_master WHERE name = 'search_fts'")[0][0]
    assert sorted(r["content"] for r in again.search("python", 10)) == [
        "a python script", "pythonic code", "pythons are snakes"]
    assert [r["content"] for r in again.search("pythoni", 10)] == ["pythonic code"]
    assert_index_in_step(again)


def test_a_start_on_an_indexed_database_builds_nothing(tmp_path, caplog):
    path = str(tmp_path / "again.db")
    store = llama_chat.Store(path)
    store.add_message(store.create_conversation("t", "m"), "user", "kept")
    store.close()
    caplog.set_level("INFO", logger="llama_chat")
    again = llama_chat.Store(path, open_now=False)
    assert again.quick_to_open()
    again.open()
    assert caplog.records == [] and len(again.search("kept", 10)) == 1


def test_the_index_is_rebuilt_after_a_spell_without_fts5(tmp_path):
    path = str(tmp_path / "switch.db")
    plain = llama_chat.Store(path, use_fts=False)
    cid = plain.create_conversation("t", "m")
    plain.add_message(cid, "user", "written while FTS5 was missing")
    plain.close()
    again = llama_chat.Store(path, use_fts=True)
    assert os.path.getsize(path + "-wal") == 0          # the build checkpointed into the file
    assert [r["content"] for r in again.search("missing", 10)] == [
        "written while FTS5 was missing"]
    assert_index_in_step(again)


def test_a_stop_during_start_up_work_leaves_the_database_as_it_was(tmp_path, monkeypatch):
    path = str(tmp_path / "llamacpp_chat.db")
    make_flask_db(path, conversations=40, per_conversation=50)
    before = sqlite3.connect(path).execute("SELECT sql FROM sqlite_master").fetchall()
    as_it_was = open(path, "rb").read()
    store = llama_chat.Store(path, open_now=False)
    reached = threading.Event()
    real_set = store.progress.set

    def set_and_stop(step, done=0, total=0):
        if step == f"migrating the database to schema {llama_chat.SCHEMA_VERSION}":
            store.interrupt()                    # as Ctrl-C does, from another thread
            reached.set()
        real_set(step, done, total)

    store.progress.set = set_and_stop
    with pytest.raises(sqlite3.OperationalError, match="interrupted"):
        store.open()
    assert reached.is_set()
    store.close()
    assert open(path, "rb").read() == as_it_was                    # not a byte changed
    assert not [n for n in os.listdir(tmp_path) if n.endswith((".migrating", "-journal"))]
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone() == (0,)
    assert conn.execute("SELECT sql FROM sqlite_master").fetchall() == before
    conn.close()
    again = llama_chat.Store(path)                   # the next start does it all
    assert len(again.search("volcanoes", 200)) == 200
    assert sorted(n for n in os.listdir(tmp_path) if "bak" in n) == ["llamacpp_chat.db.v0.bak"]
    assert open(again.backup_path, "rb").read() == as_it_was


def test_the_original_apps_history_is_migrated_into_a_new_file(tmp_path):
    """The original app's file is kept as it is, as the backup (a second name
    of it, nothing copied), and a new file takes its place: private, in WAL
    mode, this process's presence on it, and no connection to the old file
    used again (here one a request's thread holds)."""
    path = str(tmp_path / "llamacpp_chat.db")
    make_flask_db(path)
    inode, as_it_was = os.stat(path).st_ino, open(path, "rb").read()
    store = llama_chat.Store(path, open_now=False)
    held, go_on, seen = threading.Event(), threading.Event(), []

    def request_thread(ask):
        store.db.conn().execute("SELECT 1").fetchall()    # its connection, made before
        held.set()
        go_on.wait(10)
        if ask:
            seen.append(store.db.conn().execute("PRAGMA user_version").fetchone()[0])
        store.db.release()                            # (not to be handed on)

    def next_request_thread():
        seen.append(store.db.conn().execute("PRAGMA user_version").fetchone()[0])
    threads = []
    for ask in (True, False):
        held.clear()
        threads.append(threading.Thread(target=request_thread, args=(ask,)))
        threads[-1].start()
        assert held.wait(10)
    store.open()
    go_on.set()
    for thread in threads:
        thread.join(10)
    rows_of(store, "SELECT 1")                    # takes a connection made since
    thread = threading.Thread(target=next_request_thread)
    thread.start()
    thread.join(10)
    assert seen == [llama_chat.SCHEMA_VERSION] * 2
    assert store.backup_path == path + ".v0.bak"
    assert os.stat(store.backup_path).st_ino == inode
    assert open(store.backup_path, "rb").read() == as_it_was
    assert os.stat(path).st_ino != inode and file_mode(path) == 0o600
    assert rows_of(store, "PRAGMA journal_mode") == [("wal",)]
    assert rows_of(store, "SELECT count(*) FROM messages") == [(12,)]
    with pytest.raises(BlockingIOError):                  # present on the new file
        llama_chat.presence_lock(path, alone=True).close()
    assert sorted(os.listdir(tmp_path)) == ["llamacpp_chat.db", "llamacpp_chat.db-shm",
                                            "llamacpp_chat.db-wal", "llamacpp_chat.db.v0.bak"]
    store.close()


def test_a_new_file_left_by_a_power_cut_is_made_again(tmp_path):
    path = str(tmp_path / "llamacpp_chat.db")
    make_flask_db(path)
    with open(path + ".migrating", "wb") as f:
        f.write(b"SQLite format 3\0 and then the power went")
    store = llama_chat.Store(path)
    assert rows_of(store, "SELECT count(*) FROM messages") == [(12,)]
    assert not os.path.exists(path + ".migrating")
    store.close()


def test_a_second_start_while_the_first_migrates_is_told_so(tmp_path):
    """Two starts at once on the original app's file: the one that comes
    second (the new file's lock taken; or the file already replaced) stops
    with a message, and changes nothing."""
    import fcntl
    path = str(tmp_path / "llamacpp_chat.db")
    make_flask_db(path)
    as_it_was = open(path, "rb").read()
    with open(path + ".migrating", "ab") as first:
        fcntl.flock(first.fileno(), fcntl.LOCK_SH)   # (the second's LOCK_EX fails all the same)
        with pytest.raises(llama_chat.ConfigError, match="another llama-chat is making"):
            llama_chat.Store(path)
    assert open(path, "rb").read() == as_it_was and not os.path.exists(path + ".v0.bak")
    second = llama_chat.Store(path, open_now=False)
    first = llama_chat.Store(path)                        # done meanwhile
    with pytest.raises(llama_chat.ConfigError, match="migrated by another llama-chat"):
        second.open()
    second.close()
    assert open(first.backup_path, "rb").read() == as_it_was     # the backup kept
    first.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone() == (
        llama_chat.SCHEMA_VERSION,)


def test_a_file_replaced_as_its_backup_is_made_is_not_migrated(tmp_path, monkeypatch):
    """Another start puts the migrated file in place while this one backs up
    the file it opened: this one's migration stops (it would have migrated
    a file no longer there)."""
    path = str(tmp_path / "llamacpp_chat.db")
    make_flask_db(path)
    second = llama_chat.Store(path, open_now=False)
    real_backup = llama_chat.migration_backup

    def first_done_meanwhile(db, version):
        monkeypatch.setattr(llama_chat, "migration_backup", real_backup)
        llama_chat.Store(path).close()
        return real_backup(db, version)
    monkeypatch.setattr(llama_chat, "anew_possible", lambda db: False)
    monkeypatch.setattr(llama_chat, "migration_backup", first_done_meanwhile)
    with pytest.raises(llama_chat.ConfigError, match="migrated by another llama-chat"):
        second.open()
    second.close()
    monkeypatch.undo()
    again = llama_chat.Store(path)
    assert rows_of(again, "SELECT count(*) FROM messages") == [(12,)]
    again.close()


def test_an_empty_journal_beside_the_original_file_is_no_obstacle(tmp_path):
    """A journal SQLite left empty (journal_mode TRUNCATE, or a WAL with
    nothing in it) has nothing to apply: the file is migrated into a new one."""
    path = str(tmp_path / "llamacpp_chat.db")
    make_flask_db(path)
    for end in ("-journal", "-wal"):
        open(path + end, "wb").close()
    inode = os.stat(path).st_ino
    store = llama_chat.Store(path)
    assert os.stat(store.backup_path).st_ino == inode and os.stat(path).st_ino != inode
    store.close()


@pytest.mark.parametrize("shape", ["a journal beside it", "a table of its own",
                                   "no index by conversation", "no id sequence",
                                   "no hard links", "Windows"])
def test_an_original_history_not_as_the_app_made_it_is_migrated_in_place(
        tmp_path, monkeypatch, shape):
    path = str(tmp_path / "llamacpp_chat.db")
    if shape == "no id sequence":                  # its ids not AUTOINCREMENT's
        monkeypatch.setitem(globals(), "FLASK_SCHEMA", FLASK_SCHEMA.replace(" AUTOINCREMENT", ""))
    make_flask_db(path)
    conn = sqlite3.connect(path)
    if shape == "a table of its own":
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        conn.execute("INSERT INTO notes (text) VALUES ('mine')")
    if shape == "no index by conversation":
        conn.execute("DROP INDEX idx_messages_conversation")
    conn.commit()
    conn.close()
    if shape == "a journal beside it":
        with open(path + "-wal", "wb") as f:        # (an empty one: no WAL to apply)
            f.write(b"")
        with open(path + "-journal", "wb") as f:    # a journal SQLite may still apply
            f.write(b"\0" * 512)
    if shape == "no hard links":
        monkeypatch.setattr(os, "link", without_hard_links)
    inode = os.stat(path).st_ino
    with monkeypatch.context() as m:
        if shape == "Windows":                 # (where an open file cannot be renamed over)
            m.setattr(os, "name", "nt")
        store = llama_chat.Store(path)
    assert os.stat(path).st_ino == inode and os.stat(store.backup_path).st_ino != inode
    assert rows_of(store, "SELECT count(*) FROM messages") == [(12,)]
    if shape == "a table of its own":
        assert rows_of(store, "SELECT text FROM notes") == [("mine",)]
    store.close()


def test_writes_while_the_index_builds_leave_it_whole(tmp_path, monkeypatch):
    """An old history opened with its index to build later: every kind of
    write meanwhile, to messages indexed and not yet, then the build's end:
    the index matches the tables (FTS5's check) and finds each message."""
    path = str(tmp_path / "llamacpp_chat.db")
    make_flask_db(path, conversations=6, per_conversation=10)
    monkeypatch.setattr(llama_chat, "BUILD_BATCH", 20)
    store = llama_chat.Store(path, open_now=False)
    store.open(build_later=True)
    assert store.index.unbuilt() == {"done": 0, "total": 60}
    with store.db.write() as c:
        assert store.index.build_some(c) is True         # messages 1-20 indexed
    assert store.index.unbuilt() == {"done": 20, "total": 60}
    assert {r["message_id"] for r in store.search("volcanoes", 200)} == set(range(1, 21))
    with store.db.write() as c:                           # each write, on both sides
        c.execute("UPDATE messages SET content = 'basalt columns' WHERE id IN (5, 45)")
        c.execute("UPDATE conversations SET title = 'Renamed lava' WHERE id IN (1, 5)")
        c.execute("DELETE FROM messages WHERE id IN (10, 50)")        # leaves, each
        c.execute("INSERT INTO messages (conversation_id, role, content) "
                  "VALUES (6, 'user', 'obsidian shard')")         # a new one: 61
    assert store.delete_conversation(3)                   # messages 21-30, not indexed yet
    assert {r["message_id"] for r in store.search("basalt", 200)} == {5}   # the rest: later
    assert {r["message_id"] for r in store.search("obsidian", 200)} == {61}   # at once
    assert store.build_index(threading.Event()) is True
    assert store.index.unbuilt() is None
    assert_index_in_step(store)
    assert {r["message_id"] for r in store.search("basalt", 200)} == {5, 45}
    assert {r["message_id"] for r in store.search("obsidian", 200)} == {61}
    assert {r["conversation_id"] for r in store.search("renamed", 200)} == {1, 5}
    assert len(store.search("volcanoes", 200)) == 60 - 2 - 2 - 10
    stopped = threading.Event()
    stopped.set()
    assert store.build_index(stopped) is True            # nothing left: done at once
    store.close()


def test_a_stop_during_the_index_build_leaves_the_rest_to_the_next_start(tmp_path,
                                                                          monkeypatch):
    path = str(tmp_path / "llamacpp_chat.db")
    make_flask_db(path, conversations=4, per_conversation=10)
    monkeypatch.setattr(llama_chat, "BUILD_BATCH", 15)
    store = llama_chat.Store(path, open_now=False)
    store.open(build_later=True)
    stopping = threading.Event()
    stopping.set()
    assert store.build_index(stopping) is False          # one batch, then the stop
    assert store.index.unbuilt() == {"done": 15, "total": 40}
    store.close()
    assert llama_chat.checked_database(path) == ("SQLite's integrity check; the search index "
                                                 "is being built (15 of 40 messages)")
    again = llama_chat.Store(path)                       # a start that builds it now
    assert again.index.unbuilt() is None and again.backup_path is None
    assert len(again.search("volcanoes", 200)) == 40
    assert_index_in_step(again)
    again.close()


def app_with_its_index_held(tmp_path, stub, monkeypatch):
    """An app on the original app's database of 100 messages whose index
    build stops after a batch of 25 until the returned event is set."""
    path = str(tmp_path / "llamacpp_chat.db")
    make_flask_db(path, conversations=10, per_conversation=10)
    monkeypatch.setattr(llama_chat, "BUILD_BATCH", 25)
    go_on, real_give_way = threading.Event(), llama_chat.Database.give_way

    def held(self, longest=1.0):              # the build: one batch, then held
        if threading.current_thread().name == "search-index" and self.conn().execute(
                "SELECT done FROM search_unbuilt").fetchone()[0]:
            go_on.wait(15)
        return real_give_way(self, longest)

    monkeypatch.setattr(llama_chat.Database, "give_way", held)
    settings = llama_chat.Settings(host="127.0.0.1", port=0, llamacpp_url=stub.url, db=path)
    server = llama_chat.make_server(settings)
    serve(server)
    return server, go_on, path


def test_an_old_history_answers_at_once_and_search_when_its_index_is_built(
        tmp_path, stub, monkeypatch):
    server, go_on, path = app_with_its_index_held(tmp_path, stub, monkeypatch)
    c = Client(server)
    try:
        assert server.engine.ready.wait(10)
        assert c.get("/api/conversations")[0] == 200           # history at once
        assert c.chat(1, "a new question about volcanoes")[0] == 200   # and chat
        wait_for(lambda: c.get("/api/health")[2]["database"].get("search_index", {}).get(
            "done"), 10, "a batch built, then held")
        status, headers, body = c.get("/api/search?q=volcanoes")
        assert (status, body["code"], headers["Retry-After"]) == (503, "STARTING", "2")
        assert body["error"] == "search is being prepared: 25%"
        assert body["progress"] == {"step": "building the search index", "done": 25,
                                    "total": 100}
        health = c.get("/api/health")[2]
        assert health["database"]["search_index"] == {"building": True, "done": 25,
                                                      "total": 100}
        go_on.set()
        wait_for(lambda: c.get("/api/search?q=volcanoes")[0] == 200, 10, "the index built")
        assert c.get("/api/search?q=volcanoes&limit=200")[2]["count"] == 101
        assert "search_index" not in c.get("/api/health")[2]["database"]
        assert os.path.getsize(path + "-wal") == 0        # checkpointed at the build's end
    finally:
        go_on.set()
        stop(server)


def app_held_at_start(tmp_path, stub, monkeypatch, step, done, total):
    """An app on the original app's database whose opening stops at `step`
    until the returned event is set: (server, event)."""
    path = str(tmp_path / "llamacpp_chat.db")
    make_flask_db(path)
    go_on = threading.Event()
    real_open = llama_chat.Store.open

    def slow_open(self, build_later=False):
        self.progress.set(step, done, total)
        go_on.wait(15)
        real_open(self, build_later)

    monkeypatch.setattr(llama_chat.Store, "open", slow_open)
    settings = llama_chat.Settings(host="127.0.0.1", port=0, llamacpp_url=stub.url, db=path)
    server = llama_chat.make_server(settings)
    serve(server)
    return server, go_on


def test_the_api_answers_starting_while_the_store_opens(tmp_path, stub, monkeypatch):
    server, go_on = app_held_at_start(tmp_path, stub, monkeypatch,
                                      "migrating the database to schema 1", 3, 7)
    c = Client(server)
    try:
        status, _, body = c.get("/api/health")
        assert status == 200 and body["status"] == "starting"
        assert body["progress"] == {"step": "migrating the database to schema 1", "done": 3,
                                    "total": 7}
        status, headers, body = c.get("/api/stats/1")
        assert (status, body["code"], headers["Retry-After"]) == (503, "STARTING", "2")
        assert body["progress"]["step"].startswith("migrating")
        assert c.put("/api/conversations/1", {"title": "t"})[0] == 503
        assert len(c.get("/api/conversations")[2]["conversations"]) == 3   # read as it was
        assert c.get("/")[0] == 200
        go_on.set()
        assert server.engine.ready.wait(10)
        assert c.get("/api/health")[2]["status"] == "ok"
        assert len(c.get("/api/conversations")[2]["conversations"]) == 3
    finally:
        go_on.set()
        stop(server)


def test_reads_answer_while_a_write_waits_for_the_lock(client):
    cid = client.new_conversation("held")
    holder = sqlite3.connect(client.engine.settings.db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")               # another process writing, a long purge
    waiting = threading.Thread(target=client.post, args=(
        "/api/conversations", {"title": "waits", "model": "m"}))
    try:
        waiting.start()
        time.sleep(0.3)                             # the POST is waiting for SQLite's lock
        for path in ("/", "/api/conversations", f"/api/conversations/{cid}",
                     "/api/search?q=held", "/api/health"):
            conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=3)
            conn.request("GET", path)
            assert conn.getresponse().status == 200, path
            conn.close()
        assert waiting.is_alive()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        waiting.join(15)
    assert [r[0] for r in rows(client, "SELECT title FROM conversations ORDER BY id")] == [
        "held", "waits"]


###############################################################################
# Conversation trees
###############################################################################

def conversation(client, cid, everything=False):
    status, _, body = client.get(f"/api/conversations/{cid}"
                                 + ("?branches=all" if everything else ""))
    assert status == 200, body
    return body


def branch(client, cid):
    return [m["content"] for m in conversation(client, cid)["messages"]]


def sent(stub):
    """The messages of llama.cpp's last request, system prompt left out."""
    return [(m["role"], m["content"]) for m in stub.requests[-1]["body"]["messages"]
            if m["role"] != "system"]


def regenerate(client, cid, message_id, **extra):
    return client.post("/api/chat", {"conversation_id": cid, "regenerate": message_id,
                                     "model": MODEL, **extra})


def schema_2_db(path, fill, index=True, version=2):
    """A database as llama-chat 1.2 left it: schema 2 (or `version`), its
    search index built (or, with index=False, none), and fill(cursor) to put
    rows in it."""
    store = llama_chat.Store(path, open_now=False)
    with store.db.own_connection() as conn:
        with store.db.write(conn) as c:
            for migrate in llama_chat.MIGRATIONS[:version]:
                migrate(c)
            c.execute(f"PRAGMA user_version = {version}")
            if index:       # this version's search schema, whose trigger asks writing_in_bulk
                c.execute("CREATE TABLE IF NOT EXISTS writing_in_bulk (name TEXT PRIMARY KEY)")
                store.index.sync(c)
            fill(c)
    store.close()


def migrated(path, fill, version):
    """A database of schema `version`, filled by fill(cursor), opened by this
    version: its Store, once the backup made first is found of the old one."""
    schema_2_db(path, fill, version=version)
    store = llama_chat.Store(path)
    assert store.backup_path and sqlite3.connect(store.backup_path).execute(
        "PRAGMA user_version").fetchone() == (version,)
    return store


def make_schema_2_db(path):
    def fill(c):
        for title in ("first chat", "second chat"):
            c.execute("INSERT INTO conversations (title, model) VALUES (?, 'm')", (title,))
        # Two conversations written in turns: their ids interleave.
        for cid, role, text in [(1, "user", "hello volcano"), (2, "user", "hi 火山"),
                                (1, "assistant", "lava facts"), (1, "user", "more"),
                                (2, "assistant", "熔岩"), (1, "assistant", "partial"),
                                (1, "assistant", "whole answer")]:
            c.execute("INSERT INTO messages (conversation_id, role, content, finish_reason) "
                      "VALUES (?, ?, ?, ?)", (cid, role, text,
                                              "error" if text == "partial" else None))
    schema_2_db(path, fill)


def test_a_schema_2_database_becomes_chains(tmp_path, caplog):
    path = str(tmp_path / "v2.db")
    make_schema_2_db(path)
    caplog.set_level("INFO", logger="llama_chat")
    store = llama_chat.Store(path)
    assert store.backup_path
    assert rows_of(store, "PRAGMA user_version") == [(llama_chat.SCHEMA_VERSION,)]
    assert not any("built the search index" in r.getMessage() for r in caplog.records)
    assert rows_of(store, "SELECT id, conversation_id, parent_id FROM messages ORDER BY id") == [
        (1, 1, None), (2, 2, None), (3, 1, 1), (4, 1, 3), (5, 2, 2), (6, 1, 4), (7, 1, 6)]
    assert rows_of(store, "SELECT id, current_message_id FROM conversations") == [(1, 7), (2, 5)]
    messages = json.loads(store.messages(1)[0])
    assert [m["content"] for m in messages] == ["hello volcano", "lava facts", "more",
                                                "partial", "whole answer"]
    assert all(m["sibling_ids"] == [m["id"]] for m in messages)
    assert [r["message_id"] for r in store.search("火山", 10)] == [2]
    assert_index_in_step(store)
    backup = sqlite3.connect(store.backup_path)
    assert backup.execute("PRAGMA user_version").fetchone() == (2,)
    with store.db.write() as c:                # the tree's shape is SQLite's to keep
        for bad in ("INSERT INTO messages (conversation_id, parent_id, role, content) "
                    "VALUES (2, 1, 'user', 'parent of another conversation')",
                    "UPDATE conversations SET current_message_id = 2 WHERE id = 1",
                    "DELETE FROM messages WHERE id = 4"):
            with pytest.raises(sqlite3.IntegrityError):
                c.execute(bad)


def test_interrupted_migrations_keep_one_private_backup(tmp_path, monkeypatch):
    path = str(tmp_path / "old.db")
    schema_2_db(path, lambda c: c.execute(
        "INSERT INTO conversations (title, model) VALUES ('kept', 'm')"), version=6)

    def broken(c):
        raise sqlite3.OperationalError("interrupted")

    monkeypatch.setattr(llama_chat, "MIGRATIONS", [*llama_chat.MIGRATIONS[:6], broken])
    for _ in range(2):                          # a start that stops mid-way, twice
        with pytest.raises(sqlite3.OperationalError):
            llama_chat.Store(path)
    assert sorted(n for n in os.listdir(tmp_path) if ".bak" in n) == ["old.db.v6.bak"]
    monkeypatch.undo()
    store = llama_chat.Store(path)
    assert store.backup_path == path + ".v6.bak" and file_mode(store.backup_path) == 0o600
    assert sorted(n for n in os.listdir(tmp_path) if ".bak" in n) == ["old.db.v6.bak"]
    assert sqlite3.connect(store.backup_path).execute(
        "SELECT title FROM conversations").fetchall() == [("kept",)]


def test_a_failed_migration_backup_leaves_no_copy(tmp_path, monkeypatch):
    path = str(tmp_path / "old.db")
    schema_2_db(path, lambda c: None, version=6)

    def full_disk(self, target, durable=True):
        with open(target, "wb") as f:
            f.write(b"SQLite format 3\0 half")
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(llama_chat.Database, "backup", full_disk)
    with pytest.raises(sqlite3.OperationalError):
        llama_chat.Store(path)
    assert not [n for n in os.listdir(tmp_path) if ".bak" in n]
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone() == (6,)


def test_a_regenerate_in_a_migrated_chain_answers_the_question(tmp_path, stub, launch):
    path = str(tmp_path / "v2.db")
    make_schema_2_db(path)                  # more -> partial (failed) -> whole answer
    c = Client(launch(stub.url, db=path))
    status, _, body = regenerate(c, 1, 7)
    assert (status, body["parent_id"]) == (200, 4)
    assert sent(stub) == [("user", "hello volcano"), ("assistant", "lava facts"),
                          ("user", "more")]
    assert conversation(c, 1)["messages"][-1]["sibling_ids"] == [6, body["message_id"]]


def test_a_regenerate_or_continue_without_a_model_keeps_the_reply_s(client, stub):
    cid = client.new_conversation(model="conversation-model.gguf")
    first = client.chat(cid, "q", model="reply-model.gguf")[2]
    for name in ("regenerate", "continue"):
        status, _, body = client.post("/api/chat", {"conversation_id": cid,
                                                    name: first["message_id"]})
        assert status == 200, body
        assert stub.requests[-1]["body"]["model"] == "reply-model.gguf"
    client.post("/api/chat", {"conversation_id": cid, "regenerate": first["user_message_id"]})
    assert stub.requests[-1]["body"]["model"] == "reply-model.gguf"   # the conversation's now
    assert client.post("/api/chat", {"conversation_id": cid, "message": "x"})[2]["field"] == \
        "model"


def test_a_client_of_the_reference_sees_the_current_branch(client, stub):
    cid = client.new_conversation()
    first = client.chat(cid, "one")[2]
    second = client.chat(cid, "two")[2]
    again = regenerate(client, cid, second["user_message_id"])[2]
    assert (again["parent_id"], again["user_message_id"]) == (second["user_message_id"],) * 2
    body = conversation(client, cid)
    assert body["conversation"]["current_message_id"] == again["message_id"]
    assert [m["id"] for m in body["messages"]] == [
        first["user_message_id"], first["message_id"], second["user_message_id"],
        again["message_id"]]
    assert [m["parent_id"] for m in body["messages"]] == [
        None, first["user_message_id"], first["message_id"], second["user_message_id"]]
    assert body["messages"][-1]["sibling_ids"] == [second["message_id"], again["message_id"]]
    assert body["stats"]["total_messages"] == 5          # stats count every branch
    every = conversation(client, cid, everything=True)["messages"]
    assert [m["id"] for m in every] == sorted(m["id"] for m in every) and len(every) == 5
    assert client.get(f"/api/conversations/{cid}?branches=some")[2]["code"] == \
        "VALIDATION_ERROR"


def test_llamacpp_is_sent_the_branch_and_never_another(client, stub):
    cid = client.new_conversation()
    stub.reply = "A1"
    a1 = client.chat(cid, "Q1")[2]
    stub.reply = "A2"
    a2 = client.chat(cid, "Q2")[2]
    stub.reply = "B2"
    edited = client.chat(cid, "Q2 edited", parent_id=a1["message_id"])[2]
    assert sent(stub) == [("user", "Q1"), ("assistant", "A1"), ("user", "Q2 edited")]
    assert branch(client, cid) == ["Q1", "A1", "Q2 edited", "B2"]
    stub.reply = "A2b"
    regenerate(client, cid, a2["message_id"])             # a reply: its question again
    assert sent(stub) == [("user", "Q1"), ("assistant", "A1"), ("user", "Q2")]
    assert branch(client, cid) == ["Q1", "A1", "Q2", "A2b"]
    stub.reply = "C"
    client.chat(cid, "Q3")
    assert sent(stub) == [("user", "Q1"), ("assistant", "A1"), ("user", "Q2"),
                          ("assistant", "A2b"), ("user", "Q3")]
    client.engine.settings.performance["context_history_limit"] = 1
    regenerate(client, cid, edited["user_message_id"])
    assert sent(stub) == [("user", "Q2 edited")]       # A1 went, a leading reply
    client.chat(cid, "fresh start", parent_id=None)
    assert sent(stub) == [("user", "fresh start")]
    roots = [m for m in conversation(client, cid)["messages"] if m["parent_id"] is None]
    assert [m["content"] for m in roots] == ["fresh start"]
    assert roots[0]["sibling_ids"] == [a1["user_message_id"], roots[0]["id"]]


def test_the_history_limit_applies_to_the_branch(client, stub):
    cid = client.new_conversation()
    replies = [client.chat(cid, f"Q{i}")[2] for i in range(2)]
    client.chat(cid, "side", parent_id=replies[0]["message_id"])     # ids between
    client.put(f"/api/conversations/{cid}", {"current_message_id": replies[1]["message_id"]})
    replies += [client.chat(cid, f"Q{i}")[2] for i in range(2, 4)]
    client.engine.settings.performance["context_history_limit"] = 3
    regenerate(client, cid, replies[3]["user_message_id"])
    assert [text for _, text in sent(stub)] == ["Q2", stub.reply, "Q3"]   # A1 led: left out
    client.engine.settings.performance["context_history_limit"] = 4     # the first kept
    regenerate(client, cid, replies[3]["user_message_id"])
    assert [text for _, text in sent(stub)] == ["Q0", stub.reply, "Q2", stub.reply, "Q3"]
    client.engine.settings.performance["context_history_limit"] = 6     # all: the branch's
    regenerate(client, cid, replies[3]["user_message_id"])
    assert [text for _, text in sent(stub)] == [
        "Q0", stub.reply, "Q1", stub.reply, "Q2", stub.reply, "Q3"]


@pytest.mark.parametrize("body, field", [
    ({"parent_id": 1, "regenerate": 2}, "regenerate"),
    ({"regenerate": 2, "continue": 2}, "continue"),
    ({"parent_id": None, "user_message_id": 1, "message": "x"}, "user_message_id"),
    ({"regenerate": 1, "message": "x"}, "message"),
    ({"continue": 2, "message": "x"}, "message"),
    ({"continue": 1}, "continue"),                        # a question, not a reply
    ({"regenerate": "1"}, "regenerate"),
    ({"parent_id": True, "message": "x"}, "parent_id"),
])
def test_a_chat_placed_wrong_is_refused_and_stores_nothing(client, body, field):
    cid = client.new_conversation()
    client.chat(cid, "first")
    status, _, answer = client.post("/api/chat", {"conversation_id": cid, "model": MODEL,
                                                  **body})
    assert (status, answer["code"], answer["field"]) == (400, "VALIDATION_ERROR", field)
    assert rows(client, "SELECT count(*) FROM messages") == [(2,)]


@pytest.mark.parametrize("name", ["parent_id", "regenerate", "continue"])
def test_a_chat_under_an_unknown_message_is_not_found(client, name):
    cid = client.new_conversation()
    other = client.chat(client.new_conversation(), "elsewhere")[2]
    for target in (other["message_id"], 9999):
        body = {"conversation_id": cid, "model": MODEL, name: target}
        if name == "parent_id":
            body["message"] = "hello"
        status, _, answer = client.post("/api/chat", body)
        assert (status, answer["code"], answer["resource"], answer["id"]) == (
            404, "NOT_FOUND", "message", target)
    assert rows(client, "SELECT count(*) FROM messages") == [(2,)]


@pytest.mark.parametrize("echo", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_continue_appends_to_the_reply_and_sums_its_metrics(client, stub, stream, echo):
    stub.echo_prefill = echo
    cid = client.new_conversation()
    stub.reply, stub.finish_reason = "The first part", "length"
    first = client.chat(cid, "tell me")[2]
    assert first["finish_reason"] == "length"
    stub.reply, stub.finish_reason = " and the rest.", "stop"
    body = {"conversation_id": cid, "model": MODEL, "continue": first["message_id"]}
    if stream:
        events = read_events(client.stream(cid, None, **{"continue": first["message_id"]})[0])
        assert "".join(e["content"] for e in events if e["type"] == "delta") == " and the rest."
        done = events[-1]
    else:
        status, _, done = client.post("/api/chat", body)
        assert status == 200
    assert sent(stub) == [("user", "tell me"), ("assistant", "The first part")]
    assert (done["message_id"], done["parent_id"], done["user_message_id"]) == (
        first["message_id"], first["user_message_id"], first["user_message_id"])
    assert done["response"] == "The first part and the rest."
    assert done["finish_reason"] == "stop"
    assert done["estimated_tokens"] == first["estimated_tokens"] + 3
    assert done["response_time_ms"] >= first["response_time_ms"]
    stored = conversation(client, cid)["messages"]
    assert [m["content"] for m in stored] == ["tell me", "The first part and the rest."]
    assert (stored[1]["finish_reason"], stored[1]["estimated_tokens"]) == ("stop", 3 + 3)
    assert stored[1]["tokens_per_second"] == 42.5 and stored[1]["edited_at"] is None
    assert rows(client, "SELECT predicted_n, predicted_ms, prompt_ms FROM messages "
                "WHERE role = 'assistant'") == [(3 + 3, 60.0 + 60.0, 30.0)]   # both parts
    assert len(client.engine.store.search("rest", 5)) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_questions_sent_at_once_into_one_conversation_are_answered_in_turn(client, stub,
                                                                           stream):
    stub.token_delay = 0.01                  # each reply takes a while: they overlap
    cid = client.new_conversation()
    answers, go = {}, threading.Barrier(6)

    def ask(i):
        go.wait()
        if stream:
            answers[i] = read_events(client.stream(cid, f"question {i}")[0])[-1]
        else:
            answers[i] = client.chat(cid, f"question {i}")[2]
    askers = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in askers:
        t.start()
    for t in askers:
        t.join(30)
    shown = conversation(client, cid)["messages"]
    assert [m["role"] for m in shown] == ["user", "assistant"] * 6
    assert all(m["content"] == stub.reply for m in shown[1::2])
    order = [int(m["content"].split()[1]) for m in shown[0::2]]
    assert sorted(order) == list(range(6))
    for place, i in enumerate(order):                 # each answer is its own question's
        assert (answers[i]["user_message_id"], answers[i]["message_id"]) == (
            shown[2 * place]["id"], shown[2 * place + 1]["id"])
    for request in stub.requests[-6:]:                # each saw the exchanges before it, whole
        asked = [m["content"] for m in request["body"]["messages"] if m["role"] == "user"]
        assert asked == [f"question {i}" for i in order[:len(asked)]]
    assert rows(client, "SELECT count(*) FROM messages WHERE role = 'assistant'") == [(6,)]


@contextlib.contextmanager
def server_process(db, llamacpp_url):
    """A second llama-chat on the same file, in a process of its own: its Client.
    Killed (SIGKILL) or stopped at the end."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "llama_chat.py"), "--port",
                             str(port), "--db", db, "--llamacpp-url", llamacpp_url],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        proc.stdout.readline()
        client = Client(types.SimpleNamespace(server_address=("127.0.0.1", port), engine=None))
        client.proc = proc
        yield client
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(10)


def test_questions_from_two_processes_into_one_conversation_take_turns(client, stub):
    """Two servers on one file (a second llama-chat, as a user may start by
    mistake, or one per network interface) each with questions into the same
    conversation: the shown branch still reads Q A Q A, each answer after its
    own question, and each request to llama.cpp saw the exchanges before it."""
    stub.token_delay = 0.01
    cid = client.new_conversation()
    with server_process(client.engine.settings.db, stub.url) as other:
        answers, go = {}, threading.Barrier(6)

        def ask(i, to):
            go.wait()
            answers[i] = to.chat(cid, f"question {i}")[2]
        askers = [threading.Thread(target=ask, args=(i, (client, other)[i % 2]))
                  for i in range(6)]
        for t in askers:
            t.start()
        for t in askers:
            t.join(30)
    shown = conversation(client, cid)["messages"]
    assert [m["role"] for m in shown] == ["user", "assistant"] * 6
    order = [int(m["content"].split()[1]) for m in shown[0::2]]
    assert sorted(order) == list(range(6))
    for place, i in enumerate(order):
        assert (answers[i]["user_message_id"], answers[i]["message_id"]) == (
            shown[2 * place]["id"], shown[2 * place + 1]["id"])
    for request in stub.requests[-6:]:
        asked = [m["content"] for m in request["body"]["messages"] if m["role"] == "user"]
        assert asked == [f"question {i}" for i in order[:len(asked)]]


def test_continues_of_one_reply_sent_at_once_do_not_interleave(client, stub):
    cid = client.new_conversation()
    stub.reply, stub.finish_reason = "Start.", "length"
    first = client.chat(cid, "tell me")[2]
    stub.reply, stub.token_delay = " More words here.", 0.01
    go, done = threading.Barrier(3), []

    def more():
        go.wait()
        done.append(client.post("/api/chat", {"conversation_id": cid, "model": MODEL,
                                              "continue": first["message_id"]})[0])
    threads = [threading.Thread(target=more) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert done == [200] * 3
    reply = conversation(client, cid)["messages"][1]["content"]
    assert reply == "Start." + " More words here." * 3
    prefills = [r["body"]["messages"][-1]["content"] for r in stub.requests[-3:]]
    assert prefills == ["Start." + " More words here." * n for n in range(3)]   # in turn


def test_a_chat_that_says_where_it_goes_does_not_wait_its_turn(client, stub):
    cid = client.new_conversation()
    first = client.chat(cid, "first")[2]
    stub.reply = " ".join(f"w{i}" for i in range(20))
    stub.hold_at = 3                                          # each reply held part-way
    waiting = threading.Thread(target=lambda: read_events(client.stream(cid, "a slow one")[0]))
    waiting.start()
    wait_for(lambda: stub.open_streams == 1, 5, "the queued chat's reply begun")
    answered = []
    beside = threading.Thread(target=lambda: answered.append(client.post("/api/chat", {
        "conversation_id": cid, "model": MODEL, "message": "beside",
        "parent_id": first["message_id"]})))
    beside.start()
    wait_for(lambda: stub.open_streams == 2, 5, "the branched chat's reply made beside it")
    stub.go.set()
    beside.join(10)
    waiting.join(10)
    assert answered[0][0] == 200


def test_a_chat_refused_before_it_begins_ends_its_turn(client, stub):
    cid = client.new_conversation()
    status, _, body = client.post("/api/chat", {"conversation_id": cid, "model": MODEL,
                                                "continue": 99999})
    assert status == 404
    assert client.post("/api/chat", {"conversation_id": cid, "model": MODEL,
                                     "message": 5})[0] == 400
    assert client.chat(cid, "then this")[0] == 200       # not waiting behind them


def test_a_question_waiting_for_its_turn_goes_on_when_the_one_before_fails(client, stub):
    cid = client.new_conversation()
    stub.mode, stub.stall = "stall", 0.5
    first = threading.Thread(target=client.chat, args=(cid, "first"))
    first.start()
    time.sleep(0.2)
    stub.mode = "error500"
    first.join(30)
    stub.mode = "ok"
    status, _, body = client.chat(cid, "second")
    assert status == 200, body
    assert [m["content"] for m in conversation(client, cid)["messages"]][-2:] == [
        "second", stub.reply]


@pytest.mark.parametrize("old, pieces, new", [
    ("Once upon a time there", ["Once upon a time there was", " a"], " was a"),
    ("Once upon a time there", ["Once up", "on a time", " there", " was"], " was"),
    ("It ends with a space ", ["It ends with a space", " and more"], "and more"),
    ("Ends with a space ", ["Ends with a space", "\n\nNext"], "\n\nNext"),
    ("Old text", [" and new", " text"], " and new text"),        # a server with no echo
    ("Old text", ["Old"], ""),                                   # cut short mid-echo
    ("Old", ["Older"], "er"),
])
def test_a_continued_reply_loses_the_echo_of_its_old_text_and_nothing_else(old, pieces, new):
    text_filter = llama_chat.WithoutEcho(old)
    assert "".join(text_filter.take(p) for p in pieces) == new


def test_a_continue_cut_short_keeps_what_it_appended(client, stub):
    stub.echo_prefill = True
    cid = client.new_conversation()
    stub.reply = "Start."
    first = client.chat(cid, "go")[2]
    stub.mode, stub.reply = "cut", " one two three four five"
    events = read_events(client.stream(cid, None, **{"continue": first["message_id"]})[0])
    assert events[-1]["type"] == "error"
    reply = conversation(client, cid)["messages"][1]
    assert (reply["content"], reply["finish_reason"]) == ("Start. one two three ", "error")


def test_edit_in_place_keeps_the_children_and_the_index_follows(client, stub):
    cid = client.new_conversation()
    first = client.chat(cid, "original wording")[2]
    client.chat(cid, "second")
    status, _, body = client.put(f"/api/messages/{first['user_message_id']}",
                                 {"content": "revised phrasing 改写"})
    assert status == 200 and body["edited_at"].endswith("Z")
    messages = conversation(client, cid)["messages"]
    assert [m["content"] for m in messages][:2] == ["revised phrasing 改写", stub.reply]
    assert len(messages) == 4 and messages[0]["edited_at"] == body["edited_at"]
    assert messages[1]["edited_at"] is None
    store = client.engine.store
    assert not store.search("original", 5) and len(store.search("改写", 5)) == 1
    assert client.put("/api/messages/9999", {"content": "x"})[2]["resource"] == "message"
    assert client.put(f"/api/messages/{first['message_id']}", {"content": " "})[2]["field"] \
        == "content"
    assert client.put(f"/api/messages/{first['message_id']}", {"text": "x"})[2]["field"] \
        == "text"
    assert client.put("/api/messages/abc", {"content": "x"})[0] == 404


def test_delete_removes_what_is_below_and_moves_the_current_branch(client, stub):
    cid = client.new_conversation()
    q1 = client.chat(cid, "Q1")[2]
    q2 = client.chat(cid, "Q2")[2]
    other = regenerate(client, cid, q1["user_message_id"])[2]      # current: beside A1
    assert branch(client, cid) == ["Q1", stub.reply]
    put = client.put(f"/api/conversations/{cid}", {"current_message_id": q1["message_id"]})
    assert put[2]["current_message_id"] == q2["message_id"]      # down to the leaf
    assert branch(client, cid) == ["Q1", stub.reply, "Q2", stub.reply]
    status, _, body = client.delete(f"/api/messages/{q1['message_id']}")
    assert status == 200 and body["success"] is True
    assert body["deleted"] == [q1["message_id"], q2["user_message_id"], q2["message_id"]]
    # It went through the current branch: the newest leaf below its newest sibling.
    assert body["current_message_id"] == other["message_id"]
    assert conversation(client, cid)["conversation"]["current_message_id"] == other["message_id"]
    third = regenerate(client, cid, q1["user_message_id"])[2]
    client.put(f"/api/conversations/{cid}", {"current_message_id": other["message_id"]})
    body = client.delete(f"/api/messages/{third['message_id']}")[2]    # not on the branch
    assert body.get("current_message_id") == other["message_id"], body
    body = client.delete(f"/api/messages/{other['message_id']}")[2]    # no sibling left
    assert body.get("current_message_id") == q1["user_message_id"], body
    body = client.delete(f"/api/messages/{q1['user_message_id']}")[2]
    assert body.get("current_message_id", "missing") is None, body
    assert branch(client, cid) == []
    assert rows(client, "SELECT count(*) FROM messages") == [(0,)]
    assert client.delete(f"/api/messages/{q1['user_message_id']}")[2]["resource"] == "message"
    assert client.chat(cid, "again")[0] == 200 and len(branch(client, cid)) == 2


def test_a_deep_branch_deletes_in_one_statement(tmp_path):
    store = llama_chat.Store(str(tmp_path / "deep.db"))
    cid = store.create_conversation("long", MODEL)
    ids = [store.add_message(cid, "user", f"message {i}") for i in range(2500)]
    assert store.tree.delete(ids[10])[1] == ids[10:]     # a cascade would stop at 1,000
    assert store.delete_conversation(cid)
    assert rows_of(store, "SELECT count(*) FROM messages") == [(0,)]


def test_branch_switch_goes_down_the_newest_children(client, stub):
    cid = client.new_conversation("switch")
    q1 = client.chat(cid, "Q1")[2]
    a = client.chat(cid, "QA")[2]
    b = client.chat(cid, "QB", parent_id=q1["message_id"])[2]
    assert branch(client, cid)[2] == "QB"
    status, _, body = client.put(f"/api/conversations/{cid}",
                                 {"current_message_id": a["user_message_id"]})
    assert (status, body["current_message_id"]) == (200, a["message_id"])
    assert branch(client, cid)[2] == "QA"
    client.put(f"/api/conversations/{cid}", {"current_message_id": q1["user_message_id"]})
    assert branch(client, cid)[2] == "QB"                 # the newest child at each step
    other = client.chat(client.new_conversation(), "x")[2]
    status, _, body = client.put(f"/api/conversations/{cid}", {
        "title": "not applied", "current_message_id": other["message_id"]})
    assert (status, body["resource"]) == (404, "message")
    assert conversation(client, cid)["conversation"]["title"] == "switch"
    status, _, body = client.put(f"/api/conversations/{cid}", {
        "title": "both", "current_message_id": a["message_id"]})
    assert body == {"success": True, "title": "both", "current_message_id": a["message_id"]}
    assert client.put(f"/api/conversations/{cid}", {})[0] == 400


def test_a_fork_of_a_title_at_the_limit_stays_within_it(client, stub):
    cid = client.new_conversation("t" * 500)
    q = client.chat(cid, "hi")[2]
    fork = client.post(f"/api/conversations/{cid}/fork", {"message_id": q["message_id"]})[2]
    title = client.get(f"/api/conversations/{fork['conversation_id']}")[2]["conversation"]["title"]
    assert len(title) == 500 and title.endswith("t (fork)")


def test_fork_copies_the_branch_into_a_new_conversation(client, stub):
    cid = client.new_conversation("source", model="some-model.gguf")
    q1 = client.chat(cid, "Q1 unusualword")[2]
    client.chat(cid, "Q2")
    status, _, body = client.post(f"/api/conversations/{cid}/fork",
                                  {"message_id": q1["message_id"]})
    assert status == 201
    fork = conversation(client, body["conversation_id"])
    assert fork["conversation"]["title"] == "source (fork)" and fork["conversation"]["model"] == MODEL
    copied = fork["messages"]
    assert [m["content"] for m in copied] == ["Q1 unusualword", stub.reply]
    assert [m["role"] for m in copied] == ["user", "assistant"]
    assert copied[0]["id"] > q1["message_id"] and copied[1]["parent_id"] == copied[0]["id"]
    assert copied[1]["estimated_tokens"] == q1["estimated_tokens"]
    assert fork["conversation"]["current_message_id"] == copied[1]["id"]
    assert len(branch(client, cid)) == 4                  # the source as it was
    assert len(client.engine.store.search("unusualword", 5)) == 2
    named = client.post(f"/api/conversations/{cid}/fork",
                        {"message_id": q1["user_message_id"], "title": "just the question"})[2]
    assert branch(client, named["conversation_id"]) == ["Q1 unusualword"]
    other = client.chat(client.new_conversation(), "x")[2]
    status, _, body = client.post(f"/api/conversations/{cid}/fork",
                                  {"message_id": other["message_id"]})
    assert (status, body["resource"]) == (404, "message")
    assert client.post("/api/conversations/999/fork", {"message_id": 1})[2]["resource"] == \
        "conversation"


@pytest.mark.parametrize("stream", [False, True])
def test_deleting_the_question_ends_its_reply(client, stub, stream):
    cid = client.new_conversation()
    kept = client.chat(cid, "kept")[2]
    stub.reply = " ".join(f"w{i}" for i in range(200))
    stub.token_delay, stub.stall = (0.02, 0) if stream else (0, 3)
    answer = {}

    def chat():
        if stream:
            answer["events"] = read_events(client.stream(cid, "doomed")[0])
        else:
            answer["status"], _, answer["body"] = client.chat(cid, "doomed")

    worker = threading.Thread(target=chat)
    worker.start()
    deadline = time.monotonic() + 5
    while len(rows(client, "SELECT id FROM messages")) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    assert rows(client, "SELECT role, generating IS NOT NULL FROM messages WHERE id > ?",
                kept["message_id"]) == [("user", 0), ("assistant", 1)]   # its row, being made
    doomed = rows(client, "SELECT max(id) FROM messages WHERE role = 'user'")[0][0]
    assert client.delete(f"/api/messages/{doomed}")[0] == 200
    worker.join(10)
    if stream:
        last = answer["events"][-1]
        assert (last["type"], last["code"], last["resource"]) == ("error", "NOT_FOUND", "message")
    else:
        assert (answer["status"], answer["body"]["resource"]) == (404, "message")
    assert [r[0] for r in rows(client, "SELECT id FROM messages ORDER BY id")] == [
        kept["user_message_id"], kept["message_id"]]


def test_two_clients_regenerating_at_once_get_two_siblings(client, stub):
    cid = client.new_conversation()
    first = client.chat(cid, "question")[2]
    stub.stall = 0.3
    answers = []
    workers = [threading.Thread(target=lambda: answers.append(
        regenerate(client, cid, first["user_message_id"]))) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(10)
    assert [a[0] for a in answers] == [200, 200]
    every = conversation(client, cid, everything=True)["messages"]
    assert every[-1]["sibling_ids"] == [first["message_id"]] + sorted(
        a[2]["message_id"] for a in answers)


###############################################################################
# Conversations
###############################################################################

def test_create_conversation_answers_201_with_its_id(client):
    status, _, body = client.post("/api/conversations", {"title": "New Project Discussion",
                                                         "model": MODEL})
    assert status == 201
    assert body == {"success": True, "conversation_id": body["conversation_id"]}
    assert isinstance(body["conversation_id"], int)


def test_list_conversations_newest_activity_first(client):
    a = client.new_conversation("A")
    b = client.new_conversation("B")
    c = client.new_conversation("C")
    assert [x["id"] for x in client.get("/api/conversations")[2]["conversations"]] == [c, b, a]
    client.chat(a)                                             # a message moves A up
    client.request("PUT", f"/api/conversations/{b}", {"title": "B2"})   # a rename moves B up
    status, _, body = client.get("/api/conversations")
    assert status == 200
    assert [x["id"] for x in body["conversations"]] == [b, a, c]
    first = body["conversations"][0]
    assert set(first) == {"id", "title", "model", "created_at", "updated_at", "system_prompt",
                          "options", "pinned", "source", "project_id"}
    assert ISO.match(first["created_at"]) and ISO.match(first["updated_at"])


def test_list_conversations_pages_with_limit_and_offset(client):
    ids = [client.new_conversation(f"c{i}") for i in range(5)][::-1]
    assert [c["id"] for c in client.get("/api/conversations?limit=2")[2]["conversations"]] \
        == ids[:2]
    assert [c["id"] for c in client.get("/api/conversations?limit=2&offset=2")[2][
        "conversations"]] == ids[2:4]
    assert [c["id"] for c in client.get("/api/conversations?offset=4")[2]["conversations"]] \
        == ids[4:]


@pytest.mark.parametrize("query, field", [
    ("limit=ten", "limit"), ("limit=-1", "limit"), ("offset=x", "offset"), ("offset=-5", "offset"),
])
def test_bad_paging_parameters_are_validation_errors(client, query, field):
    status, _, body = client.get("/api/conversations?" + query)
    assert status == 400
    assert body["code"] == "VALIDATION_ERROR" and body["field"] == field
    assert body["success"] is False and body["error"]


def test_llamacpp_connections_are_kept_and_a_closed_one_is_replaced(client, stub, monkeypatch):
    used, send = [], llama_chat.Upstream._send
    monkeypatch.setattr(llama_chat.Upstream, "_send",
                        lambda self, conn, *a, **k: used.append(conn) or send(self, conn, *a, **k))
    for _ in range(3):                             # whole answers: the model list
        assert client.get("/api/models")[0] == 200
    assert len(stub.connections) == 1              # one connection, three answers
    stub.connections[0].shutdown(socket.SHUT_RDWR)  # as llama-server's keep-alive timeout does
    time.sleep(0.05)
    kept, before = client.engine.upstream._idle[0], len(used)
    status, _, body = client.get("/api/models")
    assert status == 200 and body["models"] == [MODEL]
    assert len(stub.connections) == 2 and kept.sock is None
    assert kept not in used[before:]               # seen closed before use, not tried
    cid = client.new_conversation("pool")
    assert client.chat(cid, "hi")[0] == 200        # a reply: a connection of its own
    made = len(stub.connections)
    assert client.get("/api/models")[0] == 200 and len(stub.connections) == made   # kept


def test_get_conversation_with_messages_and_stats(client):
    cid = client.new_conversation("Python Development Help")
    client.chat(cid, "How do I create a virtual environment in Python?")
    status, _, body = client.get(f"/api/conversations/{cid}")
    assert status == 200
    assert body["conversation"]["title"] == "Python Development Help"
    user, assistant = body["messages"]
    assert user["role"] == "user" and user["response_time_ms"] is None
    assert user["estimated_tokens"] == 12
    assert assistant["role"] == "assistant" and assistant["model"] == MODEL
    assert assistant["content"] == Stub().reply and assistant["finish_reason"] == "stop"
    assert ISO.match(assistant["timestamp"])
    assert body["stats"] == {"total_messages": 2, "assistant_messages": 1,
                             "avg_response_time": float(assistant["response_time_ms"]),
                             "total_tokens": 12 + assistant["estimated_tokens"]}


def test_pages_built_by_sqlite_match_the_python_encoding(client):
    """Lists and messages are JSON made by SQLite; without its JSON functions,
    by Python. Both give the same values, whatever the text holds."""
    store = client.engine.store
    odd = 'quotes " and \\ backslash, tab\t, nul-ish \x01, é, 中文, emoji 😀, <b>&amp;</b>'
    cid = store.create_conversation(odd, MODEL)
    store.add_message(cid, "user", odd, estimated_tokens=3)
    store.add_message(cid, "assistant", odd + "\n", MODEL, reasoning="why " + odd,
                      response_time_ms=1234, estimated_tokens=7, prompt_tokens=5,
                      tokens_per_second=42.7, finish_reason="stop")
    pages = []
    for sql_json in (True, False):
        store.db.sql_json = sql_json
        pages.append((client.get("/api/conversations?limit=5")[2],
                      client.get(f"/api/conversations/{cid}")[2]))
    store.db.sql_json = True
    assert pages[0] == pages[1]
    listed, conversation = pages[0]
    assert listed["conversations"][0]["title"] == odd
    user, reply = conversation["messages"]
    assert (user["content"], reply["content"], reply["reasoning"]) == (odd, odd + "\n",
                                                                       "why " + odd)
    assert reply["tokens_per_second"] == 42.7 and user["reasoning"] is None


def test_stats_summarize_by_role(client):
    store = client.engine.store
    cid = store.create_conversation("numbers", MODEL)
    store.add_message(cid, "user", "1234", estimated_tokens=1)
    store.add_message(cid, "assistant", "123456", MODEL, response_time_ms=1000, estimated_tokens=10,
                      finish_reason="stop")
    store.add_message(cid, "user", "12", estimated_tokens=1)
    store.add_message(cid, "assistant", "12", MODEL, response_time_ms=2001, estimated_tokens=20,
                      finish_reason="stop")
    store.add_message(cid, "assistant", "", MODEL, finish_reason="error")
    status, _, body = client.get(f"/api/stats/{cid}")
    summary = {"total_messages": 5, "assistant_messages": 3, "avg_response_time": 1500.5,
               "total_tokens": 32}
    assert (status, body) == (200, {"success": True, "summary": summary, "by_role": [
        {"role": "user", "count": 2, "avg_length": 3.0, "total_tokens": 2,
         "avg_response_time": None},
        {"role": "assistant", "count": 3, "avg_length": 2.7, "total_tokens": 30,
         "avg_response_time": 1500.5}]})
    assert client.get(f"/api/conversations/{cid}")[2]["stats"] == summary
    empty = store.create_conversation("empty", MODEL)
    assert client.get(f"/api/stats/{empty}")[2]["summary"] == {
        "total_messages": 0, "assistant_messages": 0, "avg_response_time": None,
        "total_tokens": 0} == client.get(f"/api/conversations/{empty}")[2]["stats"]
    assert client.get(f"/api/conversations/{empty}")[2]["messages"] == []


def test_rename_conversation(client):
    cid = client.new_conversation("Old")
    status, _, body = client.request("PUT", f"/api/conversations/{cid}",
                                     {"title": "Updated Conversation Title"})
    assert (status, body) == (200, {"success": True, "title": "Updated Conversation Title"})
    assert client.get(f"/api/conversations/{cid}")[2]["conversation"]["title"] \
        == "Updated Conversation Title"


def test_delete_conversation_removes_it_and_its_messages(client):
    cid = client.new_conversation()
    client.chat(cid)
    status, _, body = client.request("DELETE", f"/api/conversations/{cid}")
    assert (status, body) == (200, {"success": True})
    assert client.get(f"/api/conversations/{cid}")[0] == 404
    assert rows(client, "SELECT count(*) FROM messages")[0][0] == 0
    assert client.get("/api/search?q=machine")[2]["count"] == 0


@pytest.mark.parametrize("method, path", [
    ("GET", "/api/conversations/999"), ("PUT", "/api/conversations/999"),
    ("DELETE", "/api/conversations/999"), ("GET", "/api/stats/999"),
    ("GET", "/api/conversations/abc"), ("GET", "/api/conversations/1%00"),
    ("GET", "/api/conversations/99999999999999999999999"),
])
def test_unknown_conversation_is_not_found(client, method, path):
    body = {"title": "x"} if method == "PUT" else None
    status, _, answer = client.request(method, path, body)
    assert status == 404
    assert answer["code"] == "NOT_FOUND" and answer["resource"] == "conversation"
    assert answer["success"] is False and str(answer["id"]) in path


###############################################################################
# The ledger
###############################################################################

@pytest.mark.parametrize("stream", [False, True])
def test_each_reply_keeps_llamacpp_s_timings_and_its_first_token_time(client, stub, stream):
    stub.token_delay = 0.01
    cid = client.new_conversation()
    if stream:
        read_events(client.stream(cid)[0])
    else:
        client.chat(cid)
    reply = conversation(client, cid)["messages"][-1]
    tokens = len(stub.tokens())
    assert (reply["prompt_n"], reply["prompt_ms"], reply["cache_n"], reply["predicted_n"],
            reply["predicted_ms"]) == (21, 30.0, 3, tokens, tokens * 20.0)
    assert 0 < reply["ttft_ms"] < reply["response_time_ms"]    # llama.cpp streams it either way


def test_the_ledger_aggregates_as_computed_by_hand(client):
    store = client.engine.store
    cid = client.new_conversation()
    replies = [  # model, day, prompt tokens, tokens, predicted n / ms, prompt n / ms, ttft,
        # tokens found in llama.cpp's cache
        ("a", "2026-11-30", 10, 100, 100, 2000, 50, 100, 100.0, 150),
        ("a", "2026-11-30", 20, 60, 60, 1000, 40, 200, 300.0, 0),
        ("a", "2026-12-01", 30, 30, 30, 1000, None, None, 200.0, 9),  # no prompt_n: not counted
        ("b", "2026-12-01", 5, 8, None, None, None, None, None, None)]
    for model, day, pt, ct, pn, pm, qn, qm, ttft, cached in replies:
        q = store.add_message(cid, "user", "q")
        r = store.add_message(cid, "assistant", "r", model, parent=q, prompt_tokens=pt,
                              estimated_tokens=ct, predicted_n=pn, predicted_ms=pm,
                              prompt_n=qn, prompt_ms=qm, ttft_ms=ttft, tokens_per_second=12.0,
                              cache_n=cached)
        conn = sqlite3.connect(client.engine.settings.db)
        with conn:
            conn.execute("UPDATE messages SET timestamp = ? WHERE id IN (?, ?)",
                         (day + "T12:00:00.000Z", q, r))
        conn.close()
    status, _, body = client.get("/api/ledger?group=model")
    assert status == 200
    a, b = body["groups"]
    assert a == {"model": "a", "replies": 3, "prompt_tokens": 60, "completion_tokens": 190,
                 "tokens_per_second": {"mean": 46.7, "p50": 50.0},   # 50, 60, 30 tok/s
                 "prompt_tokens_per_second": {"mean": 350.0, "p50": 200.0},   # 500, 200
                 "ttft_ms": {"p50": 200.0, "p95": 300.0, "histogram": [   # bins 28% wide
                     {"under": 115.6, "replies": 1}, {"under": 244.7, "replies": 1},
                     {"under": 314.2, "replies": 1}]},
                 "prompt_cache": {"replies": 2, "cached_tokens": 150, "read_tokens": 90,
                                  "share": 0.625}}
    assert b["prompt_cache"] == {"replies": 0, "cached_tokens": 0, "read_tokens": 0,
                                 "share": None}
    assert b["tokens_per_second"] == {"mean": 12.0, "p50": 12.0}      # the stored figure
    assert b["ttft_ms"] == {"p50": None, "p95": None, "histogram": []}
    days = client.get("/api/ledger?group=model,day")[2]["groups"]
    assert [(g["model"], g["day"], g["replies"]) for g in days] == [
        ("a", "2026-11-30", 2), ("a", "2026-12-01", 1), ("b", "2026-12-01", 1)]
    assert [g["prompt_cache"]["share"] for g in days] == [0.625, None, None]
    one_day = client.get("/api/ledger?group=day&since=2026-12-01&until=2026-12-01")[2]
    assert [(g["day"], g["replies"]) for g in one_day["groups"]] == [("2026-12-01", 2)]
    assert client.get("/api/ledger?group=week")[0] == 400
    assert client.get("/api/ledger?since=yesterday")[2]["field"] == "since"
    for wrong in ("2026-02-30", "2026-12-02T10:00:00Z", "２０２６-12-01"):
        status, _, body = client.get("/api/ledger?until=" + urllib.parse.quote(wrong))
        assert (status, body["code"], body["field"]) == (400, "VALIDATION_ERROR", "until"), wrong


def exact_ledger(conn, group):
    """The ledger computed from every reply in Python: exact percentiles."""
    found = {}
    for model, day, pt, ct, tps, pn, pm, qn, qm, ttft in conn.execute(
            "SELECT coalesce(model, ''), substr(timestamp, 1, 10), prompt_tokens, "
            "estimated_tokens, tokens_per_second, predicted_n, predicted_ms, prompt_n, "
            "prompt_ms, ttft_ms FROM messages WHERE role = 'assistant'"):
        key = tuple({"model": model, "day": day}[g] for g in group)
        g = found.setdefault(key, {"replies": 0, "pt": 0, "ct": 0, "tps": [], "pps": [],
                                   "ttft": []})
        g["replies"] += 1
        g["pt"] += pt or 0
        g["ct"] += ct or 0
        def per_second(n, ms):
            return n * 1000.0 / ms if n is not None else None
        speed = per_second(pn, pm) if pm else tps        # timings where llama.cpp sent them
        for metric, value in (("tps", speed), ("pps", per_second(qn, qm) if qm else None),
                              ("ttft", ttft)):
            if value is not None:
                g[metric].append(value)

    def rank(values, p):
        return sorted(values)[max(1, (len(values) * p + 99) // 100) - 1] if values else None
    return {key: {"replies": g["replies"], "prompt_tokens": g["pt"], "completion_tokens": g["ct"],
                  "tps": (sum(g["tps"]) / len(g["tps"]) if g["tps"] else None,
                          rank(g["tps"], 50)),
                  "pps": (sum(g["pps"]) / len(g["pps"]) if g["pps"] else None,
                          rank(g["pps"], 50)),
                  "ttft": (rank(g["ttft"], 50), rank(g["ttft"], 95))}
            for key, g in found.items()}


def assert_ledger_as_exact(db, conn, group):
    """The kept ledger against the one computed here, to its rounding."""
    kept = {tuple(g[n] for n in group): g for g in llama_chat.ledger(db, group, None, None)}
    exact = exact_ledger(conn, group)
    assert sorted(kept) == sorted(exact)

    within = 0.032 if group == ("model",) else 0    # of all days: from 3% buckets

    def near(got, want):
        return got is None if want is None else abs(got - want) <= within * want + 0.05
    for key, want in exact.items():
        got = kept[key]
        assert (got["replies"], got["prompt_tokens"], got["completion_tokens"]) == (
            want["replies"], want["prompt_tokens"], want["completion_tokens"])
        for metric, field in (("tps", "tokens_per_second"), ("pps", "prompt_tokens_per_second")):
            assert near(got[field]["mean"], want[metric][0]), (key, field)
            assert near(got[field]["p50"], want[metric][1]), (key, field)
        assert near(got["ttft_ms"]["p50"], want["ttft"][0]), key
        assert near(got["ttft_ms"]["p95"], want["ttft"][1]), key


def test_the_ledger_stays_in_step_through_adds_edits_continues_and_deletes(client):
    """SQLite keeps the ledger's tables as replies come, change and go: after
    each kind of write they agree with the replies themselves."""
    store = client.engine.store
    rng = random.Random(17)
    conversations = [client.new_conversation() for _ in range(4)]
    replies = []
    for i in range(300):
        cid = rng.choice(conversations)
        q = store.add_message(cid, "user", "q")
        timed = rng.random() < 0.8
        replies.append(store.add_message(
            cid, "assistant", "r", rng.choice(["a", "b", None]), parent=q,
            prompt_tokens=rng.randint(1, 900), estimated_tokens=rng.randint(1, 400),
            tokens_per_second=rng.choice([None, round(rng.uniform(2, 40), 2)]),
            predicted_n=rng.randint(1, 400) if timed else None,
            predicted_ms=rng.uniform(100, 9000) if timed else None,
            prompt_n=rng.randint(1, 900) if timed else None,
            prompt_ms=rng.choice([0, rng.uniform(5, 900)]) if timed else None,
            ttft_ms=rng.choice([None, rng.uniform(20, 3000)])))
    conn = sqlite3.connect(client.engine.settings.db)   # no function of the app's: any program
    with conn:
        for day in ("2026-11-29", "2026-11-30", "2026-12-01"):
            conn.execute("UPDATE messages SET timestamp = ? WHERE id % 3 = ?",
                         (day + "T08:00:00.000Z", int(day[-1]) % 3))
        conn.execute("UPDATE messages SET ttft_ms = ttft_ms * 2, model = 'c' WHERE id % 7 = 0")
    for group in (("model",), ("day",), ("model", "day")):
        assert_ledger_as_exact(store.db, conn, group)
    kept = conn.execute("SELECT grouping, model, day FROM ledger_ranks").fetchall()
    assert len(kept) == len(set(kept)) > 3                 # the reads above kept their ranks
    store.finish_reply(replies[5], "more", None, predicted_n=999, predicted_ms=1.0, ttft_ms=0.5)
    store.delete_conversation(conversations[0])
    conn.create_function("search_form", 1, llama_chat.search_form)   # the index needs it
    with conn:
        conn.execute("DELETE FROM messages WHERE id IN (SELECT id FROM messages "
                     "WHERE role = 'assistant' ORDER BY id DESC LIMIT 20)")
    for group in (("model",), ("model", "day")):
        assert_ledger_as_exact(store.db, conn, group)
    with conn:
        conn.execute("DELETE FROM messages")
    assert llama_chat.ledger(store.db, ("model",), None, None) == []
    assert conn.execute("SELECT (SELECT count(*) FROM ledger_days) + (SELECT count(*) FROM "
                        "ledger_ranks) + (SELECT count(*) FROM ledger_buckets)").fetchone() == (0,)
    conn.close()


def test_the_ledger_answers_but_keeps_no_ranks_read_while_a_reply_came(client, monkeypatch):
    """The ledger ranks in a read transaction; what it ranked is kept only if
    nothing was written meanwhile, so that no reply is left out for good."""
    store = client.engine.store
    cid = client.new_conversation()
    store.add_message(cid, "assistant", "r", "m", ttft_ms=100.0)
    ranked = llama_chat.ledger_ranked

    def a_reply_comes_meanwhile(*args):
        found = ranked(*args)
        writer = threading.Thread(target=lambda: store.add_message(
            cid, "assistant", "r", "m", ttft_ms=900.0))
        writer.start()
        writer.join()
        return found
    monkeypatch.setattr(llama_chat, "ledger_ranked", a_reply_comes_meanwhile)
    first = llama_chat.ledger(store.db, ("model", "day"), None, None)
    assert (first[0]["replies"], first[0]["ttft_ms"]["p95"]) == (1, 100.0)   # its snapshot
    monkeypatch.setattr(llama_chat, "ledger_ranked", ranked)
    then = llama_chat.ledger(store.db, ("model", "day"), None, None)
    assert (then[0]["replies"], then[0]["ttft_ms"]["p95"]) == (2, 900.0)
    assert store.db.conn().execute("SELECT grouping, ttft_p95 FROM ledger_ranks").fetchall() == [
        ("model,day", 900.0)]


def test_a_schema_6_database_gains_the_kept_ledger_as_its_replies_say(tmp_path):
    path = str(tmp_path / "v6.db")
    rng = random.Random(6)

    def fill(c):
        c.execute("INSERT INTO conversations (title, model) VALUES ('kept', 'm')")
        for i in range(200):
            c.execute("INSERT INTO messages (conversation_id, role, content, model, timestamp, "
                      "prompt_tokens, estimated_tokens, tokens_per_second, predicted_n, "
                      "predicted_ms, ttft_ms) VALUES (1, ?, 'x', ?, ?, ?, ?, ?, ?, ?, ?)",
                      (("user", "assistant")[i % 2], rng.choice(["m", "n"]),
                       f"2026-11-{1 + i % 5:02d}T10:00:00Z", i, i * 2, rng.uniform(1, 50),
                       rng.choice([None, 50]), rng.choice([None, 1000.0]),
                       rng.choice([None, rng.uniform(10, 900)])))
    store = migrated(path, fill, 6)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone() == (llama_chat.SCHEMA_VERSION,)
    for group in (("model",), ("day",), ("model", "day")):
        assert_ledger_as_exact(store.db, conn, group)
    conn.close()
    store.close()


def test_a_schema_5_database_gains_the_ledger_after_a_backup(tmp_path):
    path = str(tmp_path / "v5.db")

    def fill(c):
        c.execute("INSERT INTO conversations (title, model) VALUES ('kept', 'm')")
        c.execute("INSERT INTO messages (conversation_id, role, content) VALUES (1, 'user', 'q')")
        c.execute("INSERT INTO messages (conversation_id, parent_id, role, content, model, "
                  "tokens_per_second) VALUES (1, 1, 'assistant', 'a', 'm', 9.5)")
    store = migrated(path, fill, 5)
    groups = llama_chat.ledger(store.db, ("model",), None, None)
    assert groups[0]["replies"] == 1 and groups[0]["tokens_per_second"]["p50"] == 9.5
    assert json.loads(store.messages(1)[0])[1]["ttft_ms"] is None
    store.close()


def test_a_schema_7_database_gains_an_id_for_each_conversation_after_a_backup(tmp_path):
    path = str(tmp_path / "v7.db")

    def fill(c):
        for title in ("one", "two", "three"):
            c.execute("INSERT INTO conversations (title, model) VALUES (?, 'm')", (title,))
    store = migrated(path, fill, 7)
    ids = [r[0] for r in store.db.conn().execute("SELECT uuid FROM conversations ORDER BY id")]
    assert len(set(ids)) == 3 and all(llama_chat.UUID_TEXT.match(i) and i[14] == "4"
                                      and i[19] in "89ab" for i in ids), ids
    made = store.create_conversation("four", "m")
    given = store.db.conn().execute("SELECT uuid FROM conversations WHERE id = ?",
                                    (made,)).fetchone()[0]
    assert llama_chat.UUID_TEXT.match(given) and given not in ids
    with pytest.raises(sqlite3.IntegrityError):
        with store.db.write() as c:
            c.execute("UPDATE conversations SET uuid = ? WHERE id = ?", (ids[0], made))
    store.close()


###############################################################################
# Models and health
###############################################################################

def test_models_single_model_server_answers_the_file_name(client):
    status, _, body = client.get("/api/models")
    assert status == 200
    assert body["models"] == [MODEL] and body["count"] == 1
    assert body["llamacpp_url"] == client.engine.settings.llamacpp_url


@pytest.mark.parametrize("args, n_ctx", [
    (["llama-server", "-m", "a.gguf", "-c", "8192"], 8192),
    (["llama-server", "--ctx-size", "4096", "-m", "a.gguf"], 4096),
    (["llama-server", "-m", "a.gguf"], None), (["-c"], None), (["-c", "0"], None),
    (["-c", "lots"], None), ("-c 8192", None), (None, None), (["-c", 8192], None)])
def test_a_router_model_s_context_is_read_from_its_arguments(args, n_ctx):
    assert llama_chat.launch_context(args) == n_ctx


def test_router_mode_titles_name_the_model(tmp_path, stub, launch):
    stub.router = True
    c = Client(launch(stub.url, auto_title="model"))
    cid = c.post("/api/conversations", {"model": "gemma-3-270m"})[2]["conversation_id"]
    stub.reply = "Lava and rock"
    assert c.chat(cid, "Tell me about volcanoes", model="gemma-3-270m")[0] == 200
    wait_for(lambda: c.get(f"/api/conversations/{cid}")[2]["conversation"]["title"] ==
             "Lava and rock", 5, "the model's title")
    asked = [r["body"] for r in stub.requests
             if r["body"]["messages"][0]["content"] == llama_chat.TITLE_PROMPT]
    assert asked and asked[0]["model"] == "gemma-3-270m"


def test_router_mode_never_loads_a_model_to_read_its_settings(client, stub):
    stub.router = True
    stub.router_status = "loaded"
    assert client.get("/api/models")[0] == 200            # lists qwen3-0.6b: unloaded, -c 8192
    cid = client.new_conversation(model="qwen3-0.6b")
    prompt = client.get(f"/api/conversations/{cid}/prompt?message=hi")[2]
    assert prompt["n_ctx"] == 8192                         # from the arguments it starts with
    client.get("/api/models/defaults?model=qwen3-0.6b")
    assert client.chat(cid, "hi", model="gemma-3-270m")[0] == 200
    models_asked = [p for p in stub.props_asked if "model=" in p]
    assert models_asked and all("autoload=false" in p for p in models_asked), stub.props_asked


def test_a_chat_with_a_model_llama_cpp_does_not_know_leaves_the_conversation_s(client, stub):
    stub.router = True
    cid = client.new_conversation(model="gemma-3-270m")
    status, _, body = client.chat(cid, "hi", model="no-such-model")
    assert status == 502 and "not found" in body["details"]
    assert client.get(f"/api/conversations/{cid}")[2]["conversation"]["model"] == "gemma-3-270m"
    assert client.chat(cid, "hi again", model="qwen3-0.6b")[0] == 200
    assert client.get(f"/api/conversations/{cid}")[2]["conversation"]["model"] == "qwen3-0.6b"


@contextlib.contextmanager
def stub_server(port=0, **fields):
    """A stub llama.cpp of its own (beside the `stub` fixture's), on `port`
    (0: any): its Stub, its URL in .url. Stopped when the block ends."""
    state = Stub()
    for name, value in fields.items():
        setattr(state, name, value)
    server = StubServer(("127.0.0.1", port), type("Handler", (StubHandler,), {"stub": state}))
    serve(server)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        stop(server)
        for conn in state.connections:           # kept ones too: the machine is gone
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def black_hole():
    """An address that takes connections and never answers (a machine that
    drops packets, as far as a client can tell): its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def test_two_connections_merge_their_models_and_each_chat_goes_to_its_model_s(stub, launch):
    stub.api_key = "key-of-default"
    with stub_server(router=True, api_key="key-of-gpu") as gpu, stub_server() as twin:
        c = Client(launch(stub.url, llamacpp_api_key="key-of-default", auto_title="model",
                          connections=({"name": "gpu", "url": gpu.url, "api_key": "key-of-gpu"},
                                       {"name": "twin", "url": twin.url})))   # MODEL again
        body = c.get("/api/models")[2]
        assert [(m["name"], m["connection"], m["available"]) for m in body["details"]] == [
            (MODEL, "default", True), ("gemma-3-270m", "gpu", True),
            ("qwen3-0.6b", "gpu", True)]
        assert body["models"] == [MODEL, "gemma-3-270m", "qwen3-0.6b"]
        assert [(x["name"], x["state"]) for x in body["connections"]] == [
            ("default", "ok"), ("gpu", "ok"), ("twin", "ok")]     # MODEL listed once: the first
        gpu.reply = "From the GPU."
        cid = c.post("/api/conversations", {"model": "gemma-3-270m"})[2]["conversation_id"]
        answer = c.chat(cid, "Which machine are you?", model="gemma-3-270m")[2]
        assert answer["response"] == "From the GPU."
        wait_for(lambda: any(r["body"].get("messages", [{}])[0].get("content") ==
                             llama_chat.TITLE_PROMPT for r in gpu.requests), 5, "the title")
        assert not [r for r in stub.requests if r["path"] == "/v1/chat/completions"]
        assert c.chat(cid, "And now?", model=MODEL)[2]["response"] == stub.reply   # the Pi
        assert not [r for r in twin.requests if r["path"] == "/v1/chat/completions"]
        assert c.get(f"/api/conversations/{cid}/prompt?model=qwen3-0.6b")[2][
            "connection"] == "gpu"
        status, _, relayed = c.post("/v1/chat/completions", {
            "model": "qwen3-0.6b", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200 and relayed["choices"][0]["message"]["content"] == "From the GPU."
        listed = c.get("/v1/models")[2]
        assert [(m["id"], m["owned_by"]) for m in listed["data"]] == [
            (MODEL, "default"), ("gemma-3-270m", "gpu"), ("qwen3-0.6b", "gpu")]
        # each key to its own server only
        assert {r["headers"].get("Authorization") for r in gpu.requests} == {"Bearer key-of-gpu"}
        assert {r["headers"].get("Authorization") for r in stub.requests} == {
            "Bearer key-of-default"}


def test_a_connection_down_leaves_the_others_working_and_comes_back(stub, launch, monkeypatch):
    monkeypatch.setattr(llama_chat, "MODEL_LIST_WAIT", 0.5)    # the first list waits this long
    with black_hole() as hole, stub_server(router=True) as gpu:
        port = int(gpu.url.rsplit(":", 1)[1])
        c = Client(launch(stub.url, connections=(
            {"name": "gpu", "url": gpu.url}, {"name": "far away", "url": hole}),
            timeouts={"llamacpp_timeout": 4, "llamacpp_connect_timeout": 2}))   # then down
        first = c.get("/api/models")[2]
        assert [m["connection"] for m in first["details"]] == ["default", "gpu", "gpu"]
        monkeypatch.setattr(llama_chat, "MODEL_LIST_WAIT", 30.0)   # a wait on the hole would show
        started = time.monotonic()
        assert c.get("/api/models")[2]["details"] == first["details"]
        assert time.monotonic() - started < 10           # the hole is not waited for again
        wait_for(lambda: {x["name"]: x["state"] for x in c.get("/api/health")[2][
            "connections"]}["far away"] == "down", 15, "the hole seen down")  # the read timed out
        started = time.monotonic()
        assert c.get("/api/models")[2]["details"] == first["details"]    # asked again, not
        assert time.monotonic() - started < 3          # waited for (4 s): it timed out
        states = {x["name"]: x["state"] for x in c.get("/api/health")[2]["connections"]}
        assert states["default"] == states["gpu"] == "ok"
        assert states["far away"] in ("unknown", "down")     # not answered (yet, or in time)
        cid = c.new_conversation(model="gemma-3-270m")
        assert c.chat(cid, "hi", model="gemma-3-270m")[0] == 200
        stop_gpu = gpu                                     # the GPU machine goes away
    states = {x["name"]: x["state"] for x in c.get("/api/models")[2]["connections"]}
    assert states["gpu"] == "down" and states["default"] == "ok"
    shown = {m["name"]: m["available"] for m in c.get("/api/models")[2]["details"]}
    assert shown == {MODEL: True, "gemma-3-270m": False, "qwen3-0.6b": False}   # not gone
    status, _, body = c.chat(cid, "still there?", model="gemma-3-270m")
    assert status == 502 and body["code"] == "LLAMACPP_ERROR"
    assert c.chat(c.new_conversation(), "and you?", model=MODEL)[0] == 200
    with stub_server(port, router=True) as back, listening(c) as heard:   # and comes back
        shown = c.get("/api/models")[2]["details"]   # it refused at once: waited for, seen up
        assert all(m["available"] for m in shown)
        wait_for(lambda: {"type": "models", "action": "changed"} in heard, 10,
                 "the pages told")
        assert c.chat(cid, "back?", model="gemma-3-270m")[0] == 200 and back.requests
    assert stop_gpu


def test_a_server_that_answers_an_error_is_told_apart_from_one_that_is_down(stub, launch):
    with stub_server(models_error=True) as broken:
        c = Client(launch(stub.url, connections=({"name": "broken", "url": broken.url},
                                                 {"name": "gone", "url": "http://127.0.0.1:9"})))
        body = c.get("/api/models")[2]
        states = {x["name"]: x for x in body["connections"]}
        assert states["broken"]["state"] == "error" and "lists nothing today" in \
            states["broken"]["error"]
        assert states["gone"]["state"] == "down" and states["default"]["state"] == "ok"
        assert [m["connection"] for m in body["details"]] == ["default"]


def test_a_router_s_model_is_loaded_and_unloaded_from_the_api_every_page_told(stub, launch):
    with stub_server(router=True, load_delay=0.5) as gpu:
        c = Client(launch(stub.url, connections=({"name": "gpu", "url": gpu.url},)))
        assert c.get("/api/models")[0] == 200
        with listening(c) as heard:
            status, _, body = c.post("/api/models/load", {"model": "qwen3-0.6b"})
            assert (status, body["connection"], body["action"]) == (200, "gpu", "load")
            assert gpu.requests[-1]["path"] == "/models/load"
            wait_for(lambda: {"type": "models", "action": "changed"} in heard, 10,
                     "the pages told")
            wait_for(lambda: {m["name"]: m.get("status") for m in c.get("/api/models")[2][
                "details"]}["qwen3-0.6b"] == "loaded", 10, "loaded")
        assert c.post("/api/models/unload", {"model": "qwen3-0.6b"})[0] == 200
        assert {m["name"]: m.get("status") for m in c.get("/api/models")[2]["details"]}[
            "qwen3-0.6b"] == "unloaded"
        status, _, body = c.post("/api/models/load", {"model": MODEL})   # not a router's
        assert (status, body["field"]) == (400, "model") and "router" in body["error"]
        for bad in ({}, {"model": 3}, {"model": "x", "extra": 1}):
            assert c.post("/api/models/load", bad)[0] == 400


def test_a_chat_for_a_model_not_loaded_says_so_at_its_start(client, stub):
    stub.router = True
    assert client.get("/api/models")[0] == 200              # qwen3-0.6b: unloaded
    cid = client.new_conversation(model="qwen3-0.6b")
    start = read_events(client.stream(cid, "hi", model="qwen3-0.6b")[0])[0]
    assert (start["type"], start["model_status"]) == ("start", "unloaded")
    start = read_events(client.stream(cid, "hi", model="gemma-3-270m")[0])[0]
    assert start["type"] == "start" and "model_status" not in start       # loaded


@pytest.mark.parametrize("connections, words", [
    ({}, "must be a list"), ([{"name": "default", "url": "http://a:1"}], "is taken"),
    ([{"name": "x", "url": "ftp://a"}], "connections[0].url"),
    ([{"name": "x/y", "url": "http://a:1"}], "its name"),
    ([{"name": "x", "url": "http://a:1", "key": "k"}], "connections[0] must be"),
    ([{"name": "x", "url": "http://a:1"}, {"name": "x", "url": "http://b:1"}], "is taken"),
    ([{"name": "x", "url": "http://a:1", "api_key": 3}], "api_key must be text")])
def test_connections_in_config_are_checked(tmp_path, connections, words):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"connections": connections}))
    with pytest.raises(llama_chat.ConfigError, match=re.escape(words)):
        llama_chat.load_settings(["--config", str(path)])


def test_models_router_mode_gives_each_status(client, stub):
    stub.router = True
    body = client.get("/api/models")[2]
    assert body["models"] == ["gemma-3-270m", "qwen3-0.6b"]
    assert body["details"] == [
        {"name": "gemma-3-270m", "status": "loaded", "connection": "default", "available": True},
        {"name": "qwen3-0.6b", "status": "unloaded", "connection": "default", "available": True,
         "n_ctx": 8192, "input_modalities": ["text"]}]      # its -c and architecture


def test_models_name_the_server_llama_chat_started(client, monkeypatch):
    assert "managed" not in client.get("/api/models")[2]
    monkeypatch.setattr(client.engine, "managed", types.SimpleNamespace(as_dict=dict))
    assert client.get("/api/models")[2]["managed"] == "default"


def test_models_fall_back_to_v1_models(client, stub):
    stub.no_models_route = True
    assert client.get("/api/models")[2]["models"] == [MODEL]


def test_models_with_llamacpp_down(down_client):
    status, _, body = down_client.get("/api/models")
    assert status == 502
    assert body["models"] == [] and body["count"] == 0 and body["code"] == "LLAMACPP_ERROR"
    assert body["error"] and body["llamacpp_url"] == down_client.engine.settings.llamacpp_url


def test_models_come_back_at_once_when_llama_cpp_does(launch):
    port = free_port()
    c = Client(launch(f"http://127.0.0.1:{port}"))
    assert c.get("/api/models")[0] == 502                  # refused: down
    with stub_server(port):                                # started now: the next ask sees it
        status, _, body = c.get("/api/models")
        assert status == 200 and body["models"] == [MODEL]


@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for 127.0.0.1 and localhost, made with
    openssl: (cert, key) paths."""
    import shutil
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    return str(cert), str(key)


def test_https_with_a_certificate_and_a_slow_handshake_holds_no_one_up(stub, launch,
                                                                      certificate):
    import ssl
    cert, key = certificate
    server = launch(stub.url, tls_cert=cert, tls_key=key)
    port = server.server_address[1]
    idle = socket.create_connection(("127.0.0.1", port))    # connects, never says hello
    context = ssl.create_default_context(cafile=cert)
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    conn.request("GET", "/api/health")
    answer = conn.getresponse()
    assert answer.status == 200 and json.loads(answer.read())["status"] == "ok"
    conn.request("POST", "/api/conversations", json.dumps({"title": "Over TLS", "model": ""}),
                 {"Content-Type": "application/json"})
    assert conn.getresponse().status == 201
    plain = http.client.HTTPConnection("127.0.0.1", port, timeout=5)   # plain HTTP: refused
    with pytest.raises((http.client.HTTPException, OSError)):
        plain.request("GET", "/api/health")
        plain.getresponse().read()
    idle.close()


@pytest.mark.parametrize("given, words", [
    ({"tls_cert": "cert.pem"}, "go together"), ({"tls_key": "key.pem"}, "go together"),
    ({"tls_cert": "/nowhere/cert.pem", "tls_key": "/nowhere/key.pem"}, "can be read")])
def test_tls_settings_are_checked(tmp_path, given, words):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(given))
    with pytest.raises(llama_chat.ConfigError, match=words):
        llama_chat.load_settings(["--config", str(path)])


def test_a_certificate_that_is_no_certificate_stops_start_up(tmp_path, stub, launch):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(llama_chat.ConfigError, match="cannot be used"):
        launch(stub.url, tls_cert=str(bad), tls_key=str(bad))


def test_the_page_is_installable_and_its_worker_never_keeps_the_history(client):
    status, headers, manifest = client.get("/manifest.webmanifest")
    assert status == 200 and headers["Content-Type"] == "application/manifest+json"
    assert (manifest["display"], manifest["start_url"]) == ("standalone", "/")
    for icon in manifest["icons"]:
        status, headers, data = client.request("GET", icon["src"])
        assert status == 200 and headers["Content-Type"] == icon["type"]
        if icon["type"] == "image/png":                      # a PNG of its stated size
            size = int(icon["sizes"].split("x")[0])
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
            assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) \
                == (size, size)
    status, headers, worker = client.request("GET", "/sw.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert b'url.pathname.startsWith("/api/") || url.pathname.startsWith("/v1/")) return' \
        in worker
    page = client.request("GET", "/")
    assert "manifest-src 'self'" in page[1]["Content-Security-Policy"]
    assert "worker-src 'self'" in page[1]["Content-Security-Policy"]
    assert b'<link rel="manifest" href="/manifest.webmanifest">' in page[2]


def test_a_download_by_ticket_needs_the_key_once_and_only_for_downloads(tmp_path, stub,
                                                                       launch):
    c = Client(launch(stub.url, api_key="k"))
    key = {"Authorization": "Bearer k"}
    cid = c.request("POST", "/api/conversations", {"title": "Kept", "model": ""},
                    headers=key)[2]["conversation_id"]
    assert c.request("POST", "/api/downloads", {"path": "/api/backup"})[0] == 401
    for bad in ("/api/conversations", "/api/messages/1", "/v1/models", "https://x/api/backup"):
        status, _, body = c.request("POST", "/api/downloads", {"path": bad}, headers=key)
        assert (status, body.get("field")) == (400, "path"), bad
    status, _, made = c.request("POST", "/api/downloads", {
        "path": f"/api/conversations/{cid}/export?format=md"}, headers=key)
    assert status == 201 and made["url"].startswith("/api/downloads/")
    refused = c.request("GET", made["url"], headers={"Sec-Fetch-Site": "cross-site"})
    assert refused[0] == 403                               # never for another origin's page
    status, headers, text = c.request("GET", made["url"])  # no key: the ticket is one
    assert status == 200 and text.decode().startswith("# Kept")
    assert c.request("GET", made["url"])[0] == 404         # once
    assert c.request("GET", "/api/downloads/made-up")[0] == 404
    assert c.request("GET", "/api/conversations")[0] == 401    # the rest still needs the key
    ticket = c.request("POST", "/api/downloads", {"path": "/api/backup"}, headers=key)[2]
    c.engine.tickets = {t: (p, 0) for t, (p, _) in c.engine.tickets.items()}   # a minute on
    assert c.request("GET", ticket["url"])[0] == 404


def test_health_ok(client):
    status, _, body = client.get("/api/health")
    assert status == 200
    assert body["status"] == "ok" and body["version"] == llama_chat.__version__
    assert body["llamacpp"]["ok"] is True and body["database"] == {"ok": True, "fts5": True}


def test_health_degraded_while_the_disk_is_full(client, monkeypatch):
    cid = client.new_conversation()
    db = client.engine.store.db
    pages = db.conn().execute("PRAGMA page_count").fetchone()[0]
    limit = {"pages": pages}
    real_connect = db.connect

    def connect():                                   # every connection, as a full disk
        conn = real_connect()
        conn.execute(f"PRAGMA max_page_count = {limit['pages']}")
        return conn

    opened = []

    def conn():                      # a new one for each use: none from before the limit
        opened.append(connect())
        return opened[-1]

    monkeypatch.setattr(db, "conn", conn)
    status, _, body = client.chat(cid, "x" * 100_000)
    assert (status, body["code"]) == (503, "DATABASE_ERROR") and "full" in body["error"]
    health = client.get("/api/health")[2]
    assert health["status"] == "degraded" and health["database"]["ok"] is False
    assert "cannot be written" in health["database"]["error"] and "full" in \
        health["database"]["error"]
    limit["pages"] = 1073741823
    assert client.chat(cid, "small")[0] == 200
    assert client.get("/api/health")[2]["status"] == "ok"


@pytest.mark.parametrize("checked", [True, False], ids=["checked at start", "too big to"])
def test_a_damaged_database_is_503_and_said_at_start(tmp_path, stub, caplog, launch, checked):
    path = tmp_path / "damaged.db"
    store = llama_chat.Store(str(path))
    cid = store.create_conversation("t", "m")
    for i in range(300):
        store.add_message(cid, "user", f"message number {i} " + "x" * 400)
    store.close()
    root = sqlite3.connect(path).execute(
        "SELECT rootpage FROM sqlite_master WHERE name = 'messages'").fetchone()[0]
    with open(path, "r+b") as f:              # the messages table's root page, garbled
        f.seek((root - 1) * 4096)
        f.write(b"\x0d\xff" * 2048)
    caplog.set_level("INFO", logger="llama_chat")
    server = launch(stub.url, db=str(path), check_up_to_bytes=2**40 if checked else 0)
    c = Client(server)
    deadline = time.monotonic() + 10
    def said():
        return any("is damaged" in r.getMessage() for r in caplog.records)
    while checked and not said() and time.monotonic() < deadline:   # found, then logged
        time.sleep(0.05)
    assert said() == checked
    status, _, body = c.get(f"/api/conversations/{cid}")   # found by the request, if not
    assert (status, body["code"]) == (503, "DATABASE_ERROR") and "damaged" in body["error"]
    health = c.get("/api/health")[2]
    assert health["status"] == "degraded" and "damaged" in health["database"]["error"]


def test_health_degraded_while_history_keeps_working(down_client):
    cid = down_client.new_conversation()
    status, _, body = down_client.get("/api/health")
    assert status == 200 and body["status"] == "degraded"
    assert body["llamacpp"]["ok"] is False and body["llamacpp"]["error"]
    assert down_client.get(f"/api/conversations/{cid}")[0] == 200
    assert down_client.get("/api/search?q=x")[0] == 200


###############################################################################
# A llama-server started by llama-chat
###############################################################################

FAKE_LLAMA_SERVER = """#!{python}
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
with open(os.path.join(os.path.dirname(__file__), "started"), "a") as f:
    f.write(json.dumps({{"pid": os.getpid(), "args": args}}) + "\\n")
print("fake llama-server listening", flush=True)

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{{"status": "ok"}}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def fake_llama_server(folder, program=FAKE_LLAMA_SERVER):
    """An executable llama-server stand-in in folder (and a model file for it)."""
    fake = folder / "llama-server"
    fake.write_text(program.format(python=sys.executable))
    fake.chmod(0o755)
    (folder / "m.gguf").write_bytes(b"GGUF")
    return fake


def llama_chat_process(folder, fake, *extra, port=None):
    return subprocess.Popen([sys.executable, os.path.join(HERE, "llama_chat.py"), "--port",
                             str(port or free_port()), "--db", str(folder / "chat.db"),
                             "--llama-server", str(fake), "--model", str(folder / "m.gguf"),
                             "--", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for(condition, seconds=15, what="it"):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen in {seconds} s"
        time.sleep(0.05)


def test_a_started_llama_server_dies_with_a_killed_llama_chat(tmp_path):
    fake = fake_llama_server(tmp_path)
    proc = llama_chat_process(tmp_path, fake)
    try:
        wait_for(lambda: started_servers(tmp_path), what="llama-server starting")
        child = started_servers(tmp_path)[0]["pid"]
        assert (tmp_path / "chat.db.llama-server.pid").read_text().strip() == str(child)
    finally:
        proc.kill()                                          # kill -9: no clean-up runs
        proc.wait(10)
    wait_for(lambda: not alive(child), 5, "llama-server stopping")


ORPHAN = """import os, sys, time
sys.argv[0] = {name!r}
open({ready!r}, "w").close()
time.sleep(60)
"""


@pytest.mark.parametrize("same_program", [True, False])
def test_the_next_start_stops_only_the_llama_server_its_pid_file_names(tmp_path, same_program):
    """Where the kernel cannot tie the child to llama-chat (not Linux), a pid
    file left by a killed llama-chat names the orphan; the next start stops it
    if that process still runs the same program, and never another one."""
    fake = fake_llama_server(tmp_path)
    name = str(fake) if same_program else "/usr/bin/something-else"
    orphan = subprocess.Popen([name, "-c", ORPHAN.format(name=name, ready=str(
        tmp_path / "ready"))], executable=sys.executable)
    try:
        wait_for(lambda: (tmp_path / "ready").exists())
        (tmp_path / "chat.db.llama-server.pid").write_text(f"{orphan.pid}\n")
        proc = llama_chat_process(tmp_path, fake)
        try:
            wait_for(lambda: started_servers(tmp_path), what="llama-server starting")
            assert (orphan.poll() is not None) == same_program
        finally:
            proc.terminate()
            proc.wait(15)
        said = proc.stdout.read()
        assert ("left running" in said) == same_program
        assert not (tmp_path / "chat.db.llama-server.pid").exists()
    finally:
        orphan.kill()
        orphan.wait()


FAILING_LLAMA_SERVER = """#!{python}
import sys
print("loading model", flush=True)
print("error: failed to open GGUF file 'm.gguf' (bad magic)", flush=True)
sys.exit(3)
"""


def test_a_llama_server_that_keeps_exiting_is_shown_with_its_reason(tmp_path):
    fake = fake_llama_server(tmp_path, FAILING_LLAMA_SERVER)
    port = free_port()
    proc = llama_chat_process(tmp_path, fake, "--api-key", "upstream-secret",
                              "--hf-token=hf_secret", port=port)
    try:
        def managed():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/api/health")
            return json.loads(conn.getresponse().read())["llamacpp"]["managed"]

        def exited():
            try:
                return managed()["last_exit"] is not None
            except OSError:
                return False
        wait_for(exited, what="an exit shown")
        state = managed()
        assert state["last_exit"] == 3 and not state["running"]
        assert state["last_log_line"] == "error: failed to open GGUF file 'm.gguf' (bad magic)"
        assert state["log"] == str(tmp_path / "chat.db.llama-server.log")
        assert "upstream-secret" not in state["command"] and "hf_secret" not in state["command"]
        assert "--api-key *** --hf-token=***" in state["command"]
    finally:
        proc.terminate()
        proc.wait(15)
    said = proc.stdout.read()
    assert "upstream-secret" not in said and "hf_secret" not in said
    assert "status 3: error: failed to open GGUF file" in said
    assert file_mode(tmp_path / "chat.db.llama-server.log") == 0o600


@pytest.mark.parametrize("command, shown", [
    (["ls", "--api-key", "k1", "-c", "9"], "ls --api-key *** -c 9"),
    (["ls", "--api-key-file", "/k", "--hf-token", "t"], "ls --api-key-file *** --hf-token ***"),
    (["ls", "-hft", "t", "--ssl-key-file=/x.pem"], "ls -hft *** --ssl-key-file=***"),
    (["ls", "--api-key", "--api-key", "x"], "ls --api-key *** x"),      # a value like a flag
    (["ls", "--api-keys", "k"], "ls --api-keys k"),
])
def test_llama_server_s_secrets_are_never_shown(command, shown):
    assert llama_chat.shown_command(command) == shown


NOISY_LLAMA_SERVER = """#!{python}
import sys, time
for i in range(3000):
    print(f"line {{i:05d}} " + "x" * 60, flush=True)
time.sleep(60)
"""


def test_the_llama_server_log_is_rotated(tmp_path, monkeypatch):
    fake = fake_llama_server(tmp_path, NOISY_LLAMA_SERVER)
    monkeypatch.setattr(llama_chat, "LOG_LIMIT", 50_000)
    settings = llama_chat.prepare_settings(llama_chat.Settings(
        db=str(tmp_path / "chat.db"), llama_server=str(fake),
        llama_model=str(tmp_path / "m.gguf")))
    managed = llama_chat.ManagedLlamaServer(settings)
    managed.start()
    try:
        wait_for(lambda: managed.last_line.startswith("line 02999"), what="3,000 lines")
    finally:
        managed.stop()
    log_path = tmp_path / "chat.db.llama-server.log"
    sizes = log_path.stat().st_size, (tmp_path / "chat.db.llama-server.log.1").stat().st_size
    assert all(size <= 50_000 for size in sizes) and sizes[1] > 40_000
    assert log_path.read_text().splitlines()[-1].startswith("line 02999")
    assert not (tmp_path / "chat.db.llama-server.pid").exists()


def started_servers(folder):
    path = folder / "started"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[1].split()[0] != "Z"


def test_a_llama_server_is_started_health_waited_restarted_and_stopped(tmp_path):
    fake = fake_llama_server(tmp_path)
    port = free_port()
    db = tmp_path / "chat.db"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "llama_chat.py"), "--port",
                             str(port), "--db", str(db), "--llama-server", str(fake), "--model",
                             str(tmp_path / "m.gguf"), "--", "-c", "2048"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def health():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/api/health")
            return json.loads(conn.getresponse().read())["llamacpp"]
        deadline = time.monotonic() + 15
        while True:
            try:
                state = health()
                if state["ok"]:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "llama-server never answered"
            time.sleep(0.1)
        first = started_servers(tmp_path)[0]
        assert first["args"][:2] == ["-m", str(tmp_path / "m.gguf")]
        assert first["args"][-2:] == ["-c", "2048"]
        assert state["url"] == f"http://127.0.0.1:{first['args'][first['args'].index('--port') + 1]}"
        assert state["managed"]["pid"] == first["pid"]
        assert "fake llama-server listening" in (tmp_path / "chat.db.llama-server.log").read_text()
        os.kill(first["pid"], signal.SIGKILL)             # it dies: started again
        deadline = time.monotonic() + 10
        while len(started_servers(tmp_path)) < 2:
            assert time.monotonic() < deadline, "llama-server was not started again"
            time.sleep(0.1)
        second = started_servers(tmp_path)[1]
        while not health()["ok"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert health()["managed"]["restarts"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert proc.returncode == 0
    said = proc.stdout.read()
    assert "started llama-server" in said and "start it with" not in said   # it was started
    deadline = time.monotonic() + 5
    while alive(second["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(second["pid"])                          # stopped with llama-chat


def test_a_default_url_moves_to_llama_server_s_newer_port_when_only_that_answers(stub):
    settings = llama_chat.Settings()                # its llamacpp_url is the default
    stub_port = int(stub.url.rsplit(":", 1)[1])
    moved = llama_chat.discover_llamacpp(settings, ports=(free_port(), stub_port))
    assert moved.llamacpp_url == f"http://127.0.0.1:{stub_port}"
    # Something answers on the usual port, or the URL was given: nothing changes.
    assert llama_chat.discover_llamacpp(settings, ports=(stub_port, stub_port)) == settings
    given = replace(settings, llamacpp_url="http://127.0.0.1:1234")
    assert llama_chat.discover_llamacpp(given, ports=(free_port(), stub_port)) == given
    assert llama_chat.discover_llamacpp(settings, ports=(free_port(), free_port())) == settings


@pytest.mark.parametrize("argv,words", [
    (["--llama-server", "/nonexistent/llama-server", "--model", "m"], "not an executable"),
    (["--llama-server", sys.executable], "needs --model FILE or --models-dir DIR"),
    (["--llama-server", sys.executable, "--model", os.path.join(HERE, "llama_chat.py"), "--llamacpp-url",
      "http://10.0.0.9:8080"], "loopback"),
    (["--llama-server", sys.executable, "--model", "/nonexistent/m.gguf"],
     "--model /nonexistent/m.gguf is not a file"),
    (["--llama-server", sys.executable, "--models-dir", "/nonexistent"],
     "--models-dir /nonexistent is not a folder"),
])
def test_a_llama_server_to_start_is_checked_first(tmp_path, argv, words):
    done = subprocess.run([sys.executable, os.path.join(HERE, "llama_chat.py"), "--db",
                           str(tmp_path / "x.db"), "--port", "0", *argv],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and words in done.stderr and done.stderr.count("\n") == 1


###############################################################################
# Settings of a conversation, titles, pins
###############################################################################

def test_options_come_from_the_request_then_the_conversation_then_the_config(client, stub):
    status, _, body = client.post("/api/conversations", {
        "title": "code", "model": MODEL, "system_prompt": "You write Python.",
        "options": {"temperature": 0.7, "top_k": 7}})
    cid = body["conversation_id"]
    client.chat(cid, "hi", options={"temperature": 1.3})
    sent_body = stub.requests[-1]["body"]
    assert (sent_body["temperature"], sent_body["top_k"], sent_body["top_p"]) == (1.3, 7, 0.95)
    assert sent_body["messages"][0] == {"role": "system", "content": "You write Python."}
    reply = conversation(client, cid)["messages"][-1]
    assert reply["options"]["temperature"] == 1.3 and reply["options"]["top_k"] == 7
    client.put(f"/api/conversations/{cid}", {"system_prompt": None, "options": None})
    client.chat(cid, "again")
    sent_body = stub.requests[-1]["body"]
    assert (sent_body["temperature"], sent_body["top_k"]) == (0.1, 50)
    assert sent_body["messages"][0]["content"] == client.engine.settings.system_prompt


def test_a_conversation_answers_its_settings_and_where_each_comes_from(client):
    cid = client.post("/api/conversations", {"title": "t", "model": MODEL,
                                             "options": {"top_p": 0.5}})[2]["conversation_id"]
    body = conversation(client, cid)
    assert body["conversation"]["options"] == {"top_p": 0.5}
    assert body["conversation"]["system_prompt"] is None and body["conversation"]["pinned"] is False
    effective = body["effective"]
    assert effective["system_prompt"] == {"value": client.engine.settings.system_prompt,
                                          "from": "config"}
    assert effective["options"]["top_p"] == {"value": 0.5, "from": "conversation"}
    assert effective["options"]["temperature"] == {"value": 0.1, "from": "config"}
    status, _, answer = client.put(f"/api/conversations/{cid}", {"options": {"top_p": 7}})
    assert (status, answer["field"]) == (400, "options.top_p")
    assert conversation(client, cid)["conversation"]["options"] == {"top_p": 0.5}


def test_llamacpp_s_own_defaults_are_answered_by_our_names(client, stub):
    body = client.get("/api/models/defaults")[2]
    assert body["defaults"] == {"temperature": 0.8, "top_k": 40, "num_predict": -1,
                                "seed": 4294967295}
    assert client.get("/api/models/defaults?model=qwen%20x")[2]["defaults"]["temperature"] == 0.6


@pytest.mark.parametrize("options, field, error", [
    ({"temperature": 999}, "options.temperature", None),
    ({"top_k": 1.5}, "options.top_k", "options.top_k must be a int"),
    ({"stop": [""]}, "options.stop", "options.stop must be a list of at most 16 non-empty "
                                     "strings"),
    ({"grammar": "x"}, "options.grammar", None),
    ([1], "options", "options must be an object"),
])
def test_conversation_options_are_checked_as_a_chat_s_are(client, options, field, error):
    cid = client.new_conversation()
    chat = client.chat(cid, "x", options=options)[2]
    for status, _, body in (
            client.post("/api/conversations", {"model": MODEL, "options": options}),
            client.put(f"/api/conversations/{cid}", {"options": options})):
        assert status == 400 and body == chat                # one checker, one whole body
        assert (body["code"], body["field"], body["success"]) == ("VALIDATION_ERROR", field, False)
        if error:
            assert body["error"] == error
    assert rows(client, "SELECT count(*) FROM conversations") == [(1,)]
    assert rows(client, "SELECT count(*) FROM messages") == [(0,)]


def test_pins_and_the_pinned_list(client):
    a, b, c = (client.new_conversation(t) for t in "abc")
    assert client.put(f"/api/conversations/{a}", {"pinned": True})[2]["pinned"] is True
    client.post("/api/conversations", {"title": "d", "model": MODEL, "pinned": True})
    listed = client.get("/api/conversations?pinned=true")[2]["conversations"]
    assert [x["title"] for x in listed] == ["d", "a"] and all(x["pinned"] for x in listed)
    every = client.get("/api/conversations")[2]["conversations"]
    assert [x["title"] for x in every] == ["d", "c", "b", "a"]       # in their place too
    assert [x["title"] for x in client.get("/api/conversations?pinned=false")[2][
        "conversations"]] == ["c", "b"]
    assert client.get("/api/conversations?pinned=yes")[2]["field"] == "pinned"


def test_several_conversations_delete_at_once(client):
    ids = [client.new_conversation(t) for t in "abc"]
    client.chat(ids[0], "bulkword")
    status, _, body = client.post("/api/conversations/delete", {"ids": [ids[0], ids[2], 999]})
    assert (status, body["deleted"], body["not_found"]) == (200, [ids[0], ids[2]], [999])
    assert [x["id"] for x in client.get("/api/conversations")[2]["conversations"]] == [ids[1]]
    assert not client.engine.store.search("bulkword", 5)
    for bad in ([], ["1"], [True], "1"):
        assert client.post("/api/conversations/delete", {"ids": bad})[2]["field"] == "ids"


@pytest.mark.parametrize("mode, expected", [
    ("first-line", "Plan a trip to Kyoto in spring, with temples, gardens and…"),
    ("off", "New chat"),
    ("model", "Kyoto Spring Trip"),
])
def test_a_conversation_made_without_a_title_is_titled_after_its_first_reply(
        client, stub, mode, expected):
    client.engine.settings = replace(client.engine.settings, auto_title=mode)
    cid = client.post("/api/conversations", {"model": MODEL})[2]["conversation_id"]
    assert conversation(client, cid)["conversation"]["title"] == "New chat"
    question = ("Plan a trip to Kyoto in spring, with temples, gardens and food markets "
                "for a week\nand more lines")
    if mode == "model":
        stub.reply = '"Kyoto Spring Trip"'
    client.chat(cid, question)
    deadline = time.monotonic() + 5
    while conversation(client, cid)["conversation"]["title"] != expected and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert conversation(client, cid)["conversation"]["title"] == expected
    if mode == "model":
        asked = stub.requests[-1]["body"]
        assert asked["max_tokens"] == 24 and asked["temperature"] == 0.2
    client.chat(cid, "a second question")                 # only after the first reply
    assert conversation(client, cid)["conversation"]["title"] == expected


@pytest.mark.parametrize("titles", ["fail", "slow"])
def test_a_model_title_that_fails_or_is_slow_never_holds_the_chat(client, stub, titles):
    client.engine.settings = replace(client.engine.settings, auto_title="model")
    stub.titles = titles
    cid = client.post("/api/conversations", {"model": MODEL})[2]["conversation_id"]
    started = time.monotonic()
    assert client.chat(cid, "Why is the sky blue?")[0] == 200
    assert time.monotonic() - started < 1.5
    if titles == "slow":
        assert conversation(client, cid)["conversation"]["title"] == "New chat"
    deadline = time.monotonic() + 6
    while conversation(client, cid)["conversation"]["title"] == "New chat" and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    expected = "Why is the sky blue?" if titles == "fail" else stub.reply
    assert conversation(client, cid)["conversation"]["title"] == expected


def test_a_title_set_by_a_client_is_never_changed(client, stub):
    cid = client.post("/api/conversations", {"model": MODEL})[2]["conversation_id"]
    client.put(f"/api/conversations/{cid}", {"title": "Mine"})
    client.chat(cid, "something else")
    assert conversation(client, cid)["conversation"]["title"] == "Mine"


def test_a_schema_3_database_gets_settings_of_null_after_a_backup(tmp_path):
    path = str(tmp_path / "v3.db")

    def fill(c):
        c.execute("INSERT INTO conversations (title, model) VALUES ('kept', 'm')")
        for text in ("question", "answer"):
            c.execute("INSERT INTO messages (conversation_id, parent_id, role, content) "
                      "SELECT 1, max(id), ?, ? FROM messages", (
                          "user" if text == "question" else "assistant", text))
    store = migrated(path, fill, 3)
    found = store.get_conversation(1)
    assert (found["system_prompt"], found["options"], found["pinned"]) == (None, None, False)
    assert [m["content"] for m in json.loads(store.messages(1)[0])] == ["question", "answer"]
    assert json.loads(store.messages(1)[0])[1]["options"] is None
    assert len(store.search("answer", 5)) == 1


def test_a_1_1_database_gets_settings_of_null(tmp_path):
    path = str(tmp_path / "v11s.db")
    make_1_1_db(path)
    store = llama_chat.Store(path)
    found = store.get_conversation(1)
    assert (found["system_prompt"], found["options"], found["pinned"]) == (None, None, False)
    assert rows_of(store, "SELECT count(*) FROM messages") == [(20,)]


###############################################################################
# Context by tokens
###############################################################################

TEN_WORDS = "one two three four five six seven eight nine {}"


def test_a_long_chat_sends_the_newest_messages_that_fit_the_context(client, stub):
    stub.n_ctx = 200          # less a quarter for the reply and 14 for the system prompt: 136
    cid = client.new_conversation()
    for i in range(5):        # questions of 10 tokens (18 with the template), replies of 8 (16)
        client.chat(cid, TEN_WORDS.format(f"q{i}"))
    status, _, body = client.chat(cid, TEN_WORDS.format("q5"))
    assert status == 200, body
    sent = stub.requests[-1]["body"]["messages"]
    # 136 - 18 (q5) = 118 for the five exchanges before, 34 each (170): what is
    # left out grows by two thirds of 118 (78) at a time: three go, q3 onwards
    assert [m["content"] for m in sent[1:] if m["role"] == "user"] == [
        TEN_WORDS.format(f"q{i}") for i in (3, 4, 5)]
    assert len(sent) == 1 + 5
    assert body["context"] == {"n_ctx": 200, "prompt_tokens": 21, "messages_sent": 5,
                               "messages_left_out": 6}      # prompt_tokens: llama.cpp's usage


def test_a_question_too_long_for_the_context_does_not_silence_the_history(client, stub):
    stub.n_ctx = 200                     # 136 tokens for the history
    cid = client.new_conversation()
    for i in range(2):
        client.chat(cid, TEN_WORDS.format(f"q{i}"))
    stub.context_chars = 1000            # llama.cpp refuses the long one
    status, _, body = client.chat(cid, " ".join(["long"] * 300))
    assert status == 502 and "exceeds" in body["details"]
    stub.context_chars = 0
    for i in (2, 3):
        status, _, body = client.chat(cid, TEN_WORDS.format(f"q{i}"))
        assert status == 200, body
        sent = [m["content"] for m in stub.requests[-1]["body"]["messages"][1:]]
        assert sent == [x for j in range(i) for x in (TEN_WORDS.format(f"q{j}"), stub.reply)] \
            + [TEN_WORDS.format(f"q{i}")], sent            # all but the long one: 52-120 tokens
        assert body["context"]["messages_left_out"] == 1, body["context"]
    prompt = client.get(f"/api/conversations/{cid}/prompt?message=next")[2]
    assert "long long" not in json.dumps(prompt["messages"])


def test_unanswered_questions_are_left_out_and_the_walk_goes_on(client, stub):
    cid = client.new_conversation()
    client.chat(cid, "first")
    stub.mode = "error500"
    assert client.chat(cid, "lost one")[0] == 502
    stub.mode = "normal"
    client.chat(cid, "third")
    sent = [m["content"] for m in stub.requests[-1]["body"]["messages"][1:]]
    assert sent == ["first", stub.reply, "third"]


def test_what_is_sent_begins_with_a_question(client, stub):
    item = {"conversation": {"id": 1, "title": "greeted"}, "messages": [
        {"id": 1, "parent_id": None, "role": "assistant", "content": "Hello."},
        {"id": 2, "parent_id": 1, "role": "assistant", "content": "I am a bot."},
        {"id": 3, "parent_id": 2, "role": "user", "content": "hi"},
        {"id": 4, "parent_id": 3, "role": "assistant", "content": "hi again"}]}
    assert imported(client, json.dumps(item).encode())[0] == 200
    cid = client.get("/api/conversations")[2]["conversations"][0]["id"]
    context = client.chat(cid, "and now?")[2]["context"]
    sent = [(m["role"], m["content"]) for m in stub.requests[-1]["body"]["messages"]
            if m["role"] != "system"]
    assert sent == [("user", "hi"), ("assistant", "hi again"), ("user", "and now?")]
    assert (context["messages_sent"], context["messages_left_out"]) == (3, 2)


def test_token_counts_are_asked_once_and_forgotten_when_a_text_changes(client, stub):
    cid = client.new_conversation()
    client.chat(cid, "first question here")
    stub.tokenized.clear()
    client.chat(cid, "second one")
    assert stub.tokenized == ["second one"]          # the reply's count came from its usage
    counts = rows(client, "SELECT content, token_count FROM messages ORDER BY id")
    assert counts == [("first question here", 3), (stub.reply, len(stub.tokens())),
                      ("second one", 2), (stub.reply, len(stub.tokens()))]
    first = rows(client, "SELECT id FROM messages ORDER BY id LIMIT 1")[0][0]
    client.put(f"/api/messages/{first}", {"content": "edited text"})
    assert rows(client, "SELECT token_count FROM messages WHERE id = ?", first) == [(None,)]
    stub.tokenized.clear()
    client.chat(cid, "third")
    assert sorted(stub.tokenized) == ["edited text", "third"]


@pytest.mark.parametrize("stream", [False, True])
def test_the_stream_s_done_carries_the_context(client, stub, stream):
    cid = client.new_conversation()
    if stream:
        done = read_events(client.stream(cid, "hello there")[0])[-1]
    else:
        done = client.chat(cid, "hello there")[2]
    assert done["context"] == {"n_ctx": 4096, "prompt_tokens": 21, "messages_sent": 1,
                               "messages_left_out": 0}


@pytest.mark.parametrize("earlier, limit, kept", [
    (0, 15, 0), (15, 15, 15), (16, 15, 8), (22, 15, 14), (23, 15, 15), (24, 15, 8),
    (5, 0, 0), (3, 1, 1), (4, 1, 0), (9, 8, 5), (12, 8, 8), (13, 8, 5)])
def test_the_message_window_moves_in_steps_of_half_the_limit(earlier, limit, kept):
    assert llama_chat.stepped_window(earlier, limit) == kept


@pytest.mark.parametrize("costs, budget, start", [
    ([], 100, 0), ([30, 30, 30], 100, 0), ([30, 30, 30], 90, 0), ([30, 30, 30, 30], 100, 3),
    ([30, 30, 30, 30, 30], 100, 3), ([30] * 7, 100, 5), ([30] * 9, 100, 7),
    ([10, 10, 10, 10, 60], 90, 5), ([20, 20, 20, 60], 90, 3),
    ([20, 20, 20, 20, 60], 90, 3),                              # a step's place holds
    ([33, 33, 35], 100, 2), ([33, 32, 36], 100, 3),             # a step: 66 left out
    ([100], 100, 0), ([101], 100, 1), ([50, 50, 1], 100, 2), ([5, 5], -1, None)])
def test_what_is_left_out_grows_by_two_thirds_of_the_budget(costs, budget, start):
    assert llama_chat.stepped_start(costs, budget) == start


def small_context_client(stub, launch, n_ctx):
    """A client of an app whose llama.cpp has an n_ctx-token context (a
    quarter of it kept for the reply) and which would send up to 500
    messages: the context, not the message limit, decides what is left out."""
    stub.n_ctx = n_ctx
    return Client(launch(stub.url, performance={**llama_chat.DEFAULT_CONFIG["performance"],
                                                "context_history_limit": 500}))


def chat_turns(stub, client, cid, numbers):
    """A question of 14 words and a reply of 9 for each number."""
    for n in numbers:
        stub.reply = f"Reply {n}: some nine words or so, each a token."
        client.chat(cid, f"question {n} " + "word " * 12)


def test_a_long_chat_sends_the_same_beginning_until_a_step_leaves_two_thirds_out(stub, launch):
    """What llama.cpp's prompt cache needs: each turn sends what the turn
    before sent (and its reply) as its beginning, but at the few turns where
    a step leaves the oldest out; the first question and its reply stay
    (the system prompt, then they, are the beginning every turn sends), a
    step leaves out two thirds of the rest of the budget, and no prompt
    passes the context."""
    client = small_context_client(stub, launch, 400)  # a quarter for the reply: 300 tokens
    cid = client.new_conversation()
    sent, drops, first = [], 0, None
    for n in range(30):
        stub.reply = f"Reply {n}: some nine words or so, each a token."
        answer = client.chat(cid, f"question {n} " + "word " * 12)[2]
        assert answer["context"]["prompt_tokens"] <= 300
        messages = stub.requests[-1]["body"]["messages"]
        assert stub.requests[-1]["body"]["cache_prompt"] is True
        first = first or messages[:1] + [messages[1], {"role": "assistant",
                                                       "content": "Reply 0: some nine words or "
                                                                  "so, each a token."}]
        assert messages[:3] == first or n == 0
        if sent and messages[:len(sent)] != sent:
            drops += 1
            left = [m for m in sent if m not in messages]
            assert left == sent[3:3 + len(left)]       # the oldest exchanges after the first
            assert sum(len(m["content"].split()) + 8 for m in left) >= 300 // 4   # a quarter+
        sent = messages + [{"role": "assistant", "content": stub.reply}]
    assert 0 < drops <= 7       # one every ~3 turns; a slide: every turn once full (~23)


@pytest.mark.parametrize("first_roles, limit, pinned", [
    (["user", "assistant"], 8, True),
    (["user", "assistant", "tool", "assistant"], 8, True),           # 4: a whole exchange
    (["user", "assistant", "tool", "assistant", "tool", "assistant"], 16, False),  # over 4
    (["user", "assistant", "tool", "assistant"], 7, False),          # over half the limit
    (["system", "user", "assistant"], 8, False),                     # not a question first
    (["system", "assistant", "user", "assistant"], 8, False),        # the same, two long
])
def test_the_message_window_keeps_the_first_exchange_when_it_steps(tmp_path, first_roles,
                                                                   limit, pinned):
    store = llama_chat.Store(str(tmp_path / "first.db"))
    cid = store.create_conversation("t", MODEL)
    for i, role in enumerate(first_roles):
        store.add_message(cid, role, f"first {i}", MODEL)
    for n in range(12):
        store.add_message(cid, "user", f"q{n}", MODEL)
        leaf = store.add_message(cid, "assistant", f"a{n}", MODEL)
    earlier = store.tree.depth(leaf) - 1
    history, at_root = llama_chat.windowed_history(store.tree, leaf, earlier, limit, own=1)
    texts = [m["content"] for m in history]
    assert at_root is pinned and len(history) <= limit + 1 and texts[-1] == "a11"
    if pinned:
        assert texts[:len(first_roles)] == [f"first {i}" for i in range(len(first_roles))]
        assert texts[len(first_roles)].startswith("q")             # the rest begins with one
    else:
        assert texts == [m["content"] for m in store.tree.path(      # the window alone
            leaf, llama_chat.stepped_window(earlier, limit) + 1)]
    # a branch that fits is sent whole, from its first question
    whole, at_root = llama_chat.windowed_history(store.tree, leaf, earlier, 100, own=1)
    assert at_root and len(whole) == earlier + 1


@pytest.mark.parametrize("at_root, unanswered, kept", [
    (True, False, ["m0", "m1", "m14", "m15", "m16", "m17", "m18", "m19"]),  # 40 kept; steps
    # of two thirds of 359 (239): 6 exchanges go
    (False, False, ["m14", "m15", "m16", "m17", "m18", "m19"]),   # of 399 (266): 7 go
    (True, True, ["m15", "m16", "m17", "m18", "m19", "m20"])])    # its first never answered
def test_the_token_budget_keeps_the_first_exchange_only_where_the_history_begins_with_it(
        at_root, unanswered, kept):
    """fit_context keeps the history's first exchange while the rest steps
    only where it is the branch's first (windowed_history says so) and goes
    at all: not the first of a window that has left older ones out, nor the
    second where the first question was never answered."""
    upstream = types.SimpleNamespace(context_of=lambda m: 400, message_overhead=lambda m: 0,
                                     token_count=lambda text, m: len(text.split()))
    engine = types.SimpleNamespace(upstream_for=lambda m: upstream)
    roles = ["user"] * unanswered + ["user", "assistant"] * 10
    history = [{"id": i + 1, "role": role, "content": f"m{i} " + "word " * 19,
                "token_count": 20} for i, role in enumerate(roles)]
    history.append({"id": None, "role": "user", "content": "now", "token_count": 1})
    turn = types.SimpleNamespace(model="m", history=history, system_prompt="", options={},
                                 own_messages=1, context=None, begins_at_root=at_root)
    llama_chat.fit_context(engine, turn, len(history))      # 400 for the prompt (no reply's)
    assert [m["content"].split()[0] for m in turn.history] == kept + ["now"]


def test_the_prompt_inspector_shows_what_the_next_chat_sends_first_exchange_kept(stub, launch):
    client = small_context_client(stub, launch, 400)  # 300 tokens for the prompt
    cid = client.new_conversation()
    chat_turns(stub, client, cid, range(14))
    shown = client.get(f"/api/conversations/{cid}/prompt?message=next%20one")[2]["messages"]
    client.chat(cid, "next one")
    sent = stub.requests[-1]["body"]["messages"]
    assert [m["content"] for m in shown] == [m["content"] for m in sent]
    assert sent[1]["content"].startswith("question 0 ") and \
        not sent[3]["content"].startswith("question 1 ")          # the first kept, a step


def test_a_first_question_too_long_for_a_quarter_of_the_budget_steps_with_the_rest(stub, launch):
    client = small_context_client(stub, launch, 400)  # 300 tokens for the prompt
    cid = client.new_conversation()
    client.chat(cid, "the first question " + "long " * 80)     # over a quarter: not kept
    chat_turns(stub, client, cid, range(1, 12))
    sent = stub.requests[-1]["body"]["messages"]
    assert sent[1]["content"].startswith("question ") and sent[-1]["content"].startswith(
        "question 11")
    cid = client.new_conversation()
    client.chat(cid, "the first question " + "short " * 10)    # under a quarter: kept
    for n in range(1, 12):
        client.chat(cid, f"question {n} " + "word " * 12)
    sent = stub.requests[-1]["body"]["messages"]
    assert sent[1]["content"].startswith("the first question") and \
        sent[3]["content"].startswith("question ") and sent[3]["content"] != "question 1 " + \
        "word " * 12


def test_what_a_template_adds_to_each_message_is_measured_and_counted(stub, launch):
    """Gemma 3's template adds 14 tokens a message: counted as 8, a full
    context passed n_ctx and llama.cpp cut the prompt itself."""
    stub.n_ctx, stub.template_words = 600, 14                # 450 tokens for the prompt
    c = Client(launch(stub.url, performance={**llama_chat.DEFAULT_CONFIG["performance"],
                                             "context_history_limit": 500}))
    cid = c.new_conversation()
    for n in range(25):
        stub.reply = f"Reply {n}: some nine words or so, each a token."
        c.chat(cid, f"question {n} " + "word " * 12)
        sent = stub.requests[-1]["body"]["messages"]
        assert sum(len(m["content"].split()) + 14 for m in sent) <= 450     # as llama.cpp counts
    assert c.engine.upstream.message_overhead(MODEL) == 16   # 14, its share of the reply's cue, 1
    stub.template_words = 0
    assert llama_chat.Upstream(c.engine.settings).message_overhead(MODEL) == 8   # the least


def test_the_message_limit_moves_in_steps_too(stub, launch):
    stub.prompt_tools = False                     # no tokens counted: the limit alone
    c = Client(launch(stub.url, performance={**llama_chat.DEFAULT_CONFIG["performance"],
                                             "context_history_limit": 8}))
    cid = c.new_conversation()
    firsts = []
    for n in range(12):
        c.chat(cid, f"question {n}")
        sent = [m["content"] for m in stub.requests[-1]["body"]["messages"][1:]]
        assert len(sent) <= 8 + 1 and sent[-1] == f"question {n}"
        assert sent[0] == "question 0"                       # the first question stays
        if n:
            assert sent[2].startswith("question")            # the rest begins with one
            firsts.append(sent[2])
    assert len(set(firsts)) <= 5 and firsts[-1] != "question 1"   # stepped: not 12 beginnings


@pytest.mark.parametrize("thinking, sent", [
    (True, {"chat_template_kwargs": {"enable_thinking": True}}),
    (False, {"chat_template_kwargs": {"enable_thinking": False}}),
    (0, {"chat_template_kwargs": {"enable_thinking": False}}),
    (512, {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_budget_tokens": 512})])
def test_thinking_on_off_or_a_budget_reaches_llama_cpp_as_it_takes_it(client, stub, thinking,
                                                                     sent):
    cid = client.new_conversation()
    assert client.chat(cid, "think?", options={"thinking": thinking})[0] == 200
    body = stub.requests[-1]["body"]
    assert {k: body[k] for k in sent} == sent and "thinking" not in body
    # a conversation's setting holds for its chats, and a chat's own wins
    assert client.put(f"/api/conversations/{cid}", {"options": {"thinking": thinking}})[0] == 200
    client.chat(cid, "again")
    assert {k: stub.requests[-1]["body"][k] for k in sent} == sent
    client.chat(cid, "quick", options={"thinking": False})
    assert stub.requests[-1]["body"]["chat_template_kwargs"] == {"enable_thinking": False}


@pytest.mark.parametrize("bad", ["on", -1, 1000001, 1.5, [], None])
def test_thinking_takes_true_false_or_a_budget_only(client, bad):
    cid = client.new_conversation()
    status, _, body = client.chat(cid, "x", options={"thinking": bad})
    if bad is None:
        assert status == 200                             # null: the default
    else:
        assert (status, body["field"]) == (400, "options.thinking")


def test_the_context_is_asked_again_when_the_model_list_changes(client, stub):
    stub.router = True
    client.get("/api/models")
    cid = client.new_conversation(model="gemma-3-270m")
    assert client.chat(cid, "one", model="gemma-3-270m")[2]["context"]["n_ctx"] == 4096
    stub.n_ctx = 2048                     # the same list: the context it said holds
    client.get("/api/models")
    assert client.chat(cid, "two", model="gemma-3-270m")[2]["context"]["n_ctx"] == 4096
    stub.router_status = "loading"        # reloaded, perhaps with another -c
    client.get("/api/models")
    stub.router_status = "loaded"
    client.get("/api/models")
    assert client.chat(cid, "three", model="gemma-3-270m")[2]["context"]["n_ctx"] == 2048


def test_without_llama_server_s_tokenizer_the_message_limit_holds(client, stub):
    stub.prompt_tools = False
    stub.n_ctx = 50
    cid = client.new_conversation()
    for i in range(3):
        client.chat(cid, TEN_WORDS.format(f"q{i}"))
    status, _, body = client.chat(cid, "last")
    assert status == 200 and "context" not in body
    assert len(stub.requests[-1]["body"]["messages"]) == 1 + 7


###############################################################################
# The prompt
###############################################################################

def test_the_prompt_is_what_the_next_chat_would_send(client, stub):
    cid = client.new_conversation()
    client.put(f"/api/conversations/{cid}", {"system_prompt": "Be terse.",
                                             "options": {"temperature": 0.5}})
    client.chat(cid, "First question")
    status, _, body = client.get(f"/api/conversations/{cid}/prompt?message=Next%20one")
    assert status == 200, body
    expected = [{"role": "system", "content": "Be terse."}, user("First question"),
                assistant(stub.reply), user("Next one")]
    assert body["messages"] == expected
    assert body["options"]["temperature"] == 0.5 and body["options"]["max_tokens"] == 4096
    assert body["prompt"] == "\n".join(f"<{m['role']}>{m['content']}" for m in expected) \
        + "\n<assistant>"
    assert body["prompt_tokens"] == sum(len(f"<{m['role']}>{m['content']}".split()) + 3
                                        for m in expected)
    assert (body["n_ctx"], body["messages_sent"], body["messages_left_out"]) == (4096, 3, 0)
    # What it shows is what a chat then sends.
    client.chat(cid, "Next one")
    sent = stub.requests[-1]["body"]
    assert sent["messages"] == expected and sent["temperature"] == 0.5


def test_the_prompt_counts_what_the_history_limit_leaves_out(tmp_path, stub, launch):
    c = Client(launch(stub.url, performance={**llama_chat.DEFAULT_CONFIG["performance"],
                                             "context_history_limit": 2}))
    cid = c.new_conversation()
    for i in range(3):
        c.chat(cid, f"q{i}")
    body = c.get(f"/api/conversations/{cid}/prompt")[2]
    assert [m["content"] for m in body["messages"][1:]] == ["q2", stub.reply]
    assert (body["messages_sent"], body["messages_left_out"]) == (2, 4)


def test_without_llama_server_s_prompt_tools_the_prompt_still_answers(client, stub):
    stub.prompt_tools = False
    cid = client.new_conversation()
    body = client.get(f"/api/conversations/{cid}/prompt?message=hi")[2]
    assert body["messages"][-1] == user("hi")
    assert (body["prompt"], body["prompt_tokens"]) == (None, None)
    assert client.get("/api/conversations/999/prompt")[0] == 404


def test_the_prompt_with_llamacpp_down_answers_the_messages(down_client):
    cid = down_client.new_conversation()
    status, _, body = down_client.get(f"/api/conversations/{cid}/prompt?message=hi")
    assert status == 200 and body["messages"][-1] == user("hi")
    assert (body["prompt"], body["prompt_tokens"], body["n_ctx"]) == (None, None, None)


###############################################################################
# Recall
###############################################################################

# Facts planted in old conversations among others, and questions asked about
# them in other words: the held-out set recall is measured on.
PLANTED = [
    ("My sister's cat is named Pistachio and she is afraid of thunder.",
     "What is the name of my sister's pet?"),
    ("Our wifi password at the cabin is trout-lantern-42.",
     "Which password do we use for the internet at the cabin?"),
    ("The dentist appointment moved to March 14 at 9:30 with Dr. Okafor.",
     "When am I seeing Okafor about my teeth?"),
    ("I keep the spare house key inside the blue ceramic frog by the garage.",
     "Where is the spare key hidden?"),
    ("For the sourdough, feed the starter with 50 g rye flour every evening.",
     "How should I feed my sourdough starter?"),
    ("The router in the basement is a Mikrotik hAP ac2 on firmware 7.12.",
     "Which firmware does the basement router run?"),
    ("Grandma's lasagna uses nutmeg in the béchamel and three layers of spinach.",
     "What spice goes into grandma's lasagna sauce?"),
    ("My bike tyres should be pumped to 4.5 bar front and 5 bar rear.",
     "What pressure do my bicycle tyres need?"),
    ("The Kyoto hotel booking reference is HX-7781, check-in on April 2.",
     "What was the booking reference of the hotel in Kyoto?"),
    ("Mount Taranaki's summit is 2518 metres; the climb took us nine hours.",
     "How high is the summit of Taranaki?"),
]
FILLER = ["We talked about machine learning and data pipelines for a while.",
          "The weather this week was grey and the garden needs work.",
          "Python lists and dictionaries are the most used containers.",
          "A recipe for pancakes: flour, milk, eggs, a pinch of salt.",
          "The meeting notes say the budget review moves to next quarter."]


def planted_history(store, conversations=60):
    """Old conversations of filler, each planted fact in one of its own:
    {fact: (its message id, its conversation id)}."""
    rng, found = random.Random(7), {}
    for i in range(conversations):
        cid = store.create_conversation(f"Old talk {i}", MODEL)
        for _ in range(3):
            q = store.add_message(cid, "user", rng.choice(FILLER))
            store.add_message(cid, "assistant", rng.choice(FILLER), MODEL, parent=q)
        if i < len(PLANTED):
            fact = PLANTED[i][0]
            found[fact] = (store.add_message(cid, "user", "Note this: " + fact), cid)
    return found


def test_recall_sends_the_planted_fact_as_a_numbered_source_and_keeps_it(client, stub):
    planted = planted_history(client.engine.store)
    fact, question = PLANTED[0]
    cid = client.new_conversation("New one")
    status, _, body = client.chat(cid, question, recall=True)
    assert status == 200
    sources = body["recall"]
    assert sources[0]["n"] == 1 and (sources[0]["message_id"], sources[0]["conversation_id"]) \
        == planted[fact] and sources[0]["title"] == "Old talk 0"
    assert fact in sources[0]["snippet"]
    system = stub.requests[-1]["body"]["messages"][0]
    assert system["role"] == "system" and llama_chat.RECALL_INSTRUCTION in system["content"]
    assert "[1] “Old talk 0”: Note this: " + fact in system["content"]
    shown = conversation(client, cid)["messages"][-1]
    assert shown["recall"] == sources                          # kept with the reply
    assert conversation(client, cid)["messages"][0]["recall"] is None
    events = read_events(client.stream(cid, question, recall=True)[0])
    assert events[-1]["recall"][0]["message_id"] == planted[fact][0]
    status, _, more = client.post("/api/chat", {"conversation_id": cid,   # the same sources
                                                "continue": body["message_id"]})
    assert status == 200 and more["recall"] == sources
    assert stub.requests[-1]["body"]["messages"][0]["content"] == system["content"]


def test_recall_is_a_setting_of_the_chat_the_conversation_and_config(client, stub):
    planted_history(client.engine.store, conversations=3)
    cid = client.new_conversation()
    assert "recall" not in client.chat(cid, PLANTED[1][1])[2]           # off by default
    assert client.put(f"/api/conversations/{cid}", {"options": {"recall": True}})[0] == 200
    assert client.chat(cid, PLANTED[1][1])[2]["recall"][0]["snippet"].startswith("Note this")
    assert "recall" not in client.chat(cid, PLANTED[1][1], recall=False)[2]   # the chat's
    effective = client.get(f"/api/conversations/{cid}")[2]["effective"]["options"]["recall"]
    assert effective == {"value": True, "from": "conversation"}
    for wrong in ("yes", 1):
        status, _, body = client.chat(cid, "q", recall=wrong)
        assert (status, body["code"], body["field"]) == (400, "VALIDATION_ERROR", "recall")
    status, _, body = client.chat(cid, "q", options={"recall": "on"})
    assert (status, body["field"]) == (400, "options.recall")
    assert "recall" not in stub.requests[-1]["body"]                   # never sent on


def test_recall_leaves_out_the_branch_it_answers_on(client, stub):
    cid = client.new_conversation()
    client.chat(cid, "The harbour lighthouse is painted ochre.")
    other = client.new_conversation("Elsewhere")
    client.chat(other, "The harbour ferry leaves at noon.")
    body = client.chat(cid, "What about the harbour?", recall=True)[2]
    found = {s["conversation_id"] for s in body["recall"]}
    assert found == {other}                            # this branch's own turns: not recalled


def test_recall_keeps_to_an_eighth_of_a_small_context(client, stub):
    stub.n_ctx = 512                                   # sources: at most 64 tokens
    store = client.engine.store
    for i in range(6):
        c = store.create_conversation(f"Glacier {i}", MODEL)
        store.add_message(c, "user", "Glaciers carve valleys slowly. " * 10 + f"Number {i}.")
    cid = client.new_conversation()
    sources = client.chat(cid, "Tell me about glaciers", recall=True)[2]["recall"]
    assert sources and sum(llama_chat.estimate_tokens(s["snippet"]) + llama_chat.SOURCE_MARKS
                           for s in sources) <= 512 // 8
    assert len(sources[0]["snippet"]) < 300 < len(
        client.engine.store.message_row(sources[0]["message_id"])["content"])   # cut to fit


def test_recall_finds_at_least_8_of_10_facts_asked_in_other_words(client, stub):
    planted = planted_history(client.engine.store)
    found = 0
    for fact, question in PLANTED:
        cid = client.new_conversation()
        sources = client.chat(cid, question, recall=True)[2].get("recall") or []
        found += planted[fact][0] in {s["message_id"] for s in sources}
    print(f"recall: {found} of {len(PLANTED)} planted facts among the sources")
    assert found >= 8


@pytest.mark.parametrize("content, at, expected", [
    ("One. Two has the word here. Three.", "word", "…Two has the word here. Three."),
    ("Alpha\n\nThe key is under the mat. Then more text follows here.", "key",
     "…The key is under the mat. Then more text follows here."),
    ("word " * 100 + "needle " + "word " * 100, "needle", None),
])
def test_a_passage_is_cut_at_sentence_bounds_never_mid_word(content, at, expected):
    spans = [[content.index(at), content.index(at) + len(at)]]
    text = llama_chat.passage(content, spans, 120)
    if expected is not None:
        assert text == expected
    assert at in text and len(text) <= 122
    inner = text.strip("…")
    start = content.index(inner)
    assert start == 0 or not content[start - 1].isalnum()          # never mid-word
    end = start + len(inner)
    assert end == len(content) or not content[end].isalnum()


def test_recall_looks_up_the_rarest_words_and_ranks_common_ones_in_a_window(tmp_path):
    store = llama_chat.Store(str(tmp_path / "r.db"))
    cid = store.create_conversation("t", MODEL)
    for i in range(6):
        store.add_message(cid, "user", f"apple banana note {i}")
    kiwi = store.add_message(cid, "user", "apple kiwi")
    store.add_message(cid, "user", "mango kiwi cherry")
    plum = store.add_message(cid, "user", "plum")
    index = store.index

    def best(words, most=8, common=5, limit=12):
        rows, used = index.best_matches(words, set(), limit, common, most)
        return [r["message_id"] for r in rows], used
    found, used = best(["apple", "kiwi", "absent"])
    assert used == ["kiwi"] and set(found) == {kiwi, kiwi + 1}       # apple (7 messages) left out
    assert best(["apple", "kiwi"], common=7)[1] == ["kiwi"]          # 7 of 7: common
    assert best(["apple", "kiwi"], common=8)[1] == ["kiwi", "apple"]  # rarest first
    found, used = best(["apple", "banana"])                          # all common: all of them
    assert sorted(used) == ["apple", "banana"] and len(found) == 6 and kiwi not in found
    assert best(["apple", "banana"], limit=2)[0] == [kiwi - 1, kiwi - 2]   # the newest
    assert best(["plum", "kiwi", "cherry"], most=2)[1] == ["cherry", "plum"]    # the rarest two
    assert best(["absent"]) == ([], []) and best([]) == ([], [])
    assert index.best_matches(["plum"], {plum}, 12, 5, 8)[0] == []    # its branch left out
    store.close()


def test_a_recalled_passage_is_cut_around_the_word_looked_up(tmp_path, monkeypatch):
    monkeypatch.setattr(llama_chat, "RECALL_COMMON", 5)
    store = llama_chat.Store(str(tmp_path / "r.db"))
    cid = store.create_conversation("t", MODEL)
    for i in range(6):
        store.add_message(cid, "user", f"apple note {i}")
    store.add_message(cid, "user", "An apple a day. " + "Filler words here. " * 80 +
                      "The kiwi is ripe on Tuesday.")
    engine = types.SimpleNamespace(store=store, upstream_for=lambda m: types.SimpleNamespace(
        context_of=lambda m: 4096))
    sources = llama_chat.recalled(engine, MODEL, "apple kiwi?", set())
    assert sources[0]["snippet"] == "…The kiwi is ripe on Tuesday."       # not the apple
    titled = store.create_conversation("Quince jam", MODEL)               # a title's match
    store.add_message(titled, "user", "Boil the fruit slowly.")
    assert llama_chat.recalled(engine, MODEL, "quince?", set()) == []     # is not a source
    store.close()


def test_recall_words_leave_out_stop_words_and_keep_other_scripts():
    query = llama_chat.recall_query("What is the name of my sister's cat? 火山 Κνωσός")
    assert query.words == ["name", "sister", "cat", "火", "山", "κνωσος"]
    assert query.match == '"name" OR "sister" OR "cat" OR "火" OR "山" OR "κνωσος"'
    assert llama_chat.recall_query("what is it?").match is None


def test_the_prompt_inspector_shows_what_recall_would_send(client, stub):
    planted = planted_history(client.engine.store, conversations=3)
    fact, question = PLANTED[0]
    cid = client.post("/api/conversations", {"model": MODEL, "options": {"recall": True}})[2][
        "conversation_id"]
    shown = client.get(f"/api/conversations/{cid}/prompt?message=" +
                       urllib.parse.quote(question))[2]
    assert (shown["recall"][0]["message_id"], shown["recall"][0]["conversation_id"]) == \
        planted[fact]
    assert fact in shown["messages"][0]["content"] and "[1]" in shown["messages"][0]["content"]
    assert client.get(f"/api/conversations/{cid}/prompt")[2]["recall"] == []   # no question
    client.put(f"/api/conversations/{cid}", {"options": None})
    assert client.get(f"/api/conversations/{cid}/prompt?message=" +
                      urllib.parse.quote(question))[2]["recall"] == []           # recall off


def test_a_mentioned_conversation_goes_with_the_question_and_is_named(client, stub):
    trip = client.new_conversation("Trip to Lisbon")
    stub.reply = "Book the 9:40 train to Sintra."
    client.chat(trip, "How do I get to Sintra?")
    cid = client.new_conversation("Packing")
    stub.reply = "Take a light jacket."
    status, _, body = client.chat(cid, "What should I pack for it?", mentions=[trip])
    assert status == 200, body
    leaf = conversation(client, trip)["messages"][-1]["id"]
    assert body["recall"] == [{"n": 1, "message_id": leaf, "conversation_id": trip,
                               "title": "Trip to Lisbon", "mention": True,
                               "snippet": "User: How do I get to Sintra?\n"
                                          "Assistant: Book the 9:40 train to Sintra."}]
    system = stub.requests[-1]["body"]["messages"][0]["content"]
    assert "[1] “Trip to Lisbon” (a conversation the user mentions): User: How do I get to " \
        "Sintra?\nAssistant: Book the 9:40 train to Sintra." in system
    assert conversation(client, cid)["messages"][-1]["recall"] == body["recall"]   # kept
    planted_history(client.engine.store, conversations=3)                # and with recall on
    body = client.chat(cid, PLANTED[1][1], mentions=[trip], recall=True)[2]
    assert [(s["n"], s.get("mention", False)) for s in body["recall"]][:2] == [(1, True),
                                                                                (2, False)]


def test_a_mention_keeps_the_newest_of_a_long_conversation_within_its_share(client, stub):
    stub.n_ctx = 1024                    # a quarter, 256 tokens: about 1,000 characters
    long = client.new_conversation("Long one")
    for i in range(30):
        client.engine.store.add_message(long, "user", f"question {i} " + "word " * 20)
    cid = client.new_conversation()
    source = client.chat(cid, "sum it up", mentions=[long])[2]["recall"][0]
    assert source["snippet"].startswith("…\nUser: question ")
    assert source["snippet"].endswith("question 29 " + "word " * 19 + "word")
    assert len(source["snippet"]) <= (1024 // 4 - llama_chat.SOURCE_MARKS) * 4
    twin = client.new_conversation("Long two")                 # two share the quarter
    for i in range(30):
        client.engine.store.add_message(twin, "user", f"line {i} " + "word " * 20)
    both = client.chat(cid, "compare them", mentions=[long, twin])[2]["recall"]
    assert [s["title"] for s in both] == ["Long one", "Long two"]
    assert all(len(s["snippet"]) <= (1024 // 4 // 2 - llama_chat.SOURCE_MARKS) * 4 for s in both)
    silent = client.new_conversation("Only an empty reply")     # nothing to send: no source
    client.engine.store.add_message(silent, "assistant", "  ")
    assert "recall" not in client.chat(cid, "and this?", mentions=[silent])[2]


@pytest.mark.parametrize("mentions, status", [
    ("1", 400), ([True], 400), ([1, 2, 3, 4], 400), ([0], 400), ("self", 400), ([999], 404)])
def test_mentions_are_checked_before_anything_is_stored(client, mentions, status):
    other = client.new_conversation("other")
    cid = client.new_conversation()
    answer = client.chat(cid, "q", mentions=[cid] if mentions == "self" else mentions)
    assert answer[0] == status and answer[2]["field" if status == 400 else "resource"] == (
        "mentions" if status == 400 else "conversation")
    assert rows(client, "SELECT count(*) FROM messages") == [(0,)]
    client.engine.store.add_message(other, "user", "something said")
    status, _, body = client.chat(cid, "q", mentions=[other, other])
    assert status == 200 and [s["conversation_id"] for s in body["recall"]] == [other]  # once
    three = [other] + [client.new_conversation(t) for t in ("b", "c")]
    assert client.chat(cid, "q", mentions=three)[0] == 200                  # three: the most


###############################################################################
# Projects
###############################################################################

def new_project(client, name="Work", **fields):
    status, _, body = client.post("/api/projects", {"name": name, **fields})
    assert status == 201 and body["success"] is True, body
    return body["project_id"]


def test_projects_are_made_listed_changed_and_deleted(client):
    pid = new_project(client, "Work", system_prompt="Be terse.", options={"top_k": 3})
    other = new_project(client, "Ärger 火山")
    cid = client.post("/api/conversations", {"model": MODEL, "project_id": pid})[2][
        "conversation_id"]
    listed = client.get("/api/projects")[2]["projects"]
    assert [(p["id"], p["name"], p["conversations"]) for p in listed] == [
        (pid, "Work", 1), (other, "Ärger 火山", 0)]
    assert listed[0]["system_prompt"] == "Be terse." and listed[0]["options"] == {"top_k": 3}
    assert client.put(f"/api/projects/{pid}", {"name": " Jobs ", "options": None})[2] == {
        "success": True, "name": "Jobs", "options": None}
    assert [p["name"] for p in client.get("/api/projects")[2]["projects"]] == ["Jobs",
                                                                                "Ärger 火山"]
    status, _, body = client.put(f"/api/projects/{other}", {"name": "Jobs"})
    assert (status, body["code"], body["field"]) == (409, "NAME_TAKEN", "name")
    status, _, body = client.post("/api/projects", {"name": "Jobs"})
    assert (status, body["code"]) == (409, "NAME_TAKEN")
    assert client.delete(f"/api/projects/{pid}")[0] == 200
    assert client.delete(f"/api/projects/{pid}")[2]["code"] == "NOT_FOUND"
    assert conversation(client, cid)["conversation"]["project_id"] is None   # kept, in none
    assert client.put("/api/projects/999", {"name": "x"})[0] == 404


@pytest.mark.parametrize("body, field", [
    ({}, "name"), ({"name": "  "}, "name"), ({"name": 3}, "name"), ({"name": "x" * 501}, "name"),
    ({"name": "p", "options": {"top_k": 0.5}}, "options.top_k"),
    ({"name": "p", "system_prompt": 1}, "system_prompt"), ({"name": "p", "pinned": True}, "pinned"),
])
def test_a_project_s_fields_are_checked(client, body, field):
    status, _, answer = client.post("/api/projects", body)
    assert (status, answer["code"], answer["field"]) == (400, "VALIDATION_ERROR", field)
    assert client.get("/api/projects")[2]["projects"] == []


def test_a_conversation_moves_between_projects_and_out(client):
    a, b = new_project(client, "A"), new_project(client, "B")
    cid = client.new_conversation()
    assert client.put(f"/api/conversations/{cid}", {"project_id": a})[2]["project_id"] == a
    assert conversation(client, cid)["conversation"]["project_id"] == a
    client.put(f"/api/conversations/{cid}", {"project_id": b})
    assert [c["project_id"] for c in client.get("/api/conversations")[2]["conversations"]] == [b]
    client.put(f"/api/conversations/{cid}", {"project_id": None})
    assert conversation(client, cid)["conversation"]["project_id"] is None
    for wrong, status in ((999, 404), ("1", 400), (True, 400)):
        assert client.put(f"/api/conversations/{cid}", {"project_id": wrong})[0] == status
        assert client.post("/api/conversations", {"model": MODEL, "project_id": wrong})[0] \
            == status
    assert conversation(client, cid)["conversation"]["project_id"] is None
    assert rows(client, "SELECT count(*) FROM conversations") == [(1,)]


def test_settings_come_from_the_chat_the_conversation_the_project_then_config(client, stub):
    pid = new_project(client, system_prompt="Project voice.",
                      options={"temperature": 0.4, "top_k": 4, "top_p": 0.4})
    cid = client.post("/api/conversations", {"model": MODEL, "project_id": pid,
                                              "options": {"top_k": 9}})[2]["conversation_id"]
    client.chat(cid, "hi", options={"top_p": 0.2})
    sent_body = stub.requests[-1]["body"]
    assert (sent_body["top_p"], sent_body["top_k"], sent_body["temperature"],
            sent_body["min_p"]) == (0.2, 9, 0.4, client.engine.settings.model_options["min_p"])
    assert sent_body["messages"][0] == {"role": "system", "content": "Project voice."}
    effective = conversation(client, cid)["effective"]
    assert effective["system_prompt"] == {"value": "Project voice.", "from": "project"}
    assert {n: effective["options"][n]["from"] for n in ("top_k", "temperature", "min_p")} == {
        "top_k": "conversation", "temperature": "project", "min_p": "config"}
    prompt = client.get(f"/api/conversations/{cid}/prompt")[2]
    assert prompt["messages"][0]["content"] == "Project voice." and prompt["options"][
        "temperature"] == 0.4
    client.put(f"/api/conversations/{cid}", {"system_prompt": "Own voice."})
    client.chat(cid, "again")
    assert stub.requests[-1]["body"]["messages"][0]["content"] == "Own voice."
    client.put(f"/api/conversations/{cid}", {"project_id": None})      # out of it: config's
    client.chat(cid, "more")
    assert stub.requests[-1]["body"]["temperature"] == client.engine.settings.model_options[
        "temperature"]


def test_v1_into_a_project_s_conversation_takes_what_the_request_leaves_out(client, stub,
                                                                             openai):
    pid = new_project(client, system_prompt="Project voice.", options={"temperature": 0.4,
                                                                       "top_k": 4})
    cid = client.post("/api/conversations", {"model": MODEL, "project_id": pid})[2][
        "conversation_id"]
    openai.create([user("hi")], top_k=8, headers={"X-Conversation-Id": str(cid)})
    sent_body = json.loads(stub.requests[-1]["raw"])
    assert sent_body["messages"] == [{"role": "system", "content": "Project voice."}, user("hi")]
    assert (sent_body["top_k"], sent_body["temperature"]) == (8, 0.4)        # the request's first
    openai.create([{"role": "system", "content": "Mine."}, user("hi")],
                  headers={"X-Conversation-Id": str(cid)})
    assert json.loads(stub.requests[-1]["raw"])["messages"][0]["content"] == "Mine."
    other = client.new_conversation()                                       # in no project
    openai.create([user("plain")], headers={"X-Conversation-Id": str(other)})
    assert json.loads(stub.requests[-1]["raw"]) == {"model": "gpt-4o-mini",
                                                    "messages": [user("plain")]}


def test_the_conversation_list_is_narrowed_by_title_and_project(client):
    pid = new_project(client)
    vienna = client.post("/api/conversations", {"title": "Letters from Vienna", "model": MODEL,
                                                 "project_id": pid})[2]["conversation_id"]
    sale = client.new_conversation("50% off_sale")
    other = client.new_conversation("Vienna again")

    def listed(query):
        return [c["id"] for c in client.get(f"/api/conversations?{query}")[2]["conversations"]]
    assert listed("q=VIEN") == [other, vienna]
    assert listed("q=%25") == [sale] and listed("q=f_s") == [sale]    # LIKE's marks are text
    assert listed(f"project={pid}") == [vienna] and listed(f"q=again&project={pid}") == []
    assert client.get("/api/conversations?q=" + "x" * 501)[2]["field"] == "q"


def test_search_can_be_narrowed_to_a_project(client):
    pid = new_project(client)
    inside = client.post("/api/conversations", {"model": MODEL, "project_id": pid})[2][
        "conversation_id"]
    outside = client.new_conversation()
    for cid in (inside, outside):
        client.engine.store.add_message(cid, "user", "the quarterly harbour report")
    everywhere = client.get("/api/search?q=harbour")[2]["results"]
    assert sorted(r["conversation_id"] for r in everywhere) == sorted([inside, outside])
    narrowed = client.get(f"/api/search?q=harbour&project={pid}")[2]["results"]
    assert [r["conversation_id"] for r in narrowed] == [inside]
    assert client.get("/api/search?q=harbour&project=999")[2]["results"] == []
    assert client.get("/api/search?q=harbour&project=x")[2]["field"] == "project"


def test_search_without_fts5_is_narrowed_to_a_project_too(tmp_path):
    store = llama_chat.Store(str(tmp_path / "like.db"), use_fts=False)
    pid = store.projects.create("P")
    inside = store.create_conversation("in", MODEL, project_id=pid)
    outside = store.create_conversation("out", MODEL)
    for cid in (inside, outside):
        store.add_message(cid, "user", "harbour report")
    assert [r["conversation_id"] for r in store.search("harbour", 5, pid)] == [inside]
    assert len(store.search("harbour", 5)) == 2
    store.close()


def test_projects_are_exported_with_their_conversations_and_imported_by_name(client, tmp_path):
    pid = new_project(client, "Research", system_prompt="Cite.", options={"top_k": 2})
    cid = client.post("/api/conversations", {"title": "in it", "model": MODEL,
                                              "project_id": pid})[2]["conversation_id"]
    client.chat(cid, "hello")
    loose = client.new_conversation("loose")
    client.chat(loose, "hello")
    exported = client.get("/api/export?format=jsonl")[2]
    lines = [json.loads(line) for line in exported.splitlines()]
    assert lines[0]["conversation"]["project"] == {"name": "Research", "system_prompt": "Cite.",
                                                   "options": {"top_k": 2}}
    assert "project" not in lines[1]["conversation"] and lines[1]["conversation"]["id"] == loose
    store = llama_chat.Store(str(tmp_path / "other.db"))
    kept = store.projects.create("Research", "Other words.")         # found by name, kept
    path = tmp_path / "export.jsonl"
    path.write_bytes(exported)
    with open(path, "rb") as f:
        llama_chat.import_file(store, f, company="none")
    assert [(p["name"], p["system_prompt"], p["conversations"]) for p in store.projects.all()] \
        == [("Research", "Other words.", 1)]
    titled = {c["title"]: c["project_id"] for c in json.loads(store.list_conversations())}
    assert titled == {"in it": kept, "loose": None}
    fresh = llama_chat.Store(str(tmp_path / "fresh.db"))           # made where there is none
    with open(path, "rb") as f:
        llama_chat.import_file(fresh, f, company="none")
    assert [(p["name"], p["system_prompt"], p["options"]) for p in fresh.projects.all()] == [
        ("Research", "Cite.", {"top_k": 2})]
    store.close()
    fresh.close()


def test_an_import_undone_takes_the_projects_it_made_with_it(tmp_path, monkeypatch):
    monkeypatch.setattr(llama_chat, "IMPORT_READ", (1, 1))      # each conversation written at once
    store = llama_chat.Store(str(tmp_path / "u.db"))
    kept = store.projects.create("Kept")
    items = [{"conversation": {"id": n + 1, "title": f"t{n}", "project": {"name": name}},
              "messages": [{"id": 1, "role": "user", "content": "q"}]}
             for n, name in enumerate(("Kept", "Made here"))]
    path = tmp_path / "f.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items) + "{broken\n")
    with open(path, "rb") as f, pytest.raises(llama_chat.ApiError):
        llama_chat.import_file(store, f)
    assert json.loads(store.list_conversations()) == []
    assert [(p["id"], p["name"]) for p in store.projects.all()] == [(kept, "Kept")]
    store.close()


def test_an_imported_project_without_a_name_is_left_out_and_said(tmp_path):
    store = llama_chat.Store(str(tmp_path / "p.db"))
    item = {"conversation": {"title": "t", "project": {"system_prompt": "x"}},
            "messages": [{"id": 1, "role": "user", "content": "q"}]}
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(item) + "\n")
    with open(path, "rb") as f:
        counts = llama_chat.import_file(store, f, company="none")
    assert store.projects.all() == []
    assert json.loads(store.list_conversations())[0]["project_id"] is None
    assert "project has no name" in json.dumps(counts)
    store.close()


def test_project_changes_are_told_to_every_page(client):
    with listening(client) as heard:
        pid = new_project(client)
        cid = client.new_conversation()
        client.put(f"/api/conversations/{cid}", {"project_id": pid})
        client.put(f"/api/projects/{pid}", {"name": "Renamed"})
        client.delete(f"/api/projects/{pid}")
        heard_of(heard, {"type": "project", "action": "deleted", "id": pid})
    assert {"type": "project", "action": "created", "id": pid} in heard
    assert {"type": "project", "action": "updated", "id": pid} in heard
    assert heard.count({"type": "conversation", "action": "updated", "id": cid}) == 2  # in, out


def test_a_schema_12_database_gains_projects(tmp_path):
    path = str(tmp_path / "v12.db")

    def fill(c):
        c.execute("INSERT INTO conversations (title, model) VALUES ('kept', 'm')")
    store = migrated(path, fill, 12)
    assert json.loads(store.list_conversations())[0]["project_id"] is None
    pid = store.projects.create("P")
    assert store.update_conversation(1, project_id=pid) == {"project_id": pid}
    assert store.projects.all()[0]["conversations"] == 1
    store.close()


###############################################################################
# Chat
###############################################################################

def test_chat_answers_with_the_reference_fields(client, stub):
    cid = client.new_conversation()
    status, _, body = client.chat(cid)
    assert status == 200
    assert body["success"] is True
    assert body["response"] == stub.reply
    assert body["model"] == MODEL
    assert isinstance(body["response_time_ms"], int) and body["response_time_ms"] >= 0
    assert body["estimated_tokens"] == len(stub.tokens())
    assert body["metrics"] == {"completion_tokens": len(stub.tokens()), "prompt_tokens": 21,
                               "total_tokens": 21 + len(stub.tokens()), "tokens_per_second": 42.5}
    assert body["finish_reason"] == "stop"
    stored = rows(client, "SELECT id, role, content FROM messages ORDER BY id")
    assert stored == [(body["user_message_id"], "user", "Explain machine learning"),
                      (body["message_id"], "assistant", stub.reply)]


def test_chat_metrics_fall_back_to_timings_then_an_estimate(client, stub):
    stub.mode = "no_usage"
    stub.reply = "x" * 400
    body = client.chat(client.new_conversation())[2]
    assert body["metrics"]["prompt_tokens"] == 21         # from timings.prompt_n
    assert body["estimated_tokens"] == 1                  # from timings.predicted_n
    stub.mode = "no_counts"                               # neither usage nor timings
    body = client.chat(client.new_conversation())[2]
    assert body["estimated_tokens"] == body["metrics"]["completion_tokens"] == 100   # 400 / 4
    assert body["metrics"]["prompt_tokens"] is None and body["metrics"]["total_tokens"] is None


def test_chat_sends_system_prompt_history_and_mapped_options(client, stub):
    cid = client.new_conversation()
    client.chat(cid, "first")
    client.chat(cid, "second", options={"temperature": 0.7, "num_predict": 64, "seed": 3})
    sent = stub.requests[-1]["body"]
    assert sent["messages"] == [
        {"role": "system", "content": llama_chat.DEFAULT_CONFIG["system_prompt"]},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": stub.reply},
        {"role": "user", "content": "second"},
    ]
    assert sent["model"] == MODEL and sent["stream"] is True     # the server's reply, streamed
    assert sent["stream_options"] == {"include_usage": True} and sent["return_progress"] is True
    assert sent["cache_prompt"] is True                       # the prefix read once, kept
    assert sent["temperature"] == 0.7 and sent["max_tokens"] == 64 and sent["seed"] == 3
    assert sent["top_k"] == 50 and sent["stop"] == ["\n\nHuman:", "\n\nUser:"]
    assert set(sent) <= {"messages", "stream", "stream_options", "return_progress", "model",
                         "cache_prompt", "temperature", "top_p", "top_k", "min_p", "max_tokens",
                         "repeat_penalty", "stop", "seed", "reasoning_control"}


def test_chat_history_is_limited_and_alternates(tmp_path, stub, launch):
    settings_perf = {**llama_chat.DEFAULT_CONFIG["performance"], "context_history_limit": 3}
    server = launch(stub.url, performance=settings_perf)
    c = Client(server)
    cid = c.new_conversation()
    for word in ["one", "two", "three"]:
        c.chat(cid, word)
    stub.mode = "error500"
    c.chat(cid, "four")                    # fails: two user messages in a row now
    stub.mode = "ok"
    c.chat(cid, "five")
    sent = stub.requests[-1]["body"]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert [sent[1]["content"], sent[3]["content"]] == ["three", "five"]    # four: unanswered


def test_retry_answers_the_stored_message_without_storing_it_again(client, stub):
    cid = client.new_conversation()
    client.chat(cid, "first")
    stub.mode = "error500"
    failed = client.chat(cid, "second")[2]
    stub.mode = "ok"
    status, _, body = client.post("/api/chat", {"conversation_id": cid, "model": MODEL,
                                                "user_message_id": failed["user_message_id"]})
    assert status == 200 and body["user_message_id"] == failed["user_message_id"]
    assert [m["content"] for m in stub.requests[-1]["body"]["messages"][1:]] == [
        "first", stub.reply, "second"]
    assert [r[0] for r in rows(client, "SELECT content FROM messages ORDER BY id")] == [
        "first", stub.reply, "second", stub.reply]


def test_retry_after_a_partial_reply_leaves_the_partial_out_of_the_context(client, stub):
    cid = client.new_conversation()
    stub.mode = "cut"
    events = read_events(client.stream(cid, "tell me")[0])
    assert events[-1]["type"] == "error" and events[-1]["message_id"]
    stub.mode = "ok"
    status, _, body = client.post("/api/chat", {"conversation_id": cid, "model": MODEL,
                                                "user_message_id": events[-1]["user_message_id"]})
    assert status == 200
    assert [m["content"] for m in stub.requests[-1]["body"]["messages"][1:]] == ["tell me"]


def test_retry_of_an_answered_question_is_a_regenerate(client, stub):
    cid = client.new_conversation()
    first = client.chat(cid, "first")[2]
    client.chat(cid, "second")
    status, _, body = client.post("/api/chat", {"conversation_id": cid, "model": MODEL,
                                                "user_message_id": first["user_message_id"]})
    assert status == 200 and body["parent_id"] == first["user_message_id"]
    assert [m["content"] for m in stub.requests[-1]["body"]["messages"][1:]] == ["first"]
    conversation = client.get(f"/api/conversations/{cid}")[2]
    assert [m["id"] for m in conversation["messages"]] == [first["user_message_id"],
                                                          body["message_id"]]
    assert conversation["messages"][1]["sibling_ids"] == [first["message_id"], body["message_id"]]


@pytest.mark.parametrize("which", ["unknown", "assistant", "other conversation"])
def test_retry_of_anything_but_a_question_of_the_conversation_is_refused(client, which):
    cid = client.new_conversation()
    body = client.chat(cid, "first")[2]
    other = client.chat(client.new_conversation(), "elsewhere")[2]
    target = {"unknown": 999, "assistant": body["message_id"],
              "other conversation": other["user_message_id"]}[which]
    status, _, answer = client.post("/api/chat", {"conversation_id": cid, "model": MODEL,
                                                  "user_message_id": target})
    if which == "assistant":
        assert (status, answer["code"], answer["field"]) == (400, "VALIDATION_ERROR",
                                                             "user_message_id")
    else:
        assert (status, answer["code"], answer["resource"], answer["id"]) == (
            404, "NOT_FOUND", "message", target)
    assert rows(client, "SELECT count(*) FROM messages")[0][0] == 4


@pytest.mark.parametrize("stream", [False, True])
def test_history_longer_than_the_context_is_trimmed_oldest_first(client, stub, stream):
    cid = client.new_conversation()
    for i in range(6):
        client.chat(cid, f"question {i} " + "x" * 200)
    stub.context_chars = 4 * (len(stub.reply) + 210)
    if stream:
        events = read_events(client.stream(cid, "last question")[0])
        assert events[-1]["type"] == "done"
    else:
        assert client.chat(cid, "last question")[0] == 200
    sent = [m["content"] for m in stub.requests[-1]["body"]["messages"]]
    assert sent[0] == llama_chat.DEFAULT_CONFIG["system_prompt"] and sent[-1] == "last question"
    assert sum(map(len, sent[1:])) <= stub.context_chars and len(sent) > 3
    assert stub.requests[-1]["body"]["messages"][1]["role"] == "user"


@pytest.mark.parametrize("stream", [False, True])
def test_a_slow_prompt_outlasts_the_wait_between_tokens_but_not_the_first_token_s(
        tmp_path, stub, launch, stream):
    c = Client(launch(stub.url, timeouts={"llamacpp_timeout": 0.25, "llamacpp_connect_timeout": 2,
                                          "first_token_timeout": 3}))
    cid = c.new_conversation()
    stub.stall = 0.6                                # reading the prompt: nothing for 0.6 s
    if stream:
        events = read_events(c.stream(cid, "a long history")[0])
        assert events[-1]["type"] == "done", events[-1]
    else:
        assert c.chat(cid, "a long history")[0] == 200
    stub.stall, stub.token_delay = 0, 0.6            # then slow tokens: cut
    if stream:
        events = read_events(c.stream(cid, "slow tokens")[0])
        assert events[-1]["type"] == "error", events[-1]
    c2 = Client(launch(stub.url, timeouts={"llamacpp_timeout": 0.25,
                                           "llamacpp_connect_timeout": 2}))
    stub.stall, stub.token_delay = 0.6, 0
    status, _, body = c2.chat(c2.new_conversation(), "no first-token limit set")
    assert (status, body["code"]) == (504, "LLAMACPP_TIMEOUT")   # the old limit, as before


def test_a_question_longer_than_the_context_is_an_error(client, stub):
    stub.context_chars = 100
    status, _, body = client.chat(client.new_conversation(), "y" * 500)
    assert (status, body["code"]) == (502, "LLAMACPP_ERROR")
    assert "exceeds the available context size" in body["details"]


def test_https_llamacpp_url_speaks_tls(tmp_path, stub, launch):
    server = launch(stub.url.replace("http://", "https://"))
    c = Client(server)
    status, _, body = c.chat(c.new_conversation())
    assert (status, body["code"]) == (502, "LLAMACPP_ERROR")     # the stub speaks plain http
    assert "SSL" in body["details"] or "ssl" in body["details"].lower()


def test_llamacpp_key_goes_upstream_only(tmp_path, stub, launch):
    server = launch(stub.url, llamacpp_api_key="upstream-key")
    c = Client(server)
    status, _, body = c.chat(c.new_conversation())
    assert status == 200
    assert stub.requests[-1]["headers"]["Authorization"] == "Bearer upstream-key"
    assert "upstream-key" not in json.dumps(c.get("/api/config")[2])


def test_chat_to_unknown_conversation_is_not_found(client):
    status, _, body = client.chat(42)
    assert (status, body["code"], body["resource"], body["id"]) == (404, "NOT_FOUND",
                                                                    "conversation", 42)
    assert rows(client, "SELECT count(*) FROM messages")[0][0] == 0


@pytest.mark.parametrize("mode, status, code", [
    ("error500", 502, "LLAMACPP_ERROR"),
    ("garbage", 502, "LLAMACPP_ERROR"),
    ("stall", 504, "LLAMACPP_TIMEOUT"),
])
def test_upstream_failures_keep_the_users_message(client, stub, mode, status, code):
    stub.mode = mode
    if mode == "stall":
        client.engine.upstream.read_timeout = client.engine.upstream.first_token_timeout = 0.5
        stub.stall = 1
    cid = client.new_conversation()
    got, _, body = client.chat(cid, "please keep me")
    assert (got, body["code"]) == (status, code)
    assert body["success"] is False and body["details"]
    assert rows(client, "SELECT id, role, content FROM messages") == [
        (body["user_message_id"], "user", "please keep me")]


def test_llamacpp_down_answers_502_and_keeps_the_message(down_client):
    cid = down_client.new_conversation()
    status, _, body = down_client.chat(cid, "hello?")
    assert (status, body["code"]) == (502, "LLAMACPP_ERROR")
    assert "Connection refused" in body["details"]
    assert rows(down_client, "SELECT role, content FROM messages") == [("user", "hello?")]


def test_reasoning_is_stored_apart_and_never_sent_back(client, stub):
    stub.reasoning = "Let me think about this."
    cid = client.new_conversation()
    body = client.chat(cid)[2]
    assert body["reasoning"] == stub.reasoning and body["response"] == stub.reply
    message = client.get(f"/api/conversations/{cid}")[2]["messages"][1]
    assert message["reasoning"] == stub.reasoning and message["content"] == stub.reply
    client.chat(cid, "again")
    assert "think" not in json.dumps(stub.requests[-1]["body"]["messages"])


def test_twenty_concurrent_chats_all_answer_and_are_stored(client, stub):
    stub.token_delay = 0.001
    cids = [client.new_conversation(f"c{i}") for i in range(20)]
    results = [None] * 20

    def worker(i):
        results[i] = client.chat(cids[i], f"question {i}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r[0] for r in results] == [200] * 20
    assert all(r[2]["response"] == stub.reply for r in results)
    assert rows(client, "SELECT count(*) FROM messages")[0][0] == 40
    for i, cid in enumerate(cids):
        assert rows(client, "SELECT content FROM messages WHERE conversation_id = ? ORDER BY id",
                    cid) == [(f"question {i}",), (stub.reply,)]


###############################################################################
# Streaming
###############################################################################

def test_stream_relays_deltas_then_done(client, stub):
    cid = client.new_conversation()
    resp, conn = client.stream(cid)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = read_events(resp)
    conn.close()
    deltas = [e for e in events if e["type"] == "delta"]
    assert "".join(d["content"] for d in deltas) == stub.reply
    assert len(deltas) == len(stub.tokens())
    done = events[-1]
    assert done["type"] == "done" and [e["type"] for e in events].count("done") == 1
    assert done["response"] == stub.reply
    assert done["metrics"]["completion_tokens"] == len(stub.tokens())
    assert done["metrics"]["prompt_tokens"] == 21
    assert stub.requests[-1]["body"]["stream_options"] == {"include_usage": True}
    assert rows(client, "SELECT id, content, finish_reason FROM messages WHERE role = "
                "'assistant'") == [(done["message_id"], stub.reply, "stop")]


@pytest.mark.parametrize("split", [1, 7, 4096])
def test_chunked_bodies_decode_across_any_read_boundaries(split):
    events = b"".join(b"data: {\"n\": %d}\n\n" % i for i in range(50)) + b"data: [DONE]\n\n"
    wire = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(events[i:i + 13]), events[i:i + 13])
                    for i in range(0, len(events), 13)) + b"0\r\n\r\n"

    class Response:
        chunked = True

        class fp:
            pieces = [wire[i:i + split] for i in range(0, len(wire), split)]

            @classmethod
            def read1(cls, n):
                return cls.pieces.pop(0) if cls.pieces else b""

    read, body = llama_chat.body_reader(Response), b""
    while data := read():
        body += data
    assert body == events


def test_a_chunked_burst_s_first_read_is_short():
    """A burst already arrived whole: the first read passes on its first
    tokens (FIRST_READ bytes at most), the next takes the rest at once."""
    events = b"".join(b"data: {\"n\": %d}\n\n" % i for i in range(1000))
    wire = b"".join(b"%x\r\n%s\r\n" % (len(events[i:i + 16]), events[i:i + 16])
                    for i in range(0, len(events), 16)) + b"0\r\n\r\n"

    class Response:
        chunked = True

        class fp:
            left = wire

            @classmethod
            def read1(cls, n):
                taken, cls.left = cls.left[:n], cls.left[n:]
                return taken

    read = llama_chat.body_reader(Response)
    first, rest = read(), read()
    assert 0 < len(first) < llama_chat.FIRST_READ < len(rest) and first + rest == events


def test_stream_from_an_unchunked_upstream(client, stub):
    stub.mode = "unchunked"
    events = read_events(client.stream(client.new_conversation())[0])
    assert events[-1]["type"] == "done" and events[-1]["response"] == stub.reply


def test_stream_deltas_arrive_before_llamacpp_finishes(client, stub):
    stub.reply = " ".join(f"w{i}" for i in range(20))
    stub.token_delay = 0.05
    resp, conn = client.stream(client.new_conversation())
    started = time.monotonic()
    events = []
    while len(events) < 2:
        line = resp.readline()
        if line.startswith(b"data: "):
            events.append(json.loads(line[6:]))
    assert [e["type"] for e in events] == ["start", "delta"]
    assert time.monotonic() - started < 0.5       # the whole reply takes over 1 s
    conn.close()


def message_row(client, message_id):
    return client.engine.store.message_row(message_id)


def slow_first_write(monkeypatch, seconds):
    """The client's thread waits `seconds` after each batch it writes before
    the reply's first text (as on a busy machine); the batches it writes, as
    lists of the text of their deltas, are returned."""
    follow, written = llama_chat.followed, []

    def followed(*args, **kwargs):
        for batch in follow(*args, **kwargs):
            texts = [e["content"] for _, e in batch or () if e["type"] == "delta"]
            if texts:
                written.append(texts)
            yield batch
            if batch and not written:
                time.sleep(seconds)
    monkeypatch.setattr(llama_chat, "followed", followed)
    return written


def test_a_burst_s_first_token_is_written_before_the_rest_is_read(client, stub, monkeypatch):
    """llama.cpp sends 400 tokens at once: the reply's thread hands its first
    text to the client's thread and waits until it is written, instead of
    reading on through the burst (the first write then held all of it)."""
    monkeypatch.setattr(llama_chat, "FIRST_HANDOFF_S", 5)
    stub.reply = " ".join(f"t{i}" for i in range(400))
    stub.progress_steps, stub.progress_delay = 2, 0.4   # written before the first text
    published, publish = [], llama_chat.OwnedReply.publish
    monkeypatch.setattr(llama_chat.OwnedReply, "publish", lambda self, events: (
        published.append([e["content"] for e in events if e["type"] == "delta"]),
        publish(self, events))[1])
    written = slow_first_write(monkeypatch, 0.3)
    events = read_events(client.stream(client.new_conversation(), "go")[0])
    first = next(texts for texts in published if texts)
    assert written[0] == first and len(first) < 400                 # alone, first
    assert "".join(sum(written, [])) == stub.reply == events[-1]["response"]


def test_a_reply_waits_for_its_first_write_only_so_long(client, stub, monkeypatch):
    """A client that does not take the first text in FIRST_HANDOFF_S holds
    nothing up: the reply goes on and is stored whole meanwhile."""
    monkeypatch.setattr(llama_chat, "FIRST_HANDOFF_S", 0.05)
    stub.reply = " ".join(f"t{i}" for i in range(400))
    written = slow_first_write(monkeypatch, 1.5)
    cid = client.new_conversation()
    resp = client.stream(cid, "go")[0]
    wait_for(lambda: rows(client, "SELECT count(*) FROM messages WHERE role = 'assistant' "
                                  "AND generating IS NULL")[0][0] == 1, 1.2, "the reply stored")
    assert not written                                   # before the client wrote anything
    assert read_events(resp)[-1]["response"] == stub.reply


def started_reasoning(client, stub):
    """A streamed reply under way in its reasoning (20 words, 50 ms each):
    (its message id, the thread reading its events, the events so far)."""
    stub.reasoning = " ".join(f"step{i}" for i in range(20))
    stub.token_delay = 0.05
    cid = client.new_conversation()
    events, resp = [], client.stream(cid, "think then answer")[0]

    def read():
        for line in resp:
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
    reader = threading.Thread(target=read)
    reader.start()
    wait_for(lambda: any(e["type"] == "reasoning" for e in events), 10, "reasoning")
    return events[0]["message_id"], reader, events


def test_answer_now_ends_the_reasoning_through_llama_server_s_control(client, stub):
    message_id, reader, events = started_reasoning(client, stub)
    status, _, body = client.post(f"/api/messages/{message_id}/answer-now", {})
    assert (status, body) == (200, {"success": True, "message_id": message_id,
                                    "answer_now": "reasoning_end"})
    reader.join(10)
    chat = [r["body"] for r in stub.requests if r["path"] == "/v1/chat/completions"]
    assert chat[-1]["reasoning_control"] is True                # armed on every chat
    assert stub.controls == [{"id": f"chatcmpl-stub{stub.completions}",
                              "action": "reasoning_end", "model": chat[-1]["model"]}]
    reply = message_row(client, message_id)
    assert reply["content"] == stub.reply and reply["finish_reason"] == "stop"
    assert 0 < len(reply["reasoning"]) < len(stub.reasoning)   # cut short
    assert events[-1]["type"] == "done"
    again = client.post(f"/api/messages/{message_id}/answer-now", {})
    assert (again[0], again[2]["code"]) == (409, "NOT_GENERATING")
    assert client.post("/api/messages/99999/answer-now", {})[0] == 404


def test_a_reply_that_said_done_is_no_longer_being_made(client, stub, monkeypatch):
    """A client that read "done" and at once asks for answer-now, a stop or
    the reply's stream meets the stored reply, even while the reply's thread
    is still letting go of llama.cpp's connection (slowed here)."""
    closing = llama_chat.OwnedReply.close
    monkeypatch.setattr(llama_chat.OwnedReply, "close",
                        lambda self: (time.sleep(0.5), closing(self)))
    message_id, reader, events = started_reasoning(client, stub)
    reader.join(10)
    assert events[-1]["type"] == "done"
    again = client.post(f"/api/messages/{message_id}/answer-now", {})
    assert (again[0], again[2]["code"]) == (409, "NOT_GENERATING")
    status, _, body = client.post(f"/api/messages/{message_id}/stop", {})
    assert (status, body["stopped"], body["generating"]) == (200, False, False)
    assert client.engine.generation_of(message_id) is None


def test_answer_now_without_reasoning_control_stops_and_continues_without_thinking(
        client, stub):
    stub.reasoning_control = False                             # an older llama-server
    message_id, reader, events = started_reasoning(client, stub)
    status, _, body = client.post(f"/api/messages/{message_id}/answer-now", {})
    assert (status, body) == (200, {"success": True, "message_id": message_id,
                                    "answer_now": "continued"})
    reader.join(10)
    assert events[-1]["type"] == "done"                        # the stop, told to its reader
    wait_for(lambda: message_row(client, message_id)["content"] == stub.reply, 10,
             "the continue's answer")
    continued = [r["body"] for r in stub.requests if r["path"] == "/v1/chat/completions"][-1]
    assert continued["chat_template_kwargs"] == {"enable_thinking": False}
    assert all("step" not in (m.get("content") or "") for m in continued["messages"])
    reply = message_row(client, message_id)
    assert reply["reasoning"].startswith("step0") and len(reply["reasoning"]) < len(
        stub.reasoning)                                          # what it thought: kept


def test_answer_now_that_llama_server_refuses_stops_and_continues(client, stub):
    message_id, reader, events = started_reasoning(client, stub)
    stub.armed.clear()           # as for a template it knows no thinking tags of: not armed
    body = client.post(f"/api/messages/{message_id}/answer-now", {})[2]
    assert body["answer_now"] == "continued" and len(stub.controls) == 1
    reader.join(10)
    wait_for(lambda: message_row(client, message_id)["content"] == stub.reply, 10,
             "the continue's answer")


def test_answer_now_once_the_answer_has_begun_changes_nothing(client, stub):
    stub.token_delay, stub.reply = 0.05, " ".join(["word"] * 80)
    cid = client.new_conversation()
    resp = client.stream(cid, "q")[0]
    first = json.loads(next(line for line in resp if line.startswith(b"data: "))[6:])
    wait_for(lambda: message_row(client, first["message_id"])["content"], 10, "the answer begun")
    body = client.post(f"/api/messages/{first['message_id']}/answer-now", {})[2]
    assert body["answer_now"] is None and stub.controls == []
    read_events(resp)


def test_stream_reasoning_events_are_relayed(client, stub):
    stub.reasoning = "Thinking hard."
    events = read_events(client.stream(client.new_conversation())[0])
    assert "".join(e["content"] for e in events if e["type"] == "reasoning") == stub.reasoning
    assert events[-1]["reasoning"] == stub.reasoning


def test_a_client_that_hangs_up_mid_stream_leaves_the_reply_to_be_made_whole(client, stub):
    stub.reply = " ".join(f"w{i}" for i in range(100))
    stub.token_delay = 0.01
    cid = client.new_conversation()
    resp, conn = client.stream(cid)
    relayed = []
    while len(relayed) < 5:
        line = resp.readline().strip()
        if line.startswith(b"data: "):
            relayed.append(json.loads(line[6:]))
    assert relayed[0]["type"] == "start" and relayed[0]["message_id"]
    conn.shutdown(socket.SHUT_RDWR)
    conn.close()
    resp.close()
    wait_for(lambda: rows(client, "SELECT generating FROM messages WHERE id = ?",
                          relayed[0]["message_id"]) == [(None,)], 10, "the reply made")
    assert rows(client, "SELECT content, finish_reason FROM messages WHERE role = "
                "'assistant'") == [(stub.reply, "stop")]           # whole, as if it had stayed


def stream_started(client, cid, message="go"):
    """A chat streamed into cid, read up to its start event: (response, start)."""
    resp, conn = client.stream(cid, message)
    while True:
        line = resp.readline()
        assert line, "the stream ended before its start event"
        if line.startswith(b"data: "):
            event = json.loads(line[6:])
            assert event["type"] == "start"
            return resp, event


def test_a_question_is_synced_while_llama_cpp_reads_and_before_anything_is_relayed(
        client, stub, monkeypatch):
    """The question's commit is not waited for before llama.cpp is asked:
    its WAL is synced meanwhile, and the stream's first event comes after."""
    synced, real_sync = [], llama_chat.Database.sync_wal

    def slow_sync(db):
        time.sleep(0.3)                          # a slow disk
        real_sync(db)
        synced.append((time.monotonic(), len(stub.requests)))
    monkeypatch.setattr(llama_chat.Database, "sync_wal", slow_sync)
    cid = client.new_conversation()
    asked = time.monotonic()
    resp, start = stream_started(client, cid)
    seen = time.monotonic()
    resp.read()
    assert len(synced) == 1 and synced[0][0] <= seen and seen - asked >= 0.3
    assert synced[0][1] == 1                     # llama.cpp was asked while it synced
    assert client.chat(cid, "plain")[0] == 200 and len(synced) == 2    # a plain chat: first
    regenerate(client, cid, start["user_message_id"])
    assert len(synced) == 2                      # nothing new stored: nothing to sync


def test_a_question_that_cannot_be_synced_ends_its_reply_with_a_database_error(
        client, stub, monkeypatch):
    stub.reply = " ".join(f"w{i}" for i in range(200))
    stub.token_delay = 0.01

    def failing_sync(db):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(llama_chat.Database, "sync_wal", failing_sync)
    cid = client.new_conversation()
    for stream in (True, False):
        status, _, body = client.chat(cid, "q", stream=stream)
        assert (status, body["code"]) == (503, "DATABASE_ERROR"), body
        assert "could not be synced" in body["error"] and body["user_message_id"]
    wait_for(lambda: not client.engine.generations, 10, "the replies ended")
    assert rows(client, "SELECT count(*) FROM messages WHERE generating IS NOT NULL") == [(0,)]
    stub.reply = " ".join(f"w{i}" for i in range(2000))       # 20 s of it: ended, not waited for
    assert client.chat(cid, "q", stream=True)[0] == 503
    assert not client.engine.generations
    assert rows(client, "SELECT finish_reason FROM messages ORDER BY id DESC LIMIT 1") != [
        ("stop",)]


def test_the_wal_is_synced_only_in_wal_mode(tmp_path):
    store = llama_chat.Store(str(tmp_path / "w.db"))
    cid = store.create_conversation("t", MODEL)
    assert store.ask(cid, "q", synced=False) and store.db._wal is True
    store.db.sync_wal()                          # the file's WAL, synced
    assert store.db.conn().execute("PRAGMA synchronous").fetchone() == (2,)   # FULL again
    store.db._wal = False
    os.rename(store.db.path + "-wal", store.db.path + "-gone")
    store.db.sync_wal()                          # no WAL: nothing to do (no error)
    os.rename(store.db.path + "-gone", store.db.path + "-wal")
    store.close()


def test_a_reply_is_stopped_from_another_client_and_keeps_what_it_made(client, stub):
    stub.reply = " ".join(f"w{i}" for i in range(300))
    stub.token_delay = 0.01
    cid = client.new_conversation()
    resp, start = stream_started(client, cid)
    wait_for(lambda: len(rows(client, "SELECT content FROM messages WHERE id = ?",
                              start["message_id"])[0][0]) > 0, 5, "text kept as it comes")
    status, _, body = client.post(f"/api/messages/{start['message_id']}/stop", {})
    assert (status, body["stopped"]) == (200, True)
    events = read_events(resp)
    done = events[-1]
    assert (done["type"], done["finish_reason"], done["message_id"]) == (
        "done", "aborted", start["message_id"])
    shown = "".join(e["content"] for e in events if e["type"] == "delta")
    stored = rows(client, "SELECT content, finish_reason, generating FROM messages WHERE id = ?",
                  start["message_id"])
    assert stored == [(done["response"], "aborted", None)] and 0 < len(shown) <= len(
        done["response"]) < len(stub.reply)
    again = client.post(f"/api/messages/{start['message_id']}/stop", {})[2]
    assert (again["stopped"], again["generating"]) == (False, False)     # nothing to stop
    assert client.post("/api/messages/9999/stop", {})[0] == 404


def followed_events(client, message_id, query="", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=30)
    conn.request("GET", f"/api/messages/{message_id}/stream{query}", headers=headers or {})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    ids, events = [], []
    for line in resp:
        if line.startswith(b"id: "):
            ids.append(int(line[4:]))
        elif line.startswith(b"data: "):
            events.append(json.loads(line[6:]))
    return ids, events


def test_a_reply_stopped_before_its_first_token_leaves_no_row(client, stub):
    stub.stall = 2                                 # llama.cpp still reading the prompt
    cid = client.new_conversation()
    resp, start = stream_started(client, cid)
    assert client.post(f"/api/messages/{start['message_id']}/stop", {})[2]["stopped"]
    events = read_events(resp)
    assert (events[-1]["type"], events[-1]["code"], events[-1]["message_id"]) == (
        "error", "STOPPED", None)
    assert rows(client, "SELECT role FROM messages") == [("user",)]


def test_a_reply_is_followed_from_its_start_the_middle_and_after_its_end(client, stub):
    stub.reply = " ".join(f"w{i}" for i in range(60))
    stub.token_delay = 0.02
    cid = client.new_conversation()
    resp, start = stream_started(client, cid)
    mid = start["message_id"]
    assert [g["message_id"] for g in client.get("/api/generations")[2]["generations"]] == [mid]
    whole_ids, whole = followed_events(client, mid)           # joined while it is made
    assert whole[-1]["type"] == "done" and whole[-1]["finish_reason"] == "stop"
    assert "".join(e["content"] for e in whole if e["type"] == "delta") == stub.reply
    assert whole_ids == sorted(whole_ids) and whole_ids[-1] == len(stub.reply)
    asker = read_events(resp)
    assert asker[-1]["response"] == stub.reply == whole[-1]["response"]
    assert client.get("/api/generations")[2]["generations"] == []
    # after its end: at once, from any point, without repeating what was had
    for given in ({"headers": {"Last-Event-ID": "10"}}, {"query": "?from=10"}):
        ids, rest = followed_events(client, mid, **given)
        assert "".join(e["content"] for e in rest if e["type"] == "delta") == stub.reply[10:]
        assert rest[-1]["type"] == "done" and ids[-1] == len(stub.reply)
    ids, done = followed_events(client, mid, "?from=" + str(len(stub.reply)))
    assert [e["type"] for e in done] == ["done"]
    status, _, body = client.get(f"/api/messages/{mid}/stream?from=x")
    assert (status, body["code"]) == (400, "VALIDATION_ERROR")
    assert client.get(f"/api/messages/{start['user_message_id']}/stream")[0] == 404   # a question
    assert client.get("/api/messages/999/stream")[0] == 404


def test_a_reply_followed_mid_way_resumes_without_repeating_text(client, stub):
    stub.reply = " ".join(f"w{i}" for i in range(150))
    stub.token_delay = 0.02                      # three seconds: it is resumed while made
    cid = client.new_conversation()
    resp, start = stream_started(client, cid)
    got, last_id = "", 0
    while len(got) < 40:                         # a client reads some, then drops
        line = resp.readline()
        if line.startswith(b"id: "):
            last_id = int(line[4:])
        elif line.startswith(b"data: "):
            event = json.loads(line[6:])
            got += event.get("content", "") if event["type"] == "delta" else ""
    resp.close()
    assert last_id == len(got)
    time.sleep(0.3)                              # away a while: the reply goes on meanwhile
    assert client.engine.generation_of(start["message_id"]) is not None     # still being made
    ids, rest = followed_events(client, start["message_id"],
                                headers={"Last-Event-ID": str(last_id)})
    assert got + "".join(e["content"] for e in rest if e["type"] == "delta") == stub.reply
    assert rest[-1]["type"] == "done"


def test_a_follower_that_never_reads_slows_nobody(client, stub, monkeypatch):
    monkeypatch.setattr(llama_chat, "FOLLOWER_BATCHES", 50)
    stub.reply = " ".join("x" * 20000 for i in range(500))    # 10 MB: past any socket buffer
    stub.token_delay = 0.001
    cid = client.new_conversation()
    resp, start = stream_started(client, cid)
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", client.port))
    stuck.sendall(f"GET /api/messages/{start['message_id']}/stream HTTP/1.1\r\n"
                  "Host: localhost\r\n\r\n".encode())      # and never reads
    others = [[] for _ in range(2)]
    readers = [threading.Thread(target=lambda box=box: box.extend(
        followed_events(client, start["message_id"])[1])) for box in others]
    for t in readers:
        t.start()
    asker = read_events(resp)
    for t in readers:
        t.join(30)
    assert asker[-1]["type"] == "done" and asker[-1]["response"] == stub.reply
    for box in others:
        assert "".join(e["content"] for e in box if e["type"] == "delta") == stub.reply
    stuck.close()


def test_progress_of_reading_the_prompt_is_relayed(client, stub):
    stub.progress_steps, stub.progress_delay = 3, 0.05
    events = read_events(client.stream(client.new_conversation())[0])
    progress = [(e["processed"], e["total"]) for e in events if e["type"] == "progress"]
    assert progress == [(100, 300), (200, 300), (300, 300)]
    assert [e["type"] for e in events].index("progress") < [e["type"] for e in events].index(
        "delta") and events[-1]["type"] == "done"
    assert stub.requests[-1]["body"]["return_progress"] is True


def test_replies_past_the_limit_are_429_busy(client, stub):
    stub.total_slots = 2                           # as llama-server -np 2 says in /props
    client.engine.upstream._contexts.clear()
    stub.reply = " ".join(f"w{i}" for i in range(50))
    stub.token_delay = 0.02
    cids = [client.new_conversation() for _ in range(3)]
    first = [stream_started(client, cid) for cid in cids[:2]]
    assert client.engine.generation_limit == 2
    status, headers, body = client.chat(cids[2], "a third")
    assert (status, body["code"], headers["Retry-After"]) == (429, "BUSY", "2")
    assert rows(client, "SELECT count(*) FROM messages WHERE conversation_id = ?", cids[2]) == [
        (0,)]                                       # nothing stored for it
    for resp, _ in first:
        read_events(resp)
    assert client.chat(cids[2], "a third")[0] == 200


def test_a_regenerate_that_fails_before_its_first_token_leaves_the_branch_as_it_was(client,
                                                                                  stub):
    cid = client.new_conversation()
    first = client.chat(cid, "question")[2]
    stub.mode = "error500"
    status, _, body = client.post("/api/chat", {"conversation_id": cid, "model": MODEL,
                                                "regenerate": first["message_id"]})
    assert status == 502 and body["message_id"] is None
    shown = conversation(client, cid)["messages"]
    assert [m["id"] for m in shown] == [first["user_message_id"], first["message_id"]]
    stub.mode = "ok"
    new = client.chat(client.new_conversation(), "a first question")
    stub.mode = "error500"
    failed = client.chat(new[2]["conversation_id"], "fails")[2]
    assert [m["content"] for m in conversation(client, new[2]["conversation_id"])[
        "messages"]] == ["a first question", stub.reply, "fails"]        # its question shown
    assert failed["user_message_id"]


def test_a_reply_being_made_cannot_be_continued_meanwhile(client, stub):
    cid = client.new_conversation()
    stub.reply, stub.finish_reason = "Start.", "length"
    first = client.chat(cid, "tell me")[2]
    stub.reply, stub.token_delay = " " + " ".join(f"w{i}" for i in range(100)), 0.01
    resp, start = stream_started(client, cid, "and then?")
    status, _, body = client.post("/api/chat", {"conversation_id": cid, "model": MODEL,
                                                "parent_id": first["user_message_id"],
                                                "message": "beside"})
    assert status == 200                          # a branch beside it: at once
    with client.engine.store.db.write() as c:     # as another process making the first one
        c.execute("UPDATE messages SET generating = 'elsewhere' WHERE id = ?",
                  (first["message_id"],))
    client.engine.store.release()
    status, _, body = client.post("/api/chat", {"conversation_id": cid, "model": MODEL,
                                                "continue": first["message_id"]})
    assert (status, body["field"]) == (400, "continue") and "being made" in body["error"]
    read_events(resp)


def test_a_reply_is_told_once_begun_and_once_ended_not_at_each_write(client, stub):
    stub.reply = " ".join(f"w{i}" for i in range(120))
    stub.token_delay = 0.02                        # over two seconds: two writes of its text
    with listening(client) as heard:
        answer = client.chat(client.new_conversation(), "long")[2]
        heard_of(heard, {"type": "generation", "action": "finished",
                         "message_id": answer["message_id"]})
        time.sleep(0.3)
    about = [(e["type"], e["action"]) for e in heard if e["type"] != "conversation"
             and e.get("id", e.get("message_id")) == answer["message_id"]]
    assert sorted(about) == sorted([("message", "created"), ("generation", "started"),
                                    ("message", "updated"), ("generation", "finished")])


def test_a_listener_is_told_what_is_committed_once_it_listens(client, monkeypatch):
    """The telling begins where the listener's comment was sent, even when
    the thread that reads the changes first runs late (slowed here)."""
    reading = llama_chat.Changes._read
    monkeypatch.setattr(llama_chat.Changes, "_read",
                        lambda self, *a: (time.sleep(0.5), reading(self, *a)))
    before = client.new_conversation("before")
    with listening(client) as heard:
        made = client.new_conversation("after")
        heard_of(heard, {"type": "conversation", "action": "created", "id": made})
        assert [e["id"] for e in heard if e["type"] == "conversation"] == [made]
    assert before != made


def test_the_changes_table_keeps_only_the_newest(client, monkeypatch):
    monkeypatch.setattr(llama_chat, "CHANGES_KEPT", 20)
    with listening(client) as heard:
        made = [client.new_conversation(f"c{i}") for i in range(50)]
        heard_of(heard, {"type": "conversation", "action": "created", "id": made[-1]})
    kept = rows(client, "SELECT min(seq), max(seq), count(*) FROM changes")[0]
    assert kept[1] == 50 and kept[2] <= 2 * 20 and kept[0] > 1     # the oldest trimmed
    assert [e["id"] for e in heard if e["action"] == "created"] == made   # each told, once


def test_the_changes_are_trimmed_at_a_start_with_no_page_listening(tmp_path, monkeypatch):
    monkeypatch.setattr(llama_chat, "CHANGES_KEPT", 5)
    path = str(tmp_path / "trim.db")
    store = llama_chat.Store(path)
    for i in range(12):
        store.create_conversation(f"c{i}", "m")
    store.close()
    store = llama_chat.Store(path)
    kept = store.db.conn().execute("SELECT count(*), max(seq) FROM changes").fetchone()
    assert kept == (5, 12)
    store.close()


def test_a_reply_cut_by_kill_9_is_kept_as_interrupted_and_continued(tmp_path, stub, launch):
    stub.reply = " ".join(f"w{i}" for i in range(400))
    stub.token_delay = 0.01
    db = str(tmp_path / "chat.db")
    with server_process(db, stub.url) as other:
        cid = other.new_conversation()
        resp, start = stream_started(other, cid)
        conn = sqlite3.connect(db)
        deadline = time.monotonic() + 10
        while not conn.execute("SELECT length(content) FROM messages WHERE id = ?",
                               (start["message_id"],)).fetchone()[0]:
            assert time.monotonic() < deadline, "no text written while the reply was made"
            time.sleep(0.05)
        kept = conn.execute("SELECT content FROM messages WHERE id = ?",
                            (start["message_id"],)).fetchone()[0]
        conn.close()
        other.proc.kill()                        # kill -9: no shutdown, nothing stored after
    stub.token_delay = 0
    client = Client(launch(stub.url, db=db))
    reply = conversation(client, cid)["messages"][-1]
    assert (reply["id"], reply["finish_reason"], reply["generating"]) == (
        start["message_id"], "interrupted", False)
    assert reply["content"].startswith(kept) and stub.reply.startswith(reply["content"])
    stub.echo_prefill = True
    stub.reply = " the rest."
    done = client.post("/api/chat", {"conversation_id": cid, "model": MODEL,
                                     "continue": reply["id"]})[2]
    assert done["response"] == reply["content"] + " the rest." and done["finish_reason"] == "stop"


def test_a_reply_another_process_makes_is_followed_from_the_database(tmp_path, stub, launch):
    stub.reply = " ".join(f"w{i}" for i in range(150))
    stub.token_delay = 0.01
    db = str(tmp_path / "chat.db")
    with server_process(db, stub.url) as other:
        here = Client(launch(stub.url, db=db))
        resp, start = stream_started(other, other.new_conversation())
        made = here.get("/api/generations")[2]["generations"]
        assert [g["message_id"] for g in made] == [start["message_id"]]     # seen from here
        ids, events = followed_events(here, start["message_id"])
        assert "".join(e["content"] for e in events if e["type"] == "delta") == stub.reply
        assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "stop"
        assert ids == sorted(ids) and ids[-1] == len(stub.reply)
        read_events(resp)


def test_a_reply_whose_process_dies_meanwhile_is_interrupted_here(tmp_path, stub, launch):
    stub.reply = " ".join(f"w{i}" for i in range(400))
    stub.token_delay = 0.01
    db = str(tmp_path / "chat.db")
    here = Client(launch(stub.url, db=db))
    with server_process(db, stub.url) as other:
        resp, start = stream_started(other, other.new_conversation())
        assert [g["message_id"] for g in here.get("/api/generations")[2]["generations"]] == [
            start["message_id"]]
        follower = threading.Thread(target=lambda: box.extend(
            followed_events(here, start["message_id"])[1]))
        box = []
        follower.start()
        wait_for(lambda: rows(here, "SELECT length(content) FROM messages WHERE id = ?",
                              start["message_id"])[0][0], 5, "its text written")
        other.proc.kill()                  # kill -9, not reaped yet: a zombie for a while
        wait_for(lambda: not llama_chat.process_alive(other.proc.pid), 5, "the kill taken")
        follower.join(10)                  # its follower finds it gone, by itself
        assert box[-1]["type"] == "done" and box[-1]["finish_reason"] == "interrupted"
        assert here.get("/api/generations")[2]["generations"] == []
    assert rows(here, "SELECT finish_reason, generating FROM messages WHERE id = ?",
                start["message_id"]) == [("interrupted", None)]


def test_a_schema_8_database_gains_replies_being_made_after_a_backup(tmp_path):
    path = str(tmp_path / "v8.db")

    def fill(c):
        c.execute("INSERT INTO conversations (title, model) VALUES ('kept', 'm')")
        c.execute("INSERT INTO messages (conversation_id, role, content) VALUES (1, 'user', 'q')")
        c.execute("INSERT INTO messages (conversation_id, parent_id, role, content, model) "
                  "VALUES (1, 1, 'assistant', 'a', 'm')")
    store = migrated(path, fill, 8)
    shown = json.loads(store.messages(1)[0])
    assert [(m["content"], m["generating"]) for m in shown] == [("q", False), ("a", False)]
    cid = store.create_conversation("bulk", "m")
    with store.db.write() as c, store.index.bulk(c), llama_chat.ledger_bulk(c):
        for i in range(3):
            llama_chat.Store.put_message(c, cid, None, "assistant", f"bulk word{i}", "m",
                                         "2026-12-06T10:00:00Z")
        assert c.execute("SELECT count(*) FROM writing_in_bulk").fetchone() == (2,)
    assert store.db.conn().execute("SELECT count(*) FROM writing_in_bulk").fetchone() == (0,)
    assert len(store.search("word1", 5)) == 1              # indexed at the bulk's end
    assert llama_chat.ledger(store.db, ("model",), None, None)[0]["replies"] == 4
    store.close()


def test_a_schema_9_database_gains_the_replies_note_of_what_was_left_out(tmp_path):
    path = str(tmp_path / "v9.db")
    notes = "Κνωσός palace".encode()

    def fill(c):
        c.execute("INSERT INTO conversations (title, model) VALUES ('kept', 'm')")
        c.execute("INSERT INTO messages (conversation_id, role, content) VALUES (1, 'user', 'q')")
        c.execute("INSERT INTO messages (conversation_id, parent_id, role, content, model) "
                  "VALUES (1, 1, 'assistant', 'a', 'm')")
        llama_chat.Store.attach(c, 1, [(notes, "text", "text/plain; charset=utf-8", "n.md")])
    store = migrated(path, fill, 9)
    shown = json.loads(store.messages(1)[0])
    assert [(m["content"], m["attachments_left_out"]) for m in shown] == [("q", None),
                                                                          ("a", None)]
    assert [a["name"] for a in shown[0]["attachments"]] == ["n.md"]
    assert [r["message_id"] for r in store.search("palace", 5)] == [1]
    plan = rows_of(store, "EXPLAIN QUERY PLAN SELECT id FROM attachments WHERE made_at < ?", "x")
    assert "attachments_by_age" in plan[0][3]      # the sweep of unsent uploads reads no bytes
    store.close()


def test_a_schema_10_database_gains_the_share_of_prompts_served_from_cache(tmp_path):
    path = str(tmp_path / "v10.db")

    def fill(c):
        c.execute("INSERT INTO conversations (title, model) VALUES ('kept', 'm')")
        c.execute("INSERT INTO messages (conversation_id, role, content) VALUES (1, 'user', 'q')")
        for prompt_n, cache_n in ((30, 70), (20, None), (None, 5), (10, 0)):
            c.execute("INSERT INTO messages (conversation_id, parent_id, role, content, model, "
                      "timestamp, prompt_n, cache_n) VALUES (1, 1, 'assistant', 'a', 'm', "
                      "'2026-12-05T10:00:00Z', ?, ?)", (prompt_n, cache_n))
    store = migrated(path, fill, 10)
    assert llama_chat.ledger(store.db, ("model",), None, None)[0]["prompt_cache"] == {
        "replies": 2, "cached_tokens": 70, "read_tokens": 40, "share": 0.636}
    with store.db.write() as c:              # kept from now on: a reply changed, one gone
        c.execute("UPDATE messages SET cache_n = 5 WHERE prompt_n = 20")
        c.execute("DELETE FROM messages WHERE cache_n = 70")
    assert llama_chat.ledger(store.db, ("model", "day"), None, None)[0]["prompt_cache"] == {
        "replies": 2, "cached_tokens": 5, "read_tokens": 30, "share": 0.143}
    with store.db.write() as c:
        c.execute("DELETE FROM messages WHERE role = 'assistant'")
    assert rows_of(store, "SELECT count(*) FROM ledger_cache") == [(0,)]   # no empty day left
    store.close()


def test_a_schema_11_database_gains_the_replies_recalled_sources(tmp_path):
    path = str(tmp_path / "v11.db")

    def fill(c):
        c.execute("INSERT INTO conversations (title, model) VALUES ('kept', 'm')")
        c.execute("INSERT INTO messages (conversation_id, role, content) VALUES (1, 'user', 'q')")
    store = migrated(path, fill, 11)
    assert [m["recall"] for m in json.loads(store.messages(1)[0])] == [None]
    store.close()


@contextlib.contextmanager
def listening(client):
    """The events /api/events tells, gathered in a list while the block runs."""
    heard, conn = [], http.client.HTTPConnection("127.0.0.1", client.port, timeout=30)
    conn.request("GET", "/api/events")
    sock = conn.sock
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b": keep-alive")  # listening

    def read():
        try:
            for line in resp:
                if line.startswith(b"data: "):
                    heard.append(json.loads(line[6:]))
        except (OSError, ValueError, http.client.HTTPException):
            pass
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield heard
    finally:
        sock.shutdown(socket.SHUT_RDWR)
        conn.close()


def heard_of(heard, *wanted, seconds=10):
    """Wait until every wanted event (a dict of fields) is among those heard."""
    def found():
        return all(any(all(e.get(k) == v for k, v in w.items()) for e in heard) for w in wanted)
    wait_for(found, seconds, f"{wanted} told (heard {heard[-8:]})")


def test_every_change_is_told_to_every_listener(client, stub, tmp_path):
    with listening(client) as heard, listening(client) as also:
        cid = client.new_conversation("told")
        heard_of(heard, {"type": "conversation", "action": "created", "id": cid})
        answer = client.chat(cid, "hello")[2]
        mid, qid = answer["message_id"], answer["user_message_id"]
        heard_of(heard, {"type": "message", "action": "created", "id": qid,
                         "conversation_id": cid},
                 {"type": "generation", "action": "started", "message_id": mid},
                 {"type": "generation", "action": "finished", "message_id": mid},
                 {"type": "message", "action": "updated", "id": mid})
        client.put(f"/api/conversations/{cid}", {"title": "renamed", "pinned": True})
        client.put(f"/api/messages/{qid}", {"content": "hello again"})
        heard_of(heard, {"type": "conversation", "action": "updated", "id": cid},
                 {"type": "message", "action": "updated", "id": qid})
        count = len(heard)
        client.delete(f"/api/conversations/{cid}")
        heard_of(heard, {"type": "conversation", "action": "deleted", "id": cid})
        assert not [e for e in heard[count:] if e["type"] != "conversation"]   # one event
        path = tmp_path / "elsewhere.json"                 # the command line, another process
        chatgpt_file(path, 2)
        done = subprocess.run([sys.executable, os.path.join(HERE, "llama_chat.py"), "--db",
                               client.engine.settings.db, "import", str(path)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        made = [r[0] for r in rows(client, "SELECT id FROM conversations ORDER BY id")]
        heard_of(heard, *({"type": "conversation", "action": "created", "id": i} for i in made))
        assert not [e for e in heard if e["type"] == "message" and e["conversation_id"] in made]
        heard_of(also, {"type": "conversation", "action": "created", "id": made[-1]})
        assert OpenAIClient(client.port).create([user("through /v1")])[0] == 200   # recorded
        recorded = rows(client, "SELECT id FROM conversations WHERE source = 'api'")[0][0]
        heard_of(heard, {"type": "conversation", "action": "created", "id": recorded},
                 {"type": "message", "action": "created", "conversation_id": recorded})


def test_a_client_leaving_while_llamacpp_reads_the_prompt_leaves_the_reply_going(client, stub):
    cid = client.new_conversation()
    stub.stall = 1                          # llama.cpp reading a long prompt, silent
    resp, sock = client.stream(cid, "a long question")
    assert resp.status == 200
    resp.close()
    sock.close()
    time.sleep(0.3)
    assert client.engine.active_streams == 1          # still being made, for nobody
    wait_for(lambda: not client.engine.active_streams, 10, "the reply made")
    assert rows(client, "SELECT role, content, finish_reason FROM messages") == [
        ("user", "a long question", None), ("assistant", stub.reply, "stop")]


@pytest.mark.parametrize("stream", [False, True])
def test_deleting_a_conversation_ends_its_reply_with_not_found(client, stub, stream):
    cid = client.new_conversation()
    stub.reply = " ".join(f"w{i}" for i in range(200))
    stub.token_delay, stub.stall = (0.02, 0) if stream else (0, 3)
    answer = {}

    def chat():
        if stream:
            resp, _ = client.stream(cid, "go on")
            answer["events"] = read_events(resp)
        else:
            answer["status"], _, answer["body"] = client.chat(cid, "go on")
        answer["at"] = time.monotonic()

    worker = threading.Thread(target=chat)
    worker.start()
    time.sleep(0.5)                             # mid-reply
    assert client.request("DELETE", f"/api/conversations/{cid}")[0] == 200
    deleted = time.monotonic()
    worker.join(10)
    assert answer["at"] - deleted < 1.5
    if stream:
        last = answer["events"][-1]
        assert (last["type"], last["code"], last["resource"]) == ("error", "NOT_FOUND",
                                                                  "conversation")
        assert any(e["type"] == "delta" for e in answer["events"])
    else:
        assert (answer["status"], answer["body"]["code"]) == (404, "NOT_FOUND")
    assert rows(client, "SELECT count(*) FROM messages") == [(0,)]


def test_keep_alive_comments_while_llamacpp_is_silent(client, stub, monkeypatch):
    monkeypatch.setattr(llama_chat, "KEEPALIVE_SECONDS", 0.2)
    stub.stall = 0.9                        # reading a long prompt: not even headers yet
    resp, sock = client.stream(client.new_conversation())
    lines = [line.strip() for line in resp]
    assert lines.count(b": keep-alive") >= 2
    assert lines.index(b": keep-alive") < next(i for i, l in enumerate(lines)
                                                if l.startswith(b'data: {"type": "delta"'))
    assert json.loads(lines[-2][6:])["type"] == "done"


def test_twenty_concurrent_streams_all_complete_and_are_stored(client, stub):
    stub.token_delay = 0.005
    cids = [client.new_conversation(f"s{i}") for i in range(20)]
    results = [None] * 20

    def worker(i):
        results[i] = read_events(client.stream(cids[i], f"stream {i}")[0])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ended = [r[-1] for r in results]
    assert all(e["type"] == "done" and e["response"] == stub.reply for e in ended), ended
    assert rows(client, "SELECT count(*) FROM messages WHERE role = 'assistant' AND "
                "finish_reason = 'stop' AND content = ?", stub.reply)[0][0] == 20


def test_sigterm_ends_every_stream_stores_partials_and_exits_cleanly(tmp_path, stub):
    stub.reply = " ".join(f"w{i}" for i in range(300))
    stub.token_delay = 0.02
    port, db = free_port(), str(tmp_path / "term.db")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "llama_chat.py"), "--port",
                             str(port), "--db", db, "--llamacpp-url", stub.url],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdout.readline()
    conns, relayed = [], []
    for i in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/api/conversations", json.dumps({"title": "t", "model": "m"}),
                     {"Content-Type": "application/json"})
        cid = json.loads(conn.getresponse().read())["conversation_id"]
        conn.request("POST", "/api/chat", json.dumps({"conversation_id": cid, "message": "go",
                                                      "model": "m", "stream": True}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        got = []
        while len(got) < 3:
            line = resp.readline().strip()
            if line.startswith(b"data: "):
                got.append(json.loads(line[6:]))
        conns.append(resp)
        relayed.append(got)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    for resp, got in zip(conns, relayed):
        got.extend(read_events(resp))
    assert proc.wait(10) == 0 and time.monotonic() - started < 5
    for got in relayed:
        assert got[-1]["type"] == "error" and got[-1]["code"] == "SHUTTING_DOWN"
        assert got[-1]["message_id"]
    conn = sqlite3.connect(db)
    stored = conn.execute("SELECT content, finish_reason FROM messages WHERE role = "
                          "'assistant' ORDER BY conversation_id").fetchall()
    assert [r for _, r in stored] == ["aborted"] * 3
    for (content, _), got in zip(stored, relayed):
        assert content == "".join(e["content"] for e in got if e["type"] == "delta")
    assert not os.path.exists(db + "-wal") or os.path.getsize(db + "-wal") == 0


@pytest.mark.parametrize("mode", ["cut", "error_chunk"])
def test_upstream_failure_mid_stream_ends_with_an_error_event(client, stub, mode):
    stub.mode = mode
    events = read_events(client.stream(client.new_conversation())[0])
    assert events[-1]["type"] == "error" and events[-1]["code"] == "LLAMACPP_ERROR"
    assert "done" not in [e["type"] for e in events]
    partial = "".join(e["content"] for e in events if e["type"] == "delta")
    assert rows(client, "SELECT role, content, finish_reason FROM messages ORDER BY id") == [
        ("user", "Explain machine learning", None), ("assistant", partial, "error")]


def test_stream_stall_between_tokens_times_out(client, stub):
    client.engine.upstream.read_timeout = client.engine.upstream.first_token_timeout = 0.5
    stub.mode = "stall_mid"
    events = read_events(client.stream(client.new_conversation())[0])
    assert events[-1]["type"] == "error" and events[-1]["code"] == "LLAMACPP_TIMEOUT"


def test_stream_silent_past_the_timeout_is_an_error_event(client, stub):
    client.engine.upstream.read_timeout = client.engine.upstream.first_token_timeout = 0.5
    stub.stall = 1.5
    cid = client.new_conversation()
    started = time.monotonic()
    events = read_events(client.stream(cid)[0])
    assert [(e["type"], e.get("code")) for e in events] == [("start", None),
                                                            ("error", "LLAMACPP_TIMEOUT")]
    assert 0.45 < time.monotonic() - started < 1.4
    assert rows(client, "SELECT role FROM messages") == [("user",)]


def test_shutdown_ends_a_stream_still_waiting_for_llamacpp(client, stub):
    stub.stall = 5
    resp, _ = client.stream(client.new_conversation())
    deadline = time.monotonic() + 2
    while not client.engine.active_streams and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    client.engine.stop_streams()
    events = read_events(resp)
    assert [(e["type"], e.get("code")) for e in events] == [("start", None),
                                                            ("error", "SHUTTING_DOWN")]
    assert rows(client, "SELECT role FROM messages") == [("user",)]     # no empty reply
    assert time.monotonic() - started < 2 and client.engine.active_streams == 0
    client.engine.stopping.clear()


def test_a_database_locked_too_long_is_503_not_a_bug(tmp_path, stub, monkeypatch, launch):
    store = llama_chat.Store(str(tmp_path / "chat.db"), busy_ms=300)   # where start_app points
    server = launch(stub.url, store=store)
    c = Client(server)
    cid = c.new_conversation()
    other = sqlite3.connect(store.db.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")                # another process writing, a long purge
    status, headers, body = c.chat(cid, "held up")
    other.execute("ROLLBACK")
    assert status == 503 and body["code"] == "DATABASE_BUSY" and "try again" in body["error"]
    assert headers["Retry-After"] == "5"
    assert rows(c, "SELECT count(*) FROM messages") == [(0,)]
    assert c.chat(cid, "held up")[0] == 200                           # and then it works


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_the_database_cannot_store_is_an_error_with_the_user_message(
        client, monkeypatch, stream):
    store = client.engine.store

    def full_disk(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")
    monkeypatch.setattr(store, "finish_reply", full_disk)
    cid = client.new_conversation()
    if stream:
        resp, _ = client.stream(cid)
        lines = [line.strip() for line in resp if line.strip()]
        assert all(line.startswith((b"data: ", b":", b"id: ")) for line in lines)   # no body
        error = json.loads(lines[-1][6:])
        assert error["type"] == "error" and error["message_id"] is None
    else:
        status, _, error = client.chat(cid)
        assert status == 503
    assert error["code"] == "DATABASE_ERROR" and "disk is full" in error["error"]
    assert rows(client, "SELECT id, role FROM messages") == [(error["user_message_id"], "user")]


def test_stream_with_llamacpp_down_is_an_error_event(down_client):
    events = read_events(down_client.stream(down_client.new_conversation())[0])
    assert [e["type"] for e in events] == ["start", "error"]
    assert events[1]["code"] == "LLAMACPP_ERROR" and events[1]["user_message_id"]
    assert rows(down_client, "SELECT role FROM messages") == [("user",)]   # no empty reply


###############################################################################
# Attachments
###############################################################################

PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02"
       b"\x00\x00\x00\x90wS\xde\x00\x00\x00\x0cIDATx\x9cc\xf8\xcf\xc0\x00\x00\x03\x01"
       b"\x01\x00\xc9\xfe\x92\xef\x00\x00\x00\x00IEND\xaeB`\x82")
WAV = b"RIFF$\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00@\x1f\x00\x00" + b"\x00" * 20


def upload(client, data, name=None):
    query = f"?name={urllib.parse.quote(name)}" if name is not None else ""
    return client.request("POST", "/api/attachments" + query, raw=data,
                          headers={"Content-Type": "application/octet-stream"})


@pytest.mark.parametrize("data, kind, kind_type", [
    (PNG, "image", "image/png"), (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "image", "image/jpeg"),
    (b"GIF89a" + b"\x00" * 20, "image", "image/gif"),
    (b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 20, "image", "image/webp"),
    (WAV, "audio", "audio/wav"), (b"ID3\x04" + b"\x00" * 30, "audio", "audio/mpeg"),
    ("# Notes\nΚαλημέρα, 火山\n".encode(), "text", "text/plain; charset=utf-8")])
def test_an_attachment_is_told_by_its_bytes_and_stored_once(client, data, kind, kind_type):
    status, _, body = upload(client, data, "holiday.txt")      # the name says nothing
    assert status == 201
    made = body["attachment"]
    assert made == {"id": hashlib.sha256(data).hexdigest(), "name": "holiday.txt",
                    "type": kind_type, "bytes": len(data), "kind": kind}
    assert upload(client, data, "again.bin")[2]["attachment"] == made    # once, first name
    assert rows(client, "SELECT count(*) FROM attachments") == [(1,)]
    status, headers, served = client.get(f"/api/attachments/{made['id']}")
    served = served if isinstance(served, bytes) else json.dumps(served).encode()
    assert status == 200 and headers["Content-Type"] == kind_type
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in headers["Content-Security-Policy"]
    assert headers["Content-Disposition"] == "inline; filename*=UTF-8''holiday.txt"
    raw = http.client.HTTPConnection("127.0.0.1", client.port)
    raw.request("GET", f"/api/attachments/{made['id']}")
    assert raw.getresponse().read() == data                        # byte for byte


@pytest.mark.parametrize("data", [
    b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
    b"<!DOCTYPE html><html><body onload=alert(1)>", b"  <html><script>x</script>",
    bytes(range(256)) * 4, b"", "text with a \x00 nul".encode()])
def test_what_is_not_an_image_audio_or_text_is_refused(client, data):
    status, _, body = upload(client, data, "a.png")
    assert (status, body["code"], body["field"]) == (400, "VALIDATION_ERROR", "file")
    assert rows(client, "SELECT count(*) FROM attachments") == [(0,)]


def test_a_large_upload_is_stored_byte_for_byte_a_piece_at_a_time(client, monkeypatch):
    pieces = []
    real = llama_chat.Upload._read

    def counted(self, f):
        for piece in real(self, f):
            pieces.append(len(piece))
            yield piece
    monkeypatch.setattr(llama_chat.Upload, "_read", counted)
    photo = b"\xff\xd8\xff\xe0" + random.Random(7).randbytes(3_000_000)     # a JPEG's size
    status, _, body = upload(client, photo, "IMG_0042.jpg")
    assert status == 201 and body["attachment"]["bytes"] == len(photo)
    assert max(pieces) <= llama_chat.Upload.PIECE and sum(pieces) == len(photo)
    raw = http.client.HTTPConnection("127.0.0.1", client.port)
    raw.request("GET", f"/api/attachments/{body['attachment']['id']}")
    assert raw.getresponse().read() == photo
    assert upload(client, photo, "again.jpg")[2]["attachment"]["name"] == "IMG_0042.jpg"
    text = ("línea " * 400_000).encode()                   # text past the spool's 1 MiB
    made = upload(client, text, "log.txt")[2]["attachment"]
    assert (made["kind"], made["bytes"]) == ("text", len(text))
    assert rows(client, "SELECT length(data) FROM attachments ORDER BY bytes") == [
        (len(text),), (len(photo),)]


def test_a_refused_upload_is_refused_before_its_end_and_its_connection_closed(client):
    """Random bytes are refused at their first piece: the rest is not read,
    and never taken for the connection's next request."""
    body = bytes(range(256)) * 8192                                   # 2 MiB
    sock = socket.create_connection(("127.0.0.1", client.port), timeout=10)
    sock.sendall(b"POST /api/attachments HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: "
                 + str(len(body) * 2).encode() + b"\r\n\r\n" + body[:65536])
    answer = sock.makefile("rb")
    assert answer.readline().startswith(b"HTTP/1.1 400")
    head = b"".join(iter(answer.readline, b"\r\n"))
    assert b"Connection: close" in head
    sock.close()
    text = "é".encode() * 40000 + b"\xff"                      # UTF-8 until its last byte
    status, _, found = upload(client, text, "notes.txt")
    assert (status, found["field"]) == (400, "file")
    assert rows(client, "SELECT count(*) FROM attachments") == [(0,)]


def test_an_upload_cut_by_kill_9_leaves_nothing_half_stored(client, stub):
    db = client.engine.settings.db
    with server_process(db, stub.url) as other:
        sock = socket.create_connection(("127.0.0.1", other.port))
        sock.sendall(b"POST /api/attachments?name=big.png HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Length: 4000000\r\n\r\n" + PNG + bytes(2_000_000))
        time.sleep(0.3)
        other.proc.kill()
        other.proc.wait(10)
        sock.close()
    assert rows(client, "SELECT count(*) FROM attachments") == [(0,)]
    assert rows(client, "PRAGMA integrity_check") == [("ok",)]
    assert upload(client, PNG, "after.png")[0] == 201


def pdf_file(objects, compress=True, in_object_stream=()):
    """A PDF of these objects ({number: (dictionary text, stream bytes or
    None)}): content streams Flate-compressed (compress), the objects named
    in in_object_stream put in an object stream, as PDF 1.5 writers do."""
    import zlib
    out, offsets = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"), {}
    packed = {n: objects[n][0] for n in in_object_stream}
    if packed:
        head = b" ".join(b"%d %d" % (n, sum(len(packed[m]) + 1 for m in list(packed)[:k]))
                         for k, n in enumerate(packed)) + b" "
        body = head + b"".join(packed[n] + b"\n" for n in packed)
        objects = {**{n: v for n, v in objects.items() if n not in packed},
                   99: (b"<< /Type /ObjStm /N %d /First %d >>" % (len(packed), len(head)), body)}
    for number, (head, stream) in objects.items():
        offsets[number] = len(out)
        if stream is None:
            out += b"%d 0 obj\n%s\nendobj\n" % (number, head)
            continue
        data = zlib.compress(stream) if compress else stream
        out += b"%d 0 obj\n%s\nstream\n%s\nendstream\nendobj\n" % (
            number, head[:-2] + b" /Length %d%s >>" % (len(data), b" /Filter /FlateDecode"
                                                     if compress else b""), data)
    out += b"trailer\n<< /Root 1 0 R >>\n%%EOF\n"
    return bytes(out)


# A page in two fonts: a composite one (two-byte codes, Identity-H) mapped by
# its ToUnicode CMap, as browsers and office suites write, and Helvetica (a
# simple font: Latin-1); a form it draws, and a kerned TJ array.
CMAP = (b"/CIDInit /ProcSet findresource begin\n12 dict begin\nbegincmap\n"
        b"1 begincodespacerange <0000> <FFFF> endcodespacerange\n"
        b"3 beginbfchar <0001> <039A> <0002> <03BD> <0003> <0020> endbfchar\n"
        b"2 beginbfrange <0010> <0012> <03C9> <0020> <0021> [<706B> <5C71>] endbfrange\n"
        b"endcmap\nCMapName currentdict /CMap defineresource pop\nend\nend\n")
PDF_OBJECTS = {
    1: (b"<< /Type /Catalog /Pages 2 0 R >>", None),
    2: (b"<< /Type /Pages /Kids [3 0 R 9 0 R] /Count 2 >>", None),
    3: (b"<< /Type /Page /Parent 2 0 R /Contents [4 0 R 10 0 R] /Resources << /Font "
        b"<< /F1 5 0 R /F2 7 0 R >> /XObject << /X1 8 0 R >> >> >>", None),
    4: (b"<< >>", b"BT /F1 24 Tf 72 700 Td <000100020003001000110012> Tj ET\n"
                  b"BT /F1 12 Tf 72 680 Td [<0020> -80 <0021> -300 <0020>] TJ ET"),
    10: (b"<< >>", b"BT /F2 12 Tf 72 650 Td (Cr\\350me br\\373l\\351e \\(caf\\351\\)) Tj "
                   b"0 -14 Td (second line) Tj ET\nq /X1 Do Q"),
    5: (b"<< /Type /Font /Subtype /Type0 /BaseFont /Noto /Encoding /Identity-H "
        b"/DescendantFonts [11 0 R] /ToUnicode 6 0 R >>", None),
    11: (b"<< /Type /Font /Subtype /CIDFontType2 /BaseFont /Noto /DW 1000 >>", None),
    6: (b"<< >>", CMAP),
    7: (b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>", None),
    8: (b"<< /Type /XObject /Subtype /Form /BBox [0 0 500 500] /Resources << /Font "
        b"<< /F9 7 0 R >> >> >>", b"BT /F9 10 Tf 72 600 Td (Drawn by a form) Tj ET"),
    9: (b"<< /Type /Page /Parent 2 0 R /Contents 12 0 R /Resources << /Font << /F1 7 0 R "
        b">> >> >>", None),
    12: (b"<< >>", b"BT /F1 11 Tf 72 700 Td (Page two endobj stream) Tj ET"),
}
PDF_TEXT = ("\u039a\u03bd \u03c9\u03ca\u03cb\n\u706b\u5c71 \u706b\nCr\u00e8me br\u00fbl\u00e9e "
            "(caf\u00e9)\nsecond line\nDrawn by a form\n\nPage two endobj stream")


@pytest.mark.parametrize("form", ["compressed", "plain", "object stream"])
def test_a_pdf_is_kept_as_its_text(client, form):
    data = pdf_file(PDF_OBJECTS, compress=form != "plain",
                    in_object_stream=(5, 7, 11) if form == "object stream" else ())
    assert llama_chat.pdf_text(data) == PDF_TEXT
    status, _, body = upload(client, data, "dessert.pdf")
    assert status == 201, body
    made = body["attachment"]
    assert (made["name"], made["kind"], made["type"]) == ("dessert.pdf", "text",
                                                          "text/plain; charset=utf-8")
    assert made["id"] == hashlib.sha256(PDF_TEXT.encode()).hexdigest()
    assert client.get(f"/api/attachments/{made['id']}")[2].decode() == PDF_TEXT


@pytest.mark.parametrize("objects, words", [
    ({**PDF_OBJECTS, 4: (b"<< >>", b"q 100 0 0 100 0 0 cm /Im1 Do Q"), 10: (b"<< >>", b""),
      12: (b"<< >>", b"")}, "has no extractable text"),               # a scan: images only
    ({**PDF_OBJECTS, 5: (PDF_OBJECTS[5][0].replace(b"/ToUnicode 6 0 R", b""), None),
      10: (b"<< >>", b""), 12: (b"<< >>", b"")}, "has no extractable text"),   # no map
    ({**PDF_OBJECTS, 13: (b"<< /Filter /Standard /V 2 /R 3 /O <00> /U <00> /P -4 >>", None),
      1: (b"<< /Type /Catalog /Pages 2 0 R >>", None)}, "is encrypted"),
])
def test_a_pdf_without_text_to_read_is_refused_and_says_why(client, objects, words):
    data = pdf_file(objects)
    if words == "is encrypted":
        data = data.replace(b"<< /Root 1 0 R >>", b"<< /Root 1 0 R /Encrypt 13 0 R >>")
    status, _, body = upload(client, data, "scan.pdf")
    assert (status, body["field"]) == (400, "file") and words in body["error"], body
    assert rows(client, "SELECT count(*) FROM attachments") == [(0,)]


def test_a_damaged_pdf_is_refused_never_a_traceback(client):
    whole = pdf_file(PDF_OBJECTS)
    rng = random.Random(3)
    for cut in (20, len(whole) // 3, len(whole) // 2, len(whole) - 40):
        damaged = bytearray(whole[:cut])
        for _ in range(20):
            damaged[rng.randrange(9, len(damaged))] = rng.randrange(256)
        status, _, body = upload(client, bytes(damaged), "broken.pdf")
        assert status in (201, 400) and (status == 201 or body["field"] == "file"), body
    for nasty in (b"%PDF-1.4\n1 0 obj << /Type /Pages /Kids [1 0 R] >> endobj",
                  b"%PDF-1.4\n1 0 obj " + b"[" * 5000 + b" endobj",
                  b"%PDF-1.4\n1 0 obj << /Length 99999999 >> stream\nxx endstream endobj"):
        status, _, body = upload(client, nasty, "nasty.pdf")
        assert (status, body.get("field")) == (400, "file"), body


def test_an_attachment_past_the_limit_is_413_and_unknown_ones_404(tmp_path, stub, launch):
    c = Client(launch(stub.url, max_attachment_bytes=2048))
    status, _, body = upload(c, b"x" * 3000)
    assert (status, body["code"]) == (413, "PAYLOAD_TOO_LARGE") and "max_attachment_bytes" in \
        body["error"]
    assert c.get("/api/attachments/" + "0" * 64)[0] == 404
    assert c.get("/api/attachments/nope")[0] == 404


def test_a_chat_sends_its_attachments_as_the_web_ui_does(client, stub):
    notes = upload(client, "line one\nline two\n".encode(), "notes.md")[2]["attachment"]
    picture = upload(client, PNG, "cat.png")[2]["attachment"]
    sound = upload(client, WAV, "hello.wav")[2]["attachment"]
    cid = client.new_conversation()
    status, _, answer = client.post("/api/chat", {
        "conversation_id": cid, "model": MODEL, "message": "What is this?",
        "attachments": [picture["id"], notes["id"], sound["id"]]})
    assert status == 200
    sent = stub.requests[-1]["body"]["messages"][-1]
    assert sent["role"] == "user" and sent["content"] == [
        {"type": "text", "text": "--- File: notes.md ---\nline one\nline two\n"},
        {"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(PNG).decode()}},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(WAV).decode(),
                                                "format": "wav"}},
        {"type": "text", "text": "What is this?"}]
    shown = conversation(client, cid)["messages"]
    assert [a["name"] for a in shown[0]["attachments"]] == ["cat.png", "notes.md", "hello.wav"]
    assert shown[1]["attachments"] == []
    client.chat(cid, "and again?")                         # carried in the history
    again = stub.requests[-1]["body"]["messages"]
    assert again[1]["content"][1]["type"] == "image_url" and again[-1]["content"] == "and again?"
    only = client.post("/api/chat", {"conversation_id": cid, "model": MODEL, "message": "",
                                     "attachments": [picture["id"]]})
    assert only[0] == 200                                  # an attachment with no words
    status, _, body = client.post("/api/chat", {"conversation_id": cid, "model": MODEL,
                                                "message": "x", "attachments": ["0" * 64]})
    assert (status, body["resource"]) == (404, "attachment")
    for bad in ("nope", ["nope"], [picture["id"]] * 2, [picture["id"]] * 21):
        status, _, body = client.post("/api/chat", {"conversation_id": cid, "model": MODEL,
                                                    "message": "x", "attachments": bad})
        assert (status, body["field"]) == (400, "attachments")


def test_a_model_that_does_not_see_is_sent_no_image_and_it_is_said(client, stub):
    stub.modalities = {"vision": False, "audio": False}
    picture = upload(client, PNG, "cat.png")[2]["attachment"]
    cid = client.new_conversation()
    client.chat(cid, "warm up")                              # /props read: what it takes
    answer = client.post("/api/chat", {"conversation_id": cid, "model": MODEL,
                                       "message": "What is this?",
                                       "attachments": [picture["id"]]})[2]
    assert answer["context"]["attachments_left_out"] == [picture["id"]]
    assert stub.requests[-1]["body"]["messages"][-1]["content"] == [
        {"type": "text", "text": "What is this?"}]
    shown = conversation(client, cid)["messages"]               # kept with the reply
    assert [m["attachments_left_out"] for m in shown] == [None, None, None, [picture["id"]]]
    stub.modalities = {"vision": True, "audio": False}
    client.get(f"/api/models/defaults?model={MODEL}")           # /props read again
    again = client.post("/api/chat", {"conversation_id": cid, "regenerate": shown[-1]["id"],
                                      "model": MODEL})[2]
    assert "attachments_left_out" not in again.get("context", {})
    assert conversation(client, cid)["messages"][-1]["attachments_left_out"] is None


def test_a_text_attachment_is_searched_and_a_hit_names_its_message(client, stub, launch):
    notes = upload(client, "Trip notes\nWe saw the palace of Κνωσός and a zebrafish tank.\n"
                   .encode(), "crete.md")[2]["attachment"]
    picture = upload(client, PNG, "zebrafish.png")[2]["attachment"]     # no text to find
    cid = client.new_conversation("Holiday")
    asked = client.post("/api/chat", {"conversation_id": cid, "model": MODEL,
                                      "message": "Summarize", "attachments": [
                                          picture["id"], notes["id"]]})[2]
    found = client.get("/api/search?q=zebrafish")[2]["results"]
    assert [(r["message_id"], r["attachment"]) for r in found] == [
        (asked["user_message_id"], {"id": notes["id"], "name": "crete.md"})]
    assert "zebrafish tank" in found[0]["snippet"] and found[0]["content"] == "Summarize"
    hit = found[0]["highlights"][0]
    assert found[0]["snippet"][hit[0]:hit[1]] == "zebrafish"
    assert [r["message_id"] for r in client.get("/api/search?q=" + urllib.parse.quote("κνωσος"))[2]["results"]] == [
        asked["user_message_id"]]                                  # accents and case folded
    assert client.get("/api/search?q=summarize")[2]["results"][0].get("attachment") is None
    client.engine.store.index.check()                              # FTS5's own check
    # A history whose text attachments were never indexed (a copy made by an
    # older version of this one) is indexed at the next start
    client.engine.stopping.set()
    stop(client.server)
    with sqlite3.connect(client.engine.settings.db) as conn:
        conn.executescript("DROP TRIGGER attached_text_added; DROP TRIGGER attached_text_removed;"
                           "DROP TABLE attached_fts; DROP VIEW attached_text;")
    again = Client(launch(stub.url))
    assert [r["message_id"] for r in again.get("/api/search?q=palace")[2]["results"]] == [
        asked["user_message_id"]]
    assert again.delete(f"/api/messages/{asked['user_message_id']}")[0] == 200
    assert again.get("/api/search?q=zebrafish")[2]["results"] == []
    assert rows(again, "SELECT count(*) FROM attachments") == [(0,)]
    again.engine.store.index.check()


def test_a_router_model_not_loaded_is_known_to_take_no_images_before_it_loads(client, stub):
    stub.router = True
    picture = upload(client, PNG, "cat.png")[2]["attachment"]
    assert client.get("/api/models")[0] == 200           # qwen3-0.6b: input_modalities text
    cid = client.new_conversation(model="qwen3-0.6b")
    answer = client.post("/api/chat", {"conversation_id": cid, "model": "qwen3-0.6b",
                                       "message": "What is this?",
                                       "attachments": [picture["id"]]})[2]
    assert answer["context"]["attachments_left_out"] == [picture["id"]]
    assert stub.requests[-1]["body"]["messages"][-1]["content"] == [
        {"type": "text", "text": "What is this?"}]
    prompt = client.get(f"/api/conversations/{cid}/prompt")[2]     # the inspector says so too
    assert prompt["attachments_left_out"] == [picture["id"]]
    other = client.new_conversation(model="gemma-3-270m")         # /props: it sees
    answer = client.post("/api/chat", {"conversation_id": other, "model": "gemma-3-270m",
                                       "message": "And this?", "attachments": [picture["id"]]})[2]
    assert "attachments_left_out" not in answer.get("context", {})
    assert stub.requests[-1]["body"]["messages"][-1]["content"][0]["type"] == "image_url"


def test_a_text_attachment_counts_toward_the_context_by_its_tokens(client, stub):
    stub.n_ctx = 500                # less a quarter for the reply: 375 tokens
    cid = client.new_conversation()
    client.chat(cid, "first question " * 10)
    notes = upload(client, ("word " * 150).encode(), "notes.txt")[2]["attachment"]
    answer = client.post("/api/chat", {"conversation_id": cid, "model": MODEL,
                                       "message": "Summarize", "attachments": [notes["id"]]})[2]
    asked = answer["user_message_id"]
    # a token a word in the stub: "--- File: notes.txt ---" (4), 150 words, the question
    assert rows(client, "SELECT token_count FROM messages WHERE id = ?", asked) == [(155,)]
    prompt = client.get(f"/api/conversations/{cid}/prompt?message=" + "more%20" * 250)[2]
    sent = [m["content"] for m in prompt["messages"]]
    assert prompt["messages_sent"] == 3 and sent[1].startswith("first question")
    assert not any(isinstance(c, list) for c in sent)    # the file's exchange no longer fits
    with sqlite3.connect(client.engine.settings.db) as conn:     # counted when read, as well
        conn.execute("UPDATE messages SET token_count = NULL")
    again = client.get(f"/api/conversations/{cid}/prompt?message=" + "more%20" * 250)[2]
    assert again["messages"] == prompt["messages"]
    assert rows(client, "SELECT token_count FROM messages WHERE id = ?", asked) == [(155,)]


def test_an_attachment_goes_with_the_last_message_that_held_it(client, stub):
    picture = upload(client, PNG, "cat.png")[2]["attachment"]
    cid = client.new_conversation()
    one = client.post("/api/chat", {"conversation_id": cid, "model": MODEL, "message": "a",
                                    "attachments": [picture["id"]]})[2]
    two = client.post("/api/chat", {"conversation_id": cid, "model": MODEL, "message": "b",
                                    "attachments": [picture["id"]]})[2]
    assert client.delete(f"/api/messages/{two['user_message_id']}")[0] == 200
    assert rows(client, "SELECT count(*) FROM attachments") == [(1,)]    # still held by one
    assert client.delete(f"/api/conversations/{cid}")[0] == 200
    assert rows(client, "SELECT count(*) FROM attachments") == [(0,)]
    assert one["user_message_id"]


###############################################################################
# The OpenAI-compatible endpoint
###############################################################################


REMOTE_MEDIA = {
    "image_url object": ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}},
        {"type": "text", "text": "what is this?"}]}]}),
    "image_url in capitals": ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": " HTTPS://intranet.local/x.png"}}]}]}),
    "image_url string": ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": "https://intranet.local/x.png"}]}]}),
    "input_audio url": ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"url": "http://10.0.0.1/a.wav"}}]}]}),
    "input_audio data": ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "http://10.0.0.1/a.wav", "format": "wav"}}]}]}),
    "responses input_image": ("/v1/responses", {"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "http://10.0.0.1/x.png"}]}]}),
    "anthropic url source": ("/v1/messages", {"model": "m", "max_tokens": 9, "messages": [
        {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x/y"}}]}]}),
}


@pytest.mark.parametrize("path, body", REMOTE_MEDIA.values(), ids=REMOTE_MEDIA.keys())
def test_v1_media_urls_are_not_fetched_on_a_client_s_behalf(client, stub, path, body):
    status, _, answer = client.post(path, body)
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["code"] == "VALIDATION_ERROR" and "allow_remote_media" in \
        answer["error"]["message"]
    assert stub.requests == [] and rows(client, "SELECT count(*) FROM messages")[0][0] == 0


@pytest.mark.parametrize("path, body", [REMOTE_MEDIA["image_url object"],
                                        REMOTE_MEDIA["responses input_image"]])
def test_v1_media_urls_pass_when_allowed(tmp_path, stub, launch, path, body):
    c = Client(launch(stub.url, allow_remote_media=True))
    status, _, answer = c.post(path, body)
    assert status != 400 or "allow_remote_media" not in json.dumps(answer)
    assert stub.requests


def test_v1_media_as_data_passes(client, stub):
    status, _, _ = client.post("/v1/chat/completions", {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64,iVBORw0KGgo="}}, {"type": "text", "text": "hi"}]}]})
    assert status == 200 and stub.requests


def test_the_remote_media_setting_is_read_and_checked(tmp_path):
    conf = tmp_path / "c.json"
    conf.write_text('{"openai_api": {"allow_remote_media": true}}')
    assert llama_chat.load_settings(["--config", str(conf)], {}).allow_remote_media is True
    assert llama_chat.Settings().allow_remote_media is False             # the default
    conf.write_text('{"openai_api": {"allow_remote_media": "yes"}}')
    with pytest.raises(llama_chat.ConfigError, match="allow_remote_media"):
        llama_chat.load_settings(["--config", str(conf)], {})



class OpenAIClient:
    """Speaks the API as the openai package does: base URL .../v1, a bearer
    key, JSON bodies, a stream read as SSE `data:` lines up to [DONE]."""

    def __init__(self, port, api_key="sk-no-key-required"):
        self.port, self.api_key = port, api_key

    def open(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        hdrs = {"Authorization": f"Bearer {self.api_key}", "Accept": "application/json",
                "User-Agent": "OpenAI/Python 1.54.0", "X-Stainless-Lang": "python",
                **(headers or {})}
        data = body if isinstance(body, bytes) else None if body is None \
            else json.dumps(body).encode()
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, "/v1" + path, body=data, headers=hdrs)
        conn.raw_sock = conn.sock            # http.client lets go of it when the answer ends
        return conn, conn.getresponse()

    def create(self, messages, model="gpt-4o-mini", headers=None, **fields):
        """chat.completions.create: (status, headers, parsed body or the raw bytes)."""
        body = {"model": model, "messages": messages, **fields}
        conn, resp = self.open("POST", "/chat/completions", body, headers)
        raw = resp.read()
        conn.close()
        return resp.status, resp.headers, json.loads(raw) if raw else None, raw

    def stream(self, messages, model="gpt-4o-mini", headers=None, **fields):
        """A streamed create: (status, headers, chunks, every byte received)."""
        body = {"model": model, "messages": messages, "stream": True, **fields}
        conn, resp = self.open("POST", "/chat/completions", body, headers)
        raw = resp.read()
        conn.close()
        chunks = []
        for event in raw.split(b"\n\n"):
            line = event.strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                chunks.append(json.loads(line[6:]))
        return resp.status, resp.headers, chunks, raw

    @staticmethod
    def text(chunks):
        return "".join((c["choices"][0]["delta"].get("content") or "")
                       for c in chunks if c.get("choices"))


@pytest.fixture
def openai(client):
    return OpenAIClient(client.port)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def api_conversations(client):
    return [c for c in client.get("/api/conversations")[2]["conversations"]
            if c["source"] == "api"]


def test_a_plain_chat_is_relayed_byte_for_byte_and_recorded(client, stub, openai):
    status, headers, body, raw = openai.create([user("Explain machine learning")],
                                               temperature=0.3, logprobs=True)
    assert status == 200
    sent = stub.requests[-1]
    assert json.loads(sent["raw"]) == {"model": "gpt-4o-mini", "temperature": 0.3,
                                       "logprobs": True,
                                       "messages": [user("Explain machine learning")]}
    assert raw == stub.sent[0]                       # llama.cpp's answer, as it sent it
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    cid = int(headers["X-Conversation-Id"])
    found = conversation(client, cid)
    assert found["conversation"]["source"] == "api"
    assert found["conversation"]["client"] == "OpenAI/Python 1.54.0"
    assert found["conversation"]["title"] == "Explain machine learning"   # auto_title
    assert [(m["role"], m["content"]) for m in found["messages"]] == [
        ("user", "Explain machine learning"), ("assistant", stub.reply)]
    reply = found["messages"][1]
    assert reply["options"] == {"temperature": 0.3}
    assert reply["model"] == "gpt-4o-mini"          # as llama.cpp answered (the stub echoes)
    assert reply["finish_reason"] == "stop" and reply["prompt_tokens"] == 21
    assert client.get("/api/search?q=machine")[2]["count"] == 2


def test_a_reply_s_model_path_is_named_as_the_model_list_names_it(client, stub, openai):
    _, headers, _, _ = openai.create([user("hi")], model="/srv/models/" + MODEL)
    reply = conversation(client, int(headers["X-Conversation-Id"]))["messages"][-1]
    assert reply["model"] == MODEL and MODEL in client.get("/api/models")[2]["models"]


def test_the_request_body_goes_upstream_as_it_came(client, stub, openai):
    raw = (b'{"messages": [{"role": "user", "content": "hi \\u00e9"}],   "model":"m",'
           b'"tools":[{"type":"function","function":{"name":"f","parameters":{}}}],'
           b'"response_format":{"type":"json_object"},"x_unknown":[1,2]}')
    conn, resp = openai.open("POST", "/chat/completions", raw)
    assert resp.status == 200
    resp.read()
    conn.close()
    assert stub.requests[-1]["raw"] == raw


def test_a_stream_is_relayed_event_by_event_and_recorded(client, stub, openai):
    stub.reasoning = "Thinking first."
    status, headers, chunks, raw = openai.stream([user("Explain machine learning")])
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    assert raw == b"".join(stub.sent)                # nothing added, nothing re-encoded
    assert raw.split(b"\n\n") == b"".join(stub.sent).split(b"\n\n")
    assert OpenAIClient.text(chunks) == stub.reply
    cid = int(headers["X-Conversation-Id"])
    messages = conversation(client, cid)["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "Explain machine learning"), ("assistant", stub.reply)]
    assert messages[1]["reasoning"] == stub.reasoning
    assert messages[1]["finish_reason"] == "stop"
    assert messages[1]["estimated_tokens"] == len(stub.tokens())     # from timings
    assert messages[1]["predicted_ms"] == len(stub.tokens()) * 20.0 and messages[1]["ttft_ms"] > 0


def test_a_streamed_reply_is_stored_before_its_end_reaches_the_client(client, stub, openai):
    conn, resp = openai.open("POST", "/chat/completions",
                             {"messages": [user("Explain machine learning")], "stream": True})
    cid = int(resp.headers["X-Conversation-Id"])
    got = b""
    while b"[DONE]" not in got:
        piece = resp.read1(65536)
        assert piece, got
        got += piece
    # The client's next request may come now, repeating the reply: it is there.
    assert branch(client, cid) == ["Explain machine learning", stub.reply]
    conn.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_resending_its_history_continues_the_conversation(client, stub, openai,
                                                                   stream):
    ask = openai.stream if stream else openai.create
    first = ask([user("What is a volcano?")])
    cid = int(first[1]["X-Conversation-Id"])
    stub.reply = "Lava, mostly."
    second = ask([user("What is a volcano?"), assistant(OpenAIClient.text(first[2]) if stream
                                                         else first[2]["choices"][0]["message"]
                                                         ["content"]),
                  user("And lava?")])
    assert int(second[1]["X-Conversation-Id"]) == cid
    assert branch(client, cid) == ["What is a volcano?", stub.tokens() and
                                   "Machine learning lets computers learn patterns from data.",
                                   "And lava?", "Lava, mostly."]
    assert len(api_conversations(client)) == 1
    assert rows(client, "SELECT count(*) FROM messages") == [(4,)]


def test_a_history_that_differs_partway_branches_there(client, stub, openai):
    openai.create([user("Name a colour")])
    stub.reply = "Blue is calm."
    _, headers, _, _ = openai.create([user("Name a colour"), assistant(stub.tokens() and
                                      "Machine learning lets computers learn patterns from "
                                      "data."), user("Why blue?")])
    cid = int(headers["X-Conversation-Id"])
    # The client edits the reply it got before asking again: a branch at the reply.
    _, headers, _, _ = openai.create([user("Name a colour"), assistant("Red."),
                                      user("Why red?")])
    assert int(headers["X-Conversation-Id"]) == cid
    everything = conversation(client, cid, everything=True)["messages"]
    question = everything[0]
    replies = [m for m in everything if m["parent_id"] == question["id"]]
    assert [m["content"] for m in replies] == [
        "Machine learning lets computers learn patterns from data.", "Red."]
    assert branch(client, cid) == ["Name a colour", "Red.", "Why red?", "Blue is calm."]
    assert len(everything) == 7


def test_the_same_exchange_again_is_another_version_of_its_reply(client, stub, openai):
    _, first, _, _ = openai.create([user("Roll a die")])
    cid = int(first["X-Conversation-Id"])
    openai.create([user("Roll a die"), assistant(stub.reply), user("Again")])
    stub.reply = "Four."
    _, second, _, _ = openai.create([user("Roll a die"), assistant(
        "Machine learning lets computers learn patterns from data."), user("Again")])
    assert int(second["X-Conversation-Id"]) == cid
    messages = conversation(client, cid)["messages"]
    assert [m["content"] for m in messages][-2:] == ["Again", "Four."]
    assert len(messages[-1]["sibling_ids"]) == 2


def test_another_system_prompt_or_a_new_question_is_a_new_conversation(client, stub, openai):
    _, a, _, _ = openai.create([user("Hello")])
    _, b, _, _ = openai.create([{"role": "system", "content": "You are a pirate."},
                                user("Hello")])
    _, c, _, _ = openai.create([user("Something else entirely")])
    ids = {int(h["X-Conversation-Id"]) for h in (a, b, c)}
    assert len(ids) == 3
    pirate = conversation(client, int(b["X-Conversation-Id"]))
    assert pirate["conversation"]["system_prompt"] == "You are a pirate."
    assert [m["role"] for m in pirate["messages"]] == ["user", "assistant"]
    plain = conversation(client, int(a["X-Conversation-Id"]))
    assert plain["conversation"]["system_prompt"] == ""      # none was sent: none is used


def test_a_page_conversation_is_not_taken_over_by_a_client_with_the_same_words(client, stub,
                                                                             openai):
    status, _, body = client.post("/api/conversations", {"title": "Mine", "model": MODEL,
                                                         "system_prompt": ""})
    cid = body["conversation_id"]                    # the same (empty) system prompt too
    client.chat(cid, "Hello")
    _, headers, _, _ = openai.create([user("Hello")])
    assert int(headers["X-Conversation-Id"]) != cid
    assert branch(client, cid) == ["Hello", stub.reply]


def test_x_conversation_id_names_where_an_exchange_goes(client, stub, openai):
    cid = client.new_conversation()
    client.chat(cid, "First question")
    # A client that sends only its new question: it goes on the branch shown.
    _, headers, _, _ = openai.create([user("Second question")],
                                     headers={"X-Conversation-Id": str(cid)})
    assert headers["X-Conversation-Id"] == str(cid)
    assert branch(client, cid) == ["First question", stub.reply, "Second question", stub.reply]
    # One that sends the whole history continues it, adding only what is new.
    history = [user("First question"), assistant(stub.reply), user("Second question"),
               assistant(stub.reply), user("Third")]
    openai.create(history, headers={"X-Conversation-Id": str(cid)})
    assert branch(client, cid)[-2:] == ["Third", stub.reply]
    assert rows(client, "SELECT count(*) FROM messages") == [(6,)]


@pytest.mark.parametrize("value", ["999", "abc", "-1",
                                   "5f0e7c1a-2b3d-4e5f-8a9b-0c1d2e3f4a5b::gemma-3-4b"])
def test_a_conversation_id_that_is_not_ours_is_the_client_s_own(client, stub, openai, value):
    status, headers, _, _ = openai.create([user("hi")], headers={"X-Conversation-Id": value})
    assert status == 200
    cid = int(headers["X-Conversation-Id"])
    assert rows(client, "SELECT source, source_id FROM conversations WHERE id = ?", cid) == [
        ("api", value)]
    status, headers, _, _ = openai.create([user("hi"), assistant(stub.reply), user("more")],
                                          headers={"X-Conversation-Id": value})
    assert int(headers["X-Conversation-Id"]) == cid
    assert branch(client, cid) == ["hi", stub.reply, "more", stub.reply]
    assert len(api_conversations(client)) == 1


def test_a_conversation_is_named_by_its_uuid_too(client, stub, openai):
    cid = client.new_conversation()
    uuid = rows(client, "SELECT uuid FROM conversations WHERE id = ?", cid)[0][0]
    status, headers, _, _ = openai.create([user("hi")], headers={
        "X-Conversation-Id": uuid.upper()})
    assert status == 200 and int(headers["X-Conversation-Id"]) == cid


def test_two_requests_of_the_same_one_question_are_two_conversations(client, stub, openai):
    for _ in range(2):
        assert openai.create([user("What is the capital of France?")])[0] == 200
    found = api_conversations(client)
    assert len(found) == 2
    for c in found:
        assert branch(client, c["id"]) == ["What is the capital of France?", stub.reply]
    system = {"role": "system", "content": "Be brief."}
    for _ in range(2):
        openai.create([system, user("Hi")])
    assert len(api_conversations(client)) == 4
    # A follow-up (more than one message) still continues the branch it repeats.
    openai.create([system, user("Hi"), assistant(stub.reply), user("And?")])
    assert len(api_conversations(client)) == 4


@pytest.mark.parametrize("raw,code", [
    (b"{not json", "INVALID_JSON"),
    (b"[1, 2]", "INVALID_JSON"),
    (b'{"model": "m"}', "VALIDATION_ERROR"),
    (b'{"messages": []}', "VALIDATION_ERROR"),
    (b'{"messages": ["hi"]}', "VALIDATION_ERROR"),
    (b'{"messages": "hi"}', "VALIDATION_ERROR"),
])
def test_bad_requests_get_openai_shaped_errors(client, stub, openai, raw, code):
    for record in ("on", "off"):
        conn, resp = openai.open("POST", "/chat/completions", raw,
                                 {"X-LlamaChat-Record": record})
        body = json.loads(resp.read())
        conn.close()
        assert resp.status == 400
        assert body == {"error": {"message": body["error"]["message"],
                                  "type": "invalid_request_error", "code": code,
                                  "param": body["error"]["param"]}}
    assert stub.requests == []


def test_llamacpp_errors_pass_through_unchanged(client, stub, openai):
    stub.mode = "error500"
    status, headers, body, raw = openai.create([user("Explain machine learning")])
    assert status == 500 and raw == stub.sent[0]
    assert body["error"]["message"] == "model crashed"
    cid = int(headers["X-Conversation-Id"])
    assert branch(client, cid) == ["Explain machine learning"]     # the question is kept
    stub.mode = "ok"
    _, headers, _, _ = openai.create([user("Explain machine learning")])
    again = int(headers["X-Conversation-Id"])            # one question: a conversation of its own
    assert again != cid and branch(client, again) == ["Explain machine learning", stub.reply]


def test_llamacpp_down_is_an_openai_shaped_502(down_client):
    status, _, body, _ = OpenAIClient(down_client.port).create([user("hi")])
    assert status == 502 and body["error"]["code"] == "LLAMACPP_ERROR"
    assert body["error"]["type"] == "server_error"


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_that_ends_in_tool_calls_keeps_that_finish_reason(client, stub, openai, stream):
    stub.tool_calls = [{"id": "call_1", "type": "function", "function": {
        "name": "f", "arguments": "{}"}}]
    (openai.stream if stream else openai.create)([user("call it")])
    assert rows(client, "SELECT finish_reason, tool_calls IS NOT NULL FROM messages "
                "WHERE role = 'assistant'") == [("tool_calls", 1)]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_and_their_results_round_trip(client, stub, openai, stream):
    ask = openai.stream if stream else openai.create
    stub.tool_calls = [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": "Zürich"})}}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    first = ask([user("Weather in Zürich?")], tools=tools)
    cid = int(first[1]["X-Conversation-Id"])
    call = conversation(client, cid)["messages"][-1]
    assert call["role"] == "assistant" and call["content"] == ""
    assert call["tool_calls"] == stub.tool_calls
    # The client runs the tool and sends its result (as the openai package
    # re-sends a message: content null, tool_calls with what it was given).
    stub.tool_calls = None
    stub.reply = "It is 21 degrees in Zürich."
    ask([user("Weather in Zürich?"),
         {"role": "assistant", "content": None, "tool_calls": [
             {"id": "call_1", "type": "function", "function": {
                 "name": "get_weather", "arguments": json.dumps({"city": "Zürich"})}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'}],
        tools=tools)
    messages = conversation(client, cid)["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "Weather in Zürich?"), ("assistant", ""), ("tool", '{"celsius": 21}'),
        ("assistant", "It is 21 degrees in Zürich.")]
    assert messages[2]["tool_call_id"] == "call_1"
    assert len(api_conversations(client)) == 1
    # Continued in the page: llama.cpp is sent the calls and results as they came.
    status, _, body = client.chat(cid, "Thanks")
    assert status == 200, body
    sent = stub.requests[-1]["body"]["messages"]
    assert sent[:3] == [user("Weather in Zürich?"),
                         {"role": "assistant", "content": "", "tool_calls": call["tool_calls"]},
                         {"role": "tool", "content": '{"celsius": 21}', "tool_call_id": "call_1"}]


def test_a_reply_after_a_tool_result_regenerates_from_that_result(client, stub, openai):
    stub.tool_calls = [{"id": "c9", "type": "function",
                        "function": {"name": "now", "arguments": "{}"}}]
    _, headers, _, _ = openai.create([user("What time is it?")])
    cid = int(headers["X-Conversation-Id"])
    stub.tool_calls = None
    openai.create([user("What time is it?"), {"role": "assistant", "content": None,
                                               "tool_calls": stub.requests and [
                                                   {"id": "c9", "type": "function", "function":
                                                    {"name": "now", "arguments": "{}"}}]},
                   {"role": "tool", "tool_call_id": "c9", "content": "12:00"}])
    reply = conversation(client, cid)["messages"][-1]
    status, _, body = client.post("/api/chat", {"conversation_id": cid,
                                                "regenerate": reply["id"]})
    assert status == 200, body
    assert body["parent_id"] == reply["parent_id"]          # under the tool's result
    assert stub.requests[-1]["body"]["messages"][-1] == {
        "role": "tool", "content": "12:00", "tool_call_id": "c9"}


def test_content_parts_are_stored_as_their_text_and_media_as_attachments(client, stub,
                                                                        openai):
    photo = PNG + os.urandom(4 << 20)              # a phone's photo: 4 MB, past the 1 MiB of JSON
    url = "data:image/png;base64," + base64.b64encode(photo).decode()
    status, headers, _, _ = openai.create([{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "image_url", "image_url": {"url": "data:image/svg+xml;base64,"
                                             + base64.b64encode(b"<svg/>").decode()}},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(WAV).decode(),
                                                "format": "wav"}}]}])
    assert status == 200
    cid = int(headers["X-Conversation-Id"])
    shown = conversation(client, cid)["messages"][0]
    assert shown["content"] == "What is in this picture?\n[image_url]"     # the SVG: not kept
    assert [(a["kind"], a["bytes"]) for a in shown["attachments"]] == [
        ("image", len(photo)), ("audio", len(WAV))]
    assert not rows(client, "SELECT 1 FROM messages WHERE content LIKE '%iVBOR%'")
    for _ in range(2):                             # the same image again: stored once
        openai.create([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}]}])
    assert rows(client, "SELECT count(*) FROM attachments") == [(2,)]
    client.chat(cid, "and in the corner?")        # continued in the page: sent again
    parts = next(m for m in stub.requests[-1]["body"]["messages"] if m["role"] == "user")[
        "content"]
    assert [p["type"] for p in parts] == ["image_url", "input_audio", "text"]
    assert parts[0]["image_url"]["url"] == url


def test_a_v1_photo_is_lifted_out_of_its_request_and_left_in_no_reference_cycle():
    """The base64 of a photo in a /v1 request is decoded from the body's own
    bytes, and nothing it makes outlives the request waiting for Python's
    cycle collector (a photo's worth of memory a request, until then)."""
    photo = jpeg_like(300_000, 5)
    url = "data:image/jpeg;base64," + base64.b64encode(photo).decode()
    raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(
            WAV + bytes(8000)).decode(), "format": "wav"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!!" + "A" * 5000}},
    ]}]}).encode()
    req = llama_chat.Request("POST", "/v1/chat/completions", {}, {}, raw)
    gc.disable()                 # what is freed now is freed by its count of references
    try:
        body = llama_chat.lifted_json(req)
        parts = body["messages"][0]["content"]
        assert isinstance(parts[1]["image_url"]["url"], llama_chat.Lifted)
        decoded = parts[1]["image_url"]["url"].data
        assert decoded == photo and parts[2]["input_audio"]["data"].data == WAV + bytes(8000)
        assert not isinstance(parts[3]["image_url"]["url"], llama_chat.Lifted)   # not base64
        assert [found[1] for found in map(llama_chat.kept_medium, parts[1:3])] == [
            "image", "audio"]
        assert body["model"] == "m" and parts[0]["text"] == "what is this?"
        del body, parts
        assert sys.getrefcount(decoded) == 2     # this name's and the call's: nothing else
    finally:
        gc.enable()


def test_lone_surrogates_are_stored_as_replacement_characters(client, stub, openai):
    conn, resp = openai.open("POST", "/chat/completions",
                             b'{"messages": [{"role": "user", "content": "bad \\ud800 text"}]}')
    assert resp.status == 200
    cid = int(resp.headers["X-Conversation-Id"])
    resp.read()
    conn.close()
    assert branch(client, cid)[0].startswith("bad \ufffd")


@pytest.mark.parametrize("how", ["header", "config"])
def test_nothing_is_recorded_when_asked(tmp_path, stub, launch, how):
    server = launch(stub.url, openai_record=how != "config")
    openai = OpenAIClient(server.server_address[1])
    headers = {"X-LlamaChat-Record": "off"} if how == "header" else {}
    for ask in (openai.create, openai.stream):
        status, answer_headers, _, raw = ask([user("Explain machine learning")],
                                             headers=headers)
        assert status == 200 and raw == b"".join(stub.sent)
        assert "X-Conversation-Id" not in answer_headers
    assert rows(Client(server), "SELECT count(*) FROM conversations") == [(0,)]


def test_a_record_setting_that_is_not_a_boolean_stops_start_up(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"openai_api": {"record": "yes"}}))
    with pytest.raises(llama_chat.ConfigError, match="openai_api"):
        llama_chat.load_settings(["--config", str(path)], {})


@pytest.mark.parametrize("key,given,status", [
    ("", None, 200), ("", "anything", 200),
    ("s3cret", None, 401), ("s3cret", "wrong", 401), ("s3cret", "s3cret", 200)])
def test_the_api_key_applies_to_v1_as_a_bearer_token(tmp_path, stub, launch, key, given,
                                                     status):
    server = launch(stub.url, api_key=key)
    openai = OpenAIClient(server.server_address[1], given)
    for path in ("/models", "/chat/completions"):
        headers = {} if given else {"Authorization": ""}
        conn, resp = openai.open("POST" if "chat" in path else "GET", path,
                                 {"messages": [user("hi")]} if "chat" in path else None,
                                 headers)
        body = json.loads(resp.read())
        conn.close()
        assert resp.status == status
        if status == 401:
            assert body["error"]["type"] == "authentication_error"


def test_other_v1_routes_are_relayed_and_not_recorded(client, stub, openai):
    conn, resp = openai.open("GET", "/models")
    raw = resp.read()
    conn.close()
    assert resp.status == 200 and raw == stub.sent[0]
    for path in ("/embeddings", "/completions", "/responses"):
        conn, resp = openai.open("POST", path, {"input": "hello", "model": "m"})
        body = json.loads(resp.read())
        conn.close()
        assert resp.status == 200 and body["path"] == "/v1" + path
        assert "X-Conversation-Id" not in resp.headers
    assert rows(client, "SELECT count(*) FROM conversations") == [(0,)]
    conn, resp = openai.open("GET", "/../props")
    resp.read()
    conn.close()
    assert resp.status == 404


def test_a_client_leaving_mid_stream_ends_llamacpp_s_reply_and_keeps_the_part(client, stub,
                                                                            openai):
    stub.reply = " ".join(f"w{i}" for i in range(200))
    stub.token_delay = 0.02
    conn, resp = openai.open("POST", "/chat/completions",
                             {"messages": [user("Count")], "stream": True})
    cid = int(resp.headers["X-Conversation-Id"])
    got = b""
    while got.count(b"data: ") < 6:
        got += resp.read1(4096) if hasattr(resp, "read1") else resp.read(64)
    conn.raw_sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    left = time.monotonic()
    while (stub.open_streams or len(branch(client, cid)) < 2) and time.monotonic() - left < 3:
        time.sleep(0.05)
    assert stub.open_streams == 0 and time.monotonic() - left < 1.5
    reply = conversation(client, cid)["messages"][-1]
    assert reply["finish_reason"] == "aborted"
    assert reply["content"].startswith("w0 w1") and len(reply["content"]) < len(stub.reply)


def test_a_client_leaving_while_llamacpp_reads_the_prompt_ends_the_request(client, stub,
                                                                         openai):
    stub.reply = " ".join(f"w{i}" for i in range(100))
    stub.stall = 1.0                          # llama.cpp silent: reading the prompt
    stub.token_delay = 0.02
    conn, _ = openai.open("GET", "/models")   # a connection, then the chat on its own
    conn.close()
    raw = socket.create_connection(("127.0.0.1", client.port))
    body = json.dumps({"messages": [user("Count")], "stream": True}).encode()
    raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body))
    time.sleep(0.3)
    raw.close()
    time.sleep(1.2)                           # the stub starts streaming, into a closed socket
    deadline = time.monotonic() + 1
    while stub.open_streams and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stub.open_streams == 0
    assert rows(client, "SELECT role FROM messages") == [("user",)]


def test_deleting_a_conversation_ends_its_v1_stream(client, stub, openai):
    stub.reply = " ".join(f"w{i}" for i in range(200))
    stub.token_delay = 0.02
    conn, resp = openai.open("POST", "/chat/completions",
                             {"messages": [user("Count")], "stream": True})
    cid = int(resp.headers["X-Conversation-Id"])
    resp.readline()
    assert client.delete(f"/api/conversations/{cid}")[0] == 200
    rest = resp.read()
    conn.close()
    last = [e for e in rest.split(b"\n\n") if e.strip()][-1]
    assert json.loads(last[6:])["error"]["code"] == "NOT_FOUND"
    assert rows(client, "SELECT count(*) FROM messages") == [(0,)]


def test_two_clients_sending_the_same_history_at_once_store_it_once(client, stub, openai):
    openai.create([user("Start")])
    stub.stall = 0.3
    history = [user("Start"), assistant(stub.reply), user("Same next question")]
    threads = [threading.Thread(target=openai.create, args=(history,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert rows(client, "SELECT count(*) FROM messages WHERE content = 'Same next question'") \
        == [(1,)]
    assert rows(client, "SELECT count(*) FROM messages WHERE role = 'assistant'") == [(5,)]


def test_a_schema_4_database_takes_tool_messages_and_keeps_its_ids(tmp_path):
    path = str(tmp_path / "v4.db")

    def fill(c):
        c.execute("INSERT INTO conversations (title, model) VALUES ('kept', 'm')")
        for text in ("question", "answer", "gone"):
            c.execute("INSERT INTO messages (conversation_id, parent_id, role, content) "
                      "SELECT 1, max(id), ?, ? FROM messages", (
                          "assistant" if text == "answer" else "user", text))
        c.execute("DELETE FROM messages WHERE content = 'gone'")   # its id is not reused
    store = migrated(path, fill, 4)
    found = store.get_conversation(1)
    assert (found["source"], found["source_id"], found["client"]) == (None, None, None)
    assert [m["content"] for m in json.loads(store.messages(1)[0])] == ["question", "answer"]
    assert len(store.search("answer", 5)) == 1
    store.index.check()
    tool = store.add_message(1, "tool", "42", tool_call_id="c1")
    assert tool == 4
    conn = sqlite3.connect(path)
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'messages'").fetchone()[0]
    assert "'tool'" in sql and conn.execute("PRAGMA foreign_key_check").fetchall() == []
    digests = conn.execute("SELECT role, content, digest FROM messages ORDER BY id").fetchall()
    assert all(d == llama_chat.message_digest(r, t, None, "c1" if r == "tool" else None)
               for r, t, d in digests)
    triggers = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = "
                                           "'trigger'")}
    assert {"message_parent_added", "search_message_added", "conversation_removed",
            "message_digest_added"} <= triggers
    store.close()


def test_an_api_conversation_is_continued_in_the_page_s_api(client, stub, openai):
    _, headers, _, _ = openai.create([{"role": "system", "content": "Answer in French."},
                                      user("Hello")])
    cid = int(headers["X-Conversation-Id"])
    status, _, body = client.chat(cid, "And goodbye?")
    assert status == 200, body
    sent = stub.requests[-1]["body"]["messages"]
    assert sent[0] == {"role": "system", "content": "Answer in French."}
    assert [m["content"] for m in sent[1:]] == ["Hello", stub.reply, "And goodbye?"]


###############################################################################
# Export, import, backup and the command line
###############################################################################

def a_history(client, stub):
    """A conversation with a branch, settings, reasoning and metrics, and a second one."""
    status, _, body = client.post("/api/conversations", {
        "title": "Volcanoes 🌋", "model": MODEL, "system_prompt": "Be brief.",
        "options": {"temperature": 0.4}, "pinned": True})
    cid = body["conversation_id"]
    stub.reasoning = "Think of lava."
    client.chat(cid, "What is a volcano?")
    stub.reasoning = ""
    first = conversation(client, cid)["messages"][-1]["id"]
    stub.reply = "A mountain that erupts."
    regenerate(client, cid, first)
    client.chat(cid, "And lava?", options={"top_k": 5})
    other = client.new_conversation("Second")
    client.chat(other, "Hello there")
    return cid, other


def comparable(client_or_store, cid):
    """A conversation and all its messages, ids replaced by their order."""
    if isinstance(client_or_store, llama_chat.Store):
        found = json.loads(llama_chat.export_one(client_or_store.db, cid))
    else:
        found = client_or_store.get(f"/api/conversations/{cid}/export")[2]
    conv, messages = found["conversation"], found["messages"]
    order = {m["id"]: i for i, m in enumerate(messages)}
    for m in messages:
        m["id"], m["parent_id"] = order[m["id"]], order.get(m["parent_id"])
    conv["current_message_id"] = order.get(conv["current_message_id"])
    for name in ("id", "source", "source_id"):
        conv.pop(name)
    return conv, messages


@pytest.mark.parametrize("form", ["json", "jsonl", "zip"])
def test_an_export_imports_into_an_empty_database_equal_field_by_field(client, stub, launch,
                                                                       form, tmp_path):
    cid, other = a_history(client, stub)
    status, headers, raw = client.request("GET", "/api/export?format="
                                          + ("jsonl" if form == "zip" else form))
    assert status == 200 and "attachment" in headers["Content-Disposition"]
    data = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    if form != "json":
        assert len(data.splitlines()) == 2
    if form == "zip":
        data = zip_of({"history.jsonl": data})
    target = llama_chat.Store(str(tmp_path / "empty.db"))
    done = llama_chat.import_file(target, io.BytesIO(data))
    assert done == {"conversations": 2, "messages": 7, "attachments": 0, "skipped": 0,
                    "empty": 0, "coerced": 0,
                    "format": "llama-chat"}
    ids = [c["id"] for c in json.loads(target.list_conversations())]
    mine = {c["title"]: c["id"] for c in json.loads(target.list_conversations())}
    assert comparable(target, mine["Volcanoes 🌋"]) == comparable(client, cid)
    assert comparable(target, mine["Second"]) == comparable(client, other)
    assert len(ids) == 2
    again = llama_chat.import_file(target, io.BytesIO(data))
    assert again["conversations"] == 0 and again["skipped"] == 2
    target.index.check()
    counted = llama_chat.ledger(target.db, ("model", "day"), None, None)
    assert counted == llama_chat.ledger(client.engine.store.db, ("model", "day"), None, None)
    assert sum(g["replies"] for g in counted) == 4
    target.add_message(ids[0], "user", "zymurgical afterthought")   # indexed as ever after
    assert len(target.search("zymurgical", 5)) == 1
    target.add_message(ids[0], "assistant", "and counted", "m")       # the ledger's trigger too
    assert sum(g["replies"] for g in llama_chat.ledger(target.db, ("model",), None, None)) == 5
    assert len(target.search("erupts", 50)) == client.get("/api/search?q=erupts")[2]["count"]
    target.close()


@pytest.mark.parametrize("form", ["json", "jsonl", "zip"])
def test_an_export_imported_into_its_own_database_doubles_nothing(client, stub, form):
    a_history(client, stub)
    client.chat(client.new_conversation("Made in the page"), "Hello")
    before = rows(client, "SELECT id, uuid, title FROM conversations ORDER BY id")
    data = client.request("GET", f"/api/export?format={'json' if form == 'zip' else form}")[2]
    data = data if isinstance(data, bytes) else json.dumps(data).encode()
    if form == "zip":
        data = zip_of({"history.json": data})
    status, body = imported(client, data)
    assert status == 200 and (body["conversations"], body["skipped"]) == (0, 3), body
    assert rows(client, "SELECT id, uuid, title FROM conversations ORDER BY id") == before
    one = client.get(f"/api/conversations/{before[0][0]}/export")[2]
    assert one["conversation"]["uuid"] == before[0][1]
    assert imported(client, json.dumps(one).encode())[1]["skipped"] == 1


def test_a_round_trip_through_another_database_and_back_doubles_nothing(client, stub, tmp_path):
    cid, other = a_history(client, stub)
    data = client.request("GET", "/api/export?format=jsonl")[2]
    there = llama_chat.Store(str(tmp_path / "there.db"))
    assert llama_chat.import_file(there, io.BytesIO(data))["conversations"] == 2
    there.add_message(json.loads(there.list_conversations())[0]["id"], "user", "made there")
    back = io.BytesIO()
    for piece in llama_chat.export_all(there.db, "json"):
        back.write(piece)
    there.close()
    status, body = imported(client, back.getvalue())
    assert status == 200 and (body["conversations"], body["skipped"]) == (0, 2), body
    assert rows(client, "SELECT count(*) FROM conversations") == [(2,)]


def test_the_same_conversation_twice_in_one_file_is_stored_once(client):
    data = webui_jsonl(WEBUI_CONV, WEBUI_MESSAGES) + b"\n" + webui_jsonl(WEBUI_CONV,
                                                                         WEBUI_MESSAGES)
    status, body = imported(client, data)
    assert status == 200 and (body["conversations"], body["skipped"]) == (1, 1), body


@pytest.mark.parametrize("form", ["json", "jsonl"])
def test_an_export_that_fails_part_way_is_a_broken_download(client, monkeypatch, form):
    for i in range(5):
        client.new_conversation(f"c{i}")
    real = llama_chat.exported

    def failing(conn, db, conversation_id):
        if conversation_id == 4:
            raise sqlite3.OperationalError("disk I/O error")
        return real(conn, db, conversation_id)
    monkeypatch.setattr(llama_chat, "exported", failing)
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=10)
    conn.request("GET", f"/api/export?format={form}")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
    with pytest.raises(http.client.IncompleteRead) as broken:
        resp.read()
    assert b'"title": "c2"' in broken.value.partial or b'"title":"c2"' in broken.value.partial
    monkeypatch.setattr(llama_chat, "exported", real)
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=10)
    conn.request("GET", f"/api/export?format={form}")
    whole = conn.getresponse().read()                    # the last chunk came: no error
    assert whole.count(b'"uuid"') == 5


def test_one_conversation_exports_as_json_and_as_markdown(client, stub):
    cid, _ = a_history(client, stub)
    status, headers, body = client.get(f"/api/conversations/{cid}/export")
    assert status == 200 and headers["Content-Disposition"] == \
        'attachment; filename="Volcanoes.json"'
    assert (body["format"], body["version"]) == ("llama-chat", 1)
    assert body["conversation"]["system_prompt"] == "Be brief."
    assert body["conversation"]["options"] == {"temperature": 0.4}
    assert len(body["messages"]) == 5 and body["messages"][1]["reasoning"] == "Think of lava."
    status, headers, md = client.get(f"/api/conversations/{cid}/export?format=md")
    text = md.decode()
    assert headers["Content-Type"] == "text/markdown; charset=utf-8"
    assert text.startswith("# Volcanoes 🌋\n")
    assert "## User · " in text and "A mountain that erupts." in text
    assert "Machine learning lets" not in text           # the other branch's reply
    assert client.get(f"/api/conversations/{cid}/export?format=pdf")[0] == 400
    assert client.get("/api/conversations/999/export")[0] == 404


def a_tree_to_learn_from(client, stub):
    """A conversation in a project with a reply regenerated (the first one
    shown again) and a question edited (asked again beside the first) and its
    reply regenerated; a second one of another model. (project id, the
    first conversation's id)"""
    pid = new_project(client, "Tuning", system_prompt="Be brief.")
    cid = client.post("/api/conversations", {"title": "t", "model": MODEL,
                                              "project_id": pid})[2]["conversation_id"]
    stub.reply = "A1"
    first = client.chat(cid, "q1")[2]
    stub.reply = "A1b"
    regenerate(client, cid, first["user_message_id"])
    client.put(f"/api/conversations/{cid}", {"current_message_id": first["message_id"]})
    stub.reply = "B"
    client.chat(cid, "q2")
    stub.reply = "C"
    edited = client.chat(cid, "q2 edited", parent_id=first["message_id"])[2]
    stub.reply = "C2"
    regenerate(client, cid, edited["user_message_id"])
    other = client.new_conversation("other")
    stub.reply = "R1"
    asked = client.chat(other, "why", model="other.gguf")[2]
    stub.reply = "R2"
    regenerate(client, other, asked["user_message_id"], model="other.gguf")
    return pid, cid


def jsonl_get(client, path):
    """(status, headers, the lines of JSONL) of a GET."""
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, resp.headers, [json.loads(line) for line in raw.decode().splitlines()]


def test_preference_and_sft_datasets_come_from_the_shown_branches(client, stub):
    a_tree_to_learn_from(client, stub)
    status, headers, lines = jsonl_get(client, "/api/export?format=preference")
    assert status == 200 and headers["Content-Type"] == "application/x-ndjson"
    system, q1, a1 = ({"role": "system", "content": "Be brief."}, user("q1"), assistant("A1"))
    assert lines == [
        {"prompt": [system, q1], "chosen": a1, "rejected": [assistant("A1b")]},
        {"prompt": [system, q1, a1, user("q2 edited")], "chosen": assistant("C2"),
         "rejected": [assistant("C")]},
        {"prompt": [user("why")], "chosen": assistant("R2"),
         "rejected": [assistant("R1")]}]
    assert jsonl_get(client, "/api/export?format=sft")[2] == [
        {"messages": [system, q1, a1, user("q2 edited"), assistant("C2")]},
        {"messages": [user("why"), assistant("R2")]}]


def test_datasets_are_narrowed_by_search_model_days_and_project(client, stub):
    pid, _ = a_tree_to_learn_from(client, stub)
    today = llama_chat.now_iso()[:10]

    def chosen(query, form="preference"):
        status, _, lines = jsonl_get(client, f"/api/export?format={form}&{query}")
        assert status == 200, lines
        return [line["chosen"]["content"] if form == "preference" else
                line["messages"][-1]["content"] for line in lines]
    assert chosen(f"project={pid}") == ["A1", "C2"]
    assert chosen("model=other.gguf") == ["R2"] and chosen("model=nothing") == []
    assert chosen("q=edited") == ["A1", "C2"] and chosen("q=edited", "sft") == ["C2"]
    assert chosen(f"since={today}&until={today}") == ["A1", "C2", "R2"]
    assert chosen("since=2999-01-01") == [] and chosen("until=2000-01-01", "sft") == []
    for query, field in (("q=x", "q"), ("project=1", "project")):
        status, _, body = client.get(f"/api/export?format=jsonl&{query}")
        assert (status, body["field"]) == (400, field)            # they narrow datasets only
    for query, field in (("since=2026-02-30", "since"), ("project=0", "project"),
                         ("format=csv", "format"), ("q=" + "x" * 1001, "q")):
        status, _, body = client.get(f"/api/export?format=sft&{query}")
        assert (status, body["field"]) == (400, field)


def test_a_dataset_keeps_tool_calls_and_their_results(client, stub, openai):
    call = {"id": "call_7", "type": "function", "function": {"name": "lookup",
                                                             "arguments": '{"q": "tide"}'}}
    stub.tool_calls = [call]
    _, headers, _, _ = openai.create([user("When is high tide?")])
    stub.tool_calls = None
    openai.create([user("When is high tide?"), {"role": "assistant", "content": None,
                                                "tool_calls": [call]},
                   {"role": "tool", "tool_call_id": "call_7", "content": "06:12"}])
    line = jsonl_get(client, "/api/export?format=sft")[2][0]
    assert [m["role"] for m in line["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert line["messages"][1]["tool_calls"][0]["function"]["name"] == "lookup"
    assert line["messages"][2] == {"role": "tool", "content": "06:12", "tool_call_id": "call_7"}
    assert "tool_calls" not in line["messages"][0] and "tool_call_id" not in line["messages"][3]


def test_a_reply_being_made_is_no_part_of_a_dataset(client, stub):
    cid = client.new_conversation()
    first = client.chat(cid, "q")[2]
    shown = regenerate(client, cid, first["user_message_id"])[2]
    for being_made in (first["message_id"], shown["message_id"]):     # a sibling; the shown one
        with client.engine.store.db.write() as c:
            c.execute("UPDATE messages SET generating = NULL")
            c.execute("UPDATE messages SET generating = 'x' WHERE id = ?", (being_made,))
        assert jsonl_get(client, "/api/export?format=preference")[2] == []
    assert jsonl_get(client, "/api/export?format=sft")[2] == []          # no reply left


def test_the_command_line_exports_datasets(client, stub):
    pid, _ = a_tree_to_learn_from(client, stub)
    client.engine.store.add_message(client.new_conversation("third"), "user", "q2 elsewhere")
    db = client.engine.store.db.path
    out = cli("export", "--format", "preference", "--project", str(pid), db=db, check=0).stdout
    assert [json.loads(line)["chosen"]["content"] for line in out.splitlines()] == ["A1", "C2"]
    assert {line.split("\t")[3] for line in cli("search", "q2", db=db, check=0).stdout
            .splitlines()} == {"t", "third"}
    found = cli("search", "q2", "--project", str(pid), db=db, check=0).stdout.splitlines()
    assert found and all(line.split("\t")[3] == "t" for line in found)     # its one conversation
    assert cli("search", "q2", "--project", str(pid + 1), db=db, check=0).stdout == ""
    out = cli("export", "--format", "sft", "-q", "why", "--since", "2000-01-01", db=db,
              check=0).stdout
    assert [json.loads(line)["messages"][-1]["content"] for line in out.splitlines()] == ["R2"]
    assert "narrow the datasets" in cli("export", "--model", "m", db=db, check=1).stderr
    assert "ISO day" in cli("export", "--format", "sft", "--until", "May", db=db,
                            check=1).stderr


# llama.cpp's web UI (tools/ui): conversations and messages as its IndexedDB
# keeps them (types/database.d.ts: DatabaseConversation, DatabaseMessage,
# toolCalls a JSON string, "" when none), and its export as
# ConversationTransferService.serializeSessionToJsonl writes it.
WEBUI_CONV = {"id": "conv-1", "name": "Webui chat", "currNode": "m6",
              "lastModified": 1735689600000, "pinned": True, "thinkingEnabled": True}
WEBUI_MESSAGES = [
    {"id": "root", "convId": "conv-1", "type": "root", "role": "user", "content": "",
     "parent": None, "children": ["m1"], "timestamp": 1735689500000, "toolCalls": ""},
    {"id": "m1", "convId": "conv-1", "type": "text", "role": "user", "content": "Describe this",
     "parent": "root", "children": ["m2", "m3"], "timestamp": 1735689510000, "toolCalls": "",
     "extra": [{"type": "IMAGE", "name": "cat.png", "size": 70,
                "base64Url": "data:image/png;base64,iVBORw0KGgo="},
               {"type": "TEXT", "name": "notes.txt", "size": 9, "content": "Whiskers."},
               {"type": "AUDIO", "name": "purr.wav", "base64Data": "UklGRg==",
                "mimeType": "audio/wav"}]},
    {"id": "m2", "convId": "conv-1", "type": "text", "role": "assistant", "content": "A cat.",
     "parent": "m1", "children": [], "timestamp": 1735689520000, "model": "gemma",
     "reasoningContent": "It looks furry.", "toolCalls": "",
     "timings": {"cache_n": 4, "prompt_n": 12, "prompt_ms": 30, "predicted_n": 3,
                 "predicted_ms": 60}},
    {"id": "m3", "convId": "conv-1", "type": "text", "role": "assistant", "content": "",
     "parent": "m1", "children": ["m4"], "timestamp": 1735689530000, "model": "gemma",
     "toolCalls": json.dumps([{"id": "call_1", "type": "function", "function": {
         "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}])},
    {"id": "m4", "convId": "conv-1", "type": "text", "role": "tool", "content": "-3 C",
     "parent": "m3", "children": ["m5"], "timestamp": 1735689531000, "toolCallId": "call_1",
     "toolCalls": ""},
    {"id": "m5", "convId": "conv-1", "type": "text", "role": "assistant",
     "content": "A sleepy cat, and it is cold in Oslo.", "parent": "m4", "children": ["m6"],
     "timestamp": 1735689532000, "model": "gemma", "toolCalls": ""},
    {"id": "m6", "convId": "conv-1", "type": "text", "role": "user", "content": "Name it",
     "parent": "m5", "children": [], "timestamp": 1735689540000, "toolCalls": ""},
]


def webui_jsonl(conv, messages):
    """serializeSessionToJsonl: a session line (harness, type, ...conv), then
    a line a message ({message, type}: toolCalls dropped when empty, else
    parsed to its array), joined by newlines."""
    lines = [json.dumps({"harness": "llama.engine", "type": "session", **conv})]
    for m in messages:
        rest = {k: v for k, v in m.items() if k != "toolCalls"}
        normalized = {**rest, "toolCalls": json.loads(m["toolCalls"])} if m.get("toolCalls") \
            else rest
        lines.append(json.dumps({"message": normalized, "type": "message"}))
    return "\n".join(lines).encode()


def jsonl(items):
    return "\n".join(json.dumps(i) for i in items).encode() + b"\n"


def imported(client, data):
    status, _, body = client.post("/api/import", raw=data,
                                  headers={"Content-Type": "application/octet-stream"})
    return status, body


def only_conversation(client, source):
    found = [c for c in client.get("/api/conversations")[2]["conversations"]
             if c["source"] == source]
    assert len(found) == 1, found
    return conversation(client, found[0]["id"], everything=True)


# The image and the text file are kept as attachments; "purr.wav" is no WAV
# (its bytes are "RIFF" alone): named in the text instead.
WEBUI_SHOWN = ["Describe this\n\n[audio: purr.wav]", "", "-3 C",
               "A sleepy cat, and it is cold in Oslo.", "Name it"]


def test_llamacpp_webui_jsonl_imports_with_its_tree(client):
    status, body = imported(client, webui_jsonl(WEBUI_CONV, WEBUI_MESSAGES))
    assert status == 200, body
    assert body == {"success": True, "conversations": 1, "messages": 6, "attachments": 2,
                    "skipped": 0, "empty": 0, "coerced": 0, "format": "llama.cpp-webui"}
    found = only_conversation(client, "llama.cpp-webui")
    c, messages = found["conversation"], found["messages"]
    assert (c["title"], c["source_id"], c["system_prompt"], c["pinned"]) == (
        "Webui chat", "conv-1", None, True)
    assert c["updated_at"] == "2025-01-01T00:00:00.000Z"
    assert [m["content"] for m in messages] == WEBUI_SHOWN[:1] + ["A cat."] + WEBUI_SHOWN[1:]
    assert [m["role"] for m in messages] == ["user", "assistant", "assistant", "tool",
                                             "assistant", "user"]
    assert messages[0]["parent_id"] is None
    assert [(a["name"], a["kind"], a["bytes"]) for a in messages[0]["attachments"]] == [
        ("cat.png", "image", 8), ("notes.txt", "text", 9)]
    assert client.get(f"/api/attachments/{messages[0]['attachments'][1]['id']}")[2] == \
        b"Whiskers."
    assert messages[1]["parent_id"] == messages[2]["parent_id"] == messages[0]["id"]
    assert messages[1]["reasoning"] == "It looks furry." and messages[1]["model"] == "gemma"
    assert (messages[1]["prompt_tokens"], messages[1]["estimated_tokens"],
            messages[1]["tokens_per_second"]) == (12, 3, 50.0)
    assert messages[2]["tool_calls"] == json.loads(WEBUI_MESSAGES[3]["toolCalls"])
    assert messages[3]["tool_call_id"] == "call_1" and messages[3]["tool_calls"] is None
    assert messages[0]["timestamp"] == "2024-12-31T23:58:30.000Z"
    assert c["current_message_id"] == messages[5]["id"]
    assert branch(client, c["id"]) == WEBUI_SHOWN
    assert rows(client, "SELECT cache_n, prompt_ms FROM messages WHERE reasoning IS NOT NULL") \
        == [(4, 30.0)]
    again = imported(client, webui_jsonl(WEBUI_CONV, WEBUI_MESSAGES))[1]
    assert (again["conversations"], again["skipped"]) == (0, 1)


def test_llamacpp_webui_sessions_in_one_file_and_records_of_later_versions(client):
    second = {**WEBUI_CONV, "id": "conv-2", "name": "Second", "pinned": False}
    data = webui_jsonl(WEBUI_CONV, WEBUI_MESSAGES) + b"\n" + json.dumps(
        {"type": "checkpoint", "at": 3}).encode() + b"\n" + webui_jsonl(
        second, [dict(m, convId="conv-2") for m in WEBUI_MESSAGES[:3]])
    status, body = imported(client, data)
    assert status == 200 and (body["conversations"], body["messages"]) == (2, 8), body
    titles = {c["title"]: c["pinned"] for c in client.get("/api/conversations")[2][
        "conversations"]}
    assert titles == {"Webui chat": True, "Second": False}


@pytest.mark.parametrize("lines,words", [
    ([{"message": WEBUI_MESSAGES[1], "type": "message"}], "before any session line"),
    ([{"harness": "llama.engine", "type": "session", **WEBUI_CONV},
      {"type": "message", "message": "m1"}], "with no message object"),
])
def test_llamacpp_webui_lines_out_of_place_are_refused(client, lines, words):
    status, body = imported(client, jsonl(lines))
    assert status == 400 and words in body["error"], body
    assert "item 1" in body["error"] or "item 2" in body["error"]
    assert rows(client, "SELECT count(*) FROM conversations") == [(0,)]


def test_llamacpp_webui_zip_and_older_json_import(client):
    import zipfile
    old = {"conv": {"id": "conv-2", "name": "Old style", "currNode": "b",
                    "lastModified": 1700000000000},
           "messages": [{"id": "s", "type": "text", "role": "system", "content": "You are terse.",
                         "parent": None, "children": ["a"], "timestamp": 1700000000000},
                        {"id": "a", "type": "text", "role": "user", "content": "Hi", "parent": "s",
                         "children": ["b"], "timestamp": 1700000000000, "thinking": "",
                         "extra": [{"type": "textFile", "name": "a.txt", "content": "A"},
                                   {"type": "imageFile", "name": "b.png",
                                    "base64Url": "data:image/png;base64,AA"},
                                   {"type": "context", "name": "pasted", "content": "C"},
                                   {"type": "pdfFile", "name": "d.pdf", "content": "D",
                                    "base64Data": "JVBERi0="},
                                   {"type": "VIDEO", "name": "e.mp4", "base64Data": "AA",
                                    "mimeType": "video/mp4"}]},
                        {"id": "b", "type": "text", "role": "assistant", "content": "Hello!",
                         "parent": "a", "children": [], "timestamp": 1700000001000,
                         "thinking": "Greet.", "toolCalls": ""}]}
    assert imported(client, json.dumps([old]).encode())[1]["conversations"] == 1
    found = only_conversation(client, "llama.cpp-webui")
    assert branch(client, found["conversation"]["id"]) == [       # "AA" is no image
        "Hi\n\n[image: b.png]\n\n[video: e.mp4]", "Hello!"]
    assert [(a["name"], a["kind"]) for a in found["messages"][0]["attachments"]] == [
        ("a.txt", "text"), ("pasted", "text"), ("d.pdf", "text")]   # a PDF: its text
    assert found["conversation"]["system_prompt"] == "You are terse."
    assert found["messages"][1]["reasoning"] == "Greet."
    # downloadConversationsArchive: a .jsonl a conversation, zipped
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("2025-01-01T00_00_00_conv_conv-1_webui_chat.jsonl",
                   webui_jsonl(WEBUI_CONV, WEBUI_MESSAGES))
        z.writestr("2025-01-01T00_00_00_conv_conv-3_third.jsonl", webui_jsonl(
            {**WEBUI_CONV, "id": "conv-3", "name": "Third"},
            [dict(m, convId="conv-3") for m in WEBUI_MESSAGES]))
    status, body = imported(client, buffer.getvalue())
    assert status == 200 and (body["conversations"], body["messages"]) == (2, 12), body


OPEN_WEBUI = [{
    "id": "owui-1", "title": "Rust help", "created_at": 1730000000, "updated_at": 1730000100,
    "pinned": True,
    "chat": {"title": "Rust help", "models": ["llama3:8b"], "params": {"system": "You code."},
             "history": {"currentId": "c", "messages": {
                 "q": {"id": "q", "parentId": None, "childrenIds": ["a", "c"], "role": "user",
                       "content": "Borrow checker?", "timestamp": 1730000000,
                       "files": [{"type": "file", "name": "main.rs"}]},
                 "a": {"id": "a", "parentId": "q", "childrenIds": [], "role": "assistant",
                       "content": "It checks borrows.", "model": "llama3:8b",
                       "timestamp": 1730000010},
                 "c": {"id": "c", "parentId": "q", "childrenIds": [], "role": "assistant",
                       "content": "```rust\nfn main() {}\n```", "model": "llama3:8b",
                       "timestamp": 1730000020}}},
             "messages": []}}]


def test_open_webui_export_imports_with_its_branches_and_system_prompt(client):
    status, body = imported(client, json.dumps(OPEN_WEBUI).encode())
    assert status == 200 and body["format"] == "open-webui", body
    found = only_conversation(client, "open-webui")
    c, messages = found["conversation"], found["messages"]
    assert (c["system_prompt"], c["model"], c["pinned"]) == ("You code.", "llama3:8b", True)
    assert c["created_at"] == "2024-10-27T03:33:20.000Z"
    assert [m["parent_id"] for m in messages] == [None, messages[0]["id"], messages[0]["id"]]
    assert branch(client, c["id"]) == ["Borrow checker?\n\n[file: main.rs]",
                                       "```rust\nfn main() {}\n```"]


CHATGPT = [{
    "title": "Plot a sine", "create_time": 1720000000.5, "update_time": 1720000100.25,
    "conversation_id": "gpt-1", "current_node": "n6",
    "mapping": {
        "root": {"id": "root", "message": None, "parent": None, "children": ["sys"]},
        "sys": {"id": "sys", "parent": "root", "children": ["n1"], "message": {
            "author": {"role": "system"}, "content": {"content_type": "text", "parts": [""]},
            "metadata": {"is_visually_hidden_from_conversation": True}}},
        "n1": {"id": "n1", "parent": "sys", "children": ["n2", "n5"], "message": {
            "author": {"role": "user"}, "create_time": 1720000001.0,
            "content": {"content_type": "multimodal_text", "parts": [
                {"content_type": "image_asset_pointer", "asset_pointer": "file-service://x"},
                "Plot sin(x) like this"]}}},
        "n2": {"id": "n2", "parent": "n1", "children": ["n3"], "message": {
            "author": {"role": "assistant"}, "create_time": 1720000002.0,
            "content": {"content_type": "thoughts",
                        "thoughts": [{"summary": "Plan", "content": "Use matplotlib."}]}}},
        "n3": {"id": "n3", "parent": "n2", "children": ["n4"], "message": {
            "author": {"role": "assistant"}, "create_time": 1720000003.0,
            "metadata": {"model_slug": "gpt-4o"},
            "content": {"content_type": "code", "language": "python",
                        "text": "plt.plot(x, np.sin(x))"}}},
        "n4": {"id": "n4", "parent": "n3", "children": [], "message": {
            "author": {"role": "tool"}, "create_time": 1720000004.0,
            "content": {"content_type": "execution_output", "text": "<Figure>"}}},
        "n5": {"id": "n5", "parent": "n1", "children": ["n6"], "message": {
            "author": {"role": "assistant"}, "create_time": 1720000005.0,
            "metadata": {"model_slug": "gpt-4o"},
            "content": {"content_type": "text", "parts": ["Here is a plot."]}}},
        "n6": {"id": "n6", "parent": "n5", "children": [], "message": {
            "author": {"role": "user"}, "create_time": 1720000006.0,
            "content": {"content_type": "text", "parts": ["Thanks"]}}}}}]


def test_chatgpt_conversations_json_imports_with_thoughts_code_and_branches(client):
    status, body = imported(client, json.dumps(CHATGPT).encode())
    assert status == 200 and body["format"] == "chatgpt", body
    found = only_conversation(client, "chatgpt")
    c, messages = found["conversation"], found["messages"]
    assert (c["title"], c["source_id"]) == ("Plot a sine", "gpt-1")
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "[image_asset_pointer]\nPlot sin(x) like this"),
        ("assistant", "```python\nplt.plot(x, np.sin(x))\n```"),
        ("tool", "```\n<Figure>\n```"), ("assistant", "Here is a plot."), ("user", "Thanks")]
    assert messages[1]["reasoning"] == "Use matplotlib." and messages[1]["model"] == "gpt-4o"
    assert messages[1]["parent_id"] == messages[3]["parent_id"] == messages[0]["id"]
    assert messages[0]["parent_id"] is None and c["system_prompt"] is None
    assert branch(client, c["id"]) == ["[image_asset_pointer]\nPlot sin(x) like this",
                                       "Here is a plot.", "Thanks"]
    assert messages[0]["timestamp"] == "2024-07-03T09:46:41.000Z"


# ChatGPT's hidden nodes as its export writes them: the custom instructions
# (user_editable_context), memory (model_editable_context), a browsing
# tool's result (tether_browsing_display) and quote, and empty messages.
CHATGPT_HIDDEN = {
    "title": "Weather in Oslo", "create_time": 1730000000.0, "update_time": 1730000100.0,
    "id": "gpt-2", "current_node": "a2",
    "mapping": {
        "client-root": {"id": "client-root", "message": None, "parent": None,
                        "children": ["sys"]},
        "sys": {"id": "sys", "parent": "client-root", "children": ["ctx"], "message": {
            "id": "sys", "author": {"role": "system", "name": None, "metadata": {}},
            "content": {"content_type": "text", "parts": [""]}, "status": "finished_successfully",
            "metadata": {"is_visually_hidden_from_conversation": True}}},
        "ctx": {"id": "ctx", "parent": "sys", "children": ["mem"], "message": {
            "id": "ctx", "author": {"role": "user", "name": None, "metadata": {}},
            "content": {"content_type": "user_editable_context",
                        "user_profile": "The user provided the following information about "
                                        "themselves.\n```Name: Ada```",
                        "user_instructions": "The user provided the additional info about how "
                                             "they would like you to respond:\n```Be brief.```"},
            "metadata": {"is_visually_hidden_from_conversation": True}}},
        "mem": {"id": "mem", "parent": "ctx", "children": ["q1"], "message": {
            "id": "mem", "author": {"role": "assistant"},
            "content": {"content_type": "model_editable_context",
                        "model_set_context": "1. Ada likes skiing.", "repository": None,
                        "repo_summary": None}}},
        "q1": {"id": "q1", "parent": "mem", "children": ["call"], "message": {
            "id": "q1", "author": {"role": "user"}, "create_time": 1730000001.0,
            "content": {"content_type": "text", "parts": ["Weather in Oslo?"]}}},
        "call": {"id": "call", "parent": "q1", "children": ["res"], "message": {
            "id": "call", "author": {"role": "assistant"}, "create_time": 1730000002.0,
            "recipient": "browser", "content": {"content_type": "code", "language": "unknown",
                                                "text": "search(\"Oslo weather\")"}}},
        "res": {"id": "res", "parent": "call", "children": ["quote"], "message": {
            "id": "res", "author": {"role": "tool", "name": "browser"},
            "create_time": 1730000003.0,
            "content": {"content_type": "tether_browsing_display",
                        "result": "# 【0†Oslo forecast†yr.no】\n-3 C and snow",
                        "summary": None, "assets": None, "tether_id": None}}},
        "quote": {"id": "quote", "parent": "res", "children": ["empty"], "message": {
            "id": "quote", "author": {"role": "tool", "name": "browser"},
            "content": {"content_type": "tether_quote", "url": "https://yr.no/oslo",
                        "domain": "yr.no", "text": "Snow all week.", "title": "Oslo"}}},
        "empty": {"id": "empty", "parent": "quote", "children": ["a2"], "message": {
            "id": "empty", "author": {"role": "assistant"},
            "content": {"content_type": "text", "parts": [""]}}},
        "a2": {"id": "a2", "parent": "empty", "children": [], "message": {
            "id": "a2", "author": {"role": "assistant"}, "create_time": 1730000005.0,
            "metadata": {"model_slug": "gpt-4o"},
            "content": {"content_type": "text", "parts": ["Cold: -3 C with snow."]}}}}}


def test_chatgpt_instructions_become_the_system_prompt_and_tools_keep_their_text(client):
    status, body = imported(client, json.dumps([CHATGPT_HIDDEN]).encode())
    assert status == 200 and body["messages"] == 5, body
    found = only_conversation(client, "chatgpt")
    c, messages = found["conversation"], found["messages"]
    assert c["system_prompt"] == CHATGPT_HIDDEN["mapping"]["ctx"]["message"]["content"][
        "user_profile"] + "\n\n" + CHATGPT_HIDDEN["mapping"]["ctx"]["message"]["content"][
        "user_instructions"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "Weather in Oslo?"),
        ("assistant", "```unknown\nsearch(\"Oslo weather\")\n```"),
        ("tool", "# 【0†Oslo forecast†yr.no】\n-3 C and snow"),
        ("tool", "Oslo\nhttps://yr.no/oslo\nSnow all week."),
        ("assistant", "Cold: -3 C with snow.")]
    assert "skiing" not in json.dumps(found)
    assert [m["parent_id"] for m in messages] == [None] + [m["id"] for m in messages[:-1]]


# Open WebUI's reply to a thinking model: its reasoning in the text, as the
# middleware writes it (quoted lines, HTML-escaped) before the answer.
OPEN_WEBUI_THINKING = [{
    "id": "owui-2", "title": "Primes", "created_at": 1730000000, "updated_at": 1730000100,
    "chat": {"models": ["qwen3:4b"], "history": {"currentId": "a", "messages": {
        "q": {"id": "q", "parentId": None, "childrenIds": ["a"], "role": "user",
              "content": "Is 91 prime? <details>not reasoning</details>",
              "timestamp": 1730000000},
        "a": {"id": "a", "parentId": "q", "childrenIds": [], "role": "assistant",
              "model": "qwen3:4b", "timestamp": 1730000010,
              "content": '<details type="reasoning" done="true" duration="3">\n'
                         '<summary>Thought for 3 seconds</summary>\n'
                         '&gt; 91 = 7 &times; 13.\n&gt; \n&gt; So &quot;no&quot;.\n'
                         '</details>\n'
                         'No: 91 = 7 × 13. <details type="tool_calls" done="true">'
                         '<summary>Tool</summary></details>'}}}}}]


def test_open_webui_reasoning_is_split_from_the_reply(client):
    status, body = imported(client, json.dumps(OPEN_WEBUI_THINKING).encode())
    assert status == 200, body
    question, reply = only_conversation(client, "open-webui")["messages"]
    assert reply["reasoning"] == '91 = 7 × 13.\n\nSo "no".'
    assert reply["content"] == ('No: 91 = 7 × 13. <details type="tool_calls" done="true">'
                                '<summary>Tool</summary></details>')
    assert question["content"] == "Is 91 prime? <details>not reasoning</details>"
    assert question["reasoning"] is None


def test_a_chatgpt_zip_is_read_and_writes_nothing_outside(client, tmp_path):
    import zipfile
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("../escape.txt", "outside")
        z.writestr("/abs/evil.json", "[]")
        z.writestr("chat.html", "<html></html>")
        z.writestr("conversations.json", json.dumps(CHATGPT))
    before = set(os.listdir(tmp_path)) | set(os.listdir(tmp_path.parent))
    status, body = imported(client, buffer.getvalue())
    assert status == 200 and (body["conversations"], body["format"]) == (1, "chatgpt")
    assert set(os.listdir(tmp_path)) | set(os.listdir(tmp_path.parent)) <= before | {
        "chat.db-wal", "chat.db-shm"}
    assert not (tmp_path.parent / "escape.txt").exists()


def attachments_held(client, cid):
    """Each message's attachments of a conversation, with their bytes."""
    raw = http.client.HTTPConnection("127.0.0.1", client.port)
    held = []
    for m in conversation(client, cid, everything=True)["messages"]:
        for a in m["attachments"]:
            raw.request("GET", f"/api/attachments/{a['id']}")
            held.append((m["content"], a["name"], a["kind"], raw.getresponse().read()))
    return held


@pytest.mark.parametrize("route", ["/api/export?format=json", "/api/export?format=jsonl",
                                   "one"])
def test_an_export_carries_attachments_and_an_import_brings_them_back(client, stub, launch,
                                                                      route, tmp_path):
    notes = upload(client, "Κρήτη: 3 days\n".encode(), "plan.md")[2]["attachment"]
    picture = upload(client, PNG, "beach.png")[2]["attachment"]
    sound = upload(client, WAV, "waves.wav")[2]["attachment"]
    cid = client.new_conversation("Holiday")
    client.post("/api/chat", {"conversation_id": cid, "model": MODEL, "message": "Plan it",
                              "attachments": [notes["id"], picture["id"]]})
    client.post("/api/chat", {"conversation_id": cid, "model": MODEL, "message": "",
                              "attachments": [sound["id"], picture["id"]]})
    client.new_conversation("Nothing attached") and client.chat(
        client.get("/api/conversations")[2]["conversations"][0]["id"], "plain")
    want = attachments_held(client, cid)
    assert [w[1] for w in want] == ["plan.md", "beach.png", "waves.wav", "beach.png"]
    status, headers, raw = client.request("GET", route if route != "one" else
                                          f"/api/conversations/{cid}/export")
    assert status == 200
    raw = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    item = json.loads(raw.splitlines()[0]) if "jsonl" in route else json.loads(raw)
    item = item["conversations"][0] if "conversations" in item else item
    assert set(item["attachments"]) == {notes["id"], picture["id"], sound["id"]}  # each once
    assert base64.b64decode(item["attachments"][picture["id"]]["data"]) == PNG
    assert item["messages"][0]["attachments"][1] == picture
    there = Client(launch(stub.url, db=str(tmp_path / "elsewhere.db")))
    status, body = imported(there, raw)
    assert status == 200 and body["attachments"] == 4, body
    mine = [c["id"] for c in there.get("/api/conversations")[2]["conversations"]
            if c["title"] == "Holiday"]
    assert attachments_held(there, mine[0]) == want
    assert rows(there, "SELECT count(*) FROM attachments") == [(3,)]
    assert imported(there, raw)[1]["skipped"] >= 1                 # nothing twice
    assert rows(there, "SELECT count(*) FROM attachments") == [(3,)]


def test_the_markdown_export_shows_images_inline_and_text_files_fenced(client, stub):
    notes = upload(client, "a ``` fence\nline 2\n".encode(), "notes [draft].md")[2]["attachment"]
    picture = upload(client, PNG, "cat.png")[2]["attachment"]
    sound = upload(client, WAV, "purr.wav")[2]["attachment"]
    cid = client.new_conversation("Cat")
    client.post("/api/chat", {"conversation_id": cid, "model": MODEL, "message": "Whose?",
                              "attachments": [picture["id"], notes["id"], sound["id"]]})
    text = client.request("GET", f"/api/conversations/{cid}/export?format=md")[2].decode()
    assert "![cat.png](data:image/png;base64," + base64.b64encode(PNG).decode() + ")" in text
    assert "**notes draft.md**\n\n````\na ``` fence\nline 2\n````" in text
    assert f"_Audio: purr.wav ({len(WAV)} bytes)_" in text
    assert text.index("![cat.png]") < text.index("Whose?")


def test_the_html_export_is_one_inert_page_with_its_images_inline(client, stub):
    picture = upload(client, PNG, 'cat"><script>x()</script>.png')[2]["attachment"]
    cid = client.new_conversation('<img src=x onerror="alert(1)"> & more')
    stub.reasoning = "Thinking <b>hard</b>."
    stub.reply = ("# Answer\n\nA **cat**, see [docs](https://example.org/a?b=1&c=2) and "
                  "[bad](javascript:alert(1)).\n\n```python\ndef purr():\n    return 'mrr'  # soft\n"
                  "```\n\n- one\n- <script>alert(2)</script>")
    client.post("/api/chat", {"conversation_id": cid, "model": MODEL,
                              "message": "<svg onload=alert(3)> what is this?",
                              "attachments": [picture["id"]]})
    status, headers, page = client.request("GET", f"/api/conversations/{cid}/export?format=html")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "sandbox" in headers["Content-Security-Policy"]
    assert headers["Content-Disposition"].startswith("attachment;")
    text = page.decode()
    import html.parser
    tags = []
    parser = html.parser.HTMLParser()
    parser.handle_starttag = lambda tag, attrs: tags.append((tag, dict(attrs)))
    parser.feed(text)
    assert {t for t, _ in tags} <= {"html", "head", "meta", "title", "style", "body", "h1", "h2",
                                   "div", "details", "summary", "p", "img", "pre", "code",
                                   "span", "strong", "em", "a", "ul", "li", "br"}   # no script
    assert not [a for _, attrs in tags for a in attrs if a.startswith("on")]          # no handler
    assert [attrs["href"] for t, attrs in tags if "href" in attrs] == [
        "https://example.org/a?b=1&c=2"]                         # only the http(s) link
    assert all(attrs["src"].startswith("data:") for _, attrs in tags if "src" in attrs)
    assert 'src="data:image/png;base64,' + base64.b64encode(PNG).decode() + '"' in text
    assert "<details><summary>Reasoning</summary>" in text and "Thinking &lt;b&gt;hard" in text
    assert '<span class="kw">def</span> purr' in text and '<span class="str">' in text
    assert '<a href="https://example.org/a?b=1&amp;c=2" rel="noreferrer">docs</a>' in text
    assert "&lt;svg onload=alert(3)&gt; what is this?" in text
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt; &amp; more" in text   # the title
    assert '<meta http-equiv="Content-Security-Policy" content="default-src \'none\';' in text


def test_a_damaged_attachment_in_an_export_is_left_out_not_the_conversation(client):
    item = {"conversation": {"id": 1, "title": "Damaged", "uuid": str(uuid.uuid4())},
            "messages": [{"id": 1, "role": "user", "content": "see", "attachments": [
                {"id": "a", "name": "x.png"}, {"id": "b", "name": "y.svg"},
                {"id": "c", "name": "z.png"}, {"id": "d"}]}],
            "attachments": {"a": {"data": base64.b64encode(PNG).decode()},
                            "b": {"data": base64.b64encode(b"<svg onload=alert(1)>").decode()},
                            "c": {"data": "not base64!"}}}
    status, body = imported(client, json.dumps(item).encode())
    assert status == 200 and (body["conversations"], body["attachments"]) == (1, 1), body
    kept = only_conversation(client, "llama-chat")["messages"][0]["attachments"]
    assert [(a["name"], a["kind"]) for a in kept] == [("x.png", "image")]


def test_open_webui_images_and_chatgpt_zip_images_become_attachments(client):
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    chat = json.loads(json.dumps(OPEN_WEBUI))
    chat[0]["chat"]["history"]["messages"]["q"]["files"] = [
        {"type": "image", "url": data_url}, {"type": "file", "name": "main.rs"},
        {"type": "image", "url": "/api/v1/files/abc/content", "name": "remote.png"}]
    status, body = imported(client, json.dumps(chat).encode())
    assert status == 200 and body["attachments"] == 1, body
    question = only_conversation(client, "open-webui")["messages"][0]
    assert question["content"] == "Borrow checker?\n\n[file: main.rs]\n\n[file: remote.png]"
    assert [(a["kind"], a["bytes"]) for a in question["attachments"]] == [("image", len(PNG))]
    # ChatGPT: an image part points at a file the ZIP holds, named by its id
    gpt = json.loads(json.dumps(CHATGPT[0]))
    gpt.update(conversation_id="gpt-images", title="With a photo")
    node = next(n for n in gpt["mapping"].values() if n.get("message") and
                n["message"]["author"]["role"] == "user")
    node["message"]["content"] = {"content_type": "multimodal_text", "parts": [
        {"content_type": "image_asset_pointer", "asset_pointer": "file-service://file-Ab12",
         "size_bytes": len(PNG)},
        {"content_type": "image_asset_pointer", "asset_pointer": "sediment://file_00ff"},
        {"content_type": "image_asset_pointer", "asset_pointer": "file-service://file-Gone"},
        "What is in this photo?"]}
    status, body = imported(client, zip_of({
        "conversations.json": json.dumps([gpt]), "file-Ab12-IMG_0001.png": PNG,
        "dalle-generations/file_00ff-7d2c.webp": b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(20)}))
    assert status == 200 and body["attachments"] == 2, body
    asked = only_conversation(client, "chatgpt")["messages"][0]
    assert asked["content"] == "[image_asset_pointer]\nWhat is in this photo?"   # not found
    assert [(a["name"], a["type"]) for a in asked["attachments"]] == [
        ("IMG_0001.png", "image/png"), ("7d2c.webp", "image/webp")]


def exported_conversation(client, stub):
    """llama-chat's export of one conversation: a question and its reply."""
    cid = client.new_conversation("Typed")
    client.chat(cid, "What types are there?")
    return client.get(f"/api/conversations/{cid}/export")[2]


def history_is_sound(client):
    """Health ok, every conversation readable, Export all whole."""
    assert client.get("/api/health")[2]["database"]["ok"] is True
    listed = client.get("/api/conversations")[2]["conversations"]
    for c in listed:
        assert client.get(f"/api/conversations/{c['id']}")[0] == 200
    status, _, raw = client.request("GET", "/api/export?format=jsonl")
    assert status == 200
    assert (len(raw.splitlines()) if isinstance(raw, bytes) else 1) == len(listed)
    return listed


# A field of every kind given a value of the wrong type or range: each is
# stored as the API would have it (cut, or left out), and counted.
WRONG_TYPES = {
    "conversation": {"title": 123, "model": {"name": "x"}, "system_prompt": ["Be"],
                     "options": {"temperature": "hot"}, "created_at": [1],
                     "updated_at": "yesterday", "client": 5, "uuid": "not-a-uuid",
                     "pinned": "yes"},
    "question": {"content": 5, "model": {"a": 1}, "timestamp": {"a": 1}, "edited_at": 3,
                 "options": "x", "tool_calls": "", "tool_call_id": ["c"]},
    "reply": {"finish_reason": {"a": 1}, "estimated_tokens": 10**30, "prompt_tokens": -1,
              "tokens_per_second": "fast", "response_time_ms": 1.5, "reasoning": [1],
              "tool_calls": "not json", "prompt_n": True, "prompt_ms": float("inf"),
              "cache_n": "3", "predicted_n": 2.0, "predicted_ms": -4, "ttft_ms": [],
              "model": "m" * 501},
}


def test_fields_of_the_wrong_type_are_coerced_counted_and_leave_the_history_sound(client,
                                                                                  stub):
    item = exported_conversation(client, stub)
    client.delete(f"/api/conversations/{item['conversation']['id']}")
    item["conversation"].update(WRONG_TYPES["conversation"])
    item["messages"][0].update(WRONG_TYPES["question"])
    item["messages"][1].update(WRONG_TYPES["reply"])
    data = json.dumps(item).replace("Infinity", "1e999").encode()
    status, body = imported(client, data)
    assert status == 200 and body["conversations"] == 1, body
    expected = sum(len(v) for v in WRONG_TYPES.values()) - 3   # pinned, "" for no calls, 2.0
    assert body["coerced"] == expected, body
    assert len(body["coercions"]) == 5 and "conversation 1" in body["coercions"][0]
    c = history_is_sound(client)[0]
    found = conversation(client, c["id"], everything=True)
    conv, (question, reply) = found["conversation"], found["messages"]
    assert (conv["title"], conv["model"], conv["system_prompt"], conv["options"],
            conv["pinned"]) == ("New chat", "", None, None, False)
    assert conv["created_at"] == conv["updated_at"] and conv["created_at"][:2] == "20"
    assert question["content"] == "" and question["timestamp"] == conv["created_at"]
    assert (reply["finish_reason"], reply["estimated_tokens"], reply["prompt_tokens"],
            reply["tokens_per_second"], reply["reasoning"], reply["tool_calls"],
            reply["model"]) == ("stop", None, None, None, None, None, None)
    assert rows(client, "SELECT prompt_n, prompt_ms, cache_n, predicted_n, predicted_ms, ttft_ms, "
                "response_time_ms FROM messages WHERE role = 'assistant'") == [
        (None, None, None, 2, None, None, None)]
    assert len(rows(client, "SELECT uuid FROM conversations")[0][0]) == 36
    assert client.chat(c["id"], "And now?")[0] == 200


def json_paths(value, prefix=()):
    """Every place in a JSON value, as the keys and indexes that lead to it."""
    if prefix:
        yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) \
        if isinstance(value, list) else ()
    for key, inner in items:
        yield from json_paths(inner, prefix + (key,))


JUNK = [None, True, 0, -1, 1.5, 10**30, "", "x", "2024-01-01", [], [1], {}, {"a": 1}, "\ud800",
        "[]", "{"]


def test_exports_with_values_changed_at_random_are_refused_or_imported_readable(tmp_path):
    store = llama_chat.Store(str(tmp_path / "chat.db"))
    cid = store.create_conversation("t", "m")
    store.add_message(cid, "user", "q")
    store.add_message(cid, "assistant", "a", "m")
    samples = {"llama.cpp JSONL": [json.loads(line) for line in webui_jsonl(
        WEBUI_CONV, WEBUI_MESSAGES).splitlines()],
        "llama.cpp JSON": [{"conv": WEBUI_CONV, "messages": WEBUI_MESSAGES}],
        "chatgpt": CHATGPT + [CHATGPT_HIDDEN], "open-webui": OPEN_WEBUI + OPEN_WEBUI_THINKING,
        "llama-chat": [json.loads(llama_chat.export_one(store.db, cid))]}
    chance = random.Random(23)
    for _ in range(150):
        name = chance.choice(sorted(samples))
        data = json.loads(json.dumps(samples[name]))
        for _ in range(chance.randint(1, 4)):
            *above, key = chance.choice(list(json_paths(data)))
            holder = data
            for step in above:
                holder = holder[step]
            holder[key] = json.loads(json.dumps(chance.choice(JUNK)))
        raw = "\n".join(json.dumps(x) for x in data) if name == "llama.cpp JSONL" else \
            json.dumps(data)
        try:
            llama_chat.import_file(store, io.BytesIO(raw.encode("utf-8", "surrogatepass")))
        except llama_chat.ApiError as e:
            assert e.status == 400, (name, data, e.message)
        assert b"".join(llama_chat.export_all(store.db, "jsonl")).count(b"\n") == \
            len(json.loads(store.list_conversations()))
        for c in json.loads(store.list_conversations()):
            json.loads(store.messages(c["id"], everything=True)[0])
    store.index.check()
    assert store.db.conn().execute("PRAGMA integrity_check").fetchone() == ("ok",)
    store.close()


def test_text_longer_than_the_api_takes_is_cut_and_counted(client, stub):
    item = exported_conversation(client, stub)
    client.delete(f"/api/conversations/{item['conversation']['id']}")
    item["conversation"]["title"] = "T" * 600
    item["messages"][1]["content"] = "é" * 200_001
    item["messages"][0]["content"] = "q" * 200_000
    status, body = imported(client, json.dumps(item).encode())
    assert status == 200 and body["coerced"] == 2, body
    assert rows(client, "SELECT length(content) FROM messages ORDER BY id") == [
        (200_000,), (200_000,)]
    assert rows(client, "SELECT length(title) FROM conversations") == [(500,)]


@pytest.mark.parametrize("calls", ["", "[]", "not json", "{\"a\": 1}", "[1]"])
def test_older_webui_tool_calls_of_any_text_leave_the_history_sound(client, calls):
    messages = [dict(m, toolCalls=calls) for m in WEBUI_MESSAGES]
    status, body = imported(client, json.dumps({"conv": WEBUI_CONV,
                                                "messages": messages}).encode())
    assert status == 200 and body["coerced"] == (6 if calls in ("not json", "{\"a\": 1}", "[1]")
                                                 else 0), body
    history_is_sound(client)
    assert rows(client, "SELECT count(*) FROM messages WHERE tool_calls IS NOT NULL") == [(0,)]


def test_a_conversation_with_no_message_is_not_imported(client):
    shell = {"conv": {"id": "empty-1", "name": "Nothing", "currNode": "",
                      "lastModified": 1735689600000},
             "messages": [WEBUI_MESSAGES[0]]}
    status, body = imported(client, json.dumps([shell]).encode())
    assert status == 200 and (body["conversations"], body["empty"]) == (0, 1), body
    assert rows(client, "SELECT count(*) FROM conversations") == [(0,)]
    shell["messages"] = WEBUI_MESSAGES[:3]                  # the same one, whole now
    assert imported(client, json.dumps([shell]).encode())[1]["conversations"] == 1


def test_an_empty_array_is_an_empty_import(client):
    for data in (b"[]", b" [ ]\n", b'{"format": "llama-chat", "version": 1, "conversations": []}'):
        status, body = imported(client, data)
        assert status == 200 and body["conversations"] == 0 and body["format"] == "none", body


@pytest.mark.parametrize("data,where", [
    (b'[{"mapping": {}},\n {"mapping": ', "line 2, column 14"),
    (b'{"type": "session", "id": "a"}\n{"type": "message", "message": {"id": 1}}\n{"x": tru}',
     "line 3, column 7"),
    (("[\n\n" + " " * (2 << 20) + "{\"a\": ]").encode(), "line 3, column 2,097,159"),
])
def test_json_errors_say_where_in_the_file_they_are(client, data, where):
    status, body = imported(client, data)
    assert status == 400 and where in body["error"], body


def test_a_long_value_is_read_in_time_in_proportion_to_its_length(monkeypatch):
    tried = []
    decode = json.JSONDecoder.raw_decode

    def counted(self, s, idx=0):
        tried.append(len(s) - idx)
        return decode(self, s, idx)
    monkeypatch.setattr(json.JSONDecoder, "raw_decode", counted)
    value = "x" * (40 << 20)
    reader = llama_chat.JsonPieces(io.BytesIO(json.dumps([value, 1]).encode()))
    assert list(reader.elements()) == [value, 1]
    assert sum(tried) < 3 * len(value), len(tried)       # not 40 scans of the growing text


def test_an_item_longer_than_the_limit_is_refused(client, monkeypatch):
    monkeypatch.setattr(llama_chat, "MAX_ITEM_CHARS", 3 << 20)
    status, body = imported(client, json.dumps([{"conv": {}, "messages": ["x" * (8 << 20)]}])
                            .encode())
    assert status == 400 and "longer than 3,145,728 characters" in body["error"], body


def zip_of(files, compression=None):
    import zipfile
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression or zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buffer.getvalue()


def test_a_zip_that_inflates_past_the_limit_is_refused_at_once(tmp_path, stub, launch):
    server = launch(stub.url, max_import_bytes=4 << 20)
    c = Client(server)
    chat = json.dumps({"conv": {"id": "z"}, "messages": [{"id": "a", "role": "user",
                                                          "content": "x" * (3 << 20)}]})
    for files in ({"a.json": chat, "b.json": chat},            # by what the ZIP says
                  {"a.json": chat + " " * (2 << 20)}):           # and by what it holds
        data = zip_of(files)
        assert len(data) < 100_000
        status, body = imported(c, data)
        assert status == 400 and "more than" in body["error"] and "4,194,304" in body["error"], \
            body
    assert rows(c, "SELECT count(*) FROM conversations") == [(0,)]


def test_a_zip_that_lies_about_its_size_is_read_no_further(client, monkeypatch):
    import zipfile
    data = zip_of({"a.json": json.dumps(OPEN_WEBUI) + " " * (8 << 20)})
    real = zipfile.ZipFile.infolist

    def lying(self):
        found = real(self)
        for info in found:
            info.file_size = 10
        return found
    monkeypatch.setattr(zipfile.ZipFile, "infolist", lying)
    status, body = imported(client, data)
    assert status == 400 and "a.json in the ZIP: Bad CRC-32" in body["error"], body
    assert rows(client, "SELECT count(*) FROM conversations") == [(0,)]


@pytest.mark.parametrize("data,words", [
    (b"", "holds no conversation"),
    (b"not json at all", "holds no JSON"),
    (b'{"hello": "world"}', "expected llama-chat"),
    (b"[1, 2, 3]", "not an object"),
    (b"PK\x03\x04garbage", "ZIP file cannot be read"),
    (json.dumps(CHATGPT + OPEN_WEBUI).encode()[:-40], "ends early"),
])
def test_a_file_that_is_no_known_export_or_is_cut_stores_nothing(client, data, words):
    status, body = imported(client, data)
    assert status == 400 and body["code"] == "VALIDATION_ERROR", body
    assert words in body["error"]
    assert rows(client, "SELECT count(*) FROM conversations") == [(0,)]


def test_an_import_larger_than_a_request_body_is_taken_up_to_its_own_limit(tmp_path, stub,
                                                                             launch):
    server = launch(stub.url, max_body_bytes=1024, max_import_bytes=4 * 2**20)
    c = Client(server)
    big = json.loads(json.dumps(OPEN_WEBUI))
    big[0]["chat"]["history"]["messages"]["a"]["content"] = "x" * (2 * 2**20)
    status, _, body = c.post("/api/import", raw=json.dumps(big).encode(),
                             headers={"Content-Type": "application/json",
                                      "Expect": "100-continue"})
    assert status == 200 and body["messages"] == 3, body
    for path, length in (("/api/chat", 2000), ("/api/import", 5 * 2**20)):
        line, _, _ = raw_exchange(c.port, b"POST %s HTTP/1.1\r\nHost: localhost\r\n"
                                  b"Content-Type: application/json\r\nContent-Length: %d\r\n"
                                  b"Expect: 100-continue\r\n\r\n" % (path.encode(), length))
        assert line.split()[1] == "413", line


def test_an_import_too_big_for_the_page_points_to_the_command_line(tmp_path, stub, launch):
    c = Client(launch(stub.url, max_import_bytes=1024))
    status, body = imported(c, b"[" + b" " * 2000 + b"]")
    assert status == 413 and "python3 llama_chat.py import FILE" in body["error"], body
    line, _, body = raw_exchange(c.port, b"POST /api/conversations HTTP/1.1\r\nHost: localhost"
                                 b"\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 9999999\r\n\r\n")
    assert "413" in line and "PAYLOAD_TOO_LARGE" in str(body) and "llama_chat.py" not in str(body)


def chats_among_imported(client, cid):
    """How many messages of conversation cid (chats) were written between the
    first and the last message of the others (an import's)."""
    low, high = rows(client, "SELECT min(id), max(id) FROM messages WHERE conversation_id != ?",
                     cid)[0]
    return rows(client, "SELECT count(*) FROM messages WHERE conversation_id = ? AND id "
                "BETWEEN ? AND ?", cid, low, high)[0][0]


@contextlib.contextmanager
def chatting_meanwhile(client, cid, message, pause=0, statuses=None):
    """Another client chats in conversation cid, again and again (`pause`
    seconds apart), meanwhile; each answer's status goes into `statuses`."""
    stop = threading.Event()
    statuses = [] if statuses is None else statuses

    def chatting():
        while not stop.is_set():
            answer = client.chat(cid, message)
            statuses.append(answer[0])
            if answer[0] != 200:
                print("CHAT FAILED", answer[2])
            stop.wait(pause)
    writer = threading.Thread(target=chatting)
    writer.start()
    try:
        yield
    finally:
        stop.set()
        writer.join(10)


def test_a_file_that_fails_part_way_leaves_nothing_of_what_was_written(client, monkeypatch):
    monkeypatch.setattr(llama_chat, "IMPORT_READ", (3, 1 << 20))    # written 2 at a time
    wrote = []
    write = llama_chat.ImportWriter.write

    def counted(self, conversations):
        wrote.append(len(conversations))
        return write(self, conversations)
    monkeypatch.setattr(llama_chat.ImportWriter, "write", counted)
    good = [dict(CHATGPT[0], conversation_id=f"gpt-{i}", title=f"zygomatic {i}")
            for i in range(6)]
    data = json.dumps(good)[:-1] + ', {"neither": "format"}]'
    status, body = imported(client, data.encode())
    assert status == 400 and "item 7" in body["error"], body
    assert sum(wrote) == 6                       # written before the bad item was read
    assert rows(client, "SELECT count(*) FROM conversations") == [(0,)]
    assert rows(client, "SELECT count(*) FROM messages") == [(0,)]
    assert rows(client, "SELECT count(*) FROM import_pending") == [(0,)]
    assert client.get("/api/search?q=zygomatic")[2]["count"] == 0
    assert client.get("/api/ledger?group=model")[2]["groups"] == []
    assert imported(client, json.dumps(good).encode())[1]["conversations"] == 6


def test_a_command_line_import_lets_a_running_server_chat_between_its_transactions(
        client, stub, tmp_path):
    path = tmp_path / "conversations.json"
    chatgpt_file(path, 300)
    cid = client.new_conversation()
    statuses = []
    with chatting_meanwhile(client, cid, "still here?", 0.02, statuses):
        cli("import", str(path), db=client.engine.settings.db, check=0)
    assert set(statuses) == {200}
    between = chats_among_imported(client, cid)
    assert between >= 10, between            # chats written all along, not in a few gaps


def test_an_import_killed_part_way_is_removed_at_the_next_start(tmp_path):
    path = tmp_path / "conversations.json"
    chatgpt_file(path, 3000)
    db = tmp_path / "chat.db"
    server = llama_chat.Store(str(db))     # as a server would: the import gives way to it
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "llama_chat.py"), "--db",
                             str(db), "import", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)

    def written():
        try:
            with contextlib.closing(sqlite3.connect(db)) as c:
                return c.execute("SELECT count(*) FROM import_pending").fetchone()[0] > 0
        except sqlite3.Error:
            return False
    try:
        wait_for(written, 30, "a first transaction of the import")
    finally:
        proc.kill()
        proc.wait(10)
    with contextlib.closing(sqlite3.connect(db)) as c:
        assert c.execute("SELECT count(*) FROM conversations").fetchone()[0] > 0
    server.close()
    store = llama_chat.Store(str(db))
    c = store.db.conn()
    assert c.execute("SELECT count(*) FROM conversations").fetchone()[0] == 0
    assert c.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    assert store.search("Conversation", 5) == []
    store.close()


def test_a_command_line_import_alone_is_one_transaction(tmp_path, monkeypatch):
    store = llama_chat.Store(str(tmp_path / "chat.db"))
    begun = []
    write = llama_chat.Database.write
    monkeypatch.setattr(llama_chat.Database, "write",
                        lambda self, *a, **k: begun.append(1) or write(self, *a, **k))
    monkeypatch.setattr(llama_chat, "IMPORT_READ", (40, 1 << 20))
    good = [dict(CHATGPT[0], conversation_id=f"gpt-{i}") for i in range(30)]
    done = llama_chat.import_file(store, io.BytesIO(json.dumps(good).encode()), company="none")
    assert done["conversations"] == 30 and len(begun) == 1
    bad = json.dumps([dict(g, conversation_id=f"x{i}") for i, g in enumerate(good)])[:-1] + \
        ", 5]"
    with pytest.raises(llama_chat.ApiError):
        llama_chat.import_file(store, io.BytesIO(bad.encode()), company="none")
    assert store.db.conn().execute("SELECT count(*), sum(source_id LIKE 'x%') "
                                   "FROM conversations").fetchone() == (30, 0)
    store.close()


def test_an_import_ends_its_transaction_when_another_writer_waits(tmp_path, monkeypatch):
    store = llama_chat.Store(str(tmp_path / "chat.db"))
    monkeypatch.setattr(llama_chat, "IMPORT_HOLD", 60)
    writes = []
    write = llama_chat.Database.write
    monkeypatch.setattr(llama_chat.Database, "write",
                        lambda self, *a, **k: writes.append(1) or write(self, *a, **k))
    data = json.dumps([dict(CHATGPT[0], conversation_id=f"gpt-{i}") for i in range(4)]).encode()
    llama_chat.import_file(store, io.BytesIO(data))
    alone = len(writes)
    writes.clear()
    monkeypatch.setattr(llama_chat.Database, "someone_waits", lambda self: True)
    llama_chat.import_file(store, io.BytesIO(data.replace(b"gpt-", b"again-")))
    assert alone == 2 and len(writes) > 4 * 5          # a transaction a step: each gave way
    store.close()


def test_an_import_of_another_running_process_is_left_alone(tmp_path):
    store = llama_chat.Store(str(tmp_path / "chat.db"))
    mine = store.create_conversation("importing", "m")
    with store.db.write() as c:
        c.execute("INSERT INTO import_pending VALUES (?, ?)", (mine, f"{os.getppid()}:ab"))
    store.close()
    store = llama_chat.Store(str(tmp_path / "chat.db"))
    assert store.get_conversation(mine) is not None
    store.close()


def test_chats_go_on_between_the_transactions_of_a_big_import(client, stub, tmp_path):
    path = tmp_path / "conversations.json"
    count = chatgpt_file(path, 300)
    cid = client.new_conversation()
    statuses = []
    with chatting_meanwhile(client, cid, "still here?", 0.05, statuses):
        time.sleep(0.1)
        status, body = imported(client, path.read_bytes())
    assert status == 200 and body["messages"] == count, body
    assert len(statuses) >= 3 and set(statuses) == {200}, statuses
    # a chat written while the import had written some, not all
    assert chats_among_imported(client, cid) > 0
    history_is_sound(client)


def test_a_backup_is_a_consistent_copy_while_chats_go_on(client, stub, tmp_path):
    cid = client.new_conversation()
    for i in range(5):
        client.chat(cid, f"question {i}")
    with chatting_meanwhile(client, cid, "more"):
        status, headers, data = client.get("/api/backup")
    assert status == 200 and headers["Content-Type"] == "application/vnd.sqlite3"
    copy = tmp_path / "copy.db"
    copy.write_bytes(data)
    conn = sqlite3.connect(str(copy))
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] >= 10
    assert int(headers["Content-Length"]) == len(data)
    assert not [n for n in os.listdir(tmp_path) if ".backup-" in n]


def test_one_backup_copy_is_made_at_a_time(client, monkeypatch):
    wait_for(lambda: not llama_chat.BACKUP_LOCK.locked(), 10,
             "the backup downloads of tests before this one ended")
    copying, go_on = threading.Event(), threading.Event()
    real_backup = llama_chat.Database.backup

    def slow_backup(self, target, durable=True):
        copying.set()
        go_on.wait(10)
        real_backup(self, target, durable)

    monkeypatch.setattr(llama_chat.Database, "backup", slow_backup)
    first = []
    thread = threading.Thread(target=lambda: first.append(client.get("/api/backup")))
    thread.start()
    try:
        assert copying.wait(10)
        status, headers, body = client.get("/api/backup")
        assert (status, body["code"], headers["Retry-After"]) == (503, "BUSY", "10")
    finally:
        go_on.set()
        thread.join(10)
    assert first[0][0] == 200
    # the lock goes with the first's copy, removed once its last byte is sent
    wait_for(lambda: not llama_chat.BACKUP_LOCK.locked(), 10, "the first's copy removed")
    assert client.get("/api/backup")[0] == 200


def test_a_failed_backup_is_an_error_before_any_byte(client, monkeypatch, tmp_path):
    def full_disk(self, target, durable=True):
        with open(target, "wb") as f:
            f.write(b"SQLite format 3\0 half")
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(llama_chat.Database, "backup", full_disk)
    status, _, body = client.get("/api/backup")
    assert (status, body["code"]) == (503, "DATABASE_ERROR")
    assert "disk is full" in body["error"] and "bytes free in " + str(tmp_path) in body["error"]
    assert not [n for n in os.listdir(tmp_path) if ".backup-" in n]
    monkeypatch.undo()
    assert client.get("/api/backup")[0] == 200          # the lock went with the failure


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a tmpfs of 3 MiB (a mount: root only)."""
    folder = tmp_path / "small"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs",
                       str(folder)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], capture_output=True)


def test_a_backup_on_a_full_disk_is_an_error_the_client_sees(small_disk, stub, launch):
    c = Client(launch(stub.url, db=str(small_disk / "chat.db")))
    cid = c.new_conversation()
    store = c.engine.store
    def free():
        return os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    while free() > os.path.getsize(small_disk / "chat.db"):           # till a copy has no room
        store.add_message(cid, "user", os.urandom(60_000).hex())
        assert store.db.checkpoint()
    status, headers, body = c.get("/api/backup")
    assert (status, body["code"]) == (503, "DATABASE_ERROR"), body
    assert f"bytes free in {small_disk}" in body["error"] and "full" in body["error"]
    assert [n for n in os.listdir(small_disk) if ".backup-" in n] == []
    assert c.get("/api/health")[2]["database"]["ok"] is True
    assert c.chat(cid, "still answering?")[0] == 200


def test_a_backup_copy_left_by_a_crash_is_removed_at_start(tmp_path, stub, launch):
    left = tmp_path / ".chat.db.backup-x1y2z3"
    left.write_bytes(b"deleted text")
    other = tmp_path / ".other.db.backup-x1y2z3"           # another database's: not ours
    other.write_bytes(b"theirs")
    launch(stub.url)
    assert not left.exists() and other.exists()


def file_mode(path):
    return os.stat(path).st_mode & 0o777


def test_the_database_and_its_wal_are_private(client, tmp_path):
    client.new_conversation()
    db = client.engine.settings.db
    assert [file_mode(db + ext) for ext in ("", "-wal", "-shm")] == [0o600] * 3


def test_an_existing_readable_database_is_made_private(tmp_path, stub, launch):
    db = tmp_path / "chat.db"
    llama_chat.Store(str(db)).close()
    os.chmod(db, 0o644)
    c = Client(launch(stub.url))
    c.new_conversation()
    assert file_mode(db) == 0o600 and file_mode(str(db) + "-wal") == 0o600


def test_a_command_line_backup_is_private(client, tmp_path):
    client.new_conversation()
    cli("backup", str(tmp_path / "copy.db"), db=client.engine.settings.db, check=0)
    assert file_mode(tmp_path / "copy.db") == 0o600


def cli(*args, db=None, check=None, stdin=None):
    done = subprocess.run([sys.executable, os.path.join(HERE, "llama_chat.py"),
                           *(["--db", str(db)] if db else []), *args],
                          capture_output=True, text=True, timeout=60, input=stdin)
    if check is not None:
        assert done.returncode == check, (done.stdout, done.stderr)
    return done


def test_a_word_only_in_a_title_finds_the_conversation_once(client, stub):
    cid = client.new_conversation("Quetzalcoatl notes")
    for i in range(6):
        client.chat(cid, f"question {i}")
    other = client.new_conversation("Plain")
    client.chat(other, "about quetzalcoatl itself")
    found = client.get("/api/search?q=quetzalcoatl")[2]["results"]
    assert sorted(r["conversation_id"] for r in found) == sorted([cid, other])
    assert [r["content"] for r in found if r["conversation_id"] == other] == [
        "about quetzalcoatl itself"]
    assert len(client.get("/api/search?q=question")[2]["results"]) == 6    # in the text: each


def test_the_command_line_works_on_the_history_while_a_server_writes(client, stub, tmp_path):
    cid, _ = a_history(client, stub)
    db = client.engine.settings.db
    with chatting_meanwhile(client, cid, "busy writing"):
        found = cli("search", "erupts", "--json", db=db, check=0)
        assert json.loads(found.stdout)["results"][0]["content"] == "A mountain that erupts."
        assert "Volcanoes" in cli("search", "erupts", db=db, check=0).stdout
        out = tmp_path / "all.jsonl"
        cli("export", "--format", "jsonl", "-o", str(out), db=db, check=0)
        assert len(out.read_text().splitlines()) == 2
        md = cli("export", "--conversation", str(cid), "--format", "md", db=db, check=0).stdout
        assert md.startswith("# Volcanoes 🌋")
        copy = tmp_path / "copy.db"
        cli("backup", str(copy), db=db, check=0)
        assert sqlite3.connect(str(copy)).execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert "ok" in cli("check", db=db, check=0).stdout
        assert "conversations 2" in cli("stats", db=db, check=0).stdout
    fresh = tmp_path / "fresh.db"
    done = cli("import", str(out), db=fresh, check=0)
    assert re.fullmatch(f"{re.escape(str(out))}: imported 2 conversations, [0-9]+ messages, "
                        r"0 skipped \(llama-chat\)\n", done.stdout), done.stdout
    assert "2 skipped" in cli("import", str(out), db=fresh, check=0).stdout


def test_the_command_line_s_errors_and_help(tmp_path, capsys):
    missing = tmp_path / "none.db"
    done = cli("search", "x", db=missing, check=1)
    assert done.stderr.count("\n") == 1 and "no database" in done.stderr
    assert not missing.exists()
    assert cli("frobnicate", check=2).stderr
    assert cli("search", db=missing, check=2).stderr             # no query
    for command in ("serve", "search", "export", "import", "backup", "restore", "check",
                    "stats"):
        with pytest.raises(SystemExit) as done:         # in this process: argparse's --help
            llama_chat.main([command, "--help"])
        assert done.value.code == 0 and "usage:" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text('{"nothing": "here"}')
    done = cli("import", str(bad), db=tmp_path / "new.db", check=1)
    assert done.stdout.startswith(f"{bad}: not imported: The file cannot be imported: item 1")
    assert done.stdout.endswith("(nothing of it was stored)\n")
    assert done.stderr == "llama-chat import: 1 of 1 files not imported\n"
    assert cli("import", str(tmp_path / "absent.json"), db=tmp_path / "new.db",
               check=1).stdout == f"{tmp_path / 'absent.json'}: not imported: No such file or " \
        "directory (nothing of it was stored)\n"
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    assert cli("check", db=damaged).returncode == 1


def test_a_command_line_import_tries_every_file_and_says_each(tmp_path):
    good, bad, again = tmp_path / "webui.jsonl", tmp_path / "bad.json", tmp_path / "gpt.zip"
    good.write_bytes(webui_jsonl(WEBUI_CONV, WEBUI_MESSAGES))
    bad.write_text('[{"mapping": {}}, {"mapping": ')
    again.write_bytes(zip_of({"conversations.json": json.dumps(CHATGPT)}))
    weird = tmp_path / "weird.json"
    weird.write_text(json.dumps([dict(CHATGPT[0], conversation_id="w", title=["x"])]))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    done = cli("import", str(good), str(bad), str(again), str(weird), str(empty),
               db=tmp_path / "chat.db", check=1)
    lines = done.stdout.splitlines()
    assert lines[0] == f"{good}: imported 1 conversations, 6 messages, 0 skipped " \
        "(llama.cpp-webui)"
    assert lines[1].startswith(f"{bad}: not imported: The file cannot be imported: the JSON "
                               "ends early or is broken at line 1, column 31")
    assert lines[2] == f"{again}: imported 1 conversations, 5 messages, 0 skipped (chatgpt)"
    assert lines[3] == f"{weird}: imported 1 conversations, 5 messages, 0 skipped, 1 coerced " \
        "(chatgpt)"
    assert lines[4] == "  coerced: conversation 1 (w): title is not text"
    assert lines[5] == f"{empty}: imported 0 conversations, 0 messages, 0 skipped (none)"
    assert done.stderr == "llama-chat import: 1 of 5 files not imported\n"
    assert cli("import", str(empty), db=tmp_path / "chat.db", check=0).returncode == 0


def test_check_refuses_what_is_not_a_llama_chat_database(tmp_path):
    empty = tmp_path / "download.db"
    empty.write_bytes(b"")
    done = cli("check", db=empty, check=1)
    assert "is empty (0 bytes): not a database" in done.stderr and "ok" not in done.stdout
    assert empty.read_bytes() == b""
    text = tmp_path / "notes.db"
    text.write_text("hello")
    assert "is not an SQLite database" in cli("check", db=text, check=2).stderr
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as c:
        c.execute("CREATE TABLE photos (x)")
    assert "another program's SQLite database (its tables: photos)" in cli(
        "check", db=other, check=2).stderr
    assert cli("check", db=tmp_path / "absent.db", check=1).stderr
    assert not (tmp_path / "absent.db").exists()


def test_check_changes_nothing_of_an_older_database(tmp_path):
    path = str(tmp_path / "v7.db")
    schema_2_db(path, lambda c: c.execute(
        "INSERT INTO conversations (title, model) VALUES ('kept', 'm')"), version=7)
    before = open(path, "rb").read()
    done = cli("check", db=path, check=0)
    assert "ok (SQLite's integrity check; schema 7, migrated when opened)" in done.stdout
    assert open(path, "rb").read() == before and not os.path.exists(path + ".v7.bak")


def database_with(path, titles):
    store = llama_chat.Store(str(path))
    for title in titles:
        store.add_message(store.create_conversation(title, "m"), "user", title)
    store.close()


def test_restore_after_a_kill_keeps_the_old_file_and_its_wal_aside(tmp_path):
    db, backup = tmp_path / "chat.db", tmp_path / "backup.db"
    database_with(db, ["before the backup"])
    cli("backup", str(backup), db=db, check=0)
    # A writer killed with its WAL unmerged: the WAL holds a conversation the file does not.
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time; sys.path.insert(0, {HERE!r})
        import llama_chat
        store = llama_chat.Store({str(db)!r})
        store.db.conn().execute("PRAGMA wal_autocheckpoint = 0")
        store.add_message(store.create_conversation("after the backup", "m"), "user", "x")
        print("written", flush=True)
        time.sleep(60)""")], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "written\n"
        assert "is open in a llama-chat" in cli("restore", str(backup), db=db, check=1).stderr
    finally:
        writer.kill()
        writer.wait(10)
    assert os.path.getsize(str(db) + "-wal") > 0
    done = cli("restore", str(backup), db=db, check=0)
    assert done.stdout.startswith(f"restored {backup} (SQLite's integrity check and the search "
                                  f"index's: ok) to {db}; what was there is kept as ")
    aside = done.stdout.split("kept as ")[1].split(", ")[0]
    assert not os.path.exists(str(db) + "-wal")
    assert not any(os.path.exists(str(backup) + s) for s in ("-wal", "-shm"))   # left as it was
    titles = [r[0] for r in sqlite3.connect(db).execute("SELECT title FROM conversations")]
    assert titles == ["before the backup"]
    assert file_mode(db) == 0o600
    kept = [r[0] for r in sqlite3.connect(aside).execute("SELECT title FROM conversations")]
    assert kept == ["before the backup", "after the backup"]       # the WAL went with it
    assert "ok" in cli("check", db=db, check=0).stdout


def test_the_presence_lock_is_let_go_with_the_last_store_of_a_file(tmp_path):
    path = str(tmp_path / "chat.db")
    first, second = llama_chat.Store(path), llama_chat.Store(path)
    assert llama_chat.used_by_others(path)
    first.close()          # closing the file now would drop SQLite's locks of `second` too
    assert llama_chat.used_by_others(path)
    assert second.db.conn().execute("SELECT count(*) FROM conversations").fetchone() == (0,)
    second.close()
    assert not llama_chat.used_by_others(path)
    assert os.path.realpath(path) not in llama_chat.PRESENCE


def test_restore_refuses_a_damaged_or_empty_backup_and_changes_nothing(tmp_path):
    db = tmp_path / "chat.db"
    database_with(db, ["mine"])
    before = sorted(os.listdir(tmp_path))
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    assert "is empty" in cli("restore", str(empty), db=db, check=1).stderr
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(open(db, "rb").read()[:8192] + b"\xff" * 8192)
    assert "damaged" in cli("restore", str(damaged), db=db, check=1).stderr
    assert not any("before-restore" in n or "restoring" in n for n in os.listdir(tmp_path))
    assert set(before) <= set(os.listdir(tmp_path))
    assert [r[0] for r in sqlite3.connect(db).execute("SELECT title FROM conversations")] == \
        ["mine"]


def answers_read_only(server, why):
    """A server on a database it cannot write: search, reading and export
    answer; a write is 503 naming why; health says so and is ok."""
    c = Client(server)
    health = c.get("/api/health")[2]["database"]
    assert health["ok"] is True and health["read_only"] == why, health
    listed = c.get("/api/conversations")[2]["conversations"]
    assert [x["title"] for x in listed] == ["on the stick"]
    assert c.get("/api/search?q=stick")[2]["count"] == 1
    status, _, raw = c.request("GET", "/api/export?format=jsonl")
    assert status == 200 and "on the stick" in json.dumps(raw)
    status, _, body = c.post("/api/conversations", {"title": "new", "model": "m"})
    assert status == 503 and "readonly" in body["error"], body


def test_a_database_that_cannot_be_written_is_read_as_it_is(tmp_path, stub, launch, monkeypatch):
    database_with(tmp_path / "chat.db", ["on the stick"])
    monkeypatch.setattr(llama_chat, "read_only_reason", lambda path: "the file is read-only")
    answers_read_only(launch(stub.url), "the file is read-only")


def test_an_older_database_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    path = str(tmp_path / "v7.db")
    schema_2_db(path, lambda c: None, version=7)
    monkeypatch.setattr(llama_chat, "read_only_reason", lambda p: "the file is read-only")
    with pytest.raises(llama_chat.ConfigError, match="cannot be written .* schema 7"):
        llama_chat.Store(path)
    assert not os.path.exists(path + ".v7.bak")


@pytest.fixture
def read_only_mount(tmp_path):
    """A folder of tmp_path mounted read-only (a bind mount: root only)."""
    source, mounted = tmp_path / "stick", tmp_path / "mounted"
    source.mkdir()
    mounted.mkdir()
    if subprocess.run(["mount", "--bind", str(source), str(mounted)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here (not root)")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(mounted)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield source, mounted
    finally:
        subprocess.run(["umount", "--lazy", str(mounted)], capture_output=True)


def test_a_database_on_a_read_only_mount_is_searched_and_exported(read_only_mount, stub,
                                                                   launch):
    source, mounted = read_only_mount
    database_with(source / "chat.db", ["on the stick"])
    assert not os.path.exists(source / "chat.db-wal")
    db = mounted / "chat.db"
    assert "on the stick" in cli("search", "stick", db=db, check=0).stdout
    assert "on the stick" in cli("export", "--format", "jsonl", db=db, check=0).stdout
    assert "ok" in cli("check", db=db, check=0).stdout
    done = cli("import", os.devnull, db=db, check=1)
    answers_read_only(launch(stub.url, db=str(db)), "it is on a read-only mount")
    assert sorted(os.listdir(source)) == ["chat.db"]


###############################################################################
# Bad requests: every code of the contract
###############################################################################

@pytest.mark.parametrize("path, body, field", [
    ("/api/conversations", {"model": MODEL, "options": {"top_k": -5}}, "options.top_k"),
    ("/api/conversations", {"model": MODEL, "options": {"mirostat": 1}}, "options.mirostat"),
    ("/api/conversations", {"model": MODEL, "pinned": "yes"}, "pinned"),
    ("/api/conversations", {"model": MODEL, "system_prompt": 5}, "system_prompt"),
    ("/api/conversations", {"title": 5, "model": MODEL}, "title"),
    ("/api/conversations", {"title": "   ", "model": MODEL}, "title"),
    ("/api/conversations", {"title": "t"}, "model"),
    ("/api/conversations", {"title": "t", "model": ["x"]}, "model"),
    ("/api/chat", {"message": "hi", "model": MODEL}, "conversation_id"),
    ("/api/chat", {"conversation_id": "1", "message": "hi", "model": MODEL}, "conversation_id"),
    ("/api/chat", {"conversation_id": True, "message": "hi", "model": MODEL}, "conversation_id"),
    ("/api/chat", {"conversation_id": 1, "model": MODEL}, "message"),
    ("/api/chat", {"conversation_id": 1, "message": "", "model": MODEL}, "message"),
    ("/api/chat", {"conversation_id": 1, "message": {"a": 1}, "model": MODEL}, "message"),
    ("/api/chat", {"conversation_id": 1, "message": "hi"}, "model"),
    ("/api/chat", {"conversation_id": 1, "message": "hi", "model": MODEL, "stream": "yes"},
     "stream"),
    ("/api/chat", {"conversation_id": 1, "message": "hi", "model": MODEL,
                   "options": {"temperature": 99}}, "options.temperature"),
    ("/api/chat", {"conversation_id": 1, "message": "hi", "model": MODEL,
                   "options": {"grammar": "x"}}, "options.grammar"),
    ("/api/chat", {"conversation_id": 1, "message": "hi", "model": MODEL,
                   "options": ["temperature"]}, "options"),
])
def test_validation_errors_name_the_field_and_store_nothing(client, path, body, field):
    cid = client.new_conversation()
    assert cid == 1
    status, _, answer = client.post(path, body)
    assert status == 400
    assert answer == {"success": False, "error": answer["error"], "code": "VALIDATION_ERROR",
                      "field": field}
    assert rows(client, "SELECT count(*) FROM conversations")[0][0] == 1
    assert rows(client, "SELECT count(*) FROM messages")[0][0] == 0


@pytest.mark.parametrize("path, body, field", [
    ("/api/conversations", {"title": "\ud800", "model": "m"}, "title"),
    ("/api/conversations", {"title": "t", "model": "x\udfff"}, "model"),
    ("/api/chat", {"conversation_id": 1, "message": "hi \ud83d", "model": "m"}, "message"),
    ("/api/chat", {"conversation_id": 2**63, "message": "hi", "model": "m"}, "conversation_id"),
    ("/api/chat", {"conversation_id": 1, "user_message_id": 10**30, "model": "m"},
     "user_message_id"),
    ("/api/chat", {"conversation_id": 1, "message": "hi", "model": "m", "temperature": "hot"},
     "temperature"),
    ("/api/chat", {"conversation_id": 1, "message": "hi", "model": "m", "temprature": 0.2},
     "temprature"),
    ("/api/conversations", {"title": "t", "model": "m", "pinned": 1}, "pinned"),
])
def test_surrogates_huge_numbers_and_unknown_fields_are_validation_errors(client, path, body,
                                                                          field):
    client.new_conversation()
    raw = json.dumps(body).encode()              # json.dumps keeps "\ud800" escaped
    status, _, answer = client.request("POST", path, raw=raw,
                                       headers={"Content-Type": "application/json"})
    assert (status, answer["code"], answer["field"]) == (400, "VALIDATION_ERROR", field)
    assert rows(client, "SELECT count(*) FROM messages") == [(0,)]
    assert rows(client, "SELECT count(*) FROM conversations") == [(1,)]
    if field == "temperature":
        assert "options" in answer["error"]


@pytest.mark.parametrize("query", ["limit=99999999999999999999", "offset=9223372036854775808"])
def test_huge_paging_numbers_are_validation_errors(client, query):
    status, _, body = client.get("/api/conversations?" + query)
    assert (status, body["code"], body["field"]) == (400, "VALIDATION_ERROR", query.split("=")[0])


def test_an_oversize_body_with_expect_continue_gets_413_and_no_100(client):
    with socket.create_connection(("127.0.0.1", client.port), timeout=5) as sock:
        sock.sendall(b"POST /api/conversations HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 99999999\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in answer


def test_a_client_that_hangs_up_early_is_one_quiet_line(client, stub, caplog):
    cid = client.new_conversation()
    stub.stall = 0.3
    caplog.set_level("INFO", logger="llama_chat")
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", client.port), timeout=5)
        data = json.dumps({"conversation_id": cid, "message": "hi", "model": "m"}).encode()
        sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()                              # a reset, before the answer is written
    deadline = time.monotonic() + 10
    while sum("went away" in r.getMessage() for r in caplog.records) < 3 and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("went away" in m for m in messages) == 3, messages
    assert not any("Traceback" in m or "internal error" in m or '" 500 ' in m for m in messages)


@pytest.mark.parametrize("raw", [b"{not json", b"[1,2]", b'"text"', b"", b"\xff\xfe",
                                 b"[" * 100000 + b"]" * 100000])
def test_bodies_that_are_not_json_objects(client, raw):
    status, _, body = client.request("POST", "/api/conversations", raw=raw,
                                     headers={"Content-Type": "application/json"})
    assert status == 400
    assert body["code"] == "INVALID_JSON" and body["success"] is False
    assert rows(client, "SELECT count(*) FROM conversations")[0][0] == 0


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data"])
def test_post_needs_json_content_type(client, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    status, _, body = client.request("POST", "/api/conversations",
                                     raw=b'{"title": "t", "model": "m"}', headers=headers)
    assert (status, body["code"]) == (415, "UNSUPPORTED_MEDIA_TYPE")
    assert rows(client, "SELECT count(*) FROM conversations")[0][0] == 0


def raw_exchange(port, data, shut_write=True, timeout=10):
    """Send bytes, read the answer until the server closes: (status line, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            if shut_write:
                s.shutdown(socket.SHUT_WR)
        except OSError:         # the server answered and closed before reading it all
            pass
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
    head, _, body = got.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    return lines[0], lines[1:], body


def test_body_over_the_limit_is_refused_unread(client):
    status, headers, body = raw_exchange(client.port, (
        b"POST /api/conversations HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2000000\r\n\r\n"), False)
    assert status.startswith("HTTP/1.1 413 ")
    assert "Connection: close" in headers
    assert json.loads(body)["code"] == "PAYLOAD_TOO_LARGE"


@pytest.mark.parametrize("method, path, allow", [
    ("DELETE", "/api/conversations", "GET, HEAD, POST"),
    ("POST", "/api/models", "GET, HEAD"),
    ("GET", "/api/chat", "POST"),
    ("PATCH", "/api/conversations/1", "DELETE, GET, HEAD, PUT"),
])
def test_wrong_method_on_known_path(client, method, path, allow):
    status, headers, body = client.request(method, path)
    assert (status, body["code"]) == (405, "METHOD_NOT_ALLOWED")
    assert headers["Allow"] == allow


@pytest.mark.parametrize("path", ["/api/nothing", "/api/conversations/1/extra", "/etc/passwd",
                                  "/../llama_chat.py", "/config.json", "/api/"])
def test_unknown_paths_are_not_found_and_read_no_file(client, path):
    status, _, body = client.get(path)
    assert status == 404
    assert body == {"success": False, "error": body["error"], "code": "NOT_FOUND",
                    "resource": "path", "id": body["id"]}


def test_protocol_errors_answer_in_the_json_body(client):
    with socket.create_connection(("127.0.0.1", client.port)) as s:
        s.sendall(b"GARBAGE\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(payload)["success"] is False


def test_a_bug_answers_500_without_its_traceback(client, monkeypatch):
    def broken(*args):
        raise RuntimeError("secret internals")
    monkeypatch.setattr(client.engine.store, "list_conversations", broken)
    status, _, body = client.get("/api/conversations")
    assert status == 500
    assert body == {"success": False, "error": "Internal server error", "code": "INTERNAL_ERROR"}


@pytest.mark.parametrize("hosts, status", [
    (["localhost:3000"], 200), (["127.0.0.1"], 200), (["[::1]:8080"], 200), (["LOCALHOST"], 200),
    (["evil.example"], 403), (["localhost.evil"], 403), (["127.0.0.1.nip.io:3000"], 403),
    ([""], 403), ([], 403), (["localhost", "localhost"], 403), (["192.168.1.5:3000"], 403),
])
def test_host_header_must_name_loopback(client, hosts, status):
    head = b"GET /api/config HTTP/1.1\r\n" + b"".join(
        b"Host: " + h.encode() + b"\r\n" for h in hosts) + b"Connection: close\r\n\r\n"
    line, _, body = raw_exchange(client.port, head)
    assert line.split()[1] == str(status)
    if status == 403:
        assert json.loads(body)["code"] == "FORBIDDEN"


def test_beyond_loopback_ip_addresses_and_allowed_names_pass(stub, launch):
    c = Client(launch(stub.url, host="0.0.0.0", api_key="k", allowed_hosts=("chat.home.arpa",)))
    auth = {"Authorization": "Bearer k"}
    for host, status in [("192.168.1.5:3000", 200), ("chat.home.arpa", 200),
                         ("[fe80::1]:3000", 200), ("rebind.evil.example", 403)]:
        assert c.get("/api/config", headers={**auth, "Host": host})[0] == status, host


@pytest.mark.parametrize("headers, status", [
    ({"Origin": "http://evil.example"}, 403),
    ({"Origin": "null"}, 403),
    ({"Origin": "http://localhost:1"}, 403),
    ({"Sec-Fetch-Site": "cross-site"}, 403),
    ({"Origin": "SAME"}, 201),
    ({"Sec-Fetch-Site": "same-origin"}, 201),
    ({}, 201),
])
def test_cross_origin_writes_are_forbidden(client, headers, status):
    host = f"127.0.0.1:{client.port}"
    headers = {k: (f"http://{host}" if v == "SAME" else v) for k, v in headers.items()}
    got, resp_headers, body = client.post("/api/conversations", {"title": "t", "model": "m"},
                                          headers={"Host": host, **headers})
    assert got == status
    assert "Access-Control-Allow-Origin" not in resp_headers
    assert rows(client, "SELECT count(*) FROM conversations")[0][0] == (1 if got == 201 else 0)


def test_cross_origin_reads_are_answered_without_cors(client):
    status, headers, _ = client.get("/api/conversations", headers={"Origin": "http://evil.example"})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


@pytest.mark.parametrize("headers, status", [
    ({}, 200),                                               # curl, scripts
    ({"Sec-Fetch-Site": "none"}, 200),                       # typed into the address bar
    ({"Sec-Fetch-Site": "same-origin"}, 200),                # the page's own download
    ({"Sec-Fetch-Site": "same-origin", "Origin": "SAME"}, 200),
    ({"Sec-Fetch-Site": "cross-site"}, 403),                 # a no-cors GET from any page
    ({"Sec-Fetch-Site": "same-site"}, 403),                  # a page on another local port
    ({"Sec-Fetch-Site": "same-origin", "Origin": "http://evil.example"}, 403),
    ({"Origin": "null"}, 403),
])
@pytest.mark.parametrize("path", ["/api/backup", "/api/export", "/api/export?format=jsonl"])
def test_whole_history_copies_are_refused_to_other_origins(client, path, headers, status):
    headers = {k: (f"http://127.0.0.1:{client.port}" if v == "SAME" else v)
               for k, v in headers.items()}
    for method in ("GET", "HEAD"):
        got, _, _ = client.request(method, path, headers={"Host": f"127.0.0.1:{client.port}",
                                                          **headers})
        assert got == status, method


def test_writes_from_a_same_site_page_are_refused(client):
    got, _, body = client.post("/api/conversations", {"title": "t"},
                               headers={"Sec-Fetch-Site": "same-site"})
    assert (got, body["code"]) == (403, "FORBIDDEN")
    assert rows(client, "SELECT count(*) FROM conversations")[0][0] == 0


def new_conversation(client, title="t"):
    status, _, body = client.post("/api/conversations", {"title": title, "model": MODEL})
    assert status == 201
    return body["conversation_id"]


def answers_to(port, data, source="127.0.0.1", timeout=10):
    """Send bytes, half-close, read until the server closes: every byte it sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                  source_address=(source, 0)) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    return got


def smuggling(port, outer, inner):
    """`outer` (a request head without its blank line) with `inner`, a whole
    request, as its body: what came back."""
    return answers_to(port, outer + b"\r\nContent-Length: %d\r\n\r\n" % len(inner) + inner)


def delete_everything(ids):
    body = json.dumps({"ids": ids}).encode()
    return (b"POST /api/conversations/delete HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body))


SMUGGLERS = {
    "cross-site POST": b"POST /api/conversations HTTP/1.1\r\nHost: localhost\r\n"
                       b"Origin: http://evil.example\r\nContent-Type: text/plain",
    "same-site fetch": b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\n"
                       b"Sec-Fetch-Site: same-site\r\nContent-Type: application/json",
    "foreign Host": b"POST /api/conversations HTTP/1.1\r\nHost: evil.example\r\n"
                    b"Content-Type: application/json",
    "Origin null": b"POST /api/conversations HTTP/1.1\r\nHost: localhost\r\nOrigin: null\r\n"
                   b"Content-Type: application/json",
    "unknown path": b"POST /api/nothing-here HTTP/1.1\r\nHost: localhost\r\n"
                    b"Content-Type: application/json",
    "GET route": b"POST /api/health HTTP/1.1\r\nHost: localhost\r\n"
                 b"Content-Type: application/json",
    "Expect 100-continue": b"POST /api/conversations HTTP/1.1\r\nHost: localhost\r\n"
                           b"Origin: http://evil.example\r\nExpect: 100-continue\r\n"
                           b"Content-Type: application/json",
    "GET with a body": b"GET /api/nothing-here HTTP/1.1\r\nHost: localhost",
    "HEAD with a body": b"HEAD /api/conversations HTTP/1.1\r\nHost: localhost",
    "cross-site backup": b"GET /api/backup HTTP/1.1\r\nHost: localhost\r\n"
                         b"Sec-Fetch-Site: cross-site",
}


@pytest.mark.parametrize("outer", SMUGGLERS.values(), ids=SMUGGLERS.keys())
def test_a_refused_requests_body_is_never_read_as_a_request(client, outer):
    ids = [new_conversation(client, f"t{i}") for i in range(3)]
    got = smuggling(client.port, outer, delete_everything(ids))
    assert got.count(b"HTTP/1.1 ") - got.count(b"HTTP/1.1 100 ") == 1, got[:300]
    assert rows(client, "SELECT count(*) FROM conversations")[0][0] == 3


def test_a_refusal_with_a_key_required_closes_too(stub, launch):
    c = Client(launch(stub.url, api_key="s3cret"))
    ids = [c.post("/api/conversations", {"title": "t", "model": MODEL},
                  headers={"Authorization": "Bearer s3cret"})[2]["conversation_id"]]
    inner = delete_everything(ids).replace(b"Host: localhost\r\n",
                                           b"Host: localhost\r\nAuthorization: Bearer s3cret\r\n")
    got = smuggling(c.port, b"POST /api/conversations HTTP/1.1\r\nHost: localhost\r\n"
                    b"Content-Type: application/json", inner)
    assert got.startswith(b"HTTP/1.1 401 ") and got.count(b"HTTP/1.1 ") == 1
    assert rows(c, "SELECT count(*) FROM conversations")[0][0] == 1


def test_a_request_whose_body_was_read_keeps_its_connection(client):
    """The other side of the rule: an answered request whose body was read in
    full leaves the connection open for the next one (keep-alive works)."""
    body = b'{"title": "t", "model": "m"}'
    one = (b"POST /api/conversations HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
           b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    got = answers_to(client.port, one + one)
    assert got.count(b"HTTP/1.1 201 ") == 2
    assert rows(client, "SELECT count(*) FROM conversations")[0][0] == 2


def test_a_refusal_while_starting_closes_the_connection(tmp_path, stub, monkeypatch):
    server, go_on = app_held_at_start(tmp_path, stub, monkeypatch, "migrating", 0, 1)
    try:
        got = smuggling(server.server_address[1], b"PUT /api/conversations/1 HTTP/1.1\r\n"
                        b"Host: localhost\r\nContent-Type: application/json",
                        b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 503 ") and got.count(b"HTTP/1.1 ") == 1
    finally:
        go_on.set()
        server.engine.ready.wait(10)
        stop(server)


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /api/conversations/%C2%B2 HTTP/1.1", 404),              # superscript two
    (b"GET /api/conversations/%D9%A3 HTTP/1.1", 404),              # Arabic-Indic three
    (b"GET /api/conversations/%EF%BC%91 HTTP/1.1", 404),           # fullwidth one
    (b"GET /api/conversations/1_0 HTTP/1.1", 404),
    (b"GET /api/stats/%C2%B9 HTTP/1.1", 404),
    (b"GET /api/conversations?limit=%C2%B3 HTTP/1.1", 400),
    (b"GET /api/conversations?offset=%D9%A3 HTTP/1.1", 400),
    (b"GET /api/search?q=a&limit=%C2%B2 HTTP/1.1", 400),
    (b"GET /api/conversations?limit=+5 HTTP/1.1", 400),
    (b"GET /api/conversations?limit=1_0 HTTP/1.1", 400),
    (b"GET /api/conversations HTTP/\xd9\xa1.1", 400),                 # version digits
])
def test_numbers_in_paths_and_queries_are_ascii_digits(client, request_bytes, status):
    new_conversation(client)
    got = answers_to(client.port, request_bytes + b"\r\nHost: localhost\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 %d " % status) or got.startswith(b"HTTP/1.0 %d " % status)
    assert b'"success": false' in got


@pytest.mark.parametrize("length", ["\u00b2", "\u00b9\u00b2", "\u0663", "1_0", "+5", "0x10"])
@pytest.mark.parametrize("expect", [False, True])
def test_content_length_is_ascii_digits(client, length, expect):
    head = ("POST /api/conversations HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
            f"application/json\r\nContent-Length: {length}\r\n"
            + ("Expect: 100-continue\r\n" if expect else "") + "\r\n")
    raw = head.encode("latin-1") if max(map(ord, length)) < 256 else head.encode("utf-8")
    got = answers_to(client.port, raw + b'{"title":"t"}')
    assert got.startswith(b"HTTP/1.1 400 ") and b"HTTP/1.1 100" not in got, got[:200]
    assert b'"field": "Content-Length"' in got
    assert rows(client, "SELECT count(*) FROM conversations")[0][0] == 0


def test_x_conversation_id_in_other_digits_is_not_a_conversation(client, stub):
    assert new_conversation(client) == 1
    status, _, body = client.post("/v1/chat/completions", {
        "model": "m", "messages": [{"role": "user", "content": "hi"}]},
        headers={"X-Conversation-Id": "\u0661".encode().decode("latin-1")})
    assert status == 200                      # the client's own id for a conversation: not 1
    assert rows(client, "SELECT id, source_id FROM conversations WHERE source = 'api'") == [
        (2, "\u0661".encode().decode("latin-1"))]


@pytest.mark.parametrize("headers, path, status", [
    ({}, "/api/conversations", 401),
    ({"Authorization": "Bearer wrong"}, "/api/conversations", 401),
    ({"Authorization": "Bearer s3cret"}, "/api/conversations", 200),
    ({"Authorization": "bearer s3cret"}, "/api/conversations", 200),
    ({"Authorization": "Basic czNjcmV0"}, "/api/conversations", 401),
    ({"Authorization": "Bearer s3cret-and-more"}, "/api/conversations", 401),
    ({}, "/api/conversations?api_key=s3cret&token=s3cret", 401),
    ({}, "/", 200),
    ({}, "/index.html", 200),
])
def test_api_key_required_when_set(tmp_path, stub, headers, path, status, launch):
    server = launch(stub.url, api_key="s3cret")
    c = Client(server)
    got, resp_headers, body = c.get(path, headers=headers)
    assert got == status
    if status == 401:
        assert body["code"] == "UNAUTHORIZED"
        assert resp_headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", "414"),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", "414"),
    (b"GET / HTTP/1.1\r\nHost: localhost\r\n" + b"".join(
        b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n", "431"),
    (b"GET / HTTP/1.1\r\nHost: localhost\r\n" + b"".join(
        b"X-H%d: %s\r\n" % (i, b"v" * 5000) for i in range(20)) + b"\r\n", "431"),
    (b"POST /api/conversations HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
     b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{}{}{\r\n0\r\n\r\n", "411"),
    (b"POST /api/conversations HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
     b"\r\nContent-Length: -5\r\n\r\n", "400"),
    (b"TRACE / HTTP/1.1\r\nHost: localhost\r\n\r\n", "501"),
    (b"BREW /api/chat HTTP/1.1\r\nHost: localhost\r\n\r\n", "501"),
    (b"OPTIONS /api/chat HTTP/1.1\r\nHost: localhost\r\n\r\n", "405"),
    (b"GET / HTTP/9.9\r\nHost: localhost\r\n\r\n", "505"),
    (b"GET / HTTP/1.x\r\nHost: localhost\r\n\r\n", "400"),
    (b"GET /\r\n\r\n", "400"),
    (b"GET / HTTP/1.1\r\nHost: localhost\r\nX-A: 1\r\n folded\r\n\r\n", "400"),
    (b"GET / HTTP/1.1\r\nHost : localhost\r\n\r\n", "400"),
    (b"GET / HTTP/1.1\r\nHost: localhost\r\nX\tY: 1\r\n\r\n", "400"),
    (b"GET / HTTP/1.1\r\nHost: localhost\r\n" + b"X: v\r\n" * 101 + b"\r\n", "431"),
    (b"GET / HTTP/1.1\r\nHost: localhost\r\nno colon here\r\n\r\n", "400"),
    (b"POST /api/conversations HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
     b"\r\nContent-Length: 2\r\nContent-Length: 30\r\n\r\n{}", "400"),
])
def test_request_limits(client, request_bytes, status):
    line, headers, body = raw_exchange(client.port, request_bytes)
    assert line.split()[1] == status
    assert json.loads(body)["success"] is False
    assert rows(client, "SELECT count(*) FROM conversations")[0][0] == 0


def test_header_names_are_read_in_any_case(client):
    body = b'{"title": "case", "model": "m"}'
    line, headers, answer = raw_exchange(client.port, (
        b"POST /api/conversations HTTP/1.1\r\nhOST: localhost\r\ncontent-type: application/json"
        b"\r\nCONTENT-LENGTH: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)))
    assert line.split()[1] == "201" and json.loads(answer)["conversation_id"] == 1
    assert "Connection: close" in headers


def test_head_of_the_page_answers_its_headers_without_a_body(client):
    line, headers, body = raw_exchange(
        client.port, b"HEAD / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    length = next(int(h.split(":")[1]) for h in headers if h.lower().startswith("content-length"))
    assert line.split()[1] == "200" and body == b""
    assert length == len(client.get("/")[2])


@pytest.mark.parametrize("path", ["/api/backup", "/api/export", "/api/export?format=jsonl",
                                  "/api/conversations/1/export", "/api/config"])
def test_head_never_does_the_work_of_the_get(client, path, monkeypatch, tmp_path):
    new_conversation(client)
    made = []
    monkeypatch.setattr(llama_chat.Database, "backup", lambda *a, **k: made.append(a))
    monkeypatch.setattr(llama_chat, "export_all", lambda *a, **k: made.append(a))
    monkeypatch.setattr(llama_chat, "export_one", lambda *a, **k: made.append(a))
    line, headers, body = raw_exchange(client.port, b"HEAD %s HTTP/1.1\r\nHost: localhost\r\n"
                                       b"Connection: close\r\n\r\n" % path.encode())
    assert line.split()[1] == "200" and body == b"" and made == []
    assert not any(h.lower().startswith("content-length") for h in headers)
    assert list(tmp_path.glob(".*backup*")) == []


@pytest.mark.parametrize("path, status", [("/api/nothing", 404), ("/api/chat", 405)])
def test_head_of_what_get_would_refuse_is_refused_alike(client, path, status):
    assert client.request("HEAD", path)[0] == status


@pytest.fixture
def strict_client(tmp_path, stub):
    """The app with a 1 s request deadline and room for 170 connections."""
    server = start_app(tmp_path, stub.url, request_timeout=1.0, max_connections=170)
    yield Client(server)
    stop(server)


def test_a_trickling_client_is_cut_off_at_the_deadline(strict_client):
    with socket.create_connection(("127.0.0.1", strict_client.port), timeout=10) as s:
        started = time.monotonic()
        closed = False
        for byte in b"GET /api/conversations HTTP/1.1\r\nHost: localhost\r\n\r\n":
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            s.settimeout(0.2)
            try:
                if s.recv(1024) == b"":
                    closed = True
                    break
            except socket.timeout:
                pass
        assert closed and time.monotonic() - started < 3


def test_connections_beyond_the_cap_get_503(stub, launch):
    server = launch(stub.url, max_connections=3)
    c = Client(server)
    idle = [socket.create_connection(("127.0.0.1", c.port)) for _ in range(3)]
    try:
        deadline = time.monotonic() + 5
        while server.connections < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        line, headers, body = raw_exchange(c.port, b"GET /api/config HTTP/1.1\r\n"
                                           b"Host: localhost\r\n\r\n")
        assert line.split()[1] == "503" and json.loads(body)["code"] == "SERVICE_UNAVAILABLE"
    finally:
        for s in idle:
            s.close()


def test_a_keyed_client_is_served_while_another_address_floods_slowly(stub, launch):
    """200 connections from 127.0.0.2, half idle and half sending a header byte
    at a time, hold only that address's share of the slots: a keyed client on
    127.0.0.1 is answered every time."""
    server = launch(stub.url, api_key="s3cret", request_timeout=1.0)
    port, key = server.server_address[1], {"Authorization": "Bearer s3cret"}
    flood = []
    for _ in range(200):
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        flood.append(s)
    stop_trickling = threading.Event()

    def trickle():
        while not stop_trickling.wait(0.1):
            for s in flood[::2]:
                try:
                    s.send(b"G")
                except OSError:
                    pass

    thread = threading.Thread(target=trickle)
    thread.start()
    c, times, statuses = Client(server), [], []
    try:
        for _ in range(60):
            started = time.monotonic()
            statuses.append(c.get("/api/conversations?limit=5", headers=key)[0])
            times.append(time.monotonic() - started)
            time.sleep(0.02)
        assert server.by_address.get("127.0.0.2", 0) <= server.engine.settings.connections_per_address
    finally:
        stop_trickling.set()
        thread.join()
        for s in flood:
            s.close()
    times.sort()
    print(f"\nslow flood: p50 {times[30] * 1000:.1f} ms, p95 {times[56] * 1000:.1f} ms")
    assert statuses == [200] * 60


def test_one_address_gets_its_share_of_the_slots_and_no_more(stub, launch):
    server = launch(stub.url, connections_per_address=3)
    port = server.server_address[1]
    held = []
    try:
        for _ in range(3):
            held.append(socket.create_connection(("127.0.0.1", port)))
        deadline = time.monotonic() + 5
        while server.by_address.get("127.0.0.1", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        got = answers_to(port, b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 503 ") and b"SERVICE_UNAVAILABLE" in got
        got = answers_to(port, b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n\r\n",
                         source="127.0.0.2")
        assert got.startswith(b"HTTP/1.1 200 ")
        held.pop().close()                        # a slot of that address comes free
        deadline = time.monotonic() + 5
        while server.by_address.get("127.0.0.1", 0) > 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        got = answers_to(port, b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 200 ")
    finally:
        for s in held:
            s.close()


def test_headers_have_a_shorter_deadline_than_the_body(stub, launch):
    server = launch(stub.url, header_timeout=0.5, request_timeout=5.0)
    port = server.server_address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:   # headers trickle
        started = time.monotonic()
        try:
            for byte in b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n":
                s.send(bytes([byte]))
                time.sleep(0.1)
        except OSError:
            pass
        assert s.recv(100) == b"" and time.monotonic() - started < 3
    body = json.dumps({"title": "t", "model": MODEL}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:   # a slow body
        s.sendall(b"POST /api/conversations HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                  b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 4):
            time.sleep(0.1)                          # 1 s in all: past the header deadline
            s.send(body[i:i + 4])
        assert s.recv(100).startswith(b"HTTP/1.1 201 ")


FUZZ_SEED = 20261128


def fuzz_requests(count, rng):
    """Malformed requests of many kinds, the same ones for a given seed."""
    paths = ["/api/conversations", "/api/chat", "/api/search?q=x", "/api/conversations/1",
             "/api/stats/1", "/", "/api/models", "/api/health",
             "/api/conversations?limit=99999999999999999999&offset=-1",
             "/api/search?q=%ED%A0%80&limit=9223372036854775808",
             "/v1/chat/completions", "/v1/models", "/v1/embeddings"]
    kinds = []
    creates = json.dumps({"title": "smuggled", "model": MODEL}).encode()
    create = (b"POST /api/conversations HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
              b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(creates), creates))
    digits = ["\u00b2", "\u00b9", "\u00b3", "\u0663", "\uff11", "1_0", "+1", " 1"]
    for i in range(count):
        kind = rng.randrange(14)
        path = rng.choice(paths)
        if kind == 12:                    # a refused request carrying a write as its body
            outer = rng.choice(list(SMUGGLERS.values()))
            data = outer + b"\r\nContent-Length: %d\r\n\r\n" % len(create) + create
        elif kind == 13:                  # numbers in other digits, as Latin-1 or UTF-8
            number = rng.choice(digits)
            text = rng.choice([
                f"POST /api/conversations HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                f"application/json\r\nContent-Length: {number}\r\n"
                + rng.choice(["", "Expect: 100-continue\r\n"]) + "\r\n",
                f"GET /api/conversations/{number} HTTP/1.1\r\nHost: localhost\r\n\r\n",
                f"GET /api/conversations?limit={number} HTTP/1.1\r\nHost: localhost\r\n\r\n",
                f"GET /api/search?q=a&limit={number} HTTP/1.1\r\nHost: localhost\r\n\r\n",
                f"GET / HTTP/{number}.1\r\nHost: localhost\r\n\r\n"])
            data = text.encode(rng.choice(["latin-1", "utf-8"]), "replace") + creates
        elif kind == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        elif kind == 1:
            data = rng.choice([b"GET\r\n\r\n", b"GET / HTTP/1.1 extra\r\n\r\n",
                               b" / HTTP/1.1\r\n\r\n", b"GET /\x00 HTTP/1.1\r\n\r\n",
                               b"\r\n\r\n", b"GET / HTTP/1.1\r\nHost localhost\r\n\r\n"])
        elif kind == 2:
            data = b"GET /" + b"x" * 70000 + b" HTTP/1.1\r\n\r\n"
        elif kind == 3:
            data = b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 200 + b"\r\n"
        elif kind == 4:
            length = rng.choice([b"abc", b"-1", b"99999999999", b"10", b"1e3", b""])
            data = (b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
                    b"\r\nContent-Length: %s\r\n\r\n{}" % (path.encode(), length))
        elif kind == 5:
            data = (b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                    b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
        else:
            value = rng.choice([None, True, -1, 2**70, -2**64, "", "x" * 100, [], {}, [[[]]],
                                1.5, "\u0000", "<script>", {"$gt": 1}, "\ud800", "a\udfffb",
                                {"temperature": "\ud83d"}, {"stop": ["\ud800"]}])
            field = rng.choice(["conversation_id", "message", "model", "title", "stream",
                                "options", "user_message_id", "temperature", "bogus",
                                "messages"])
            body = json.dumps({field: value, "conversation_id": rng.choice(
                [1, "1", -1, 10**30, None])}).encode()
            if kind == 6:
                body = b"[" * 100000 + b"]" * 100000
            elif kind == 7:
                body = body[: rng.randrange(len(body))]
            method = rng.choice([b"POST", b"PUT", b"DELETE", b"GET", b"PATCH"])
            target = rng.choice([path.encode(), b"/api/conversations/" + rng.choice(
                [b"-1", b"0x10", b"1.5", b"%00", b"..%2f..", b"99999999999999999999",
                 b"1;DROP TABLE messages"])])
            data = (b"%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (method, target, len(body), body))
        kinds.append(data)
    return kinds


def test_fuzzed_requests_never_break_the_server(tmp_path, stub, launch):
    import random
    server = launch(stub.url, request_timeout=2.0,    # the stub answers /v1 relays: on a
                    timeouts={"llamacpp_timeout": 30,      # busy machine in more than 2 s
                              "llamacpp_connect_timeout": 30})
    c = Client(server)
    statuses = {}
    for data in fuzz_requests(2000, random.Random(FUZZ_SEED)):
        line, headers, body = raw_exchange(c.port, data)
        code = line.split()[1] if line.startswith("HTTP/") else "none"
        statuses[code] = statuses.get(code, 0) + 1
        assert not code.startswith("5") or code in ("501", "505"), (data[:200], line, body)
        assert b"Traceback" not in body and b"File \"" not in body
    print(f"\nfuzz: 2000 requests, statuses {dict(sorted(statuses.items()))}")
    assert c.get("/api/health")[0] == 200
    assert rows(c, "SELECT count(*) FROM conversations")[0][0] == 0
    assert rows(c, "SELECT count(*) FROM messages")[0][0] == 0


def test_deleted_text_is_gone_from_the_files(client):
    cid = client.new_conversation("zanzibarite plans")
    client.chat(cid, "my secret is quixotrophic")
    client.request("PUT", f"/api/conversations/{cid}", {"title": "renamed plans"})
    client.chat(cid, "and κρυφόλογος 秘密词")
    client.engine.store.db.checkpoint()
    db = client.engine.settings.db

    def on_disk():
        data = b""
        for suffix in ("", "-wal"):
            if os.path.exists(db + suffix):
                with open(db + suffix, "rb") as f:
                    data += f.read()
        return data

    secrets = [b"quixotrophic", b"zanzibarite", "κρυφόλογος".encode(), "秘密".encode()]
    assert all(word in on_disk() for word in (secrets[0], secrets[2]))  # the title: renamed
    assert client.request("DELETE", f"/api/conversations/{cid}")[0] == 200
    deadline = time.monotonic() + 10
    while any(word in on_disk() for word in secrets) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [word for word in secrets if word in on_disk()] == []


def bytes_on_disk(db):
    data = b""
    for suffix in ("", "-wal"):
        if os.path.exists(db + suffix):
            with open(db + suffix, "rb") as f:
                data += f.read()
    return data


def test_edited_text_and_renamed_titles_are_gone_from_the_files(client):
    cid = client.new_conversation("zanzibarite plans")
    client.chat(cid, "my secret is quixotrophic")
    client.request("PUT", f"/api/conversations/{cid}", {"title": "renamed plans"})  # auto
    client.request("PUT", f"/api/conversations/{cid}", {"title": "xylographic notes"})
    question = client.get(f"/api/conversations/{cid}")[2]["messages"][0]["id"]
    db = client.engine.settings.db
    client.engine.store.db.checkpoint()
    assert b"quixotrophic" in bytes_on_disk(db)
    assert client.request("PUT", f"/api/messages/{question}", {"content": "nothing here"})[0] == 200
    client.request("PUT", f"/api/conversations/{cid}", {"title": "plain title"})
    wait_for(lambda: b"quixotrophic" not in bytes_on_disk(db) and b"xylographic" not in
             bytes_on_disk(db), 10, "the purge")
    assert client.get(f"/api/search?q=nothing")[2]["results"]
    assert not client.get(f"/api/search?q=quixotrophic")[2]["results"]


@pytest.mark.parametrize("sql, due", [
    ("UPDATE messages SET content = content || ' and more' WHERE id = 1", False),  # continue
    ("UPDATE messages SET content = content WHERE id = 1", False),
    ("UPDATE messages SET content = 'other words' WHERE id = 1", True),           # an edit
    ("UPDATE messages SET content = substr(content, 2) WHERE id = 1", True),
    ("UPDATE conversations SET title = 'first', title_pending = 0 WHERE id = 2", False),
    ("UPDATE conversations SET title = 'again' WHERE id = 1", True),               # a rename
    ("UPDATE conversations SET title = title WHERE id = 1", False),
])
def test_what_marks_text_to_purge(tmp_path, sql, due):
    store = llama_chat.Store(str(tmp_path / "m.db"))
    with store.db.write() as c:
        c.execute("INSERT INTO conversations (title, model, title_pending) VALUES ('t', 'm', 0)")
        c.execute("INSERT INTO conversations (title, model, title_pending) VALUES ('', 'm', 1)")
        c.execute("INSERT INTO messages (conversation_id, role, content) VALUES (1, 'user', 'hi')")
        c.execute("DELETE FROM search_purge")
    with store.db.write() as c:
        c.execute(sql)
    assert store.index.purge_due() is due


def test_a_change_of_triggers_alone_keeps_the_index(tmp_path, monkeypatch):
    path = str(tmp_path / "t.db")
    store = llama_chat.Store(path)
    with store.db.write() as c:
        c.execute("INSERT INTO conversations (title, model) VALUES ('t', 'm')")
        c.execute("INSERT INTO messages (conversation_id, role, content) VALUES (1, 'user', "
                  "'volcanic')")
        c.execute("DROP TRIGGER search_message_changed")          # as an older version made it
        c.execute("CREATE TRIGGER search_message_changed AFTER UPDATE OF content ON messages "
                  "BEGIN SELECT 1; END")
    store.close()
    monkeypatch.setattr(llama_chat.SearchIndex, "build_some", lambda *a: pytest.fail("rebuilt"))
    store = llama_chat.Store(path)
    assert store.index.in_step()
    assert [r["content"] for r in store.index.search("volcanic", 10)] == ["volcanic"]
    trigger = store.db.conn().execute("SELECT sql FROM sqlite_master WHERE name = "
                                      "'search_message_changed'").fetchone()[0]
    assert "search_purge" in trigger


def test_a_purge_waits_for_a_reader_and_then_completes(tmp_path, stub, launch):
    """A checkpoint gives up after the busy timeout while a reader's snapshot
    (a slow export) holds old pages: it is tried again until it completes."""
    client = Client(launch(stub.url, store=llama_chat.Store(
        str(tmp_path / "chat.db"), open_now=False, busy_ms=200)))
    cid = client.new_conversation()
    client.chat(cid, "my secret is quixotrophic")
    db = client.engine.settings.db
    reader = sqlite3.connect(db)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM messages").fetchone()      # a snapshot, as an export
    try:
        assert client.request("DELETE", f"/api/conversations/{cid}")[0] == 200
        time.sleep(1.5)                                # several checkpoints gave up meanwhile
        assert b"quixotrophic" in bytes_on_disk(db)                # held by the snapshot
    finally:
        reader.execute("COMMIT")
        reader.close()
    wait_for(lambda: b"quixotrophic" not in bytes_on_disk(db), 15, "the purge after the reader")
    wait_for(lambda: not client.engine.store.index.purge_due(), 5, "the purge mark cleared")
    client.engine.store.release()


def test_start_beyond_loopback_makes_a_key_and_requires_it(tmp_path, stub):
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "llama_chat.py"), "--host",
                             "0.0.0.0", "--port", str(port), "--db", str(tmp_path / "lan.db"),
                             "--llamacpp-url", stub.url], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "needs a key" in line, line or proc.stderr.read()   # what stopped it, if it did
        urls = []
        while not urls or "127.0.0.1" not in urls[-1]:
            urls.append(proc.stdout.readline().strip())
        assert all(re.fullmatch(r"http://[\w.-]+:\d+/#token=[\w-]{20,}", u) for u in urls)
        assert not any("0.0.0.0" in u for u in urls) and len(urls) >= 2   # host name, loopback
        key = urls[-1].rsplit("=", 1)[1]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/api/conversations")
        assert conn.getresponse().status == 401
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/api/conversations", headers={"Authorization": "Bearer " + key})
        assert conn.getresponse().status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert key not in err
    key_file = tmp_path / "lan.db.key"
    assert key_file.read_text().strip() == key and file_mode(key_file) == 0o600
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "llama_chat.py"), "--host",
                             "0.0.0.0", "--port", str(port), "--db", str(tmp_path / "lan.db"),
                             "--llamacpp-url", stub.url], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        said = proc.stdout.readline()
        assert "kept in " + str(key_file) in said
        assert proc.stdout.readline().strip().endswith("#token=" + key)   # the same key again
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)


@pytest.mark.parametrize("content", ["", "short", "bad key with spaces here!!"])
def test_a_kept_key_file_that_is_not_a_key_is_made_anew(tmp_path, content):
    path = tmp_path / "x.key"
    path.write_text(content)
    key = llama_chat.kept_key(str(path))
    assert re.fullmatch(r"[\w-]{32}", key) and path.read_text().strip() == key
    assert llama_chat.kept_key(str(path)) == key


@pytest.mark.parametrize("upstream_key, our_key, state, words", [
    ("k1", "", "error", "it needs a key: give it with --llamacpp-api-key"),
    ("k1", "wrong", "error", "the key given with --llamacpp-api-key is not one it takes"),
    ("k1", "k1", "ok", None),
    (None, "", "ok", None),
    (None, "k1", "ok", None),
])
def test_health_tells_when_llama_server_refuses_our_key(tmp_path, stub, launch, upstream_key,
                                                       our_key, state, words):
    stub.api_key = upstream_key
    c = Client(launch(stub.url, llamacpp_api_key=our_key))
    health = c.get("/api/health")[2]
    assert (health["llamacpp"]["state"], health["status"]) == (
        state, "ok" if state == "ok" else "degraded")
    if words:
        assert words in health["llamacpp"]["error"] and "401" in health["llamacpp"]["error"]
    assert "k1" not in json.dumps(health)


def test_log_lines_cannot_be_forged(client, caplog):
    caplog.set_level("INFO", logger="llama_chat")
    raw_exchange(client.port, b"GET /x\x1b[31m\x08\x7f HTTP/1.1\r\nHost: localhost\r\n\r\n")
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "\\x1b[31m\\x08\\x7f" in logged and "\x1b" not in logged


###############################################################################
# Docs and the module's layout
###############################################################################

def test_readme_s_curl_bodies_are_sent_as_json():
    """The API refuses a body that is not sent as application/json (415): a
    README example that sends one without saying so would fail as written."""
    with open(os.path.join(HERE, "README.md")) as f:
        lines = [line for line in f if line.startswith("curl ") and " -d " in line]
    assert lines and all("Content-Type: application/json" in line for line in lines), [
        line for line in lines if "Content-Type: application/json" not in line]


def test_readme_names_every_route():
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    for method, pattern, _ in llama_chat.ROUTES:
        path = "/v1/…" if pattern == llama_chat.V1_PATH else re.sub(
            r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern).replace("\\", "")
        assert f"{method} {path}" in readme, f"{method} {path} is not in README.md"


def test_readme_opens_with_the_run_and_test_commands():
    with open(os.path.join(HERE, "README.md")) as f:
        head = f.read(1500)
    assert "python3 llama_chat.py" in head and "python3 -m pytest" in head
    with open(os.path.join(HERE, ".ci", "run")) as f:
        assert "python3 -m pytest" in f.read()


def module_sections():
    """llama_chat.py's top-level definitions: name -> (section number, line),
    the sections as its banners divide it, and its syntax tree."""
    import ast
    with open(llama_chat.__file__, encoding="utf-8") as f:
        source = f.read()
    banners = [i + 2 for i, line in enumerate(source.splitlines())
               if line.startswith("#" * 79)][::2]            # a banner's title line

    def section_of(line):
        return sum(1 for banner in banners if banner <= line)
    tree = ast.parse(source)
    defined = {}
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [
            t.id for a in ([node] if isinstance(node, ast.Assign) else [])
            for t in a.targets if isinstance(t, ast.Name)]
        for name in names:
            defined.setdefault(name, (section_of(node.lineno), node.lineno))
    return defined, tree, section_of


def test_each_section_of_the_module_uses_only_what_stands_above_it():
    import ast
    defined, tree, section_of = module_sections()
    assert section_of(10 ** 9) >= 15 and defined["Engine"][0] < defined["start_chat"][0] < \
        defined["api_chat"][0] < defined["Handler"][0] < defined["main"][0]
    later = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign)):
            continue
        here = section_of(node.lineno)
        for used in ast.walk(node):
            if isinstance(used, ast.Name) and isinstance(used.ctx, ast.Load) and \
                    used.id in defined and defined[used.id][0] > here:
                later.append(f"line {used.lineno}: {used.id} (line {defined[used.id][1]})")
    assert not later, "used above the section that defines it: " + "; ".join(later)


def test_the_module_map_names_every_section_in_order():
    text = llama_chat.__doc__
    shown = [line.split()[0] for line in text.split("The sections, in order")[1].splitlines()
             if line.startswith("  ") and not line.startswith("   ")]
    assert shown[0] == "Speed-ups" and shown[-1] == "Main" and len(shown) >= 14
    with open(llama_chat.__file__, encoding="utf-8") as f:
        lines = f.read().splitlines()
    titles = [lines[i + 1][2:] for i, line in enumerate(lines)
              if line.startswith("#" * 79) and i + 2 < len(lines)
              and lines[i + 2].startswith("#" * 79)]
    at = 0
    for name in shown:                 # each name of the map opens a banner, in order
        stem = name.rstrip(":").lower().lstrip("/")
        found = [i for i, title in enumerate(titles) if i >= at and stem in title.lower()]
        assert found, f"the map's {name} has no section after {titles[at - 1]!r}"
        at = found[0] + 1


###############################################################################
# The page, in headless Chromium (through chromedriver's WebDriver HTTP API)
###############################################################################

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
needs_chromium = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)")


class Browser:
    """Just enough WebDriver to load pages, run script, type and click."""

    def __init__(self, profile):
        port = free_port()
        self.proc = subprocess.Popen([CHROMEDRIVER, f"--port={port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:                     # chromedriver is another process: poll its status
            try:
                if self.call("GET", "/status")["value"]["ready"]:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.05)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1280,900", f"--user-data-dir={profile}"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": CHROMIUM, "args": args}}}}
        self.session = "/session/" + self.call("POST", "/session", caps)["value"]["sessionId"]

    def call(self, method, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", int(self.base.rsplit(":", 1)[1]),
                                          timeout=60)
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        answer = json.loads(conn.getresponse().read())
        conn.close()
        return answer

    def do(self, method, path, body=None):
        answer = self.call(method, self.session + path, body)
        value = answer.get("value")
        if isinstance(value, dict) and "error" in value:
            raise AssertionError(f"WebDriver {path}: {value['error']}: {value.get('message')}")
        return value

    def go(self, url):
        self.do("POST", "/url", {"url": url})

    def js(self, script, *args):
        return self.do("POST", "/execute/sync", {"script": script, "args": list(args)})

    def js_async(self, script, *args):
        """Run script with a callback as its last argument (arguments[arguments.length - 1])."""
        return self.do("POST", "/execute/async", {"script": script, "args": list(args)})

    def wait(self, script, *args, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for: {script}")
            time.sleep(0.05)

    def type(self, css, text):
        found = self.do("POST", "/element", {"using": "css selector", "value": css})
        assert ELEMENT in found, found
        self.do("POST", f"/element/{found[ELEMENT]}/value", {"text": text})

    def hover(self, css):
        found = self.do("POST", "/element", {"using": "css selector", "value": css})
        self.do("POST", "/actions", {"actions": [{"type": "pointer", "id": "mouse", "actions": [
            {"type": "pointerMove", "origin": found, "x": 0, "y": 0}]}]})

    def click(self, css):
        """Click the element css finds; found again if the page redrew it
        between the finding and the click (the page updates live)."""
        for attempt in range(3):
            found = self.do("POST", "/element", {"using": "css selector", "value": css})
            try:
                self.do("POST", f"/element/{found[ELEMENT]}/click", {})
                return
            except AssertionError as e:
                if "stale element" not in str(e) or attempt == 2:
                    raise

    def quit(self):
        try:
            self.do("DELETE", "")
        finally:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    b = Browser(tmp_path_factory.mktemp("profile"))
    yield b
    b.quit()


@pytest.fixture
def page(browser, client):
    """The browser on a fresh app; returns a function that opens a path."""
    def open_page(path="/"):
        browser.go(f"http://127.0.0.1:{client.port}{path}")
        browser.wait("return document.readyState === 'complete'")
        return browser
    yield open_page
    browser.go("about:blank")


HOSTILE = [
    '<img src=x onerror="window.pwned=1">',
    '<svg onload="window.pwned=1"><circle r=5></svg>',
    '<iframe srcdoc="<script>parent.pwned=1</script>"></iframe>',
    '[click](javascript:window.pwned=1) and [data](data:text/html,<script>alert(1)</script>)',
    '[vb](vbscript:msgbox) <a href="javascript:window.pwned=1">raw link</a>',
    '```html\n</code></pre><script>window.pwned=1</script>\n```',
    '**<b onmouseover="window.pwned=1">bold</b>** `<img src=x onerror=window.pwned=1>`',
    '<style>body{display:none}</style><form action="https://evil.example"><input></form>',
    '| <img src=x onerror=window.pwned=1> | b |\n|---|---|\n| [x](javascript:alert(1)) | 2 |',
    '> <script>window.pwned=1</script>\n- <details open ontoggle="window.pwned=1">',
]
INERT_CHECK = """
const bad = [];
for (const node of document.querySelectorAll('*')) {
  for (const attr of node.attributes) {
    if (attr.name.startsWith('on')) bad.push(node.tagName + ' ' + attr.name);
  }
  if (node.tagName === 'A' && !/^(https?:|mailto:)/.test(node.getAttribute('href') || '')) {
    bad.push('link ' + node.getAttribute('href'));
  }
}
for (const tag of ['iframe', 'img', 'form', 'object', 'embed', 'details[ontoggle]']) {
  const where = ['#messages', '#sidebar', '#stats', '#title', '#model'];
  if (document.querySelector(where.map((w) => w + ' ' + tag).join(', '))) bad.push('element ' + tag);
}
if (document.scripts.length !== 1) bad.push('scripts: ' + document.scripts.length);
if (window.pwned) bad.push('a payload ran');
return bad;
"""


@needs_chromium
def test_page_says_search_is_being_prepared_then_finds(browser, tmp_path, stub, monkeypatch):
    server, go_on, _ = app_with_its_index_held(tmp_path, stub, monkeypatch)
    try:
        assert server.engine.ready.wait(10)
        wait_for(lambda: server.engine.store.index.unbuilt()["done"], 10, "a batch built")
        browser.go(f"http://127.0.0.1:{server.server_address[1]}/")
        browser.wait("return document.querySelectorAll('#conv-list .title').length === 10")
        browser.type("#search", "volcanoes")
        note = browser.wait("const n = document.getElementById('search-preparing');"
                            "return n && n.textContent")
        assert note == "search is being prepared: 25%"
        go_on.set()                                        # asked again until it is ready
        found = browser.wait("const r = document.querySelectorAll('#search-results .result');"
                             "return r.length && r.length", timeout=15)
        assert found == 30 and not browser.js(
            "return document.getElementById('search-preparing')")
    finally:
        go_on.set()
        browser.go("about:blank")
        stop(server)


@needs_chromium
def test_page_shows_start_up_progress_then_carries_on(browser, tmp_path, stub, monkeypatch):
    server, go_on = app_held_at_start(tmp_path, stub, monkeypatch,
                                      "migrating the database to schema 5", 40, 160)
    try:
        browser.go(f"http://127.0.0.1:{server.server_address[1]}/")
        shown = browser.wait("const s = document.getElementById('starting');"
                             "return !s.classList.contains('hidden') && "
                             "[s.querySelector('#starting-step').textContent, "
                             "s.querySelector('progress').value]")
        assert shown == ["llama-chat is starting: migrating the database to schema 5: 40 of 160",
                     0.25]
        assert browser.wait("return document.getElementById('starting').classList.contains("
                            "'reading') && document.querySelectorAll('#conv-list .title').length"
                            ) == 3                  # the history as it was, read meanwhile
        go_on.set()
        titles = browser.wait("return document.getElementById('starting').classList"
                              ".contains('hidden') && [...document.querySelectorAll("
                              "'#conv-list .title')].map((t) => t.textContent)")
        assert titles == ["Old chat 2", "Old chat 1", "Old chat 0"]
    finally:
        go_on.set()
        browser.go("about:blank")
        stop(server)

@needs_chromium
def test_page_lists_conversations_newest_first(page, client):
    for title in ["First", "Second", "Third"]:
        client.new_conversation(title)
    b = page("/")
    titles = b.wait("const t = [...document.querySelectorAll('#conv-list .title')]"
                    ".map(e => e.textContent); return t.length === 3 && t")
    assert titles == ["Third", "Second", "First"]


@needs_chromium
def test_page_opens_a_conversation_by_its_link(page, client):
    cid = client.new_conversation("Linked")
    client.chat(cid, "question one")
    b = page(f"/#/c/{cid}")
    texts = b.wait("const m = [...document.querySelectorAll('#messages .msg .body')]"
                   ".map(e => e.textContent); return m.length === 2 && m")
    assert texts[0] == "question one"
    assert b.js("return document.getElementById('title').textContent") == "Linked"


def reply_in_the_page(page, client, question, ready):
    """Ask `question` in a new conversation (the stub answers its reply) and
    open it in the page, once the element `ready` (css) is drawn."""
    cid = client.new_conversation()
    client.chat(cid, question)
    b = page(f"/#/c/{cid}")
    b.wait(f"return document.querySelector({json.dumps(ready)})")
    return b


@needs_chromium
def test_page_renders_markdown_as_elements(page, client, stub):
    stub.reply = ("## Heading\n\nSome **bold**, *em* and `code`.\n\n```python\nprint('hi')\n"
                  "```\n\n1. one\n2. two\n   - nested\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
                  "> quoted\n\n---\n\n[site](https://example.com) [mail](mailto:a@b.c)")
    b = reply_in_the_page(page, client, "markdown please", ".msg.assistant .body h4")
    found = b.js("""const body = document.querySelector('.msg.assistant .body');
        const q = (s) => body.querySelector(s);
        return {h: q('h4').textContent, strong: q('p strong').textContent,
                em: q('p em').textContent, code: q('p code').textContent,
                lang: q('.codeblock .code-head span').textContent,
                pre: q('.codeblock pre code').textContent, copy: !!q('.codeblock button.copy'),
                ol: q('ol > li').firstChild.textContent, nested: q('ol li ul li').textContent,
                th: q('table thead th').textContent, td: q('table tbody td').textContent,
                quote: q('blockquote').textContent, hr: !!q('hr'),
                links: [...body.querySelectorAll('a')].map(a => [a.href, a.rel])};""")
    assert found == {"h": "Heading", "strong": "bold", "em": "em", "code": "code",
                     "lang": "python", "pre": "print('hi')", "copy": True, "ol": "one",
                     "nested": "nested", "th": "a", "td": "1", "quote": "quoted", "hr": True,
                     "links": [["https://example.com/", "noopener noreferrer"],
                               ["mailto:a@b.c", "noopener noreferrer"]]}


@needs_chromium
def test_page_links_keep_their_parentheses_and_headings_stay_large(page, client, stub):
    stub.reply = ("### Small heading\n\nSee [w](https://en.wikipedia.org/wiki/Foo_(bar)) and "
                  "https://en.wikipedia.org/wiki/Baz_(qux), not [here](/api/conversations).")
    b = reply_in_the_page(page, client, "links please", ".msg.assistant .body h5")
    found = b.js("""const body = document.querySelector('.msg.assistant .body');
        const size = (n) => parseFloat(getComputedStyle(n).fontSize);
        return {links: [...body.querySelectorAll('a')].map(a => a.href),
                text: body.querySelector('p').textContent,
                bigger: size(body.querySelector('h5')) > size(body.querySelector('p')),
                icons: [...document.querySelectorAll('#conv-list .tools button')].map(
                    (x) => x.querySelector('svg') !== null && x.textContent === '')};""")
    assert found["links"] == ["https://en.wikipedia.org/wiki/Foo_(bar)",
                              "https://en.wikipedia.org/wiki/Baz_(qux)"]
    assert "here (/api/conversations)" in found["text"]
    assert found["bigger"] and found["icons"] == [True] * 4     # pin, move, rename, delete


@needs_chromium
def test_page_search_highlights_matches_with_mark(page, client, corpus):
    b = page("/")
    b.type("#search", "learn")
    marks = b.wait("const m = [...document.querySelectorAll('#search-results mark')]"
                   ".map(e => e.textContent.toLowerCase()); return m.length && m")
    assert all(m.startswith("learn") for m in marks)
    b.click("#search-results .result button")
    b.wait("return /^#\\/c\\/\\d+\\/m\\/\\d+$/.test(location.hash) && "
           "document.querySelector('.msg.flash')")


@needs_chromium
def test_page_keeps_hostile_history_inert(page, client):
    store = client.engine.store
    cid = store.create_conversation('<img src=x onerror="window.pwned=1">title', "<b onclick=x>m")
    for text in HOSTILE:
        store.add_message(cid, "user", text)
        store.add_message(cid, "assistant", text, '<svg onload="window.pwned=1">',
                          reasoning=text, finish_reason="stop")
    b = page(f"/#/c/{cid}")
    b.wait(f"return document.querySelectorAll('#messages .msg').length === {2 * len(HOSTILE)}")
    b.js("document.getElementById('stats-toggle').click()")
    b.js("document.getElementById('search').value = 'pwned'; "
         "document.getElementById('search').dispatchEvent(new Event('input'))")
    b.wait("return document.querySelectorAll('#search-results .result').length")
    assert b.js(INERT_CHECK) == []


@needs_chromium
def test_page_renders_any_stored_shape_and_leaves_nothing_of_the_last_one(page, client):
    store = client.engine.store
    before = store.create_conversation("the one before", MODEL)
    store.add_message(before, "user", "earlier words")
    odd = store.create_conversation("odd shapes", MODEL)
    store.add_message(odd, "user", "show me")
    for text in ("```constructor\nx = 1\n```", "```__proto__\ny\n```", "```toString\nz\n```",
                 "plain"):
        store.add_message(odd, "assistant", text, finish_reason="stop")
    with store.db.write() as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM messages WHERE conversation_id = ? "
                                          "AND role = 'assistant' ORDER BY id", (odd,))]
        conn.execute("UPDATE messages SET tool_calls = '\"not a list\"' WHERE id = ?", (ids[0],))
        conn.execute("UPDATE messages SET tool_calls = '{\"a\": 1}' WHERE id = ?", (ids[1],))
        conn.execute("UPDATE messages SET tool_calls = '[7, {\"function\": {\"name\": 5, "
                     "\"arguments\": {\"q\": 1}}}]' WHERE id = ?", (ids[2],))
        conn.execute("UPDATE messages SET finish_reason = 'stop now' WHERE id = ?", (ids[3],))
    store.release()
    b = page(f"/#/c/{before}")
    b.wait("return document.body.textContent.includes('earlier words')")
    b.go(f"http://127.0.0.1:{client.port}/#/c/{odd}")
    b.wait("return document.querySelectorAll('#messages .msg').length === 5")
    assert b.js("return document.getElementById('title').textContent") == "odd shapes"
    assert "earlier words" not in b.js("return document.getElementById('messages').textContent")
    code = b.js("return [...document.querySelectorAll('#messages pre code')].map(c => c.textContent)")
    assert [c.strip() for c in code] == ["x = 1", "y", "z"]
    calls = b.js("return [...document.querySelectorAll('.calls li')].map(l => l.textContent)")
    assert calls == ["Calls a tool", 'Calls a tool{"q":1}']


@needs_chromium
def test_page_clears_the_view_when_a_conversation_cannot_be_shown(page, client):
    store = client.engine.store
    before = store.create_conversation("the one before", MODEL)
    store.add_message(before, "user", "earlier words")
    broken = store.create_conversation("broken", MODEL)
    store.add_message(broken, "user", "anything")
    b = page(f"/#/c/{before}")
    b.wait("return document.body.textContent.includes('earlier words')")
    b.js("window.renderMessage = () => { throw new Error('a shape never seen'); }")
    b.go(f"http://127.0.0.1:{client.port}/#/c/{broken}")
    text = b.wait("const t = document.getElementById('messages').textContent;"
                  "return t.includes('could not be shown') && t")
    assert "earlier words" not in text and "a shape never seen" in text
    assert b.js("return document.getElementById('title').textContent") == \
        "This conversation could not be shown"


ATTACKER_PAGE = """<!doctype html><meta charset="utf-8"><title>elsewhere</title><script>
const target = "http://127.0.0.1:%(port)d";
const inner = "POST /api/conversations/delete HTTP/1.1\\r\\nHost: 127.0.0.1:%(port)d\\r\\n" +
  "Content-Type: application/json\\r\\nContent-Length: %(length)d\\r\\n\\r\\n%(ids)s";
const shots = [];
for (const [method, path] of [["POST", "/api/conversations"], ["POST", "/api/nothing"],
                              ["POST", "/api/health"], ["PUT", "/api/conversations/1"],
                              ["POST", "/api/import"]])
  shots.push(fetch(target + path, { method, mode: "no-cors", body: inner }).catch(() => null));
for (let i = 0; i < 6; i++) {
  shots.push(fetch(target + "/api/backup", { mode: "no-cors" }).catch(() => null));
  shots.push(fetch(target + "/api/export?format=jsonl", { mode: "no-cors" }).catch(() => null));
}
Promise.all(shots).then(() => { window.done = true; });
</script>"""


@needs_chromium
def test_a_page_on_another_origin_can_neither_write_nor_copy_the_history(browser, client,
                                                                          monkeypatch):
    ids = [client.new_conversation(f"kept {i}") for i in range(3)]
    copies = []
    monkeypatch.setattr(llama_chat.Database, "backup", lambda *a, **k: copies.append(a))
    monkeypatch.setattr(llama_chat, "export_all", lambda *a, **k: copies.append(a) or iter(()))
    body = json.dumps({"ids": ids})
    html = (ATTACKER_PAGE % {"port": client.port, "length": len(body),
                             "ids": body.replace('"', '\\"')}).encode()

    class Attacker(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(html)))
            self.end_headers()
            self.wfile.write(html)

        def log_message(self, *a):
            pass

    elsewhere = ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
    serve(elsewhere)
    try:
        for host in ("127.0.0.1", "localhost"):          # same site, another port; cross-site
            browser.go(f"http://{host}:{elsewhere.server_address[1]}/")
            browser.wait("return window.done === true", timeout=20)
    finally:
        stop(elsewhere)
        browser.go("about:blank")
    assert [r[0] for r in rows(client, "SELECT title FROM conversations ORDER BY id")] == \
        ["kept 0", "kept 1", "kept 2"]
    assert copies == []


@needs_chromium
def test_page_streams_a_reply_and_keeps_hostile_tokens_inert(page, client, stub):
    stub.reply = " ".join(HOSTILE)
    stub.token_delay = 0.002
    b = page("/")
    b.wait("return document.querySelectorAll('#model option').length")
    b.type("#input", "hello there\ue007")         # Enter sends
    b.wait("return document.querySelector('.msg.assistant[id^=\"m-\"]:not(.streaming)')")
    assert b.js(INERT_CHECK) == []
    assert b.js("return location.hash") == "#/c/1"
    assert rows(client, "SELECT role, content FROM messages ORDER BY id") == [
        ("user", "hello there"), ("assistant", stub.reply)]
    assert b.js("return document.querySelector('#conv-list .title').textContent") == "hello there"


@needs_chromium
def test_page_stop_keeps_what_arrived(page, client, stub):
    stub.reply = " ".join(f"word{i}" for i in range(400))
    stub.token_delay = 0.01
    cid = client.new_conversation()
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelector('.empty')")
    b.type("#input", "go\ue007")
    b.wait("const b = document.querySelector('.msg.streaming .body');"
           "return b && b.textContent.length > 20")            # (not drawn yet: wait)
    b.click("#stop")
    shown = b.wait("const m = document.querySelector('.msg.assistant.aborted');"
                   "return m && m.querySelector('.body').textContent")
    deadline = time.monotonic() + 5
    while not rows(client, "SELECT 1 FROM messages WHERE finish_reason = 'aborted'"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stored = rows(client, "SELECT content FROM messages WHERE role = 'assistant'")[0][0]
    assert stored.startswith(shown.strip()) and len(stored) < len(stub.reply)


@needs_chromium
def test_page_answer_now_shows_while_the_model_reasons_and_ends_it(page, client, stub):
    stub.reasoning = " ".join(f"step{i}" for i in range(60))
    stub.token_delay = 0.05
    cid = client.new_conversation()
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelector('.empty')")
    assert b.js("return document.getElementById('answer-now').classList.contains('hidden')")
    b.type("#input", "think\ue007")
    b.wait("return !document.getElementById('answer-now').classList.contains('hidden')")
    b.click("#answer-now")
    b.wait("const m = document.querySelector('.msg.assistant:not(.streaming) .body');"
           "return m && m.textContent.includes('Machine learning')", timeout=15)
    assert len(stub.controls) == 1 and stub.controls[0]["action"] == "reasoning_end"
    assert b.js("return document.getElementById('answer-now').classList.contains('hidden')")
    stored = rows(client, "SELECT reasoning FROM messages WHERE role = 'assistant'")[0][0]
    assert len(stored) < len(stub.reasoning)


@needs_chromium
def test_page_recall_toggle_sends_it_and_each_source_opens_its_message(page, client, stub):
    planted = planted_history(client.engine.store, conversations=3)
    fact, question = PLANTED[1]
    stub.reply = "The password is trout-lantern-42 [1]."
    cid = client.new_conversation()
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelector('.empty')")
    b.click("#recall")
    assert b.js("return document.getElementById('recall').getAttribute('aria-pressed')") == "true"
    b.type("#input", question + "\ue007")
    href = b.wait("const a = document.querySelector('.msg.assistant:not(.streaming) a.cite');"
                  "return a && a.getAttribute('href')", timeout=15)
    message_id, source_cid = planted[fact]
    assert href == f"#/c/{source_cid}/m/{message_id}"
    assert any(llama_chat.RECALL_INSTRUCTION + "\n\n[1] “Old talk 1”: Note this: " + fact
               in r["body"]["messages"][0]["content"] for r in stub.requests)
    assert "Old talk 1" in b.js("return document.querySelector('.sources').textContent")
    b.click(".msg.assistant a.cite")
    b.wait(f"return document.getElementById('m-{message_id}') && "
           f"location.hash.startsWith('#/c/{source_cid}')")


@needs_chromium
def test_page_failed_send_offers_retry(page, client, stub):
    stub.mode = "error500"
    cid = client.new_conversation()
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelector('.empty')")
    b.type("#input", "will fail\ue007")
    b.wait("return document.querySelector('#retry-row button')")
    assert "llama.cpp" in b.js("return document.getElementById('toast').textContent")
    stub.mode = "ok"
    b.wait("return document.querySelector('#conv-list .conv')")   # the page has refreshed
    b.click("#retry-row button")
    b.wait("return !document.getElementById('retry-row') && "
           "document.querySelector('.msg.assistant[id^=\"m-\"]:not(.streaming)')")
    assert [r[0] for r in rows(client, "SELECT content FROM messages ORDER BY id")] == [
        "will fail", stub.reply]


@needs_chromium
def test_page_a_reply_cut_by_an_error_offers_retry_not_continue(page, client, stub):
    """A stream cut mid-reply by llama.cpp's failure: the part is kept (shown,
    stored as "error"), and what the page offers is Retry, not Continue (a
    continue would build on a reply llama.cpp did not finish for a reason)."""
    stub.mode = "cut"
    cid = client.new_conversation()
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelector('.empty')")
    b.type("#input", "cut me off\ue007")
    b.wait("return document.querySelector('#retry-row button')")
    assert rows(client, "SELECT finish_reason FROM messages WHERE role = 'assistant'") == [
        ("error",)]
    b.js("location.reload()")
    b.wait("return document.querySelector('.msg.assistant[id^=\"m-\"]')")
    tools = b.js("return [...document.querySelectorAll('.msg.assistant [data-tool]')]"
                 ".map(t => t.dataset.tool)")
    assert "regenerate" in tools and "continue" not in tools
    stub.mode = "ok"


@needs_chromium
def test_page_titles_a_new_chat_whose_first_message_failed(page, client, stub):
    stub.mode = "error500"
    b = page("/")
    b.wait("return document.querySelector('#model option')")
    b.type("#input", "Why is the sky blue?\ue007")
    b.wait("return document.querySelector('#retry-row button')")
    title = b.wait("const t = document.getElementById('title').textContent;"
                   "return t !== 'New chat' && t")
    assert title == "Why is the sky blue?"
    assert [c["title"] for c in client.get("/api/conversations")[2]["conversations"]] == [title]


@needs_chromium
def test_page_failures_leave_no_litter(page, client, stub):
    stub.mode = "error500"
    b = page("/")
    b.type("#input", "first try fails\ue007")
    b.wait("return document.querySelector('#retry-row button')")
    listed = b.wait("const t = [...document.querySelectorAll('#conv-list .title')]"
                    ".map((t) => t.textContent); return t[0] !== 'New chat' && t")
    # Listed at once, titled from its question though no reply came.
    assert listed == ["first try fails"]
    assert b.js("return document.querySelectorAll('.msg.assistant').length") == 0
    b.click("#retry-row button")                       # fails again
    b.wait("return document.querySelector('#retry-row button') && !document.querySelector("
           "'.msg.streaming')")
    assert b.js("return document.querySelectorAll('.msg.assistant').length") == 0
    b.click("#new-chat")
    b.js("document.getElementById('input').value = 'x'.repeat(200001);"
         "document.getElementById('composer').requestSubmit()")
    toast = b.wait("const t = document.getElementById('toast');"
                   "return !t.classList.contains('hidden') && t.textContent")
    assert "at most 200,000 characters" in toast
    assert rows(client, "SELECT count(*) FROM conversations") == [(1,)]


def route_wrapped(monkeypatch, handler, wrap):
    """The app's route to `handler` answered by wrap(handler) instead."""
    monkeypatch.setattr(llama_chat, "COMPILED_ROUTES", [
        (m, p, wrap(h) if h is handler else h) for m, p, h in llama_chat.COMPILED_ROUTES])


def chosen_one_then_another(page, first, second):
    """The page opened, conversation `first` chosen, then (0.2 s on)
    `second`, titled "Quick B", shown: the browser."""
    b = page("/")
    b.wait("return document.querySelector('#conv-list li')")
    b.js(f"location.hash = '#/c/{first}'")
    time.sleep(0.2)
    b.js(f"location.hash = '#/c/{second}'")
    b.wait("return document.getElementById('title').textContent === 'Quick B'")
    return b


@needs_chromium
def test_page_a_message_sent_while_the_page_starts_goes_into_the_open_conversation(
        page, client, stub, monkeypatch):
    """Typed at once on a link to a conversation, before the page has opened
    it (its start held here by a slow /api/config): it goes into that
    conversation, not into a new one."""
    route_wrapped(monkeypatch, llama_chat.api_config, lambda handler: lambda engine, req: (
        time.sleep(1.5), handler(engine, req))[1])
    cid = client.new_conversation("Opened by a link")
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelector('.empty')")
    b.type("#input", "sent at once\ue007")
    b.wait("const n = document.querySelector('.msg.assistant:not(.streaming)');"
           "return n && n.textContent.includes('Machine learning')", timeout=15)
    assert b.js("return document.getElementById('title').textContent") == "Opened by a link"
    assert rows(client, "SELECT conversation_id, role FROM messages ORDER BY id") == [
        (cid, "user"), (cid, "assistant")]
    assert len(client.get("/api/conversations")[2]["conversations"]) == 1


@needs_chromium
def test_page_shows_the_conversation_last_chosen_when_an_earlier_one_answers_late(
        page, client, stub, monkeypatch):
    """Chosen one after the other, A answering slowly (a Pi over Wi-Fi) and B
    at once: B stays shown, and a message goes into B."""
    slow, quick = client.new_conversation("Slow A"), client.new_conversation("Quick B")

    route_wrapped(monkeypatch, llama_chat.api_get_conversation, lambda handler: (
        lambda engine, req: (time.sleep(1.5) if req.params["id"] == str(slow) else None,
                             handler(engine, req))[1]))
    b = chosen_one_then_another(page, slow, quick)
    time.sleep(2)                                         # A's answer has come meanwhile
    assert b.js("return document.getElementById('title').textContent") == "Quick B"
    b.type("#input", "for B\ue007")
    b.wait("const n = document.querySelector('.msg.assistant:not(.streaming)');"
           "return n && n.textContent.includes('Machine learning')", timeout=15)
    assert rows(client, "SELECT DISTINCT conversation_id FROM messages") == [(quick,)]
    b.js(f"location.hash = '#/c/{slow}'")                # and a new chat begun meanwhile
    time.sleep(0.2)
    b.click("#new-chat")
    time.sleep(2)
    assert b.js("return [document.getElementById('title').textContent, location.hash, "
                "document.querySelectorAll('.msg').length]") == ["New chat", "", 0]


@needs_chromium
def test_page_stays_on_the_conversation_chosen_when_an_earlier_one_fails_late(
        page, client, stub, monkeypatch):
    """A chosen, then B: A's late "not found" (deleted meanwhile) neither
    leaves B nor says anything about A."""
    gone, quick = client.new_conversation("Gone A"), client.new_conversation("Quick B")

    def late_not_found(handler):
        def answer(engine, req):
            if req.params["id"] != str(gone):
                return handler(engine, req)
            time.sleep(1.5)
            raise llama_chat.not_found("conversation", gone)
        return answer
    route_wrapped(monkeypatch, llama_chat.api_get_conversation, late_not_found)
    b = chosen_one_then_another(page, gone, quick)
    time.sleep(2)                                         # A's failure has come meanwhile
    assert b.js("return [document.getElementById('title').textContent, location.hash, "
                "!!document.querySelector('#toast:not(.hidden)')]") == [
        "Quick B", f"#/c/{quick}", False]


@needs_chromium
def test_page_streams_belong_to_their_conversation(page, client, stub):
    a, b_id = client.new_conversation("Alpha"), client.new_conversation("Beta")
    stub.reply = " ".join(f"tok{i}" for i in range(40))
    stub.token_delay, stub.hold_at = 0.04, 3         # streaming until the test lets it go on
    b = page(f"/#/c/{a}")
    b.wait("return document.querySelector('.empty')")
    b.type("#input", "long answer please\ue007")
    b.wait("return document.querySelector('.msg.assistant.streaming')")
    b.js(f"location.hash = '#/c/{b_id}'")
    here = b.wait("return document.getElementById('title').textContent === 'Beta' && "
                  "[document.getElementById('send').classList.contains('hidden'), "
                  "document.getElementById('stop').classList.contains('hidden'), "
                  "document.querySelectorAll('.msg.streaming').length]")
    assert here == [False, True, 0]                  # Send here, no Stop, nothing streaming
    b.js(f"location.hash = '#/c/{a}'")
    first = b.wait("const n = document.querySelector('.msg.assistant.streaming');"
                   "return document.getElementById('title').textContent === 'Alpha' && n && "
                   "!document.getElementById('stop').classList.contains('hidden') && "
                   "n.textContent.length")
    stub.go.set()
    grown = b.wait("const n = document.querySelector('.msg.assistant.streaming');"
                   "return n && n.textContent.length > arguments[0] && n.textContent.length",
                   first)
    assert grown > first
    b.wait("return !document.querySelector('.msg.streaming') && "
           "document.querySelector('.msg.assistant[id^=\"m-\"]')", timeout=20)
    assert rows(client, "SELECT conversation_id, role FROM messages ORDER BY id") == [
        (a, "user"), (a, "assistant")]


@needs_chromium
def test_page_reloaded_mid_reply_follows_the_reply_to_its_end(page, client, stub):
    """The server makes the reply whoever watches: a page reloaded mid-reply
    (or opened on another device) shows what was made and the rest as it
    comes, and the reply is stored whole."""
    cid = client.new_conversation("reload")
    stub.reply = " ".join(f"tok{i}" for i in range(40))
    stub.token_delay, stub.hold_at = 0.05, 3    # held after tok2 until the page is back
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelector('.empty')")
    b.type("#input", "tell me a long story\ue007")
    b.wait("const n = document.querySelector('.msg.assistant.streaming');"
           "return n && n.textContent.includes('tok1')")
    b.js("location.reload()")                                    # mid-reply
    b.wait("const n = document.querySelector('.msg.assistant.streaming');"
           "return n && n.textContent.includes('tok1')")        # followed again
    stub.go.set()
    b.wait("const n = document.querySelector('.msg.assistant.streaming');"
           "return n && n.textContent.includes('tok5')")        # live
    text = b.wait("const n = document.querySelector('.msg.assistant:not(.streaming)');"
                  "return n && n.textContent.includes('tok39') && n.textContent", timeout=15)
    assert "tok0 tok1" in text
    assert rows(client, "SELECT content, finish_reason FROM messages WHERE role = "
                "'assistant'") == [(stub.reply, "stop")]


@needs_chromium
def test_page_shows_what_another_device_does_as_it_happens(page, client, stub):
    """A question sent from another device (here: the API) appears in the
    open page without a reload, its reply followed live, the sidebar showing
    a reply being made; a rename elsewhere shows too."""
    cid = client.new_conversation("shared")
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelector('.empty')")
    time.sleep(0.3)                                  # the page listens for changes
    stub.reply = " ".join(f"tok{i}" for i in range(40))
    stub.token_delay, stub.hold_at = 0.05, 5        # held after tok4 while the page looks
    phone = threading.Thread(target=lambda: client.chat(cid, "sent from my phone"))
    phone.start()
    b.wait("return document.querySelector('#conv-list li.generating .spinner')")
    b.wait("const q = document.querySelector('.msg.user');"
           "return q && q.textContent.includes('sent from my phone')")
    b.wait("const n = document.querySelector('.msg.assistant.streaming');"
           "return n && n.textContent.includes('tok3')")        # followed as it is made
    stub.go.set()
    phone.join(15)
    b.wait("const n = document.querySelector('.msg.assistant:not(.streaming)');"
           "return n && n.textContent.includes('tok39') && "
           "!document.querySelector('#conv-list .spinner')", timeout=15)
    client.put(f"/api/conversations/{cid}", {"title": "renamed on the laptop"})
    b.wait("return document.getElementById('title').textContent === 'renamed on the laptop'")


@needs_chromium
def test_page_shows_how_far_llama_cpp_has_read_a_long_prompt(page, client, stub):
    stub.progress_steps, stub.progress_delay = 6, 0.4     # 2.4 s of reading
    cid = client.new_conversation()
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelector('.empty')")
    b.type("#input", "a long question\ue007")
    shown = b.wait("const r = document.querySelector('.msg.streaming .reading');"
                   "return r && r.textContent.includes('s left') && r.textContent")
    assert re.search(r"Reading the prompt: [\d,]+ / 600 tokens, about \d+ s left", shown), shown
    b.wait("const n = document.querySelector('.msg.assistant:not(.streaming)');"
           "return n && !n.querySelector('.reading') && n.textContent.includes('Machine')")


@needs_chromium
def test_page_attaches_files_by_drop_and_paste_and_shows_them(page, client, stub):
    cid = client.new_conversation()
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelector('.empty')")
    hostile = '<img src=x onerror="window.pwned=1">.png'
    b.js("""const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], arguments[1], {type: 'image/png'}));
            document.getElementById('composer').dispatchEvent(
              new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
            const pasted = new DataTransfer();
            pasted.items.add(new File(['line one\\nline two\\n'], 'notes.md', {type: 'text/markdown'}));
            document.getElementById('input').dispatchEvent(
              new ClipboardEvent('paste', {clipboardData: pasted, bubbles: true, cancelable: true}));""",
         base64.b64encode(PNG).decode(), hostile)
    chips = b.wait("const c = [...document.querySelectorAll('#chips li .name')]"
                   ".map(n => n.textContent); return c.length === 2 && c")
    assert chips == [hostile, "notes.md"]
    b.type("#input", "What is this?\ue007")
    b.wait("const i = document.querySelector('.msg.user .attached img');"
           "return i && i.src.startsWith('blob:') && i.naturalWidth === 1")   # the PNG shown
    b.wait("return !document.querySelector('.msg.streaming')")
    sent = stub.requests[-1]["body"]["messages"][-1]["content"]
    assert [p["type"] for p in sent] == ["text", "image_url", "text"]
    assert sent[0]["text"].startswith("--- File: notes.md ---")
    assert b.js("return document.querySelectorAll('#chips li').length") == 0
    b.wait("const d = document.querySelector('.msg.user .attached details');"
           "if (d && !d.open) d.open = true;"           # again if the reply's end redrew it
           "const p = d && d.querySelector('pre');"
           "return p && p.textContent.includes('line two')")
    assert b.js("return window.pwned === undefined")                 # the name is only text
    shown = conversation(client, cid)["messages"][0]["attachments"]
    assert [a["name"] for a in shown] == [hostile, "notes.md"]
    b.js("""const picked = new DataTransfer();                          // the paperclip's picker
            picked.items.add(new File([Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0))],
                                      'purr.wav', {type: 'audio/wav'}));
            const input = document.getElementById('attach-file');
            input.files = picked.files;
            input.dispatchEvent(new Event('change', {bubbles: true}));""",
         base64.b64encode(WAV).decode())
    b.wait("const c = [...document.querySelectorAll('#chips li .name')];"
           "return c.length === 1 && c[0].textContent === 'purr.wav'")
    assert "image/*" in b.js("return document.getElementById('attach-file').accept")


# A JPEG drawn by the browser, 200 x 100, with an EXIF orientation of 6 (its
# top is to the right: a phone held upright) spliced in after its start.
EXIF_JPEG = """
const canvas = document.createElement('canvas');
canvas.width = 200; canvas.height = 100;
const g = canvas.getContext('2d');
g.fillStyle = '#c00'; g.fillRect(0, 0, 200, 100);
const jpeg = new Uint8Array(await (await new Promise(r => canvas.toBlob(r, 'image/jpeg'))).arrayBuffer());
const exif = [0xFF, 0xE1, 0x00, 0x22, 0x45, 0x78, 0x69, 0x66, 0x00, 0x00,
              0x4D, 0x4D, 0x00, 0x2A, 0x00, 0x00, 0x00, 0x08, 0x00, 0x01,
              0x01, 0x12, 0x00, 0x03, 0x00, 0x00, 0x00, 0x01, 0x00, 0x06, 0x00, 0x00,
              0x00, 0x00, 0x00, 0x00];
const file = new File([jpeg.slice(0, 2), new Uint8Array(exif), jpeg.slice(2)], 'upright.jpg',
                      {type: 'image/jpeg'});
const data = new DataTransfer();
data.items.add(file);
document.getElementById('composer').dispatchEvent(
  new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
"""


@needs_chromium
def test_page_scales_a_large_photo_down_upright_and_says_what_a_model_left_out(page, client,
                                                                              stub):
    client.engine.settings = replace(client.engine.settings, max_image_pixels=10000)
    stub.modalities = {"vision": False, "audio": False}
    cid = client.new_conversation()
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelector('.empty')")
    b.wait("return document.querySelector('#attach')")
    b.js(f"(async () => {{ {EXIF_JPEG} }})()")
    b.wait("return document.querySelectorAll('#chips li').length === 1")
    b.type("#input", "What is this?\ue007")
    size = b.wait("const i = document.querySelector('.msg.user .attached img');"
                  "return i && i.naturalWidth && [i.naturalWidth, i.naturalHeight]")
    assert size == [70, 141]              # upright (100 x 200), then to 10,000 pixels at most
    note = b.wait("const n = document.querySelector('.msg.assistant .left-out');"
                  "return n && n.textContent")
    assert note.startswith("Not shown to") and "upright.jpg (it takes no images)" in note
    stored = conversation(client, cid)["messages"][0]["attachments"][0]
    assert stored["type"] == "image/jpeg" and stored["bytes"] < 20000
    b.go(f"http://127.0.0.1:{client.port}/#/c/{cid}")             # and after a reload
    b.wait("const n = document.querySelector('.msg.assistant .left-out');"
           "return n && n.textContent.includes('upright.jpg')")


@needs_chromium
def test_page_lists_each_connection_s_models_and_loads_a_router_s(browser, stub, launch):
    with stub_server(router=True, load_delay=0.5) as gpu, black_hole() as hole:
        c = Client(launch(stub.url, connections=({"name": "gpu", "url": gpu.url},
                                                 {"name": "far", "url": hole})))
        browser.go(f"http://127.0.0.1:{c.port}/")
        groups = browser.wait("const g = [...document.querySelectorAll('#model optgroup')]"
                              ".map(x => x.label); return g.length === 2 && g")
        assert groups == ["default", "gpu"]
        browser.js("const s = document.getElementById('model'); s.value = 'qwen3-0.6b';"
                   "s.dispatchEvent(new Event('change'))")
        assert browser.js("return document.getElementById('model-load').textContent") == "Load"
        browser.click("#model-load")
        browser.wait("return document.getElementById('model-load').textContent === 'Unload'", 15)
        assert gpu.second_status == "loaded"
        label = browser.js("return [...document.querySelectorAll('#model option')]"
                           ".find(o => o.value === 'qwen3-0.6b').textContent")
        assert label == "qwen3-0.6b"
    # the GPU machine gone: its models stay in the list, unavailable
    browser.go(f"http://127.0.0.1:{c.port}/")
    browser.wait("return [...document.querySelectorAll('#model option')]"
                 ".some(o => o.textContent === 'gemma-3-270m (unavailable)')", 15)


@needs_chromium
def test_page_registers_its_worker_which_keeps_the_shell_and_never_the_api(page, client):
    cid = client.new_conversation("Kept on the server")
    b = page(f"/#/c/{cid}")
    b.wait("return navigator.serviceWorker && navigator.serviceWorker.controller !== undefined")
    b.js("navigator.serviceWorker.ready.then(() => { window.swReady = true; })")
    b.wait("return window.swReady === true", 15)
    b.go(f"http://127.0.0.1:{client.port}/#/c/{cid}")           # now under its control
    b.wait("return !!navigator.serviceWorker.controller", 15)
    b.wait("return document.querySelectorAll('#conv-list .conv').length === 1")
    b.js("caches.open('llama-chat-shell').then(c => c.keys()).then(k => "
         "{ window.kept = k.map(r => new URL(r.url).pathname); })")
    kept = b.wait("return window.kept")
    assert "/" in kept and "/manifest.webmanifest" in kept
    assert not [k for k in kept if k.startswith(("/api/", "/v1/"))]


def press(b, key, **mods):
    """A key pressed on the page (its document's keydown)."""
    b.js("document.dispatchEvent(new KeyboardEvent('keydown', Object.assign("
         "{key: arguments[0], bubbles: true, cancelable: true}, arguments[1])))", key,
         {"ctrlKey": mods.get("ctrl", False), "shiftKey": mods.get("shift", False)})


@needs_chromium
def test_page_keys_move_between_conversations_edit_regenerate_and_say_themselves(page, client,
                                                                                stub):
    older = client.new_conversation("Older")
    client.chat(older, "first question")
    newer = client.new_conversation("Newer")
    client.chat(newer, "second question")
    b = page(f"/#/c/{newer}")
    b.wait("return document.querySelectorAll('.msg.assistant').length === 1")
    press(b, "ArrowDown", ctrl=True, shift=True)                  # the next in the list
    b.wait(f"return location.hash === '#/c/{older}'")
    press(b, "ArrowUp", ctrl=True, shift=True)
    b.wait(f"return location.hash === '#/c/{newer}'")
    b.wait("return document.querySelector('.msg.assistant .tools')")
    asked = len(stub.requests)
    press(b, "r", ctrl=True, shift=True)                          # regenerate the last reply
    wait_for(lambda: len(stub.requests) > asked, 10, "a regenerate")
    b.wait("return !document.querySelector('.msg.streaming') && "
           "document.querySelector('.msg.assistant .count')")      # 2/2 versions
    press(b, "e", ctrl=True, shift=True)                          # edit the last question
    b.wait("return document.querySelector('.msg.user textarea')")
    press(b, "Escape")
    b.js("document.activeElement.blur()")
    press(b, "?")
    assert "Ctrl+Shift+R" in b.wait("return document.getElementById('toast').textContent")
    assert b.js("return !!document.querySelector('.msg.assistant [data-tool=read]')")


@needs_chromium
def test_page_downloads_by_navigation_never_through_its_memory(page, client):
    client.new_conversation("Kept")
    b = page("/")
    b.wait("return document.querySelectorAll('#conv-list .conv').length === 1")
    b.js("window.fetched = []; const f = window.fetch; window.fetch = (u, o) => "
         "{ window.fetched.push(String(u)); return f(u, o); };"
         "window.clicked = []; HTMLAnchorElement.prototype.click = function () "
         "{ window.clicked.push(this.getAttribute('href')); };")
    b.click("#export-all")
    b.click("#backup")
    assert b.wait("return window.clicked.length === 2 && window.clicked") == [
        "/api/export?format=json", "/api/backup"]
    assert not [u for u in b.js("return window.fetched") if "/export" in u or "/backup" in u]


@needs_chromium
def test_page_renders_math_readably_and_leaves_prices_alone(page, client, stub):
    stub.reply = ("Euler: $e^{i\\pi} + 1 = 0$, and $$\\frac{a+b}{2} \\geq \\sqrt{ab}$$ "
                  "with \\(x_1 \\in \\mathbb{R}\\); it costs $5 and $10. "
                  "Beyond: \\[\\begin{pmatrix} 1 \\end{pmatrix}\\] and *still* Markdown.")
    cid = client.new_conversation()
    client.chat(cid, "math?")
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelectorAll('.msg.assistant .math').length === 3")
    shown = b.js("return [...document.querySelectorAll('.msg.assistant .math')]"
                 ".map(m => m.textContent)")
    assert shown == ["eiπ + 1 = 0", "(a+b)/2 ≥ √ab", "x1 ∈ ℝ"]
    assert b.js("return document.querySelector('.msg.assistant .math sup').textContent") == "iπ"
    assert b.js("return document.querySelector('.msg.assistant .math.display') !== null")
    body = b.js("return document.querySelector('.msg.assistant .body').textContent")
    assert "it costs $5 and $10." in body                       # prices stay prices
    source = b.js("return document.querySelector('.msg.assistant code.math-source').textContent")
    assert source.startswith("$$\\begin{pmatrix}")               # beyond: its source
    assert b.js("return document.querySelector('.msg.assistant em').textContent") == "still"


@needs_chromium
def test_page_on_a_phone_opens_panels_in_front_and_settings_as_a_sheet(page, client, stub):
    cid = client.new_conversation("Pinned one")
    client.chat(cid, "hi")
    client.put(f"/api/conversations/{cid}", {"pinned": True})
    client.new_conversation("Another")
    b = page(f"/#/c/{cid}")
    b.do("POST", "/window/rect", {"width": 360, "height": 740})
    try:
        b.wait("return document.querySelectorAll('.msg').length === 2")
        b.click("#menu")
        b.wait("return document.body.classList.contains('nav-open') && "
               "document.getElementById('sidebar').getBoundingClientRect().left === 0")
        b.click("#performance-toggle")                     # in front: the drawer closes
        b.wait("return !document.body.classList.contains('nav-open') && "
               "document.querySelector('#performance td')")
        card = b.js("const td = document.querySelector('#performance td');"
                    "return [getComputedStyle(td).display, td.dataset.label]")
        assert card == ["block", "Model"]                  # a card, its labels beside
        width = b.js("return document.getElementById('performance').scrollWidth")
        assert width <= 360
        b.js("document.getElementById('performance-toggle').click()")    # (in the drawer)
        b.click("#settings-toggle")
        sheet = b.wait("const s = document.getElementById('settings');"
                       "const r = s.getBoundingClientRect();"
                       "const save = s.querySelector('.set-actions .primary').getBoundingClientRect();"
                       "return r.width && [r.top, r.width, save.bottom <= innerHeight]")
        assert sheet[0] == 0 and sheet[1] >= 340 and sheet[2] is True   # Save in sight
        b.click("#settings .close-sheet")
        b.wait("return document.getElementById('settings').classList.contains('hidden')")
        b.click("#menu")
        b.wait("return document.getElementById('sidebar').getBoundingClientRect().left === 0")
        b.click("#select-convs")                            # a pinned one shown twice: one item
        boxes = f"#conv-list li[data-id='{cid}'] .pick-conv"
        b.wait(f"return document.querySelectorAll(\"{boxes}\").length >= 1")
        b.js(f"document.querySelector(\"{boxes}\").click()")
        assert b.js(f"return [...document.querySelectorAll(\"{boxes}\")].every(x => x.checked)")
    finally:
        b.do("POST", "/window/rect", {"width": 1280, "height": 900})


@needs_chromium
def test_page_charts_show_the_busiest_days_and_all_time_on_asking(page, client, stub):
    cid = client.new_conversation()
    for _ in range(12):
        client.chat(cid, "now")                            # this week's replies: most of them
    with sqlite3.connect(client.engine.settings.db) as conn:  # and one imported from 2023
        conn.execute("UPDATE messages SET timestamp = '2023-03-01T10:00:00.000Z' WHERE id = 2")
    client.engine.rank_ledger_soon()
    wait_for(lambda: len(client.get("/api/ledger?group=day")[2]["groups"]) == 2, 10, "2 days")
    b = page("/")
    b.js("document.getElementById('performance-toggle').click()")
    ticks = ("const f = document.querySelector('#performance figure');"
             "return f && f.textContent")
    shown = b.wait(ticks)
    assert "2023-03-01" not in shown                      # clamped to the busy days
    assert b.js("return [...document.querySelectorAll('#performance td')].map("
                "td => td.dataset.label + ': ' + td.textContent).pop()") == \
        "Prompt from cache: 13% of 288"                   # the stub: 3 cached, 21 read, x12
    assert "served from llama.cpp's cache" in b.js(
        "return document.getElementById('performance').textContent")
    b.click("#performance-span")
    b.wait(ticks + " && f.textContent.includes('2023-03-01')")   # all time, on asking
    assert b.js("return document.getElementById('performance-span').textContent") == \
        "Show the busiest days"


@needs_chromium
def test_page_renames_and_deletes_in_place(page, client):
    keep = client.new_conversation("Keep me")
    gone = client.new_conversation("Old name")
    b = page("/")
    b.wait("return document.querySelectorAll('#conv-list .conv').length === 2")
    b.hover(f"#conv-list li[data-id='{gone}']")
    b.click(f"#conv-list li[data-id='{gone}'] button[data-action='rename']")
    b.js("document.querySelector('#conv-list input').value = ''")
    b.type("#conv-list input", "New name\ue007")
    b.wait("return [...document.querySelectorAll('#conv-list .title')]"
           ".some(e => e.textContent === 'New name')")
    assert client.get(f"/api/conversations/{gone}")[2]["conversation"]["title"] == "New name"
    b.hover(f"#conv-list li[data-id='{gone}']")
    b.click(f"#conv-list li[data-id='{gone}'] button[data-action='delete']")
    assert client.get(f"/api/conversations/{gone}")[0] == 200      # not before it is confirmed
    b.click(f"#conv-list li[data-id='{gone}'] button.danger")
    b.wait("return document.querySelectorAll('#conv-list .conv').length === 1")
    assert client.get(f"/api/conversations/{gone}")[0] == 404
    assert client.get(f"/api/conversations/{keep}")[0] == 200


@needs_chromium
def test_page_pins_a_conversation_into_the_pinned_group(page, client):
    keep = client.new_conversation("Keep at hand")
    client.new_conversation("Newer one")
    b = page("/")
    b.wait("return document.querySelectorAll('#conv-list .conv').length === 2")
    b.hover(f"#conv-list li[data-id='{keep}']")
    b.click(f"#conv-list li[data-id='{keep}'] button[data-action='pin']")
    b.wait("return document.querySelector('#conv-list .group')")
    assert client.get("/api/conversations?pinned=true")[2]["conversations"][0]["id"] == keep
    b.go(f"http://127.0.0.1:{client.port}/")
    listed = b.wait("const l = [...document.querySelectorAll('#conv-list > li')];"
                    "return l.length === 5 && l.map(e => e.classList.contains('group') ? "
                    "'[' + e.textContent + ']' : e.querySelector('.title').textContent)")
    assert listed == ["[Pinned]", "Keep at hand", "[Recent]", "Newer one", "Keep at hand"]


@needs_chromium
def test_page_groups_conversations_by_project_and_moves_and_starts_them(page, client, stub):
    pid = new_project(client, "Thesis", system_prompt="Answer as a historian.")
    inside = client.post("/api/conversations", {"title": "Archive notes", "model": MODEL,
                                                 "project_id": pid})[2]["conversation_id"]
    loose = client.new_conversation("Loose one")
    b = page("/")
    listed = ("const l = [...document.querySelectorAll('#conv-list > li')];"
              "return l.map(e => e.classList.contains('group') ? '[' + (e.querySelector('.fold') "
              "|| e).textContent + ']' : e.querySelector('.title').textContent).join('|')")
    assert b.wait(listed + " || ''") == "[Thesis · 1]|Archive notes|[Recent]|Loose one"
    b.click("#conv-list li.project button[data-paction='fold']")          # folds, and stays
    b.wait("return !document.querySelector('#conv-list li[data-id] .title')"
           "  || document.querySelectorAll('#conv-list li.conv').length === 1")
    assert b.js(listed) == "[Thesis · 1]|[Recent]|Loose one"
    b.click("#conv-list li.project button[data-paction='fold']")
    b.hover(f"#conv-list li[data-id='{loose}']")                          # moved by its menu
    b.click(f"#conv-list li[data-id='{loose}'] button[data-action='move']")
    b.js("const s = document.querySelector('#conv-list select');"
         f"s.value = '{pid}'; s.dispatchEvent(new Event('change'));")
    b.wait("return document.querySelector('#conv-list .fold').textContent.endsWith('· 2')")
    assert conversation(client, loose)["conversation"]["project_id"] == pid
    b.click("#conv-list li.project button[data-paction='new']")           # a chat in it
    b.wait("return document.querySelector('#title .in-project')")
    b.click("#settings-toggle")                    # before its first message: the project's
    assert b.wait("const t = document.querySelector('#set-system'); return t && t.placeholder"
                  ) == "Answer as a historian."
    b.click("#settings-toggle")
    b.type("#input", "Where are the 1848 letters?\ue007")
    b.wait("return document.querySelector('.msg.assistant[id^=\"m-\"]:not(.streaming)')")
    made = json.loads(client.engine.store.list_conversations())[0]
    assert made["project_id"] == pid
    assert stub.requests[-1]["body"]["messages"][0]["content"] == "Answer as a historian."
    b.click("#settings-toggle")                     # the project's prompt, shown as inherited
    assert b.wait("const t = document.querySelector('#set-system');"
                  "return t && [t.placeholder, t.parentNode.querySelector('.from').textContent]"
                  ) == ["Answer as a historian.", "project"]
    client.engine.store.add_message(loose, "user", "the harbour ledger")
    other = client.new_conversation("Elsewhere")
    client.engine.store.add_message(other, "user", "the harbour ledger too")
    b.wait("return !document.querySelector('#search-in').classList.contains('hidden')")
    b.js(f"document.querySelector('#search-in').value = '{pid}'")      # search in the project
    b.type("#search", "harbour")
    found = b.wait("const r = [...document.querySelectorAll('#search-results .result')];"
                   "return r.length && r.map(e => e.querySelector('.where').textContent)")
    assert found == ["Loose one · user"]


@needs_chromium
def test_page_mentions_a_conversation_with_at(page, client, stub):
    trip = client.new_conversation("Trip to Lisbon")
    client.engine.store.add_message(trip, "user", "The train to Sintra leaves at 9:40.")
    client.new_conversation("Tax forms")
    cid = client.new_conversation("Packing")
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelector('#model option')")
    b.type("#input", "What to pack for @lis")
    assert b.wait("const l = [...document.querySelectorAll('#mention-list li[role=option]')];"
                  "return l.length && l.map(e => e.textContent)") == ["Trip to Lisbon"]
    b.type("#input", "\ue007")                        # Enter chooses; it does not send
    assert b.wait("const c = document.querySelector('#chips li.mention');"
                  "return c && c.textContent") == "@Trip to Lisbon×"
    assert b.js("return document.querySelector('#input').value") == "What to pack for "
    assert rows(client, "SELECT count(*) FROM messages WHERE conversation_id = ?", cid) == [(0,)]
    b.type("#input", "the day trip?\ue007")
    b.wait("return document.querySelector('.msg.assistant[id^=\"m-\"]:not(.streaming)')")
    sent_body = stub.requests[-1]["body"]
    assert "“Trip to Lisbon” (a conversation the user mentions): User: The train to Sintra" \
        in sent_body["messages"][0]["content"]
    assert sent_body["messages"][-1] == user("What to pack for the day trip?")
    assert b.js("return document.querySelector('#chips').classList.contains('hidden')")


@needs_chromium
def test_page_reads_an_older_history_while_it_is_migrated(browser, tmp_path, stub, monkeypatch):
    with migrating(tmp_path, stub, monkeypatch) as (server, held):
        browser.go(f"http://127.0.0.1:{server.server_address[1]}/#/c/2")
        assert browser.wait("const l = [...document.querySelectorAll('#conv-list .conv .title')];"
                            "return l.length === 3 && l.map(e => e.textContent)") == [
            "Old chat 2", "Old chat 1", "Old chat 0"]
        assert browser.wait("const s = document.querySelector('#starting');"
                            "return s.classList.contains('reading') && !s.classList.contains("
                            "'hidden') && s.textContent.includes('migrating')")
        assert browser.wait("return [...document.querySelectorAll('#messages .msg')].map("
                            "m => m.querySelector('.body, .content, p').textContent)"
                            ".join('|').includes('legacy message 1-3 about volcanoes')")
        held.set()
        browser.wait("return document.querySelector('#starting').classList.contains('hidden')",
                     timeout=30)
        browser.go("about:blank")


@needs_chromium
def test_page_chats_during_a_first_start(browser, tmp_path, stub, monkeypatch):
    """A conversation of the older history continued, and a new one begun,
    while it is migrated: answered at once, and kept once it is done."""
    with migrating(tmp_path, stub, monkeypatch) as (server, held):
        browser.go(f"http://127.0.0.1:{server.server_address[1]}/#/c/2")
        browser.wait("return document.querySelector('#starting').classList.contains('reading')"
                     " && document.querySelectorAll('#messages .msg').length === 4")
        assert "continued meanwhile" in browser.js(
            "return document.querySelector('#starting').textContent")
        browser.wait("return document.querySelectorAll('#model option').length > 0")
        browser.type("#input", "Asked while it migrates")
        browser.click("#send")
        browser.wait("return [...document.querySelectorAll('.msg.assistant:not(.streaming) .body')]"
                     ".some(e => e.textContent.includes('Machine learning')) && "
                     "document.querySelectorAll('#messages .msg').length === 6")
        assert not server.engine.ready.is_set()
        time.sleep(0.5)                         # what the page asks after a reply: no refusal
        assert browser.js("const t = document.querySelector('#toast');"
                          "return t.classList.contains('hidden') ? '' : t.textContent") == ""
        sent = [r for r in stub.requests if r["path"] == "/v1/chat/completions"]
        assert sent[-1]["body"]["messages"][-1]["content"] == "Asked while it migrates"
        assert "legacy message 1-3" in sent[-1]["body"]["messages"][-2]["content"]
        assert browser.js("return document.querySelector('#input').value") == ""
        browser.click("#new-chat")
        browser.type("#input", "A new one meanwhile")
        browser.click("#send")
        browser.wait("return document.querySelector('#conv-list .conv .title').textContent"
                     " === 'A new one meanwhile'")
        assert not server.engine.ready.is_set()
        held.set()
        browser.wait("return document.querySelector('#starting').classList.contains('hidden')",
                     timeout=30)
        c = Client(server)
        listed = c.get("/api/conversations")[2]["conversations"]
        assert [x["title"] for x in listed][:2] == ["A new one meanwhile", "Old chat 1"]
        assert [m["content"] for m in c.get(f"/api/conversations/{listed[0]['id']}")[2][
            "messages"]] == ["A new one meanwhile", stub.reply]
        assert [m["content"] for m in c.get("/api/conversations/2")[2]["messages"]][-2:] == [
            "Asked while it migrates", stub.reply]
        browser.go("about:blank")


@needs_chromium
def test_page_makes_and_edits_a_project(page, client):
    b = page("/")
    b.click("#new-project")
    b.type(".project-form input", "Garden")
    b.type(".project-form textarea", "You know plants.")
    b.click(".project-form button.primary")
    b.wait("return document.querySelector('#conv-list li.project')")
    assert [(p["name"], p["system_prompt"]) for p in client.get("/api/projects")[2][
        "projects"]] == [("Garden", "You know plants.")]
    b.click("#conv-list li.project button[data-paction='edit']")
    b.js("document.querySelector('.project-form input').value = ''")
    b.type(".project-form input", "Kitchen garden")
    b.click(".project-form button.primary")
    b.wait("return document.querySelector('#conv-list .fold') && document.querySelector("
           "'#conv-list .fold').textContent.startsWith('Kitchen garden')")
    b.click("#conv-list li.project button[data-paction='edit']")
    b.click(".project-form button.danger")
    b.click(".project-form button.danger")                             # asked twice
    b.wait("return !document.querySelector('#conv-list li.project') "  # its form replaced it
           "&& !document.querySelector('.project-form')")
    assert client.get("/api/projects")[2]["projects"] == []


@needs_chromium
def test_page_marks_api_conversations_and_shows_tool_calls_compactly(page, client, stub):
    openai = OpenAIClient(client.port)
    stub.tool_calls = [{"id": "call_7", "type": "function", "function": {
        "name": "lookup", "arguments": '{"q": "<img src=x onerror=alert(1)>"}'}}]
    _, headers, _, _ = openai.create([user("Look it up")])
    cid = int(headers["X-Conversation-Id"])
    stub.tool_calls = None
    openai.create([user("Look it up"), {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_7", "type": "function", "function": {
            "name": "lookup", "arguments": '{"q": "<img src=x onerror=alert(1)>"}'}}]},
        {"role": "tool", "tool_call_id": "call_7", "content": "found <b>it</b>"}])
    client.new_conversation("From the page")
    b = page(f"/#/c/{cid}")
    badges = b.wait("const l = [...document.querySelectorAll('#conv-list .conv')];"
                    "return l.length === 2 && l.map(e => !!e.querySelector('.badge'))")
    assert badges == [True, False] or badges == [False, True]
    assert b.js(f"return !!document.querySelector('#conv-list li[data-id=\"{cid}\"] .badge')")
    call = b.wait("const c = document.querySelector('.msg.assistant .calls li');"
                  "return c && c.textContent")
    assert call == 'Calls lookup{"q": "<img src=x onerror=alert(1)>"}'
    tool = b.wait("const d = document.querySelector('.msg.tool details, .msg.tool');"
                  "return d && d.querySelector('summary').textContent")
    assert tool == "Tool result · call_7"
    assert b.js("return document.querySelector('.msg.tool pre').textContent") == "found <b>it</b>"
    assert b.js("return document.querySelectorAll('img, .msg b').length") == 0
    b.click("#stats-toggle")
    details = b.wait("const d = document.querySelector('#stats dl');"
                     "return d && d.textContent.includes('Client') && d.textContent")
    assert "OpenAI/Python 1.54.0" in details


@needs_chromium
def test_page_imports_a_dropped_file_and_exports_a_conversation(page, client, stub):
    b = page("/")
    b.wait("return document.querySelector('.empty')")
    b.js("""const file = new File([arguments[0]], 'conversations.json', {type: 'application/json'});
            const data = new DataTransfer(); data.items.add(file);
            document.getElementById('sidebar').dispatchEvent(
              new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));""",
         json.dumps(CHATGPT))
    toast = b.wait("const t = document.getElementById('toast').textContent;"
                   "return t.includes('imported') && t")
    assert "imported 1 conversations, 5 messages; 0 skipped" in toast
    b.wait("return [...document.querySelectorAll('#conv-list .title')]"
           ".some(t => t.textContent === 'Plot a sine')")
    b.click("#conv-list .conv .open")
    b.wait("return document.querySelectorAll('#messages .msg').length === 3")
    b.click("#stats-toggle")
    b.wait("return document.querySelector('#stats .exports button')")
    b.js("window.saved = []; HTMLAnchorElement.prototype.click = function () {"
         "  window.saved.push(this.getAttribute('href')); };")
    b.js("document.querySelector('#stats .exports button').click()")
    href = b.wait("return window.saved.length && window.saved[0]")   # a navigation: streamed
    assert re.fullmatch(r"/api/conversations/\d+/export\?format=md", href)
    status, headers, text = client.request("GET", href)
    assert 'filename="Plot-a-sine.md"' in headers["Content-Disposition"]
    assert text.decode().startswith("# Plot a sine\n") and "Here is a plot." in text.decode()
    b.js("""const file = new File([arguments[0]], 'odd.json', {type: 'application/json'});
            const data = new DataTransfer(); data.items.add(file);
            document.getElementById('sidebar').dispatchEvent(
              new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));""",
         json.dumps([dict(CHATGPT[0], conversation_id="w", title=["x"])]))
    toast = b.wait("const t = document.getElementById('toast').textContent;"
                   "return t.includes('odd.json') && t.includes('imported') && t")
    assert "1 values cut or left out (conversation 1 (w): title is not text)" in toast


@needs_chromium
def test_page_shows_the_ledger_per_model_with_a_chart_per_day(page, client, stub):
    cid = client.new_conversation()
    client.chat(cid, "one")
    client.chat(cid, "two", model="other-model.gguf")
    b = page("/")
    b.click("#performance-toggle")
    cells = b.wait("const r = [...document.querySelectorAll('#performance tbody tr')];"
                   "return r.length === 2 && r.map(t => [...t.children].map(c => c.textContent))")
    speed = f"{len(stub.tokens()) / (len(stub.tokens()) * 20.0) * 1000:.0f}"     # from timings
    assert sorted(row[:5] for row in cells) == sorted([
        [MODEL, "1", str(len(stub.tokens())), f"{speed}, {speed}", "700"],
        ["other-model.gguf", "1", str(len(stub.tokens())), f"{speed}, {speed}", "700"]])
    assert all(re.fullmatch(r"[\d.,]+, [\d.,]+", row[5]) for row in cells), cells   # ttft
    legend = b.js("return [...document.querySelectorAll('#performance svg')[0]"
                  ".querySelectorAll('text:not(.tick)')].map(t => t.textContent)")
    assert sorted(legend) == sorted([MODEL[:18], "other-model.gguf"])
    assert b.js("return document.querySelectorAll('#performance svg')[0]"
                ".querySelectorAll('polyline').length") == 2
    stub.token_delay = 0.002
    for _ in range(2):
        read_events(client.stream(cid, "streamed", model=MODEL)[0])
    b.click("#performance-toggle")
    b.click("#performance-toggle")
    spread = b.wait("const s = [...document.querySelectorAll('#performance svg')].pop();"
                    "return s && [s.querySelectorAll('polyline').length,"
                    "[...s.querySelectorAll('text.tick')].map(t => t.textContent)]")
    assert spread[0] == 2 and re.fullmatch(r"< [\d,]+ ms", spread[1][-1]), spread   # 2 models


@needs_chromium
def test_page_shows_the_next_prompt_as_sent_and_as_templated(page, client, stub):
    cid = client.new_conversation()
    client.chat(cid, "Tell me <b>about</b> owls")
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelectorAll('#messages .msg').length === 2")
    b.click("#prompt-toggle")
    summary = b.wait("const p = document.querySelector('#prompt p');"
                     "return p && p.textContent")
    assert summary.startswith("Next prompt: 2 messages, ") and "of 4096" in summary
    items = b.js("return [...document.querySelectorAll('#prompt li')].map(l => l.textContent)")
    assert items == ["system: You are a helpful, concise assistant.",
                     "user: Tell me <b>about</b> owls", f"assistant: {stub.reply}"]
    assert "<user>Tell me <b>about</b> owls" in b.js(
        "return document.querySelector('#prompt pre').textContent")
    assert b.js("return document.querySelectorAll('#prompt b').length") == 0


@needs_chromium
def test_page_gauges_the_next_prompt_as_the_user_types(page, client, stub):
    cid = client.new_conversation()
    client.chat(cid, "a question of six words here")
    b = page(f"/#/c/{cid}")
    first = b.wait("const g = document.getElementById('gauge').textContent;"
                   "return g.includes('tokens') && g")
    b.type("#input", "and three more")
    later = b.wait("const g = document.getElementById('gauge').textContent;"
                   "return g.includes('tokens') && g !== arguments[0] && g", first)
    count = lambda text: int(re.search(r"Next prompt: ([\d,]+) / 4,096 tokens", text)
                             .group(1).replace(",", ""))
    assert count(later) - count(first) == len("and three more".split()) + 3   # the stub's count
    stub.n_ctx = 20                                   # smaller than the history now
    client.engine.upstream._contexts.clear()
    b.type("#input", " again")
    assert b.wait("const g = document.getElementById('gauge');"
                  "return g.textContent.includes('left out') && g.className") == "gauge full"


@needs_chromium
def test_page_sets_the_temperature_of_one_chat(page, client, stub):
    cid = client.new_conversation("Stories")
    other = client.new_conversation("Code")
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelector('.empty')")
    b.click("#settings-toggle")
    placeholder = b.wait("const i = document.getElementById('set-temperature');"
                         "return i && i.placeholder")
    assert placeholder == "0.1"                          # the config's, shown as the default
    theirs = b.wait("const t = document.querySelector('#set-temperature')"
                    ".parentNode.querySelector('.theirs'); return t && t.textContent")
    assert theirs == "llama.cpp: 0.6"          # llama-server's, from /props?model= (the chosen one)
    b.type("#set-temperature", "1.2")
    b.js("document.getElementById('set-system').value = 'You tell stories.'")
    b.click("#settings .set-actions .primary")
    b.wait("const r = document.querySelector('#set-temperature');"
           "return r && r.value === '1.2' && r.parentNode.querySelector('.from').textContent"
           " === 'this chat'")
    b.type("#input", "once upon\ue007")
    b.wait("return document.querySelector('.msg.assistant[id^=\"m-\"]:not(.streaming)')")
    sent_body = stub.requests[-1]["body"]
    assert sent_body["temperature"] == 1.2
    assert sent_body["messages"][0] == {"role": "system", "content": "You tell stories."}
    assert client.get(f"/api/conversations/{other}")[2]["conversation"]["options"] is None


@needs_chromium
def test_page_saves_only_the_settings_edited_and_keeps_stop_strings_whole(page, client, stub):
    cid = client.new_conversation("Recorded", model=MODEL)
    client.put(f"/api/conversations/{cid}", {"system_prompt": "",
                                             "options": {"stop": ["\n\nHuman:", "a\\b"],
                                                         "top_k": 5}})
    before = rows(client, "SELECT system_prompt, options FROM conversations WHERE id = ?", cid)
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelector('.empty')")
    b.click("#settings-toggle")
    shown = b.wait("const s = document.getElementById('set-stop'); return s && s.value")
    assert shown == "\\n\\nHuman:\na\\\\b"                  # escaped, one a line
    assert b.js("return document.getElementById('set-no-system').checked") is True
    b.click("#settings .set-actions .primary")              # a Save with nothing edited
    b.wait("return document.getElementById('toast').textContent.includes('Nothing was changed')")
    assert rows(client, "SELECT system_prompt, options FROM conversations WHERE id = ?",
                cid) == before
    b.type("#set-temperature", "0.7")                       # one edit: the rest as it was
    b.click("#settings .set-actions .primary")
    b.wait("return document.getElementById('toast').textContent.includes('saved')")
    c = client.get(f"/api/conversations/{cid}")[2]["conversation"]
    assert c["system_prompt"] == "" and c["options"] == {"stop": ["\n\nHuman:", "a\\b"],
                                                         "top_k": 5, "temperature": 0.7}
    for typed, kept in (("off", False), ("256", 256), ("on", True)):   # thinking
        b.wait("const t = document.getElementById('set-thinking');"
               "return t && t.value === t.dataset.initial")      # drawn again after a save
        b.js("document.getElementById('set-thinking').value = ''")
        b.type("#set-thinking", typed)
        b.click("#settings .set-actions .primary")
        wait_for(lambda: client.get(f"/api/conversations/{cid}")[2]["conversation"][
            "options"].get("thinking") == kept, 10, f"thinking {typed}")
        b.wait(f"return document.getElementById('set-thinking').dataset.initial === '{typed}'")


@needs_chromium
def test_page_sets_settings_before_the_first_message(page, client, stub):
    b = page("/")
    b.wait("return document.querySelector('#model option')")
    b.click("#settings-toggle")
    b.wait("return document.getElementById('set-temperature')")
    b.type("#set-temperature", "0.3")
    b.click("#settings .set-actions .primary")
    b.wait("return location.hash.startsWith('#/c/')")
    cid = int(b.js("return location.hash.split('/')[2]"))
    assert client.get(f"/api/conversations/{cid}")[2]["conversation"]["options"] == {
        "temperature": 0.3}
    b.type("#input", "hello\ue007")
    b.wait("return document.querySelector('.msg.assistant[id^=\"m-\"]:not(.streaming)')")
    assert stub.requests[-1]["body"]["temperature"] == 0.3
    assert len(client.get("/api/conversations")[2]["conversations"]) == 1


@needs_chromium
def test_page_theme_choice_is_kept(page, client):
    b = page("/")
    b.wait("return document.querySelector('#model option')")
    background = "return getComputedStyle(document.body).backgroundColor"
    b.js("const t = document.getElementById('theme'); t.value = 'dark';"
         "t.dispatchEvent(new Event('change'))")
    assert b.js(background) == "rgb(22, 24, 28)"
    b.go(f"http://127.0.0.1:{client.port}/")
    b.wait("return document.querySelector('#model option')")
    assert b.js(background) == "rgb(22, 24, 28)" and b.js(
        "return document.getElementById('theme').value") == "dark"
    b.js("const t = document.getElementById('theme'); t.value = 'light';"
         "t.dispatchEvent(new Event('change'))")
    assert b.js(background) == "rgb(255, 255, 255)"
    b.js("localStorage.removeItem('llama-chat.theme')")


@needs_chromium
def test_page_highlights_code_and_leaves_other_languages_plain(page, client):
    store = client.engine.store
    cid = store.create_conversation("code", MODEL)
    store.add_message(cid, "user", "show me")
    fences = {
        "python": 'def f(x):  # a comment\n    return "text" + 42',
        "js": "const x = `tpl`; // note\nlet y = 0x1F;",
        "sql": "SELECT name FROM t WHERE id = 'a' -- why",
        "brainfuck": "def const select 42 \"x\"",
        "html": '<div class="a"><!-- c --></div>',
        "bash": HOSTILE[0] + "\necho 'hi' # " + HOSTILE[1],
    }
    reply = "\n\n".join(f"```{lang}\n{code}\n```" for lang, code in fences.items())
    store.add_message(cid, "assistant", reply, MODEL, finish_reason="stop")
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelectorAll('.codeblock').length === 6")
    found = b.js("""return [...document.querySelectorAll('.codeblock code')].map((c) =>
        [...c.querySelectorAll('span')].map((s) => s.className.slice(4) + ':' + s.textContent))""")
    python, js, sql, plain, html, bash = found
    assert python == ["keyword:def", "comment:# a comment", "keyword:return", 'string:"text"',
                      "number:42"]
    assert js == ["keyword:const", "string:`tpl`", "comment:// note", "keyword:let",
                  "number:0x1F"]
    assert sql == ["keyword:SELECT", "keyword:FROM", "keyword:WHERE", "string:'a'",
                   "comment:-- why"]
    assert plain == []
    assert html[:2] == ["keyword:<div", 'string:"a"'] and "comment:<!-- c -->" in html
    texts = b.js("return [...document.querySelectorAll('.codeblock code')].map(c => c.textContent)")
    assert texts == list(fences.values())                  # the text itself, unchanged
    assert b.js(INERT_CHECK) == []


@needs_chromium
def test_page_deletes_several_conversations_at_once(page, client):
    ids = [client.new_conversation(t) for t in ("one", "two", "three")]
    b = page("/")
    b.wait("return document.querySelectorAll('#conv-list .conv').length === 3")
    b.click("#select-convs")
    for cid in ids[:2]:
        b.click(f"#conv-list li[data-id='{cid}'] .pick-conv")
    b.wait("return document.querySelector('#selection-bar .danger').textContent === 'Delete 2'")
    b.click("#selection-bar .danger")
    assert len(client.get("/api/conversations")[2]["conversations"]) == 3   # asked first
    b.click("#selection-bar .danger")
    b.wait("return document.querySelectorAll('#conv-list .conv').length === 1")
    assert [c["id"] for c in client.get("/api/conversations")[2]["conversations"]] == [ids[2]]


@needs_chromium
def test_page_keyboard_shortcuts_and_labels(page, client):
    b = page("/")
    b.wait("return document.querySelector('#model option')")
    b.js("document.body.focus()")
    b.do("POST", "/actions", {"actions": [{"type": "key", "id": "k", "actions": [
        {"type": "keyDown", "value": "\ue009"}, {"type": "keyDown", "value": "k"},
        {"type": "keyUp", "value": "k"}, {"type": "keyUp", "value": "\ue009"}]}]})
    assert b.js("return document.activeElement.id") == "search"
    unlabeled = b.js("""return [...document.querySelectorAll('input, select, textarea, button')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                     && !e.textContent.trim() && !e.title).map(e => e.outerHTML)""")
    assert unlabeled == []
    assert b.js("return document.getElementById('messages').getAttribute('aria-live')") == \
        "polite"


@needs_chromium
def test_page_stats_draws_two_charts(page, client):
    cid = client.new_conversation()
    for i in range(3):
        client.chat(cid, f"question {i}")
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelectorAll('.msg.assistant').length === 3")
    b.click("#stats-toggle")
    charts = b.wait("const c = document.querySelectorAll('#stats svg.chart');"
                    "return c.length === 2 && [...c].map(s => s.querySelectorAll('rect').length)")
    assert charts == [3, 3]
    assert b.js("return document.querySelector('#stats dd').textContent") == "6"
    ticks = b.js("return [...document.querySelectorAll('#stats svg.chart')[1]"
                 ".querySelectorAll('.tick')].map(t => t.textContent)")
    assert ticks == ["0", "21.3", "42.5", "reply 1", "reply 3"]   # the scale, then the replies


@needs_chromium
def test_page_takes_the_key_from_the_link_and_asks_again_after_401(browser, tmp_path, stub, launch):
    server = launch(stub.url, api_key="page-key")
    c = Client(server)
    c.get("/api/conversations", headers={"Authorization": "Bearer page-key"})
    c.request("POST", "/api/conversations", {"title": "Secret chat", "model": MODEL},
              headers={"Authorization": "Bearer page-key"})
    browser.go(f"http://127.0.0.1:{c.port}/#token=page-key")
    browser.wait("return document.querySelector('#conv-list .title')")
    assert browser.js("return location.hash") == ""
    assert browser.js("return localStorage.getItem('llama-chat.key')") == "page-key"
    browser.js("localStorage.setItem('llama-chat.key', 'stale')")
    browser.go(f"http://127.0.0.1:{c.port}/")
    browser.wait("return !document.getElementById('keyform').classList.contains('hidden')")
    browser.type("#key-input", "page-key\ue007")
    title = browser.wait("const t = document.querySelector('#conv-list .title');"
                         "return t && t.textContent")
    assert title == "Secret chat"
    browser.js("window.saved = []; HTMLAnchorElement.prototype.click = function () {"
               "  window.saved.push(this.getAttribute('href')); };")
    browser.click("#export-all")                 # the key cannot go on a navigation: a ticket
    href = browser.wait("return window.saved.length && window.saved[0]")
    assert href.startswith("/api/downloads/")
    status, _, everything = c.request("GET", href)       # no key: the ticket is one, once
    assert status == 200 and everything["conversations"][0]["conversation"]["title"] == \
        "Secret chat"
    assert c.request("GET", href)[0] == 404
    browser.js("localStorage.clear()")


@needs_chromium
def test_page_shows_router_model_status_until_loaded(page, client, stub):
    stub.router = True
    stub.router_status = "loading"
    b = page("/")
    options = b.wait("const o = [...document.querySelectorAll('#model option')]"
                     ".map(e => e.textContent); return o.length && o")
    assert options == ["gemma-3-270m (loading)", "qwen3-0.6b (unloaded)"]
    stub.router_status = "loaded"
    b.wait("return document.querySelector('#model option').textContent === 'gemma-3-270m'",
           timeout=10)


@needs_chromium
def test_page_shows_a_banner_when_llamacpp_is_down(browser, down_client):
    browser.go(f"http://127.0.0.1:{down_client.port}/")
    text = browser.wait("const b = document.getElementById('banner');"
                        "return !b.classList.contains('hidden') && b.textContent")
    port = down_client.engine.settings.llamacpp_url.rsplit(":", 1)[1]
    assert "not reachable" in text and "Connection refused" in text
    assert f"llama-server -m model.gguf --port {port}" in text


@needs_chromium
@pytest.mark.parametrize("last_exit, words", [
    (3, ["exited with status 3 (restarted 2 times)", "Its last line: <b>bad magic</b>",
         "Its log: /data/chat.db.llama-server.log"]),
    (None, ["is starting at"]),
])
def test_page_shows_why_the_started_llama_server_is_down(browser, down_client, last_exit, words):
    down_client.engine.managed = types.SimpleNamespace(as_dict=lambda: {
        "pid": None if last_exit else 4242, "running": last_exit is None, "restarts": 2,
        "log": "/data/chat.db.llama-server.log", "command": "llama-server -m m.gguf",
        "last_exit": last_exit, "last_log_line": "<b>bad magic</b>"})
    browser.go(f"http://127.0.0.1:{down_client.port}/")
    text = browser.wait("const b = document.getElementById('banner');"
                        "return !b.classList.contains('hidden') && b.textContent")
    assert all(w in text for w in words), text
    assert "Start it with" not in text and "started by llama-chat" in text
    assert browser.js("return document.querySelector('#banner b')") is None


@needs_chromium
def test_page_tells_a_loading_model_from_a_server_that_is_down(page, client, stub):
    stub.loading = True
    text = page("/").wait("const b = document.getElementById('banner');"
                          "return !b.classList.contains('hidden') && b.textContent")
    assert "is loading its model" in text and "not reachable" not in text
    health = client.get("/api/health")[2]
    assert (health["status"], health["llamacpp"]["state"]) == ("degraded", "loading")


@needs_chromium
def test_page_shows_what_llamacpp_said_when_a_chat_fails(page, client, stub):
    stub.context_chars = 5           # every prompt is "longer than the context"
    b = page("/")
    b.type("#input", "a question far too long for this model")
    b.click("#send")
    toast = b.wait("const t = document.getElementById('toast');"
                   "return t && !t.classList.contains('hidden') && t.textContent")
    assert "llama.cpp server answered an error" in toast and "exceeds the available context" \
        in toast


def use_tool(b, message, tool):
    """Click a tool of a message (css of its li), as a mouse does: hover first."""
    b.hover(message)
    b.click(f"{message} [data-tool='{tool}']")


def two_turns_in_the_page(page, client, title="Test chat"):
    """A conversation of two questions and replies, open in the page: (browser,
    its id, the first chat's answer)."""
    cid = client.new_conversation(title)
    first = client.chat(cid, "one")[2]
    client.chat(cid, "two")
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelectorAll('.msg .tools').length === 4")
    return b, cid, first


@needs_chromium
def test_page_regenerates_and_steps_between_versions(page, client, stub):
    cid = client.new_conversation()
    stub.reply = "first answer"
    client.chat(cid, "the question")
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelector('.msg.assistant .tools')")
    stub.reply = "second answer"
    use_tool(b, ".msg.assistant", "regenerate")
    count = "(document.querySelector('.msg.assistant .versions .count') || {}).textContent"
    assert b.wait(f"return {count}") == "2/2"
    assert b.js("return document.querySelector('.msg.assistant .body').textContent") == \
        "second answer"
    b.click(".msg.assistant [data-tool='prev']")
    b.wait(f"return ({count}) === '1/2'")
    assert b.js("return document.querySelector('.msg.assistant .body').textContent") == \
        "first answer"
    assert b.js("return document.activeElement.dataset.tool") == "next"      # focus stays
    first_id = b.js("return Number(document.querySelector('.msg.assistant').dataset.id)")
    assert client.get(f"/api/conversations/{cid}")[2]["conversation"][
        "current_message_id"] == first_id                     # through the API: every device
    b.go(f"http://127.0.0.1:{client.port}/#/c/{cid}")
    b.wait(f"return ({count}) === '1/2'")
    b.click(".msg.assistant [data-tool='next']")
    b.wait(f"return ({count}) === '2/2'")
    assert [m["content"] for m in client.get(f"/api/conversations/{cid}")[2]["messages"]] == [
        "the question", "second answer"]
    labels = b.js("return [...document.querySelectorAll('.msg .tools button')]"
                  ".filter(x => !(x.getAttribute('aria-label') || x.textContent.trim()))"
                  ".length")
    assert labels == 0


@needs_chromium
def test_page_marks_a_message_edited_in_place(page, client, stub):
    cid = client.new_conversation()
    q = client.chat(cid, "first words")[2]
    client.put(f"/api/messages/{q['user_message_id']}", {"content": "better words"})
    client.put(f"/api/messages/{q['message_id']}", {"content": "A better reply."})
    client.chat(cid, "untouched")
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelectorAll('#messages .msg').length === 4")
    marks = b.js("return [...document.querySelectorAll('#messages .msg')]"
                 ".map(x => !!x.querySelector('.edited'))")
    assert marks == [True, True, False, False]


@needs_chromium
def test_page_edits_a_question_into_a_branch_and_in_place(page, client, stub):
    cid = client.new_conversation()
    client.chat(cid, "old question")
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelector('.msg.user .tools')")
    use_tool(b, ".msg.user", "edit")
    b.js("document.querySelector('.edit-box').value = ''")
    b.type(".edit-box", "new question\ue007")                 # Enter sends, as a branch
    b.wait("const c = document.querySelector('.msg.user .versions .count');"
           "return c && c.textContent === '2/2' && !document.querySelector('.streaming')")
    every = client.get(f"/api/conversations/{cid}?branches=all")[2]["messages"]
    assert [m["content"] for m in every] == ["old question", stub.reply, "new question",
                                             stub.reply]
    use_tool(b, ".msg.assistant", "edit")
    b.js("document.querySelector('.edit-box').value = 'fixed by hand'")
    b.click(".edit-row button:nth-child(1)")                   # a reply: Save only
    b.wait("const m = document.querySelector('.msg.assistant .body');"
           "return m && m.textContent === 'fixed by hand'")
    messages = client.get(f"/api/conversations/{cid}")[2]["messages"]
    assert messages[1]["content"] == "fixed by hand" and messages[1]["edited_at"]
    assert rows(client, "SELECT count(*) FROM messages") == [(4,)]


@needs_chromium
def test_page_deletes_a_message_after_saying_what_goes_with_it(page, client, stub):
    b, cid, first = two_turns_in_the_page(page, client)
    use_tool(b, f"#m-{first['message_id']}", "delete")
    ask = b.wait(f"const a = document.querySelector('#m-{first['message_id']} .ask');"
                 "return a && a.textContent")
    assert ask == "Delete this message and the 2 below it?"
    assert rows(client, "SELECT count(*) FROM messages") == [(4,)]   # not before it is confirmed
    b.click(f"#m-{first['message_id']} button.danger")
    b.wait("return document.querySelectorAll('#messages .msg').length === 1")
    assert [r[0] for r in rows(client, "SELECT content FROM messages")] == ["one"]


@needs_chromium
def test_page_opens_a_search_result_on_another_branch(page, client, stub):
    cid = client.new_conversation()
    first = client.chat(cid, "plain question")[2]
    stub.reply = "an answer about zeppelins"
    old = regenerate(client, cid, first["user_message_id"])[2]
    stub.reply = "a newer answer"
    regenerate(client, cid, first["user_message_id"])
    b = page("/")
    b.wait("return document.querySelector('#model option')")
    b.js("document.getElementById('search').value = 'zeppelins'; "
         "document.getElementById('search').dispatchEvent(new Event('input'))")
    b.wait("return document.querySelector('#search-results .result button')")
    b.click("#search-results .result button")
    b.wait(f"return document.querySelector('#m-{old['message_id']}.flash')")
    assert b.js("return document.querySelector('.msg.assistant .versions .count')"
                ".textContent") == "2/3"


@needs_chromium
def test_page_continues_a_reply_cut_at_the_token_limit(page, client, stub):
    cid = client.new_conversation()
    stub.reply, stub.finish_reason = "The start", "length"
    client.chat(cid, "write a lot")
    stub.reply, stub.finish_reason = " and the end.", "stop"
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelector('.msg.assistant.length [data-tool=\"continue\"]')")
    use_tool(b, ".msg.assistant", "continue")
    b.wait("const m = document.querySelector('.msg.assistant');"
           "return m.querySelector('.body').textContent === 'The start and the end.' "
           "&& !m.classList.contains('streaming') && !m.classList.contains('length')")
    assert b.js("return document.querySelectorAll('.msg.assistant').length") == 1
    assert not b.js("return document.querySelector('[data-tool=\"continue\"]')")


@needs_chromium
def test_page_keeps_hostile_text_inert_when_edited_and_regenerated(page, client, stub):
    cid = client.new_conversation()
    client.chat(cid, "hello")
    stub.reply = " ".join(HOSTILE)
    b = page(f"/#/c/{cid}")
    b.wait("return document.querySelector('.msg.assistant .tools')")
    use_tool(b, ".msg.assistant", "regenerate")
    b.wait("return document.querySelector('.msg.assistant .versions')")
    use_tool(b, ".msg.user", "edit")
    b.js("document.querySelector('.edit-box').value = arguments[0]", "\n".join(HOSTILE))
    b.click(".edit-row .primary")
    b.wait("const c = document.querySelector('.msg.user .versions .count');"
           "return c && c.textContent === '2/2' && !document.querySelector('.streaming')")
    assert b.js(INERT_CHECK) == []


@needs_chromium
def test_page_forks_at_a_message(page, client, stub):
    b, cid, first = two_turns_in_the_page(page, client, "Source")
    use_tool(b, f"#m-{first['message_id']}", "fork")
    b.wait(f"return location.hash !== '#/c/{cid}' && "
           "document.querySelectorAll('#messages .msg').length === 2")
    assert b.js("return document.getElementById('title').textContent") == "Source (fork)"


###############################################################################
# Benchmarks (opt-in): LLAMA_CHAT_BENCH=1 python3 -m pytest -k bench -s
###############################################################################

bench = pytest.mark.skipif(os.environ.get("LLAMA_CHAT_BENCH") != "1",
                           reason="benchmarks are opt-in: LLAMA_CHAT_BENCH=1 python3 -m pytest "
                                  "-k bench -s")
COMMON = ("the of and to a in is that it for on with as are this be by you can or from an not "
          "use your have will more which when one all about if how do what").split()
TOPICS = ("python model data learning machine server memory search query index database network "
          "token stream error cache thread process file request response function value system "
          "version update config install build test example question answer").split()


def bench_corpus(count, seed=7):
    """Messages of ~400 characters: common words, topic words and a long tail of rare ones."""
    import random
    rng = random.Random(seed)
    rare = [f"{rng.choice('bcdfghjklmnpqrstvwz')}{rng.choice('aeiou')}{rng.choice('lmnrst')}"
            f"{rng.choice('aeiou')}{i}x" for i in range(20000)]
    pool = []
    for _ in range(20000):
        words = [rng.choice(COMMON) if rng.random() < 0.55 else rng.choice(TOPICS)
                 if rng.random() < 0.8 else rare[int(rng.paretovariate(1.1)) % len(rare)]
                 for _ in range(rng.randrange(8, 16))]
        pool.append(" ".join(words).capitalize() + ".")
    for _ in range(count):
        yield " ".join(rng.choices(pool, k=5))


CJK_POOL = ("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着"
            "去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主"
            "行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二"
            "理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走"
            "电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市"
            "眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提"
            "感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它"
            "许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青"
            "管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步"
            "完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持"
            "取设始版双历越史商千片容研像找友孩站广改议形委早房音火际则首单据导影失拿网香似斯"
            "专石若兵弟谁校读志飞观争究包组造落视济喜离虽坏兴切器习")


def mixed_corpus(count, seed=11):
    """Messages of the benchmark's English sentences, a third of them with a
    Chinese passage of 20-60 characters (common characters most often)."""
    import random
    rng = random.Random(seed)
    english = bench_corpus(count, seed)
    for i in range(count):
        text = next(english)
        if i % 3 == 0:
            text = "".join(CJK_POOL[int(rng.paretovariate(0.8)) % len(CJK_POOL)]
                           for _ in range(rng.randrange(20, 60))) + " " + text[:200]
        yield text


def build_database(path, messages, per_conversation=50, corpus=None):
    """A database of `messages` messages, inserted in bulk with the index built
    once afterwards (as a migration does). Returns the seconds it took."""
    started = time.monotonic()
    store = llama_chat.Store(path)
    conn = store.db.conn()
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' "
                                "AND name LIKE 'search%'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    now = llama_chat.now_iso()
    conversations = (messages + per_conversation - 1) // per_conversation
    conn.execute("BEGIN")
    conn.execute("INSERT INTO writing_in_bulk (name) VALUES ('build')")   # as an import does
    conn.executemany("INSERT INTO conversations (id, title, model, created_at, updated_at) "
                     "VALUES (?, ?, 'm', ?, ?)",
                     ((c + 1, f"Conversation {c} about {TOPICS[c % len(TOPICS)]}", now, now)
                      for c in range(conversations)))
    rng = random.Random(3)
    models = [("llama-3.2-3b", 24.0, 300.0), ("qwen3-8b", 9.0, 120.0), ("gemma-3-270m", 80.0, 900.0)]
    start = time.time() - 365 * 86400

    def reply(i, text):             # a year of replies by three models, llama.cpp's timings
        if i % 2 == 0:
            return ("user", None, None, None, None, None, None, None, None)
        model, speed, reading = models[(i // per_conversation) % 3]
        day = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(
            start + i * 365 * 86400 / messages))
        predicted, prompt = len(text) // 4, rng.randint(20, 2000)
        return ("assistant", model, day, prompt, predicted * 1000 / (speed * rng.uniform(0.7, 1.2)),
                prompt, prompt * 1000 / (reading * rng.uniform(0.5, 1.5)),
                predicted, rng.lognormvariate(5.5, 0.8))
    conn.executemany(                      # each conversation a chain (ids from 1)
        "INSERT INTO messages (id, conversation_id, parent_id, role, content, timestamp, "
        "estimated_tokens, response_time_ms, finish_reason, model, prompt_tokens, "
        "predicted_ms, prompt_n, prompt_ms, predicted_n, ttft_ms) "
        "VALUES (?, ?, ?, ?, ?, coalesce(?, ?), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ((i + 1, i // per_conversation + 1, i if i % per_conversation else None,
          role, text, day, now, len(text) // 4, (None, 900)[i % 2], (None, "stop")[i % 2],
          model, prompt, predicted_ms, prompt_n, prompt_ms, predicted_n, ttft)
         for i, text in enumerate((corpus or bench_corpus)(messages))
         for role, model, day, prompt, predicted_ms, prompt_n, prompt_ms, predicted_n, ttft
         in [reply(i, text)]))
    conn.execute("UPDATE conversations SET current_message_id = min(id * ?, ?)",
                 (per_conversation, messages))
    conn.execute("DELETE FROM writing_in_bulk")
    conn.execute("COMMIT")
    store.close()
    llama_chat.Store(path).close()         # its triggers are missing: it builds the index
    return time.monotonic() - started


def search_answers(app, q="volcanoes"):
    """Seconds from the app's start until search answered (its index built
    in the background meanwhile): it finds 5 results."""
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=30)
    while True:
        conn.request("GET", f"/api/search?q={q}&limit=5")
        resp = conn.getresponse()
        body = json.loads(resp.read())
        if resp.status == 200:
            assert body["count"] == 5
            return time.perf_counter() - app.started
        assert body["code"] == "STARTING"
        time.sleep(0.1)


@pytest.mark.skipif(not os.environ.get("LLAMA_CHAT_BENCH"), reason="LLAMA_CHAT_BENCH=1")
def test_bench_first_start(tmp_path, stub):
    """The original app's database of LLAMA_CHAT_BENCH_FIRST_START messages
    (1,000,000 unless said): how soon it serves its history, and search."""
    row = bench_row
    bench_heading("first start")
    size = int(os.environ.get("LLAMA_CHAT_BENCH_FIRST_START", "1000000"))
    db = str(tmp_path / "llamacpp_chat.db")
    make_flask_db(db, conversations=size // 50, per_conversation=50)
    app = AppProcess(db, stub.url)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=30)
        chats = []                                 # answered meanwhile: new, continued
        for conversation_id in (None, 1):
            if conversation_id is None:
                conn.request("POST", "/api/conversations", body=json.dumps({"model": MODEL}),
                             headers={"Content-Type": "application/json"})
                conversation_id = json.loads(conn.getresponse().read())["conversation_id"]
            begun = time.perf_counter()
            conn.request("POST", "/api/chat", body=json.dumps({
                "conversation_id": conversation_id, "model": MODEL, "message": "meanwhile?"}),
                headers={"Content-Type": "application/json"})
            assert json.loads(conn.getresponse().read())["success"]
            chats.append((time.perf_counter() - app.started, time.perf_counter() - begun))
        conn.request("GET", "/api/health")
        assert json.loads(conn.getresponse().read())["status"] == "starting"
        while True:                                # read meanwhile; then all of it
            conn.request("GET", "/api/health")
            if json.loads(conn.getresponse().read())["status"] != "starting":
                break
            time.sleep(0.05)
        migrated = time.perf_counter() - app.started
        timed = []
        for _ in range(20):                        # while the index builds
            begun = time.perf_counter()
            conn.request("GET", "/api/conversations?limit=50")
            assert conn.getresponse().read() and True
            timed.append((time.perf_counter() - begun) * 1000)
        searchable = search_answers(app)
        row(f"original app's {size:,}-message database: the list answers (as it was); "
            "the rest (migrated, chats meanwhile merged); search",
            f"{app.startup:.1f} s; {migrated:.1f} s; {searchable:.1f} s", "< 5 s; report; report")
        row("a chat meanwhile answered, after the start (its own time): new; continued",
            "; ".join(f"{at:.2f} s ({took * 1000:.0f} ms)" for at, took in chats), "at once")
        timed.sort()
        row("GET /api/conversations?limit=50 while the index builds, p50 / max",
            f"{timed[len(timed) // 2]:.1f} / {timed[-1]:.1f} ms", "report")
        row("RSS once search answers", f"{app.rss_mb():.1f} MB", "report")
    finally:
        app.stop()


class OriginalProcess:
    """The original Flask app (the file LLAMA_CHAT_BENCH_ORIGINAL names: its
    code is public but not ours to ship), started as its README says, on
    `db` and llama.cpp at `llamacpp_url`."""

    def __init__(self, path, db, llamacpp_url):
        self.port = free_port()
        AppProcess.launch(self, [sys.executable, path], env=dict(
            os.environ, DATABASE_PATH=db, LLAMACPP_API_URL=llamacpp_url, FLASK_HOST="127.0.0.1",
            FLASK_PORT=str(self.port), MODELS_DIR=os.path.dirname(db),
            LLAMACPP_PID_FILE=db + ".pid"))

    def rss_mb(self):
        return AppProcess.rss_mb(self)

    def stop(self):
        AppProcess.stop(self)


def http_p50(port, paths, rounds=3):
    """Each GET of `paths` asked `rounds` times (the first round warms the
    page cache, untimed): the p50 in ms."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for path in paths:
        timed_get(conn, path)
    return percentile([timed_get(conn, path) for _ in range(rounds) for path in paths], 50)


@bench
def test_bench_versus_original(tmp_path, stub):
    """Side by side with the original Flask app, on copies of one database
    of its own of 100,000 messages and the same stub, alternating (original,
    this, original, this): RSS after the first start and after 15 s of
    reads, searches and chats from 8 clients; search p50 over the same
    queries. Needs LLAMA_CHAT_BENCH_ORIGINAL (the original app.py; Flask
    and requests installed)."""
    original = os.environ.get("LLAMA_CHAT_BENCH_ORIGINAL")
    if not original:
        pytest.skip("LLAMA_CHAT_BENCH_ORIGINAL: the path of the original app's app.py")
    row = bench_row
    bench_heading("side by side with the original app")
    master = str(tmp_path / "original.db")
    make_flask_db(master, conversations=2000, per_conversation=50,
                  texts=bench_corpus(100_000))
    searches = ["/api/search?" + urllib.parse.urlencode({"q": q}) for q in SEARCHES]
    figures = {"original": [], "this": []}
    for run in range(int(os.environ.get("LLAMA_CHAT_BENCH_ROUNDS", "2"))):
        for name in ("original", "this"):
            db = str(tmp_path / f"{name}{run}" / "llamacpp_chat.db")
            os.makedirs(os.path.dirname(db))
            shutil.copy(master, db)
            app = (OriginalProcess(original, db, stub.url) if name == "original"
                   else AppProcess(db, stub.url))
            try:
                if name == "this":
                    search_answers(app, q="python")
                started = app.rss_mb()
                search = http_p50(app.port, searches)
                mixed_load(app.port, conversations=2000, searches=SEARCHES)
                figures[name].append((started, app.rss_mb(), search))
            finally:
                app.stop()
            shutil.rmtree(os.path.dirname(db))
    for name, runs in figures.items():
        row(f"{name}: RSS after the first start; after the load; search p50",
            "; ".join(f"{a:.1f}/{b:.1f} MB {s:.2f} ms" for a, b, s in runs), "report")
    pairs = list(zip(figures["original"], figures["this"]))
    row("RSS after the load, this / original (each round's pair)",
        ", ".join(f"x{t[1] / o[1]:.2f}" for o, t in pairs), "<= x0.6")
    row("search p50, original / this (each round's pair)",
        ", ".join(f"x{o[2] / t[2]:.1f}" for o, t in pairs), ">= x20")


class AppProcess:
    """llama_chat.py started the way a user starts it."""

    def __init__(self, db, llamacpp_url, *extra):
        self.port = free_port()
        self.launch([sys.executable, os.path.join(HERE, "llama_chat.py"), "--port", str(self.port),
                     "--db", db, "--llamacpp-url", llamacpp_url, *extra])

    def launch(self, argv, env=None):
        """Started, and waited for until its conversation list answers."""
        self.started = started = time.perf_counter()
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.listening = None
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/api/conversations?limit=1")
                status = conn.getresponse().status
                self.listening = self.listening or time.perf_counter() - started
                if status == 200:
                    break
                time.sleep(0.05)                      # 503 STARTING: a migration or a build
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("llama_chat.py exited")
                time.sleep(0.002)
        self.startup = time.perf_counter() - started

    def rss_mb(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            line = next(l for l in f if l.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


def keep_alive_rate(port, path, clients=16, seconds=4.0):
    """Requests/s with `clients` keep-alive connections: wrk when installed (it
    takes less of the CPU the server needs), else Python threads."""
    import shutil
    if shutil.which("wrk"):
        out = subprocess.run(["wrk", "-t2", f"-c{clients}", f"-d{int(seconds)}s",
                              f"http://127.0.0.1:{port}{path}"], capture_output=True,
                             text=True).stdout
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        assert not errors, out
        return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "wrk"
    counts, stop_at = [0] * clients, time.monotonic() + seconds

    def worker(i):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() < stop_at:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / seconds, "python threads"


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def timed_get(conn, path):
    started = time.perf_counter()
    conn.request("GET", path)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200
    return (time.perf_counter() - started) * 1000


# Common words, two-word queries, rare words (in one sentence of bench_corpus's
# pool: ~220 of 1,000,000 messages), a rare word next to a common one (its
# newest matches reach past the recent index: ranked in the main one, which
# counts every message holding the common word), words that are nowhere, and
# prefixes.
SEARCHES = ["the", "python", "answer", "how", "data index", "machine learning", "the python",
            "memory cache", "search query", "coto213x", "halo308x", "heli375x", "python halo308x",
            "xyzzyq", "zzqqv nothing", "learn", "datab", "stream error", "version update"]


def search_figures(port, rounds=8):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for q in SEARCHES:                                    # warm the page cache
        timed_get(conn, "/api/search?" + urllib.parse.urlencode({"q": q}))
    times = [timed_get(conn, "/api/search?" + urllib.parse.urlencode({"q": q}))
             for _ in range(rounds) for q in SEARCHES]
    return percentile(times, 50), percentile(times, 99)


def p95_of(port, queries, rounds=5):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for q in queries:
        timed_get(conn, "/api/search?" + urllib.parse.urlencode({"q": q}))
    return percentile([timed_get(conn, "/api/search?" + urllib.parse.urlencode(
        {"q": q})) for _ in range(rounds) for q in queries], 95)


TWO_LETTERS = ["th", "da", "pr", "ma", "wh", "qu", "co", "se", "in", "st", "re", "an"]


def mixed_load(port, conversations, seconds=15, clients=8,
               searches=("volcanoes", "legacy", "message", "about")):
    """Clients at once, each on its own connection, for `seconds`: opening
    conversations, listing them, searching (for `searches`) and chatting, as
    people do."""
    ends = time.monotonic() + seconds

    def client(n):
        rng = random.Random(n)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < ends:
            pick = rng.random()
            if pick < 0.4:
                conn.request("GET", f"/api/conversations/{rng.randrange(1, conversations)}")
            elif pick < 0.6:
                conn.request("GET", "/api/conversations?limit=50")
            elif pick < 0.85:
                conn.request("GET", "/api/search?" + urllib.parse.urlencode(
                    {"q": rng.choice(searches)}))
            else:
                conn.request("POST", "/api/chat", json.dumps({
                    "conversation_id": rng.randrange(1, conversations), "model": "m",
                    "message": "hi there"}), {"Content-Type": "application/json"})
            conn.getresponse().read()
        conn.close()
    workers = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def reads_while_a_write_waits(port, db, count=200):
    """GET /api/conversations while another connection holds the write lock
    and a POST waits for it: p95 in ms."""
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")

    def post():
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("POST", "/api/conversations", json.dumps({"title": "w", "model": "m"}),
                  {"Content-Type": "application/json"})
        c.getresponse().read()

    writer = threading.Thread(target=post)
    writer.start()
    time.sleep(0.2)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        times = [timed_get(conn, "/api/conversations?limit=50") for _ in range(count)]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        writer.join()
    return percentile(times, 95)


def delete_with_reads(port, db, conversation_id):
    """DELETE a conversation and wait for its purge, reading the list meanwhile:
    (seconds to the end of the purge, slowest read in ms, reads made)."""
    reads, done = [], threading.Event()

    def reader():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while not done.is_set():
            reads.append(timed_get(conn, "/api/conversations?limit=50"))

    thread = threading.Thread(target=reader)
    started = time.perf_counter()
    thread.start()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("DELETE", f"/api/conversations/{conversation_id}")
    assert conn.getresponse().status == 200
    check = sqlite3.connect(db)
    while check.execute("SELECT count(*) FROM search_purge").fetchone()[0]:
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    done.set()
    thread.join()
    check.close()
    return elapsed, max(reads), len(reads)


def like_search_p50(db):
    """The original app's search, its own SQL, over the same queries: p50 in ms."""
    conn = sqlite3.connect(db)
    times = []
    for q in SEARCHES:
        started = time.perf_counter()
        conn.execute("""SELECT DISTINCT c.id, c.title, c.model, c.updated_at, m.content, m.role,
                               m.timestamp, m.response_time_ms, m.estimated_tokens
                        FROM conversations c JOIN messages m ON c.id = m.conversation_id
                        WHERE m.content LIKE ? OR c.title LIKE ?
                        ORDER BY c.updated_at DESC LIMIT 50""", (f"%{q}%", f"%{q}%")).fetchall()
        times.append((time.perf_counter() - started) * 1000)
    return percentile(times, 50)


def chat_overhead(conn, stub, conversation_id, rounds=15, pairs=20, ask=None, streamed=False):
    """A chat through the app (on `conn`) against the same call straight to
    the stub, alternating, in ms: the median over rounds of each round's p50
    difference (a spell of this machine's noise then moves one round, not the
    figure). `ask`: what the chat sends beside conversation_id and model
    (a new message, "hi", by default). `streamed`: the direct call is the one
    the app makes (streamed, on a connection of its own), not a plain one."""
    stub.reply = "A short answer of a few tokens."
    port = int(stub.url.rsplit(":", 1)[1])
    direct = http.client.HTTPConnection("127.0.0.1", port)
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": streamed}
    if streamed:
        body.update(stream_options={"include_usage": True}, return_progress=True)
    differences = []
    for _ in range(rounds):
        through, straight = [], []
        for _ in range(pairs):
            started = time.perf_counter()
            if streamed:
                direct = http.client.HTTPConnection("127.0.0.1", port)
            direct.request("POST", "/v1/chat/completions", json.dumps(body),
                           {"Content-Type": "application/json"})
            direct.getresponse().read()
            straight.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            conn.request("POST", "/api/chat", json.dumps(
                {"conversation_id": conversation_id, "model": "m", **(ask or {"message": "hi"})}),
                {"Content-Type": "application/json"})
            resp = conn.getresponse()
            answer = json.loads(resp.read())
            through.append((time.perf_counter() - started) * 1000)
            assert resp.status == 200 and answer["response"] == stub.reply, answer
        differences.append(percentile(through, 50) - percentile(straight, 50))
        time.sleep(0.5)
    direct.close()
    return percentile(differences, 50)


def stream_rate(port, path, body):
    """Reading one SSE stream: (tokens/s from the first token to the last, ms to
    the first token, ms from the last token to the end of the stream)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    started = time.perf_counter()
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = last = None
    tokens = 0
    for line in resp:
        if line.startswith(b"data: {") and b'"content"' in line and b'"delta"' in line:
            last = time.perf_counter()
            first = first or last
            tokens += 1
    ended = time.perf_counter()
    return (tokens - 1) / (last - first), (first - started) * 1000, (ended - last) * 1000


def compare_streams(tmp_path, *stub_args, runs=15):
    """stream_rate() of a stub in its own process, read directly and through the
    app, alternating (this machine's noise is larger than the gaps measured):
    (direct runs, app runs). Each app run is in a new conversation, so both
    carry the same short prompt."""
    fast = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--port", "0",
                             *stub_args], stdout=subprocess.PIPE, text=True)
    url = fast.stdout.readline().split()[-1]
    app = AppProcess(str(tmp_path / f"stream{'-'.join(stub_args)}.db"), url)
    direct_runs, app_runs = [], []
    try:
        for _ in range(runs):
            direct_runs.append(stream_rate(int(url.rsplit(":", 1)[1]), "/v1/chat/completions", {
                "messages": [{"role": "system", "content": "x"},
                             {"role": "user", "content": "go"}], "stream": True}))
            c = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
            c.request("POST", "/api/conversations", json.dumps({"title": "s", "model": "m"}),
                      {"Content-Type": "application/json"})
            cid = json.loads(c.getresponse().read())["conversation_id"]
            app_runs.append(stream_rate(app.port, "/api/chat", {
                "conversation_id": cid, "message": "go", "model": "m", "stream": True}))
    finally:
        app.stop()
        fast.terminate()
        fast.wait(10)
    return direct_runs, app_runs


def compare_v1_streams(db, *stub_args, runs=15):
    """stream_rate() of a stub in its own process, read directly and through
    the app's /v1 (recording on), alternating: (direct runs, app runs). Each
    /v1 run asks a new question, so each goes into a new conversation."""
    fast = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--port", "0",
                             *stub_args], stdout=subprocess.PIPE, text=True)
    url = fast.stdout.readline().split()[-1]
    app = AppProcess(db, url)
    direct_runs, app_runs = [], []
    try:
        for i in range(runs):
            direct_runs.append(stream_rate(int(url.rsplit(":", 1)[1]), "/v1/chat/completions", {
                "messages": [{"role": "user", "content": f"go {i:04d}"}], "stream": True}))
            app_runs.append(stream_rate(app.port, "/v1/chat/completions", {
                "messages": [{"role": "user", "content": f"go {i + 5000:04d}"}],
                "stream": True}))
    finally:
        app.stop()
        fast.terminate()
        fast.wait(10)
    return direct_runs, app_runs


def first_token_extra(direct_runs, app_runs):
    """The median of the paired differences: each app run against the direct
    run just before it, so that the machine's drift cancels (the stream rate
    is compared the same way, as the median of paired ratios)."""
    return percentile([a[1] - d[1] for d, a in zip(direct_runs, app_runs)], 50)


@bench
def test_bench(tmp_path, stub):
    rows_out = []

    def row(figure, value, target):
        rows_out.append((figure, value, target))
        print(f"  {figure:<58} {value:>22}   {target}", flush=True)

    print(f"\nllama-chat {llama_chat.__version__} benchmark: {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}")
    # Memory and start-up on an empty database
    app = AppProcess(str(tmp_path / "empty.db"), stub.url)
    try:
        row("start-up to first answer, empty database", f"{app.startup * 1000:.0f} ms", "< 300 ms")
        idle = app.rss_mb()
        row("idle RSS after start", f"{idle:.1f} MB", "< 30 MB")
        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
        conn.request("POST", "/api/conversations", json.dumps({"title": "t", "model": "m"}),
                     {"Content-Type": "application/json"})
        conn.getresponse().read()
        for i in range(10000):
            timed_get(conn, ("/api/conversations?limit=50", "/api/conversations/1",
                             "/api/search?q=hello", "/api/config")[i % 4])
        row("RSS after 10,000 requests (growth)", f"{app.rss_mb():.1f} MB "
            f"(+{app.rss_mb() - idle:.1f})", "growth < 5 MB")

        row("chat overhead over a direct llama.cpp call, p50",
            f"{chat_overhead(conn, stub, 1):.2f} ms", "< 3 ms")
        row("chat overhead over the direct streamed call the app makes, p50",
            f"{chat_overhead(conn, stub, 1, streamed=True):.2f} ms", "< 3 ms")
        conn.request("POST", "/api/conversations", json.dumps({"title": "long", "model": "m"}),
                     {"Content-Type": "application/json"})
        long = json.loads(conn.getresponse().read())["conversation_id"]
        for i in range(100):                # 200 messages, each counted once by /tokenize
            conn.request("POST", "/api/chat", json.dumps(
                {"conversation_id": long, "model": "m", "message": f"question {i} " * 8}),
                {"Content-Type": "application/json"})
            conn.getresponse().read()
        row("chat overhead, 200-message branch fitted by tokens, p50",
            f"{chat_overhead(conn, stub, long, rounds=5):.2f} ms", "< 3 ms")

        # Streaming, from a stub in its own process: 2,000 tokens sent as fast as it
        # can, then 40 paced as a fast model is (200 tokens/s)
        direct_runs, app_runs = compare_streams(tmp_path, "--tokens", "2000")
        rate_direct, rate_app = (percentile([r for r, _, _ in runs], 50)
                                 for runs in (direct_runs, app_runs))
        ratio = percentile([a[0] / d[0] for d, a in zip(direct_runs, app_runs)], 50)
        row("streamed 2,000 tokens: rate through the app / direct",
            f"{ratio * 100:.0f}% ({rate_app:,.0f}/{rate_direct:,.0f} tok/s)", ">= 95%")
        row("first token: extra time through the app, same stream",
            f"{first_token_extra(direct_runs, app_runs):.1f} ms", "< 5 ms")
        row("last token to \"done\" (the reply stored, committed)",
            f"{percentile([t for _, _, t in app_runs], 50):.1f} ms", "report")
        paced = compare_streams(tmp_path, "--tokens", "40", "--delay", "0.005")
        row("first token: extra time through the app, 200 tokens/s",
            f"{first_token_extra(*paced):.1f} ms", "< 5 ms")

        # 50 streams at once (on a new connection: the app has closed the idle one)
        stub.reply = " ".join(f"s{i}" for i in range(100))
        stub.token_delay = 0.005
        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
        ids = []
        for i in range(50):
            conn.request("POST", "/api/conversations", json.dumps({"title": f"s{i}", "model": "m"}),
                         {"Content-Type": "application/json"})
            ids.append(json.loads(conn.getresponse().read())["conversation_id"])
        conn.close()            # 50 streams are all one address may hold (connections_per_address)
        done = []

        def streamer(cid):
            c = http.client.HTTPConnection("127.0.0.1", app.port, timeout=60)
            c.request("POST", "/api/chat", json.dumps({"conversation_id": cid, "message": "go",
                                                       "model": "m", "stream": True}),
                      {"Content-Type": "application/json"})
            done.append(read_events(c.getresponse())[-1]["type"] == "done")

        threads = [threading.Thread(target=streamer, args=(cid,)) for cid in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stub.token_delay = 0
        stored = sqlite3.connect(str(tmp_path / "empty.db")).execute(
            "SELECT count(*) FROM messages WHERE role = 'assistant' AND finish_reason = 'stop' "
            f"AND conversation_id IN ({','.join(map(str, ids))})").fetchone()[0]
        row("50 simultaneous streams: completed / stored", f"{sum(done)}/50, {stored}/50",
            "50/50")
        assert sum(done) == stored == 50
    finally:
        app.stop()



def bench_row(figure, value, target):
    print(f"  {figure:<62} {value:>24}   {target}", flush=True)


def bench_heading(what):
    print(f"\nllama-chat {llama_chat.__version__} {what} benchmark: {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}")


@bench
def test_bench_history(tmp_path, stub):
    row = bench_row
    bench_heading("history")
    # Throughput, search and size at 100,000 messages
    db = str(tmp_path / "100k.db")
    built = build_database(db, 100_000)
    size = os.path.getsize(db) / 100
    row("building 100,000 messages (bulk insert + index)", f"{built:.1f} s", "report")
    row("database size per 1,000 messages (~400 chars, with index)", f"{size / 1e6:.2f} MB",
        "report")
    app = AppProcess(db, stub.url)
    try:
        rate, tool = keep_alive_rate(app.port, "/api/conversations?limit=50")
        row(f"GET /api/conversations?limit=50, 16 clients ({tool})", f"{rate:,.0f} req/s",
            ">= 1,500 req/s")
        rate, tool = keep_alive_rate(app.port, "/api/conversations/1000")
        row(f"GET /api/conversations/ID, 50 messages, 16 clients ({tool})",
            f"{rate:,.0f} req/s", ">= 1,000 req/s")
        p50, p99 = search_figures(app.port)
        row("search p50 / p99 at 100,000 messages", f"{p50:.1f} / {p99:.1f} ms",
            "< 10 / < 50 ms")
        row("a two-letter prefix (as typed), p95 at 100,000 messages",
            f"{p95_of(app.port, TWO_LETTERS):.1f} ms", "< 60 ms")
        row("GET /api/conversations while another holds the write lock, p95",
            f"{reads_while_a_write_waits(app.port, db):.1f} ms", "< 50 ms")
        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
        conn.request("POST", "/api/conversations", json.dumps({"title": "t", "model": "m"}),
                     {"Content-Type": "application/json"})
        cid = json.loads(conn.getresponse().read())["conversation_id"]
        # A new conversation, as on the empty database: the history sent along
        # is as short, and only the database differs.
        row("chat overhead at 100,000 messages, p50",
            f"{chat_overhead(conn, stub, cid):.2f} ms", "< 3 ms")
    finally:
        app.stop()

    # Mixed English and Chinese, 100,000 messages: two-character queries
    db = str(tmp_path / "cjk.db")
    build_database(db, 100_000, corpus=mixed_corpus)
    app = AppProcess(db, stub.url)
    try:
        pairs = [CJK_POOL[i:i + 2] for i in (0, 2, 10, 40, 100, 150, 200, 300, 400, 460)]
        row("a two-character CJK query, p95 at 100,000 messages of mixed text",
            f"{p95_of(app.port, pairs):.1f} ms", "< 100 ms")
    finally:
        app.stop()

    # The original app's database, 100,000 messages: opened, migrated, searched
    db = str(tmp_path / "llamacpp_chat.db")
    make_flask_db(db, conversations=2000, per_conversation=50)
    app = AppProcess(db, stub.url)
    try:
        searchable = search_answers(app)
        row("original app's 100,000-message database: listening; history served; search",
            f"{app.listening * 1000:.0f} ms; {app.startup:.1f} s; {searchable:.1f} s",
            "opens, keeps every row")
        row("RSS after that first start (migration and index build)",
            f"{app.rss_mb():.1f} MB", "< 40 MB")
        mixed_load(app.port, conversations=2000)
        row("RSS then, after 15 s of reads, searches and chats from 8 clients",
            f"{app.rss_mb():.1f} MB", "report")
    finally:
        app.stop()
    kept = sqlite3.connect(db + ".v0.bak").execute("SELECT max(id) FROM messages").fetchone()[0]
    assert sqlite3.connect(db).execute("SELECT count(*) FROM messages WHERE id <= ?",
                                       (kept,)).fetchone()[0] == 100000    # the load's chats beside

    # A million messages
    db = str(tmp_path / "1m.db")
    built = build_database(db, 1_000_000)
    row("building 1,000,000 messages (bulk insert + index)", f"{built:.1f} s", "< 90 s")
    row("database size at 1,000,000 messages", f"{os.path.getsize(db) / 1e6:,.0f} MB",
        "report")
    app = AppProcess(db, stub.url)
    try:
        row("start-up to first answer, 1,000,000 messages", f"{app.startup * 1000:.0f} ms",
            "< 1 s")
        p50, p99 = search_figures(app.port, rounds=4)
        row("search p50 / p99 at 1,000,000 messages", f"{p50:.1f} / {p99:.1f} ms",
            "< 30 / < 250 ms")
        like = like_search_p50(db)
        row("search p50: the original app's LIKE query / this app, 1,000,000",
            f"{like / p50:,.0f}x ({like:,.0f} ms)", ">= 20x")
        seconds, slowest, reads = delete_with_reads(app.port, db, 777)
        row("delete of a conversation at 1,000,000, with its purge",
            f"{seconds:.1f} s, reads <= {slowest:.0f} ms", "< 10 s, reads answering")
    finally:
        app.stop()
    os.remove(db)

    # The original app's database, 1,000,000 messages: the first start
    db = str(tmp_path / "llamacpp_chat_1m.db")
    make_flask_db(db, conversations=20000, per_conversation=50)
    app = AppProcess(db, stub.url)
    try:
        row("first start on the original app's 1,000,000: listening, then ready",
            f"{app.listening * 1000:.0f} ms, {app.startup:.1f} s", "< 1 s, then < 90 s")
        row("RSS after that first start", f"{app.rss_mb():.1f} MB", "report")
    finally:
        app.stop()


def tree_conversation(store, messages=1000, branches=20):
    """A conversation of `messages` messages in `branches` branches: a main
    chain of half of them (the current branch), and at evenly spaced
    questions another reply that a side chain follows. (id, main chain ids)."""
    cid = store.create_conversation("A tree of a conversation", MODEL)
    main = messages // 2
    side_length = (messages - main) // (branches - 1)
    main = messages - side_length * (branches - 1)
    ids = [store.add_message(cid, ("user", "assistant")[i % 2], f"main message {i} " + "x" * 300,
                             MODEL) for i in range(main)]
    for b in range(1, branches):
        parent = ids[(b * main // branches) & ~1]           # a question of the main chain
        for i in range(side_length):
            parent = store.add_message(cid, ("assistant", "user")[i % 2],
                                       f"side {b} message {i} " + "y" * 300, MODEL, parent=parent)
    store.update_conversation(cid, show=ids[-1])
    return cid, ids


def request_ms(conn, method, path, body=None):
    started = time.perf_counter()
    conn.request(method, path, json.dumps(body) if body is not None else None,
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    assert resp.status == 200, answer
    return (time.perf_counter() - started) * 1000, answer


def schema_2_database(path, messages, per_conversation=50, version=2, index=False):
    """A 1.2 database (or one of schema `version`) of `messages` messages
    inserted in bulk, without the search index unless asked (the migration's
    cost alone is timed)."""
    def fill(c):
        c.executemany("INSERT INTO conversations (id, title, model) VALUES (?, 't', 'm')",
                      ((i + 1,) for i in range(messages // per_conversation)))
        c.executemany("INSERT INTO messages (conversation_id, role, content) VALUES (?, ?, ?)",
                      ((i // per_conversation + 1, ("user", "assistant")[i % 2], text)
                       for i, text in enumerate(bench_corpus(messages))))
    schema_2_db(path, fill, index=index, version=version)


def recall_questions(count, seed=5):
    """Questions of three kinds for recall at scale: the benchmark's own
    sentences (every word common), a tail word of its corpus with a common
    one (a rare word to look up), and the planted facts' questions."""
    rng = random.Random(seed)
    corpus = bench_corpus(2000)                # the words build_database's messages have
    texts = [next(corpus) for _ in range(2000)]
    tails = sorted({w for t in texts for w in re.findall(r"\b[a-z]{4}\d+x\b", t)})
    questions = ["What did we say about " + " ".join(rng.choice(texts).split()[:rng.randrange(6, 14)])
                 + "?" for _ in range(count)]
    questions += [f"What did I note about {rng.choice(tails)} and the {rng.choice(TOPICS)}?"
                  for _ in range(count)]
    return questions + [q for _, q in PLANTED]


def timed_recall(store, questions, n_ctx=4096):
    """The lookup and passage cut before each chat (recalled, as a chat
    calls it), in ms, each question asked twice, the second timed; and the
    sources of each."""
    engine = types.SimpleNamespace(store=store, upstream_for=lambda m: types.SimpleNamespace(
        context_of=lambda m: n_ctx))
    times, found = [], []
    for q in questions:
        llama_chat.recalled(engine, "m", q, set())
        started = time.perf_counter()
        found.append(llama_chat.recalled(engine, "m", q, set()))
        times.append((time.perf_counter() - started) * 1000)
    return times, found


@bench
def test_bench_recall(tmp_path, stub):
    """Recall at LLAMA_CHAT_BENCH_RECALL messages (1,000,000) with the planted
    facts in old conversations: the lookup and passage cut, p50 and p95, and
    how many facts were among the sources; then the chat overhead with
    recall on at 100,000 messages, beside the same chat without it."""
    bench_heading("recall")
    size = int(os.environ.get("LLAMA_CHAT_BENCH_RECALL", "1000000"))
    for messages in sorted({size, 100_000}, reverse=True):
        db = str(tmp_path / f"recall-{messages}.db")
        build_database(db, messages)
        store = llama_chat.Store(db)
        rng = random.Random(9)
        planted = {fact: store.add_message(rng.randrange(1, messages // 50), "user",
                                           "Note this: " + fact) for fact, _ in PLANTED}
        times, found = timed_recall(store, recall_questions(20))
        store.close()
        hits = sum(planted[fact] in [s["message_id"] for s in sources]
                   for (fact, _), sources in zip(PLANTED, found[-len(PLANTED):]))
        bench_row(f"recall lookup and passages at {messages:,} messages, p50 / p95",
                  f"{percentile(times, 50):.1f} / {percentile(times, 95):.1f} ms",
                  "< 30 / < 100 ms")
        bench_row(f"planted facts among the sources at {messages:,} messages",
                  f"{hits} of {len(PLANTED)}", ">= 8")
    app = AppProcess(db, stub.url)                 # the 100,000 one
    try:
        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
        conn.request("POST", "/api/conversations", json.dumps({"title": "t", "model": "m"}),
                     {"Content-Type": "application/json"})
        cid = json.loads(conn.getresponse().read())["conversation_id"]
        question = PLANTED[0][1]
        without = chat_overhead(conn, stub, cid, rounds=7, ask={"message": question})
        with_recall = chat_overhead(conn, stub, cid, rounds=7,
                                    ask={"message": question, "recall": True})
        bench_row("chat overhead at 100,000 messages, p50: recall on / off",
                  f"{with_recall:.2f} / {without:.2f} ms", "< 15 ms (on)")
    finally:
        app.stop()


@bench
def test_bench_trees(tmp_path, stub):
    row = bench_row
    bench_heading("tree")
    db = str(tmp_path / "old.db")
    schema_2_database(db, 100_000)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN")
    started = time.perf_counter()
    llama_chat.migrate_to_3(conn)
    row("migration to trees (schema 2 -> 3) of 100,000 messages",
        f"{time.perf_counter() - started:.2f} s", "report")
    conn.execute("ROLLBACK")
    conn.close()

    db = str(tmp_path / "trees.db")
    build_database(db, 100_000)
    store = llama_chat.Store(db)
    cid, ids = tree_conversation(store)
    assert len(json.loads(store.messages(cid, True)[0])) == 1000
    store.close()
    app = AppProcess(db, stub.url)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
        times = [request_ms(conn, "GET", f"/api/conversations/{cid}")[0] for _ in range(200)]
        shown = request_ms(conn, "GET", f"/api/conversations/{cid}")[1]["messages"]
        row(f"GET a conversation of 1,000 messages in 20 branches ({len(shown)} shown), p50",
            f"{percentile(times, 50):.2f} ms", "< 10 ms")
        times = [request_ms(conn, "GET", f"/api/conversations/{cid}?branches=all")[0]
                 for _ in range(100)]
        row("the same with ?branches=all (1,000 messages), p50",
            f"{percentile(times, 50):.2f} ms", "report")
        switches = []
        for i in range(100):
            switches.append(request_ms(conn, "PUT", f"/api/conversations/{cid}", {
                "current_message_id": ids[(i % 19 + 1) * len(ids) // 20 & ~1]})[0])
        row("branch switch (PUT current_message_id) at 100,000 messages, p50",
            f"{percentile(switches, 50):.2f} ms", "< 3 ms")
        conn.request("POST", "/api/conversations", json.dumps({"title": "t", "model": "m"}),
                     {"Content-Type": "application/json"})
        fresh = json.loads(conn.getresponse().read())["conversation_id"]
        row("chat overhead at 100,000 messages, p50",
            f"{chat_overhead(conn, stub, fresh):.2f} ms", "< 3 ms")
        conn.request("POST", "/api/conversations", json.dumps({"title": "r", "model": "m"}),
                     {"Content-Type": "application/json"})
        again = json.loads(conn.getresponse().read())["conversation_id"]
        question = request_ms(conn, "POST", "/api/chat", {
            "conversation_id": again, "message": "hi", "model": "m"})[1]["user_message_id"]
        row("regenerate overhead at 100,000 messages, p50 (siblings pile up)",
            f"{chat_overhead(conn, stub, again, ask={'regenerate': question}):.2f} ms",
            "< 3 ms")
    finally:
        app.stop()

def serve_stub(argv=None):
    """A stand-in llama-server for trying llama-chat without a model:
    python3 test_llama_chat.py --port 8080 [--tokens N] [--delay SECONDS] [--router]"""
    import argparse
    p = argparse.ArgumentParser(description=serve_stub.__doc__)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--tokens", type=int, default=0, help="reply with N tokens")
    p.add_argument("--delay", type=float, default=0.0, help="seconds between tokens")
    p.add_argument("--router", action="store_true", help="answer /models as router mode does")
    args = p.parse_args(argv)
    state = Stub()
    if args.tokens:
        state.reply = " ".join(f"t{i}" for i in range(args.tokens))
    state.token_delay, state.router = args.delay, args.router
    server = StubServer(("127.0.0.1", args.port), type("Handler", (StubHandler,), {"stub": state}))
    print(f"stub llama-server on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    serve_stub()


def v1_overhead(port, stub, history, rounds=15, pairs=20):
    """A plain chat through /v1 (recorded) against the same body sent straight
    to the stub, alternating, in ms: the median of each round's p50
    difference. history(i) is the i-th request's messages."""
    stub.reply = "A short answer of a few tokens."
    direct = http.client.HTTPConnection("127.0.0.1", int(stub.url.rsplit(":", 1)[1]))
    through = http.client.HTTPConnection("127.0.0.1", port)
    differences, n = [], 0
    for _ in range(rounds):
        times = {"direct": [], "v1": []}
        for _ in range(pairs):
            n += 1
            body = json.dumps({"messages": history(n)})
            for name, conn in (("direct", direct), ("v1", through)):
                started = time.perf_counter()
                conn.request("POST", "/v1/chat/completions", body,
                             {"Content-Type": "application/json"})
                resp = conn.getresponse()
                answer = json.loads(resp.read())
                times[name].append((time.perf_counter() - started) * 1000)
                assert resp.status == 200, answer
        differences.append(percentile(times["v1"], 50) - percentile(times["direct"], 50))
        time.sleep(0.3)
    direct.close()
    through.close()
    return percentile(differences, 50)


@bench
def test_bench_v1(tmp_path, stub):
    row = bench_row
    bench_heading("/v1")
    old = str(tmp_path / "v4.db")
    schema_2_database(old, 100_000, version=4, index=True)
    conn = sqlite3.connect(old, isolation_level=None)
    conn.create_function("message_digest", 4, llama_chat.message_digest, deterministic=True)
    conn.execute("BEGIN")
    started = time.perf_counter()
    llama_chat.migrate_to_5(conn)
    row("migration to schema 5 (messages rebuilt) of 100,000 messages",
        f"{time.perf_counter() - started:.2f} s", "report")
    conn.execute("ROLLBACK")
    conn.close()
    db = str(tmp_path / "v1.db")
    build_database(db, 100_000)
    app = AppProcess(db, stub.url)
    try:
        row("plain chat through /v1, recorded, a new conversation: +p50",
            f"{v1_overhead(app.port, stub, lambda n: [user(f'question {n}')]):.2f} ms",
            "< 3 ms")
        history = [m for i in range(10) for m in (user(f"turn {i} of a long chat"),
                                                  assistant("A short answer of a few tokens."))]
        row("plain chat through /v1, recorded, the 21st message of one: +p50",
            f"{v1_overhead(app.port, stub, lambda n: history + [user(f'next {n}')]):.2f} ms",
            "< 3 ms")
    finally:
        app.stop()
    direct_runs, app_runs = compare_v1_streams(db, "--tokens", "2000")
    ratio = percentile([a[0] / d[0] for d, a in zip(direct_runs, app_runs)], 50)
    rate_direct, rate_app = (percentile([r for r, _, _ in runs], 50)
                             for runs in (direct_runs, app_runs))
    row("streamed 2,000 tokens through /v1: rate / direct",
        f"{ratio * 100:.0f}% ({rate_app:,.0f}/{rate_direct:,.0f} tok/s)", ">= 95%")
    row("first token through /v1: extra time, same stream",
        f"{first_token_extra(direct_runs, app_runs):.1f} ms", "< 3 ms")
    paced = compare_v1_streams(db, "--tokens", "40", "--delay", "0.005")
    row("first token through /v1: extra time, 200 tokens/s",
        f"{first_token_extra(*paced):.1f} ms", "< 3 ms")


def peak_rss_mb(proc):
    """The peak RSS (VmHWM) of a running process, polled until it ends, in MB."""
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                peak = max(peak, int(next(l for l in f if l.startswith("VmHWM:")).split()[1]))
        except (OSError, StopIteration):
            pass
        time.sleep(0.05)
    return peak / 1024


def chatgpt_file(path, conversations, turns=10, prefix="gpt"):
    """A ChatGPT-format conversations.json: each conversation a chain of
    `turns` questions and answers, written a conversation at a time."""
    corpus = list(bench_corpus(2 * turns * 50))
    with open(path, "w") as f:
        f.write("[")
        for c in range(conversations):
            mapping, parent = {"root": {"id": "root", "message": None, "parent": None,
                                        "children": []}}, "root"
            for i in range(2 * turns):
                key = f"n{i}"
                mapping[parent]["children"].append(key)
                mapping[key] = {"id": key, "parent": parent, "children": [], "message": {
                    "author": {"role": ("user", "assistant")[i % 2]},
                    "create_time": 1720000000 + c * 60 + i,
                    "content": {"content_type": "text",
                                "parts": [corpus[(c * 7 + i) % len(corpus)]]}}}
                parent = key
            f.write(("," if c else "") + json.dumps({
                "title": f"Conversation {c}", "conversation_id": f"{prefix}-{c}",
                "create_time": 1720000000 + c * 60, "current_node": parent,
                "mapping": mapping}))
        f.write("]")
    return conversations * 2 * turns


@bench
def test_bench_history_files(tmp_path, stub):
    row = bench_row
    bench_heading("export, import and backup")
    size = int(os.environ.get("LLAMA_CHAT_BENCH_MESSAGES", "1000000"))
    db = str(tmp_path / "files.db")
    build_database(db, size)
    store = llama_chat.Store(db)          # ranked once, as a database in use is
    for group in (("model", "day"), ("day",)):
        llama_chat.ledger(store.db, group, None, None)
    store.close()
    app = AppProcess(db, stub.url)
    try:
        before = app.rss_mb()
        peak = [before]
        reading = threading.Event()

        def watch():
            while not reading.is_set():
                peak[0] = max(peak[0], app.rss_mb())
                time.sleep(0.05)
        watcher = threading.Thread(target=watch)
        watcher.start()
        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=600)
        started = time.perf_counter()
        conn.request("GET", "/api/export?format=jsonl")
        resp = conn.getresponse()
        messages = sum(line.count(b'"role":') for line in resp)
        took = time.perf_counter() - started
        reading.set()
        watcher.join()
        assert messages == size, messages
        row(f"export everything as JSONL, {size:,} messages",
            f"{size / took:,.0f} msg/s ({took:.1f} s)", ">= 100,000 msg/s")
        row("  RSS growth while exporting", f"{peak[0] - before:.1f} MB", "< 20 MB")

        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=60)
        took = [timed_get(conn, "/api/ledger?group=model,day") for _ in range(7)]
        row(f"GET /api/ledger?group=model,day at {size:,} messages, p50",
            f"{percentile(took, 50):.0f} ms", "< 100 ms")

        # Backup while four clients chat: their latency, before and during it
        stub.reply = "A short answer."
        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=60)
        ids = []
        for i in range(4):
            conn.request("POST", "/api/conversations", json.dumps({"title": f"b{i}", "model": "m"}),
                         {"Content-Type": "application/json"})
            ids.append(json.loads(conn.getresponse().read())["conversation_id"])
        phase, times, stop = ["before"], {"before": [], "during": []}, threading.Event()

        def chat(cid):
            c = http.client.HTTPConnection("127.0.0.1", app.port, timeout=60)
            while not stop.is_set():
                started = time.perf_counter()
                c.request("POST", "/api/chat", json.dumps({"conversation_id": cid, "model": "m",
                                                           "message": "hi"}),
                          {"Content-Type": "application/json"})
                assert c.getresponse().read()
                times[phase[0]].append((time.perf_counter() - started) * 1000)
                stop.wait(0.1)       # a brisk pace, not flat out: two cores would saturate
        chatters = [threading.Thread(target=chat, args=(cid,)) for cid in ids]
        for t in chatters:
            t.start()
        time.sleep(3)
        phase[0] = "during"
        started = time.perf_counter()
        copy = tmp_path / "backup.db"        # by another process: not this one's GIL
        subprocess.run([sys.executable, "-c", "import shutil, sys, urllib.request; shutil."
                        "copyfileobj(urllib.request.urlopen(sys.argv[1]), open(sys.argv[2], "
                        "'wb'), 1 << 20)", f"http://127.0.0.1:{app.port}/api/backup",
                        str(copy)], check=True, timeout=600)
        took = time.perf_counter() - started
        copied = copy.stat().st_size
        stop.set()
        for t in chatters:
            t.join()
        row(f"backup while 4 clients chat, each every 0.1 s ({copied / 2**20:.0f} MB)",
            f"{took:.1f} s", "report")
        row("  chat p95 before / during the backup",
            f"{percentile(times['before'], 95):.1f} / {percentile(times['during'], 95):.1f} ms",
            "< 50 ms")
    finally:
        app.stop()

    # Import of a ChatGPT-format file of about 200 MB, by the command line
    path = tmp_path / "conversations.json"
    count = chatgpt_file(path, int(os.environ.get("LLAMA_CHAT_BENCH_IMPORT", "21000")))
    idle = subprocess.Popen([sys.executable, os.path.join(HERE, "llama_chat.py"), "--db",
                             str(tmp_path / "idle.db"), "import", os.devnull],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = peak_rss_mb(idle)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "llama_chat.py"), "--db",
                             str(tmp_path / "imported.db"), "import", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = peak_rss_mb(proc)
    took = time.perf_counter() - started
    out = proc.stdout.read()
    assert proc.returncode == 0 and f"{count} messages" in out, out
    row(f"import a ChatGPT file of {path.stat().st_size / 2**20:.0f} MB ({count:,} messages)",
        f"{count / took:,.0f} msg/s ({took:.1f} s)", ">= 20,000 msg/s")
    row("  RSS growth while importing (peak over an idle command)", f"{peak - base:.1f} MB",
        "< 60 MB")

    # Chats while imports run into the database they write: by the command
    # line (another process) and through the API (the server's own), a chat
    # every 50 ms, each timed from request to answer.
    db = str(tmp_path / "busy.db")
    app = AppProcess(db, stub.url)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=60)
        conn.request("POST", "/api/conversations", json.dumps({"title": "c", "model": "m"}),
                     {"Content-Type": "application/json"})
        cid = json.loads(conn.getresponse().read())["conversation_id"]
        times, stop = [], threading.Event()

        def chat():
            c = http.client.HTTPConnection("127.0.0.1", app.port, timeout=60)
            while not stop.is_set():
                started = time.perf_counter()
                c.request("POST", "/api/chat", json.dumps({"conversation_id": cid, "model": "m",
                                                           "message": "hi"}),
                          {"Content-Type": "application/json"})
                resp = c.getresponse()
                resp.read()
                assert resp.status == 200
                times.append((time.perf_counter() - started) * 1000)
                stop.wait(0.05)

        def chatting_while(work):
            times.clear()
            stop.clear()
            chatter = threading.Thread(target=chat)
            chatter.start()
            try:
                started = time.perf_counter()
                work()
                return time.perf_counter() - started
            finally:
                stop.set()
                chatter.join()
        idle = chatting_while(lambda: time.sleep(3)) and list(times)
        took = chatting_while(lambda: subprocess.run(
            [sys.executable, os.path.join(HERE, "llama_chat.py"), "--db", db, "import",
             str(path)], check=True, stdout=subprocess.DEVNULL, timeout=900))
        row(f"  the same file by the command line while a server chats on the database",
            f"{count / took:,.0f} msg/s", "report")
        row("  a chat every 50 ms meanwhile: p50 / p99 / longest",
            f"{percentile(times, 50):.0f} / {percentile(times, 99):.0f} / {max(times):.0f} ms "
            f"({len(times)} chats; idle p99 {percentile(idle, 99):.0f} ms)", "p99 < 100 ms")
        api_file = tmp_path / "api.json"
        api_count = chatgpt_file(api_file, 2400, prefix="api")     # under max_import_bytes

        def post_import():
            c = http.client.HTTPConnection("127.0.0.1", app.port, timeout=600)
            c.request("POST", "/api/import", api_file.read_bytes(),
                      {"Content-Type": "application/octet-stream"})
            resp = c.getresponse()
            assert resp.status == 200, resp.read()
            resp.read()
        took = chatting_while(post_import)
        row(f"  a file of {api_file.stat().st_size / 2**20:.0f} MB through POST /api/import "
            "while it chats", f"{api_count / took:,.0f} msg/s", "report")
        row("  a chat every 50 ms meanwhile: p50 / p99 / longest",
            f"{percentile(times, 50):.0f} / {percentile(times, 99):.0f} / {max(times):.0f} ms "
            f"({len(times)} chats)", "p99 < 100 ms")

        # A ZIP bomb: 1 GiB of JSON in a ZIP of about a megabyte
        import zipfile
        bomb = tmp_path / "bomb.zip"
        with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
            with z.open("conversations.json", "w", force_zip64=True) as member:
                member.write(b"[")
                for _ in range(1024):
                    member.write(b" " * (1 << 20))
                member.write(b"]")
        c = http.client.HTTPConnection("127.0.0.1", app.port, timeout=60)
        started = time.perf_counter()
        c.request("POST", "/api/import", bomb.read_bytes(),
                  {"Content-Type": "application/octet-stream"})
        resp = c.getresponse()
        resp.read()
        took = time.perf_counter() - started
        assert resp.status == 400
        row(f"a ZIP of {bomb.stat().st_size / 2**20:.1f} MB inflating to 1 GiB refused",
            f"{took * 1000:.0f} ms", "< 2 s")
    finally:
        app.stop()


@bench
def test_bench_burst(tmp_path, stub):
    """20 questions sent at once into one conversation: answered in turn."""
    bench_heading("a burst of questions into one conversation")
    stub.reply = "A short answer."
    app = AppProcess(str(tmp_path / "burst.db"), stub.url)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=60)
        conn.request("POST", "/api/conversations", json.dumps({"title": "b", "model": "m"}),
                     {"Content-Type": "application/json"})
        cid = json.loads(conn.getresponse().read())["conversation_id"]
        go, statuses = threading.Barrier(20), []

        def ask(i):
            c = http.client.HTTPConnection("127.0.0.1", app.port, timeout=120)
            go.wait()
            c.request("POST", "/api/chat", json.dumps({"conversation_id": cid, "model": "m",
                                                       "message": f"question {i}"}),
                      {"Content-Type": "application/json"})
            resp = c.getresponse()
            resp.read()
            statuses.append(resp.status)
        askers = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
        started = time.perf_counter()
        for t in askers:
            t.start()
        for t in askers:
            t.join()
        took = time.perf_counter() - started
        conn.request("GET", f"/api/conversations/{cid}")
        shown = json.loads(conn.getresponse().read())["messages"]
        in_turn = [m["role"] for m in shown] == ["user", "assistant"] * 20
        assert statuses == [200] * 20 and in_turn
        bench_row("20 questions at once into one conversation: all answered in turn (Q A Q A)",
                  f"{took * 1000:.0f} ms ({took * 50:.1f} ms a question)", "report")
    finally:
        app.stop()


def jpeg_like(size, seed):
    """`size` bytes that are a JPEG by their first bytes, different for each seed."""
    return b"\xff\xd8\xff\xe0" + random.Random(seed).randbytes(size - 4)


@bench
def test_bench_attachments(tmp_path, stub):
    """Uploads of a phone's photo, a chat that carries one, an export of
    500 MB of them, and one image sent 100 times through /v1."""
    bench_heading("attachments")
    row = bench_row
    app = AppProcess(str(tmp_path / "attachments.db"), stub.url)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=60)
        photos = [jpeg_like(5 << 20, n) for n in range(21)]

        def upload_one(photo, name):
            started = time.perf_counter()
            conn.request("POST", f"/api/attachments?name={name}", photo,
                         {"Content-Type": "image/jpeg"})
            made = json.loads(conn.getresponse().read())
            return (time.perf_counter() - started) * 1000, made["attachment"]["id"]
        upload_one(photos[20], "warm.jpg")
        before = app.rss_mb()
        times = [upload_one(photo, f"p{n}.jpg")[0] for n, photo in enumerate(photos[:20])]
        row("upload of a 5 MB image: p50 / p95", f"{percentile(times, 50):.0f} / "
            f"{percentile(times, 95):.0f} ms", "p50 < 150 ms")
        row("RSS growth during 20 such uploads", f"{app.rss_mb() - before:+.1f} MB", "< 15 MB")
        # A chat with a 5 MB image, against the same request straight to the stub
        stub.reply = "A short answer of a few tokens."
        ident = upload_one(photos[0], "chat.jpg")[1]
        url = "data:image/jpeg;base64," + base64.b64encode(photos[0]).decode()
        direct = http.client.HTTPConnection("127.0.0.1", int(stub.url.rsplit(":", 1)[1]))
        body = json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}],
            "stream": True, "stream_options": {"include_usage": True}, "return_progress": True})
        differences = []
        for _ in range(5):
            straight, through = [], []
            for _ in range(6):
                conn.request("POST", "/api/conversations", json.dumps({"model": "m"}),
                             {"Content-Type": "application/json"})
                cid = json.loads(conn.getresponse().read())["conversation_id"]
                started = time.perf_counter()
                direct = http.client.HTTPConnection("127.0.0.1", int(stub.url.rsplit(":", 1)[1]))
                direct.request("POST", "/v1/chat/completions", body,
                               {"Content-Type": "application/json"})
                direct.getresponse().read()
                straight.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                conn.request("POST", "/api/chat", json.dumps({
                    "conversation_id": cid, "model": "m", "message": "hi",
                    "attachments": [ident]}), {"Content-Type": "application/json"})
                assert conn.getresponse().read() and True
                through.append((time.perf_counter() - started) * 1000)
                stub.requests.clear()                  # 7 MB each: not kept
            differences.append(percentile(through, 50) - percentile(straight, 50))
        row("chat with a 5 MB image: overhead over the direct request, p50",
            f"{percentile(differences, 50):.1f} ms", "< 30 ms")
        # One image through /v1 100 times: stored once
        v1_body = json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                + base64.b64encode(PNG).decode()}}]}]})
        for _ in range(100):
            conn.request("POST", "/v1/chat/completions", v1_body,
                         {"Content-Type": "application/json"})
            conn.getresponse().read()
        copies = sqlite3.connect(str(tmp_path / "attachments.db")).execute(
            "SELECT count(*) FROM attachments WHERE id = ?",
            (hashlib.sha256(PNG).hexdigest(),)).fetchone()[0]
        row("the same image sent 100 times through /v1: copies stored", f"{copies}", "1")
        # A phone's photo through /v1, as a data URL: what memory it takes and keeps
        before = peak = app.rss_mb()
        for n in range(5):
            photo = jpeg_like(14 << 20, 200 + n)
            big = json.dumps({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,"
                                                    + base64.b64encode(photo).decode()}},
                {"type": "text", "text": "hi"}]}]})
            watching = [True]

            def watch():
                nonlocal peak
                while watching[0]:
                    peak = max(peak, app.rss_mb())
                    time.sleep(0.005)
            watcher = threading.Thread(target=watch)
            watcher.start()
            conn.request("POST", "/v1/chat/completions", big, {"Content-Type": "application/json"})
            conn.getresponse().read()
            watching[0] = False
            watcher.join()
            stub.requests.clear()
        row("5 requests through /v1, each a 14 MB photo (a 20 MB body): RSS most / after",
            f"{peak - before:+.1f} / {app.rss_mb() - before:+.1f} MB", "report")
    finally:
        app.stop()
    # An export of 1,000 conversations holding 500 MB of attachments
    total_mb = int(os.environ.get("LLAMA_CHAT_BENCH_ATTACHMENT_MB", "500"))
    db = str(tmp_path / "export.db")
    store = llama_chat.Store(db)
    for c in range(1000):
        cid = store.create_conversation(f"photos {c}", "m")
        store.add_message(cid, "user", f"photo {c}")
        data = jpeg_like(total_mb * 1024 * 1024 // 1000, 100 + c)
        with store.db.write() as w:
            message = w.execute("SELECT max(id) FROM messages").fetchone()[0]
            llama_chat.Store.attach(w, message, [(data, "image", "image/jpeg", None)])
    store.close()
    app = AppProcess(db, stub.url)
    try:
        before = peak = app.rss_mb()
        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=600)
        started = time.perf_counter()
        conn.request("GET", "/api/export?format=jsonl")
        resp, size = conn.getresponse(), 0
        while piece := resp.read(1 << 20):
            size += len(piece)
            peak = max(peak, app.rss_mb())
        took = time.perf_counter() - started
        row(f"export (JSONL) of 1,000 conversations holding {total_mb} MB of attachments",
            f"{size / 1e6:,.0f} MB in {took:.1f} s", "report")
        row("  its RSS growth (the most, read at each MB sent)", f"{peak - before:+.1f} MB",
            "< 20 MB")
    finally:
        app.stop()


@bench
def test_bench_connections(tmp_path, stub):
    """Chats through a second llama.cpp server against the first, and beside
    a third that never answers; the model list from its cache."""
    bench_heading("several llama.cpp servers")
    row = bench_row
    with stub_server(router=True) as gpu, black_hole() as hole:
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"connections": [{"name": "gpu", "url": gpu.url}]}))
        app = AppProcess(str(tmp_path / "c.db"), stub.url, "--config", str(config))
        try:
            conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=60)
            conn.request("GET", "/api/models")
            conn.getresponse().read()

            def chat_times(model, rounds=300):
                conn.request("POST", "/api/conversations", json.dumps({"model": model}),
                             {"Content-Type": "application/json"})
                cid = json.loads(conn.getresponse().read())["conversation_id"]
                times = []
                for i in range(rounds):
                    started = time.perf_counter()
                    conn.request("POST", "/api/chat", json.dumps({
                        "conversation_id": cid, "model": model, "message": f"q{i}"}),
                        {"Content-Type": "application/json"})
                    conn.getresponse().read()
                    times.append((time.perf_counter() - started) * 1000)
                return times
            firsts, seconds = [], []
            for _ in range(4):                     # alternating: the machine's noise shared
                firsts += chat_times(MODEL, 60)
                seconds += chat_times("gemma-3-270m", 60)
            row("chat, p50: through the first server / through a second",
                f"{percentile(firsts, 50):.2f} / {percentile(seconds, 50):.2f} ms",
                "within 0.2 ms")
        finally:
            app.stop()
        config.write_text(json.dumps({"connections": [{"name": "gpu", "url": gpu.url},
                                                      {"name": "hole", "url": hole}]}))
        app = AppProcess(str(tmp_path / "c2.db"), stub.url, "--config", str(config))
        try:
            conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=60)
            conn.request("GET", "/api/models")
            conn.getresponse().read()
            listed = [timed_get(conn, "/api/models") for _ in range(50)]
            beside = []
            for _ in range(4):
                beside += chat_times("gemma-3-270m", 60)
            row("chat through the second, p50 / p95: alone / with a third that never answers",
                f"{percentile(seconds, 50):.2f} / {percentile(seconds, 95):.2f} ms; "
                f"{percentile(beside, 50):.2f} / {percentile(beside, 95):.2f} ms", "p95 unchanged")
            row("/api/models with the third not answering, p50 / p95",
                f"{percentile(listed, 50):.1f} / {percentile(listed, 95):.1f} ms", "< 50 ms")
        finally:
            app.stop()


@bench
def test_bench_prompt_cache(tmp_path, launch, monkeypatch):
    """A 60-turn chat that passes the context three times over, against a real
    llama-server (LLAMA_CHAT_BENCH_LLAMA_SERVER=http://HOST:PORT, started with
    -c 2048 -np 1): what llama.cpp reads each turn (prompt_n, the tokens its
    cache did not hold) and the time to first token, with the context left
    out in steps and with it sliding a message a turn (as before 1.8.0)."""
    url = os.environ.get("LLAMA_CHAT_BENCH_LLAMA_SERVER")
    if not url:
        pytest.skip("needs a real llama-server: LLAMA_CHAT_BENCH_LLAMA_SERVER=http://HOST:PORT")
    bench_heading("prompt cache (a real llama-server)")
    topics = ["rivers", "volcanoes", "bread", "trains", "owls", "glass", "tides", "maps"]
    figures = {}
    for way, step in (("sliding", 0), ("stepped", llama_chat.STEP_OF_BUDGET)):
        monkeypatch.setattr(llama_chat, "STEP_OF_BUDGET", step)   # 0: a step of one token
        c = Client(launch(url, db=str(tmp_path / f"{way}.db"), timeouts={
            "llamacpp_timeout": 600, "llamacpp_connect_timeout": 5},
            performance={**llama_chat.DEFAULT_CONFIG["performance"],
                         "context_history_limit": 1000}))
        cid = c.new_conversation()
        for n in range(60):
            status, _, answer = c.post("/api/chat", {
                "conversation_id": cid, "model": "", "stream": False,
                "message": f"Turn {n}: one fact about {topics[n % 8]}, in two sentences.",
                "options": {"num_predict": 60, "temperature": 0.1}})
            assert status == 200, answer
        replies = rows(c, "SELECT prompt_n, cache_n, ttft_ms FROM messages WHERE role = "
                          "'assistant' ORDER BY id")
        late = replies[20:]
        # new a turn: what the prompt grows by, as llama.cpp counts it (the
        # question and the reply before it, with the template's tokens)
        sizes = [p + (k or 0) for p, k, _ in replies]
        growth = [b - a for a, b in zip(sizes, sizes[1:]) if b > a][19:]
        figures[way] = (sum(p for p, _, _ in late) / len(late),
                        sum(t for _, _, t in late if t) / len(late),
                        sum(growth) / max(1, len(growth)))
    added = figures["stepped"][2]                # the sliding prompt grows but by slips
    for way, (read, ttft, _) in figures.items():
        bench_row(f"turns 21-60, {way}: tokens llama.cpp read a turn (new a turn: "
                  f"~{added:.0f}); time to first token", f"{read:.0f} (x{read / added:.2f}); "
                  f"{ttft:.0f} ms", "<= x1.5" if way == "stepped" else "")
    bench_row("time to first token, sliding / stepped",
              f"x{figures['sliding'][1] / figures['stepped'][1]:.1f}", ">= x3")


@bench
def test_bench_generations(tmp_path):
    """Replies the server owns: a stream's rate with followers beside it,
    following a reply mid-way, and /api/events with 20 pages open."""
    bench_heading("replies that outlive the client")
    fast = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--port", "0",
                             "--tokens", "2000"], stdout=subprocess.PIPE, text=True)
    url = fast.stdout.readline().split()[-1]
    app = AppProcess(str(tmp_path / "generations.db"), url)

    def new_conversation():
        c = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
        c.request("POST", "/api/conversations", json.dumps({"title": "g", "model": "m"}),
                  {"Content-Type": "application/json"})
        return json.loads(c.getresponse().read())["conversation_id"]

    def follow(message_id, got):
        c = http.client.HTTPConnection("127.0.0.1", app.port, timeout=60)
        c.request("GET", f"/api/messages/{message_id}/stream")
        got.append(sum(1 for line in c.getresponse() if line.startswith(b"data: ")))

    try:
        for watchers in (0, 2):
            ratios = []
            for _ in range(9):
                direct = stream_rate(int(url.rsplit(":", 1)[1]), "/v1/chat/completions", {
                    "messages": [{"role": "user", "content": "go"}], "stream": True})
                cid = new_conversation()
                conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=60)
                started = time.perf_counter()
                conn.request("POST", "/api/chat", json.dumps({
                    "conversation_id": cid, "message": "go", "model": "m", "stream": True}),
                    {"Content-Type": "application/json"})
                resp = conn.getresponse()
                first = last = None
                tokens, got, followers = 0, [], []
                for line in resp:
                    if line.startswith(b'data: {"type": "start"'):
                        mid = json.loads(line[6:])["message_id"]
                        followers = [threading.Thread(target=follow, args=(mid, got))
                                     for _ in range(watchers)]
                        for t in followers:
                            t.start()
                    elif line.startswith(b'data: {"type": "delta"'):
                        last = time.perf_counter()
                        first = first or last
                        tokens += 1
                for t in followers:
                    t.join(60)
                ratios.append(((tokens - 1) / (last - first)) / direct[0])
                ttft_extra = (first - started) * 1000 - direct[1]
            bench_row(f"2,000 streamed tokens with {watchers + 1} reading: rate / direct, p50",
                      f"{percentile(ratios, 50):.0%} (first token +{ttft_extra:.1f} ms)",
                      ">= 95%")
        fast.terminate()
        fast.wait(10)
        slow = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--port", "0",
                                 "--tokens", "2000", "--delay", "0.002"],
                                stdout=subprocess.PIPE, text=True)
        app.stop()
        app = AppProcess(str(tmp_path / "generations.db"), slow.stdout.readline().split()[-1])
        cid = new_conversation()
        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=60)
        conn.request("POST", "/api/chat", json.dumps({
            "conversation_id": cid, "message": "go", "model": "m", "stream": True}),
            {"Content-Type": "application/json"})
        resp = conn.getresponse()
        mid = json.loads(next(l for l in resp if l.startswith(b"data: "))[6:])["message_id"]
        waits = []
        for _ in range(20):                  # while it is made: what was made, then live
            c = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
            t0 = time.perf_counter()
            c.request("GET", f"/api/messages/{mid}/stream")
            r = c.getresponse()
            while not r.readline().startswith(b"data: "):
                pass
            waits.append((time.perf_counter() - t0) * 1000)
            c.close()
            time.sleep(0.05)
        resp.read()
        slow.terminate()
        slow.wait(10)
        bench_row("following a 2,000-token reply mid-way: what was made, p50 / p95",
                  f"{percentile(waits, 50):.1f} / {percentile(waits, 95):.1f} ms", "< 50 ms")
        pages, heard = [], []
        for _ in range(20):
            c = http.client.HTTPConnection("127.0.0.1", app.port, timeout=30)
            c.request("GET", "/api/events")
            r = c.getresponse()
            r.readline()
            pages.append((c, r))
        cpu_before = sum(int(x) for x in open(f"/proc/{app.proc.pid}/stat").read().rsplit(
            ")", 1)[1].split()[11:13])
        time.sleep(5)
        idle = sum(int(x) for x in open(f"/proc/{app.proc.pid}/stat").read().rsplit(
            ")", 1)[1].split()[11:13]) - cpu_before
        tick = os.sysconf("SC_CLK_TCK")
        for n in range(10):
            told = threading.Barrier(21)

            def hear(r):
                while not r.readline().startswith(b"data: "):
                    pass
                heard.append(time.perf_counter() - changed[0])
                told.wait()
            for _, r in pages:
                threading.Thread(target=hear, args=(r,), daemon=True).start()
            changed = [time.perf_counter()]
            c = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
            c.request("PUT", f"/api/conversations/{cid}", json.dumps({"title": f"t{n}"}),
                      {"Content-Type": "application/json"})
            c.getresponse().read()
            told.wait(10)
            for _, r in pages:                 # the rest of the batch, read on
                pass
            time.sleep(0.3)
        ms = [h * 1000 for h in heard]
        bench_row("a change heard by 20 open pages (/api/events), p50 / p95",
                  f"{percentile(ms, 50):.1f} / {percentile(ms, 95):.1f} ms", "p95 < 100 ms")
        bench_row("CPU of the app with 20 pages listening, idle 5 s",
                  f"{idle / tick * 1000:.0f} ms", "~0")
    finally:
        app.stop()
        fast.poll() is None and fast.terminate()


@bench
@needs_chromium
def test_bench_page(browser, client):
    store = client.engine.store
    for i in range(1000):
        store.create_conversation(f"Conversation {i} about things", MODEL)
    big = store.create_conversation("Five hundred messages", MODEL)
    reply = ("## A heading\n\nSome **bold** text, `code` and a [link](https://example.com).\n\n"
             "```python\nprint('hello')\n```\n\n- one\n- two\n  - nested\n\n| a | b |\n|---|---|\n"
             "| 1 | 2 |\n")
    last = None
    for i in range(250):          # 500 shown, and at every fifth question a second reply
        question = store.add_message(big, "user", f"Question {i}: how does this work?",
                                     parent=last if i else None)
        if i % 5 == 0:
            store.add_message(big, "assistant", "An earlier reply.", MODEL, parent=question,
                              finish_reason="stop")
        last = store.add_message(big, "assistant", reply, MODEL, parent=question,
                                 response_time_ms=900, estimated_tokens=60,
                                 tokens_per_second=40.0, finish_reason="stop")
    size = os.path.getsize(os.path.join(HERE, "index.html"))
    browser.go(f"http://127.0.0.1:{client.port}/")
    browser.wait("return document.querySelectorAll('#conv-list .conv').length >= 50")
    listed = browser.js_async("""const done = arguments[arguments.length - 1];
        const t0 = performance.now();
        (async () => { while (!state.listDone) await loadMoreConversations();
                       done([performance.now() - t0, state.conversations.length,
                             document.querySelectorAll('#conv-list .conv').length]); })();""")
    opened = browser.js_async(f"""const done = arguments[arguments.length - 1];
        const t0 = performance.now();
        openConversation({big}).then(() => requestAnimationFrame(() => done(
            [performance.now() - t0, document.querySelectorAll('#messages .msg').length])));""")
    print(f"\n  index.html size {size / 1024:.1f} KB (< 150 KB)")
    print(f"  1,000 conversations listed, 50 at a time: {listed[0]:.0f} ms "
          f"({listed[2]} shown) (< 1 s)")
    versions = browser.js("return document.querySelectorAll('#messages .versions').length")
    print(f"  a conversation of 500 messages, {versions} branch points, rendered with Markdown: "
          f"{opened[0]:.0f} ms ({opened[1]} shown) (< 1 s)")
    assert listed[2] == 1001 and opened[1] == 500 and versions == 50
    browser.do("POST", "/window/rect", {"width": 360, "height": 740})   # a phone's window
    try:
        times = []
        for _ in range(3):
            browser.go(f"http://127.0.0.1:{client.port}/")
            browser.wait("return document.querySelectorAll('#conv-list .conv').length >= 50")
            times.append(browser.js_async(f"""const done = arguments[arguments.length - 1];
                const t0 = performance.now();
                openConversation({big}).then(() => requestAnimationFrame(() =>
                    done(performance.now() - t0)));"""))
        print(f"  the same at 360 x 740: {min(times):.0f}-{max(times):.0f} ms (keep it)")
    finally:
        browser.do("POST", "/window/rect", {"width": 1280, "height": 900})


@bench
def test_bench_offline_start(browser, tmp_path, stub, launch):
    """The page's shell from the service worker's cache, the server gone."""
    server = launch(stub.url, db=str(tmp_path / "offline.db"))
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    browser.go(url)
    browser.js("navigator.serviceWorker.ready.then(() => { window.swReady = true; })")
    browser.wait("return window.swReady === true", timeout=15)
    browser.go(url)
    browser.wait("return !!navigator.serviceWorker.controller", timeout=15)
    server.engine.stopping.set()
    stop(server)                                    # the network has nothing to say now
    times = []
    for _ in range(5):
        browser.go(url)
        times.append(browser.wait("const n = performance.getEntriesByType('navigation')[0];"
                                  "return n && n.domContentLoadedEventEnd > 0 && "
                                  "n.domContentLoadedEventEnd"))
    print(f"\n  the page's shell with the server gone (service worker), DOMContentLoaded: "
          f"{percentile(times, 50):.0f} ms p50, {max(times):.0f} most (< 200 ms)")
