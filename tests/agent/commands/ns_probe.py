"""Ask the real qemu-ga and our handlers the same questions about a fake /sys.

Run by the tests inside a private mount namespace
(``unshare -m --propagation private python ns_probe.py ...``), never on its
own: it mounts tmpfs over /sys and /run *in that namespace only*, copies
the fake tree there, optionally loop-mounts an image (and points its
/sys/dev/block entry at a fake device) or bind-mounts a directory, then
starts qemu-ga on a unix socket and prints, as JSON, both agents' answers
to every command named on the command line.

    ns_probe.py OUTER_NS TREE QEMU_GA WORKDIR [--loop IMAGE=DEVDIR] [--bind SRC=DST] COMMAND...

OUTER_NS is the caller's ``readlink /proc/self/ns/mnt``: the probe refuses
to touch anything unless it runs in a different mount namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from qga_helpers import AgentClient, agent_call, make_ctx  # noqa: E402

from agent.platform import Platform  # noqa: E402


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def main(argv: list[str]) -> int:
    outer_ns, tree, qemu_ga, workdir, *rest = argv
    # refuse to run where it would change the machine's own /sys
    if os.readlink("/proc/self/ns/mnt") == outer_ns:
        print("ns_probe.py must run in its own mount namespace", file=sys.stderr)
        return 2
    mount("-t", "tmpfs", "fake-sys", "/sys")
    shutil.copytree(os.path.join(tree, "sys"), "/sys", symlinks=True, dirs_exist_ok=True)
    mount("-t", "tmpfs", "fake-run", "/run")
    if os.path.isdir(os.path.join(tree, "run")):
        shutil.copytree(os.path.join(tree, "run"), "/run", symlinks=True, dirs_exist_ok=True)
    commands = []
    while rest:
        item = rest.pop(0)
        if item == "--loop":
            image, devdir = rest.pop(0).split("=", 1)
            target = os.path.join(workdir, "loop-mnt")
            os.makedirs(target, exist_ok=True)
            mount("-o", "loop", image, target)
            st = os.stat(target)
            link = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(os.path.relpath(devdir, os.path.dirname(link)), link)
        elif item == "--bind":
            src, dst = rest.pop(0).split("=", 1)
            os.makedirs(dst, exist_ok=True)
            mount("--bind", src, dst)
        else:
            commands.append(item)
    sock = os.path.join(workdir, "ns.sock")
    env = dict(os.environ, SYSTEMD_DEVICE_VERIFY_SYSFS="0")  # let libudev read a tmpfs /sys
    proc = subprocess.Popen([qemu_ga, "-m", "unix-listen", "-p", sock, "-t", workdir],
                            env=env, stderr=subprocess.DEVNULL)
    try:
        client = AgentClient(sock)
        theirs = [client.request(name) for name in commands]
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    ctx = make_ctx(Platform(), workdir)
    ours = [agent_call(ctx, name) for name in commands]
    json.dump({"theirs": theirs, "ours": ours}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
