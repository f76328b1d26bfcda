"""An OpenAI-compatible HTTP server on the engine (stdlib only): `/v1/chat/completions`, `/v1/completions`,
`/v1/models`, with server-sent-event streaming.

One engine thread owns the engine and its continuous-batching scheduler; HTTP handler threads
(ThreadingHTTPServer) hand requests to it through a queue and read tokens back from a per-request queue, so
concurrent requests decode together. A streaming client that disconnects marks its request aborted and its slot is
freed at the next sync. Bad requests get OpenAI's error shape with a 4xx status.

    server = start_server(model, tokenizer, host="127.0.0.1", port=0)   # port 0: any free port
    ... server.url ...
    server.close()
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import ConfigError
from .engine import get_engine
from .fast_generate import eos_ids_of
from .sampling import SamplingParams
from .scheduler import Request, Scheduler

logger = logging.getLogger(__name__)
REQUEST_TIMEOUT_S = 600
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "stop", "ignore_eos", "min_tokens")


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


class EngineLoop:
    """The engine thread: admits queued requests and steps the scheduler while any work is left."""

    def __init__(self, model, tokenizer, max_num_seqs: int, max_len: int):
        self.engine = get_engine(model, slots=max_num_seqs, max_len=max_len)
        self.sched = Scheduler(self.engine, tokenizer)
        self.inbox: queue.Queue = queue.Queue()
        self.stopped = threading.Event()
        self.finish_reasons: dict[str, int] = {}  # counts, for monitoring (and tests)
        self.thread = threading.Thread(target=self._run, name="fastlm-engine", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> None:
        self.inbox.put(request)

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                first = self.inbox.get(timeout=0.05) if not self.sched.busy() else None
            except queue.Empty:
                continue
            for req in ([first] if first is not None else []) + self._drain():
                try:
                    self.sched.add(req)
                except ValueError as exc:
                    req.tag.put(("error", str(exc)))
            try:
                self.sched.step()
                for res in self.sched.finished:  # finished in this step, or aborted before admission
                    self.finish_reasons[res.finish_reason] = self.finish_reasons.get(res.finish_reason, 0) + 1
                    res.request.tag.put(("done", res))
                self.sched.finished.clear()
            except Exception as exc:  # noqa: BLE001 - fail the requests in flight, keep serving
                logger.exception("fastlm serve: engine step failed")
                for i, req in enumerate(self.sched.slot_req):
                    if req is not None:
                        req.tag.put(("error", f"engine error: {exc}"))
                        self.sched.slot_req[i] = None
                        self.sched.done[i] = True

    def _drain(self) -> list[Request]:
        items = []
        while True:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                return items

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)


def _params(body: dict, chat: bool) -> SamplingParams:
    n = body.get("n", 1)
    if n != 1:
        raise BadRequest(f"n={n!r}: fastlm serve returns one choice per request; send n=1 (or several requests)",
                         "n")
    kw = {k: body[k] for k in _SAMPLING_FIELDS if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    kw["max_tokens"] = max_tokens if max_tokens is not None else (None if chat else 16)  # OpenAI's defaults
    if body.get("logprobs") not in (None, False):
        raise BadRequest("logprobs are not served by fastlm serve; use model.fast_generate(..., "
                         "SamplingParams(logprobs=k))", "logprobs")
    try:
        return SamplingParams(**kw)
    except ConfigError as exc:
        raise BadRequest(str(exc), exc.problems[0].name if exc.problems else None) from exc
    except TypeError as exc:
        raise BadRequest(str(exc)) from exc


class _Handler(BaseHTTPRequestHandler):
    server_version = "fastlm"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # keep test output quiet; errors are logged where they happen
        logger.debug("fastlm serve: " + fmt, *args)

    # ----------------------------------------------------------- plumbing
    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, param: str | None = None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._json(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError as exc:
            raise BadRequest(f"the request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path.rstrip("/") == "/v1/models":
            app = self.server.app
            self._json(200, {"object": "list", "data": [{"id": app.model_name, "object": "model",
                                                         "created": app.created, "owned_by": "fastlm"}]})
        else:
            self._error(404, f"no route {self.path!r}; use /v1/models, /v1/completions or /v1/chat/completions")

    def do_POST(self):  # noqa: N802
        route = self.path.rstrip("/")
        try:
            body = self._body()  # read first: an unread body would corrupt the next request on this connection
            if route not in ("/v1/completions", "/v1/chat/completions"):
                raise BadRequest(f"no route {self.path!r}; use /v1/completions or /v1/chat/completions", status=404)
            chat = route.endswith("chat/completions")
            ids = self.server.app.prompt_ids(body, chat)
            params = _params(body, chat)
        except BadRequest as exc:
            self._error(exc.status, str(exc), exc.param)
            return
        self.server.app.respond(self, body, chat, ids, params)


class ServerApp:
    def __init__(self, model, tokenizer, model_name: str, max_num_seqs: int, max_len: int):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.max_len = max_len
        self.created = int(time.time())
        self.eos = eos_ids_of(model, tokenizer)
        self.loop = EngineLoop(model, tokenizer, max_num_seqs, max_len)

    def prompt_ids(self, body: dict, chat: bool) -> list[int]:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and "role" in m and "content" in m for m in messages):
                raise BadRequest("messages must be a non-empty list of {'role': ..., 'content': ...}", "messages")
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise BadRequest("this model's tokenizer has no chat template; use /v1/completions", "messages")
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            return self.tokenizer(prompt)["input_ids"]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return prompt
        raise BadRequest("prompt must be a non-empty string or a list of token ids (one prompt per request)",
                         "prompt")

    def respond(self, handler: _Handler, body: dict, chat: bool, ids: list[int], params: SamplingParams) -> None:
        outbox: queue.Queue = queue.Queue()
        stream = bool(body.get("stream"))
        req = Request(ids, params, eos_ids=self.eos, tag=outbox,
                      on_tokens=(lambda new: outbox.put(("tokens", new))) if stream else None)
        self.loop.submit(req)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if stream:
            self._stream(handler, req, outbox, rid, chat)
            return
        kind, value = self._wait(outbox, req)
        if kind == "error":
            handler._error(400, value)
            return
        text = self._final_text(value)
        choice = {"index": 0, "finish_reason": value.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        handler._json(200, {"id": rid, "object": "chat.completion" if chat else "text_completion",
                            "created": int(time.time()), "model": self.model_name, "choices": [choice],
                            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(value.token_ids),
                                      "total_tokens": len(ids) + len(value.token_ids)}})

    @staticmethod
    def _wait(outbox, req, tokens_too: bool = False):
        """The next message for this request: ("tokens", ids) when tokens_too, ("done", Result) or ("error", text)."""
        while True:
            try:
                kind, value = outbox.get(timeout=REQUEST_TIMEOUT_S)
            except queue.Empty:
                req.aborted = True
                return "error", f"no result within {REQUEST_TIMEOUT_S} s"
            if kind != "tokens" or tokens_too:
                return kind, value

    def _final_text(self, res) -> str:
        p = res.request.params
        text = self.tokenizer.decode(res.token_ids, skip_special_tokens=p.skip_special_tokens)
        if res.stop_str and not p.include_stop_str_in_output and res.stop_str in text:
            text = text[:text.find(res.stop_str)]
        return text

    def _stream(self, handler, req, outbox, rid, chat) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: str | None, finish: str | None, first: bool = False) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": piece or ""} if first else (
                    {"content": piece} if piece else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
            payload = {"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": [choice]}
            return f"data: {json.dumps(payload)}\n\n".encode()

        stops = req.params.stop_strings
        hold = max((len(s) for s in stops), default=1) - 1
        ids: list[int] = []
        sent = 0
        try:
            if chat:
                handler.wfile.write(chunk("", None, first=True))
                handler.wfile.flush()
            while True:
                kind, value = self._wait(outbox, req, tokens_too=True)
                if kind == "tokens":
                    ids.extend(value)
                    text = self.tokenizer.decode(ids, skip_special_tokens=req.params.skip_special_tokens)
                    safe = len(text) - hold
                    for s in stops:
                        if s in text:
                            safe = min(safe, text.find(s))
                    while safe > sent and text[safe - 1] == "\ufffd":  # an unfinished multi-byte character
                        safe -= 1
                    if safe > sent:
                        handler.wfile.write(chunk(text[sent:safe], None))
                        handler.wfile.flush()
                        sent = safe
                    continue
                if kind == "error":
                    handler.wfile.write(f"data: {json.dumps({'error': {'message': value}})}\n\n".encode())
                else:
                    text = self._final_text(value)
                    handler.wfile.write(chunk(text[sent:], value.finish_reason))
                handler.wfile.write(b"data: [DONE]\n\n")
                handler.wfile.flush()
                return
        except (BrokenPipeError, ConnectionResetError, OSError):
            req.aborted = True  # the client went away: free its slot


class RunningServer:
    def __init__(self, httpd: ThreadingHTTPServer, app: ServerApp):
        self.httpd, self.app = httpd, app
        host, port = httpd.server_address[:2]
        self.url = f"http://{host}:{port}/v1"
        self.thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.app.loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start_server(model, tokenizer, host: str = "127.0.0.1", port: int = 8000, model_name: str = "fastlm",
                 max_num_seqs: int = 16, max_len: int | None = None, background: bool = True) -> RunningServer:
    """Serve `model` over HTTP. background=True returns at once (the caller closes it); False blocks until
    interrupted."""
    if max_len is None:
        max_len = int(getattr(getattr(model, "get_base_model", lambda: model)(), "max_seq_length", 0) or 2048)
    app = ServerApp(model, tokenizer, model_name, max_num_seqs, max_len)
    httpd = ThreadingHTTPServer((host, port), _Handler)
    httpd.daemon_threads = True
    httpd.app = app
    server = RunningServer(httpd, app)
    if background:
        server.thread.start()
        return server
    import sys

    print(f"fastlm serve: listening on {server.url} (model {model_name!r}); Ctrl-C stops", file=sys.stderr,
          flush=True)
    try:
        httpd.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return server
