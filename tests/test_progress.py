"""Progress bars: live on a terminal, sparse in a log file (a nohup'd training run, CI)."""
import subprocess
import sys

SCRIPT = """
import time
from worldmodel.progress import progress_bar
bar = progress_bar(total=40, desc="work")
for i in range(40):
    time.sleep(0.05)
    bar.set_postfix(i=i, refresh=False)
    bar.update(1)
bar.close()
"""


def test_progress_into_a_pipe_is_not_redrawn_every_update():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    draws = [x for x in r.stderr.replace("\r", "\n").splitlines() if x.startswith("work")]
    assert draws and "40/40" in draws[-1]
    assert len(draws) <= 3, draws  # tqdm's default (every 0.1 s) would draw about 20 times in these 2 s
