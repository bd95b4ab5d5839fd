"""The installed import names: `play/` and `kernels/` are installed as `worldmodel.play` and
`worldmodel.kernels`, so another distribution's top-level `kernels` or `play` (a PyPI package named
`kernels` exists) and ours are both importable."""
import subprocess
import sys


def _run(code: str, cwd, env_path: str | None = None):
    import os

    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if env_path:
        env["PYTHONPATH"] = env_path
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_package_installs_no_top_level_kernels_or_play(tmp_path):
    r = _run("import importlib.util as u; print(u.find_spec('kernels') is None, u.find_spec('play') is None)",
             tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"], "a top-level kernels/play is importable outside the repository"


def test_another_kernels_package_and_ours_are_both_importable(tmp_path):
    for name in ("kernels", "play"):
        (tmp_path / "site" / name).mkdir(parents=True)
        (tmp_path / "site" / name / "__init__.py").write_text(f"OWNER = 'another {name}'\n")
    r = _run("import kernels, play, worldmodel.kernels, worldmodel.play.keymap\n"
             "print(kernels.OWNER, '|', play.OWNER, '|', callable(worldmodel.kernels.available_backends))",
             tmp_path, str(tmp_path / "site"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "another kernels | another play | True"
