"""The pure parts of the audience API and CLI: cursors, merging workers' figures, the list table."""

from __future__ import annotations

import pytest

from features.catalogue import NAMES
from models.audiences import parse_audiences
from streams.audience_api import decode_position, encode_position, merge_figures
from streams.cli_audience import format_list
from streams.lookup import BadQuery

AUDS = parse_audiences("hot: purchase >= 0.6; busy: n_events_24h >= 3", ["purchase", "churn"], NAMES)


def test_a_position_survives_its_cursor_and_anything_else_is_a_bad_cursor() -> None:
    for p, after in [(0, None), (3, "u|x y"), (2, "é")]:
        assert decode_position(encode_position(p, after), partitions=4) == (p, after)
    for bad in ["", "garbage!", encode_position(4, None), encode_position(-1, "u")]:
        with pytest.raises(BadQuery) as exc:
            decode_position(bad, partitions=4)
        assert exc.value.code == "bad_cursor"


def test_figures_of_the_workers_add_up_and_say_what_is_missing() -> None:
    parts = [
        {
            "partitions": [0, 1],
            "complete": True,
            "audiences": {
                "hot": {"members": 3, "expected_converters": 2.25},
                "busy": {"members": 5, "expected_converters": 0.0},
            },
        },
        {
            "partitions": [2],
            "complete": False,
            "audiences": {
                "hot": {"members": 1, "expected_converters": 0.75},
                "gone": {"members": 9, "expected_converters": 1.0},
            },
        },
    ]
    out = merge_figures(AUDS, parts, partitions=4)
    by_name = {a["name"]: a for a in out["audiences"]}
    assert list(by_name) == ["hot", "busy"]  # definition order; a removed definition's figures are ignored
    assert by_name["hot"]["members"] == 4
    assert by_name["hot"]["expected_converters"] == 3.0 and by_name["hot"]["expected_non_converters"] == 1.0
    assert by_name["busy"]["members"] == 5 and "expected_converters" not in by_name["busy"]  # reads no score
    assert out["missing_partitions"] == [3] and out["complete"] is False


def test_the_list_table_has_a_row_per_audience_and_names_missing_partitions() -> None:
    body = merge_figures(
        AUDS,
        [
            {
                "partitions": [0],
                "complete": True,
                "audiences": {
                    "hot": {"members": 1204, "expected_converters": 871.26},
                    "busy": {"members": 7, "expected_converters": 0.0},
                },
            }
        ],
        partitions=2,
    )
    lines = format_list(body).splitlines()
    assert lines[0].split() == ["audience", "members", "exp.", "converters", "condition"]
    assert lines[1].split()[:3] == ["hot", "1,204", "871.3"] and lines[1].endswith("purchase >= 0.6")
    assert lines[2].split()[:3] == ["busy", "7", "-"]
    assert lines[3] == "partitions not counted (no owner answered): [1]"
