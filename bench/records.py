"""JSON-lines records for the GPU benchmarks: each record printed and appended to $OUT/<name>.jsonl."""

import json
import os


def jsonl_log(name: str):
    """emit(record): print the record as one JSON line and write it to $OUT/<name>.jsonl (or ./<name>.jsonl)."""
    out = open(os.path.join(os.environ.get("OUT", "."), f"{name}.jsonl"), "w")

    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        out.write(line + "\n")
        out.flush()

    return emit
