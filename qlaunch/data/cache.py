"""Tokenized data on disk, built once: an Arrow cache that every rank memory-maps.

Key: the data file's content (xxh3-128 of its bytes), the tokenizer (its whole serialized fast
tokenizer — vocabulary, merges, normalizer, pre-tokenizer, added tokens — or the sorted vocabulary
of a slow one, plus its class, special tokens and chat template), --model_max_length,
--truncation, --system_message, the qlaunch version, a digest of the code that turns records into
tokens (formats.py, tokenize.py, this file) and the transformers / tokenizers versions. Any
change → another entry; nothing is ever updated in place.

Layout of one entry, <cache_dir>/<data file name>-<key>/:
    data/          the samples kept (input_ids, labels: int32 lists), Dataset.save_to_disk
    meta.json      the key's parts, the statistics (kept / truncated / dropped, token counts),
                   the row count and each data file's size and xxh3-64 digest
    COMPLETE       written last, holds the key
An entry is built under a temporary name (<cache_dir>/.build-…) and renamed into place only once
COMPLETE is written, so a build killed halfway leaves nothing a later run trusts (its leftover
temporary directory is never read, and the next build on that host removes it once its builder's
process is gone: remove_stale_builds). An entry that fails any check on load (no COMPLETE, wrong
key, a data file of the wrong size or digest, Arrow that does not load) is moved aside, logged
and rebuilt. Two processes building the same entry at once is safe: the first rename wins, the
other discards its copy and uses the winner's.

Which process builds is the caller's choice (dataset.build_on_main_first): the main process
first; a process that then still finds no entry (a node-local cache directory on another node)
builds it for its node, again one process per node.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid

from qlaunch.config.errors import UsageError

log = logging.getLogger("qlaunch")

LAYOUT = 1  # bump when the entry layout changes
MARKER, META, DATA = "COMPLETE", "meta.json", "data"
ROW_STATS = ("length", "status", "trained", "system_not_rendered")
BATCH_SIZE = 1000
SAMPLES_PER_PROCESS = 4000  # below this, forking workers costs more than it saves


def _xxh(data: bytes) -> str:
    import xxhash  # a dependency of datasets

    return xxhash.xxh3_128_hexdigest(data)


def file_digest(path: str, chunk: int = 1 << 23) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of everything that decides the tokens: stable across loads of the same files."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        body = backend.to_str()
    else:  # slow / remote-code tokenizers (Qwen-7B's tiktoken): the vocabulary itself
        body = repr(sorted(tokenizer.get_vocab().items()))
    template = getattr(tokenizer, "chat_template", None)
    parts = {
        "class": type(tokenizer).__name__,
        "body": _xxh(body.encode("utf-8")),
        "chat_template": template if isinstance(template, (str, type(None))) else json.dumps(template, sort_keys=True),
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "split_special_tokens": bool(getattr(tokenizer, "split_special_tokens", False)),
    }
    return _xxh(json.dumps(parts, sort_keys=True).encode("utf-8"))


def _code_digest() -> str:
    from qlaunch.data import formats, labels, templates, tokenize

    h = hashlib.sha256()
    for module in (formats, templates, labels, tokenize):
        with open(module.__file__, "rb") as f:
            h.update(f.read())
    with open(__file__, "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:16]


def data_digest(path: str, cache_dir: str, *, trust_memo: bool) -> str:
    """The data file's digest. The process that verifies (one per node: dataset.build_on_main_first runs it
    first) hashes the file and notes the digest beside the file's size, mtime and inode in
    <cache_dir>/.digests; the other processes of the run take the note when the file still has that stamp,
    instead of reading the whole file once more each."""
    stat = os.stat(path)
    stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    memo = os.path.join(cache_dir, ".digests", _xxh(os.path.abspath(path).encode("utf-8"))[:32] + ".json")
    if trust_memo:
        try:
            with open(memo) as f:
                noted = json.load(f)
            if noted.get("stamp") == stamp and isinstance(noted.get("digest"), str):
                return noted["digest"]
        except (OSError, ValueError, AttributeError):
            pass
    digest = file_digest(path)
    try:  # a note that cannot be written only costs the other processes a read
        os.makedirs(os.path.dirname(memo), exist_ok=True)
        tmp = f"{memo}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as f:
            json.dump({"path": os.path.abspath(path), "stamp": stamp, "digest": digest}, f)
        os.replace(tmp, memo)
    except OSError:
        pass
    return digest


def key_parts(path: str, tokenizer, *, max_length: int, truncation: str, system_message: str,
              digest: str | None = None) -> dict:
    import tokenizers
    import transformers

    import qlaunch

    return {
        "layout": LAYOUT,
        "data": digest or file_digest(path),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "truncation": truncation,
        "system_message": system_message,
        "qlaunch": qlaunch.__version__,
        "code": _code_digest(),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def cache_key(parts: dict) -> str:
    return _xxh(json.dumps(parts, sort_keys=True).encode("utf-8"))


def entry_dir(cache_dir: str, path: str, key: str) -> str:
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in os.path.basename(path))[:64]
    return os.path.join(cache_dir, f"{name}-{key}")


def default_num_proc(samples: int, cpus: int | None = None) -> int:
    """Worker processes for a build: one per SAMPLES_PER_PROCESS samples, at most one per CPU."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, samples // SAMPLES_PER_PROCESS))


