"""Assemble benchmarks/RESULTS.md from the per-topic sections in benchmarks/results/*.md.

Each benchmark writes its own section (tables, the exact command, notes); this joins them
in a fixed order so that the one results page never goes stale against its sources.
"""
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["foundation", "finetune", "outer_sync", "dp", "pipeline", "perfmodel", "links", "gpu"]
HEADER = """# Benchmark results

Every figure below was measured with the command printed beside it, as a ratio against an
uncompressed baseline run in the same command (absolute times on the shared 2-core CPU box
are noisy). Machine: 2 CPU cores, 24 GiB, no GPU; torch 2.13.0+cpu, gloo on loopback; CPU-heavy
runs were serialized with `flock /tmp/commtrain-cpu.lock`. Regenerate this page with
`python benchmarks/make_results.py` after re-running a benchmark.
"""


def _demote(text: str) -> str:
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        out.append("#" + line if not fenced and line.startswith("#") else line)
    return "\n".join(out)


def main() -> None:
    parts = [HEADER]
    # *_notes.md are parts of a generated section (e.g. adaptive.py --report appends its notes), not sections
    for name in ORDER + sorted(p.stem for p in (HERE / "results").glob("*.md")
                               if p.stem not in ORDER and not p.stem.endswith("_notes")):
        path = HERE / "results" / f"{name}.md"
        if path.exists():
            text = path.read_text().strip()
            if text.startswith("# "):  # a section's headings move one level down here
                text = _demote(text)
            parts.append(text.replace("](../plots/", "](plots/"))
    (HERE / "RESULTS.md").write_text("\n\n".join(parts) + "\n")
    print(f"wrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
