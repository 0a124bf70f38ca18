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