# ---- one entry: check, load, write ----------------------------------------------------------
class Corrupt(Exception):
    """An entry that must not be used: why, in a few words."""


def _file_table(data_dir: str, digests: bool = True) -> dict[str, list]:
    """{file name: [size, xxh3-64 of its bytes]} of an entry's data (digest None when not asked for)."""
    import xxhash

    table = {}
    for name in sorted(os.listdir(data_dir)):
        digest = None
        if digests:
            h = xxhash.xxh3_64()
            with open(os.path.join(data_dir, name), "rb") as f:
                while block := f.read(1 << 23):
                    h.update(block)
            digest = h.hexdigest()
        table[name] = [os.path.getsize(os.path.join(data_dir, name)), digest]
    return table


def load_entry(entry: str, key: str, verify: bool = True):
    """(memory-mapped datasets.Dataset, TokenizeStats, meta) of a complete entry; raises Corrupt.

    verify: hash every data file against meta.json (the process that verifies, one per node); otherwise the
    marker, the key and the files' sizes are trusted — that process checked the content moments before."""
    import datasets

    from qlaunch.data.tokenize import TokenizeStats

    try:
        with open(os.path.join(entry, MARKER)) as f:
            if f.read().strip() != key:
                raise Corrupt(f"{MARKER} names another key")
    except FileNotFoundError:
        raise Corrupt(f"no {MARKER} marker (a build that did not finish)") from None
    try:
        with open(os.path.join(entry, META)) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise Corrupt(f"{META} unreadable ({e})") from None
    if meta.get("key") != key or meta.get("layout") != LAYOUT:
        raise Corrupt(f"{META} is for another key or layout")
    data_dir = os.path.join(entry, DATA)
    try:
        files = _file_table(data_dir, digests=verify)
    except OSError as e:
        raise Corrupt(f"data unreadable ({e})") from None
    expected = meta.get("files") or {}
    if not verify:
        expected = {name: [size_digest[0], None] for name, size_digest in expected.items()}
    changed = sorted(n for n in set(files) | set(expected) if files.get(n) != expected.get(n))
    if changed:
        raise Corrupt(f"data files changed since the build: {', '.join(changed)}")
    try:
        rows = datasets.load_from_disk(data_dir)
    except Exception as e:  # noqa: BLE001 - any failure to load means: rebuild
        raise Corrupt(f"Arrow data does not load ({type(e).__name__}: {e})") from None
    if len(rows) != meta.get("rows") or rows.column_names != ["input_ids", "labels"]:
        raise Corrupt("row count or columns differ from meta.json")
    return rows, TokenizeStats(**meta["stats"]), meta


