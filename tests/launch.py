"""Starting real multi-process runs in tests: accelerate's launcher, two CPU processes joined over gloo."""

import importlib.util
import socket
import sys


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_process_launcher() -> list[str] | None:
    """``accelerate launch`` for two local processes, or ``None`` where the launcher is not installed.

    accelerate 1.x's ``--cpu`` launcher starts one process (without mpirun); ``--multi_gpu`` is torchrun, and the
    processes join over gloo when the code asks accelerate for the CPU. Launched with this interpreter
    (``python -m accelerate.commands.launch``), so the processes see the same installed packages as the test, even
    in a virtual environment whose ``accelerate`` script is another Python's.
    """
    if importlib.util.find_spec("accelerate.commands.launch") is None:
        return None
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1"]
    return launcher + ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
