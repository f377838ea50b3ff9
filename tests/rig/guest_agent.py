"""Runs inside a rig kernel as init's last step: executes commands sent by the host over the
console and sends back exit status, stdout and stderr.

Framing: each message is one line of base64(JSON). Host->guest lines are bare; guest->host
lines start with FRAME so kernel messages on the same console are never mistaken for them.
"""
import base64
import json
import os
import signal
import subprocess
import threading
import tty

FRAME = "\x1eRIG "
_lock = threading.Lock()
_procs: dict[int, subprocess.Popen] = {}
_seen: set[int] = set()


def send(msg: dict) -> None:
    line = FRAME + base64.b64encode(json.dumps(msg).encode()).decode() + "\n"
    with _lock:
        os.write(1, line.encode())


def run(req: dict) -> None:
    rid = req["id"]
    env = dict(os.environ)
    env.update(req.get("env") or {})
    try:
        stdin = open(req["stdin_file"], "rb") if req.get("stdin_file") else subprocess.DEVNULL
        p = subprocess.Popen(req["argv"], stdin=stdin,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                             cwd=req.get("cwd") or "/", start_new_session=True)
    except OSError as e:
        send({"id": rid, "rc": 127, "out": "", "err": base64.b64encode(str(e).encode()).decode()})
        return
    _procs[rid] = p
    try:
        out, err = p.communicate(timeout=req.get("timeout"))
        rc = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        rc, err = -999, err + b"\n[rig] timed out"
    finally:
        _procs.pop(rid, None)
        if req.get("stdin_file"):
            stdin.close()
            os.unlink(req["stdin_file"])
    send({"id": rid, "rc": rc, "out": base64.b64encode(out).decode(), "err": base64.b64encode(err).decode()})


def main() -> None:
    try:
        tty.setraw(0)
    except Exception:
        pass
    os.environ["DMMIG_STATE_DIR"] = "/run/dmmig"
    os.environ.setdefault("HOME", "/root")
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    send({"id": 0, "ready": True})
    buf = b""
    while True:
        chunk = os.read(0, 65536)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            line = line.strip()
            if not line:
                continue
            try:
                req = json.loads(base64.b64decode(line))
            except Exception as e:  # noise on the line: report and go on
                send({"id": -1, "error": f"bad request: {e}"})
                continue
            op = req.get("op")
            if op == "run":
                # the host resends a request it saw no ack for: run each id once, ack every copy
                send({"id": req["id"], "ack": True})
                if req["id"] not in _seen:
                    _seen.add(req["id"])
                    threading.Thread(target=run, args=(req,), daemon=True).start()
            elif op == "signal":
                p = _procs.get(req["target"])
                if p is not None:
                    try:
                        os.killpg(p.pid, req["sig"])
                    except ProcessLookupError:
                        pass
                send({"id": req["id"], "rc": 0, "out": "", "err": ""})
            elif op == "poweroff":
                os.sync()
                send({"id": req["id"], "rc": 0, "out": "", "err": ""})
                os.execv("/sbin/poweroff", ["poweroff", "-f"])


def init() -> None:
    """PID 1 must reap orphans (daemons that exit, double forks); the agent must not, or it
    would steal the exit status of its own commands. So PID 1 forks the agent and reaps."""
    pid = os.fork()
    if pid == 0:
        main()
        os._exit(0)
    while True:
        try:
            done, _ = os.wait()
        except ChildProcessError:
            break
        if done == pid:
            break
    os.sync()
    os.execv("/sbin/poweroff", ["poweroff", "-f"])


if __name__ == "__main__":
    init() if os.getpid() == 1 else main()
