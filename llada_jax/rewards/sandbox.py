"""Runs untrusted Python programs against unit tests in a locked-down subprocess.

The code reward of REFERENCE §6 ("fraction of unit tests passed, executed in a sandbox")
executes model-written programs inside the RL loop, so a program must not be able to stall,
starve or damage the trainer or the machine. `run_assert_tests` and `run_io_tests` start a
fresh interpreter on this very file (`python -I -B sandbox.py`; the `__main__` block at the end
is the child side), feed it the program and its tests through a pipe, and read back one
record per test.

Layers, in the order the child applies them before the first line of untrusted code:

1. Own session and process group (`start_new_session`), SIGKILLed on the wall-clock timeout;
   when a sandbox uid is used, every process left with that uid is swept afterwards, so a
   grandchild that called `setsid` dies too. Enforced.
2. rlimits: CPU seconds, address space, file size (which also bounds the captured stdout),
   number of processes, open files, no core dumps. Enforced by the kernel, except
   RLIMIT_NPROC for a root child (root bypasses it), hence layer 4.
3. As root only: `unshare(CLONE_NEWNET | CLONE_NEWNS)`. The new network namespace has only a
   loopback device, down, so every connect or bind fails in the kernel, 127.0.0.1 included.
   In the new mount namespace every mount is remounted read-only except a bind mount of the
   work directory. Enforced where `unshare` is permitted; if the kernel refuses it (a
   container without CAP_SYS_ADMIN) the child goes on without these layers and says so in
   `SandboxResult.layers`.
   The same mount namespace keeps the interpreter's import path readable by the uid of
   layer 4: where an import directory lies under a directory that others may not traverse
   (pyenv in /root, mode 700), that directory is covered by an empty tmpfs in which only
   the import directories are bind-mounted back, at their own paths (`import_paths` in
   `layers`). Without it every module not imported before the privilege drop (`string`,
   `heapq`, ...) was missing. Where the namespace is refused, the child says in its stderr
   which import directories the sandbox uid cannot read.
4. As root only: drop to a fresh unprivileged uid/gid (random, in [2^20, 2^21), owning
   nothing), no supplementary groups. The child can then not signal the trainer, write
   any file it does not own, or fork past RLIMIT_NPROC; a uid of its own per run means that
   count is not shared with anything else. Enforced.
5. A Python audit hook (PEP 578) refusing fork/exec/spawn/subprocess/system, signals to other
   processes, sockets, ctypes, the import of `_posixsubprocess` and `ctypes`, opening for
   writing (or any change to a path: rename, remove, mkdir, link, chmod, ...) outside the
   work directory, reading `/proc`, opening a directory outside the work directory (it could
   serve as a `dir_fd`), frame introspection and `gc` object enumeration (which would reach
   the nonce, below). Best-effort: audit hooks are not a security boundary (a native
   extension module or an interpreter bug gets around them); it is the only process, network
   and file-system layer where 3 and 4 are unavailable, i.e. when not running as root.

Results cannot be forged by printing: each record the child writes starts with a random
nonce that only the trusted side knows (read from the pipe before the program runs and kept
out of the program's reach by layer 5), and for stdin/stdout tests the child only reports a
hash of the program's output; the expected outputs never enter the child.

Where it is not a sandbox: reads of world-readable files are allowed (the standard library
and site-packages must stay importable); a program that defeats the audit hook (and so
reads the nonce, or ignores the per-test alarm) can claim passed tests it did not pass,
though with layers 3-4 active it still cannot touch the network, the file system outside
its directory or other processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Sequence

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 0x400, 0x800, 0x200000
_MS_REMOUNT, _MS_BIND, _MS_MOVE, _MS_REC, _MS_PRIVATE = 0x20, 0x1000, 0x2000, 0x4000, 0x40000
_MOUNT_FLAGS = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC, "noatime": _MS_NOATIME,
                "nodiratime": _MS_NODIRATIME, "relatime": _MS_RELATIME}
_UID_RANGE = (1 << 20, 1 << 21)
_STDERR_CHARS = 2000


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits of one sandboxed run; the kernel layers can be switched off to test the rest."""
    timeout_s: float = 10.0  # wall clock for the whole run (all tests), then SIGKILL
    test_timeout_s: float = 2.0  # per test, by SIGALRM inside the child (best-effort)
    cpu_s: int = 10  # RLIMIT_CPU
    memory_bytes: int = 1 << 30  # RLIMIT_AS
    file_bytes: int = 8 << 20  # RLIMIT_FSIZE: any file written, the captured stdout included
    max_processes: int = 8  # RLIMIT_NPROC, counted for the sandbox uid
    max_open_files: int = 64  # RLIMIT_NOFILE
    drop_privileges: bool = True  # as root: run as a fresh unprivileged uid
    private_network: bool = True  # as root: a network namespace without interfaces
    read_only_fs: bool = True  # as root: a mount namespace, read-only except the work directory
    audit_hook: bool = True


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of a run. `status`: "ok" (every test ran), "timeout" (killed at the wall-clock
    limit), "crashed" (the child died early: an rlimit signal, `os._exit`, a launcher error).
    Tests that did not report count as failed. `layers` lists the isolation layers the child
    actually applied (empty if it died before saying). `reasons[i]` says why test i failed
    ("" if it passed): the exception type and message, "timeout: ...", "wrong output: ...",
    or why it never reported (wall-clock timeout, the signal or exit status that ended the child)."""
    passed: int
    total: int
    results: tuple[bool, ...]
    status: str
    returncode: int | None
    layers: tuple[str, ...]
    stderr: str
    seconds: float
    reasons: tuple[str, ...] = ()

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0

    @property
    def failure(self) -> str:
        """One line on what went wrong: the distinct reasons of the failed tests with their
        indices ("" if all passed)."""
        seen: dict[str, list[int]] = {}
        for i, reason in enumerate(self.reasons):
            if reason:
                seen.setdefault(reason, []).append(i)
        return "; ".join(f"test {','.join(map(str, idx))}: {reason}" for reason, idx in seen.items())


def normalise_output(text: str) -> str:
    """Program output as compared with the expected output: trailing spaces of each line and
    trailing blank lines do not matter."""
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def _digest(text: str) -> str:
    return hashlib.sha256(normalise_output(text).encode()).hexdigest()


def run_assert_tests(program: str, tests: Sequence[str], config: SandboxConfig = SandboxConfig()) -> SandboxResult:
    """Runs `program` then each test (Python statements, usually `assert f(x) == y`) in a fresh
    namespace per test; a test passes if it raises nothing within `config.test_timeout_s`."""
    return _run(program, "assert", list(tests), None, config)


def run_io_tests(program: str, cases: Sequence[tuple[str, str]], config: SandboxConfig = SandboxConfig()) -> SandboxResult:
    """Runs `program` once per (stdin, expected stdout) case; a case passes if the output
    equals the expected one up to `normalise_output`. `SystemExit` ends a run normally."""
    digests = [_digest(expected) for _, expected in cases]
    result = _run(program, "io", [stdin for stdin, _ in cases], digests, config)
    reasons = tuple(f"{r}; expected: {normalise_output(expected)[:200]}" if r.startswith("wrong output: ") else r
                    for r, (_, expected) in zip(result.reasons, cases))
    return dataclasses.replace(result, reasons=reasons)


def _run(program: str, kind: str, tests: list[str], digests: list[str] | None, config: SandboxConfig) -> SandboxResult:
    start = time.monotonic()
    root = os.geteuid() == 0
    uid = random.SystemRandom().randrange(*_UID_RANGE) if root and config.drop_privileges else None
    nonce = secrets.token_hex(16)
    spec = {"nonce": nonce, "program": program, "kind": kind, "tests": tests, "uid": uid,
            **dataclasses.asdict(config)}
    workroot = tempfile.mkdtemp(prefix="llada-sandbox-")
    workdir = os.path.join(workroot, "work")
    os.mkdir(workdir, 0o700)
    if uid is not None:
        os.chown(workdir, uid, uid)
        os.chmod(workroot, 0o711)  # the sandbox uid may traverse to its directory, not list ours
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    proc, status = None, "ok"
    try:
        with open(os.path.join(workroot, "stdout"), "wb+") as out, open(os.path.join(workroot, "stderr"), "wb+") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-B", os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                    stdout=out, stderr=err, cwd=workdir, env=env, start_new_session=True)
            try:
                proc.communicate(json.dumps(spec).encode(), timeout=config.timeout_s)
            except subprocess.TimeoutExpired:
                status = "timeout"
            except BrokenPipeError:
                pass  # the child died before reading its spec; its stderr says why
            _kill(proc, uid)
            out.seek(0)
            records = _records(out.read(), nonce)
            err.seek(0)
            stderr = err.read(_STDERR_CHARS * 4).decode(errors="replace")[:_STDERR_CHARS]
    finally:
        if proc is not None:
            _kill(proc, uid)
        shutil.rmtree(workroot, ignore_errors=True)
    if status == "ok" and "done" not in records:
        status = "crashed"
    reported = records.get("test", {})
    unreported = _unreported_reason(status, proc.returncode, config, stderr)
    results, reasons = [], []
    for i in range(len(tests)):
        value, reason = reported.get(i, (None, unreported))
        passed = value == ("pass" if digests is None else digests[i])
        if not passed and not reason:
            reason = "wrong output" if digests is not None else "failed"
        results.append(passed)
        reasons.append("" if passed else reason)
    return SandboxResult(passed=sum(results), total=len(tests), results=tuple(results), status=status,
                         returncode=proc.returncode, layers=tuple(records.get("layers", ())), stderr=stderr,
                         seconds=time.monotonic() - start, reasons=tuple(reasons))


def _unreported_reason(status: str, returncode: int | None, config: SandboxConfig, stderr: str) -> str:
    """Why a test has no record: the run was killed at the wall clock, or the child died."""
    if status == "timeout":
        return f"timeout: the run exceeded timeout_s={config.timeout_s} s and was killed"
    if returncode is not None and returncode < 0:
        signame = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else str(-returncode)
        why = {"SIGXCPU": f" (CPU limit cpu_s={config.cpu_s} s)", "SIGXFSZ": f" (file size limit {config.file_bytes} bytes)",
               "SIGSEGV": " (a crash; with the address-space limit often a failed allocation)",
               "SIGKILL": " (killed)"}.get(signame, "")
        return f"not run: the sandboxed interpreter died by {signame}{why}"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    return f"not run: the sandboxed interpreter exited with status {returncode}" + (f" ({last[:200]})" if last else "")


def _records(stdout: bytes, nonce: str) -> dict:
    """The child's records in its stdout: lines `<nonce> layers <json>`, `<nonce> test <i> <value>
    <reason json>`, `<nonce> done`; any other line is the program's own output and ignored."""
    records: dict = {}
    prefix = nonce.encode() + b" "
    for line in stdout.split(b"\n"):
        if not line.startswith(prefix):
            continue
        kind, _, rest = line[len(prefix):].decode(errors="replace").partition(" ")
        if kind == "layers":
            records["layers"] = json.loads(rest)
        elif kind == "test":
            index, _, rest = rest.partition(" ")
            value, _, reason = rest.partition(" ")
            try:
                reason = json.loads(reason) if reason else ""
            except ValueError:
                reason = "unreadable reason"
            records.setdefault("test", {})[int(index)] = (value, str(reason))
        elif kind == "done":
            records["done"] = True
    return records


def _kill(proc: subprocess.Popen, uid: int | None) -> None:
    """SIGKILLs the child's process group and, with a sandbox uid, every process of that uid
    (a descendant may have left the group with setsid), until none is left; then reaps."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    if uid is None:
        return
    for _ in range(100):
        pids = _pids_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    raise RuntimeError(f"sandbox: processes of uid {uid} survive SIGKILL: {_pids_of_uid(uid)}")


def _pids_of_uid(uid: int) -> list[int]:
    """Live processes whose real uid is `uid`; zombies are dead already (their reaping is up to init)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if line.startswith(("State:", "Uid:")))
        except OSError:
            continue  # exited meanwhile
        if "Uid" in fields and int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
            pids.append(int(name))
    return pids


# ------------------------------------------------------------------------------ child side
def _isolate(spec: dict) -> list[str]:
    """Applies layers 2-4 of the module docstring to this process; returns the names of those applied."""
    import resource

    layers = ["process_group"]
    for limit, value in ((resource.RLIMIT_CPU, (spec["cpu_s"], spec["cpu_s"] + 1)),
                         (resource.RLIMIT_AS, (spec["memory_bytes"],) * 2),
                         (resource.RLIMIT_FSIZE, (spec["file_bytes"],) * 2),
                         (resource.RLIMIT_NPROC, (spec["max_processes"],) * 2),
                         (resource.RLIMIT_NOFILE, (spec["max_open_files"],) * 2),
                         (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(limit, value)
    layers.append("rlimits")
    workdir = os.getcwd()
    if os.geteuid() == 0:
        blocked = _import_paths_blocked() if spec["uid"] is not None else {}
        flags = (CLONE_NEWNET if spec["private_network"] else 0) | \
            (CLONE_NEWNS if spec["read_only_fs"] or blocked else 0)
        if flags:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(flags) == 0:  # else: not permitted here, the audit hook remains
                if flags & CLONE_NEWNET:
                    layers.append("private_network")
                if flags & CLONE_NEWNS:
                    _private_mounts(libc)
                    if blocked:
                        _expose_import_paths(libc, blocked, os.path.dirname(workdir))
                        layers.append("import_paths")
                    if spec["read_only_fs"]:
                        _read_only_mounts(libc, workdir)
                        layers.append("read_only_fs")
            for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
                del sys.modules[name]  # the program must import it afresh, which the audit hook refuses
        if spec["uid"] is not None:
            os.setgroups([])
            os.setgid(spec["uid"])
            os.setuid(spec["uid"])
            layers.append("unprivileged_uid")
            unreadable = [p for p in _import_paths() if not os.access(p, os.R_OK | os.X_OK)]
            if unreadable:
                os.write(2, f"sandbox: the sandbox uid cannot read the import directories {unreadable}; "
                            f"modules from them fail to import (no mount namespace to expose them)\n".encode())
    return layers


def _import_paths() -> list[str]:
    """The existing directories (and zip files) of the interpreter's import path, resolved."""
    return sorted({os.path.realpath(p) for p in sys.path if p and os.path.exists(p)})


def _import_paths_blocked() -> dict[str, list[str]]:
    """Import paths under a directory that others may not traverse, grouped by the topmost
    such directory: {blocking directory: [import paths below it]}."""
    import stat

    blocked: dict[str, list[str]] = {}
    for path in _import_paths():
        parts = path.strip("/").split("/")
        for k in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:k])
            if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                blocked.setdefault(ancestor, []).append(path)
                break
    for top, paths in blocked.items():  # drop paths inside another one of the list
        blocked[top] = [p for p in paths if not any(p.startswith(q + "/") for q in paths if q != p)]
    return blocked


def _mount(libc, source, target, flags, fstype=None, data=None) -> None:
    import ctypes

    enc = lambda x: x.encode() if isinstance(x, str) else x  # noqa: E731
    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        raise OSError(ctypes.get_errno(), f"sandbox: mount {source!r} on {target!r} with flags {flags:#x} failed")


def _private_mounts(libc) -> None:
    """Our mounts in the fresh namespace must not propagate to the host."""
    _mount(libc, "none", "/", _MS_REC | _MS_PRIVATE)


def _expose_import_paths(libc, blocked: dict[str, list[str]], stage_root: str) -> None:
    """In a fresh mount namespace, for each directory that hides import paths from the sandbox
    uid: bind-mounts those paths aside (under `stage_root`, ours), covers the directory with
    an empty tmpfs others may traverse, and moves the bind mounts back to the same paths.
    The rest of the hidden directory stays hidden (the tmpfs is empty)."""
    staged = []
    for top, paths in blocked.items():
        for path in paths:
            stage = os.path.join(stage_root, f"import{len(staged)}")
            if os.path.isdir(path):
                os.mkdir(stage, 0o700)
            else:
                open(stage, "x").close()  # a zip file on the path: a file mount point
            _mount(libc, path, stage, _MS_BIND | _MS_REC)
            staged.append((top, path, stage))
    for top in blocked:
        _mount(libc, "tmpfs", top, _MS_NOSUID | _MS_NODEV, "tmpfs", "mode=0755,size=1m")
    for top, path, stage in staged:
        if os.path.isdir(stage):
            os.makedirs(path, 0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
            open(path, "x").close()
        _mount(libc, stage, path, _MS_MOVE)


def _read_only_mounts(libc, workdir: str) -> None:
    """In a fresh mount namespace: remounts every mount read-only except a bind mount of `workdir`.
    Existing per-mount flags are kept (the kernel refuses to clear locked ones)."""
    _mount(libc, workdir, workdir, _MS_BIND)
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        target, options = fields[4].replace("\\040", " "), fields[5].split(",")
        if target == workdir:
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        for option in options:
            flags |= _MOUNT_FLAGS.get(option, 0)
        _mount(libc, None, target, flags)


_REFUSED_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.startfile",
    "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
    "sys.settrace", "sys.setprofile", "sys._current_frames", "sys._current_exceptions",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents"})
_REFUSED_PREFIXES = ("socket.", "ctypes.")
_REFUSED_IMPORTS = frozenset({"ctypes", "_ctypes", "_posixsubprocess"})
_FRAME_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})
# event -> (indices of path arguments, indices of dir_fd arguments), from the audit events table
_PATH_EVENTS = {
    "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()),
    "os.link": ((0, 1), (2, 3)), "os.mkdir": ((0,), (2,)), "os.remove": ((0,), (1,)),
    "os.rename": ((0, 1), (2, 3)), "os.rmdir": ((0,), (1,)), "os.symlink": ((1,), (2,)),
    "os.truncate": ((0,), ()), "os.utime": ((0,), (3,)), "os.setxattr": ((0,), ()),
    "os.removexattr": ((0,), ())}


def _install_audit_hook(workdir: str) -> None:
    """Layer 5 of the module docstring. Everything the hook calls is bound here, so that the
    program cannot change the hook's behaviour by patching modules."""
    realpath, isdir, fsdecode = os.path.realpath, os.path.isdir, os.fsdecode
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    inside_prefix = workdir.rstrip("/") + "/"

    def resolved(path) -> str | None:
        return None if isinstance(path, int) else realpath(fsdecode(path))  # an int is an open fd

    def inside(path) -> bool:
        p = resolved(path)
        return p is None or p == workdir or p.startswith(inside_prefix)

    def hook(event: str, args: tuple) -> None:
        if event in _REFUSED_EVENTS or event.startswith(_REFUSED_PREFIXES):
            raise PermissionError(f"sandbox: {event} refused")
        if event == "open":
            path, mode, flags = args
            if inside(path):
                return
            writing = bool((flags or 0) & write_flags) or (isinstance(mode, str) and any(c in mode for c in "wax+"))
            p = resolved(path)
            if writing or p == "/proc" or p.startswith("/proc/") or isdir(p):
                raise PermissionError(f"sandbox: open({path!r}, {mode!r}) refused")
        elif event in _PATH_EVENTS:
            paths, dir_fds = _PATH_EVENTS[event]
            if any(args[i] is not None for i in dir_fds) or not all(inside(args[i]) for i in paths):
                raise PermissionError(f"sandbox: {event}{args!r} refused")
        elif event == "import" and args[0] in _REFUSED_IMPORTS:
            raise ImportError(f"sandbox: import {args[0]} refused")
        elif event == "object.__getattr__" and args[1] in _FRAME_ATTRIBUTES:
            raise AttributeError(f"sandbox: {args[1]} refused")
        elif event == "sys._getframe":
            raise ValueError("sandbox: sys._getframe refused")  # ValueError: what namedtuple & co. tolerate

    sys.addaudithook(hook)


class _TestTimeout(BaseException):
    """Raised by SIGALRM in the test that overran `test_timeout_s`."""


def _alarm(signum, frame):
    raise _TestTimeout


def _describe(error: BaseException, spec: dict, test: str | None = None) -> str:
    """A failed test's reason: the alarm as a timeout, a MemoryError with the limit, else
    `Type: message` (or, for an exception without a message, the test that raised it)."""
    if isinstance(error, _TestTimeout):
        return f"timeout: the test exceeded test_timeout_s={spec['test_timeout_s']} s"
    name = type(error).__name__
    message = str(error)
    if isinstance(error, MemoryError):
        return f"MemoryError: {message} (memory limit memory_bytes={spec['memory_bytes']})".replace(":  (", ": (")
    if isinstance(error, SyntaxError):
        return f"SyntaxError: {error.msg} (line {error.lineno})"
    if message:
        return f"{name}: {message}"
    return f"{name} in {test.strip()[:200]!r}" if test else name


class _Unclosable(io.BytesIO):
    """A BytesIO that outlives `sys.stdout.close()` by the program, so its output can still be read."""

    def close(self) -> None:
        pass


def _child_main() -> None:
    """The child: reads its spec, isolates itself, runs the tests and writes nonce-prefixed records."""
    import builtins

    spec = json.loads(sys.stdin.buffer.read())
    nonce = spec.pop("nonce").encode()
    layers = _isolate(spec)
    workdir = os.getcwd()
    if spec["audit_hook"]:
        _install_audit_hook(workdir)
        layers.append("audit_hook")
    write, run, setitimer, digest_of, normalise = os.write, exec, signal.setitimer, hashlib.sha256, normalise_output
    text_io, capture, stdin_type, dumps = io.TextIOWrapper, _Unclosable, io.BytesIO, json.dumps
    write(1, b"\n" + nonce + b" layers " + json.dumps(layers).encode() + b"\n")
    signal.signal(signal.SIGALRM, _alarm)
    compile_error = ""
    try:
        code = compile(spec["program"], "<program>", "exec")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        code, compile_error = None, _describe(e, spec)
    for i, test in enumerate(spec["tests"]):
        value, reason = b"fail", compile_error
        try:
            try:
                setitimer(signal.ITIMER_REAL, spec["test_timeout_s"])
                if code is None:
                    pass
                elif spec["kind"] == "assert":
                    namespace = {"__name__": "__main__", "__builtins__": builtins}
                    run(code, namespace)
                    run(compile(test, "<test>", "exec"), namespace)
                    value = b"pass"
                else:
                    sys.stdin = text_io(stdin_type(test.encode()), encoding="utf-8")
                    sys.stdout = out = text_io(capture(), encoding="utf-8")
                    try:
                        run(code, {"__name__": "__main__", "__builtins__": builtins})
                    except SystemExit:
                        pass
                    out.flush()
                    text = out.buffer.getvalue().decode("utf-8", errors="replace")
                    value = digest_of(normalise(text).encode()).hexdigest().encode()
                    reason = "wrong output: " + normalise(text)[:200]
            finally:
                setitimer(signal.ITIMER_REAL, 0)
        except BaseException as e:  # the program's failures, the alarm, MemoryError: the test failed
            try:
                reason = _describe(e, spec, test if spec["kind"] == "assert" else None)
            except BaseException:  # noqa: BLE001 - a hostile __str__
                reason = "failed (the exception could not be described)"
        try:
            reason_json = dumps(reason[:500]).encode()
        except BaseException:  # noqa: BLE001
            reason_json = b'"failed"'
        write(1, b"\n" + nonce + b" test %d " % i + value + b" " + reason_json + b"\n")
    write(1, b"\n" + nonce + b" done\n")
    os._exit(0)  # without waiting for threads the program may have left running


if __name__ == "__main__":
    _child_main()
