"""The tokenized-data cache: built once, reused without tokenizing, rebuilt on any key change or damage."""
import copy
import json
import logging
import os

import pytest

import qlaunch
from qlaunch.config import files
from qlaunch.config.errors import UsageError
from qlaunch.data import cache, tokenize
from qlaunch.data.dataset import LazyDataset, TokenizedDataset, build_dataset, build_on_main_first
from qlaunch.data.formats import load_samples
from qlaunch.data.tokenize import TokenizeStats, tokenize_messages_per_sample

SYS = "You are a helpful assistant."


@pytest.fixture
def calls(monkeypatch):
    """How many conversations went through the tokenizer (counted where the cache calls it)."""
    counter = {"conversations": 0, "batches": 0}
    original = tokenize.tokenize_rows

    def counting(tokenizer, conversations, *args, **kwargs):
        counter["conversations"] += len(conversations)
        counter["batches"] += 1
        return original(tokenizer, conversations, *args, **kwargs)

    monkeypatch.setattr(tokenize, "tokenize_rows", counting)
    return counter


@pytest.fixture
def data(demo, tmp_path):
    """A private copy of the demo training file (tests below edit it)."""
    records = json.load(open(demo["train"]))
    records += [{"conversations": [{"from": "user", "value": "Opposite of up?"},
                                   {"from": "assistant", "value": "down " * 40}]},  # truncated at 40
                {"instruction": "word " * 60, "output": "ok"},  # no reply left within 40 tokens
                {"conversations": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"},
                                   {"from": "user", "value": "c " * 20}, {"from": "assistant", "value": "d " * 20}]}]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return str(path)


def build(path, tokenizer, cache_dir, **overrides):
    kwargs = dict(max_length=128, system_message=SYS, truncation="truncate", show_progress=False,
                  cache_dir=None if cache_dir is None else str(cache_dir), num_proc=1)
    kwargs.update(overrides)
    return build_dataset(path, tokenizer, **kwargs)


def rows(dataset):
    return [dataset[i] for i in range(len(dataset))]


def entries(cache_dir):
    return sorted(n for n in os.listdir(cache_dir) if not n.startswith("."))


def per_sample_reference(path, tokenizer, max_length, truncation, system_message=SYS):
    stats, items = TokenizeStats(), []
    for messages in load_samples(path, system_message):
        item = tokenize_messages_per_sample(tokenizer, messages, max_length, truncation, stats)
        if item is not None:
            items.append(item)
    return items, stats


def test_second_run_tokenizes_nothing_and_prints_the_stored_statistics(tokenizer, data, tmp_path, calls, caplog):
    caplog.set_level(logging.INFO, logger="qlaunch")
    first = build(data, tokenizer, tmp_path / "c")
    assert calls["conversations"] == len(load_samples(data, SYS)) > 0
    assert len(entries(tmp_path / "c")) == 1
    calls["conversations"] = calls["batches"] = 0
    caplog.clear()
    second = build(data, tokenizer, tmp_path / "c")
    assert calls == {"conversations": 0, "batches": 0}  # nothing tokenized
    assert isinstance(second, TokenizedDataset) and rows(second) == rows(first)
    assert second.stats == first.stats
    text = caplog.text
    assert "tokenized data reused from" in text
    assert first.stats.summary(128) in text  # the statistics, printed on reuse


@pytest.mark.parametrize("max_length,truncation", [(4096, "truncate"), (40, "truncate"), (40, "drop")])
def test_cached_result_equals_uncached_and_the_per_sample_path(tokenizer, data, tmp_path, max_length, truncation):
    cached = build(data, tokenizer, tmp_path / "c", max_length=max_length, truncation=truncation)
    in_memory = build(data, tokenizer, None, max_length=max_length, truncation=truncation)
    items, stats = per_sample_reference(data, tokenizer, max_length, truncation)
    assert isinstance(in_memory.items, list) and not isinstance(cached.items, list)
    assert rows(cached) == rows(in_memory) == items
    assert cached.stats == in_memory.stats == stats
    assert cached.lengths == [len(item["input_ids"]) for item in items]
    if max_length == 40:
        assert stats.truncated + stats.dropped > 0  # the case exercises the length policy


