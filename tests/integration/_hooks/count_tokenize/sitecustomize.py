"""Test-only hook (put this directory on PYTHONPATH): every process logs what it tokenizes.

When QLAUNCH_TEST_TOKENIZE_LOG is set, `qlaunch.data.tokenize.tokenize_rows` (what the
tokenized-data cache's build maps over) is wrapped so that each call appends
"RANK PID CONVERSATIONS" to that file. The tests read it to assert which processes tokenized.
Installed lazily by an import hook on the module, so processes that never import it pay nothing.
"""
import os
import sys

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # _hooks/
from on_import import PatchOnImport  # noqa: E402

_TARGET = "qlaunch.data.tokenize"


def _patch(module) -> None:
    original = module.tokenize_rows

    def tokenize_rows(tokenizer, conversations, *args, **kwargs):
        with open(os.environ["QLAUNCH_TEST_TOKENIZE_LOG"], "a") as f:
            f.write(f"{os.environ.get('RANK', '-')} {os.getpid()} {len(conversations)}\n")
        return original(tokenizer, conversations, *args, **kwargs)

    module.tokenize_rows = tokenize_rows


if os.environ.get("QLAUNCH_TEST_TOKENIZE_LOG"):
    sys.meta_path.insert(0, PatchOnImport(_TARGET, _patch))
