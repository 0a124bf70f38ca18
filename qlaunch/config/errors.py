"""The one exception type that ends a run with a clear message and exit code 2."""
from __future__ import annotations


class UsageError(Exception):
    """Bad input: wrong flags, malformed data, an impossible combination.

    Carries one or more problems; each says what is wrong and how to fix it.
    """

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

    def render(self, prog: str = "finetune.py") -> str:
        if len(self.problems) == 1:
            return f"{prog}: error: {self.problems[0]}"
        lines = [f"{prog}: error: {len(self.problems)} problems:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)
