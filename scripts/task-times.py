"""The slowest tasks of an ansible-playbook log (Molecule's output, or a log
that `CORTEX_TEST_LOGS=DIR ./scripts/test` kept), from profile_tasks' lines.

    python scripts/task-times.py LOG [COUNT]

Prints the number of tasks and their total time, then the COUNT slowest (30).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HEADER = re.compile(r"(?:TASK|RUNNING HANDLER) \[(.*)")
# profile_tasks: "(0:00:01.234)" is the time of the task before this line.
ELAPSED = re.compile(r"\((\d+):(\d\d):(\d\d\.\d+)\)\s+\d+:\d\d:\d\d\.\d+")
DECORATION = re.compile(r"\x1b\[[0-9;]*m|^\d\d:\d\d:\d\d\s+|^\s*│\s?")


def task_times(text: str) -> list[tuple[float, str]]:
    lines = [DECORATION.sub("", DECORATION.sub("", line)) for line in text.splitlines()]
    rows, previous, header = [], None, None
    for index, line in enumerate(lines):
        found = HEADER.match(line)
        if found:
            header = found.group(1)
            # Molecule wraps long task names over the next lines.
            for follow in lines[index + 1 : index + 4]:
                if "]" in header:
                    break
                header += " " + follow.strip()
            header = header.split("]")[0]
            continue
        found = ELAPSED.search(line)
        if found and header is not None:
            seconds = int(found.group(1)) * 3600 + int(found.group(2)) * 60 + float(found.group(3))
            if previous is not None:
                rows.append((seconds, previous))
            previous, header = header, None
    return rows


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    rows = task_times(Path(sys.argv[1]).read_text(errors="replace"))
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    print(f"{len(rows)} tasks, {sum(seconds for seconds, _name in rows):.0f} s")
    for seconds, name in sorted(rows, reverse=True)[:count]:
        print(f"{seconds:7.1f}  {name}")


if __name__ == "__main__":
    main()
