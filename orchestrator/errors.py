"""forge's own error type: what the CLI turns into one clear message and an exit code."""

from __future__ import annotations


class ForgeError(Exception):
    """A problem the user can fix; the message names the file, line and field where known."""

    exit_code = 1


class SpecError(ForgeError):
    """The job YAML is invalid; ``problems`` holds one line per problem."""

    exit_code = 2

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the job spec:\n{lines}")


class DataError(ForgeError):
    """The dataset has errors; the message lists them with line numbers."""

    exit_code = 1
