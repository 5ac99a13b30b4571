"""A fork server for the scripts: one helper process imports the heavy third-party libraries (torch,
torchvision, numpy, PIL, lmdb, tqdm) once, then forks a fresh child per run that chdirs into the run
folder, points fds 0/1/2 at /dev/null and two files, sets sys.argv and sys.path[0] as the interpreter
would, and executes the script with runpy as __main__. Project modules and user modules are imported
fresh in each child. The child ends as the interpreter would (SystemExit's code; an uncaught exception
goes to sys.excepthook, which prints the usual "Traceback", and status 1; atexit handlers run), except
that it skips the ~1 s teardown of torch's modules.

Importing torch costs ~3 s per process and the suite runs the scripts about a hundred times, so
conftest.run_script goes through one shared server unless a test asks for a fresh interpreter (its own
environment variables, or fresh=True). test_bad_inputs.test_fork_server_matches_a_real_process checks
that the server reports what a real `python script.py` run reports.
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")

SERVER = r'''
import json, os, signal, sys
import numpy, PIL.Image, lmdb, tqdm, torch, torchvision  # the slow imports, shared by every run
reply = os.fdopen(os.dup(1), "w")
for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child becomes `python SCRIPT ARGS` run in request["cwd"]
        os.chdir(request["cwd"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                                (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            new = os.open(path, flags, 0o644)
            os.dup2(new, fd)
            os.close(new)
        reply.close()
        signal.alarm(request["timeout"])
        sys.argv = [request["script"]] + request["args"]
        sys.path[0] = os.path.dirname(request["script"])
        import atexit, runpy
        try:
            runpy.run_path(request["script"], run_name="__main__")
            code = 0
        except SystemExit as e:  # as the interpreter handles it
            code = e.code
            if code is None:
                code = 0
            elif not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
        except BaseException:
            sys.excepthook(*sys.exc_info())  # the interpreter's "Traceback (most recent call last): ..."
            code = 1
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code & 0xFF)  # skips the ~1 s teardown of torch's modules
    _, status = os.waitpid(pid, 0)
    reply.write(json.dumps(os.waitstatus_to_exitcode(status)) + "\n")
    reply.flush()
'''


def script_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([TESTS, ROOT])  # user modules from tests/ and the root on the path
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ in the run folders
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


class ForkServer:
    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-c", SERVER], env=script_env(), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.logs = tempfile.mkdtemp(prefix="fork-server-logs-")

    def run(self, script, args, cwd, logs=None, timeout=300):
        """`python ROOT/script args` in cwd, as a CompletedProcess; its output goes through two files in
        `logs` (default: the server's own folder, outside every run folder)."""
        logs = logs or self.logs
        out, err = os.path.join(logs, "stdout.txt"), os.path.join(logs, "stderr.txt")
        args = [str(a) for a in args]
        request = {"script": os.path.join(ROOT, str(script)), "args": args, "cwd": str(cwd),
                   "stdout": out, "stderr": err, "timeout": int(timeout)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the fork server died")
        with open(out) as f_out, open(err) as f_err:
            return subprocess.CompletedProcess([request["script"]] + args, json.loads(line), f_out.read(),
                                               f_err.read())

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=30)


_shared = None


def shared():
    """The session's one server, started on first use."""
    global _shared
    if _shared is None or _shared.process.poll() is not None:
        _shared = ForkServer()
    return _shared


def close_shared():
    global _shared
    if _shared is not None:
        _shared.close()
        _shared = None
