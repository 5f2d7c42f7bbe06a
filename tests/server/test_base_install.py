"""The base install (no `ray` extra) never imports Ray, `serve` stays ditserve's own command
even though Ray's package installs a script of the same name, and parsing a command line imports
no engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import SERVE

ROOT = Path(__file__).resolve().parents[2]

WITHOUT_RAY = """
import importlib, pkgutil, sys

class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is not installed (blocked by the test)")

sys.meta_path.insert(0, NoRay())
imported = []
for package in ("configs", "engine", "workers", "server"):
    module = importlib.import_module(package)
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        if info.name != "server.ray_replicas":  # the Ray mode itself, imported only for --replicas
            importlib.import_module(info.name)
            imported.append(info.name)
from server.cli import serve_main
try:
    serve_main(["tiny/z-image", "--replicas", "2"])
except SystemExit as exc:
    print("exit:", exc)
assert not [m for m in sys.modules if m == "ray" or m.startswith("ray.")]
print(len(imported), "modules")
"""


def test_every_module_imports_without_ray_and_replicas_ask_for_the_extra():
    done = subprocess.run([sys.executable, "-c", WITHOUT_RAY], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "need Ray Serve: pip install 'ditserve[ray]'" in done.stdout
    assert int(done.stdout.split()[-2]) > 40


def test_serve_and_ditserve_serve_are_ours_with_ray_installed():
    for command in ([SERVE, "--help"], [str(Path(SERVE).with_name("ditserve")), "serve", "--help"]):
        shown = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0 and "--tensor-parallel-size" in shown.stdout and "--replicas" in shown.stdout


HEAVY = "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers', 'engine'}))"


def test_the_command_lines_parse_without_importing_the_engine():
    """`serve --help` and argument errors answer at once: parsing imports configs/ only."""
    check = ("import sys; from server.cli import build_parser, build_serve_parser; build_parser(); "
             "args = build_serve_parser().parse_args(['tiny/z-image', '-tp', '2']); "
             "assert args.tensor_parallel_size == 2; "
             + HEAVY)
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


def test_a_misspelt_builtin_model_fails_before_any_heavy_import_with_the_names():
    check = ("import sys; from server.cli import serve_main\ntry: serve_main(['builtin/shape', '-tp', '2'])\n"
             "except SystemExit as exc: print('exit', exc.code)\n" + HEAVY)
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.split("\n")[:2] == ["exit 2", "[]"], done.stdout + done.stderr[-2000:]
    assert "unknown built-in model 'builtin/shape'" in done.stderr
    assert "builtin/shapes" in done.stderr and "tiny/z-image" in done.stderr