def _discard(entry: str, reason: str) -> None:
    log.warning("tokenized-data cache %s is not usable (%s): rebuilding it.", entry, reason)
    aside = os.path.join(os.path.dirname(entry), f".discard-{os.path.basename(entry)}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(entry, aside)  # atomic: no reader sees it half-deleted (open mmaps stay valid)
    except FileNotFoundError:
        return
    except OSError:
        aside = entry
    shutil.rmtree(aside, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def entry_of(rows) -> str | None:
    """The entry directory a loaded entry's rows are mapped from (datasets' cache_files: <entry>/data/*.arrow)."""
    files = getattr(rows, "cache_files", None) or []
    return os.path.dirname(os.path.dirname(files[0]["filename"])) if files else None


def remove_stale_builds(cache_dir: str) -> list[str]:
    """Remove the temporary directories of builds whose builder died (killed mid-build): named
    .build-<entry>-<host>-<pid>-<hex>, removed only when <host> is this host and no process <pid> runs here.
    A live builder, one on another host (its pid means nothing here) or a name of another form is left
    alone; a recycled pid keeps a dead build's directory, never removes a live one. Returns what was removed."""
    if not os.path.isdir(cache_dir):
        return []
    host, removed = socket.gethostname(), []
    for name in os.listdir(cache_dir):
        if not name.startswith(".build-"):
            continue
        rest, pid, suffix = (name.rsplit("-", 2) + ["", ""])[:3]
        if not (pid.isdigit() and len(suffix) == 8 and rest.endswith(f"-{host}")) or _alive(int(pid)):
            continue
        shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)
        removed.append(name)
    if removed:
        log.warning("tokenized-data cache %s: removed %d build director%s left by a killed run (%s).", cache_dir,
                    len(removed), "y" if len(removed) == 1 else "ies", ", ".join(sorted(removed)))
    return removed


def _fsync_write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# The tokenizer of the build in progress, for datasets.map's forked workers. Passing it in fn_kwargs
# would pickle it into every worker: 5-10 s per worker for a 150k-vocabulary tokenizer, longer than
# the tokenization itself. Forked workers inherit this module's memory instead.
_FORKED = {}


def _tokenize_batch(batch: dict, max_length: int, truncation: str, tokenizer=None) -> dict:
    """datasets.map's batched function: conversations → token columns + per-sample statistics."""
    from qlaunch.data import tokenize  # looked up per call, so a test can count calls

    tokenizer = _FORKED["tokenizer"] if tokenizer is None else tokenizer
    return tokenize.tokenize_rows(tokenizer, batch["messages"], max_length, truncation)


def _worker_kwargs(tokenizer, num_proc: int) -> dict:
    """fn_kwargs that reach the workers: the tokenizer itself only when workers do not fork."""
    import multiprocess

    if num_proc > 1 and multiprocess.get_start_method() != "fork":
        return {"tokenizer": tokenizer}
    _FORKED["tokenizer"] = tokenizer
    return {}


def _progress(show: bool):
    import contextlib

    import datasets

    @contextlib.contextmanager
    def scope():
        was_enabled = datasets.is_progress_bar_enabled()
        (datasets.enable_progress_bars if show else datasets.disable_progress_bars)()
        try:
            yield
        finally:
            (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()

    return scope()


def build_entry(path: str, tokenizer, cache_dir: str, entry: str, key: str, parts: dict, *, max_length: int,
                truncation: str, system_message: str, show_progress: bool, num_proc: int | None):
    """Tokenize path with datasets.map into a temporary directory, then rename it to entry."""
    import datasets
    import pyarrow.compute as pc

    from qlaunch.data.formats import load_samples
    from qlaunch.data.labels import DROPPED_NO_LABELS, DROPPED_TOO_LONG
    from qlaunch.data.tokenize import TokenizeStats, count_rows

    samples = load_samples(path, system_message)  # every malformed record reported here, before any work
    num_proc = default_num_proc(len(samples)) if num_proc is None else num_proc
    os.makedirs(cache_dir, exist_ok=True)
    tmp = os.path.join(cache_dir, f".build-{os.path.basename(entry)}-{socket.gethostname()}-{os.getpid()}-"
                                  f"{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    start = time.perf_counter()
    try:
        features = datasets.Features({
            "input_ids": datasets.List(datasets.Value("int32")), "labels": datasets.List(datasets.Value("int32")),
            "length": datasets.Value("int32"), "status": datasets.Value("int8"),
            "trained": datasets.Value("int32"), "system_not_rendered": datasets.Value("bool"),
        })
        source = datasets.Dataset.from_dict({"messages": samples})
        del samples
        with _progress(show_progress):
            rows = source.map(
                _tokenize_batch, batched=True, batch_size=BATCH_SIZE, num_proc=num_proc if num_proc > 1 else None,
                fn_kwargs={"max_length": max_length, "truncation": truncation, **_worker_kwargs(tokenizer, num_proc)},
                remove_columns=["messages"], features=features, desc=f"Tokenizing {os.path.basename(path)}",
                cache_file_name=os.path.join(tmp, "rows.arrow"), load_from_cache_file=False,
                new_fingerprint=key[:32],  # the key already says everything; skips hashing the tokenizer
            )
        del source
        table = rows.data
        columns = {name: table.column(name).to_pylist() for name in ROW_STATS}
        stats = count_rows(TokenizeStats(), columns, max_length,
                           tokens=pc.list_value_length(table.column("input_ids")).to_pylist())
        kept = [i for i, status in enumerate(columns["status"]) if status not in (DROPPED_TOO_LONG, DROPPED_NO_LABELS)]
        if not kept:
            fix = "Raise --model_max_length" + (" or use --truncation truncate." if truncation == "drop" else ".")
            raise UsageError(f"{path}: every sample was dropped ({stats.summary(max_length)}). {fix}")
        final = rows.select_columns(["input_ids", "labels"])
        if len(kept) < len(final):
            final = final.select(kept)
        with _progress(False):  # a second bar for a copy that takes a fraction of the map's time
            final.save_to_disk(os.path.join(tmp, DATA))
        del rows, final, table
        for name in os.listdir(tmp):  # the map's staging files: the data/ copy is what is kept
            if name.startswith("rows") and name.endswith(".arrow"):
                os.remove(os.path.join(tmp, name))
        seconds = time.perf_counter() - start
        meta = {"key": key, "layout": LAYOUT, "parts": parts, "source": os.path.abspath(path),
                "rows": len(kept), "stats": stats.__dict__, "files": _file_table(os.path.join(tmp, DATA)),
                "built": {"host": socket.gethostname(), "pid": os.getpid(), "rank": os.environ.get("RANK"),
                          "seconds": round(seconds, 3), "num_proc": num_proc, "at": time.strftime("%Y-%m-%d %H:%M:%S")}}
        _fsync_write(os.path.join(tmp, META), json.dumps(meta, indent=1))
        _fsync_write(os.path.join(tmp, MARKER), key)  # last: only now is the build complete
        try:
            os.rename(tmp, entry)
        except OSError:  # another process finished the same entry first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log.info("%s: tokenized %d samples in %.1f s (%.0f samples/s, %d process%s) into %s", path,
                     stats.samples, seconds, stats.samples / max(seconds, 1e-9), num_proc,
                     "es" if num_proc > 1 else "", entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _FORKED.clear()


def cached_tokenization(path: str, tokenizer, cache_dir: str, *, max_length: int, truncation: str,
                        system_message: str, show_progress: bool = True, num_proc: int | None = None,
                        verify: bool = True):
    """(rows, stats, reused): the entry for these inputs, loaded, or built first and then loaded.
    verify: this process checks content (the data file's digest, the entry's files); False for the
    processes that run after the one that did (dataset.build_on_main_first), which trust its checks."""
    digest = data_digest(path, cache_dir, trust_memo=not verify)
    parts = key_parts(path, tokenizer, max_length=max_length, truncation=truncation, system_message=system_message,
                      digest=digest)
    key = cache_key(parts)
    entry = entry_dir(cache_dir, path, key)
    if os.path.isdir(entry):
        try:
            rows, stats, meta = load_entry(entry, key, verify=verify)
            log.info("%s: tokenized data reused from %s (built %s)", path, entry, meta["built"]["at"])
            return rows, stats, True
        except Corrupt as e:
            _discard(entry, str(e))
    remove_stale_builds(cache_dir)  # the builder cleans up after builders killed before it
    build_entry(path, tokenizer, cache_dir, entry, key, parts, max_length=max_length, truncation=truncation,
                system_message=system_message, show_progress=show_progress, num_proc=num_proc)
    try:
        rows, stats, _ = load_entry(entry, key)
    except Corrupt as e:  # pragma: no cover - only if another process wrote a bad entry in between
        raise UsageError(f"tokenized-data cache {entry}: just built but not loadable ({e}). Remove it, or pass "
                         "--cache_dir none.") from None
    return rows, stats, False
