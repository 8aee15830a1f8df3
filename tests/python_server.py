"""A Python that has already imported torch, diffusers, laplace-torch, rdkit and genunc, and forks
a fresh process for each script or ``-c`` block the tests run.

Every example and documentation block the suite runs as a user would (``python script.py ...``,
``python -c code``) paid the same ~5 s of imports; forked from this server each one starts with
them done, and is otherwise its own process: its own working folder, environment, argv,
``__main__``, stdout and stderr (file descriptors, so C-level output is caught), exit status.
Tests that are about what a fresh interpreter imports (``genunc --help`` loads no torch) or about
launchers (torchrun, accelerate) keep real subprocesses.

Protocol (one JSON object per line on stdin / stdout): the client sends ``{"argv", "cwd", "env",
"stdout", "stderr"}`` (argv as after ``python``: ``["-c", code]`` or ``[script, *args]``); the
server answers ``{"pid"}`` when the child starts and ``{"returncode"}`` when it ends.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import traceback
import types
import warnings

PRELOAD = ("torch", "numpy", "scipy.stats", "diffusers", "laplace", "rdkit.Chem", "e3nn",
           "genunc", "genunc.pipelines", "genunc.cli")


def _preload() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PRELOAD:
            try:
                __import__(name)
            except ImportError:  # an optional extra that is not installed: the child imports it
                pass


def _exit_code(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


def _run(request: dict) -> int:
    """In the forked child: become ``python *argv`` in the request's folder and environment."""
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__  # the server had swapped stdout
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if "OMP_NUM_THREADS" in request["env"]:  # torch read it when the server imported it
        import torch

        torch.set_num_threads(int(request["env"]["OMP_NUM_THREADS"]))
    argv = request["argv"]
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    try:
        if argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path[0:1] = ["", *extra]
            main = types.ModuleType("__main__")
            sys.modules["__main__"] = main
            exec(compile(argv[1], "<string>", "exec"), main.__dict__)
        else:
            sys.argv = list(argv)
            sys.path[0:1] = [os.path.dirname(os.path.abspath(argv[0])), *extra]
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except BaseException:  # noqa: BLE001 - what the interpreter does: print it, exit 1
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def serve() -> None:
    _preload()
    answers = sys.stdout
    sys.stdout = sys.stderr  # anything the imports print must not corrupt the protocol
    answers.write(json.dumps({"ready": True}) + "\n")
    answers.flush()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _run(request)
            finally:
                os._exit(code & 0xFF)
        answers.write(json.dumps({"pid": pid}) + "\n")
        answers.flush()
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        answers.flush()


if __name__ == "__main__":
    serve()