def test_two_worker_build_equals_one(tokenizer, data, tmp_path):
    one = build(data, tokenizer, tmp_path / "one", max_length=64, num_proc=1)
    two = build(data, tokenizer, tmp_path / "two", max_length=64, num_proc=2)
    assert rows(two) == rows(one) and two.stats == one.stats


def _with_special_token(tok):
    tok = copy.deepcopy(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<|qlaunch_test|>"]})
    return tok


def _with_template(tok):
    tok = copy.deepcopy(tok)
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    return tok


CHANGES = {
    "data file content": lambda a: a["write"](),
    "max length": lambda a: a["kw"].update(max_length=96),
    "truncation": lambda a: a["kw"].update(truncation="drop"),
    "system message": lambda a: a["kw"].update(system_message="Be brief."),
    "tokenizer vocabulary": lambda a: a.update(tok=_with_special_token(a["tok"])),
    "chat template": lambda a: a.update(tok=_with_template(a["tok"])),
    "qlaunch version": lambda a: a["patch"].setattr(qlaunch, "__version__", qlaunch.__version__ + ".post1"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_changing_any_key_rebuilds(tokenizer, data, tmp_path, calls, monkeypatch, change):
    def write():
        records = json.load(open(data))
        records[0]["conversations"][-1]["value"] += " Indeed."
        open(data, "w").write(json.dumps(records))

    build(data, tokenizer, tmp_path / "c")
    calls["conversations"] = 0
    args = {"tok": tokenizer, "kw": {}, "write": write, "patch": monkeypatch}
    CHANGES[change](args)
    again = build(data, args["tok"], tmp_path / "c", **args["kw"])
    assert calls["conversations"] > 0, f"{change}: not rebuilt"
    assert len(entries(tmp_path / "c")) == 2  # a new entry; the old one is left as it was
    kw = {"max_length": 128, "truncation": "truncate", "system_message": SYS, **args["kw"]}
    items, stats = per_sample_reference(data, args["tok"], kw["max_length"], kw["truncation"], kw["system_message"])
    assert rows(again) == items and again.stats == stats


def test_the_key_is_stable_across_tokenizer_loads(demo, data):
    from qlaunch.model.load import load_tokenizer

    parts = [cache.key_parts(data, load_tokenizer(demo["model"]), max_length=128, truncation="truncate",
                             system_message=SYS) for _ in range(2)]
    assert parts[0] == parts[1] and cache.cache_key(parts[0]) == cache.cache_key(parts[1])


def _truncate_arrow(entry):
    data_dir = os.path.join(entry, cache.DATA)
    arrow = next(n for n in os.listdir(data_dir) if n.endswith(".arrow"))
    path = os.path.join(data_dir, arrow)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_bytes(entry):
    data_dir = os.path.join(entry, cache.DATA)
    arrow = next(n for n in os.listdir(data_dir) if n.endswith(".arrow"))
    path = os.path.join(data_dir, arrow)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        block = f.read(8)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in block))  # same size, other values


DAMAGE = {
    "no completion marker (killed before the end)": lambda e: os.remove(os.path.join(e, cache.MARKER)),
    "truncated Arrow file": _truncate_arrow,
    "flipped bytes in the Arrow file": _flip_bytes,
    "unreadable meta.json": lambda e: open(os.path.join(e, cache.META), "w").write("{not json"),
    "missing data directory": lambda e: __import__("shutil").rmtree(os.path.join(e, cache.DATA)),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_corrupted_or_half_written_entry_is_rebuilt_not_used(tokenizer, data, tmp_path, calls, caplog, damage):
    first = build(data, tokenizer, tmp_path / "c")
    expected, expected_stats = rows(first), first.stats  # read now: `first` maps the files damaged below
    (entry,) = entries(tmp_path / "c")
    DAMAGE[damage](os.path.join(tmp_path / "c", entry))
    calls["conversations"] = 0
    caplog.set_level(logging.WARNING, logger="qlaunch")
    again = build(data, tokenizer, tmp_path / "c")
    assert calls["conversations"] > 0, "the damaged entry was used"
    assert "is not usable" in caplog.text and "rebuilding it" in caplog.text
    assert rows(again) == expected and again.stats == expected_stats
    calls["conversations"] = 0
    build(data, tokenizer, tmp_path / "c")  # and the rebuilt entry is good
    assert calls["conversations"] == 0


def test_a_build_killed_halfway_leaves_nothing_a_later_run_trusts(tokenizer, data, tmp_path, calls, monkeypatch):
    original = cache._fsync_write

    def crash_before_marker(path, text):
        if os.path.basename(path) == cache.MARKER:
            raise KeyboardInterrupt  # killed between writing the data and marking it complete
        return original(path, text)

    monkeypatch.setattr(cache, "_fsync_write", crash_before_marker)
    with pytest.raises(KeyboardInterrupt):
        build(data, tokenizer, tmp_path / "c")
    assert entries(tmp_path / "c") == []  # nothing under a trusted name
    monkeypatch.setattr(cache, "_fsync_write", original)
    # A kill -9 leaves its temporary directory behind: it is never read.
    os.makedirs(tmp_path / "c" / ".build-train.json-leftover" / cache.DATA)
    calls["conversations"] = 0
    items, _ = per_sample_reference(data, tokenizer, 128, "truncate")
    assert rows(build(data, tokenizer, tmp_path / "c")) == items
    assert calls["conversations"] > 0 and len(entries(tmp_path / "c")) == 1


def test_every_sample_dropped_is_a_usage_error_and_nothing_is_cached(tokenizer, data, tmp_path):
    with pytest.raises(UsageError, match="every sample was dropped"):
        build(data, tokenizer, tmp_path / "c", max_length=8, truncation="drop")
    assert not os.path.exists(tmp_path / "c") or entries(tmp_path / "c") == []


def test_lazy_preprocess_is_not_cached(tokenizer, data, tmp_path, calls):
    lazy = build(data, tokenizer, tmp_path / "c", lazy=True)
    assert isinstance(lazy, LazyDataset) and not os.path.exists(tmp_path / "c")
    assert calls["conversations"] == 0  # nothing tokenized up front


def test_cache_dir_resolution_and_checks(tmp_path):
    from huggingface_hub import constants

    assert files.resolve_cache_dir(None) == os.path.join(constants.HF_HOME, "qlaunch", "tokenized")
    assert files.resolve_cache_dir("auto") == files.resolve_cache_dir(None)
    for off in ("none", "None", "off"):
        assert files.resolve_cache_dir(off) is None
    assert files.resolve_cache_dir(str(tmp_path / "x")) == str(tmp_path / "x")
    (tmp_path / "file").write_text("")
    assert "is not a directory" in files.cache_dir_problem(str(tmp_path / "file"))
    assert files.cache_dir_problem(str(tmp_path / "new" / "dir")) is None
    assert files.cache_dir_problem("none") is None


def test_cache_dir_that_is_a_file_is_refused_before_anything_loads(demo, tmp_path):
    from qlaunch.cli import prepare

    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="--cache_dir .*is not a directory"):
        prepare(["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir",
                 str(tmp_path / "out"), "--cache_dir", str(tmp_path / "file")])


def test_default_num_proc():
    assert cache.default_num_proc(100, cpus=8) == 1
    assert cache.default_num_proc(100_000, cpus=2) == 2
    assert cache.default_num_proc(9_000, cpus=8) == 2


class FakeArgs:
    """TrainingArguments' main_process_first, for one process of a simulated world."""

    def __init__(self, process_index, local_main):
        self.process_index, self.local_main, self.log = process_index, local_main, []

    def main_process_first(self, local, desc):
        import contextlib

        @contextlib.contextmanager
        def scope():
            self.log.append(("enter", local))
            yield
            self.log.append(("exit", local))

        return scope()


@pytest.mark.parametrize("process_index,local_main", [(0, True), (1, False), (8, True)])
def test_build_on_main_first_builds_once_per_process(process_index, local_main):
    args, built = FakeArgs(process_index, local_main), []

    def work():
        built.append(args.log[-1])  # which phase ran it
        return "data"

    assert build_on_main_first(args, work) == "data"
    # The main process works in the first (global) phase; every other one in the second (per node).
    expected = [("enter", False)] if process_index == 0 else [("enter", True)]
    assert built == expected


def test_builds_left_by_dead_builders_on_this_host_are_removed_and_nothing_else(tmp_path):
    import socket
    import subprocess
    import sys

    from qlaunch.data.cache import remove_stale_builds

    host = socket.gethostname()
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)  # that process has exited: its pid runs nothing now
    names = {
        "dead": f".build-train.json-abc123-{host}-{dead}-0123abcd",
        "alive": f".build-train.json-abc123-{host}-{os.getpid()}-0123abcd",
        "other host": f".build-train.json-abc123-elsewhere-{dead}-0123abcd",
        "odd name": f".build-{host}-notapid-0123abcd",
        "entry": "train.json-abc123",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "rows.arrow").write_bytes(b"x")
    assert remove_stale_builds(str(tmp_path)) == [names["dead"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for k, n in names.items() if k != "dead")
    assert remove_stale_builds(str(tmp_path / "missing")) == []


def test_only_the_verifying_process_reads_the_data_file_and_the_cached_bytes(tokenizer, data, tmp_path, monkeypatch):
    """The first process of a node hashes the data file and every cached Arrow byte; the processes after it
    take the noted digest (while the file keeps its size, mtime and inode) and check only the entry's marker,
    key and file sizes — one full read per node instead of one per rank."""
    cache_dir = tmp_path / "c"
    hashed, tables = [], []
    real_digest, real_table = cache.file_digest, cache._file_table
    monkeypatch.setattr(cache, "file_digest", lambda path, *a: hashed.append(path) or real_digest(path, *a))
    monkeypatch.setattr(cache, "_file_table", lambda d, digests=True: tables.append(digests) or real_table(d, digests))
    kwargs = dict(max_length=128, truncation="truncate", system_message=SYS, show_progress=False)
    built, _, reused = cache.cached_tokenization(data, tokenizer, str(cache_dir), **kwargs)  # the first process
    assert not reused and len(hashed) == 1
    hashed.clear(), tables.clear()
    other, _, reused = cache.cached_tokenization(data, tokenizer, str(cache_dir), verify=False, **kwargs)
    assert reused and hashed == [] and tables == [False]  # no byte of the data file or the Arrow files read
    assert other["input_ids"] == built["input_ids"]
    # content the verifying process would reject (same size, other bytes) is its to catch, not the others'
    arrow = next(p for p in (cache_dir / entries(cache_dir)[0] / "data").iterdir() if p.suffix == ".arrow")
    raw = bytearray(arrow.read_bytes())
    raw[-9] ^= 0xFF
    arrow.write_bytes(bytes(raw))
    with pytest.raises(cache.Corrupt, match="data files changed"):
        cache.load_entry(str(cache_dir / entries(cache_dir)[0]), cache.cache_key(cache.key_parts(
            data, tokenizer, max_length=128, truncation="truncate", system_message=SYS)))
    # a data file changed since the note: its stamp differs, so even a trusting process hashes it again
    os.utime(data, ns=(os.stat(data).st_atime_ns, os.stat(data).st_mtime_ns + 1_000_000))
    hashed.clear()
    cache.data_digest(data, str(cache_dir), trust_memo=True)
    assert hashed == [data]
