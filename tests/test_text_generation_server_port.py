"""tools/run_text_generation_server.py: a --port that cannot be served is one error line before the model
loads. Flask took --port 99999 as 34463 (mod 2^16: the server listened where no client looks), -5 was
an OverflowError traceback, and a port in use under torchrun ended with a report naming no root cause."""
import os
import socket
import subprocess
import sys

import pytest

from megatron_core.inference import server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "run_text_generation_server.py")


@pytest.mark.parametrize("port", [99999, -5])
def test_a_port_out_of_range_is_one_line(port, tmp_path, capsys):
    assert server.main(["--load", str(tmp_path), "--port", str(port)]) == 2
    assert capsys.readouterr().err == (f"run_text_generation_server.py: error: --port must be in 0..65535 (0: any "
                                       f"free port), got {port}\n")


def test_a_port_in_use_is_the_root_cause_under_torchrun(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               TOOL, "--load", str(tmp_path), "--tensor-model-parallel-size", "2", "--port", str(port)],
                              capture_output=True, text=True, timeout=120, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
    line = (f"run_text_generation_server.py: error: --host 127.0.0.1 --port {port} cannot be served (Address "
            f"already in use); stop the program using that port or pass another --port (or --host)")
    assert proc.returncode != 0 and line in proc.stderr, proc.stderr[-3000:]
    assert f"traceback : {line}" in proc.stderr, proc.stderr[-3000:]  # torchrun's root cause


@pytest.mark.parametrize("host", ["no.such.host.invalid", "192.0.2.1"])
def test_a_host_that_cannot_be_bound_names_the_host_not_a_busy_port(host, tmp_path, capsys):
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): never an address of this machine. The fix said before to stop
    # the program using the port, which no program was.
    assert server.main(["--load", str(tmp_path), "--host", host, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"run_text_generation_server.py: error: --host {host} --port 0 cannot be served (") and \
        err.endswith("); pass a --host of this machine (127.0.0.1, 0.0.0.0 for every interface, or its own "
                     "name)\n") and err.count("\n") == 1, err
