"""The official format's fast parsing path agrees with the strict (cattrs) one where it answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kling_async._errors import MalformedResponseError
from kling_async.dialects._kling_wire import _fast_task, _strict_task, task_snapshot

SAMPLES = Path(__file__).parent / "samples" / "kling"

# Values a gateway might put anywhere: the right types, and the usual wrong ones.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**60), 2**60),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["succeed", "processing", "submitted", "failed", "12.5", "nan", ""]),
)
jsonish = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)


def maybe(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # Mostly the right type, so that one odd field at a time is common.
    return st.one_of(values, values, values, values, scalars, jsonish)


video = st.fixed_dictionaries(
    {"url": maybe(st.text(max_size=12))}, optional={"id": maybe(st.text(max_size=4))}
)
task = st.fixed_dictionaries(
    {"task_id": maybe(st.text(min_size=1, max_size=8))},
    optional={
        "task_status": maybe(st.sampled_from(["succeed", "processing", "failed", "odd"])),
        "task_status_msg": maybe(st.text(max_size=8)),
        "created_at": maybe(st.integers(0, 2**45) | st.floats(0, 1e13)),
        "updated_at": maybe(st.integers(0, 2**45)),
        "task_result": maybe(
            st.fixed_dictionaries({}, optional={"videos": maybe(st.lists(video, max_size=2))})
        ),
        "task_info": maybe(
            st.fixed_dictionaries(
                {},
                optional={
                    "external_task_id": maybe(st.text(max_size=6)),
                    "parent_video": maybe(
                        st.fixed_dictionaries(
                            {},
                            optional={
                                "url": maybe(st.text(max_size=6)),
                                "id": maybe(st.text(max_size=4)),
                            },
                        )
                    ),
                },
            )
        ),
        "extra": jsonish,
    },
)


@settings(max_examples=1000, deadline=None)
@given(raw=st.one_of(task, jsonish))
def test_fast_path_answers_only_as_the_strict_path_would(raw: object) -> None:
    fast = _fast_task(raw)
    if fast is None:
        return  # the strict path decides
    assert fast == _strict_task(raw, where="data", status=200)


def task_objects(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, dict) and "task_id" in body:
        return [body]  # a callback
    data = body.get("data") if isinstance(body, dict) else None
    items = data if isinstance(data, list) else [data]
    return [item for item in items if isinstance(item, dict) and "task_id" in item]


@pytest.mark.parametrize("path", sorted(SAMPLES.glob("*.json")), ids=lambda p: p.name)
def test_vendor_samples_take_the_fast_path(path: Path) -> None:
    for raw in task_objects(json.loads(path.read_text(encoding="utf-8"))):
        fast = _fast_task(raw)
        assert fast is not None
        assert fast == _strict_task(raw, where="data", status=200)


def test_an_id_sent_as_a_number_takes_the_strict_path() -> None:
    raw = {"task_id": 817067112967086149, "task_status": "submitted"}
    assert _fast_task(raw) is None
    assert task_snapshot(raw, where="data", status=200).task_id == "817067112967086149"


def test_an_odd_answer_still_gets_the_strict_paths_message() -> None:
    videos = [{"id": "v", "url": ["https://x/a.mp4"]}]
    raw = {"task_id": "t1", "task_status": "succeed", "task_result": {"videos": videos}}
    assert _fast_task(raw) is None
    with pytest.raises(MalformedResponseError, match=r"data\.task_result\.videos\[0\]\.url"):
        task_snapshot(raw, where="data", status=200)
