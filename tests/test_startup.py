"""Start-up: what `import kling_async` and `kling-async --help` load, in fresh interpreters.

Times are benchmarks/startup.py's business; these tests pin the structure that makes them
small (no aiohttp, anyio, tqdm or importlib.metadata until something needs them) and check that
every public name still imports as before.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import kling_async as ka

HEAVY = ["aiohttp", "anyio", "attr", "tqdm", "importlib.metadata", "sqlite3", "jwt"]


def _loaded_after(code: str) -> dict[str, bool]:
    report = f"print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    probe = f"{code}\nimport json, sys\n{report}"
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout
    loaded: dict[str, bool] = json.loads(out.splitlines()[-1])
    return loaded


def test_import_loads_no_network_stack() -> None:
    loaded = _loaded_after("import kling_async")
    assert not any(loaded.values()), loaded


def test_cli_help_loads_no_network_stack() -> None:
    code = (
        "from kling_async._cli import main\n"
        "try:\n"
        "    main(['run', '--help'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code"
    )
    loaded = _loaded_after(code)
    assert not any(loaded.values()), loaded


def test_cli_version_reads_the_installed_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kling_async", "--version"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert out.strip() == f"kling-async {ka.__version__}"


def test_usage_error_loads_no_network_stack() -> None:
    code = (
        "from kling_async._cli import main\n"
        "try:\n"
        "    main(['run'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 2, exc.code"
    )
    loaded = _loaded_after(code)
    assert not loaded["aiohttp"], loaded


def test_every_public_name_imports_in_a_fresh_interpreter() -> None:
    names = ", ".join(ka.__all__)
    code = f"from kling_async import {names}\nfrom kling_async import *\nassert KlingClient"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lazy_names_are_the_modules_own() -> None:
    from kling_async._client import KlingClient
    from kling_async._iterator import BatchIterator
    from kling_async._transport import Timeouts

    assert ka.KlingClient is KlingClient
    assert ka.BatchIterator is BatchIterator
    assert ka.Timeouts is Timeouts
    assert set(ka.__all__) <= set(dir(ka))
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = ka.no_such_name  # type: ignore[attr-defined]  # (the misspelling is the test)


def test_the_light_price_defaults_are_the_records_own() -> None:
    import attrs

    from kling_async._prices import PRICE_DEFAULTS

    assert attrs.asdict(ka.DEFAULT_PRICES) == PRICE_DEFAULTS
    assert attrs.asdict(ka.Prices()) == PRICE_DEFAULTS
