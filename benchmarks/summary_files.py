"""Reading what the GPU scripts wrote under $OUT (benchmarks/consumer_summary.py, kernels_summary.py):
a file that is missing, or cut short by a part's timeout, reads as nothing rather than failing the summary."""
import json


def load_json(path):
    """The file's JSON, or None."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_jsonl(path):
    """The file's JSON lines that parse (a line cut off by a timeout is skipped); [] without the file."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    return out
