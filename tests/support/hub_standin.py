"""A stand-in for the Hugging Face Hub: the few endpoints that huggingface_hub's `create_repo`, `create_branch` and
`upload_folder` call (its git + LFS "basic" transfer path, with HF_HUB_DISABLE_XET=1), on 127.0.0.1, recording
what the real client sent. It is not the Hub: it checks no permission beyond one token, keeps no history, and
stops by itself after `lifetime_s`.

    with HubStandIn(token="hf_standin...") as hub:          # HF_ENDPOINT=hub.url in the child's environment
        ...                                                  # hub.repos, hub.branches, hub.commits
    HubStandIn(unauthorized=True)                            # every request answered 401

Endpoints (huggingface_hub 2.4.0: hf_api.create_repo, create_branch, _validate_yaml; _commit_api._fetch_upload_modes
and _send_commit; lfs.post_lfs_batch_info and lfs_upload):

    POST /api/repos/create                            {name, organization, visibility, type} -> {url}
    GET  /api/models/ORG/NAME                         repo info (create_repo's fallback on 401/403)
    POST /api/models/ORG/NAME/branch/BRANCH           a branch
    POST /api/validate-yaml                           the README's metadata: {errors: [], warnings: []}
    POST /api/models/ORG/NAME/preupload/REV           {files: [{path, sample, size}]} -> uploadMode lfs | regular
    POST /ORG/NAME.git/info/lfs/objects/batch         {objects: [{oid, size}]} -> basic upload + verify actions
    PUT  /lfs-upload/OID                              the LFS bytes (sha256 checked)
    POST /lfs-verify/OID                              {oid, size}
    POST /api/models/ORG/NAME/commit/REV              NDJSON: header, file (base64), lfsFile (oid) -> {commitUrl, commitOid}
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".model")  # the Hub's default .gitattributes, in part


class HubStandIn:
    def __init__(self, token: str = "hf_standinTOKEN0123456789abcdef", unauthorized: bool = False,
                 lifetime_s: float = 300.0):
        self.token, self.unauthorized, self.lifetime_s = token, unauthorized, lifetime_s
        self.repos: list[dict] = []  # create_repo payloads
        self.branches: list[tuple[str, str]] = []  # (repo, branch)
        self.commits: list[dict] = []  # {repo, revision, summary, files: {path: bytes}, lfs: [paths]}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.lfs: dict[str, bytes] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "HubStandIn":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self._timer = threading.Timer(self.lifetime_s, self._server.shutdown)  # bounded: it stops by itself
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    # -----------------------------------------------------------------------------------------
    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    return self.rfile.read(n)
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return b""

            def _send(self, status: int, payload: dict | None = None) -> None:
                body = json.dumps(payload or {}).encode()
                hub.requests.append((self.command, self.path, status))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _authorized(self) -> bool:
                if hub.unauthorized or self.headers.get("Authorization") != f"Bearer {hub.token}":
                    self._send(401, {"error": "Invalid credentials in Authorization header"})
                    return False
                return True

            def do_GET(self):
                body = self._body()
                del body
                if not self._authorized():
                    return
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)", urlparse(self.path).path)
                if m and any(f"{r['organization']}/{r['name']}" == m.group(1) for r in hub.repos):
                    return self._send(200, {"id": m.group(1), "sha": "0" * 40, "siblings": []})
                self._send(404, {"error": "Repository not found"})

            def do_PUT(self):
                body = self._body()
                m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", self.path)
                if not m or hashlib.sha256(body).hexdigest() != m.group(1):
                    return self._send(400, {"error": "sha256 mismatch"})
                hub.lfs[m.group(1)] = body
                self._send(200)

            def do_POST(self):
                body = self._body()
                if not self._authorized():
                    return
                path = urlparse(self.path).path
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    hub.repos.append(payload)
                    return self._send(200, {"url": f"{hub.url}/{payload['organization']}/{payload['name']}"})
                if path == "/api/validate-yaml":
                    return self._send(200, {"errors": [], "warnings": []})
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/(.+)", path):
                    hub.branches.append((m.group(1), unquote(m.group(2))))
                    return self._send(200, {})
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path):
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                         "shouldIgnore": False, "oid": None} for f in files]})
                if m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
                    objects = json.loads(body)["objects"]
                    return self._send(200, {"transfer": "basic", "objects": [
                        {"oid": o["oid"], "size": o["size"],
                         "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"},
                                     "verify": {"href": f"{hub.url}/lfs-verify/{o['oid']}"}}} for o in objects]})
                if re.fullmatch(r"/lfs-verify/[0-9a-f]{64}", path):
                    return self._send(200, {})
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path):
                    commit = {"repo": m.group(1), "revision": unquote(m.group(2)), "files": {}, "lfs": []}
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        value = item["value"]
                        if item["key"] == "header":
                            commit["summary"] = value["summary"]
                        elif item["key"] == "file":
                            commit["files"][value["path"]] = base64.b64decode(value["content"])
                        elif item["key"] == "lfsFile":
                            if value["oid"] not in hub.lfs:
                                return self._send(422, {"error": f"LFS object {value['oid']} was never uploaded"})
                            commit["files"][value["path"]] = hub.lfs[value["oid"]]
                            commit["lfs"].append(value["path"])
                    hub.commits.append(commit)
                    oid = hashlib.sha1(body).hexdigest()
                    return self._send(200, {"commitUrl": f"{hub.url}/{m.group(1)}/commit/{oid}", "commitOid": oid,
                                            "pullRequestUrl": None})
                self._send(404, {"error": f"the stand-in does not implement POST {path}"})

        return Handler

