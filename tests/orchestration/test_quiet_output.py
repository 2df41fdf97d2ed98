"""Library notices a user cannot act on are not printed: starting the private local Ray does not
announce Ray's default token authentication."""

from __future__ import annotations

import subprocess
import sys

START = ("from orchestration.parallel import connect; import ray; print(connect(local_num_cpus=1)); "
         "print(ray.get(ray.remote(lambda: 41 + 1).remote()))")


def test_starting_the_private_ray_prints_no_token_auth_notice(tmp_path):
    done = subprocess.run([sys.executable, "-c", START], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "local Ray on 127.0.0.1" in done.stdout and "42" in done.stdout
    assert "Token authentication" not in done.stderr + done.stdout
