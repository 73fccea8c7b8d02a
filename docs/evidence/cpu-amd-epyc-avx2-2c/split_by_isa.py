"""Move the cells of baselines/cpu-amd-epyc-2c that were recorded on the AMD EPYC without AVX-512 to the key
that now names that machine, cpu-amd-epyc-avx2-2c (hardware keys carry the vector-instruction tier since
2026-12-04).

Which session recorded a cell is read from its stored host record: among this key's cells, those of the
2026-12-03 evening session carry kernel 6.18.44-fc-v1147 (a guest kernel build that machines of other CPUs
share too, so it tells the sessions of this key apart, not CPUs in general); that session's machine listed
avx2 and no avx512f or amx flags in /proc/cpuinfo (docs/evidence/cpu-amd-epyc-2c/README.md, vllm.md). The
other cells (the vLLM cells recorded that morning under 6.18.44-fc-v1045, on a machine whose flags were not
written down) stay where they are: their speed figures cannot be assigned to a tier. Every file is written whole through a temporary file and os.replace, and nothing is
written unless every cell was read.

    python docs/evidence/cpu-amd-epyc-avx2-2c/split_by_isa.py
"""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
OLD, NEW = "cpu-amd-epyc-2c", "cpu-amd-epyc-avx2-2c"
AVX2_HOST = "Linux 6.18.44-fc-v1147"
SOURCE = "docs/evidence/cpu-amd-epyc-avx2-2c/README.md (recorded before the key carried the tier)"


def write(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def main() -> int:
    plans = []
    for old_path in sorted((ROOT / "baselines" / OLD).glob("*.json")):
        document = json.loads(old_path.read_text())
        new_path = ROOT / "baselines" / NEW / old_path.name
        if new_path.exists():
            print(f"{new_path} exists: nothing was moved", file=sys.stderr)
            return 1
        moved = {cell_id: cell for cell_id, cell in document["cells"].items()
                 if cell["hardware"].get("system") == AVX2_HOST}
        for cell in moved.values():
            cell["hardware"].update(hardware_key=NEW, cpu_isa="avx2", cpu_isa_source=SOURCE)
        kept = {cell_id: cell for cell_id, cell in document["cells"].items() if cell_id not in moved}
        plans.append((old_path, dict(document, cells=kept), new_path, dict(document, hardware_key=NEW, cells=moved)))
    for old_path, kept, new_path, moved in plans:
        write(new_path, moved)
        if kept["cells"]:
            write(old_path, kept)
        else:
            old_path.unlink()
        print(f"{old_path.name}: {len(moved['cells'])} cells to {NEW}, {len(kept['cells'])} kept in {OLD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
