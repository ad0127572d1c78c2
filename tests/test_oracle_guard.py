"""The oracle cannot vanish silently: a broken FlagEmbedding fails the oracle tests (with the import
error), and under CI=true any skip caused by a failed import fails the run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pytest(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def test_unimportable_flagembedding_fails_the_oracle_tests(tmp_path):
    # A sitecustomize run before pytest makes `import FlagEmbedding` raise, as a broken install would.
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['FlagEmbedding'] = None\n")
    env = _env(PYTHONPATH=os.pathsep.join([str(hide), str(ROOT)]))
    done = _pytest(["tests/test_embedders.py", "-k", "test_query_instruction", "-q"], ROOT, env)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "oracle 'FlagEmbedding' cannot be imported" in out, out
    assert "ModuleNotFoundError: import of FlagEmbedding halted; None in sys.modules" in out, out
    assert " skipped" not in out.splitlines()[-1], out


def test_import_skips_fail_only_under_ci(tmp_path):
    (tmp_path / "test_needs_missing.py").write_text(textwrap.dedent("""
        import pytest

        def test_needs_a_missing_module():
            pytest.importorskip("bge_ray_no_such_module")

        def test_skips_for_another_reason():
            pytest.skip("not on this platform")
    """))
    args = ["-p", "tests.import_guard", "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path)]
    local = _pytest(args, tmp_path, _env())
    assert local.returncode == 0 and "2 skipped" in local.stdout, local.stdout + local.stderr
    ci = _pytest(args, tmp_path, _env(CI="true"))
    out = ci.stdout + ci.stderr
    assert ci.returncode == 1, out
    assert "1 failed, 1 skipped" in out, out
    assert "skipped because an import failed" in out and "bge_ray_no_such_module" in out, out
