import json

import pytest

from qlaunch.config.errors import UsageError
from qlaunch.data.formats import load_samples, to_messages

SYS = "You are a helpful assistant."


def test_qwen_format_with_sharegpt_role_names():
    record = {"id": "1", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    assert to_messages(record, SYS) == [
        {"role": "system", "content": SYS},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]


def test_qwen_format_with_its_own_system_turn_keeps_it():
    record = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "user", "value": "q"},
                                {"from": "assistant", "value": "a"}]}
    assert to_messages(record, SYS)[0] == {"role": "system", "content": "Be brief."}


def test_openai_messages_and_per_sample_system_field():
    record = {"system": "S", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert [m["role"] for m in to_messages(record, SYS)] == ["system", "user", "assistant"]
    assert to_messages(record, SYS)[0]["content"] == "S"


def test_alpaca_joins_instruction_and_input():
    record = {"instruction": "Translate", "input": "chat", "output": "cat"}
    assert to_messages(record, "") == [
        {"role": "user", "content": "Translate\n\nchat"},
        {"role": "assistant", "content": "cat"},
    ]


def test_empty_default_system_adds_none():
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert to_messages(record, "")[0]["role"] == "user"


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"conversations": [{"from": "robot", "value": "x"}]}, "role 'robot'"),
        ({"conversations": [{"from": "user", "value": "only a question"}]}, "no assistant turn"),
        ({"text": "plain"}, "expected 'conversations'"),
        ({"messages": []}, "has no turns"),
        ([1, 2], "not an object"),
    ],
)
def test_malformed_records_are_explained(record, expected):
    with pytest.raises(ValueError, match=expected):
        to_messages(record, SYS)


def test_jsonl_and_json_files(tmp_path):
    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (tmp_path / "a.jsonl").write_text(json.dumps(rec) + "\n\n" + json.dumps(rec) + "\n")
    (tmp_path / "a.json").write_text(json.dumps([rec]))
    assert len(load_samples(str(tmp_path / "a.jsonl"), SYS)) == 2
    assert len(load_samples(str(tmp_path / "a.json"), SYS)) == 1


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": []}\n{oops\n')
    with pytest.raises(UsageError, match=r"bad.jsonl:2:\d+: not valid JSON"):
        load_samples(str(path), SYS)


def test_every_malformed_record_reported_at_once(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    rows = [good, {"id": "x7", "messages": [{"role": "user", "content": "q"}]}, {"foo": 1}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(UsageError) as err:
        load_samples(str(path), SYS)
    text = "\n".join(err.value.problems)
    assert "2 malformed record(s)" in text
    assert "record 1 (id 'x7') has no assistant turn" in text
    assert "record 2 has keys foo" in text


def test_json_that_is_not_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"conversations": []}')
    with pytest.raises(UsageError, match="expected a JSON list of records, got dict"):
        load_samples(str(path), SYS)


GOOD = '{"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello"}]}'


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("record, words", [
    ('{"conversations": [{"from": "user", "value": "hi", "value": "bye"}, {"from": "assistant", "value": "x"}]}',
     "has the key 'value' more than once (JSON keeps only the last value)"),
    ('{"instruction": "add", "input": NaN, "output": "2"}', "holds the literal NaN, which is not JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "w": -Infinity}',
     "holds the literal -Infinity"),
])
def test_what_json_lets_through_is_a_malformed_record(tmp_path, suffix, record, words):
    """json.loads keeps the last of two keys and turns NaN into a float that became the text "nan"."""
    from qlaunch.data.formats import JsonlSamples

    path = tmp_path / f"d{suffix}"
    path.write_text(f"[{GOOD}, {record}]" if suffix == ".json" else f"{GOOD}\n{record}\n")
    for read in ((load_samples,) if suffix == ".json" else (load_samples, JsonlSamples)):
        with pytest.raises(UsageError) as e:
            read(str(path), SYS)
        assert "1 malformed record(s)" in str(e.value) and f"record 1 {words}" in str(e.value), str(e.value)


def test_nesting_too_deep_to_parse_is_one_problem(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(UsageError, match="nested too deeply to parse"):
        load_samples(str(path), SYS)
    path.write_text(json.dumps([json.loads(GOOD) | {"meta": [[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]}]))
    with pytest.raises(UsageError, match="is nested more than 20 levels deep"):
        load_samples(str(path), SYS)


def test_empty_replies_are_counted_in_one_warning_and_refused_when_all_are_empty(tmp_path, caplog):
    import logging

    empty = GOOD.replace('"hello"', '"  "')
    path = tmp_path / "d.json"
    path.write_text(f"[{GOOD}, {empty}, {GOOD}, {empty}]")
    logger = logging.getLogger("qlaunch")
    logger.addHandler(caplog.handler)
    try:
        assert len(load_samples(str(path), SYS)) == 4
    finally:
        logger.removeHandler(caplog.handler)
    warnings = [r.getMessage() for r in caplog.records if "empty assistant replies" in r.getMessage()]
    assert len(set(warnings)) == 1 and "2 of 4 records have only empty assistant replies (records 1, 3)" in warnings[0]
    path.write_text(f"[{empty}, {empty}]")
    with pytest.raises(UsageError, match="every record's assistant replies are empty"):
        load_samples(str(path), SYS)
