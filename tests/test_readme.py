"""The README's promises: its runnable examples run as written, its commands name real things."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
PROGRAMS = [
    block
    for block in re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
    if "asyncio.run(main())" in block
]


def test_readme_has_runnable_examples() -> None:
    assert len(PROGRAMS) >= 2


@pytest.mark.parametrize("program", PROGRAMS, ids=[f"example-{i}" for i in range(len(PROGRAMS))])
def test_readme_example_runs_as_written(program: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the example prints what it did"
    assert "Traceback" not in done.stderr


def test_readme_leads_with_the_two_commands() -> None:
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.DOTALL)
    assert "kling-async run examples/jobs.jsonl --sandbox" in commands[0]
    assert "pytest" in commands[1]
    assert (ROOT / "examples" / "jobs.jsonl").is_file()
