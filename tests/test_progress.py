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


def test_encoding_a_dataset_shows_its_bar_in_a_log(tmp_path, capsys):
    # the latent cache of `train model` and `distill` can take most of an hour on a CPU: a run under
    # nohup must say so in its log, not only on a terminal
    from test_train import TINY_SET, make_dataset
    from worldmodel.model.autoencoder import Autoencoder
    from worldmodel.training.clips import encode_dataset
    from worldmodel.training.config import parse_overrides, resolve_config
    data = make_dataset(tmp_path / "data")
    cfg = resolve_config("tiny", parse_overrides(TINY_SET[1::2]))
    assert not sys.stderr.isatty()
    encode_dataset(Autoencoder(cfg.autoencoder), data, "train", 3, progress=True)
    assert "encoding data (train)" in capsys.readouterr().err
