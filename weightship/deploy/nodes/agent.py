"""The deployer's helper on a node: facts for preflight, the model fetch, and the health gate.

Standard library only: it runs under the node's own ``python3`` before weightship is installed
there. The deployer sends this file's source on stdin with its arguments (secrets included)
appended, so nothing it is given appears on a command line or in a process list, and prints one
JSON object on stdout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _listening(port: int) -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in (_read(table) or "").splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _unit_state(unit: str) -> dict[str, str]:
    out = subprocess.run(["systemctl", "show", unit, "-p", "ActiveState,SubState,NRestarts,Result,ExecMainStatus"],
                         capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def facts(args: dict[str, Any]) -> dict[str, Any]:
    """What preflight needs to know about this node, in one round trip."""
    prefix = args["prefix"]
    existing = prefix
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing) or "/"
    usage = shutil.disk_usage(existing)
    traversable = all(os.stat(p).st_mode & 0o001 for p in _parents(prefix) if os.path.isdir(p))
    gpus = _gpus(args["unit"]) if shutil.which("nvidia-smi") else None
    state = _unit_state(args["unit"])
    version = subprocess.run(["systemctl", "--version"], capture_output=True, text=True).stdout.split()
    return {
        "systemd": os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None,
        "systemd_version": int(version[1]) if len(version) > 1 and version[1].isdigit() else 0,
        "prefix_owners": _owners(prefix),
        "python": list(sys.version_info[:3]),
        "free_bytes": usage.free,
        "free_at": existing,
        "prefix_traversable": traversable,
        "port_busy": _listening(int(args["port"])),
        "unit_active": state.get("ActiveState") == "active",
        "gpus": gpus,
        "flock": shutil.which("flock") is not None,
        "useradd": shutil.which("useradd") is not None,
    }


def _number(text: str) -> int:
    text = text.strip()
    return int(text) if text.isdigit() else 0  # "[N/A]" on some boards


def _gpus(unit: str) -> list[dict[str, int]]:
    """Each GPU's memory, counting what this unit's own processes hold as free (a redeploy
    replaces them)."""
    def query(what: str) -> list[list[str]]:
        r = subprocess.run(["nvidia-smi", f"--query-{what}", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True)
        return [[v.strip() for v in line.split(",")] for line in r.stdout.splitlines() if line.strip()] \
            if r.returncode == 0 else []

    ours: dict[str, int] = {}
    for pid, uuid, used in query("compute-apps=pid,gpu_uuid,used_memory"):
        if unit in (_read(f"/proc/{pid}/cgroup") or ""):
            ours[uuid] = ours.get(uuid, 0) + _number(used)
    return [{"index": _number(i), "total_mib": _number(total), "used_mib": _number(used) - ours.get(uuid, 0)}
            for i, uuid, total, used in query("gpu=index,uuid,memory.total,memory.used")]


def _owners(path: str) -> list[str]:
    """Parents of ``path`` that someone other than root could change (as sshd's StrictModes)."""
    unsafe = []
    for p in _parents(path):
        try:
            st = os.stat(p)
        except OSError:
            break
        if st.st_uid != 0 or st.st_mode & 0o022:
            unsafe.append(p)
    return unsafe


def _parents(path: str) -> list[str]:
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def fetch(args: dict[str, Any]) -> dict[str, Any]:
    """``weightship fetch`` into the model directory with the inventory's environment."""
    env = {**os.environ, **args["env"], "WEIGHTSHIP_HOME": args["home"]}
    command = [args["weightship"], "--json", "fetch", args["ref"], "--to", args["to"], *args["args"]]
    r = subprocess.run(command, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        lines = [line for line in r.stderr.splitlines() if line.startswith("error")] or r.stderr.splitlines()[-1:]
        return {"ok": False, "exit": r.returncode, "why": lines[0] if lines else f"exit {r.returncode}"}
    try:
        result = json.loads(r.stdout)
    except ValueError:
        result = {}
    return {"ok": True, "result": result}


def _get(url: str, timeout: float, key: str | None = None, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None
    except (OSError, ValueError):
        return 0, None


def _first_key(path: str) -> str | None:
    lines = (_read(path) or "").splitlines()
    return next((s.strip() for s in lines if s.strip() and not s.strip().startswith("#")), None)


def gate(args: dict[str, Any]) -> dict[str, Any]:
    """Wait for ``/ready``, then ask one greedy chat completion; fail at once if the unit exits."""
    deadline = time.monotonic() + float(args["timeout"])
    base = f"http://127.0.0.1:{args['port']}"
    key = _first_key(args["key_file"])
    while True:
        state = _unit_state(args["unit"])
        if state.get("ActiveState") in ("failed", "inactive") or state.get("SubState") == "auto-restart" \
                or int(state.get("NRestarts", "0") or 0) > int(args.get("restarts", 0)):
            return {"ok": False, "why": f"the unit exited ({state.get('Result', '?')}, status "
                                        f"{state.get('ExecMainStatus', '?')})", "journal": _journal(args["unit"])}
        status, _ = _get(base + "/ready", 2)
        if status == 200:
            break
        if time.monotonic() > deadline:
            return {"ok": False, "why": f"not ready within {args['timeout']} s", "journal": _journal(args["unit"])}
        time.sleep(0.5)
    body = {"model": args.get("model") or "default", "messages": [{"role": "user", "content": args["prompt"]}],
            "temperature": 0, "max_tokens": int(args["max_tokens"])}
    status, answer = _get(base + "/v1/models", 10, key)
    if status == 200 and answer and answer.get("data"):
        body["model"] = answer["data"][0]["id"]
    status, answer = _get(base + "/v1/chat/completions", max(5.0, deadline - time.monotonic()), key, body)
    if status != 200 or not answer:
        return {"ok": False, "why": f"chat completion answered HTTP {status}", "journal": _journal(args["unit"])}
    return {"ok": True, "answer": answer["choices"][0]["message"]["content"], "model": body["model"]}


def keys_loaded(args: dict[str, Any]) -> dict[str, Any]:
    """The digest of the key file the server has loaded (``GET /v1/keys``, asked with the
    operator's key), or None when it does not answer."""
    status, body = _get(f"http://127.0.0.1:{args['port']}/v1/keys", 3, _first_key(args["key_file"]))
    return {"digest": body.get("digest") if status == 200 and isinstance(body, dict) else None}


def ready(args: dict[str, Any]) -> dict[str, Any]:
    status, _ = _get(f"http://127.0.0.1:{args['port']}/ready", 3)
    return {"ready": status == 200}


def state(args: dict[str, Any]) -> dict[str, Any]:
    """The deployment as this node has it: current release, history, installed unit, activity."""
    app, unit_path = args["app"], args["unit_path"]
    read = _read
    keys = _read(app + "/api-keys")
    target = os.readlink(app + "/current") if os.path.islink(app + "/current") else None
    current = os.path.basename(target) if target else None
    release = read(f"{app}/releases/{current}/release.json") if current else None
    history = read(app + "/history.json")
    unit = _unit_state(args["unit"])
    models, runtimes = args["models"], args["runtimes"]
    return {
        "current": current,
        "release": json.loads(release) if release else None,
        "history": json.loads(history) if history else [],
        "unit_text": read(unit_path),
        "keys_sha256": hashlib.sha256(keys.encode()).hexdigest() if keys is not None else None,
        "active": unit.get("ActiveState"),
        "sub": unit.get("SubState"),
        "models": sorted(d for d in (os.listdir(models) if os.path.isdir(models) else [])
                         if os.path.exists(f"{models}/{d}/.weightship/manifest.json")),
        "runtimes": sorted(d for d in (os.listdir(runtimes) if os.path.isdir(runtimes) else [])
                           if os.path.exists(f"{runtimes}/{d}/.complete")),
    }


def apps(args: dict[str, Any]) -> dict[str, Any]:
    """Every deployment on this node (``PREFIX/apps/NAME``) with its instance marker, if any."""
    root = args["prefix"] + "/apps"
    found: dict[str, Any] = {}
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        marker = _read(f"{root}/{name}/instance.json")
        try:
            found[name] = json.loads(marker) if marker else None
        except ValueError:
            found[name] = {"unreadable": True}
    return {"apps": found}


def _link(path: str) -> str | None:
    return os.path.realpath(path) if os.path.islink(path) else None


def prune(args: dict[str, Any]) -> dict[str, Any]:
    """Remove the releases of ``app`` that neither ``current`` nor the last ``keep`` releases of
    its history name (rollback goes back through those), then the models and runtimes of the
    removed releases that no release left on this node, of any deployment, uses. Models no
    removed release used (an uninstalled deployment's cache, kept on purpose) stay."""
    app, prefix = args["app"], os.path.realpath(args["prefix"])
    releases = app + "/releases"
    history = json.loads(_read(app + "/history.json") or "[]")
    current = os.path.basename(os.readlink(app + "/current")) if os.path.islink(app + "/current") else None
    recent: list[str] = []  # the last ``keep`` distinct releases of the history
    for rev in reversed(history):
        if len(recent) == int(args["keep"]):
            break
        if rev not in recent:
            recent.append(rev)
    keep = {current, *recent}
    names = sorted(os.listdir(releases)) if os.path.isdir(releases) else []
    gone = [rev for rev in names if rev not in keep and "." not in rev]
    freed: set[str] = set()
    for rev in gone:
        freed |= {t for t in (_link(f"{releases}/{rev}/model"), _link(f"{releases}/{rev}/runtime")) if t}
        shutil.rmtree(f"{releases}/{rev}")
    used = {_link(f"{prefix}/apps/{name}/releases/{rev}/{what}")
            for name in (os.listdir(prefix + "/apps") if os.path.isdir(prefix + "/apps") else [])
            for rev in (os.listdir(f"{prefix}/apps/{name}/releases")
                        if os.path.isdir(f"{prefix}/apps/{name}/releases") else [])
            for what in ("model", "runtime")}
    removed = []
    for target in sorted(freed - used):
        if os.path.dirname(target) in (prefix + "/models", prefix + "/runtimes") and os.path.isdir(target):
            shutil.rmtree(target)
            removed.append(target)
    return {"releases": gone, "removed": removed}


def _journal(unit: str) -> list[str]:
    r = subprocess.run(["journalctl", "-u", unit, "-n", "15", "--no-pager", "-o", "cat"],
                       capture_output=True, text=True)
    return r.stdout.splitlines()[-15:]


VERBS = {"apps": apps, "facts": facts, "fetch": fetch, "gate": gate, "keys_loaded": keys_loaded, "prune": prune,
         "ready": ready, "state": state}


def main(verb: str, args: dict[str, Any]) -> None:
    print(json.dumps(VERBS[verb](args)))
